"""ds_plugins.kernels exports each kernel under its upstream name, with the upstream signature.

The expected parameter lists are FlashMLA's `flash_mla/flash_mla_interface.py` and DeepGEMM's
pybind definitions (`csrc/apis/attention.hpp`, `hyperconnection.hpp`, `einsum.hpp`), as read
from those projects; an adapter routes upstream calls here unchanged, so they must agree."""

import inspect
import subprocess
import sys

import pytest

import ds_plugins.kernels as kernels

UPSTREAM = {
    "flash_mla_sparse_fwd": ["q", "kv", "indices", "sm_scale", "d_v=512", "attn_sink=None", "topk_length=None"],
    "flash_mla_with_kvcache": [
        "q",
        "k_cache",
        "block_table",
        "cache_seqlens",
        "head_dim_v",
        "tile_scheduler_metadata",
        "num_splits=None",
        "softmax_scale=None",
        "causal=False",
        "is_fp8_kvcache=False",
        "indices=None",
        "attn_sink=None",
        "extra_k_cache=None",
        "extra_indices_in_kvcache=None",
        "topk_length=None",
        "extra_topk_length=None",
    ],
    "get_mla_metadata": ["*args", "**kwargs"],
    "fp8_mqa_logits": [
        "q",
        "kv",
        "weights",
        "cu_seq_len_k_start",
        "cu_seq_len_k_end",
        "clean_logits=True",
        "max_seqlen_k=0",
    ],
    "fp8_fp4_mqa_logits": [
        "q",
        "kv",
        "weights",
        "cu_seq_len_k_start",
        "cu_seq_len_k_end",
        "clean_logits=True",
        "max_seqlen_k=0",
        "logits_dtype=torch.float32",
    ],
    "get_paged_mqa_logits_metadata": ["context_lens", "block_kv", "num_sms", "indices=None"],
    "fp8_paged_mqa_logits": [
        "q",
        "kv_cache",
        "weights",
        "context_lens",
        "block_table",
        "schedule_meta",
        "max_context_len",
        "clean_logits=False",
        "indices=None",
    ],
    "fp8_fp4_paged_mqa_logits": [
        "q",
        "kv_cache",
        "weights",
        "context_lens",
        "block_table",
        "schedule_meta",
        "max_context_len",
        "clean_logits=False",
        "logits_dtype=torch.float32",
        "indices=None",
    ],
    "tf32_hc_prenorm_gemm": ["a", "b", "d", "sqr_sum", "num_splits=None"],
    "fp8_einsum": ["expr", "a", "b", "d", "c=None", "recipe=(1, 128, 128)"],
}


def _params(fn) -> list[str]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        elif p.default is inspect.Parameter.empty:
            out.append(p.name)
        else:
            default = "torch.float32" if repr(p.default) == "torch.float32" else repr(p.default)
            out.append(f"{p.name}={default}")
    return out


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_names_and_signatures(name):
    assert _params(getattr(kernels, name)) == UPSTREAM[name]


def test_every_export_is_listed_and_resolves():
    assert set(kernels.__all__) == set(UPSTREAM) | {"fp8_mqa_topk", "fp8_paged_mqa_topk"}
    for name in kernels.__all__:
        assert callable(getattr(kernels, name))
    with pytest.raises(AttributeError, match="no_such_kernel"):
        kernels.no_such_kernel  # noqa: B018


def test_importing_the_package_imports_no_kernel_module():
    code = (
        "import sys, ds_plugins.kernels; "
        "print(sorted(m for m in sys.modules if m.startswith(('ds_plugins.kernels.', 'triton'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
