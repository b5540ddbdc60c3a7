"""Where each scheme runs: torch_npu ops on an Ascend NPU, the Triton kernels on CUDA (and on CPU
under TRITON_INTERPRET=1, how the tests run them), and the PyTorch arithmetic (`arith`) otherwise.

All paths compute the same formulas (arith.py); the tests hold the Triton path to `arith` exactly
up to fp32 rounding of the scale epilogue.
"""

from __future__ import annotations

import torch

from . import arith
from ...kernels._runtime import use_triton

MOE_BLOCK_M = 16


def path_for(t: torch.Tensor) -> str:
    """'npu' | 'triton' | 'torch' for tensors on t's device."""
    if t.device.type == "npu":
        return "npu"
    return "triton" if use_triton(t) else "torch"


def linear_dynamic(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8_DYNAMIC linear: x [..., K] float, weight [N, K] int8, weight_scale [N] fp32."""
    path = path_for(x)
    if path == "npu":
        from . import npu

        return npu.linear_dynamic(x, weight, weight_scale, bias)
    if path == "torch":
        return arith.w8a8_dynamic_linear(x, weight, weight_scale, bias)
    from . import triton_kernels as tk

    shape = x.shape
    xq, sx = arith.dynamic_quant(x.reshape(-1, shape[-1]))
    y = tk.int8_scaled_mm(xq, weight, weight_scale, row_scale=sx, out_dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def linear_static(
    x: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    quant_bias: torch.Tensor | None,
    deq_scale: torch.Tensor,
) -> torch.Tensor:
    """W8A8 static linear; deq_scale already decoded to fp32."""
    path = path_for(x)
    if path == "npu":
        from . import npu

        return npu.linear_static(x, weight, input_scale, input_offset, quant_bias, deq_scale)
    if path == "torch":
        return arith.w8a8_static_linear(x, weight, input_scale, input_offset, quant_bias, deq_scale)
    from . import triton_kernels as tk

    shape = x.shape
    xq = arith.static_quant(x.reshape(-1, shape[-1]), input_scale, input_offset)
    y = tk.int8_scaled_mm(xq, weight, deq_scale, col_bias=quant_bias, out_dtype=torch.float32)
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    *,
    packed_int4: bool,
    limit: float | None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts (W8A8_DYNAMIC or W4A8_DYNAMIC); see arith.moe for shapes."""
    path = path_for(x)
    if path == "npu":
        from . import npu

        return npu.moe(
            x, topk_weights, topk_ids, w13, s13, w2, s2, packed_int4=packed_int4, limit=limit, expert_map=expert_map
        )
    if path == "torch":
        return arith.moe(
            x, topk_weights, topk_ids, w13, s13, w2, s2, packed_int4=packed_int4, limit=limit, expert_map=expert_map
        )
    from . import triton_kernels as tk

    E = w13.shape[0]
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    ids = torch.where(ids < 0, torch.full_like(ids, E), ids)  # not on this rank: sorted last, never run
    sorted_ids, order = torch.sort(ids, stable=True)
    tok = order // k
    schedule = tk.moe_schedule(sorted_ids, E, MOE_BLOCK_M)
    xq, sx = arith.dynamic_quant(x)
    h = tk.grouped_int8_mm(xq[tok], sx[tok], w13, s13, schedule, packed_int4, MOE_BLOCK_M)
    aq, sa = arith.dynamic_quant(arith.swiglu(h, limit))
    y = tk.grouped_int8_mm(aq, sa, w2, s2, schedule, packed_int4, MOE_BLOCK_M)
    weights = topk_weights.reshape(-1)[order].float() * (sorted_ids < E)
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y * weights.unsqueeze(-1))
    return out.to(x.dtype)
