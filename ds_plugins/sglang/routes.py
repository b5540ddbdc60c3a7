"""Where SGLang's DeepSeek-V4 path calls a kernel with no SM12x build, and what answers instead.

Every V4 call site in SGLang 0.5.12-0.5.23 imports its kernel inside the calling function
(`import flash_mla; flash_mla.flash_mla_with_kvcache(...)`, `from deep_gemm import fp8_paged_mqa_logits
as fn`, `from ...flash_mla_sm120 import flash_mla_with_kvcache_sm120`): the name is looked up in the
kernel's module at each call, and no module holds a copy of it. So a route rebinds the function in that
module, the moment SGLang (or the library) imports it; ds-plugins never imports it itself.

- 0.5.12 (no SM12x path of its own; decisions sparse_mla=triton and indexer=triton by default on SM12x):
  FlashMLA's `flash_mla_with_kvcache` (V4 decode and prefill both go through it) and the
  `get_mla_metadata` plan it takes; DeepGEMM's `fp8_paged_mqa_logits` and `get_paged_mqa_logits_metadata`
  (the C4 indexer) and `tf32_hc_prenorm_gemm` (mHC prenorm). These patch the `flash_mla` and
  `deep_gemm` modules, in SGLang processes only (the SGLang adapter is what applies them).
- 0.5.13+ (SGLang's own SM120 FlashMLA replacement): only when forced (DS_PLUGINS_SPARSE_MLA=triton),
  SGLang's `flash_mla_with_kvcache_sm120` is replaced by ours; it moved from
  sglang.srt.layers.attention to sglang.kernels.ops.attention in 0.5.16.

Not routed (named in the report and the README): 0.5.12's grouped o_proj `deep_gemm.fp8_einsum` and its
`transform_sf_into_required_layout` (SGLANG_OPT_FP8_WO_A_GEMM=0 keeps SGLang off that path), and the
0.5.13+ indexer under DS_PLUGINS_INDEXER=triton.

A target that does not look as written for (not callable, or taking a named argument our kernel does
not) is skipped with one warning by ds_plugins.patching, and SGLang keeps its own function.
"""

from __future__ import annotations

from ds_plugins.patching import Patch, Route, Target, accepts_what_the_original_takes, parameters  # noqa: F401 (tests read it here)

SPARSE = ("sparse_mla", ("triton",))
INDEXER = ("indexer", ("triton",))
V0512 = ">=0.5.12,<0.5.13"
RETIRE_0512 = "SGLang 0.5.13 ships its own SM120 V4 path (policy then says upstream); drop with 0.5.12 support"
RETIRE_FORCED = "never: DS_PLUGINS_SPARSE_MLA=triton is a user override of SGLang's own SM120 kernels"
# FlashMLA and DeepGEMM on SM120 in SGLang (the reports behind 0.5.12's routes)
UPSTREAM_0512 = ("sgl-project/sglang#25877", "sgl-project/sglang#31578")
# 0.5.12's routes: unit (each adapter called as SGLang 0.5.12 calls it, against the references) and AST;
# no live SGLang in the test command is 0.5.12. The SM120 routes also run in a live SGLang 0.5.23.
EVIDENCE_0512 = ("tests/kernels/test_sglang_routes.py", "tests/contract/test_sglang_seams.py")
EVIDENCE_SM120 = ("tests/engines/test_sglang_routes.py", *EVIDENCE_0512)


def flash_mla_with_kvcache_sm120(
    *,
    q,
    k_cache,
    head_dim_v,
    indices,
    softmax_scale=None,
    topk_length=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    extra_topk_length=None,
):
    """SGLang's `flash_mla_with_kvcache_sm120(**kwargs)` (0.5.13+, keyword-only), on ds-plugins' sparse
    FP8 decode kernel: same keywords, same (out [b, s_q, h_q, head_dim_v], lse) result. SGLang plans
    nothing for it, so each call takes a fresh plan (it holds no device state)."""
    from ds_plugins.kernels import flash_mla_with_kvcache, get_mla_metadata

    plan, _ = get_mla_metadata()
    return flash_mla_with_kvcache(
        q,
        k_cache,
        None,
        None,
        head_dim_v,
        plan,
        softmax_scale=softmax_scale,
        is_fp8_kvcache=True,
        indices=indices,
        attn_sink=attn_sink,
        extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache,
        topk_length=topk_length,
        extra_topk_length=extra_topk_length,
    )


def adapter(name: str):
    """What a route calls: this module's adapter of that name, else ds_plugins.kernels' kernel."""
    if name == "flash_mla_with_kvcache_sm120":
        return flash_mla_with_kvcache_sm120
    import ds_plugins.kernels as kernels

    return getattr(kernels, name)


def _accepts(route: Route):
    return accepts_what_the_original_takes(lambda _: adapter(route.attribute))


def _check(route: Route):
    """Routes of one group apply wholly or not at all: each one's check runs every member's check on the
    same module first, so a refused member (say decode, against a flash_mla whose kernel takes
    parameters ours does not) refuses the others too, before any of them is installed."""
    own = _accepts(route)
    if not route.group:
        return own

    def check(target: Target) -> str | None:
        for other in ROUTES:
            if other.group != route.group or other.module != route.module:
                continue
            if other is route:
                why = own(target)
            else:
                value = getattr(target.module, other.attribute, None)
                why = _accepts(other)(Target(target.module, target.module, other.attribute, value))
                why = why if why is None else f"{why} (group {route.group!r}: {route.id} falls back with {other.id})"
            if why is not None:
                return why
        return None

    return check


def _patch(route: Route) -> Patch:
    return route.patch("sglang", lambda _: adapter(route.attribute), _check(route))


FLASHMLA = "FlashMLA has no SM12x kernels and SGLang 0.5.12 calls it for every V4 {} (decode and prefill)"
DEEPGEMM = "DeepGEMM {} has no SM12x kernel and SGLang 0.5.12's V4 {} calls it whatever the DeepGEMM gate says"
SM120 = (
    "DS_PLUGINS_SPARSE_MLA=triton: SGLang's SM120 FlashMLA replacement is swapped for the ds-plugins "
    "Triton kernel at its call sites (decode, and prefill on the SM120 branch)"
)
ROUTES: tuple[Route, ...] = (
    Route(
        "sglang.route.decode",
        "flash_mla",
        "flash_mla_with_kvcache",
        V0512,
        SPARSE,
        FLASHMLA.format("sparse attention"),
        RETIRE_0512,
        group="flash_mla",
        upstream=UPSTREAM_0512,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.decode_plan",
        "flash_mla",
        "get_mla_metadata",
        V0512,
        SPARSE,
        "the routed flash_mla_with_kvcache takes ds-plugins' plan, so the plan SGLang asks FlashMLA for "
        "(_create_flashmla_metadata) comes from ds-plugins too",
        RETIRE_0512,
        group="flash_mla",
        upstream=UPSTREAM_0512,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.indexer_logits",
        "deep_gemm",
        "fp8_paged_mqa_logits",
        V0512,
        INDEXER,
        DEEPGEMM.format("fp8_paged_mqa_logits", "C4 indexer"),
        RETIRE_0512,
        upstream=UPSTREAM_0512,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.indexer_schedule",
        "deep_gemm",
        "get_paged_mqa_logits_metadata",
        V0512,
        INDEXER,
        DEEPGEMM.format("get_paged_mqa_logits_metadata", "indexer metadata"),
        RETIRE_0512,
        upstream=UPSTREAM_0512,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.mhc_prenorm",
        "deep_gemm",
        "tf32_hc_prenorm_gemm",
        V0512,
        INDEXER,
        DEEPGEMM.format("tf32_hc_prenorm_gemm", "mHC prenorm (SGLANG_OPT_DEEPGEMM_HC_PRENORM, on by default)"),
        RETIRE_0512,
        upstream=UPSTREAM_0512,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.decode_sm120_legacy",
        "sglang.srt.layers.attention.flash_mla_sm120",
        "flash_mla_with_kvcache_sm120",
        ">=0.5.13,<0.5.16",
        SPARSE,
        SM120,
        RETIRE_FORCED,
        evidence=EVIDENCE_0512,
    ),
    Route(
        "sglang.route.decode_sm120",
        "sglang.kernels.ops.attention.flash_mla_sm120",
        "flash_mla_with_kvcache_sm120",
        ">=0.5.16",
        SPARSE,
        SM120,
        RETIRE_FORCED,
        evidence=EVIDENCE_SM120,
    ),
)

PATCHES: tuple[Patch, ...] = tuple(_patch(r) for r in ROUTES)
