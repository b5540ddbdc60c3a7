"""Per-feature decisions: a pure function of a probe, an engine and the DS_PLUGINS_* switches.

Rules follow `landscape.py` (what each engine version already does). Each
decision has an id, a value, a one-line reason and where it came from (the
rules or a named override). Values:

  deepgemm            upstream | off | on           (off/on: ds-plugins forces the engine's gate)
  sparse_mla          upstream | triton             (triton: ds-plugins' kernels)
  indexer             upstream | triton        (the indexer and V4's other DeepGEMM calls: o_proj einsum, mHC prenorm)
  cudagraph           upstream | on | off           (only about the ds-plugins kernel path)
  dsv4_model          upstream | ds_plugins         (ds_plugins: our vLLM model hook-up)
  kv_cache_dtype      upstream | fp8                (fp8: vLLM's --kv-cache-dtype auto becomes fp8 for V4)
  custom_all_reduce   upstream | off                (off: vLLM's --disable-custom-all-reduce, GPUs without NVLink)
  ascend_quant        upstream | ds_plugins | vllm-ascend | off
  mooncake_connector  upstream | ds_plugins | unavailable | off

and `unsupported` for every id when the engine predates DeepSeek-V4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from packaging.version import Version

from . import effects, landscape, paths, settings
from .probe import LINK_MIXED, LINK_NVLINK, LINK_PCIE, Device, Library, Probe

DECISION_IDS = (
    "deepgemm",
    "sparse_mla",
    "indexer",
    "cudagraph",
    "dsv4_model",
    "kv_cache_dtype",
    "custom_all_reduce",
    "ascend_quant",
    "mooncake_connector",
)
OVERRIDE_VAR = {
    "deepgemm": "DS_PLUGINS_DEEPGEMM",
    "sparse_mla": "DS_PLUGINS_SPARSE_MLA",
    "indexer": "DS_PLUGINS_INDEXER",
    "cudagraph": "DS_PLUGINS_CUDAGRAPH",
    "dsv4_model": "DS_PLUGINS_DSV4_MODEL",
    "kv_cache_dtype": "DS_PLUGINS_KV_CACHE_DTYPE",
    "custom_all_reduce": "DS_PLUGINS_CUSTOM_ALL_REDUCE",
    "ascend_quant": "DS_PLUGINS_ASCEND_QUANT",
    "mooncake_connector": "DS_PLUGINS_MOONCAKE",
}


class Decision(NamedTuple):
    id: str
    value: str
    reason: str
    source: str = "policy"  # "policy", or the DS_PLUGINS_* variable that forced it

    @property
    def active(self) -> bool:
        """True where ds-plugins changes or offers something in the engine for this feature
        (ds_plugins.effects, the one table of what each value does)."""
        return effects.acts(self.id, self.value)


class Plan(NamedTuple):
    engine: str
    engine_version: str | None
    status: str  # "supported" | "unsupported" | "absent"
    status_reason: str
    target: str  # one line about the accelerator the decisions are for
    decisions: tuple[Decision, ...]

    def decision(self, id: str) -> Decision:
        for d in self.decisions:
            if d.id == id:
                return d
        raise KeyError(id)

    def value(self, id: str) -> str:
        return self.decision(id).value

    @property
    def acting(self) -> bool:
        return any(d.active for d in self.decisions)


# --- the accelerator the decisions are for ---------------------------------------


class _Target(NamedTuple):
    kind: str  # "cuda" | "npu" | "cpu"
    device: Device | None
    note: str

    @property
    def capability(self) -> tuple[int, int] | None:
        return self.device.capability if self.device else None

    @property
    def sm12x(self) -> bool:
        return self.kind == "cuda" and self.capability is not None and self.capability[0] == 12

    @property
    def sm(self) -> str:
        c = self.capability
        return f"SM{c[0]}{c[1]}" if c else "?"


def _target(probe: Probe) -> _Target:
    cuda = [d for d in probe.devices if d.kind == "cuda"]
    if cuda:
        caps = sorted({d.capability for d in cuda if d.capability})
        note = cuda[0].label
        if len(caps) > 1:
            # Engines place one model on GPUs of one kind; decide for GPU 0 and say so.
            note += f"; mixed capabilities {', '.join(f'{a}.{b}' for a, b in caps)}, deciding for GPU 0"
        return _Target("cuda", cuda[0], note)
    npu = [d for d in probe.devices if d.kind == "npu"]
    if npu:
        return _Target("npu", npu[0], f"{len(npu)} x Ascend NPU")
    return _Target("cpu", None, "no GPU or NPU visible" + (f" ({probe.device_note})" if probe.device_note else ""))


def _no_change_reason(t: _Target) -> str | None:
    """Why a CUDA-kernel feature is not ours to touch on this target, or None on SM12x."""
    if t.kind == "cpu":
        return "no GPU: nothing to replace"
    if t.kind == "npu":
        return "Ascend NPU: the engine's Ascend backend runs DeepSeek-V4 there"
    if t.sm12x:
        return None
    c = t.capability
    if c and (c == (9, 0) or c[0] == 10):
        return f"{t.sm}: the engine's own FlashMLA/DeepGEMM kernels run here; ds-plugins never changes them"
    return f"{t.sm}: not a ds-plugins target (its kernels are for SM120/SM121)"


# --- rules ---------------------------------------------------------------------


def _engine_desc(engine: str, version: str) -> str:
    return f"{landscape.ENGINE_TITLE[engine]} {version}"


def _effective_deep_gemm(probe: Probe, engine: str) -> Library:
    """The DeepGEMM the engine would import: vLLM prefers site-packages, then its vendored copy."""
    site = probe.library("deep_gemm")
    if engine == "vllm" and not site.present:
        return probe.library("vllm.third_party.deep_gemm")
    return site


def _deepgemm(probe: Probe, engine: str, version: str, facts, t: _Target) -> Decision:
    reason = _no_change_reason(t)
    if reason:
        return Decision("deepgemm", "upstream", reason)
    lib = _effective_deep_gemm(probe, engine)
    if not lib.present:
        return Decision("deepgemm", "upstream", "no DeepGEMM installed: the engine will not use it")
    if engine == "sglang":
        return _deepgemm_sglang(lib, _engine_desc(engine, version), facts, t, version)
    return _deepgemm_vllm(lib, _engine_desc(engine, version), facts, t)


_DEEPGEMM_CRASH = "would fail at weight load ('Unknown SF transformation')"


def _where(lib: Library) -> str:
    return f"{lib.describe()} at {lib.location}" if lib.location else lib.describe()


def _deepgemm_vllm(lib: Library, desc: str, facts, t: _Target) -> Decision:
    if "deepgemm_gate_sm12x" not in facts:
        return Decision("deepgemm", "upstream", f"{desc} already keeps DeepGEMM off on SM12x")
    if lib.has("sm12x"):
        return Decision("deepgemm", "upstream", f"{desc} enables DeepGEMM on SM12x and {_where(lib)} has SM12x kernels")
    return Decision(
        "deepgemm", "off", f"{desc} enables DeepGEMM on SM12x but {_where(lib)} has no SM12x kernels: {_DEEPGEMM_CRASH}"
    )


# SGLang's gate returns False for sm_version 120 outright in these releases (0.5.20 began probing DeepGEMM).
SGLANG_GATE_EXCLUDES_SM120 = ">=0.5.13,<0.5.20"


def _deepgemm_sglang(lib: Library, desc: str, facts, t: _Target, version: str) -> Decision:
    # SGLang's gate learned SM120 in 0.5.13 (excluded; probed from 0.5.20) and SM121 in 0.5.21. Its probe
    # only checks that DeepGEMM's SM12x names are callable, which a DeepGEMM without the SM12x kernels
    # (sgl-deep-gemm 0.1.0) passes: ds-plugins' kernel-file probe is the judge wherever SGLang probes.
    if t.capability == (12, 0) and landscape.in_range(SGLANG_GATE_EXCLUDES_SM120, version):
        return Decision("deepgemm", "upstream", f"{desc} already keeps DeepGEMM off on {t.sm} itself")
    guarded = "deepgemm_gate_sm120_guarded" if t.capability == (12, 0) else "deepgemm_gate_sm121_guarded"
    if lib.has("sm12x"):
        return Decision(
            "deepgemm", "upstream", f"{desc} enables DeepGEMM on {t.sm} and {_where(lib)} has SM12x kernels"
        )
    if guarded in facts:
        return Decision(
            "deepgemm",
            "off",
            f"{desc} checks only that DeepGEMM's SM12x names exist on {t.sm}, and {_where(lib)} has no "
            f"SM12x kernels: ds-plugins holds the gate off in every process (SGLang alone "
            f"{_DEEPGEMM_CRASH})",
        )
    return Decision(
        "deepgemm",
        "off",
        f"{desc} enables DeepGEMM on {t.sm} but {_where(lib)} has no SM12x kernels: {_DEEPGEMM_CRASH}",
    )


def _sparse_mla(probe: Probe, engine: str, version: str, facts, t: _Target) -> Decision:
    reason = _no_change_reason(t)
    if reason:
        return Decision("sparse_mla", "upstream", reason)
    desc = _engine_desc(engine, version)
    if "sm12x_dsv4_attention" not in facts:
        return Decision(
            "sparse_mla", "triton", f"{desc} has no SM12x sparse-MLA path for DeepSeek-V4 (FlashMLA is SM90/SM100 only)"
        )
    rule = _sparse_mla_vllm if engine == "vllm" else _sparse_mla_sglang
    return rule(probe, desc, facts, t)


def _sparse_mla_vllm(probe: Probe, desc: str, facts, t: _Target) -> Decision:
    fi = probe.library("flashinfer")
    if fi.has("sm120_sparse_mla"):
        return Decision("sparse_mla", "upstream", f"{desc} uses FlashInfer's SM120 sparse MLA ({fi.describe()})")
    # The probe reads FlashInfer's capability (SM12x branch, the parameters vLLM passes), not the name.
    detail = f" ({fi.note})" if fi.present and fi.note else ""
    return Decision(
        "sparse_mla",
        "triton",
        f"{desc} routes SM12x to FlashInfer's SM120 sparse MLA, which {fi.describe()} lacks{detail}",
    )


# SGLang 0.5.15-0.5.18 on SM12x: SGLANG_OPT_FLASHMLA_SPARSE_PREFILL (on by default) sends every prefill to
# FlashMLA's SM90a/SM100f-only sparse kernel, and 0.5.15's default SM120 decode imports a FlashInfer
# module its pinned 0.6.12 lacks (ds_plugins/paths/sglang.py). sparse_mla=triton covers both.
SGLANG_SPARSE_PREFILL_DEFAULT = ">=0.5.15,<0.5.19"


def _sparse_mla_sglang(probe: Probe, desc: str, facts, t: _Target) -> Decision:
    version = probe.engines.get("sglang")
    if version and landscape.in_range(SGLANG_SPARSE_PREFILL_DEFAULT, version):
        return Decision(
            "sparse_mla",
            "triton",
            f"{desc} sends V4 prefill on {t.sm} to FlashMLA's sparse kernel (SM90a/SM100f only; "
            f"SGLANG_OPT_FLASHMLA_SPARSE_PREFILL on by default) and its default SM120 decode to a "
            f"FlashInfer module its pinned FlashInfer lacks: ds-plugins turns sparse prefill off and "
            f"answers SGLang's SM120 FlashMLA entry with its Triton kernel",
        )
    return Decision("sparse_mla", "upstream", f"{desc} has its own SM120 FlashMLA replacement")


def _indexer(probe: Probe, engine: str, version: str, facts, t: _Target) -> Decision:
    reason = _no_change_reason(t)
    if reason:
        return Decision("indexer", "upstream", reason)
    desc = _engine_desc(engine, version)
    if "sm12x_dsv4_attention" not in facts:
        return Decision(
            "indexer",
            "triton",
            f"{desc} has no SM12x path for DeepSeek-V4's DeepGEMM calls (indexer logits, o_proj einsum, mHC prenorm)",
        )
    rule = _indexer_vllm if engine == "vllm" else _indexer_sglang
    return rule(probe, desc, facts, t)


def _indexer_vllm(probe: Probe, desc: str, facts, t: _Target) -> Decision:
    lib = _effective_deep_gemm(probe, "vllm")
    if lib.has("sm12x"):
        return Decision("indexer", "upstream", f"{desc} computes indexer logits with {lib.describe()}'s SM12x kernels")
    return Decision(
        "indexer",
        "triton",
        f"{desc} computes V4's indexer logits, o_proj einsum and mHC prenorm with DeepGEMM, and "
        f"{lib.describe()} has no SM12x kernels",
    )


def _indexer_sglang(probe: Probe, desc: str, facts, t: _Target) -> Decision:
    return Decision("indexer", "upstream", f"{desc} has its own SM120 path for DeepSeek-V4")


def _kv_cache_dtype(engine: str, version: str, t: _Target) -> Decision:
    """fp8 exactly where the path manifest has a KV-dtype blocker this decision covers: V4's fp8_ds_mla
    layout asserts an fp8 KV-cache dtype and the engine's default (auto) does not give one."""
    reason = _no_change_reason(t)
    if reason:
        return Decision("kv_cache_dtype", "upstream", reason)
    device = paths.device_class(t.capability)
    rows = [
        r
        for r in paths.rows(engine)
        if r.cover and r.cover.decision == "kv_cache_dtype" and r.upstream == "blocker" and r.applies(version, device)
    ]
    if not rows:
        return Decision(
            "kv_cache_dtype",
            "upstream",
            f"{_engine_desc(engine, version)} accepts its default KV-cache dtype for DeepSeek-V4 on {t.sm}",
        )
    return Decision(
        "kv_cache_dtype",
        rows[0].cover.value,  # type: ignore[union-attr]  # rows: those with a cover
        f"{_engine_desc(engine, version)} asserts an fp8 KV-cache dtype for DeepSeek-V4's fp8_ds_mla "
        f"layout on {t.sm} and its default is auto ({rows[0].refs[0] if rows[0].refs else 'upstream'}): "
        f"ds-plugins turns auto (only auto) into fp8",
    )


CUSTOM_ALL_REDUCE_ISSUE = "vllm-project/vllm#47266"


def _custom_all_reduce(probe: Probe, engine: str, version: str, t: _Target) -> Decision:
    """off exactly where vLLM's custom all-reduce meets GPUs without NVLink on SM12x: vLLM turns it on for
    tensor parallelism between two PCIe-only GPUs when CUDA's P2P check passes, and its CUDA IPC then
    fails on these workstation boxes (known failure custom_all_reduce_p2p). Only what NVML read counts:
    an unknown topology is never taken for PCIe-only."""

    def upstream(why: str) -> Decision:
        return Decision("custom_all_reduce", "upstream", why)

    if engine != "vllm":
        return upstream(
            f"{landscape.ENGINE_TITLE[engine]}: ds-plugins leaves its custom all-reduce alone (on a "
            f"PCIe-only box pass --disable-custom-all-reduce)"
        )
    if t.kind != "cuda":
        return upstream(_no_change_reason(t) or "no CUDA GPU")
    if not t.sm12x:
        return upstream(f"{t.sm}: not a ds-plugins target; vLLM's own all-reduce checks decide")
    gpus = [d for d in probe.devices if d.kind == "cuda"]
    if len(gpus) < 2:
        return upstream("one visible GPU: no all-reduce between GPUs")
    links, note = probe.gpu_links, probe.gpu_links_note
    seen = f" ({note})" if note else ""
    if links == LINK_NVLINK:
        return upstream(f"the {len(gpus)} visible GPUs are NVLink-connected{seen}: vLLM's custom all-reduce runs there")
    if links == LINK_MIXED:
        return upstream(
            f"some visible GPU pairs have NVLink, others not{seen}: vLLM's own checks decide; if tensor "
            f"parallelism fails in custom_all_reduce.cuh, pass --disable-custom-all-reduce"
        )
    if links != LINK_PCIE:
        return upstream(
            f"how the {len(gpus)} visible GPUs are connected is not known here{seen}: vLLM's custom "
            f"all-reduce left as shipped; on a PCIe-only box pass --disable-custom-all-reduce or set "
            f"DS_PLUGINS_CUSTOM_ALL_REDUCE=off"
        )
    return Decision(
        "custom_all_reduce",
        "off",
        f"{_engine_desc(engine, version)} turns its custom all-reduce on for tensor parallelism between "
        f"two GPUs without NVLink when CUDA's P2P check passes, and its CUDA IPC then fails on SM12x "
        f"({CUSTOM_ALL_REDUCE_ISSUE}); here {len(gpus)} x {t.sm}{seen}: ds-plugins sets "
        f"--disable-custom-all-reduce (tensor parallel > 1 only; NCCL all-reduces)",
    )


def _forced(d: Decision, overrides: Mapping[str, str], mapping: Mapping[str, str]) -> Decision:
    """Apply a DS_PLUGINS_* override; `mapping` turns the variable's value into a decision value."""
    var = OVERRIDE_VAR[d.id]
    raw = overrides[var]
    if raw == "auto" or raw not in mapping:
        return d
    value = mapping[raw]
    if value == d.value:
        return Decision(d.id, d.value, f"{d.reason} (also what {var}={raw} asks)", var)
    return Decision(d.id, value, f"forced by {var}={raw} (the rules said {d.value}: {d.reason})", var)


def _unsupported(engine: str, version: str, t: _Target) -> Plan:
    why = (
        f"needs {landscape.ENGINE_TITLE[engine]} >= {landscape.MINIMUM[engine]}: "
        f"{_engine_desc(engine, version)} has no DeepSeek-V4 model"
    )
    return Plan(
        engine, version, "unsupported", why, t.note, tuple(Decision(i, "unsupported", why) for i in DECISION_IDS)
    )


def decide(probe: Probe, engine: str, env: Mapping[str, str] | None = None) -> Plan:
    """Decisions for `engine` on the probed machine. Raises settings.ConfigError on a bad switch."""
    overrides = settings.read(env)
    t = _target(probe)
    version = probe.engines.get(engine)
    title = landscape.ENGINE_TITLE[engine]
    if version is None:
        why = f"{title} is not installed"
        return Plan(engine, None, "absent", why, t.note, tuple(Decision(i, "upstream", why) for i in DECISION_IDS))
    if not landscape.is_supported(engine, version):
        return _unsupported(engine, version, t)
    facts = landscape.facts_for(engine, version)
    status_reason = f"{_engine_desc(engine, version)} has DeepSeek-V4"
    if landscape.is_newer_than_tested(engine, version):
        status_reason += (
            f"; newer than the newest tested ({landscape.NEWEST_TESTED[engine]}): "
            f"assuming it behaves like {landscape.NEWEST_TESTED[engine]}"
        )
    Version(version)  # validates the version string early, with packaging's own message

    kernel_map = {"triton": "triton", "upstream": "upstream"}
    deepgemm = _forced(
        _deepgemm(probe, engine, version, facts, t), overrides, {"on": "on", "off": "off", "upstream": "upstream"}
    )
    sparse_mla = _sparse_mla(probe, engine, version, facts, t)
    indexer = _indexer(probe, engine, version, facts, t)
    if t.kind == "cuda":  # forcing our CUDA kernels only means something on a CUDA GPU
        sparse_mla = _forced(sparse_mla, overrides, kernel_map)
        indexer = _forced(indexer, overrides, kernel_map)

    # The model hook-up: on vLLM our kernels are reached through it; SGLang keeps its
    # native model and we route at call sites.
    uses_ours = "triton" in (sparse_mla.value, indexer.value)
    if engine == "vllm" and uses_ours:
        if overrides["DS_PLUGINS_DSV4_MODEL"] == "upstream":
            off = "DS_PLUGINS_DSV4_MODEL=upstream: the Triton path is reached only through the model hook-up"
            dsv4_model = Decision(
                "dsv4_model", "upstream", "forced by DS_PLUGINS_DSV4_MODEL=upstream", "DS_PLUGINS_DSV4_MODEL"
            )
            sparse_mla = Decision("sparse_mla", "upstream", off, "DS_PLUGINS_DSV4_MODEL")
            indexer = Decision("indexer", "upstream", off, "DS_PLUGINS_DSV4_MODEL")
            uses_ours = False
        else:
            dsv4_model = Decision(
                "dsv4_model",
                "ds_plugins",
                "DeepseekV4ForCausalLM and its MTP model go to the ds-plugins hook-up, "
                "whose kernel routes (sparse attention, indexer, o_proj einsum, mHC prenorm) "
                "go to Triton",
            )
    elif engine == "vllm":
        dsv4_model = Decision("dsv4_model", "upstream", "upstream kernels serve every feature here")
    else:
        dsv4_model = Decision(
            "dsv4_model", "upstream", "SGLang keeps its native model; ds-plugins routes kernels at call sites"
        )

    if uses_ours:
        cudagraph = _forced(
            Decision("cudagraph", "on", "the ds-plugins kernels are graph-safe"), overrides, {"on": "on", "off": "off"}
        )
    else:
        cudagraph = Decision("cudagraph", "upstream", "the ds-plugins kernel path is not in use")

    kv_cache_dtype = _forced(_kv_cache_dtype(engine, version, t), overrides, {"upstream": "upstream"})
    custom_all_reduce = _custom_all_reduce(probe, engine, version, t)
    if engine == "vllm":  # the switch is vLLM's: SGLang's custom all-reduce is not ds-plugins' to change
        custom_all_reduce = _forced(custom_all_reduce, overrides, {"off": "off", "upstream": "upstream"})

    if engine == "vllm":
        ascend = _ascend_quant(probe, t)
        mooncake = _mooncake(probe)
    else:
        ascend = Decision(
            "ascend_quant",
            "upstream",
            "SGLang reads msModelSlim checkpoints itself on Ascend (--quantization modelslim)",
        )
        mooncake = Decision("mooncake_connector", "upstream", "SGLang has its own Mooncake transfer backend")
    ascend = _forced(ascend, overrides, {"off": "off"})
    mooncake = _forced(mooncake, overrides, {"off": "off"})

    decisions = (
        deepgemm,
        sparse_mla,
        indexer,
        cudagraph,
        dsv4_model,
        kv_cache_dtype,
        custom_all_reduce,
        ascend,
        mooncake,
    )
    assert tuple(d.id for d in decisions) == DECISION_IDS
    if t.kind == "cuda":
        blocked = paths.blockers(
            engine,
            version,
            t.capability,
            {d.id: d.value for d in decisions},
            lambda name, feature: _installed(probe, engine, name).has(feature),
        )
        if blocked:
            return _blocked(engine, version, t, blocked)
    return Plan(engine, version, "supported", status_reason, t.note, decisions)


def _installed(probe: Probe, engine: str, name: str) -> Library:
    """The library the engine would use, for the manifest's `unless` (DeepGEMM: vLLM's effective one)."""
    return _effective_deep_gemm(probe, engine) if name == "deep_gemm" else probe.library(name)


def _blocked(engine: str, version: str, t: _Target, blocked: paths.Blockers) -> Plan:
    """A version whose DeepSeek-V4 path on this GPU reaches a kernel that fails there and that
    ds-plugins does not cover (the path manifest): unsupported, never half-served."""
    first = blocked.rows[0]
    more = f" (and {len(blocked.rows) - 1} more)" if len(blocked.rows) > 1 else ""
    title = landscape.ENGINE_TITLE[engine]
    upgrade = (
        f"upgrade to {title} >= {blocked.upgrade_to}"
        if blocked.upgrade_to
        else f"no {title} release is known to serve it there yet"
    )
    why = f"unsupported on {t.sm} with {_engine_desc(engine, version)}: {first.kernel} ({first.why}){more}; {upgrade}"
    return Plan(
        engine, version, "unsupported", why, t.note, tuple(Decision(i, "unsupported", why) for i in DECISION_IDS)
    )


def _ascend_quant(probe: Probe, t: _Target) -> Decision:
    if probe.library("vllm_ascend").present:
        return Decision(
            "ascend_quant",
            "vllm-ascend",
            "vllm-ascend is installed and owns --quantization ascend; ds-plugins defers to it",
        )
    if t.kind == "npu" and probe.library("torch_npu").present:
        how = "torch_npu ops on the Ascend NPU"
    elif t.kind == "cuda":
        how = "portable int8/W4A8 kernels on the CUDA GPU"
    else:
        how = "the CPU reference path"
    return Decision("ascend_quant", "ds_plugins", f"--quantization ascend loads msModelSlim checkpoints with {how}")


def _mooncake(probe: Probe) -> Decision:
    if not probe.library("mooncake").present:
        return Decision(
            "mooncake_connector",
            "unavailable",
            "mooncake-transfer-engine is not installed (pip install 'ds-plugins[mooncake]')",
        )
    return Decision(
        "mooncake_connector",
        "ds_plugins",
        "the ds-plugins Mooncake connector is available through kv_connector_module_path",
    )
