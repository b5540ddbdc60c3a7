"""`tf32_hc_prenorm_gemm`: the mHC prenorm GEMM with DeepGEMM's call contract, as a Triton kernel.

    d       = a.float() @ b^T        a [M, K] bf16, b [N, K] fp32 -> [M, N] fp32
    sqr_sum = sum_k a.float()^2      -> [M] fp32

With num_splits=S the outputs are split-K partials d [S, M, N] and sqr_sum [S, M] that the
caller sums; split s covers exactly the K range DeepGEMM gives it (reference/mhc.py explains
the rule), so partials match DeepGEMM's split by split and not only in their sum.

One program per (64-row tile of M, split): it walks its K range, upcasts the bf16 rows in
registers, accumulates the squares and the fp32 dot (TF32 tensor cores on a GPU, the precision
DeepGEMM advertises; exact fp32 in the interpreter). The grid depends on shapes only.

Differences from DeepGEMM, all more permissive: K need not be a multiple of 64 (the last block
is masked), N may be any value up to 128 (DeepGEMM: N % 8 == 0, N <= 32 on SM90), and a, b, d,
sqr_sum may have any strides (DeepGEMM: K-major a/b, contiguous sqr_sum).
"""

from __future__ import annotations

import numbers

import torch

from ds_plugins.kernels._runtime import HAVE_TRITON, INTERPRET, KernelInputError, expect, next_pow2, use_triton
from ds_plugins.kernels.reference.mhc import HC_SPLIT_BLOCK_K, hc_prenorm_gemm

MAX_N = 128  # one program holds all N columns of its rows; V4 uses N = (2 + 4) * 4 = 24

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ds_plugins.kernels._tl import dot

    @triton.jit
    def _hc_prenorm_gemm_kernel(
        a_ptr,
        b_ptr,
        d_ptr,
        sqr_ptr,
        M,
        N,
        K,
        num_splits,
        stride_am,
        stride_ak,
        stride_bn,
        stride_bk,
        stride_ds,
        stride_dm,
        stride_dn,
        stride_ss,
        stride_sm,
        SPLIT_BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        split = tl.program_id(1)

        # DeepGEMM's split rule over 64-wide K blocks: the first `remainder` splits get one more.
        num_blocks = tl.cdiv(K, SPLIT_BLOCK_K)
        per_split = num_blocks // num_splits
        remainder = num_blocks % num_splits
        first_block = split * per_split + tl.minimum(split, remainder)
        block_count = per_split + (split < remainder).to(tl.int32)
        k_start = first_block * SPLIT_BLOCK_K
        k_end = tl.minimum((first_block + block_count) * SPLIT_BLOCK_K, K)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows_a = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        cols_b = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sqr = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            a = tl.load(
                rows_a + offs_k.to(tl.int64)[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0
            ).to(tl.float32)
            b = tl.load(
                cols_b + offs_k.to(tl.int64)[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
            )
            sqr += tl.sum(a * a, axis=1)
            acc = dot(a, b, acc, INTERPRET)

        # a split with no K block still writes its (zero) partials, as DeepGEMM does
        d_out = (
            d_ptr
            + split.to(tl.int64) * stride_ds
            + offs_m.to(tl.int64)[:, None] * stride_dm
            + offs_n[None, :] * stride_dn
        )
        tl.store(d_out, acc, mask=mask_m[:, None] & mask_n[None, :])
        tl.store(sqr_ptr + split.to(tl.int64) * stride_ss + offs_m.to(tl.int64) * stride_sm, sqr, mask=mask_m)


def _check_num_splits(num_splits) -> None:
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 1:
        raise KernelInputError(f"num_splits: expected None or an int >= 1, got {num_splits!r}")


def _validate(a, b, d, sqr_sum, num_splits) -> None:
    _check_num_splits(num_splits)
    expect("a", a, dtype=torch.bfloat16, ndim=2)
    m, k = a.shape
    if k == 0:
        raise KernelInputError("a: expected a non-empty K dimension, got shape [*, 0]")
    expect("b", b, dtype=torch.float32, ndim=2, last_dim=k, device=a.device)
    n = b.shape[0]
    if not 0 < n <= MAX_N:
        raise KernelInputError(f"b: expected 1..{MAX_N} rows (N), got shape {list(b.shape)}")
    if num_splits is None:
        expect("d", d, dtype=torch.float32, shape=(m, n), device=a.device)
        expect("sqr_sum", sqr_sum, dtype=torch.float32, shape=(m,), device=a.device)
    else:
        expect("d", d, dtype=torch.float32, shape=(num_splits, m, n), device=a.device)
        expect("sqr_sum", sqr_sum, dtype=torch.float32, shape=(num_splits, m), device=a.device)


def _launch_triton(a, b, d, sqr_sum, num_splits) -> None:
    m, k = a.shape
    n = b.shape[0]
    splits = 1 if num_splits is None else int(num_splits)
    split_stride_d = 0 if num_splits is None else d.stride(0)
    split_stride_s = 0 if num_splits is None else sqr_sum.stride(0)
    # Interpreter: wide K steps (fewer, larger numpy ops); GPU: DeepGEMM's 64x64 tiles.
    block_m, block_k = (16, 512) if INTERPRET else (64, 64)
    block_n = max(16, next_pow2(n))
    grid = (triton.cdiv(m, block_m), splits)
    _hc_prenorm_gemm_kernel[grid](
        a,
        b,
        d,
        sqr_sum,
        m,
        n,
        k,
        splits,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        split_stride_d,
        d.stride(-2),
        d.stride(-1),
        split_stride_s,
        sqr_sum.stride(-1),
        SPLIT_BLOCK_K=HC_SPLIT_BLOCK_K,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        INTERPRET=INTERPRET,
        num_warps=8,  # 4 warps spilled on sm_120a (16/8 bytes); 8 do not
    )


def _launch_reference(a, b, d, sqr_sum, num_splits) -> None:
    hc_prenorm_gemm(a, b, d, sqr_sum, num_splits)


def tf32_hc_prenorm_gemm(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor, num_splits: int | None = None
) -> None:
    """DeepGEMM's `tf32_hc_prenorm_gemm(a, b, d, sqr_sum, num_splits=None)`: writes d and sqr_sum in place.

    a [M, K] bf16, b [N, K] fp32; d [M, N] fp32 and sqr_sum [M] fp32, or with num_splits=S
    d [S, M, N] and sqr_sum [S, M] (split-K partials, summed by the caller). Returns None, like DeepGEMM."""
    _validate(a, b, d, sqr_sum, num_splits)
    if a.shape[0] == 0:  # DeepGEMM does nothing on an empty problem
        return
    if use_triton(a):
        _launch_triton(a, b, d, sqr_sum, num_splits)
    else:
        _launch_reference(a, b, d, sqr_sum, num_splits)
