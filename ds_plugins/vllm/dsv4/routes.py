"""Where vLLM's DeepSeek-V4 code calls a kernel that has no SM12x build, and what answers instead.

Every V4 caller binds FlashMLA and DeepGEMM functions with `from X import f`, so each route rebinds the
name in the CALLER's module (the global its code looks up at call time), the moment vLLM imports that
module. Two routes wrap a vLLM function instead of a kernel:

- `_select_dsv4_attn_cls` (0.24+) sends SM12x to FlashInfer's SM120 class; on our path it gives the
  FlashMLA-shaped class, whose FlashMLA calls are routed here.
- `DeepseekSparseSWAMetadataBuilder.build_tile_scheduler` (0.24+) plans nothing on the SM120 family (the
  FlashMLA decode would then assert); on our path it hands out ds-plugins plans.

Before binding, a route checks the site still has the shape it was written for (feature detection: the
parameters vLLM's function takes must all be accepted by the adapter; a wrapped function must still
take what it took). A site that moved is skipped with one warning, and the hooked model class
(hookup.py) then refuses to start with a message that names the route instead of crashing in a kernel.

Decisions: `sparse_mla=triton` (attention), `indexer=triton` (the indexer's logits and schedule, and the
V4 model's other DeepGEMM calls on SM12x: the grouped o_proj `fp8_einsum` and the mHC prenorm GEMM).
vLLM's own top-k kernels (vllm._C) are built for SM120 and stay.
"""

from __future__ import annotations

import functools
from typing import Any

from ... import patching
from ...patching import (
    Patch,
    Route,
    Target,
    parameters,
    replace_attribute,
)

ADAPTERS = "ds_plugins.vllm.dsv4.adapters"
SPARSE = ("sparse_mla", ("triton",))
INDEXER = ("indexer", ("triton",))
RETIRE_ATTN = (
    "vLLM serves V4 attention on SM12x with kernels that exist for the installed libraries "
    "(0.24+: FlashInfer with SM120 sparse MLA; policy then says sparse_mla=upstream)"
)
RETIRE_DG = (
    "the installed DeepGEMM has SM12x kernels (policy then says indexer=upstream), e.g. vLLM's "
    "vendored copy in 0.25-0.26 and 0.28+"
)
# FlashMLA's sparse kernels on SM12x; DeepGEMM on SM12x (its maintainers' answer, and vLLM's tracking issue)
UPSTREAM_ATTN = ("vllm-project/vllm#40802", "vllm-project/vllm#40821")
UPSTREAM_DG = ("deepseek-ai/DeepGEMM#305", "vllm-project/vllm#41063")
# Live: tests/engines calls every routed site in vLLM 0.28/0.30 as V4's code calls it; AST: every matrix wheel.
EVIDENCE = ("tests/engines/test_vllm_routes.py", "tests/contract/test_vllm_seams.py")


def _adapter(name: str):
    import importlib

    return getattr(importlib.import_module(ADAPTERS), name)


def _choose(route: Route, original: Any) -> str:
    if route.adapter == "fp8_fp4_mqa_logits":
        params = parameters(original) or ()
        if len(params) >= 6 and params[5] == "max_seqlen_k":
            return "fp8_fp4_mqa_logits_varlen"
    return route.adapter


def _pick(route: Route):
    return lambda original: _adapter(_choose(route, original))


def _function_patch(route: Route) -> Patch:
    return route.patch("vllm", _pick(route))


def _site(name: str, module: str, attribute: str, versions: str, implements, adapter: str, why: str) -> Route:
    upstream: tuple[str, ...]
    retire, upstream = (RETIRE_ATTN, UPSTREAM_ATTN) if implements is SPARSE else (RETIRE_DG, UPSTREAM_DG)
    if attribute == "tf32_hc_prenorm_gemm":  # called unguarded from mhc_pre_broadcast_tilelang (open PRs)
        upstream = ("vllm-project/vllm#50645", "vllm-project/vllm#53055", *upstream)
    # A site of older releases only (an upper bound: 0.20-0.22) is older than every live vLLM of the test
    # command, so its evidence is the wheels' source alone. A live o_proj site also runs from vLLM's own
    # FP8 linear objects (the cover's test).
    evidence: tuple[str, ...] = EVIDENCE
    if "<" in versions:
        evidence = EVIDENCE[1:]
    elif attribute == "fp8_einsum":
        evidence = ("tests/engines/test_vllm_covers_fp8_oproj.py", *EVIDENCE)
    # adapter: adapters.<name>; for "varlen" sites, chosen by the original's parameters (_choose)
    return Route(
        f"vllm.route.{name}",
        module,
        attribute,
        versions,
        implements,
        why,
        retire,
        adapter=adapter,
        upstream=upstream,
        evidence=evidence,
    )


FLASHMLA_WHY = "FlashMLA has no SM12x kernels; V4's sparse {} goes to the ds-plugins Triton kernel"
LEGACY = "vllm.model_executor.layers.deepseek_v4_attention"
V4_FLASHMLA = "vllm.models.deepseek_v4.nvidia.flashmla"
INDEXER_LAYER = "vllm.model_executor.layers.sparse_attn_indexer"
ROUTES: tuple[Route, ...] = (
    _site(
        "decode_legacy",
        LEGACY,
        "flash_mla_with_kvcache",
        ">=0.20,<0.22",
        SPARSE,
        "flash_mla_with_kvcache",
        FLASHMLA_WHY.format("decode"),
    ),
    _site(
        "prefill_legacy",
        LEGACY,
        "flash_mla_sparse_fwd",
        ">=0.20,<0.22",
        SPARSE,
        "flash_mla_sparse_fwd",
        FLASHMLA_WHY.format("prefill"),
    ),
    _site(
        "decode",
        V4_FLASHMLA,
        "flash_mla_with_kvcache",
        ">=0.22",
        SPARSE,
        "flash_mla_with_kvcache",
        FLASHMLA_WHY.format("decode"),
    ),
    _site(
        "prefill",
        V4_FLASHMLA,
        "flash_mla_sparse_fwd",
        ">=0.22",
        SPARSE,
        "flash_mla_sparse_fwd",
        FLASHMLA_WHY.format("prefill"),
    ),
    _site(
        "decode_plan",
        "vllm.v1.attention.backends.mla.sparse_swa",
        "get_mla_metadata",
        ">=0.20",
        SPARSE,
        "get_mla_metadata",
        "the decode plans V4's metadata builder makes are FlashMLA's; ours go with our kernel",
    ),
    _site(
        "indexer_logits",
        INDEXER_LAYER,
        "fp8_fp4_mqa_logits",
        ">=0.20",
        INDEXER,
        "fp8_fp4_mqa_logits",
        "the indexer's prefill logits are DeepGEMM's, with no SM12x kernel in the installed DeepGEMM",
    ),
    _site(
        "indexer_paged_logits",
        INDEXER_LAYER,
        "fp8_fp4_paged_mqa_logits",
        ">=0.20",
        INDEXER,
        "fp8_fp4_paged_mqa_logits",
        "the indexer's decode logits are DeepGEMM's, with no SM12x kernel in the installed DeepGEMM",
    ),
    _site(
        "indexer_schedule",
        "vllm.v1.attention.backends.mla.indexer",
        "get_paged_mqa_logits_metadata",
        ">=0.20",
        INDEXER,
        "get_paged_mqa_logits_metadata",
        "the indexer metadata builder asks DeepGEMM for a paged-logits schedule on every CUDA GPU",
    ),
    # o_proj: with DeepGEMM off vLLM passes wo_a as its FP8 linear left it (2-D weight, 2-D 128x128 block scales);
    # adapters.fp8_einsum views it per group (tests/engines/test_vllm_covers_fp8_oproj.py).
    _site(
        "o_proj_einsum_legacy",
        LEGACY,
        "fp8_einsum",
        ">=0.20,<0.22",
        INDEXER,
        "fp8_einsum",
        "V4's grouped output projection (wo_a) is DeepGEMM's fp8_einsum, with no SM12x kernel installed",
    ),
    _site(
        "o_proj_einsum_op",
        "vllm.models.deepseek_v4.attention",
        "fp8_einsum",
        ">=0.22,<0.23",
        INDEXER,
        "fp8_einsum",
        "V4's grouped output projection (wo_a) is DeepGEMM's fp8_einsum, with no SM12x kernel installed",
    ),
    _site(
        "o_proj_einsum",
        "vllm.models.deepseek_v4.nvidia.ops.o_proj",
        "fp8_einsum",
        ">=0.23",
        INDEXER,
        "fp8_einsum",
        "V4's grouped output projection (wo_a) is DeepGEMM's fp8_einsum, with no SM12x kernel installed",
    ),
    _site(
        "mhc_prenorm",
        "vllm.utils.deep_gemm",
        "tf32_hc_prenorm_gemm",
        ">=0.20",
        INDEXER,
        "tf32_hc_prenorm_gemm",
        "mHC's prenorm GEMM calls DeepGEMM (0.20 always; later where vLLM thinks DeepGEMM works); its callers "
        "import it inside the function, so the module attribute is the site",
    ),
)


# --- the two wrapped vLLM functions --------------------------------------------------------------------


def _check_selector(target: Target) -> str | None:
    if parameters(target.value) != ("vllm_config",):
        return "expected _select_dsv4_attn_cls(vllm_config)"
    missing = [
        n
        for n in ("DeepseekV4FlashInferSM120Attention", "DeepseekV4FlashMLAAttention")
        if not isinstance(getattr(target.module, n, None), type)
    ]
    return f"{target.module.__name__} has no {', '.join(missing)}" if missing else None


def _wrap_selector(original: Any):
    module = __import__(original.__module__, fromlist=["_"])

    @functools.wraps(original)
    def _select_dsv4_attn_cls(vllm_config):
        chosen = original(vllm_config)
        if chosen is module.DeepseekV4FlashInferSM120Attention:
            return module.DeepseekV4FlashMLAAttention  # FlashMLA-shaped; its kernels are routed to ours
        return chosen

    return _select_dsv4_attn_cls


def _check_tile_scheduler(target: Target) -> str | None:
    if parameters(target.value) != ("self", "num_decode_tokens"):
        return "expected build_tile_scheduler(self, num_decode_tokens)"
    return None


def _wrap_tile_scheduler(original: Any):
    @functools.wraps(original)
    def build_tile_scheduler(self, num_decode_tokens):
        plans = original(self, num_decode_tokens)
        if num_decode_tokens and all(plan is None for plan in plans.values()):
            new = _adapter("new_sched_meta")
            plans = {layer_type: new() for layer_type in plans}
        return plans

    return build_tile_scheduler


SELECTOR = Patch(
    "vllm.route.attention_class",
    "vllm",
    "vllm.models.deepseek_v4.nvidia.model",
    "_select_dsv4_attn_cls",
    ">=0.24",
    SPARSE,
    "vLLM 0.24+ gives SM12x FlashInfer's SM120 sparse MLA, which the installed FlashInfer lacks (or "
    "DS_PLUGINS_SPARSE_MLA=triton asks for ours): the FlashMLA-shaped class runs, on the routed kernels",
    RETIRE_ATTN,
    _check_selector,
    replace_attribute(_wrap_selector),
    how="vLLM's _select_dsv4_attn_cls runs as shipped; where it picks DeepseekV4FlashInferSM120Attention the "
    "FlashMLA-shaped DeepseekV4FlashMLAAttention is returned instead",
    upstream=UPSTREAM_ATTN,
    evidence=EVIDENCE,
)

TILE_SCHEDULER = Patch(
    "vllm.route.decode_plan_sm12x",
    "vllm",
    "vllm.v1.attention.backends.mla.sparse_swa",
    "DeepseekSparseSWAMetadataBuilder.build_tile_scheduler",
    ">=0.24",
    SPARSE,
    "vLLM 0.24+ plans no FlashMLA decode on the SM120 family, and the FlashMLA-shaped class asserts a plan "
    "exists: on our path each layer type gets a ds-plugins plan",
    RETIRE_ATTN,
    _check_tile_scheduler,
    replace_attribute(_wrap_tile_scheduler),
    how="vLLM's build_tile_scheduler runs as shipped; where it planned nothing for a decode batch, each layer "
    "type gets a fresh ds-plugins plan (new_sched_meta)",
    upstream=UPSTREAM_ATTN,
    evidence=EVIDENCE,
)

PATCHES: tuple[Patch, ...] = (*(_function_patch(r) for r in ROUTES), SELECTOR, TILE_SCHEDULER)


def problems(plan=None) -> list[str]:
    """Routes the plan selects for this vLLM that are not in place in this process, as sentences."""
    from ...registration import get

    plan = plan or get("vllm").plan
    if plan is None:
        return ["ds-plugins registration did not run in this process"]
    from .fp8_block_scales import PATCH as E8M0_SCALES  # the model's first linear needs it as much as a route

    found = patching.outcomes()
    out = []
    for patch in (*PATCHES, E8M0_SCALES):
        if not patch.selected_by(plan) or not patch.covers(plan.engine_version):
            continue
        outcome = found.get(patch.id)
        if outcome is None:
            out.append(f"route {patch.id} was never registered")
        elif outcome.state not in ("applied", "armed"):
            out.append(f"route {patch.id} ({patch.target}) is {outcome.state}: {outcome.detail}")
    return out
