"""Per-feature decisions: a pure function of a probe, an engine and the DS_PLUGINS_* switches.

Rules follow `landscape.py` (what each engine version already does). Each
decision has an id, a value, a one-line reason and where it came from (the
rules or a named override). Values:

  deepgemm            upstream | off | on           (off/on: ds-plugins forces the engine's gate)
  sparse_mla          upstream | triton             (triton: ds-plugins' kernels)
  indexer             upstream | triton        (the indexer and V4's other DeepGEMM calls: o_proj einsum, mHC prenorm)
  cudagraph           upstream | on | off           (only about the ds-plugins kernel path)
  dsv4_model          upstream | ds_plugins         (ds_plugins: our vLLM model hook-up)
  ascend_quant        upstream | ds_plugins | vllm-ascend | off
  mooncake_connector  upstream | ds_plugins | unavailable | off

and `unsupported` for every id when the engine predates DeepSeek-V4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from packaging.version import Version

from . import effects, landscape, settings
from .probe import Device, Library, Probe

DECISION_IDS = ("deepgemm", "sparse_mla", "indexer", "cudagraph", "dsv4_model", "ascend_quant",
                "mooncake_connector")
OVERRIDE_VAR = {
    "deepgemm": "DS_PLUGINS_DEEPGEMM",
    "sparse_mla": "DS_PLUGINS_SPARSE_MLA",
    "indexer": "DS_PLUGINS_INDEXER",
    "cudagraph": "DS_PLUGINS_CUDAGRAPH",
    "dsv4_model": "DS_PLUGINS_DSV4_MODEL",
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
    where = f"{lib.describe()} at {lib.location}" if lib.location else lib.describe()
    has = lib.has("sm12x")
    desc = _engine_desc(engine, version)
    crash = "would fail at weight load ('Unknown SF transformation')"
    if engine == "vllm":
        if "deepgemm_gate_sm12x" not in facts:
            return Decision("deepgemm", "upstream", f"{desc} already keeps DeepGEMM off on SM12x")
        if has:
            return Decision("deepgemm", "upstream", f"{desc} enables DeepGEMM on SM12x and {where} has SM12x kernels")
        return Decision("deepgemm", "off",
                        f"{desc} enables DeepGEMM on SM12x but {where} has no SM12x kernels: {crash}")
    # SGLang: its gate learned SM120 in 0.5.13 and SM121 in 0.5.21.
    guarded = "deepgemm_gate_sm120_guarded" if t.capability == (12, 0) else "deepgemm_gate_sm121_guarded"
    if guarded in facts:
        return Decision("deepgemm", "upstream", f"{desc} already guards DeepGEMM on {t.sm} itself")
    if has:
        return Decision("deepgemm", "upstream", f"{desc} enables DeepGEMM on {t.sm} and {where} has SM12x kernels")
    return Decision("deepgemm", "off", f"{desc} enables DeepGEMM on {t.sm} but {where} has no SM12x kernels: {crash}")


def _sparse_mla(probe: Probe, engine: str, version: str, facts, t: _Target) -> Decision:
    reason = _no_change_reason(t)
    if reason:
        return Decision("sparse_mla", "upstream", reason)
    desc = _engine_desc(engine, version)
    if "sm12x_dsv4_attention" not in facts:
        return Decision("sparse_mla", "triton",
                        f"{desc} has no SM12x sparse-MLA path for DeepSeek-V4 (FlashMLA is SM90/SM100 only)")
    if engine == "sglang":
        return Decision("sparse_mla", "upstream", f"{desc} has its own SM120 FlashMLA replacement")
    fi = probe.library("flashinfer")
    if fi.has("sm120_sparse_mla"):
        return Decision("sparse_mla", "upstream", f"{desc} uses FlashInfer's SM120 sparse MLA ({fi.describe()})")
    return Decision("sparse_mla", "triton",
                    f"{desc} routes SM12x to FlashInfer's SM120 sparse MLA, which {fi.describe()} lacks")


def _indexer(probe: Probe, engine: str, version: str, facts, t: _Target) -> Decision:
    reason = _no_change_reason(t)
    if reason:
        return Decision("indexer", "upstream", reason)
    desc = _engine_desc(engine, version)
    if "sm12x_dsv4_attention" not in facts:
        return Decision("indexer", "triton", f"{desc} has no SM12x path for DeepSeek-V4's DeepGEMM calls "
                                             f"(indexer logits, o_proj einsum, mHC prenorm)")
    if engine == "sglang":
        return Decision("indexer", "upstream", f"{desc} has its own SM120 path for DeepSeek-V4")
    lib = _effective_deep_gemm(probe, engine)
    if lib.has("sm12x"):
        return Decision("indexer", "upstream", f"{desc} computes indexer logits with {lib.describe()}'s SM12x kernels")
    return Decision("indexer", "triton",
                    f"{desc} computes V4's indexer logits, o_proj einsum and mHC prenorm with DeepGEMM, and "
                    f"{lib.describe()} has no SM12x kernels")


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
    why = (f"needs {landscape.ENGINE_TITLE[engine]} >= {landscape.MINIMUM[engine]}: "
           f"{_engine_desc(engine, version)} has no DeepSeek-V4 model")
    return Plan(engine, version, "unsupported", why, t.note,
                tuple(Decision(i, "unsupported", why) for i in DECISION_IDS))


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
        status_reason += (f"; newer than the newest tested ({landscape.NEWEST_TESTED[engine]}): "
                          f"assuming it behaves like {landscape.NEWEST_TESTED[engine]}")
    Version(version)  # validates the version string early, with packaging's own message

    kernel_map = {"triton": "triton", "upstream": "upstream"}
    deepgemm = _forced(_deepgemm(probe, engine, version, facts, t), overrides,
                       {"on": "on", "off": "off", "upstream": "upstream"})
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
            dsv4_model = Decision("dsv4_model", "upstream", "forced by DS_PLUGINS_DSV4_MODEL=upstream",
                                  "DS_PLUGINS_DSV4_MODEL")
            sparse_mla = Decision("sparse_mla", "upstream", off, "DS_PLUGINS_DSV4_MODEL")
            indexer = Decision("indexer", "upstream", off, "DS_PLUGINS_DSV4_MODEL")
            uses_ours = False
        else:
            dsv4_model = Decision("dsv4_model", "ds_plugins",
                                  "DeepseekV4ForCausalLM and its MTP model go to the ds-plugins hook-up, "
                                  "whose kernel routes (sparse attention, indexer, o_proj einsum, mHC prenorm) go to Triton")
    elif engine == "vllm":
        dsv4_model = Decision("dsv4_model", "upstream", "upstream kernels serve every feature here")
    else:
        dsv4_model = Decision("dsv4_model", "upstream",
                              "SGLang keeps its native model; ds-plugins routes kernels at call sites")

    if uses_ours:
        cudagraph = _forced(Decision("cudagraph", "on", "the ds-plugins kernels are graph-safe"), overrides,
                            {"on": "on", "off": "off"})
    else:
        cudagraph = Decision("cudagraph", "upstream", "the ds-plugins kernel path is not in use")

    if engine == "vllm":
        ascend = _ascend_quant(probe, t)
        mooncake = _mooncake(probe)
    else:
        ascend = Decision("ascend_quant", "upstream",
                          "SGLang reads msModelSlim checkpoints itself on Ascend (--quantization modelslim)")
        mooncake = Decision("mooncake_connector", "upstream",
                            "SGLang has its own Mooncake transfer backend")
    ascend = _forced(ascend, overrides, {"off": "off"})
    mooncake = _forced(mooncake, overrides, {"off": "off"})

    decisions = (deepgemm, sparse_mla, indexer, cudagraph, dsv4_model, ascend, mooncake)
    assert tuple(d.id for d in decisions) == DECISION_IDS
    return Plan(engine, version, "supported", status_reason, t.note, decisions)


def _ascend_quant(probe: Probe, t: _Target) -> Decision:
    if probe.library("vllm_ascend").present:
        return Decision("ascend_quant", "vllm-ascend",
                        "vllm-ascend is installed and owns --quantization ascend; ds-plugins defers to it")
    if t.kind == "npu" and probe.library("torch_npu").present:
        how = "torch_npu ops on the Ascend NPU"
    elif t.kind == "cuda":
        how = "portable int8/W4A8 kernels on the CUDA GPU"
    else:
        how = "the CPU reference path"
    return Decision("ascend_quant", "ds_plugins", f"--quantization ascend loads msModelSlim checkpoints with {how}")


def _mooncake(probe: Probe) -> Decision:
    if not probe.library("mooncake").present:
        return Decision("mooncake_connector", "unavailable",
                        "mooncake-transfer-engine is not installed (pip install 'ds-plugins[mooncake]')")
    return Decision("mooncake_connector", "ds_plugins",
                    "the ds-plugins Mooncake connector is available through kv_connector_module_path")
