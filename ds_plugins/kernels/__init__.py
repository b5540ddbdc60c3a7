"""DeepSeek-V4 kernels for GPUs where FlashMLA and DeepGEMM have none (SM120/SM121).

Each kernel is exported under the name of the upstream function it stands in for, with the
same arguments, order, defaults and return values, so an engine adapter can route an upstream
call here unchanged:

    FlashMLA  flash_mla_sparse_fwd, flash_mla_with_kvcache (sparse FP8 path), get_mla_metadata
    DeepGEMM  fp8_mqa_logits, fp8_fp4_mqa_logits, fp8_paged_mqa_logits, fp8_fp4_paged_mqa_logits,
              get_paged_mqa_logits_metadata, tf32_hc_prenorm_gemm, fp8_einsum
    ours      fp8_mqa_topk, fp8_paged_mqa_topk (indexer top-k without a [rows, context] logits tensor)

Every function also takes CPU tensors: Triton's interpreter runs the kernel when TRITON_INTERPRET=1
was set before this package was imported (the CPU test suite), the PyTorch reference
(ds_plugins.kernels.reference) runs otherwise. Importing this package is cheap; each kernel
module (and torch/triton) is imported on first use.
"""

from __future__ import annotations

import importlib

_HOME = {
    "flash_mla_sparse_fwd": "sparse_mla",
    "flash_mla_with_kvcache": "sparse_mla",
    "get_mla_metadata": "sparse_mla",
    "fp8_mqa_logits": "indexer",
    "fp8_fp4_mqa_logits": "indexer",
    "fp8_paged_mqa_logits": "indexer",
    "fp8_fp4_paged_mqa_logits": "indexer",
    "get_paged_mqa_logits_metadata": "indexer",
    "fp8_mqa_topk": "indexer",
    "fp8_paged_mqa_topk": "indexer",
    "tf32_hc_prenorm_gemm": "mhc",
    "fp8_einsum": "einsum",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_plugins.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # next access skips this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
