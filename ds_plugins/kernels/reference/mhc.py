"""mHC (manifold-constrained hyper-connections), from the math: the oracle for the prenorm GEMM.

Research notes section 2.1. Per token the residual is n = hc_mult bf16 streams X [n, D]. One HC
site holds fn [(2+n)*n, n*D], base [(2+n)*n] and scale [3], all fp32. With x = flatten(X) in fp32:

    m       = (x @ fn^T) * rsqrt(sum(x^2) / (n*D) + rms_eps)           the prenorm GEMM + RMS
    pre_j   = sigmoid(m[j] s0 + base[j]) + hc_eps                       j < n
    post_j  = 2 sigmoid(m[n+j] s1 + base[n+j])
    C[j,k]  = m[2n + n*j + k] s2 + base[2n + n*j + k]                   row j, column k
    C       = softmax over k (each row) + hc_eps, then C / (column sums + hc_eps),
              then (sinkhorn_iters - 1) times: rows / (row sums + hc_eps), columns / (column sums + hc_eps)
    y       = sum_j pre_j X_j  (fp32, one rounding to bf16)             the sublayer's input
    hc_post: X'_k = post_k F + sum_j C[j,k] X_j  (fp32, one rounding)   note: column k of C
    hc_head: like pre with fn [n, n*D], scale [1], base [n], no Sinkhorn

The GEMM part is DeepGEMM's `tf32_hc_prenorm_gemm` contract: d = a.float() @ b^T and
sqr_sum = sum_k a^2, optionally as split-K partials [S, M, N] / [S, M] that the caller sums.
DeepGEMM cuts K into 64-wide blocks and gives split s the blocks
[s*q + min(s, r), (s+1)*q + min(s+1, r)) with q, r = divmod(ceil(K/64), S): the first r splits get
one block more, and a split with no block writes zeros (`sm90/sm100/sm120_tf32_hc_prenorm_gemm.cuh`).
"""

from __future__ import annotations

from typing import Callable

import torch

HC_SPLIT_BLOCK_K = 64  # DeepGEMM's split-K granularity: a split always holds whole 64-wide K blocks
HC_POST_MULT = 2.0  # post = 2 * sigmoid(.): hard-coded in V4 (vLLM's hc_post_mult_value)


def hc_split_k_ranges(k: int, num_splits: int) -> list[tuple[int, int]]:
    """The [start, end) K range of each split, exactly as DeepGEMM assigns them."""
    num_blocks = -(-k // HC_SPLIT_BLOCK_K)
    per_split, remainder = divmod(num_blocks, num_splits)
    ranges = []
    for s in range(num_splits):
        first = s * per_split + min(s, remainder)
        count = per_split + (1 if s < remainder else 0)
        ranges.append((min(first * HC_SPLIT_BLOCK_K, k), min((first + count) * HC_SPLIT_BLOCK_K, k)))
    return ranges


def hc_prenorm_gemm(
    a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sqr_sum: torch.Tensor, num_splits: int | None = None
) -> None:
    """Reference for `tf32_hc_prenorm_gemm`: fills d and sqr_sum in place (fp32 math), returns None.

    a [M, K] bf16, b [N, K] fp32; d [M, N] and sqr_sum [M] when num_splits is None, else
    d [S, M, N] and sqr_sum [S, M] holding each split's partial sums over its K range."""
    x = a.float()
    w = b.float()
    if num_splits is None:
        d.copy_(x @ w.T)
        sqr_sum.copy_(x.square().sum(-1))
        return
    for s, (k0, k1) in enumerate(hc_split_k_ranges(a.shape[1], num_splits)):
        d[s].copy_(x[:, k0:k1] @ w[:, k0:k1].T)
        sqr_sum[s].copy_(x[:, k0:k1].square().sum(-1))


PrenormGemm = Callable[..., None]  # the tf32_hc_prenorm_gemm signature: (a, b, d, sqr_sum, num_splits)


def hc_mixes(
    x_flat: torch.Tensor,
    fn: torch.Tensor,
    rms_eps: float,
    *,
    num_splits: int | None = None,
    prenorm_gemm: PrenormGemm | None = None,
) -> torch.Tensor:
    """m = (x @ fn^T) * rsqrt(mean(x^2) + rms_eps) for x_flat [T, K] bf16 -> [T, N] fp32, going
    through a prenorm GEMM with the DeepGEMM contract (the reference by default), as callers do."""
    gemm = prenorm_gemm or hc_prenorm_gemm
    t, k = x_flat.shape
    n = fn.shape[0]
    shape = (t, n) if num_splits is None else (num_splits, t, n)
    d = torch.empty(shape, dtype=torch.float32, device=x_flat.device)
    sqr_sum = torch.empty(shape[:-1], dtype=torch.float32, device=x_flat.device)
    gemm(x_flat, fn, d, sqr_sum, num_splits)
    if num_splits is not None:  # the caller's job in the split-K contract: sum the partials
        d, sqr_sum = d.sum(0), sqr_sum.sum(0)
    return d * torch.rsqrt(sqr_sum / k + rms_eps)[:, None]


def sinkhorn(logits: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """[..., n, n] logits -> near doubly-stochastic matrix; ends on a column normalisation."""
    c = torch.softmax(logits, dim=-1) + hc_eps
    c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + hc_eps)
        c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)
    return c


def collapse(x_streams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y = sum_j w_j X_j in fp32, one rounding to the streams' dtype. [T, n, D], [T, n] -> [T, D]."""
    return (weights[..., None] * x_streams.float()).sum(dim=-2).to(x_streams.dtype)


def ref_hc_pre(
    x_streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    sinkhorn_iters: int,
    rms_eps: float,
    *,
    num_splits: int | None = None,
    prenorm_gemm: PrenormGemm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_streams [T, n, D] bf16, fn [(2+n)n, n*D], scale [3], base [(2+n)n] (fp32)
    -> y [T, D] (x's dtype), post [T, n] fp32, comb [T, n, n] fp32 (comb[t, j, k]: stream j into k).

    prenorm_gemm: any function with the `tf32_hc_prenorm_gemm` contract (default: the reference);
    num_splits: passed to it, the partials are summed here as vLLM does."""
    t, n, hidden = x_streams.shape
    m = hc_mixes(x_streams.reshape(t, n * hidden), fn, rms_eps, num_splits=num_splits, prenorm_gemm=prenorm_gemm)
    s = scale.float()
    b = base.float()
    pre = torch.sigmoid(m[:, :n] * s[0] + b[:n]) + hc_eps
    post = HC_POST_MULT * torch.sigmoid(m[:, n : 2 * n] * s[1] + b[n : 2 * n])
    comb_logits = (m[:, 2 * n :] * s[2] + b[2 * n :]).view(t, n, n)
    comb = sinkhorn(comb_logits, hc_eps, sinkhorn_iters)
    return collapse(x_streams, pre), post, comb


def ref_hc_post(f: torch.Tensor, x_streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """f [T, D] sublayer output, x_streams [T, n, D], post [T, n], comb [T, n, n] -> new streams [T, n, D].

    X'_k = post_k F + sum_j comb[j, k] X_j, in fp32 with one rounding to x's dtype."""
    mixed = torch.einsum("tjk,tjd->tkd", comb.float(), x_streams.float())
    return (post.float()[..., None] * f.float()[:, None, :] + mixed).to(x_streams.dtype)


def ref_hc_head(
    x_streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    rms_eps: float,
    *,
    num_splits: int | None = None,
    prenorm_gemm: PrenormGemm | None = None,
) -> torch.Tensor:
    """Final collapse before the model's norm: x_streams [T, n, D], fn [n, n*D], scale [1], base [n] -> [T, D]."""
    t, n, hidden = x_streams.shape
    m = hc_mixes(x_streams.reshape(t, n * hidden), fn, rms_eps, num_splits=num_splits, prenorm_gemm=prenorm_gemm)
    pre = torch.sigmoid(m * scale.float()[0] + base.float()) + hc_eps
    return collapse(x_streams, pre)
