"""The Ascend path: the torch_npu operators vllm-ascend uses for the same schemes (research §1.5-1.9).

Cannot run on a machine without CANN; the tests marked `npu` exercise it on Ascend, and the CPU
suite checks the same formulas through `arith` and the Triton kernels. Weights are given in the
layout the portable paths use ([N, K] int8, W4A8 packed [N/2, K]); the NPU ops take [K, N].
"""

from __future__ import annotations

import torch

from . import arith


def _npu():
    import torch_npu  # noqa: F401  (imported only on Ascend)

    return torch_npu


def linear_dynamic(x, weight, weight_scale, bias=None):
    tn = _npu()
    shape = x.shape
    xq, sx = tn.npu_dynamic_quant(x.reshape(-1, shape[-1]))
    y = tn.npu_quant_matmul(
        xq, weight.t(), weight_scale.reshape(-1).float(), pertoken_scale=sx.reshape(-1), bias=None, output_dtype=x.dtype
    )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1)


def linear_static(x, weight, input_scale, input_offset, quant_bias, deq_scale):
    tn = _npu()
    shape = x.shape
    xq = tn.npu_quantize(
        x.reshape(-1, shape[-1]), 1.0 / input_scale.float(), input_offset.float(), torch.qint8, -1, False
    )
    y = tn.npu_quant_matmul(xq, weight.t(), deq_scale.float(), bias=quant_bias, output_dtype=x.dtype)
    return y.reshape(*shape[:-1], -1)


def moe(x, topk_weights, topk_ids, w13, s13, w2, s2, *, packed_int4, limit, expert_map=None):
    """Grouped matmuls per expert group via npu_grouped_matmul with per-token scales; int4 weights are
    unpacked to int8 here (the packed NZ layout of vllm-ascend's fused kernels is not reproduced)."""
    tn = _npu()
    E = w13.shape[0]
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    ids = torch.where(ids < 0, torch.full_like(ids, E), ids)
    sorted_ids, order = torch.sort(ids, stable=True)
    tok = order // k
    counts = torch.bincount(sorted_ids, minlength=E + 1)[:E]
    group_list = torch.cumsum(counts, 0)
    a13 = arith.unpack_int4(w13) if packed_int4 else w13
    a2 = arith.unpack_int4(w2) if packed_int4 else w2
    xq, sx = tn.npu_dynamic_quant(x)
    rows = xq[tok]
    h = tn.npu_grouped_matmul(
        [rows],
        [a13.transpose(1, 2)],
        scale=[s13.float()],
        per_token_scale=[sx[tok]],
        group_list=group_list,
        split_item=2,
        group_type=0,
        output_dtype=torch.float32,
    )[0]
    aq, sa = tn.npu_dynamic_quant(arith.swiglu(h, limit))
    y = tn.npu_grouped_matmul(
        [aq],
        [a2.transpose(1, 2)],
        scale=[s2.float()],
        per_token_scale=[sa],
        group_list=group_list,
        split_item=2,
        group_type=0,
        output_dtype=torch.float32,
    )[0]
    weights = topk_weights.reshape(-1)[order].float() * (sorted_ids < E)
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y * weights.unsqueeze(-1))
    return out.to(x.dtype)
