"""SGLang's DeepGEMM gate, held to what the policy decided (decision `deepgemm`).

SGLang decides DeepGEMM use once, when `sglang.srt.layers.deep_gemm_wrapper.configurer` is imported:
`_compute_enable_deep_gemm()` fills module constants (ENABLE_JIT_DEEPGEMM, DEEPGEMM_BLACKWELL,
DEEPGEMM_SCALE_UE8M0, ...) that other modules copy with `from ... import` and that the package
re-exports. 0.5.12 enables it on every sm >= 90 (SM12x counted as Blackwell), 0.5.13-0.5.19 exclude
SM120 only, 0.5.20 probes one DeepGEMM symbol on SM120, 0.5.21+ probe SM120 and SM121. Every version
0.5.12-0.5.23 returns False when SGLANG_ENABLE_JIT_DEEPGEMM is false (tests/contract checks each one).

So the decision is carried in two layers:

1. The environment (`apply_env`, run by prepare/register before SGLang's body or its workers run):
   SGLANG_ENABLE_JIT_DEEPGEMM=0 for `off`, =1 for `on` (and, on 0.5.12 with indexer=triton,
   SGLANG_OPT_FP8_WO_A_GEMM=0: see WO_A_SWITCH; with sparse_mla=triton on 0.5.13+,
   SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 and, on 0.5.15+, SGLANG_SM120_FLASHMLA_BACKEND=triton).
   Spawned schedulers, TP workers and the detokenizer inherit os.environ, so the configurer computes
   the decided value in each of them. A value the user set is never overridden (one log line says
   so). `on` cannot lift a version's own architecture exclusion (the scale-layout constants that go
   with it differ per version): it only keeps ds-plugins from switching DeepGEMM off.
2. CONFIGURER_OFF, a declared patch for processes where the configurer was imported before ds-plugins
   decided: it sets the constants to SGLang's own "disabled" values and rebinds the copies other
   sglang modules took (matched by name and value: the constants are bools, so SGLang's HookRegistry
   propagation, which matches by identity, would rebind every True in every module).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, cast

from ds_plugins.patching import Patch, Target

CONFIGURER = "sglang.srt.layers.deep_gemm_wrapper.configurer"
SWITCH = "SGLANG_ENABLE_JIT_DEEPGEMM"
# Names (NAME=value, comma-separated) whose value ds-plugins put into the environment: a spawned child
# inherits both, and so can tell our value from one the user set. Not DS_PLUGINS_*: those are switches.
OURS = "_DS_PLUGINS_SGLANG_SET"
_WANT = {"off": "0", "on": "1"}
# SGLang's EnvBool spellings (sglang/srt/environ.py).
_TRUE, _FALSE = ("true", "1", "yes", "y"), ("false", "0", "no", "n")

# The constants the gate produces, and their value when DeepGEMM is off. NEED_TMA_ALIGNED_SCALES is
# `not (SCALE_UE8M0 or _is_musa)` in every version: off means `not _is_musa`.
FLAGS_OFF = {
    "ENABLE_JIT_DEEPGEMM": False,
    "DEEPGEMM_BLACKWELL": False,
    "DEEPGEMM_SCALE_UE8M0": False,
    "DEEPGEMM_PAGED_SPARSE_MQA_LOGITS": False,  # 0.5.21+
}
REQUIRED = ("ENABLE_JIT_DEEPGEMM", "DEEPGEMM_BLACKWELL", "DEEPGEMM_SCALE_UE8M0", "DEEPGEMM_NEED_TMA_ALIGNED_SCALES")


def _ours(env=os.environ) -> dict[str, str]:
    pairs = (item.partition("=") for item in env.get(OURS, "").split(",") if item)
    return {name: value for name, _, value in pairs}


def explicit_value(env=os.environ, name: str = SWITCH) -> str | None:
    """A switch (SGLANG_ENABLE_JIT_DEEPGEMM by default) as the user set it; None if unset or set by ds-plugins."""
    value = env.get(name)
    if value is None or _ours(env).get(name) == value:
        return None
    return value


def _as_bool(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


_env_said: set[str] = set()  # what apply_env already logged in this process (prepare, then register)

# 0.5.12 only: its V4 o_proj runs DeepGEMM's fp8_einsum (no SM12x kernel, not routed) unless
# SGLANG_OPT_FP8_WO_A_GEMM is off; then SGLang dequantises wo_a to bf16 at load and uses torch.einsum.
WO_A_SWITCH = "SGLANG_OPT_FP8_WO_A_GEMM"
WO_A_VERSIONS = ">=0.5.12,<0.5.13"


# sparse_mla=triton on SGLang's own SM120 path (0.5.13+; the policy decides it on 0.5.15-0.5.18, or a user
# forces it): every prefill goes to the SM120 FlashMLA entry ds-plugins routes, not to FlashMLA's
# SM90a/SM100f-only sparse prefill (on by default from 0.5.15, sglang#31578), and where a route is refused
# SGLang's own Triton decode answers instead of its FlashInfer default (0.5.15's pinned FlashInfer 0.6.12
# has no flashinfer.mla._sparse_mla_sm120). Both are read from os.environ when SGLang first needs them
# (environ.EnvBool/EnvStr; the backend choice at flash_mla_sm120's import), in every process.
SPARSE_PREFILL_SWITCH = "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL"
SPARSE_PREFILL_VERSIONS = ">=0.5.13"
SM120_BACKEND_SWITCH = "SGLANG_SM120_FLASHMLA_BACKEND"
SM120_BACKEND_VERSIONS = ">=0.5.15"


def _in(versions: str, version: str | None) -> bool:
    from ds_plugins.landscape import in_range

    return bool(version) and in_range(versions, cast(str, version))  # bool(version): not None, not ""


def wanted(plan) -> dict[str, str]:
    """SGLang switches the plan asks for: {name: value}."""
    out = {}
    if plan.value("deepgemm") in _WANT:
        out[SWITCH] = _WANT[plan.value("deepgemm")]
    if plan.value("indexer") == "triton" and _in(WO_A_VERSIONS, plan.engine_version):
        out[WO_A_SWITCH] = "0"
    if plan.value("sparse_mla") == "triton":
        if _in(SPARSE_PREFILL_VERSIONS, plan.engine_version):
            out[SPARSE_PREFILL_SWITCH] = "0"
        if _in(SM120_BACKEND_VERSIONS, plan.engine_version):
            out[SM120_BACKEND_SWITCH] = "triton"
    return out


def set_switch(name: str, want: str, why: str, log: logging.Logger, env=os.environ) -> str:
    """Put one value into SGLang's own switch unless the user set it. Returns what happened, for tests
    and logs: "set", "kept" (ours already), "user" (the user's explicit value stays), "agrees"."""
    user = explicit_value(env, name)
    if user is None:
        already = env.get(name) == want
        env[name] = want
        ours = _ours(env)
        ours[name] = want
        env[OURS] = ",".join(f"{k}={v}" for k, v in sorted(ours.items()))
        return "kept" if already else "set"
    if _as_bool(user) == _as_bool(want) if _as_bool(want) is not None else user.strip().lower() == want:
        return "agrees"
    if name not in _env_said:
        _env_said.add(name)
        log.warning("ds-plugins: %s, but %s=%s was set explicitly; ds-plugins keeps the user's value", why, name, user)
    return "user"


def apply_env(plan, log: logging.Logger, env=os.environ) -> dict[str, str]:
    """Every SGLang switch the plan asks for (see wanted()); {name: what happened}."""
    why = {
        SWITCH: f"deepgemm={plan.value('deepgemm')}",
        WO_A_SWITCH: "indexer=triton (0.5.12: o_proj without DeepGEMM's fp8_einsum)",
        SPARSE_PREFILL_SWITCH: "sparse_mla=triton (V4 prefill off FlashMLA's SM90a/SM100f-only sparse kernel)",
        SM120_BACKEND_SWITCH: "sparse_mla=triton (SGLang's SM120 attention off its FlashInfer default)",
    }
    return {name: set_switch(name, value, why[name], log, env) for name, value in wanted(plan).items()}


# --- the patch -------------------------------------------------------------------------------


def _check(target: Target) -> str | None:
    names = vars(target.module)
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        return f"{CONFIGURER} has no {', '.join(missing)}"
    wrong = [n for n in REQUIRED if not isinstance(names[n], bool)]
    if wrong:
        return f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a bool here"
    if not callable(names.get("_compute_enable_deep_gemm")):
        return "no _compute_enable_deep_gemm(): the gate is computed some other way"
    user = explicit_value()
    if user is not None and _as_bool(user):
        return f"{SWITCH}={user} was set explicitly; the user's value wins over deepgemm=off"
    return None


def _copies(name: str, value: Any, skip) -> list[tuple[Any, str]]:
    """(module, name) of every other sglang module holding a copy of the constant."""
    found = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is skip or not mod_name.startswith("sglang."):
            continue
        namespace = getattr(mod, "__dict__", None)
        if namespace is not None and name in namespace and namespace[name] is value:
            found.append((mod, name))
    return found


def _install_off(target: Target):
    module = target.module
    names = vars(module)
    new = {n: v for n, v in FLAGS_OFF.items() if n in names}
    new["DEEPGEMM_NEED_TMA_ALIGNED_SCALES"] = not bool(names.get("_is_musa", False))
    changed: list[tuple[Any, str, Any]] = []  # (owner, name, old value)
    for name, value in new.items():
        old = names[name]
        if old is value:
            continue
        # Copies first, found by the old value, before the source changes.
        for owner, attr in _copies(name, old, module):
            changed.append((owner, attr, old))
            setattr(owner, attr, value)
        changed.append((module, name, old))
        setattr(module, name, value)

    def undo() -> None:
        for owner, name, old in reversed(changed):
            setattr(owner, name, old)

    return undo


CONFIGURER_OFF = Patch(
    id="sglang.deepgemm_off.configurer",
    engine="sglang",
    module=CONFIGURER,
    attribute="ENABLE_JIT_DEEPGEMM",
    versions=">=0.5.12",
    implements=("deepgemm", ("off",)),
    why="SGLang 0.5.12 enables DeepGEMM on SM120/SM121 and 0.5.13-0.5.20 on SM121 whatever DeepGEMM is "
    "installed; one without SM12x kernels fails at weight load ('Unknown SF transformation'). "
    "SGLANG_ENABLE_JIT_DEEPGEMM=0 covers processes that import the configurer after ds-plugins decided; "
    "this patch covers those that imported it before",
    retire="SGLang's gate probes the installed DeepGEMM for SM12x kernels on every SM12x GPU "
    "(0.5.21+ for SM120 and SM121; policy then says deepgemm=upstream)",
    check=_check,
    install=_install_off,
    how="the configurer's DeepGEMM flags (ENABLE_JIT_DEEPGEMM, DEEPGEMM_BLACKWELL, DEEPGEMM_SCALE_UE8M0, and "
    "DEEPGEMM_PAGED_SPARSE_MQA_LOGITS where present) become False, with the copies SGLang's modules made of "
    "them",
    upstream=("sgl-project/sglang#25877", "sgl-project/sglang#34827", "deepseek-ai/DeepGEMM#372"),
    evidence=("tests/engines/test_sglang_deepgemm_gate.py", "tests/contract/test_sglang_seams.py"),
)

PATCHES = (CONFIGURER_OFF,)
