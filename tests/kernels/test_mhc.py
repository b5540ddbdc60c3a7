"""tf32_hc_prenorm_gemm (Triton) against its reference, and the mHC pre-step built on it.

Shapes are V4's: N = (2 + hc_mult) * hc_mult = 24 mixes, K = hc_mult * hidden = 4 * 4096 = 16384
(N = 4 for the head), with a few tokens.

Tolerances, stated once. Errors are bounded relative to S = |a| @ |b|^T (the sum of |terms|):
- CPU (the interpreter computes the fp32 dot exactly per element, fp32 accumulation): rounding in
  a blocked fp32 sum of K terms stays below ~(block + #blocks) * 2^-24 * S; we allow 2^-14 * S.
- CUDA (TF32 tensor cores, DeepGEMM's advertised precision): each operand is rounded to a 10-bit
  mantissa, so each product is off by up to 2^-10 relative; we allow 2^-9 * S.
- sqr_sum is always fp32 (squares of bf16 values are exact in fp32): 2^-14 relative.
Derived mHC outputs (post, comb) inherit the mixes' error through smooth, bounded maps (sigmoid,
softmax, Sinkhorn): absolute 1e-5 on CPU, 2e-3 on CUDA; y is bf16: one bf16 ulp (2^-7 relative)
plus that.
"""

import pytest
import torch

from ds_plugins.kernels import mhc as mhc_module
from ds_plugins.kernels._runtime import KernelInputError, use_triton
from ds_plugins.kernels.mhc import tf32_hc_prenorm_gemm
from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm, hc_split_k_ranges, ref_hc_pre

HC_MULT, HIDDEN = 4, 4096
N_MIX, K = (2 + HC_MULT) * HC_MULT, HC_MULT * HIDDEN
HC_EPS, RMS_EPS, SINKHORN_ITERS = 1e-6, 1e-6, 20

GEMM_REL = {"cpu": 2.0**-14, "cuda": 2.0**-9}
SQR_REL = 2.0**-14
MIX_ATOL = {"cpu": 1e-5, "cuda": 2e-3}


def _outputs(m, n, num_splits, device, fill=float("nan")):
    shape = (m, n) if num_splits is None else (num_splits, m, n)
    return torch.full(shape, fill, device=device), torch.full(shape[:-1], fill, device=device)


def _assert_gemm_close(d, d_ref, sqr, sqr_ref, bound, device):
    """|d - d_ref| <= rel * bound (bound = |a| @ |b|^T over the same K range), sqr_sum relative."""
    assert torch.isfinite(d).all() and torch.isfinite(sqr).all()
    assert ((d - d_ref).abs() <= GEMM_REL[device] * bound + 1e-30).all(), (d - d_ref).abs().max()
    assert ((sqr - sqr_ref).abs() <= SQR_REL * sqr_ref.abs() + 1e-30).all(), (sqr - sqr_ref).abs().max()


def test_split_k_ranges_follow_deepgemm():
    # 256 blocks of 64 over 3 splits: 86, 85, 85 blocks (the first `remainder` splits get one more)
    assert hc_split_k_ranges(16384, 3) == [(0, 5504), (5504, 10944), (10944, 16384)]
    assert hc_split_k_ranges(16384, 16) == [(1024 * s, 1024 * (s + 1)) for s in range(16)]
    # more splits than blocks: the extra splits are empty (and write zeros)
    assert hc_split_k_ranges(128, 4) == [(0, 64), (64, 128), (128, 128), (128, 128)]
    assert hc_split_k_ranges(16384, 1) == [(0, 16384)]


@pytest.mark.parametrize("num_splits", [None, 1, 3, 16])
@pytest.mark.parametrize("m", [1, 37])  # 37: not a multiple of the 16 (interpreter) / 64 (GPU) row tile
def test_prenorm_gemm_matches_reference(device, m, num_splits):
    a = torch.randn(m, K, device=device).bfloat16()
    b = torch.randn(N_MIX, K, device=device)
    d, sqr = _outputs(m, N_MIX, num_splits, device)
    assert use_triton(a)
    tf32_hc_prenorm_gemm(a, b, d, sqr, num_splits)

    d_ref, sqr_ref = _outputs(m, N_MIX, num_splits, device)
    hc_prenorm_gemm(a, b, d_ref, sqr_ref, num_splits)
    ranges = [(0, K)] if num_splits is None else hc_split_k_ranges(K, num_splits)
    bounds = torch.stack([a.float()[:, k0:k1].abs() @ b[:, k0:k1].abs().T for k0, k1 in ranges])
    if num_splits is None:
        bounds = bounds[0]
    # split by split: each partial covers DeepGEMM's K range for that split
    _assert_gemm_close(d, d_ref, sqr, sqr_ref, bounds, device)
    # and what callers use: the sum of the partials is the full product
    full = (a.float() @ b.T, a.float().square().sum(-1))
    total = (d, sqr) if num_splits is None else (d.sum(0), sqr.sum(0))
    _assert_gemm_close(total[0], full[0], total[1], full[1], a.float().abs() @ b.abs().T, device)


def test_prenorm_gemm_more_splits_than_blocks_writes_zero_partials(device):
    m, k = 5, 128  # two 64-blocks over four splits
    a = torch.randn(m, k, device=device).bfloat16()
    b = torch.randn(N_MIX, k, device=device)
    d, sqr = _outputs(m, N_MIX, 4, device)  # NaN-filled: every element must be written
    tf32_hc_prenorm_gemm(a, b, d, sqr, num_splits=4)
    assert (d[2:] == 0).all() and (sqr[2:] == 0).all()
    d_ref, sqr_ref = _outputs(m, N_MIX, 4, device)
    hc_prenorm_gemm(a, b, d_ref, sqr_ref, 4)
    bounds = torch.stack([a.float()[:, k0:k1].abs() @ b[:, k0:k1].abs().T for k0, k1 in hc_split_k_ranges(k, 4)])
    _assert_gemm_close(d, d_ref, sqr, sqr_ref, bounds, device)


def test_prenorm_gemm_head_shape_and_strided_inputs(device):
    """The HC head's N = 4, a as a row-padded view and b as a transposed view: strides are honoured."""
    m, n = 6, HC_MULT
    a = torch.randn(m, K + 64, device=device).bfloat16()[:, :K]
    b = torch.randn(K, n, device=device).T
    d, sqr = _outputs(m, n, 2, device)
    tf32_hc_prenorm_gemm(a, b, d, sqr, num_splits=2)
    d_ref, sqr_ref = _outputs(m, n, 2, device)
    hc_prenorm_gemm(a, b, d_ref, sqr_ref, 2)
    bounds = torch.stack([a.float()[:, k0:k1].abs() @ b[:, k0:k1].abs().T for k0, k1 in hc_split_k_ranges(K, 2)])
    _assert_gemm_close(d, d_ref, sqr, sqr_ref, bounds, device)


def test_prenorm_gemm_empty_m_is_a_no_op(device):
    a = torch.empty(0, K, device=device, dtype=torch.bfloat16)
    b = torch.randn(N_MIX, K, device=device)
    d, sqr = _outputs(0, N_MIX, 3, device)
    assert tf32_hc_prenorm_gemm(a, b, d, sqr, num_splits=3) is None


@pytest.mark.parametrize("num_splits", [None, 4])
def test_hc_pre_through_kernel_matches_reference(device, num_splits):
    """The whole mHC pre-step at V4 size with the Triton GEMM inside, against the all-reference one."""
    t = 3
    x = (torch.randn(t, HC_MULT, HIDDEN, device=device) * 2).bfloat16()
    fn = torch.randn(N_MIX, K, device=device) * (1.5 / K**0.5)
    scale = torch.rand(3, device=device) + 0.5
    base = torch.randn(N_MIX, device=device)
    got = ref_hc_pre(
        x, fn, scale, base, HC_EPS, SINKHORN_ITERS, RMS_EPS, num_splits=num_splits, prenorm_gemm=tf32_hc_prenorm_gemm
    )
    want = ref_hc_pre(x, fn, scale, base, HC_EPS, SINKHORN_ITERS, RMS_EPS)
    atol = MIX_ATOL[device]
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=atol)  # post
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=atol)  # comb
    pre_mag = (x.float().abs() * 2).sum(1)  # pre < 1 + eps: |y| <= sum_j |X_j|, its error ~ atol * that
    assert ((got[0].float() - want[0].float()).abs() <= 2.0**-7 * want[0].float().abs() + atol * pre_mag).all()
    # Sinkhorn ends on a column normalisation: columns sum to 1 up to hc_eps
    torch.testing.assert_close(got[2].sum(-2), torch.ones(t, HC_MULT, device=device), rtol=0, atol=1e-5)
    assert (got[1] >= 0).all() and (got[1] <= 2).all()


# ---- bad input: a KernelInputError naming the argument, raised before any launch ----------------


def _good(device="cpu"):
    m = 3
    return dict(
        a=torch.randn(m, K, device=device).bfloat16(),
        b=torch.randn(N_MIX, K, device=device),
        d=torch.empty(2, m, N_MIX, device=device),
        sqr_sum=torch.empty(2, m, device=device),
        num_splits=2,
    )


BAD_INPUTS = [
    ("a", lambda g: g.update(a=g["a"].float())),  # wrong dtype
    ("a", lambda g: g.update(a=g["a"][None])),  # wrong rank
    ("b", lambda g: g.update(b=g["b"].bfloat16())),  # wrong dtype
    ("b", lambda g: g.update(b=g["b"][:, :-64])),  # wrong last dim (K)
    ("b", lambda g: g.update(b=torch.randn(129, K))),  # N too large
    ("d", lambda g: g.update(d=g["d"][0])),  # 2-D d with num_splits
    ("d", lambda g: g.update(d=torch.empty(2, 4, N_MIX))),  # mismatched M
    ("d", lambda g: g.update(d=g["d"].double())),  # wrong dtype
    ("sqr_sum", lambda g: g.update(sqr_sum=torch.empty(3, 3))),  # mismatched splits
    ("sqr_sum", lambda g: g.update(sqr_sum=g["sqr_sum"].bfloat16())),  # wrong dtype
    ("d", lambda g: g.update(num_splits=None)),  # 3-D d without num_splits
    ("num_splits", lambda g: g.update(num_splits=0)),
    ("num_splits", lambda g: g.update(num_splits=2.0)),
]


@pytest.mark.parametrize("name,corrupt", BAD_INPUTS)
def test_bad_input_names_the_argument_before_launch(monkeypatch, name, corrupt):
    def launched(*_):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(mhc_module, "_launch_triton", launched)
    monkeypatch.setattr(mhc_module, "_launch_reference", launched)
    args = _good()
    corrupt(args)
    with pytest.raises(KernelInputError, match=rf"^{name}:"):
        tf32_hc_prenorm_gemm(**args)
