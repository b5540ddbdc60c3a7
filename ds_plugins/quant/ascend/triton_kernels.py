"""Portable GPU kernels for the msModelSlim schemes (CUDA; CPU under TRITON_INTERPRET=1 in tests).

- `int8_scaled_mm`: y = (a_q @ b^T + col_bias) * col_scale * row_scale, int32 accumulation.
  W8A8_DYNAMIC is row_scale = s_x, col_scale = weight_scale; W8A8 static is col_bias = quant_bias,
  col_scale = deq_scale.
- `grouped_int8_mm`: the same per expert over rows sorted by expert, with the weights either int8
  or two int4 per byte (W4A8_DYNAMIC), unpacked in the kernel: packed row j holds output channels
  2j (low nibble) and 2j+1 (high nibble), so each packed tile feeds two int8 dots whose results go
  to the even and the odd output columns. Weights stay packed in memory.

The dots here are int8 x int8 -> int32, which the interpreter computes exactly, so they do not go
through `kernels._tl.dot` (its fp32 detour is for bf16 and would not match an int32 accumulator).
The expert block schedule is built on the device (`moe_schedule`): no host sync, and a grid size that
depends only on shapes, so the path is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_mm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc)
    if HAS_COL_BIAS:
        acc += tl.load(col_bias_ptr + rn, mask=rn < N, other=0)[None, :]
    y = acc.to(tl.float32) * tl.load(col_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_ROW_SCALE:
        y = y * tl.load(row_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    col_scale: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a [M, K] int8, b [N, K] int8, col_scale [N] fp32, row_scale [M] fp32, col_bias [N] int32."""
    M, K = a.shape
    N = b.shape[0]
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return out
    col_scale = col_scale.reshape(-1).float().contiguous()
    row = row_scale.reshape(-1).float().contiguous() if row_scale is not None else col_scale
    bias = col_bias.reshape(-1).to(torch.int32).contiguous() if col_bias is not None else col_scale
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN, BK = 64, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _int8_mm_kernel[grid](
        a,
        b,
        out,
        row,
        col_scale,
        bias,
        M,
        N,
        K,
        a.stride(0),
        b.stride(0),
        out.stride(0),
        HAS_ROW_SCALE=row_scale is not None,
        HAS_COL_BIAS=col_bias is not None,
        BM=BM,
        BN=BN,
        BK=BK,
    )
    return out


@triton.jit
def _grouped_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    row_scale_ptr,
    w_scale_ptr,
    blk_expert_ptr,
    blk_start_ptr,
    blk_end_ptr,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_om,
    PACKED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(blk_end_ptr + pid)
    if start < end:
        e = tl.load(blk_expert_ptr + pid).to(tl.int64)
        rm = start + tl.arange(0, BM)
        m_ok = rm < end
        rk = tl.arange(0, BK)
        sx = tl.load(row_scale_ptr + rm, mask=m_ok, other=0.0)
        w_base = w_ptr + e * stride_we
        if PACKED:
            HALF: tl.constexpr = BN // 2
            rj = pid_n * HALF + tl.arange(0, HALF)  # packed rows: output channels 2j, 2j+1
            j_ok = rj < N // 2
            acc_lo = tl.zeros((BM, HALF), dtype=tl.int32)
            acc_hi = tl.zeros((BM, HALF), dtype=tl.int32)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                a = tl.load(
                    a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0
                )
                p = tl.load(
                    w_base + rj[None, :] * stride_wn + kk[:, None], mask=j_ok[None, :] & (kk[:, None] < K), other=0
                ).to(tl.int32)
                lo = (((p & 0xF) ^ 8) - 8).to(tl.int8)  # sign-extended low nibble
                hi = (p >> 4).to(tl.int8)  # arithmetic shift keeps the high nibble's sign
                acc_lo = tl.dot(a, lo, acc_lo)
                acc_hi = tl.dot(a, hi, acc_hi)
            n_lo = 2 * rj
            s_lo = tl.load(w_scale_ptr + e * stride_se + n_lo, mask=j_ok, other=0.0)
            s_hi = tl.load(w_scale_ptr + e * stride_se + n_lo + 1, mask=j_ok, other=0.0)
            y_lo = acc_lo.to(tl.float32) * s_lo[None, :] * sx[:, None]
            y_hi = acc_hi.to(tl.float32) * s_hi[None, :] * sx[:, None]
            mask = m_ok[:, None] & j_ok[None, :]
            tl.store(out_ptr + rm[:, None] * stride_om + n_lo[None, :], y_lo, mask=mask)
            tl.store(out_ptr + rm[:, None] * stride_om + n_lo[None, :] + 1, y_hi, mask=mask)
        else:
            rn = pid_n * BN + tl.arange(0, BN)
            n_ok = rn < N
            acc = tl.zeros((BM, BN), dtype=tl.int32)
            for k0 in range(0, K, BK):
                kk = k0 + rk
                a = tl.load(
                    a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0
                )
                w = tl.load(
                    w_base + rn[None, :] * stride_wn + kk[:, None], mask=n_ok[None, :] & (kk[:, None] < K), other=0
                )
                acc = tl.dot(a, w, acc)
            s = tl.load(w_scale_ptr + e * stride_se + rn, mask=n_ok, other=0.0)
            y = acc.to(tl.float32) * s[None, :] * sx[:, None]
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def moe_schedule(sorted_ids: torch.Tensor, num_experts: int, block_m: int):
    """Row blocks of `block_m` rows, none straddling two experts, for rows sorted by expert id
    (ids >= num_experts: dropped rows, sorted last, never scheduled). Built with device ops only;
    the number of blocks is the static bound cdiv(P, block_m) + E, unused ones are empty."""
    P = sorted_ids.numel()
    dev = sorted_ids.device
    counts = torch.bincount(sorted_ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    blocks = (counts + block_m - 1) // block_m
    cum = torch.cumsum(blocks, 0)
    nb = triton.cdiv(max(P, 1), block_m) + num_experts
    b = torch.arange(nb, device=dev)
    e = torch.searchsorted(cum, b, right=True)
    valid = e < num_experts
    e = e.clamp(max=num_experts - 1)
    local = b - (cum[e] - blocks[e])
    start = offsets[e] + local * block_m
    end = offsets[e + 1]
    start = torch.where(valid, start, torch.zeros_like(start))
    end = torch.where(valid, end, torch.zeros_like(end))
    return e.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def grouped_int8_mm(
    a: torch.Tensor,
    row_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    schedule,
    packed: bool,
    block_m: int,
) -> torch.Tensor:
    """a [P, K] int8 rows sorted by expert; w [E, N, K] int8 (or [E, N/2, K] packed int4); w_scale [E, N]
    fp32. Returns fp32 [P, N]; rows outside the schedule are 0."""
    P, K = a.shape
    E = w.shape[0]
    N = w.shape[1] * (2 if packed else 1)
    out = torch.zeros(P, N, dtype=torch.float32, device=a.device)
    if P == 0:
        return out
    blk_e, blk_s, blk_t = schedule
    w_scale = w_scale.reshape(E, N).float().contiguous()
    a, w = a.contiguous(), w.contiguous()
    BN, BK = 64, 64
    grid = (blk_e.numel(), triton.cdiv(N, BN))
    _grouped_kernel[grid](
        a,
        w,
        out,
        row_scale.float().contiguous(),
        w_scale,
        blk_e,
        blk_s,
        blk_t,
        N,
        K,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w_scale.stride(0),
        out.stride(0),
        PACKED=packed,
        BM=block_m,
        BN=BN,
        BK=BK,
    )
    return out
