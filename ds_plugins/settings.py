"""The DS_PLUGINS_* environment variables: names, allowed values, defaults.

One table, read by the policy, the registration, `ds-plugins doctor` and the
README test that keeps the documented switch list equal to this one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PREFIX = "DS_PLUGINS_"


class ConfigError(ValueError):
    """A DS_PLUGINS_* variable has a value we do not accept (or an unknown name)."""


class Setting:
    """One variable. A plain class: the PYTHONPATH hook imports this module at every interpreter
    start, where even `typing` (for a NamedTuple) would be a measurable cost."""

    __slots__ = ("name", "choices", "default", "help")

    def __init__(self, name: str, choices: tuple[str, ...] | None, default: str, help: str):
        self.name = name
        self.choices = choices  # None: free-form text
        self.default = default
        self.help = help

    def __repr__(self) -> str:
        return f"Setting({self.name!r})"


# Variables whose value is a credential: reports show only that they are set, never the value.
SECRETS = frozenset({"DS_PLUGINS_MOONCAKE_SECRET"})


def shown(name: str, value: str) -> str:
    """The value of a DS_PLUGINS_* variable as reports may print it."""
    return f"(set, {len(value.encode())} bytes)" if name in SECRETS and value else value


_FLAG = ("0", "1")
# Spellings accepted for the on/off flags, normalised to "0"/"1".
_FLAG_SPELLINGS = {
    "": "0",
    "0": "0",
    "false": "0",
    "no": "0",
    "off": "0",
    "1": "1",
    "true": "1",
    "yes": "1",
    "on": "1",
}

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DS_PLUGINS_DISABLE",
        _FLAG,
        "0",
        "1 turns ds-plugins off in every process: no probe, no patch, the engine runs as shipped.",
    ),
    Setting(
        "DS_PLUGINS_DEEPGEMM",
        ("auto", "on", "off", "upstream"),
        "auto",
        "DeepGEMM gate. auto: off on SM120/SM121 unless the installed DeepGEMM has SM12x kernels; "
        "on/off: force; upstream: leave the engine's own gate alone.",
    ),
    Setting(
        "DS_PLUGINS_SPARSE_MLA",
        ("auto", "triton", "upstream"),
        "auto",
        "DeepSeek-V4 sparse attention. auto: ds-plugins' Triton kernels only where the engine has no "
        "SM12x path; triton: force them on any CUDA GPU; upstream: never.",
    ),
    Setting(
        "DS_PLUGINS_INDEXER",
        ("auto", "triton", "upstream"),
        "auto",
        "V4's DeepGEMM calls on SM12x: lightning-indexer logits and schedule, grouped o_proj "
        "fp8_einsum, mHC prenorm GEMM; same values as DS_PLUGINS_SPARSE_MLA.",
    ),
    Setting(
        "DS_PLUGINS_CUDAGRAPH",
        ("auto", "on", "off"),
        "auto",
        "CUDA graphs on the ds-plugins kernel path (auto = on; they are graph-safe; off = as --enforce-eager, "
        "for DeepSeek-V4 on that path only). "
        "Has no effect on upstream paths.",
    ),
    Setting(
        "DS_PLUGINS_DSV4_MODEL",
        ("auto", "upstream"),
        "auto",
        "upstream: never register ds-plugins' DeepSeek-V4 model hook-up (vLLM); this also "
        "turns the Triton sparse-MLA/indexer path off, since it is reached through it.",
    ),
    Setting(
        "DS_PLUGINS_KV_CACHE_DTYPE",
        ("auto", "upstream"),
        "auto",
        "upstream: leave vLLM's --kv-cache-dtype auto as it is for DeepSeek-V4 on SM12x (vLLM 0.20-0.29 then "
        "asserts while building the model; pass --kv-cache-dtype fp8 yourself).",
    ),
    Setting(
        "DS_PLUGINS_CUSTOM_ALL_REDUCE",
        ("auto", "off", "upstream"),
        "auto",
        "vLLM's custom all-reduce. auto: off (as --disable-custom-all-reduce, tensor parallel only) on SM120/SM121 "
        "where NVML finds more than one visible GPU and no NVLink between them; off: on any vLLM box; "
        "upstream: leave it to vLLM.",
    ),
    Setting(
        "DS_PLUGINS_ASCEND_QUANT",
        ("auto", "off"),
        "auto",
        "The msModelSlim `--quantization ascend` loader on stock vLLM (deferred to vllm-ascend where it is installed).",
    ),
    Setting("DS_PLUGINS_MOONCAKE", ("auto", "off"), "auto", "The ds-plugins Mooncake KV connector for vLLM."),
    Setting(
        "DS_PLUGINS_MOONCAKE_SECRET",
        None,
        "",
        "Shared secret (at least 16 bytes) that authenticates the Mooncake connector's side channel "
        "between prefill and decode; same on every instance. kv_connector_extra_config.auth_secret_file "
        "takes precedence.",
    ),
    Setting(
        "DS_PLUGINS_SIMULATE",
        None,
        "",
        "Decide for a hypothetical environment instead of this one, e.g. "
        "'--capability 12.0 --lib deep_gemm=no-sm12x' (same flags as `ds-plugins doctor --simulate`). "
        "For tests and dry runs; a warning is logged whenever it is set.",
    ),
    Setting(
        "DS_PLUGINS_DEBUG",
        _FLAG,
        "0",
        "1 adds the traceback to the one-line error ds-plugins logs when something inside it fails.",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _normalise(setting: Setting, raw: str) -> str:
    value = raw.strip()
    if setting.choices is None:
        return value
    if setting.choices == _FLAG:
        flag = _FLAG_SPELLINGS.get(value.lower())
        if flag is None:
            raise ConfigError(
                f"{setting.name}={raw!r} is not a valid value; use 1 or 0 (also true/false, yes/no, on/off)"
            )
        return flag
    value = value.lower() or setting.default
    if value not in setting.choices:
        raise ConfigError(f"{setting.name}={raw!r} is not a valid value; allowed: {', '.join(setting.choices)}")
    return value


def read(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """All settings, validated, with defaults filled in.

    Raises ConfigError naming the variable for a bad value, or for a DS_PLUGINS_*
    name we do not know (a typo would otherwise be silently ignored).
    """
    env = os.environ if env is None else env
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in BY_NAME)
    if unknown:
        raise ConfigError(f"unknown variable {', '.join(unknown)}; ds-plugins knows: {', '.join(BY_NAME)}")
    return {s.name: _normalise(s, env[s.name]) if s.name in env else s.default for s in SETTINGS}


def value(name: str, env: Mapping[str, str] | None = None) -> str:
    """One variable, parsed exactly as `read` parses it (ConfigError for a bad value)."""
    env = os.environ if env is None else env
    setting = BY_NAME[name]
    return _normalise(setting, env[name]) if name in env else setting.default


def disabled(env: Mapping[str, str] | None = None) -> bool:
    """DS_PLUGINS_DISABLE, read on its own so that it works even if another variable is bad.

    A value that is not a flag raises ConfigError like any other bad value, so every process and
    `ds-plugins doctor` report it the same way (and ds-plugins does nothing where it is raised).
    """
    return value("DS_PLUGINS_DISABLE", env) == "1"
