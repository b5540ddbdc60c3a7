"""Known upstream failures that DeepSeek-V4 users meet on these machines, as data.

One `KnownFailure` per failure: the text the engine or a kernel library prints (regexes), where it
happens (`Where`: engine, version range in landscape.py's ">=A" / ">=A,<B" form, GPU classes, and
library versions when one matters), what ds-plugins does about it (`handled_by`: the policy decision
and the values of it that take the failing path away, or None), what to do otherwise, the upstream
issue or PR, what retires the record, and the evidence for the text.

`Evidence` says where the text really comes from. `dist` names the PyPI distribution whose official
wheel holds the literal, `member` the file in it (a glob), `present` / `absent` the versions whose
wheel does / does not contain it; tests/contract/test_known_failures.py reads those wheels and checks
every such claim (a `.py` member: the wheel's source; a compiled member: the string table of the
binary). An entry with `dist=""` was read in an upstream repository only (`member` is
"owner/repo@commit:path"): reading, the weakest evidence.

`ds-plugins explain` matches pasted errors and whole logs against these records, and
docs/known-failures.md (the README's "If you see ..." table) is rendered from them
(ds_plugins/explain.py). Importing this module is cheap: no torch, no engine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from . import landscape

# GPU classes, named as the compat table names them (ci/compat.py GPUS).
SM12X = ("SM120", "SM121")
ANY_GPU: tuple[str, ...] = ()


def gpu_class(capability: tuple[int, int] | None) -> str | None:
    """The GPU class of a CUDA compute capability: SM90, SM100 (the 10.x family), SM120, SM121, ..."""
    if capability is None:
        return None
    major, minor = capability
    return "SM100" if major == 10 else f"SM{major}{minor}"


class Where(NamedTuple):
    """Where a failure happens: one engine, a version range, GPU classes, optional library versions."""

    engine: str  # "vllm" | "sglang"
    versions: str  # ">=A" or ">=A,<B" (landscape.in_range)
    devices: tuple[str, ...] = SM12X  # GPU classes (gpu_class); empty: any CUDA GPU
    # (probe library name, version range) that must hold too; checked when the probe knows the version
    libraries: tuple[tuple[str, str], ...] = ()
    note: str = ""  # what is particular to this engine and range

    def covers(self, engine: str, version: str) -> bool:
        return engine == self.engine and landscape.in_range(
            self.versions, version, what=f"known failure {self.versions}"
        )

    def on(self, gpu: str | None) -> bool:
        return gpu is not None and (not self.devices or gpu in self.devices)


class Evidence(NamedTuple):
    """Where the text comes from, and which wheels were read for it."""

    text: str  # an exact literal of the message (what the pattern keys on)
    dist: str  # PyPI distribution whose wheel holds it; "" when read in a repository only
    member: str  # file in the wheel (glob), or "owner/repo@commit:path" for reading
    present: tuple[str, ...] = ()  # versions of `dist` whose wheel contains `text` in `member`
    absent: tuple[str, ...] = ()  # versions whose wheel does not
    origin: str = ""  # where upstream raises it (source file, function)

    @property
    def level(self) -> str:
        if not self.dist:
            return "reading"
        return "wheel source" if self.member.endswith(".py") else "wheel binary"


class KnownFailure(NamedTuple):
    id: str
    title: str  # what it is, one line
    example: str  # the line as the engine prints it (docs, tests)
    patterns: tuple[str, ...]  # regexes, each searched line by line
    where: tuple[Where, ...]
    handled_by: tuple[str, tuple[str, ...]] | None  # (decision id, values that avoid the failure), or None
    remedy: str  # what to do where ds-plugins does not handle it
    upstream: tuple[str, ...]  # "owner/repo#N" issues and PRs
    retire: str  # when this record can go
    evidence: tuple[Evidence, ...]

    def search(self, line: str) -> re.Match | None:
        for rx in _compiled(self):
            m = rx.search(line)
            if m:
                return m
        return None


_COMPILED: dict[str, tuple[re.Pattern, ...]] = {}


def _compiled(record: KnownFailure) -> tuple[re.Pattern, ...]:
    if record.id not in _COMPILED:
        _COMPILED[record.id] = tuple(re.compile(p) for p in record.patterns)
    return _COMPILED[record.id]


_DG_LAYOUT = "DeepGEMM csrc/apis/layout.hpp, transform_sf_into_required_layout()"
_DEEPGEMM_REMEDY = (
    "ds-plugins keeps DeepGEMM off where the installed DeepGEMM has no SM12x kernels (deepgemm=off). If "
    "`ds-plugins doctor` says deepgemm=upstream and you still see this, that DeepGEMM lacks SM12x kernels "
    "after all: set DS_PLUGINS_DEEPGEMM=off. Without ds-plugins: VLLM_USE_DEEP_GEMM=0 (vLLM) or "
    "SGLANG_ENABLE_JIT_DEEPGEMM=0 (SGLang), or install a DeepGEMM with SM12x kernels."
)
_DEEPGEMM_RETIRE = (
    "no supported engine version pairs a DeepGEMM gate that is on for SM12x with a DeepGEMM without SM12x "
    "kernels (docs/compat.md: the DeepGEMM gate and SM12x-kernel columns)"
)

RECORDS: tuple[KnownFailure, ...] = (
    KnownFailure(
        id="deepgemm_unknown_sf",
        title="DeepGEMM without SM12x kernels asked for an SM12x scale-factor layout at weight load",
        example="RuntimeError: Assertion error (csrc/apis/layout.hpp:60): Unknown SF transformation",
        patterns=(r"Unknown SF transformation",),
        where=(
            Where(
                "vllm",
                ">=0.24.0",
                note="vLLM's gate enables DeepGEMM on SM12x from 0.24.0; the FP8 "
                "weight post-processing then transforms scales with it",
            ),
            Where(
                "sglang",
                ">=0.5.12",
                note="SGLang's DeepSeek-V4 loader transforms the wo_a scales with "
                "DeepGEMM (SGLANG_OPT_FP8_WO_A_GEMM, on by default)",
            ),
        ),
        handled_by=("deepgemm", ("off",)),
        remedy=_DEEPGEMM_REMEDY,
        upstream=(
            "deepseek-ai/DeepGEMM#372",
            "vllm-project/vllm#47436",
            "vllm-project/vllm#52035",
            "sgl-project/sglang#34827",
        ),
        retire=_DEEPGEMM_RETIRE,
        evidence=(
            Evidence(
                "Unknown SF transformation",
                "vllm",
                "vllm/third_party/deep_gemm/_C*.so",
                present=("0.20.0", "0.24.0", "0.27.0", "0.28.0", "0.33.0"),
                origin=_DG_LAYOUT,
            ),
            Evidence(
                "Unknown SF transformation",
                "sgl-deep-gemm",
                "deep_gemm/_C*.so",
                present=("0.1.0", "0.2.0"),
                origin=_DG_LAYOUT,
            ),
            Evidence(
                'DG_HOST_UNREACHABLE("Unknown SF transformation")',
                "",
                "deepseek-ai/DeepGEMM@54e2261:csrc/apis/layout.hpp",
                origin="the fall-through of transform_sf_into_required_layout(): main handles arch 9 "
                "and 10 only, nv_dev adds 12",
            ),
        ),
    ),
    KnownFailure(
        id="deepgemm_unknown_recipe",
        title="DeepGEMM without SM12x kernels has no default FP8 recipe for SM12x",
        example="RuntimeError: Assertion error (csrc/utils/layout.hpp:76): Unknown recipe",
        patterns=(r"Unknown recipe\b",),
        where=(
            Where(
                "vllm",
                ">=0.24.0",
                note="typically after VLLM_USE_DEEP_GEMM_E8M0=0 got weight loading past "
                "'Unknown SF transformation': the first fp8_gemm_nt call fails",
            ),
            Where("sglang", ">=0.5.12"),
        ),
        handled_by=("deepgemm", ("off",)),
        remedy=_DEEPGEMM_REMEDY,
        upstream=("vllm-project/vllm#41063", "vllm-project/vllm#52035"),
        retire=_DEEPGEMM_RETIRE,
        evidence=(
            Evidence(
                "Unknown recipe",
                "vllm",
                "vllm/third_party/deep_gemm/_C*.so",
                present=("0.20.0", "0.24.0", "0.27.0", "0.28.0", "0.33.0"),
                origin="DeepGEMM csrc/utils/layout.hpp, get_default_recipe()",
            ),
            Evidence(
                "Unknown recipe",
                "sgl-deep-gemm",
                "deep_gemm/_C*.so",
                present=("0.1.0", "0.2.0"),
                origin="DeepGEMM csrc/utils/layout.hpp, get_default_recipe()",
            ),
            Evidence(
                'DG_HOST_UNREACHABLE("Unknown recipe")',
                "",
                "deepseek-ai/DeepGEMM@54e2261:csrc/utils/layout.hpp",
                origin="get_default_recipe(): main returns a recipe for arch 9 and 10 only",
            ),
        ),
    ),
    KnownFailure(
        id="deepgemm_ue8m0_cast_disabled",
        title="DeepGEMM's SM100/SM12x scale layout needs UE8M0 scales, but the caller disabled the cast",
        example="RuntimeError: Assertion error (csrc/apis/layout.hpp:49): not disable_ue8m0_cast",
        patterns=(r"not disable_ue8m0_cast",),
        where=(
            Where(
                "vllm",
                ">=0.24.0",
                note="seen with VLLM_USE_DEEP_GEMM_E8M0=0 and a DeepGEMM that has SM12x "
                "kernels: the W4A8 MoE scale packing requires UE8M0",
            ),
        ),
        handled_by=("deepgemm", ("off",)),
        remedy=(
            "Unset VLLM_USE_DEEP_GEMM_E8M0 (or set it to 1): DeepGEMM's SM100/SM12x scale layouts need "
            "UE8M0 scales. If you set it to get past 'Unknown SF transformation', let ds-plugins keep "
            "DeepGEMM off instead (DS_PLUGINS_DEEPGEMM=off)."
        ),
        upstream=("vllm-project/vllm#52035",),
        retire=(
            "VLLM_USE_DEEP_GEMM_E8M0=0 is no longer a workaround anyone needs (no stock DeepGEMM without SM12x kernels)"
        ),
        evidence=(
            Evidence(
                "not disable_ue8m0_cast",
                "vllm",
                "vllm/third_party/deep_gemm/_C*.so",
                present=("0.20.0", "0.24.0", "0.27.0", "0.28.0", "0.33.0"),
                origin=_DG_LAYOUT + ": DG_HOST_ASSERT",
            ),
            Evidence(
                "DG_HOST_ASSERT(not disable_ue8m0_cast)",
                "",
                "deepseek-ai/DeepGEMM@a6b593d:csrc/apis/layout.hpp",
                origin="nv_dev: the FP32-scale branch for arch 10 or 12 asserts the UE8M0 cast is on",
            ),
        ),
    ),
    KnownFailure(
        id="dsv4_kv_cache_not_fp8",
        title="DeepSeek-V4's KV cache layout needs an fp8 KV cache; --kv-cache-dtype was left at auto (or not fp8)",
        example="AssertionError: DeepseekV4 fp8_ds_mla layout only supports fp8 kv-cache, got auto",
        patterns=(
            r"DeepseekV4 (?:fp8_ds_mla layout|FlashMLA fp8 layout) only supports fp8 kv-cache, got \w+",
            r"DeepseekV4 only supports fp8 kv-cache format for now, got \w+",
        ),
        where=(
            Where(
                "vllm",
                ">=0.20.0,<0.23.0",
                ANY_GPU,
                note="the assertion is unconditional there: every GPU needs --kv-cache-dtype fp8",
            ),
            Where(
                "vllm",
                ">=0.23.0,<0.30.0",
                ("SM90",) + SM12X,
                note="the FlashMLA attention class (SM90) and the FlashInfer SM120 one keep the fp8_ds_mla "
                "layout (their use_fp8_ds_mla_layout class attribute; SM100's FlashInfer class stores plain "
                "rows), and 'auto' is not resolved to fp8 before 0.30.0; vllm#47174 reports it on SM120",
            ),
        ),
        handled_by=("kv_cache_dtype", ("fp8",)),
        remedy=(
            "On SM12x ds-plugins turns `auto` (only `auto`) into fp8 where it decides kv_cache_dtype=fp8. "
            "Elsewhere (SM90), or with DS_PLUGINS_KV_CACHE_DTYPE=upstream: add `--kv-cache-dtype fp8`: "
            "DeepSeek-V4 keeps its KV cache as fp8_ds_mla (584 bytes per "
            "token) and has no bf16 layout on this path. vLLM 0.30.0 resolves `auto` to fp8 itself."
        ),
        upstream=("vllm-project/vllm#47174", "vllm-project/vllm#54233", "vllm-project/vllm#55134"),
        retire="the oldest supported vLLM is 0.30.0 or newer (it resolves `auto` to fp8_ds_mla)",
        evidence=(
            Evidence(
                "DeepseekV4 only supports fp8 kv-cache format for now, ",
                "vllm",
                "vllm/model_executor/layers/deepseek_v4_attention.py",
                present=("0.20.0", "0.20.2"),
                origin="DeepseekV4 attention __init__: assert kv_cache_dtype.startswith('fp8')",
            ),
            Evidence(
                "DeepseekV4 only supports fp8 kv-cache format for now, ",
                "vllm",
                "vllm/models/deepseek_v4/attention.py",
                present=("0.22.1",),
                absent=("0.23.0",),
                origin="DeepseekV4 attention __init__: assert kv_cache_dtype.startswith('fp8')",
            ),
            Evidence(
                "DeepseekV4 FlashMLA fp8 layout only supports fp8 kv-cache, ",
                "vllm",
                "vllm/models/deepseek_v4/attention.py",
                present=("0.23.0",),
                absent=("0.22.1", "0.24.0"),
                origin="_resolve_dsv4_kv_cache_dtype(): assert on the FlashMLA fp8 layout",
            ),
            Evidence(
                "DeepseekV4 fp8_ds_mla layout only supports fp8 kv-cache, ",
                "vllm",
                "vllm/models/deepseek_v4/attention.py",
                present=("0.24.0", "0.25.0", "0.27.0", "0.28.0"),
                absent=("0.23.0", "0.30.0"),
                origin="_resolve_dsv4_kv_cache_dtype(): assert kv_cache_dtype.startswith('fp8') (0.30.0 "
                "words the same message over two literals, as a ValueError naming --kv-cache-dtype fp8)",
            ),
            Evidence(
                'if kv_cache_dtype == "auto":',
                "vllm",
                "vllm/models/deepseek_v4/attention.py",
                present=("0.30.0", "0.33.0"),
                absent=("0.24.0", "0.27.0", "0.28.0"),
                origin="_resolve_dsv4_kv_cache_dtype() from 0.30.0: auto becomes fp8 (a ValueError "
                "remains for other non-fp8 values)",
            ),
        ),
    ),
    KnownFailure(
        id="vllm_persistent_topk_smem",
        title=(
            "vLLM's persistent top-k for the sparse indexer does not fit the SM12x shared memory at this context length"
        ),
        example=(
            "RuntimeError: launch_persistent_topk, /workspace/csrc/libtorch_stable/topk.cu:138, persistent_topk "
            "would oversubscribe and the FilteredTopK fallback requires >=128KB smem per block (have 101376)."
        ),
        patterns=(r"FilteredTopK fallback requires", r"persistent_topk would oversubscribe"),
        where=(
            Where(
                "vllm",
                ">=0.20.2,<0.30.0",
                note="its grid grows with the longest context (--max-model-len); a 48-SM DGX Spark (SM121) meets "
                "it first, and SM12x offers 99 KB of shared memory per block, not 128",
            ),
        ),
        handled_by=None,
        remedy=(
            "Lower --max-model-len (one DGX Spark report found 524288 fits), or upgrade to vLLM 0.30.0 or newer, "
            "whose top-k no longer raises this (vllm-project/vllm#54110 added a fallback for GPUs with less "
            "shared memory; which release took it first was not checked)."
        ),
        upstream=("vllm-project/vllm#54110",),
        retire="the oldest supported vLLM is 0.30.0 or newer (its wheel no longer has the message)",
        evidence=(
            Evidence(
                "FilteredTopK fallback requires",
                "vllm",
                "vllm/_C*.so",
                present=("0.20.2", "0.24.0", "0.28.0"),
                absent=("0.20.0", "0.30.0", "0.33.0"),
                origin="vLLM csrc/libtorch_stable/topk.cu, launch_persistent_topk (TORCH_CHECK); in "
                "vllm/_C.abi3.so up to 0.22, vllm/_C_stable_libtorch.abi3.so from 0.23",
            ),
        ),
    ),
    KnownFailure(
        id="flashmla_sparse_sm12x",
        title="FlashMLA's sparse attention kernels exist for SM90a and SM100f only",
        example=("RuntimeError: Sparse Attention Forward Kernel is only supported on SM90a and SM100f architectures."),
        patterns=(
            r"Sparse Attention Forward Kernel is only supported on SM90a and SM100f",
            r"Unsupported architecture for sparse decode fwd",
        ),
        where=(
            Where(
                "vllm",
                ">=0.20.0",
                note="FlashMLA is vLLM's only V4 attention before 0.24.0; from 0.24.0 "
                "SM12x uses FlashInfer's SM120 sparse MLA when FlashInfer has it",
            ),
            Where("sglang", ">=0.5.12,<0.5.13", note="SGLang 0.5.12 has no SM12x attention path for V4"),
            Where(
                "sglang",
                ">=0.5.13,<0.5.19",
                note="SGLang's V4 prefill goes to FlashMLA's sparse kernel for large prefills (over 11673 "
                "query tokens) and, from 0.5.15, by default (SGLANG_OPT_FLASHMLA_SPARSE_PREFILL; "
                "sglang#31578); 0.5.19 skips it on SM120. On 0.5.15-0.5.18 ds-plugins decides sparse_mla=triton "
                "and sets SGLANG_OPT_FLASHMLA_SPARSE_PREFILL=0 itself; on 0.5.13-0.5.14 keep "
                "--chunked-prefill-size below 11673, or upgrade to SGLang 0.5.19+",
            ),
        ),
        handled_by=("sparse_mla", ("triton",)),
        remedy=(
            "ds-plugins routes V4's sparse attention to its Triton kernels where it decides "
            "sparse_mla=triton. Where it decides upstream, the engine's own SM12x path should serve: check "
            "`ds-plugins doctor`; on SGLang see the note for your version."
        ),
        upstream=("sgl-project/sglang#31578", "vllm-project/vllm#40821"),
        retire="no supported engine version sends V4 attention on SM12x to FlashMLA's sparse kernels",
        evidence=(
            Evidence(
                "Sparse Attention Forward Kernel is only supported on SM90a and SM100f",
                "vllm",
                "vllm/_flashmla_C.abi3.so",
                present=("0.20.0", "0.24.0", "0.28.0", "0.33.0"),
                origin="FlashMLA csrc/api/sparse_fwd.h, sparse_attn_prefill_interface (TORCH_CHECK)",
            ),
            Evidence(
                "Unsupported architecture for sparse decode fwd",
                "vllm",
                "vllm/_flashmla_C.abi3.so",
                present=("0.20.0", "0.24.0", "0.28.0", "0.33.0"),
                origin="FlashMLA csrc/api/sparse_decode.h",
            ),
            Evidence(
                "Sparse Attention Forward Kernel is only supported on SM90a and SM100f",
                "sglang-kernel",
                "sgl_kernel/flashmla_ops*.so",
                present=("0.4.2.post2", "0.4.4"),
                origin="FlashMLA in sgl-kernel, as SGLang 0.5.12 and 0.5.15 pin it (sgl_kernel.flash_mla)",
            ),
            Evidence(
                "Sparse Attention Forward Kernel is only supported on SM90a and SM100f",
                "sgl-flash-mla",
                "flash_mla/_C*.so",
                present=("1.0.0",),
                origin="FlashMLA as SGLang 0.5.23 pins it",
            ),
            Evidence(
                "not get_platform().is_sm120",
                "sglang",
                "sglang/srt/layers/attention/deepseek_v4_backend.py",
                present=("0.5.19", "0.5.20", "0.5.21", "0.5.23"),
                absent=("0.5.13", "0.5.15"),
                origin="DeepseekV4 attention backend: the sparse-prefill condition excludes SM120 from 0.5.19",
            ),
            Evidence(
                '"Sparse Attention Forward Kernel is only supported on SM90a and SM100f architectures."',
                "",
                "deepseek-ai/FlashMLA@9241ae3:csrc/api/sparse_fwd.h",
                origin="TORCH_CHECK(is_sm90a || is_sm100f, ...)",
            ),
        ),
    ),
    KnownFailure(
        id="flashinfer_decode_envelope_not_iterable",
        title="SGLang iterates FlashInfer's SM120 decode table, which FlashInfer 0.7.0 made a non-iterable predicate",
        example="TypeError: '_DecodeDispatchEnvelope' object is not iterable",
        patterns=(r"'_DecodeDispatchEnvelope' object is not iterable",),
        where=(
            Where(
                "sglang",
                ">=0.5.20",
                libraries=(("flashinfer", ">=0.7.0,<0.7.1"),),
                note="SGLang 0.5.20+ reads the head counts of FlashInfer's SM120 V4 decode by iterating "
                "_DECODE_DSV4_DISPATCH; FlashInfer 0.7.0 and 0.7.0.post1 define no __iter__ (0.7.1 does)",
            ),
        ),
        handled_by=None,
        remedy=(
            "Install the FlashInfer your SGLang pins (0.6.18 for SGLang 0.5.20-0.5.21, 0.7.2 for 0.5.23), "
            "or any FlashInfer 0.7.1+, whose decode table is iterable again."
        ),
        upstream=("flashinfer-ai/flashinfer#4802",),
        retire="FlashInfer 0.7.0 / 0.7.0.post1 are no longer installable beside a supported SGLang",
        evidence=(
            Evidence(
                "class _DecodeDispatchEnvelope",
                "flashinfer-python",
                "flashinfer/mla/_sparse_mla_sm120_plan.py",
                present=("0.7.0", "0.7.0.post1"),
                absent=("0.6.18",),
                origin="FlashInfer 0.7.0 turned _DECODE_DSV4_DISPATCH from a frozenset into this predicate",
            ),
            Evidence(
                "def __iter__",
                "flashinfer-python",
                "flashinfer/mla/_sparse_mla_sm120_plan.py",
                absent=("0.7.0", "0.7.0.post1"),
                origin="no __iter__ in 0.7.0's envelope",
            ),
            Evidence(
                "def __iter__",
                "flashinfer-python",
                "flashinfer/mla/_sparse_mla_sm120/_policy.py",
                present=("0.7.1", "0.7.2"),
                origin="0.7.1 moved the envelope here and made it iterable",
            ),
            Evidence(
                "heads for heads, _ in _DECODE_DSV4_DISPATCH",
                "sglang",
                "sglang/kernels/ops/attention/flash_mla_sm120.py",
                present=("0.5.20", "0.5.21", "0.5.23"),
                absent=("0.5.19",),
                origin="_flashinfer_dsv4_decode_capabilities()",
            ),
        ),
    ),
    KnownFailure(
        id="dspark_topk192_sm120",
        title="DeepSeek-V4's DSpark draft asks FlashInfer's SM120 decode for top-k 192, which that FlashInfer lacks",
        example=(
            "tvm.error.InternalError: Check failed: num_tokens > 64 (5 vs. 64) : Decode (num_tokens <= 64) "
            "must go through sparse_mla_sm120_decode_dsv3_2 or sparse_mla_sm120_decode_dsv4; got num_tokens=5"
        ),
        patterns=(
            r"Decode \(num_tokens <= 64\) must go through sparse_mla_sm120_decode",
            r"Unsupported sparse-MLA prefill configuration: model=DSV4 .*topk=192",
        ),
        where=(
            Where(
                "sglang",
                ">=0.5.15",
                libraries=(("flashinfer", ">=0.6.16,<0.6.18"),),
                note="SGLang pads the DSpark draft's 128-token window plus its draft tokens to top-k 192; "
                "FlashInfer's SM120 V4 decode table has (heads, 192) from 0.6.18 (0.5.19+ pin it), not "
                "in 0.6.16, so the call falls through to the prefill kernel, which refuses <= 64 tokens",
            ),
        ),
        handled_by=None,
        remedy=(
            "Install the FlashInfer your SGLang pins (0.6.18+), or set SGLANG_SM120_FLASHMLA_BACKEND=triton "
            "(SGLang's own Triton SM120 attention: every V4 attention call goes there, slower on the hot path)."
        ),
        upstream=("sgl-project/sglang#33943", "sgl-project/sglang#33985", "sgl-project/sglang#33407"),
        retire="no FlashInfer without (heads, 192) in its SM120 V4 decode table installs beside a supported SGLang",
        evidence=(
            Evidence(
                "(32, 192)",
                "flashinfer-python",
                "flashinfer/mla/_sparse_mla_sm120.py",
                present=("0.6.18",),
                absent=("0.6.16.post3",),
                origin="_DECODE_DSV4_DISPATCH, the (heads, top-k) pairs FlashInfer's SM120 V4 decode serves",
            ),
            Evidence(
                "must go through sparse_mla_sm120_decode_dsv3_2 ",
                "",
                "flashinfer-ai/flashinfer@v0.6.18:csrc/sparse_mla_sm120.cu",
                origin="read in the flashinfer-python 0.6.18 wheel (flashinfer/data/csrc/sparse_mla_sm120.cu): "
                "the prefill orchestrator's TVM_FFI check on num_tokens",
            ),
            Evidence(
                "_sm120_default_backend = envs.SGLANG_SM120_FLASHMLA_BACKEND.get()",
                "sglang",
                "sglang/kernels/ops/attention/flash_mla_sm120.py",
                present=("0.5.19", "0.5.21", "0.5.23"),
                origin="the switch the remedy names, read once at import",
            ),
        ),
    ),
    KnownFailure(
        id="custom_all_reduce_p2p",
        title=(
            "The engine's custom all-reduce needs CUDA peer access / IPC between the GPUs, which this PCIe "
            "box does not give"
        ),
        example="Failed: Cuda error /workspace/csrc/custom_all_reduce.cuh:455 'invalid argument'",
        patterns=(
            r"Failed: Cuda error \S*custom_all_reduce\.cuh:\d+",
            r"CUDART error: peer access is not supported between these two devices",
        ),
        where=(
            Where(
                "vllm",
                ">=0.20.0",
                note="vLLM enables its custom all-reduce on two PCIe-only GPUs when the "
                "P2P check passes; ds-plugins sets --disable-custom-all-reduce (tensor "
                "parallel > 1) where NVML finds no NVLink between the visible GPUs",
            ),
            Where("sglang", ">=0.5.12", note="ds-plugins leaves SGLang's custom all-reduce alone"),
        ),
        handled_by=("custom_all_reduce", ("off",)),
        remedy=(
            "On vLLM, ds-plugins sets `--disable-custom-all-reduce` itself where it decides custom_all_reduce=off "
            "(SM120/SM121, more than one visible GPU, no NVLink between them as NVML reports it). Where it "
            "cannot read the topology (no nvidia-ml-py), on SGLang, or with DS_PLUGINS_CUSTOM_ALL_REDUCE=upstream: "
            "add `--disable-custom-all-reduce` (vLLM and SGLang both take it), or set "
            "DS_PLUGINS_CUSTOM_ALL_REDUCE=off (vLLM): tensor-parallel all-reduce then goes through NCCL."
        ),
        upstream=("vllm-project/vllm#48466", "vllm-project/vllm#47266", "sgl-project/sglang#4814"),
        retire="the engines stop enabling custom all-reduce where CUDA IPC between the GPUs fails",
        evidence=(
            Evidence(
                "Failed: Cuda error %s:%d '%s'",
                "vllm",
                "vllm/_C*.so",
                present=("0.20.0", "0.24.0", "0.28.0", "0.33.0"),
                origin="vLLM csrc/custom_all_reduce.cuh, CUDACHECK (printf, then exit)",
            ),
            Evidence(
                "custom_all_reduce.cuh",
                "vllm",
                "vllm/_C*.so",
                present=("0.20.0", "0.24.0", "0.28.0", "0.33.0"),
                origin="the file name CUDACHECK prints",
            ),
            Evidence(
                "CUDART error: ",
                "vllm",
                "vllm/distributed/device_communicators/cuda_wrapper.py",
                present=("0.20.0", "0.24.0", "0.28.0", "0.33.0"),
                origin="CudaRTLibrary.CUDART_CHECK (custom all-reduce's IPC calls)",
            ),
            Evidence(
                "CUDART error: ",
                "sglang",
                "sglang/srt/distributed/device_communicators/cuda_wrapper.py",
                present=("0.5.12", "0.5.23"),
                origin="CudaRTLibrary.CUDART_CHECK",
            ),
        ),
    ),
    KnownFailure(
        id="deepgemm_unsupported_arch",
        title="A DeepGEMM kernel V4 calls (mHC prenorm, indexer logits, o_proj einsum) has no SM12x version here",
        example="RuntimeError: Assertion error (csrc/apis/hyperconnection.hpp:56): Unsupported architecture",
        patterns=(r"(?:hyperconnection|attention|einsum)\.hpp:\d+\): Unsupported architecture",),
        where=(
            Where(
                "vllm",
                ">=0.20.0",
                note="tf32_hc_prenorm_gemm (mHC), fp8_fp4_paged_mqa_logits (indexer) and "
                "fp8_einsum (o_proj) are DeepGEMM calls",
            ),
            Where("sglang", ">=0.5.12"),
        ),
        handled_by=("indexer", ("triton",)),
        remedy=(
            "ds-plugins routes these calls to its Triton kernels where it decides indexer=triton. Where it "
            "decides upstream it took your DeepGEMM for having SM12x kernels: check `ds-plugins doctor`, "
            "set DS_PLUGINS_INDEXER=triton (vLLM), or install a DeepGEMM with SM12x kernels."
        ),
        upstream=("sgl-project/sglang#25877", "vllm-project/vllm#51959", "vllm-project/vllm#41063"),
        retire=_DEEPGEMM_RETIRE,
        evidence=(
            Evidence(
                "hyperconnection.hpp",
                "vllm",
                "vllm/third_party/deep_gemm/_C*.so",
                present=("0.20.0", "0.24.0", "0.27.0", "0.28.0", "0.33.0"),
                origin="DeepGEMM csrc/apis/hyperconnection.hpp",
            ),
            Evidence(
                "Unsupported architecture",
                "vllm",
                "vllm/third_party/deep_gemm/_C*.so",
                present=("0.20.0", "0.24.0", "0.27.0", "0.28.0", "0.33.0"),
                origin="DeepGEMM csrc/apis/{hyperconnection,attention,einsum}.hpp: DG_HOST_UNREACHABLE",
            ),
            Evidence(
                "Unsupported architecture",
                "sgl-deep-gemm",
                "deep_gemm/_C*.so",
                present=("0.1.0", "0.2.0"),
                origin="DeepGEMM csrc/apis/*.hpp: DG_HOST_UNREACHABLE",
            ),
            Evidence(
                'DG_HOST_UNREACHABLE("Unsupported architecture")',
                "",
                "deepseek-ai/DeepGEMM@54e2261:csrc/apis/hyperconnection.hpp",
                origin="tf32_hc_prenorm_gemm(): main dispatches arch 9 and 10 only",
            ),
        ),
    ),
)

BY_ID: dict[str, KnownFailure] = {r.id: r for r in RECORDS}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Match(NamedTuple):
    record: KnownFailure
    line_number: int  # 1-based, in the text searched
    line: str  # the line, without colour codes and surrounding space


def match(text: str, records: Iterable[KnownFailure] = RECORDS) -> list[Match]:
    """The known failures in `text`, each once (its first occurrence), in the order they appear."""
    records = tuple(records)
    found: dict[str, Match] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _ANSI.sub("", raw)
        for record in records:
            if record.id not in found and record.search(line):
                found[record.id] = Match(record, number, line.strip())
        if len(found) == len(records):
            break
    return sorted(found.values(), key=lambda m: m.line_number)
