"""SGLang's DeepSeek-V4 path manifest (ds_plugins.paths.model), read from the official wheels of every
matrix version from 0.5.12 and the libraries each pins (sglang-kernel, flashinfer-python, sgl-deep-gemm,
sgl-flash-mla): per stage, the kernel SGLang selects on SM120/SM121 and on SM90/SM100, the selection
logic that proves it (Evidence, re-checked by tests/contract/test_path_manifest.py), and ds-plugins'
cover where SGLang has none.

Verdicts this data gives (policy.decide):
- 0.5.12 on SM12x: unsupported, upgrade to >= 0.5.13. Its MXFP4 MoE has no runner there (Triton fused
  MoE gets int8-packed FP4 weights; Marlin refuses anything but SM90, and 0.5.13, which accepts SM120,
  had to skip Marlin's repacking there because Marlin gave NaN), its top-k v2 does not fit SM120's
  shared memory, and its attention imports a `flash_mla` package that no 0.5.12 dependency provides.
- 0.5.13-0.5.14: SGLang's own SM120 path; ds-plugins only holds DeepGEMM off on SM121.
- 0.5.15-0.5.18: every prefill goes to FlashMLA's sparse kernel (SM90a/SM100f only) and the default SM120
  decode imports a FlashInfer module the pinned 0.6.12 lacks: covered by sparse_mla=triton (ds-plugins
  sets SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 and SGLANG_SM120_FLASHMLA_BACKEND=triton, and routes SGLang's
  SM120 FlashMLA entry to its Triton kernel).
- 0.5.19+: SGLang's own SM120 path with the pinned FlashInfer and DeepGEMM; ds-plugins' kernel-file probe
  holds DeepGEMM off where an installed DeepGEMM defines the SM12x names without the kernels.
SM90/SM100 rows name what SGLang runs there; ds-plugins never changes it.
"""

from __future__ import annotations

from .model import SM12X, Cover, Evidence, Row

ENGINE = "sglang"
HOPPER = ("sm90", "sm100")
ALL = SM12X + HOPPER

V0512 = ">=0.5.12,<0.5.13"
V0513 = ">=0.5.13,<0.5.15"
V0515 = ">=0.5.15,<0.5.19"
V0519 = ">=0.5.19,<0.5.21"
FROM_0513 = ">=0.5.13"
FROM_0515 = ">=0.5.15"
FROM_0519 = ">=0.5.19"
FROM_0521 = ">=0.5.21"

# Files, as the wheels hold them.
CONFIGURER = "sglang/srt/layers/deep_gemm_wrapper/configurer.py"
BACKEND = "sglang/srt/layers/attention/deepseek_v4_backend.py"
ENVIRON = "sglang/srt/environ.py"
SM120_ATTN_LEGACY = "sglang/srt/layers/attention/flash_mla_sm120.py"  # 0.5.13-0.5.15
SM120_ATTN = "sglang/kernels/ops/attention/flash_mla_sm120.py"  # 0.5.16+
MARLIN_MOE = "sglang/srt/layers/quantization/mxfp4_marlin_moe.py"
INDEXER = "sglang/srt/layers/attention/dsv4/indexer.py"
MODEL_HOOK = "sglang/srt/arg_groups/model_hook.py"

# Where SGLang's DeepGEMM gate is on for an SM12x GPU, whether that fails depends on the DeepGEMM installed,
# not on the version: ds-plugins' kernel-file probe decides (deepgemm=off where the sm120_*.cuh kernels are
# missing, upstream where they are), so these rows are ds-plugins' and never blockers of a version.
GATE_HELD = "DeepGEMM gate held to the installed DeepGEMM's SM12x kernels (ds-plugins' kernel-file probe)"
GATE_HOW = (
    "ds-plugins decides deepgemm=off there (SGLANG_ENABLE_JIT_DEEPGEMM=0 in every process, patch "
    "sglang.deepgemm_off.configurer for an already-imported gate) and upstream for a DeepGEMM with them"
)
# Carried by SGLang's own switches (ds_plugins.sglang.deepgemm_gate.wanted; an adapter carrier), no patch.
SPARSE_TRITON = Cover("sparse_mla", "triton", None)


def _src(path: str, pattern: str, package: str = "sglang") -> Evidence:
    return Evidence("source", package, path, pattern)


def _absent(path: str, pattern: str, package: str = "sglang") -> Evidence:
    return Evidence("absent", package, path, pattern)


def _pin(package: str, pattern: str) -> Evidence:
    return Evidence("pin", package, "", pattern)


def _row(
    stage, kernel, provider, versions, devices, upstream, why, evidence=(), cover=None, fixed_in=None, refs=()
) -> Row:
    return Row(
        ENGINE, stage, kernel, provider, versions, devices, upstream, why, tuple(evidence), cover, fixed_in, tuple(refs)
    )


ROWS: tuple[Row, ...] = (
    # ---- 0.5.12 on SM12x: what makes it unsupported (first: the row the verdict names) -----------------
    _row(
        "moe",
        "MXFP4 expert MoE (no runner for SM12x)",
        "marlin",
        V0512,
        SM12X,
        "blocker",
        "the default Triton fused MoE gets int8-packed FP4 weights and Marlin accepts SM90 only; 0.5.13 "
        "found Marlin gives NaN on SM120 and keeps another weight layout there, so ds-plugins does not lift "
        "the check",
        (
            _src(
                MARLIN_MOE,
                r"if not is_sm90_supported\(\):\n\s+raise RuntimeError\(\n\s+\"DeepSeekV4 MXFP4 Marlin "
                r"fallback requires Hopper/SM90 or above",
            ),
            _absent(MARLIN_MOE, r"is_sm120"),
        ),
        fixed_in="0.5.13",
    ),
    _row(
        "topk",
        "indexer top-k v2 (topk_transform_512_v2, JIT)",
        "engine_c",
        V0512,
        SM12X,
        "blocker",
        "SGLANG_OPT_USE_TOPK_V2 is on by default and the long-context path needs ~141 KB of shared memory "
        "(SM120 has 99 KB); CUDA-graph capture runs it at the maximum context, so start-up fails; 0.5.13 "
        "turns it off on SM12x itself",
        (
            _src(ENVIRON, r"SGLANG_OPT_USE_TOPK_V2 = EnvBool\(True\)"),
            _src(INDEXER, r"envs\.SGLANG_OPT_USE_TOPK_V2\.get\(\)"),
            _absent("sglang/srt/server_args.py", r"SGLANG_OPT_USE_TOPK_V2"),
        ),
        fixed_in="0.5.13",
    ),
    _row(
        "decode",
        "DSV4 sparse attention through `import flash_mla` (no dependency provides it)",
        "flash_mla",
        V0512,
        SM12X,
        "blocker",
        "the dsv4 backend imports a top-level flash_mla package for decode, prefill and the plan; 0.5.12 "
        "depends on none, and the one on the index with V4 (sgl-flash-mla 1.0.0) has no SM12x kernels and "
        "takes other parameters, so ds-plugins' routes cannot rely on it",
        (
            _src(BACKEND, r"import flash_mla\n\s+\n?\s*o = flash_mla\.flash_mla_with_kvcache\("),
            _src(BACKEND, r"return flash_mla\.get_mla_metadata\(\)\[0\]"),
        ),
        fixed_in="0.5.13",
    ),
    _row(
        "prefill",
        "DSV4 sparse prefill through the same `flash_mla.flash_mla_with_kvcache` call",
        "flash_mla",
        V0512,
        SM12X,
        "blocker",
        "0.5.12's dsv4 backend has one forward for extend and decode (no SM12x branch, ragged attention "
        "unimplemented): every prefill reaches the flash_mla package the decode row names",
        (
            _src(BACKEND, r"import flash_mla\n\s+\n?\s*o = flash_mla\.flash_mla_with_kvcache\("),
            _src(BACKEND, r'raise NotImplementedError\("ragged attention"\)'),
            _absent(BACKEND, r"sm120|is_sm12"),
        ),
        fixed_in="0.5.13",
    ),
    _row(
        "mtp",
        "MTP draft attention (same `flash_mla` forward, padded to the draft batch)",
        "flash_mla",
        V0512,
        SM12X,
        "blocker",
        "the NextN draft runs the same dsv4 backend forward (mtp_enabled pads its index lists), so it needs the "
        "same flash_mla package as decode",
        (
            _src(BACKEND, r"if self\.mtp_enabled:"),
            _src(BACKEND, r"import flash_mla\n"),
            _absent(BACKEND, r"sm120|is_sm12"),
        ),
        fixed_in="0.5.13",
    ),
    _row(
        "topk",
        "C4 indexer logits and schedule (DeepGEMM fp8_paged_mqa_logits, no SM12x kernel)",
        "deepgemm",
        V0512,
        SM12X,
        "blocker",
        "with SGLANG_OPT_USE_TILELANG_INDEXER and SGLANG_FP8_PAGED_MQA_LOGITS_TORCH off by default and nothing "
        "turning them on for SM12x, the indexer imports deep_gemm.fp8_paged_mqa_logits at each call (and the "
        "metadata get_paged_mqa_logits_metadata): indexer=triton routes both (sglang.route.indexer_logits, "
        "sglang.route.indexer_schedule)",
        (
            _src(INDEXER, r"from deep_gemm import fp8_paged_mqa_logits as fn"),
            _src(ENVIRON, r"SGLANG_FP8_PAGED_MQA_LOGITS_TORCH = EnvBool\(False\)"),
            _absent("sglang/srt/server_args.py", r"SGLANG_FP8_PAGED_MQA_LOGITS_TORCH"),
        ),
        cover=Cover("indexer", "triton", "sglang.route.indexer_logits"),
        fixed_in="0.5.13",
    ),
    _row(
        "prefill",
        "mHC prenorm GEMM in every forward (DeepGEMM tf32_hc_prenorm_gemm, no SM12x kernel)",
        "deepgemm",
        V0512,
        SM12X,
        "blocker",
        "SGLANG_OPT_DEEPGEMM_HC_PRENORM is on by default: both callers, layers/mhc.py:mhc_pre (the TileLang "
        "default, num_splits and 3-D split-K outputs) and deepseek_v4.py:hc_pre (num_splits=None), call "
        "deep_gemm.tf32_hc_prenorm_gemm ('Unsupported architecture'); indexer=triton routes it "
        "(sglang.route.mhc_prenorm)",
        (
            _src("sglang/srt/layers/mhc.py", r"deep_gemm\.tf32_hc_prenorm_gemm\(\n(.*\n){4}\s+num_splits=n_splits"),
            _src(ENVIRON, r"SGLANG_OPT_DEEPGEMM_HC_PRENORM = EnvBool\(True\)"),
            _absent("sglang/srt/server_args.py", r"SGLANG_OPT_DEEPGEMM_HC_PRENORM"),
        ),
        cover=Cover("indexer", "triton", "sglang.route.mhc_prenorm"),
        fixed_in="0.5.13",
        refs=("sgl-project/sglang#25877",),
    ),
    _row(
        "prefill",
        "mHC pre/post fused kernels (TileLang JIT)",
        "tilelang",
        V0512,
        SM12X,
        "unverified",
        "SGLANG_OPT_USE_TILELANG_MHC_PRE/POST are on by default; TileLang compiles for the GPU it runs on "
        "(0.5.13 turns the pre kernel off on SM12x); not run on a GPU here",
        (Evidence("reading", "sglang", "sglang/srt/layers/mhc.py", "mhc_pre_big_fuse_tilelang"),),
    ),
    _row(
        "profile",
        "memory-profiling forward (the prefill rows' kernels)",
        "flash_mla",
        V0512,
        SM12X,
        "unverified",
        "SGLang profiles memory with one prefill-shaped forward: it fails where the prefill rows do",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/model_runner.py", "profile_max_num_token"),),
    ),
    _row(
        "cudagraph",
        "CUDA-graph capture of decode (the decode and top-k rows' kernels)",
        "engine_c",
        V0512,
        SM12X,
        "unverified",
        "captures the decode rows' kernels at each batch size; the top-k v2 row fails here, at the maximum context",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/cuda_graph_runner.py", "capture"),),
    ),
    _row(
        "weight_load",
        GATE_HELD,
        "ds_plugins",
        V0512,
        SM12X,
        "has_code",
        "_compute_enable_deep_gemm() enables DeepGEMM on every sm >= 90 and the pinned sgl-deep-gemm 0.1.0 "
        "has no SM12x kernels ('Unknown SF transformation' at weight load): " + GATE_HOW,
        (
            _src(CONFIGURER, r"if \(_is_cuda and sm_version < 90\)"),
            _absent(CONFIGURER, r"sm_version == 120"),
            _pin("sgl-deep-gemm", r"0\.1\.0"),
        ),
    ),
    _row(
        "prefill",
        "DSV4 sparse attention, indexer and mHC prenorm (FlashMLA / DeepGEMM)",
        "flash_mla",
        V0512,
        HOPPER,
        "has_code",
        "FlashMLA and DeepGEMM have SM90/SM100 kernels; ds-plugins never changes them (a flash_mla package "
        "must be installed by hand: no 0.5.12 dependency provides it)",
        (_src(BACKEND, r"import flash_mla"), _pin("sgl-deep-gemm", r"0\.1\.0")),
    ),
    _row(
        "moe",
        "MXFP4 expert MoE (SGLang's default runner)",
        "engine_triton",
        V0512,
        HOPPER,
        "unverified",
        "SGLang's own MoE selection on SM90/SM100; ds-plugins never changes it",
        (Evidence("reading", "sglang", "sglang/srt/layers/quantization/fp8.py", "Mxfp4MarlinMoEMethod"),),
    ),
    _row(
        "topk",
        "indexer top-k v2 (topk_transform_512_v2)",
        "engine_c",
        V0512,
        HOPPER,
        "has_code",
        "runs within SM90/SM100 shared memory; ds-plugins never changes it",
        (_src(INDEXER, r"topk_transform_512_v2"),),
    ),
    # ---- weight loading / DeepGEMM gate, 0.5.13+ ----------------------------------------------------
    _row(
        "weight_load",
        "DeepGEMM off on SM120 by SGLang's own gate",
        "engine_triton",
        ">=0.5.13,<0.5.20",
        ("sm120",),
        "has_code",
        "_compute_enable_deep_gemm() returns False for sm_version 120: FP8 linears and the scale layout stay "
        "on SGLang's non-DeepGEMM paths",
        (_src(CONFIGURER, r"if sm_version == 120:\n\s+return False"),),
    ),
    _row(
        "weight_load",
        GATE_HELD,
        "ds_plugins",
        ">=0.5.13,<0.5.19",
        ("sm121",),
        "has_code",
        "the gate excludes sm_version 120 only; on SM121 it enables DeepGEMM, and the pinned sgl-deep-gemm "
        "(0.1.2, 0.1.4) has no SM12x kernels ('Unknown SF transformation'): " + GATE_HOW,
        (_src(CONFIGURER, r"if sm_version == 120:"), _absent(CONFIGURER, r"121"), _pin("sgl-deep-gemm", r"0\.1\.[24]")),
    ),
    _row(
        "weight_load",
        "DeepGEMM SM12x kernels (pinned sgl-deep-gemm ships them)",
        "deepgemm",
        V0519,
        ("sm121",),
        "has_code",
        "the pinned sgl-deep-gemm 0.1.7 / 0.2.0 ships include/deep_gemm/impls/sm120_*.cuh; an installed "
        "DeepGEMM without them is held off by ds-plugins' kernel-file probe (deepgemm=off)",
        (_pin("sgl-deep-gemm", r"0\.1\.7|0\.2\.0"),),
    ),
    _row(
        "weight_load",
        "DeepGEMM on SM120 behind SGLang's one-symbol probe",
        "deepgemm",
        ">=0.5.20,<0.5.21",
        ("sm120",),
        "has_code",
        "0.5.20 enables DeepGEMM on SM120 when one SM12x symbol exists; the pinned sgl-deep-gemm 0.2.0 has the "
        "kernels, and ds-plugins' kernel-file probe holds an installed one without them off",
        (_src(CONFIGURER, r"if sm_version == 120:"), _pin("sgl-deep-gemm", r"0\.2\.0")),
    ),
    _row(
        "weight_load",
        "DeepGEMM on SM12x behind SGLang's API probe (names callable)",
        "deepgemm",
        FROM_0521,
        SM12X,
        "has_code",
        "_sm120_deep_gemm_apis_available() only checks that three names are callable, which sgl-deep-gemm 0.1.0 "
        "(no SM12x kernels) passes; the pinned 0.2.x has the kernels, and for any other install ds-plugins' "
        "kernel-file probe decides (deepgemm=off where the sm120_*.cuh kernels are missing)",
        (
            _src(CONFIGURER, r"def _sm120_deep_gemm_apis_available"),
            _src(CONFIGURER, r"callable\(getattr\(deep_gemm, name, None\)\)"),
            _pin("sgl-deep-gemm", r"0\.2\..*"),
        ),
        refs=("sgl-project/sglang#34827",),
    ),
    _row(
        "weight_load",
        "DeepGEMM FP8 GEMMs and scale layout",
        "deepgemm",
        ">=0.5.12",
        HOPPER,
        "has_code",
        "SGLang's gate enables DeepGEMM on sm >= 90 and DeepGEMM has SM90/SM100 kernels; ds-plugins never changes it",
        (_src(CONFIGURER, r"sm_version < 90"),),
    ),
    # ---- attention: prefill / decode / profiling / MTP, 0.5.13+ -------------------------------------
    _row(
        "decode",
        "SM120 FlashMLA replacement (SGLang's Triton decode by default)",
        "engine_triton",
        V0513,
        SM12X,
        "has_code",
        "flash_mla_with_kvcache_sm120 dispatches to SGLang's own Triton kernel unless SGLANG_SM120_TRITON_FLASHMLA=0",
        (_src(SM120_ATTN_LEGACY, r'"triton" if os\.environ\.get\("SGLANG_SM120_TRITON_FLASHMLA", "1"\) == "1"'),),
    ),
    _row(
        "prefill",
        "FlashMLA sparse prefill for very large extends (> _LARGE_INDEXER_QUERY_THRESHOLD tokens)",
        "flash_mla",
        V0513,
        SM12X,
        "unverified",
        "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL is off by default; one extend above the threshold (11673 query "
        "tokens) still goes to FlashMLA's sparse kernel, which has no SM12x code: keep --chunked-prefill-size "
        "below it (known failure flashmla_sparse_sm12x)",
        (Evidence("reading", "sglang", BACKEND, "_LARGE_INDEXER_QUERY_THRESHOLD"),),
        refs=("sgl-project/sglang#31578",),
    ),
    _row(
        "prefill",
        "FlashMLA sparse prefill on by default (SM90a/SM100f only)",
        "flash_mla",
        V0515,
        SM12X,
        "blocker",
        "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL defaults to True and the backend sends every non-speculative "
        "extend to sgl_kernel.flash_mla.flash_mla_sparse_fwd before its SM120 branch ('Sparse Attention "
        "Forward Kernel is only supported on SM90a and SM100f'); sparse_mla=triton sets "
        "SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 in every SGLang process (never over the user's value)",
        (
            _src(ENVIRON, r"SGLANG_OPT_FLASHMLA_SPARSE_PREFILL = EnvBool\(True\)"),
            _src(BACKEND, r"or envs\.SGLANG_OPT_FLASHMLA_SPARSE_PREFILL\.get\(\)"),
            _absent(BACKEND, r"not get_platform\(\)\.is_sm120"),
        ),
        cover=SPARSE_TRITON,
        fixed_in="0.5.19",
        refs=("sgl-project/sglang#31578",),
    ),
    _row(
        "decode",
        "SM120 FlashMLA replacement, FlashInfer by default (flashinfer.mla._sparse_mla_sm120)",
        "flashinfer",
        ">=0.5.15,<0.5.16",
        SM12X,
        "blocker",
        "SGLANG_SM120_FLASHMLA_BACKEND defaults to flashinfer, whose branch imports "
        "flashinfer.mla._sparse_mla_sm120; the pinned flashinfer 0.6.12 has no such module (0.6.16+ has); "
        "sparse_mla=triton sets SGLANG_SM120_FLASHMLA_BACKEND=triton and routes flash_mla_with_kvcache_sm120 "
        "to ds-plugins' Triton kernel (sglang.route.decode_sm120_legacy)",
        (
            _src(ENVIRON, r'SGLANG_SM120_FLASHMLA_BACKEND = EnvStr\("flashinfer"\)'),
            _src(SM120_ATTN_LEGACY, r"from flashinfer\.mla\._sparse_mla_sm120 import sparse_mla_sm120_decode_dsv4"),
            _pin("flashinfer-python", r"0\.6\.12"),
            _absent("flashinfer/mla/__init__.py", r"_sparse_mla_sm120", package="flashinfer-python"),
        ),
        cover=Cover("sparse_mla", "triton", "sglang.route.decode_sm120_legacy"),
        fixed_in="0.5.19",
    ),
    _row(
        "decode",
        "SM120 FlashMLA replacement on FlashInfer's SM120 sparse MLA",
        "flashinfer",
        FROM_0519,
        SM12X,
        "has_code",
        "SGLANG_SM120_FLASHMLA_BACKEND=flashinfer by default and the pinned flashinfer (0.6.18, 0.7.2) ships "
        "flashinfer.mla._sparse_mla_sm120 (a FlashInfer older than 0.6.16 installed against that pin would "
        "fail at the first decode; ds-plugins does not detect that case)",
        (
            _src(SM120_ATTN, r"from flashinfer\.mla\._sparse_mla_sm120 import"),
            _pin("flashinfer-python", r"0\.6\.18|0\.7\.2"),
        ),
    ),
    _row(
        "prefill",
        "V4 prefill on the SM120 branch (FlashMLA sparse prefill skipped on SM120)",
        "flashinfer",
        FROM_0519,
        SM12X,
        "has_code",
        "the sparse-prefill condition excludes SM120 (`not get_platform().is_sm120`), so prefill goes to "
        "flash_mla_with_kvcache_sm120 (FlashInfer's paged SM120 attention above 64 tokens)",
        (_src(BACKEND, r"not get_platform\(\)\.is_sm120"),),
    ),
    _row(
        "prefill",
        "V4 prefill and decode on SGLang's SM120 path (SGLANG_OPT_FLASHMLA_SPARSE_PREFILL off)",
        "engine_triton",
        V0513,
        SM12X,
        "has_code",
        "with sparse prefill off by default, prefill and decode share flash_mla_with_kvcache_sm120",
        (_src(ENVIRON, r"SGLANG_OPT_FLASHMLA_SPARSE_PREFILL = EnvBool\(False\)"),),
    ),
    _row(
        "profile",
        "memory-profiling forward (same attention, MoE and GEMM kernels as prefill)",
        "engine_triton",
        FROM_0513,
        SM12X,
        "unverified",
        "SGLang profiles memory with one prefill-shaped forward; it reaches the prefill rows' kernels and no others",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/model_runner.py", "profile_max_num_token"),),
    ),
    _row(
        "mtp",
        "MTP / DSpark draft attention (top-k 192 on FlashInfer's SM120 decode)",
        "flashinfer",
        FROM_0519,
        SM12X,
        "unverified",
        "the draft's top-k 192 has no FlashInfer SM120 decode kernel in some builds (sglang#33943, #33985); "
        "SGLANG_SM120_FLASHMLA_BACKEND=triton is the workaround (known failure dspark_topk192_sm120)",
        (Evidence("reading", "sglang", SM120_ATTN, "flashinfer_dsv4_decode_supports_num_heads"),),
        refs=("sgl-project/sglang#33943", "sgl-project/sglang#33985"),
    ),
    _row(
        "mtp",
        "MTP draft attention (same SM120 FlashMLA replacement as decode)",
        "engine_triton",
        V0513,
        SM12X,
        "unverified",
        "the NextN draft layer uses the target's attention backend; not run on a GPU here",
        (Evidence("reading", "sglang", BACKEND, "flash_mla_with_kvcache_sm120"),),
    ),
    _row(
        "mtp",
        "MTP draft attention (SM120 FlashMLA replacement, ds-plugins' Triton kernel)",
        "ds_plugins",
        ">=0.5.15,<0.5.19",
        SM12X,
        "unverified",
        "sparse_mla=triton routes the draft's attention too (same entry point); not run on a GPU here",
        (Evidence("reading", "sglang", BACKEND, "flash_mla_with_kvcache_sm120"),),
    ),
    _row(
        "prefill",
        "DSV4 sparse attention (FlashMLA)",
        "flash_mla",
        FROM_0513,
        HOPPER,
        "has_code",
        "FlashMLA has SM90a/SM100f sparse kernels; ds-plugins never changes them",
        (_src(BACKEND, r"flash_mla"),),
    ),
    _row(
        "decode",
        "DSV4 sparse decode (FlashMLA)",
        "flash_mla",
        ">=0.5.12",
        HOPPER,
        "has_code",
        "FlashMLA has SM90a/SM100f sparse decode kernels; ds-plugins never changes them",
        (_src(BACKEND, r"flash_mla_with_kvcache"),),
    ),
    _row(
        "mtp",
        "MTP draft attention (FlashMLA)",
        "flash_mla",
        ">=0.5.12",
        HOPPER,
        "unverified",
        "same kernels as decode; ds-plugins never changes them",
        (Evidence("reading", "sglang", BACKEND, "flash_mla"),),
    ),
    _row(
        "profile",
        "memory-profiling forward",
        "flash_mla",
        ">=0.5.12",
        HOPPER,
        "unverified",
        "same kernels as prefill; ds-plugins never changes them",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/model_runner.py", "profile_max_num_token"),),
    ),
    # ---- top-k, MoE, sampling, graphs, collectives, 0.5.13+ ------------------------------------------
    _row(
        "topk",
        "indexer top-k v1 (top-k v2 turned off on SM12x by SGLang)",
        "engine_c",
        ">=0.5.13,<0.5.15",
        SM12X,
        "has_code",
        "ServerArgs sets SGLANG_OPT_USE_TOPK_V2 False on SM120-family GPUs (is_sm120_supported: major 12)",
        (_src("sglang/srt/server_args.py", r"envs\.SGLANG_OPT_USE_TOPK_V2\.set\(False\)"),),
    ),
    _row(
        "topk",
        "indexer top-k v1 (top-k v2 turned off on SM12x by SGLang)",
        "engine_c",
        ">=0.5.15,<0.5.19",
        SM12X,
        "has_code",
        "ServerArgs' DeepSeek-V4 hook sets SGLANG_OPT_USE_TOPK_V2 False on SM120-family GPUs",
        (_src("sglang/srt/server_args.py", r"envs\.SGLANG_OPT_USE_TOPK_V2\.set\(False\)"),),
    ),
    _row(
        "topk",
        "indexer top-k v1 (top-k v2 turned off on SM120 by SGLang's model hook)",
        "engine_c",
        FROM_0519,
        SM12X,
        "has_code",
        "arg_groups/model_hook.py sets SGLANG_OPT_USE_TOPK_V2 False for DeepseekV4ForCausalLM on SM120",
        (_src(MODEL_HOOK, r"envs\.SGLANG_OPT_USE_TOPK_V2\.set\(False\)"),),
    ),
    _row(
        "prefill",
        "mHC prenorm and C4 indexer logits off DeepGEMM on SM12x (SGLang's own switches)",
        "engine_triton",
        ">=0.5.13,<0.5.19",
        SM12X,
        "has_code",
        "ServerArgs' DeepSeek-V4 branch on SM120-family GPUs sets SGLANG_OPT_DEEPGEMM_HC_PRENORM and "
        "SGLANG_OPT_USE_TILELANG_MHC_PRE off and SGLANG_FP8_PAGED_MQA_LOGITS_TORCH on: no "
        "deep_gemm.tf32_hc_prenorm_gemm or fp8_paged_mqa_logits call on SM12x",
        (
            _src("sglang/srt/server_args.py", r"envs\.SGLANG_OPT_DEEPGEMM_HC_PRENORM\.set\(False\)"),
            _src("sglang/srt/server_args.py", r"envs\.SGLANG_FP8_PAGED_MQA_LOGITS_TORCH\.set\(True\)"),
        ),
    ),
    _row(
        "prefill",
        "mHC prenorm and C4 indexer logits off DeepGEMM on SM12x (SGLang's model hook)",
        "engine_triton",
        FROM_0519,
        SM12X,
        "has_code",
        "arg_groups/model_hook.py sets SGLANG_OPT_DEEPGEMM_HC_PRENORM off and SGLANG_FP8_PAGED_MQA_LOGITS_TORCH "
        "on for DeepSeek-V4 on SM120 unless the user set them",
        (
            _src(MODEL_HOOK, r"envs\.SGLANG_OPT_DEEPGEMM_HC_PRENORM\.set\(False\)"),
            _src(MODEL_HOOK, r"envs\.SGLANG_FP8_PAGED_MQA_LOGITS_TORCH\.set\(True\)"),
        ),
    ),
    _row(
        "topk",
        "indexer top-k v2",
        "engine_c",
        FROM_0513,
        HOPPER,
        "has_code",
        "fits SM90/SM100 shared memory; ds-plugins never changes it",
        (_src(ENVIRON, r"SGLANG_OPT_USE_TOPK_V2 = EnvBool\(True\)"),),
    ),
    _row(
        "moe",
        "MXFP4 expert MoE on Marlin (auto on SM120)",
        "marlin",
        FROM_0513,
        SM12X,
        "has_code",
        "the DeepSeek-V4 hook picks the marlin runner on SM120-family GPUs and Mxfp4MarlinMoEMethod accepts "
        "SM120 (0.5.13 keeps the checkpoint layout for a Triton dequant kernel there)",
        (_src(MARLIN_MOE, r"is_sm120"),),
    ),
    _row(
        "moe",
        "MXFP4 expert MoE (SGLang's default runner)",
        "engine_triton",
        FROM_0513,
        HOPPER,
        "unverified",
        "SGLang's own MoE selection on SM90/SM100; ds-plugins never changes it",
        (Evidence("reading", "sglang", MARLIN_MOE, "is_sm90"),),
    ),
    _row(
        "sampling",
        "sampling (top-k/top-p, FlashInfer sampling kernels or torch)",
        "flashinfer",
        ">=0.5.12",
        ALL,
        "unverified",
        "V4 samples with SGLang's generic sampler; FlashInfer's sampling kernels are JIT-compiled per "
        "architecture; not run on a GPU here",
        (Evidence("reading", "sglang", "sglang/srt/layers/sampler.py", "top_k_top_p"),),
    ),
    _row(
        "cudagraph",
        "CUDA-graph capture of decode (SGLang's CudaGraphRunner)",
        "engine_c",
        FROM_0513,
        SM12X,
        "unverified",
        "captures the decode rows' kernels at each batch size; SGLang's SM120 Triton/FlashInfer kernels and "
        "ds-plugins' routed kernel are graph-safe (no host sync); not run on a GPU here",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/cuda_graph_runner.py", "capture"),),
    ),
    _row(
        "cudagraph",
        "CUDA-graph capture of decode",
        "engine_c",
        ">=0.5.12",
        HOPPER,
        "unverified",
        "SGLang's own capture; ds-plugins never changes it",
        (Evidence("reading", "sglang", "sglang/srt/model_executor/cuda_graph_runner.py", "capture"),),
    ),
    _row(
        "collective",
        "custom all-reduce (CUDA IPC between GPUs) or NCCL",
        "nccl",
        ">=0.5.12",
        ALL,
        "unverified",
        "SGLang's custom all-reduce needs P2P/IPC, which PCIe workstation boxes may not give (known failure "
        "custom_all_reduce_p2p: --disable-custom-all-reduce); NCCL otherwise",
        (
            Evidence(
                "reading",
                "sglang",
                "sglang/srt/distributed/device_communicators/custom_all_reduce.py",
                "CustomAllreduce",
            ),
        ),
    ),
)
