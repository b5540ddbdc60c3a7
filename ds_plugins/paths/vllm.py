"""vLLM's DeepSeek-V4 path manifest (ds_plugins.paths.model), read from the official wheels 0.20.0-0.33.0.

Each row's Evidence is re-checked in every matrix wheel its range covers (and in the FlashInfer that wheel
pins) by tests/contract/test_path_manifest.py; docs/paths/vllm.md is rendered from it by ci/compat.py.

The rows describe a stock install (`pip install vllm==X`, the DeepGEMM it vendors and the FlashInfer it
pins, as ds_plugins/stock.py records them), which is also what `ds-plugins doctor --simulate --engine
vllm==X` starts from. On SM12x that install keeps DeepGEMM off in 0.20-0.24 and 0.27 (0.20-0.23: vLLM's
own gate; 0.24 and 0.27: ds-plugins turns it off, the vendored copy having no SM12x kernels) and on in
0.25 and 0.28+ (the vendored copy has them): the rows follow that split.
"""

from __future__ import annotations

from .model import SM12X, Cover, Evidence, Row

HOPPER = ("sm90", "sm100")  # the engine's own FlashMLA/DeepGEMM path; ds-plugins never changes it
ALL = SM12X + HOPPER

_FILES = "FILES.txt"  # the wheel's member list (kernel headers are not Python)
_LINEAR = "vllm/model_executor/kernels/linear/__init__.py"
_FP8_UTILS = "vllm/model_executor/layers/quantization/utils/fp8_utils.py"
_FLASHMLA_OPS = "vllm/v1/attention/ops/flashmla.py"
_MODEL_020 = "vllm/model_executor/models/deepseek_v4.py"  # 0.20.x: one model file
_NVIDIA_MODEL = "vllm/models/deepseek_v4/nvidia/model.py"  # 0.22+: vllm/models/deepseek_v4/
_ATTENTION = "vllm/models/deepseek_v4/attention.py"
_FI_SPARSE = "vllm/models/deepseek_v4/nvidia/flashinfer_sparse.py"
_FI_CORE = "flashinfer/mla/_core.py"
_INDEXER_OLD = "vllm/model_executor/layers/sparse_attn_indexer.py"
_INDEXER_TOPK = "vllm/model_executor/layers/indexer_topk.py"
_MXFP4_ORACLE = "vllm/model_executor/layers/fused_moe/oracle/mxfp4.py"  # picks the MXFP4 MoE backend


def _src(path: str, pattern: str, package: str = "vllm") -> Evidence:
    return Evidence("source", package, path, pattern)


def _absent(path: str, pattern: str, package: str = "vllm") -> Evidence:
    return Evidence("absent", package, path, pattern)


def _reading(where: str, what: str) -> Evidence:
    return Evidence("reading", "vllm", where, what)


# Ranges of a stock install on SM12x, by whether vLLM's DeepGEMM path runs there (module docstring).
DG_OFF_OLD = ">=0.20.0,<0.25.0"
DG_ON_025 = ">=0.25.0,<0.27.0"
DG_OFF_027 = ">=0.27.0,<0.28.0"
DG_ON = ">=0.28.0"

_DG_SM12X_ABSENT = _absent(_FILES, r"impls/sm120_fp8_mqa_logits\.cuh")
_DG_SM12X_PRESENT = _src(_FILES, r"impls/sm120_fp8_mqa_logits\.cuh")
_DG_SM90 = _src(_FILES, r"impls/sm90_fp8_gemm_1d2d\.cuh")

_FP8_FIRST_FIT = (
    _src(_LINEAR, r"DeepGemmFp8BlockScaledMMKernel,\s*CutlassFp8BlockScaledMMKernel,"),
    _src(_FP8_UTILS, r"def deepgemm_post_process_fp8_weight_block"),
)
_FP8_BLOCKER = (
    "DeepGEMM off: _POSSIBLE_FP8_BLOCK_KERNELS is first-fit and picks CutlassFp8BlockScaledMMKernel; the "
    "checkpoint's e8m0 weight scales stay e8m0 (only deepgemm_post_process_fp8_weight_block, on the DeepGEMM "
    "path, turns them into float32) and cutlass_scaled_mm needs float32 scales: the memory-profiling forward's "
    "first linear raises"
)
# The CUTLASS kernel and its base keep the scales' dtype; only the linear method's factory makes them e8m0.
_CUTLASS_PY = "vllm/model_executor/kernels/linear/scaled_mm/cutlass.py"
_BLOCK_BASE_PY = "vllm/model_executor/kernels/linear/scaled_mm/BlockScaledMMLinearKernel.py"
_FP8_E8M0_KEPT = (
    _src(
        "vllm/model_executor/layers/quantization/fp8.py",
        r"scale_dtype=\(torch\.float8_e8m0fnu if self\.is_scale_e8m0 else None\)",
    ),
    _absent(_CUTLASS_PY, r"float8_e8m0fnu|_upcast_e8m0"),
    _absent(_BLOCK_BASE_PY, r"float8_e8m0fnu|_upcast_e8m0"),
)
# vllm-covers: ds-plugins turns the e8m0 block scales into float32 in the CUTLASS kernel's post-load step.
_FP8_COVER = Cover("indexer", "triton", "vllm.fp8_linear.e8m0_scales_fp32")
_OPROJ_KERNEL = "o_proj FP8 einsum (DeepGEMM's fp8_einsum, wo_a left 2-D)"
_OPROJ_BLOCKER = (
    "DeepGEMM off: V4's o_proj still calls DeepGEMM's fp8_einsum (no SM12x kernel) and hands it wo_a as the FP8 "
    "linear left it: weight 2-D [groups x o_lora_rank, r] and its 128x128 block scales 2-D (e8m0, float32 once "
    "the FP8-linear cover ran); the 3-D reshape and int32 packing happen only in DeepGEMM's post-processing"
)
_OPROJ_PY = "vllm/models/deepseek_v4/nvidia/ops/o_proj.py"  # 0.23+
_OPROJ_2D = (
    _src(_FP8_UTILS, r"wq = wq\.view\(g, r, d\)"),  # the only 3-D view: DeepGEMM's post-processing
    _DG_SM12X_ABSENT,
)
_OPROJ_RECIPE = r"\(1, 128, 128\) if cap\.major <= 9 else \(1, 1, 128\)"


def _oproj_cover(site: str) -> Cover:
    """vllm-covers: the o_proj route's adapter views the 2-D weight and scales per group (dsv4/adapters.py)."""
    return Cover("indexer", "triton", f"vllm.route.{site}")


_FI_NO_SWA = (
    "vLLM passes swa_topk_lens / extra_sparse_* to trtllm_batch_decode_sparse_mla_dsv4, and the FlashInfer it "
    "pins (0.6.12 / 0.6.13) has neither those parameters nor an SM120 branch: TypeError on the first attention call"
)


_ATTENTION_020 = "vllm/model_executor/layers/deepseek_v4_attention.py"  # 0.20.x
_KV_KERNEL = "fp8_ds_mla KV-cache dtype resolution (`--kv-cache-dtype auto` asserts)"
_KV_ASSERT = r'assert kv_cache_dtype\.startswith\("fp8"\)'
_KV_BLOCKER = (
    "every V4 attention class on SM12x (FlashMLA-shaped, and 0.24+'s FlashInfer SM120 one) uses the fp8_ds_mla "
    "layout, whose KV-dtype resolution asserts kv_cache_dtype.startswith('fp8'): plain `vllm serve` (auto) fails "
    "while the model is built"
)
_KV_HOPPER = (
    "FlashMLA's fp8_ds_mla layout asserts an fp8 KV dtype: the user passes --kv-cache-dtype fp8 (as "
    "upstream's recipes do); ds-plugins does not change it"
)
# ds-plugins maps auto (only auto) to fp8 in vLLM's own config hook on SM12x (policy: kv_cache_dtype=fp8).
_KV_COVER = Cover("kv_cache_dtype", "fp8", "vllm.dsv4_model.kv_cache_fp8")


ROWS: tuple[Row, ...] = (
    # --- weight_load ----------------------------------------------------------------------------
    Row(
        "vllm",
        "weight_load",
        "FP8 block-scaled weight post-processing (e8m0 scales kept)",
        "torch",
        ">=0.20.0",
        ALL,
        "has_code",
        "process_weights_after_loading only reshapes/transposes in torch; whether the scales suit the chosen "
        "linear kernel is the profile stage's row",
        _FP8_FIRST_FIT,
    ),
    Row(
        "vllm",
        "weight_load",
        _KV_KERNEL,
        "engine",
        ">=0.20.0,<0.22.0",
        SM12X,
        "blocker",
        _KV_BLOCKER,
        (_src(_ATTENTION_020, _KV_ASSERT),),
        cover=_KV_COVER,
        fixed_in="0.30.0",
        refs=("vllm#47174",),
        requires="--kv-cache-dtype fp8",
    ),
    Row(
        "vllm",
        "weight_load",
        _KV_KERNEL,
        "engine",
        ">=0.22.0,<0.30.0",
        SM12X,
        "blocker",
        _KV_BLOCKER,
        (_src(_ATTENTION, _KV_ASSERT),),
        cover=_KV_COVER,
        fixed_in="0.30.0",
        refs=("vllm#47174",),
        requires="--kv-cache-dtype fp8",
    ),
    Row(
        "vllm",
        "weight_load",
        _KV_KERNEL,
        "engine",
        ">=0.20.0,<0.22.0",
        HOPPER,
        "has_code",
        _KV_HOPPER,
        (_src(_ATTENTION_020, _KV_ASSERT),),
        refs=("vllm#47174",),
        requires="--kv-cache-dtype fp8",
    ),
    Row(
        "vllm",
        "weight_load",
        _KV_KERNEL,
        "engine",
        ">=0.22.0,<0.30.0",
        HOPPER,
        "has_code",
        _KV_HOPPER,
        (_src(_ATTENTION, _KV_ASSERT),),
        refs=("vllm#47174",),
        requires="--kv-cache-dtype fp8",
    ),
    Row(
        "vllm",
        "weight_load",
        "fp8_ds_mla KV-cache dtype resolution (`auto` becomes fp8)",
        "engine",
        ">=0.30.0",
        ALL,
        "has_code",
        "the fp8_ds_mla layout turns `auto` into fp8 itself",
        (_src(_ATTENTION, r'if kv_cache_dtype == "auto":\s*kv_cache_dtype = "fp8"'),),
    ),
    # --- profile (the memory-profiling forward: the first call of every linear) -------------------
    # 0.20-0.23: vLLM's own gate keeps DeepGEMM off on SM12x, whatever DeepGEMM is installed.
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (CUTLASS, e8m0 scales)",
        "cutlass",
        ">=0.20.0,<0.24.0",
        SM12X,
        "blocker",
        _FP8_BLOCKER,
        _FP8_FIRST_FIT + _FP8_E8M0_KEPT + (_DG_SM12X_ABSENT,),
        cover=_FP8_COVER,
        fixed_in="0.28.0",
    ),
    # 0.24, 0.27: the gate is on for SM12x; DeepGEMM is off (ds-plugins) only for one without SM12x kernels.
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (CUTLASS, e8m0 scales)",
        "cutlass",
        ">=0.24.0,<0.25.0",
        SM12X,
        "blocker",
        _FP8_BLOCKER,
        _FP8_FIRST_FIT + _FP8_E8M0_KEPT + (_DG_SM12X_ABSENT,),
        cover=_FP8_COVER,
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (CUTLASS, e8m0 scales)",
        "cutlass",
        DG_OFF_027,
        SM12X,
        "blocker",
        _FP8_BLOCKER,
        _FP8_FIRST_FIT + _FP8_E8M0_KEPT + (_DG_SM12X_ABSENT,),
        cover=_FP8_COVER,
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (DeepGEMM, scales post-processed)",
        "deepgemm",
        DG_ON_025,
        SM12X,
        "has_code",
        "DeepGemmFp8BlockScaledMMKernel is first in the list and the vendored DeepGEMM has SM120 kernels; "
        "deepgemm_post_process_fp8_weight_block converts the e8m0 scales",
        _FP8_FIRST_FIT + (_DG_SM12X_PRESENT,),
    ),
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (DeepGEMM, scales post-processed)",
        "deepgemm",
        DG_ON,
        SM12X,
        "has_code",
        "DeepGemmFp8BlockScaledMMKernel is first in the list and the vendored DeepGEMM has SM120 kernels; "
        "deepgemm_post_process_fp8_weight_block converts the e8m0 scales",
        _FP8_FIRST_FIT + (_DG_SM12X_PRESENT,),
    ),
    Row(
        "vllm",
        "profile",
        "FP8 block-scaled linear (DeepGEMM)",
        "deepgemm",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "DeepGemmFp8BlockScaledMMKernel comes first and the vendored DeepGEMM has SM90/SM100 kernels; "
        "ds-plugins does not change it",
        _FP8_FIRST_FIT + (_DG_SM90,),
    ),
    Row(
        "vllm",
        "profile",
        _OPROJ_KERNEL,
        "deepgemm",
        ">=0.20.0,<0.22.0",
        SM12X,
        "blocker",
        _OPROJ_BLOCKER,
        (_src(_ATTENTION_020, r"wo_a_scale = self\.wo_a\.weight_scale_inv"), _src(_ATTENTION_020, _OPROJ_RECIPE))
        + _OPROJ_2D,
        cover=_oproj_cover("o_proj_einsum_legacy"),
        fixed_in="0.28.0",
    ),
    Row(
        "vllm",
        "profile",
        _OPROJ_KERNEL,
        "deepgemm",
        ">=0.22.0,<0.23.0",
        SM12X,
        "blocker",
        _OPROJ_BLOCKER,
        (_src(_ATTENTION, r"wo_a_scale = self\.wo_a\.weight_scale_inv"), _src(_ATTENTION, _OPROJ_RECIPE)) + _OPROJ_2D,
        cover=_oproj_cover("o_proj_einsum_op"),
        fixed_in="0.28.0",
    ),
    Row(
        "vllm",
        "profile",
        _OPROJ_KERNEL,
        "deepgemm",
        ">=0.23.0,<0.24.0",
        SM12X,
        "blocker",
        _OPROJ_BLOCKER,
        (_src(_OPROJ_PY, r"\(wo_a\.weight, (weight_scale|wo_a\.weight_scale_inv)\)"), _src(_OPROJ_PY, _OPROJ_RECIPE))
        + _OPROJ_2D,
        cover=_oproj_cover("o_proj_einsum"),
        fixed_in="0.28.0",
    ),
    Row(
        "vllm",
        "profile",
        _OPROJ_KERNEL,
        "deepgemm",
        ">=0.24.0,<0.25.0",
        SM12X,
        "blocker",
        _OPROJ_BLOCKER,
        (_src(_OPROJ_PY, r"\(wo_a\.weight, (weight_scale|wo_a\.weight_scale_inv)\)"), _src(_OPROJ_PY, _OPROJ_RECIPE))
        + _OPROJ_2D,
        cover=_oproj_cover("o_proj_einsum"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "profile",
        _OPROJ_KERNEL,
        "deepgemm",
        DG_OFF_027,
        SM12X,
        "blocker",
        _OPROJ_BLOCKER,
        (_src(_OPROJ_PY, r"\(wo_a\.weight, weight_scale\)"), _src(_OPROJ_PY, _OPROJ_RECIPE)) + _OPROJ_2D,
        cover=_oproj_cover("o_proj_einsum"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    # --- prefill ----------------------------------------------------------------------------------
    Row(
        "vllm",
        "prefill",
        "sparse MLA prefill (FlashMLA)",
        "flash_mla",
        ">=0.20.0,<0.22.0",
        SM12X,
        "blocker",
        "V4 attention is FlashMLA only and FlashMLA's sparse kernels are SM90/SM100 only",
        (_absent(_MODEL_020, r"major == 12"), _src(_FLASHMLA_OPS, r"is_device_capability_family\(100\)")),
        cover=Cover("sparse_mla", "triton", "vllm.route.prefill_legacy"),
        fixed_in="0.24.0",
    ),
    Row(
        "vllm",
        "prefill",
        "sparse MLA prefill (FlashMLA)",
        "flash_mla",
        ">=0.22.0,<0.24.0",
        SM12X,
        "blocker",
        "V4 attention is FlashMLA only on SM12x (no SM12x attention class) and FlashMLA's sparse kernels are "
        "SM90/SM100 only",
        (_absent(_NVIDIA_MODEL, r"major == 12"), _src(_FLASHMLA_OPS, r"is_device_capability_family\(100\)")),
        cover=Cover("sparse_mla", "triton", "vllm.route.prefill"),
        fixed_in="0.24.0",
    ),
    Row(
        "vllm",
        "prefill",
        "sparse MLA prefill (FlashInfer SM120, pinned FlashInfer too old)",
        "flashinfer",
        ">=0.24.0,<0.27.0",
        SM12X,
        "blocker",
        _FI_NO_SWA,
        (
            _src(_NVIDIA_MODEL, r"major == 12:\s*return DeepseekV4FlashInferSM120Attention"),
            _src(_FI_SPARSE, r"swa_topk_lens="),
            _absent(_FI_CORE, r"swa_topk_lens", "flashinfer-python"),
        ),
        cover=Cover("sparse_mla", "triton", "vllm.route.attention_class"),
        fixed_in="0.27.0",
        unless=("flashinfer", "sm120_sparse_mla"),
    ),
    Row(
        "vllm",
        "prefill",
        "sparse MLA prefill (FlashInfer SM120)",
        "flashinfer",
        ">=0.27.0",
        SM12X,
        "has_code",
        "SM12x defaults to DeepseekV4FlashInferSM120Attention, and the pinned FlashInfer's "
        "trtllm_batch_decode_sparse_mla_dsv4 takes swa_topk_lens and has an SM120 branch",
        (
            _src(_NVIDIA_MODEL, r"major == 12:\s*return DeepseekV4FlashInferSM120Attention"),
            _src(_FI_CORE, r"swa_topk_lens: Optional", "flashinfer-python"),
            _src(_FI_CORE, r"def _trtllm_batch_decode_sparse_mla_sm120", "flashinfer-python"),
        ),
    ),
    Row(
        "vllm",
        "prefill",
        "sparse MLA prefill (FlashMLA)",
        "flash_mla",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "FlashMLA's sparse kernels are built for SM90/SM100 (is_flashmla_sparse_supported); ds-plugins does "
        "not change it",
        (_src(_FLASHMLA_OPS, r"is_device_capability_family\(90\)"),),
    ),
    Row(
        "vllm",
        "prefill",
        "indexer logits, mHC prenorm (DeepGEMM, no SM12x kernels)",
        "deepgemm",
        DG_OFF_OLD,
        SM12X,
        "blocker",
        "V4's indexer (fp8_mqa_logits), o_proj einsum and mHC prenorm (tf32_hc_prenorm_gemm) call DeepGEMM, "
        "and the vendored DeepGEMM has no SM120 kernels",
        (_DG_SM12X_ABSENT,),
        cover=Cover("indexer", "triton", "vllm.route.indexer_logits"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "prefill",
        "indexer logits, mHC prenorm (DeepGEMM, no SM12x kernels)",
        "deepgemm",
        DG_OFF_027,
        SM12X,
        "blocker",
        "0.27.0 re-vendored a DeepGEMM without the SM120 kernels V4's indexer, o_proj einsum and mHC prenorm need",
        (_DG_SM12X_ABSENT,),
        cover=Cover("indexer", "triton", "vllm.route.indexer_logits"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "prefill",
        "indexer logits (DeepGEMM SM120)",
        "deepgemm",
        DG_ON_025,
        SM12X,
        "has_code",
        "the vendored DeepGEMM ships sm120_fp8_mqa_logits",
        (_DG_SM12X_PRESENT,),
    ),
    Row(
        "vllm",
        "prefill",
        "indexer logits (DeepGEMM SM120)",
        "deepgemm",
        DG_ON,
        SM12X,
        "has_code",
        "the vendored DeepGEMM ships sm120_fp8_mqa_logits",
        (_DG_SM12X_PRESENT,),
    ),
    Row(
        "vllm",
        "prefill",
        "indexer logits, mHC prenorm (DeepGEMM)",
        "deepgemm",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "the vendored DeepGEMM ships sm90_fp8_mqa_logits and sm90_tf32_hc_prenorm_gemm; ds-plugins does not change it",
        (_src(_FILES, r"impls/sm90_fp8_mqa_logits\.cuh"), _src(_FILES, r"impls/sm90_tf32_hc_prenorm_gemm\.cuh")),
    ),
    Row(
        "vllm",
        "prefill",
        "mHC pre/post (TileLang), KV compressor",
        "tilelang",
        ">=0.20.0",
        SM12X,
        "unverified",
        "the TileLang mHC kernels and the compressor (CuTeDSL where vLLM picks it, else the in-tree Triton "
        "compress_norm_rope_store) are JIT-compiled for the running GPU; no SM120 run has settled them yet",
        (
            _reading(
                "vllm/model_executor/kernels/mhc/tilelang.py, vllm/models/deepseek_v4/compressor.py",
                "JIT-compiled for the current device; vllm#50645, #53055 (tf32_hc_prenorm_gemm unguarded)",
            ),
        ),
        refs=("vllm#50645", "vllm#53055"),
    ),
    Row(
        "vllm",
        "prefill",
        "mHC pre/post (TileLang), KV compressor",
        "tilelang",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "TileLang/Triton JIT kernels, the path upstream tests on SM90/SM100; ds-plugins does not change it",
        (_src(_FILES, r"vllm/model_executor/(layers/mhc|kernels/mhc/tilelang)\.py"),),
    ),
    # --- decode -------------------------------------------------------------------------------------
    Row(
        "vllm",
        "decode",
        "sparse MLA decode (FlashMLA)",
        "flash_mla",
        ">=0.20.0,<0.22.0",
        SM12X,
        "blocker",
        "flash_mla_with_kvcache is the only V4 decode kernel, and FlashMLA's sparse kernels are SM90/SM100 only",
        (_absent(_MODEL_020, r"major == 12"), _src(_FLASHMLA_OPS, r"is_device_capability_family\(100\)")),
        cover=Cover("sparse_mla", "triton", "vllm.route.decode_legacy"),
        fixed_in="0.24.0",
    ),
    Row(
        "vllm",
        "decode",
        "sparse MLA decode (FlashMLA)",
        "flash_mla",
        ">=0.22.0,<0.24.0",
        SM12X,
        "blocker",
        "no SM12x attention class: flash_mla_with_kvcache decodes, and FlashMLA's sparse kernels are SM90/SM100 only",
        (_absent(_NVIDIA_MODEL, r"major == 12"), _src(_FLASHMLA_OPS, r"is_device_capability_family\(100\)")),
        cover=Cover("sparse_mla", "triton", "vllm.route.decode"),
        fixed_in="0.24.0",
    ),
    Row(
        "vllm",
        "decode",
        "sparse MLA decode (FlashInfer SM120, pinned FlashInfer too old)",
        "flashinfer",
        ">=0.24.0,<0.27.0",
        SM12X,
        "blocker",
        _FI_NO_SWA,
        (
            _src(_FI_SPARSE, r"swa_topk_lens=swa_lens"),
            _absent(_FI_CORE, r"swa_topk_lens", "flashinfer-python"),
            _absent(_FI_CORE, r"_trtllm_batch_decode_sparse_mla_sm120", "flashinfer-python"),
        ),
        cover=Cover("sparse_mla", "triton", "vllm.route.attention_class"),
        fixed_in="0.27.0",
        unless=("flashinfer", "sm120_sparse_mla"),
    ),
    Row(
        "vllm",
        "decode",
        "sparse MLA decode (FlashInfer SM120)",
        "flashinfer",
        ">=0.27.0",
        SM12X,
        "has_code",
        "the pinned FlashInfer's trtllm_batch_decode_sparse_mla_dsv4 takes swa_topk_lens and dispatches SM12x "
        "to its SM120 kernel",
        (
            _src(_FI_SPARSE, r"swa_topk_lens=swa_lens"),
            _src(_FI_CORE, r"swa_topk_lens: Optional", "flashinfer-python"),
            _src(_FI_CORE, r"def _trtllm_batch_decode_sparse_mla_sm120", "flashinfer-python"),
        ),
    ),
    Row(
        "vllm",
        "decode",
        "sparse MLA decode (FlashMLA)",
        "flash_mla",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "FlashMLA's sparse decode is built for SM90/SM100; ds-plugins does not change it",
        (_src(_FLASHMLA_OPS, r"is_device_capability_family\(90\)"),),
    ),
    Row(
        "vllm",
        "decode",
        "indexer paged logits (DeepGEMM, no SM12x kernels)",
        "deepgemm",
        DG_OFF_OLD,
        SM12X,
        "blocker",
        "fp8_paged_mqa_logits is DeepGEMM's, and the vendored DeepGEMM has no SM120 kernels",
        (_absent(_FILES, r"impls/sm120_fp8_paged_mqa_logits\.cuh"),),
        cover=Cover("indexer", "triton", "vllm.route.indexer_paged_logits"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "decode",
        "indexer paged logits (DeepGEMM, no SM12x kernels)",
        "deepgemm",
        DG_OFF_027,
        SM12X,
        "blocker",
        "fp8_paged_mqa_logits is DeepGEMM's, and the DeepGEMM 0.27.0 vendors has no SM120 kernels",
        (_absent(_FILES, r"impls/sm120_fp8_paged_mqa_logits\.cuh"),),
        cover=Cover("indexer", "triton", "vllm.route.indexer_paged_logits"),
        fixed_in="0.28.0",
        unless=("deep_gemm", "sm12x"),
    ),
    Row(
        "vllm",
        "decode",
        "indexer paged logits (DeepGEMM SM120)",
        "deepgemm",
        DG_ON_025,
        SM12X,
        "has_code",
        "the vendored DeepGEMM ships sm120_fp8_paged_mqa_logits",
        (_src(_FILES, r"impls/sm120_fp8_paged_mqa_logits\.cuh"),),
    ),
    Row(
        "vllm",
        "decode",
        "indexer paged logits (DeepGEMM SM120)",
        "deepgemm",
        DG_ON,
        SM12X,
        "has_code",
        "the vendored DeepGEMM ships sm120_fp8_paged_mqa_logits",
        (_src(_FILES, r"impls/sm120_fp8_paged_mqa_logits\.cuh"),),
    ),
    Row(
        "vllm",
        "decode",
        "indexer paged logits (DeepGEMM)",
        "deepgemm",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "the vendored DeepGEMM ships sm90_fp8_paged_mqa_logits; ds-plugins does not change it",
        (_src(_FILES, r"impls/sm90_fp8_paged_mqa_logits\.cuh"),),
    ),
    # --- mtp ----------------------------------------------------------------------------------------
    Row(
        "vllm",
        "mtp",
        "MTP draft layer (the decode stage's attention and indexer kernels)",
        "engine",
        ">=0.20.0",
        SM12X,
        "unverified",
        "DeepSeekV4MTP reuses the main model's attention, indexer and MoE, so it follows the decode rows; "
        "padded draft rows reaching persistent_topk hang on 0.30-0.33 (vllm#51593), unsettled without a GPU run",
        (
            _src("vllm/model_executor/models/registry.py", r'"DeepSeekV4MTPModel"'),
            _reading("vllm#51593", "MTP hang when padded rows reach persistent_topk"),
        ),
        refs=("vllm#51593",),
    ),
    Row(
        "vllm",
        "mtp",
        "MTP draft layer (the decode stage's attention and indexer kernels)",
        "engine",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "DeepSeekV4MTP reuses the main model's FlashMLA/DeepGEMM kernels; ds-plugins does not change it",
        (_src("vllm/model_executor/models/registry.py", r'"DeepSeekV4MTPModel"'),),
    ),
    # --- topk (indexer top-k) -------------------------------------------------------------------------
    Row(
        "vllm",
        "topk",
        "indexer top-k (persistent_topk / top_k_per_row)",
        "engine_c",
        ">=0.20.0,<0.30.0",
        SM12X,
        "unverified",
        "decode calls torch.ops._C.persistent_topk for top-k 512/1024/2048; its FilteredTopK path wants >= 128 KB "
        "of shared memory and SM12x has 101,376 B (vllm#54110); no SM120 run has settled which path runs",
        (_src(_INDEXER_OLD, r"torch\.ops\._C\.persistent_topk\("), _reading("vllm#54110", "FilteredTopK smem")),
        refs=("vllm#54110",),
    ),
    Row(
        "vllm",
        "topk",
        "indexer top-k (persistent_topk / top_k_per_row)",
        "engine_c",
        ">=0.30.0",
        SM12X,
        "unverified",
        "decode calls torch.ops._C.persistent_topk (moved to indexer_topk.py); FilteredTopK's shared-memory "
        "need against SM12x's 101,376 B is not settled by a GPU run (vllm#54110)",
        (_src(_INDEXER_TOPK, r"torch\.ops\._C\.persistent_topk\("), _reading("vllm#54110", "FilteredTopK smem")),
        refs=("vllm#54110",),
    ),
    Row(
        "vllm",
        "topk",
        "indexer top-k (persistent_topk / top_k_per_row)",
        "engine_c",
        ">=0.20.0,<0.30.0",
        HOPPER,
        "has_code",
        "vLLM's own CUDA top-k, built for SM90/SM100; ds-plugins does not change it",
        (_src(_INDEXER_OLD, r"torch\.ops\._C\.persistent_topk\("),),
    ),
    Row(
        "vllm",
        "topk",
        "indexer top-k (persistent_topk / top_k_per_row)",
        "engine_c",
        ">=0.30.0",
        HOPPER,
        "has_code",
        "vLLM's own CUDA top-k, built for SM90/SM100; ds-plugins does not change it",
        (_src(_INDEXER_TOPK, r"torch\.ops\._C\.persistent_topk\("),),
    ),
    # --- moe ---------------------------------------------------------------------------------------
    Row(
        "vllm",
        "moe",
        "MXFP4 routed experts (FusedMoE, backend chosen per capability)",
        "engine_c",
        ">=0.20.0",
        SM12X,
        "unverified",
        "the checkpoint's expert_dtype fp4 experts go through FusedMoE's MXFP4 method, whose backend is picked "
        "by the MXFP4 oracle (the first of its priority list whose kernel supports the capability); "
        "no SM120 run has settled which one and that it runs",
        (
            _src(_MXFP4_ORACLE, r"def (select_mxfp4_moe_backend|get_mxfp4_backend)\("),
            _reading(_MXFP4_ORACLE, "priority list filtered by each kernel's is_supported_config"),
        ),
    ),
    Row(
        "vllm",
        "moe",
        "MXFP4 routed experts (FusedMoE)",
        "engine_c",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "FusedMoE's MXFP4 method with the backend upstream tests on SM90/SM100; ds-plugins does not change it",
        (_src(_MXFP4_ORACLE, r"def (select_mxfp4_moe_backend|get_mxfp4_backend)\("),),
    ),
    # --- sampling ----------------------------------------------------------------------------------
    Row(
        "vllm",
        "sampling",
        "sampler (top-k/top-p in torch / Triton)",
        "engine_triton",
        ">=0.20.0",
        ALL,
        "has_code",
        "vLLM's V1 sampler is architecture-independent torch/Triton code",
        (_src("vllm/v1/sample/sampler.py", r"class Sampler"),),
    ),
    # --- cudagraph ---------------------------------------------------------------------------------
    Row(
        "vllm",
        "cudagraph",
        "CUDA-graph capture of the ds-plugins kernels (piecewise, eager attention)",
        "ds_plugins",
        ">=0.20.0,<0.24.0",
        SM12X,
        "unverified",
        "the ds-plugins Triton kernels serve attention and the indexer here; they are written graph-safe "
        "(cudagraph=on), but capture under FULL graphs has not run on an SM120 GPU yet",
        (_reading("ds_plugins/vllm (model hook-up)", "graph-safe kernels, capture not yet run on SM120"),),
    ),
    Row(
        "vllm",
        "cudagraph",
        "CUDA-graph capture (breakable graphs, eager attention)",
        "engine",
        ">=0.24.0",
        SM12X,
        "unverified",
        "vLLM auto-enables VLLM_USE_BREAKABLE_CUDAGRAPH for DeepSeek-V4; capture of the SM12x kernels "
        "(FlashInfer SM120, or the ds-plugins ones where routed) has not run on an SM120 GPU yet",
        (_src("vllm/config/vllm.py", r'os\.environ\["VLLM_USE_BREAKABLE_CUDAGRAPH"\] = "1"'),),
    ),
    Row(
        "vllm",
        "cudagraph",
        "CUDA-graph capture",
        "engine",
        ">=0.20.0,<0.22.0",
        HOPPER,
        "has_code",
        "vLLM's own capture of its FlashMLA/DeepGEMM path; ds-plugins does not change it",
        (_src("vllm/config/compilation.py", r"class CUDAGraphMode"),),
    ),
    Row(
        "vllm",
        "cudagraph",
        "CUDA-graph capture (breakable graphs)",
        "engine",
        ">=0.22.0",
        HOPPER,
        "has_code",
        "vLLM auto-enables breakable CUDA graphs for DeepSeek-V4 around its FlashMLA/DeepGEMM path; ds-plugins "
        "does not change it",
        (_src("vllm/config/vllm.py", r"VLLM_USE_BREAKABLE_CUDAGRAPH"),),
    ),
    # --- collective --------------------------------------------------------------------------------
    Row(
        "vllm",
        "collective",
        "custom all-reduce (tensor parallel)",
        "engine_c",
        ">=0.20.0",
        SM12X,
        "unverified",
        "vLLM's custom all-reduce needs peer access; on PCIe-only SM12x boxes community recipes pass "
        "--disable-custom-all-reduce (vllm#47266), and ds-plugins sets it (tensor parallel > 1) where NVML "
        "finds no NVLink between the visible GPUs; not settled by a multi-GPU SM120 run",
        (
            _src("vllm/distributed/device_communicators/custom_all_reduce.py", r"class CustomAllreduce"),
            _src(
                "vllm/v1/worker/gpu_worker.py",
                r"set_custom_all_reduce\(not parallel_config\.disable_custom_all_reduce\)",
            ),
            _reading("vllm#47266", "custom all-reduce on PCIe-only SM12x"),
        ),
        cover=Cover("custom_all_reduce", "off", "vllm.custom_all_reduce.off"),
        refs=("vllm#47266",),
        requires="--disable-custom-all-reduce on PCIe-only multi-GPU boxes where NVML cannot be read",
    ),
    Row(
        "vllm",
        "collective",
        "custom all-reduce (tensor parallel)",
        "engine_c",
        ">=0.20.0",
        HOPPER,
        "has_code",
        "vLLM's custom all-reduce, NVLink-aware; ds-plugins does not change it",
        (_src("vllm/distributed/device_communicators/custom_all_reduce.py", r"class CustomAllreduce"),),
    ),
)
