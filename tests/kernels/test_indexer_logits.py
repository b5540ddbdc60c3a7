"""Indexer logits kernels (ds_plugins/kernels/indexer.py) against the reference (reference/indexer.py).

DeepGEMM contracts: `fp8_mqa_logits` / `fp8_fp4_mqa_logits` (ragged prefill windows ks <= j < ke,
full [M, N] or compressed [M, max_seqlen_k] output) and `fp8_paged_mqa_logits` /
`fp8_fp4_paged_mqa_logits` (paged cache, 2-D or 1-D context lengths, block table), in their FP8
and FP4 (MXFP4 q and keys) variants, at V4's indexer shape: 64 heads x head_dim 128.

Both sides score the same quantised inputs: the reference dequantises them (exactly: FP8 and
FP4 values times power-of-two or fp32 scales), so the only difference is fp32 summation order.

Tolerance (one rule for the file): |out - ref| <= FP32_TOL * bound, where bound is the same
formula with |q|, |k|, |w| (the sum of the absolute values of every term that is added).
Each side adds D = 128 products per head and H = 64 heads in its own order; fp32 rounds each
addition by at most 2^-24 of the running magnitude, so the difference is at most
(D + H) * 2^-24 = 1.1e-5 of the bound: FP32_TOL = 1.2e-5. A bf16 output adds the fp32 -> bf16
conversion: one bf16 ulp, 2^-7 of |ref| (BF16_TOL), because Triton's interpreter truncates that
conversion (checked with Triton 3.9, even with fp_downcast_rounding="rtne"); a GPU rounds to
nearest, half of it. Masks (-inf) must match exactly.

Also here: the storage formats' writers and readers (reference/indexer.py) agree, bad arguments
raise KernelInputError naming the argument before any launch, and no entry point (logits or
top-k, FP8 or FP4) reads a tensor value on the host or sizes a grid from data (CUDA-graph safety).
"""

from __future__ import annotations

import re

import pytest
import torch

from ds_plugins.kernels import indexer
from ds_plugins.kernels._runtime import KernelInputError
from ds_plugins.kernels.reference import indexer as ref

FP32_TOL = 1.2e-5
BF16_TOL = 2.0**-7
HEADS, HEAD_DIM = 64, 128  # V4's indexer (Flash and Pro)
FP8 = torch.float8_e4m3fn


def assert_logits_close(out: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, rel: float = 0.0) -> None:
    assert out.shape == expected.shape
    masked = expected == float("-inf")
    assert torch.equal(out.float() == float("-inf"), masked), "visible-key masks differ"
    keep = ~masked
    err = (out.float()[keep] - expected[keep]).abs()
    allowed = FP32_TOL * bound[keep] + rel * expected[keep].abs()
    worst = (err - allowed).max() if err.numel() else torch.tensor(0.0)
    assert worst <= 0, f"max excess {worst.item():.3g} (max err {err.max().item():.3g})"


# ----------------------------------------------------------------------------- ragged inputs


def make_ragged(device: str, fp4: bool, rows: int, n_keys: int, k_scale: torch.Tensor | None = None):
    """Random quantised q, keys and weights; returns the kernel arguments and their dequantised twins."""
    q_src = torch.randn(rows, HEADS, HEAD_DIM)
    k_src = torch.randn(n_keys, HEAD_DIM)
    weights = torch.randn(rows, HEADS)
    if fp4:
        q = ref.quantize_fp4(q_src)
        kv = ref.quantize_fp4(k_src)
        q_f, k_f, scale = ref.dequant_fp4(*q), ref.dequant_fp4(*kv), None
    else:
        k_fp8, scale = ref.quantize_fp8_keys(k_src, power_of_two=False)  # DeepGEMM's test: amax / 448
        if k_scale is not None:
            scale = k_scale
        q = (q_src.to(FP8), None)
        kv = (k_fp8, scale)
        q_f, k_f = q[0].float(), k_fp8.float()
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    args = ((to(q[0]), to(q[1])), (to(kv[0]), to(kv[1])), weights.to(device))
    return args, (q_f, k_f, weights, scale)


# Windows at the start of the key array, empty, one key, full, across a 128-key tile, the last key.
WINDOWS = [(0, 0), (0, 1), (0, 300), (10, 137), (128, 256), (299, 300)]


def ragged_windows(device: str):
    ks = torch.tensor([w[0] for w in WINDOWS], dtype=torch.int32, device=device)
    ke = torch.tensor([w[1] for w in WINDOWS], dtype=torch.int32, device=device)
    return ks, ke


def ragged_expected(dq, ks, ke, max_seqlen_k=0):
    q_f, k_f, w, scale = dq
    ks, ke = ks.cpu(), ke.cpu()
    expected = ref.mqa_logits(q_f, k_f, w, ks, ke, scale, max_seqlen_k)
    bound = ref.mqa_logits(q_f.abs(), k_f.abs(), w.abs(), ks, ke, None if scale is None else scale.abs(), max_seqlen_k)
    return expected, bound


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_mqa_logits_full_rows(device, fp4, clean_logits):
    args, dq = make_ragged(device, fp4, rows=len(WINDOWS), n_keys=300)
    ks, ke = ragged_windows(device)
    if fp4:
        out = indexer.fp8_fp4_mqa_logits(*args, ks, ke, clean_logits=clean_logits)
    else:
        out = indexer.fp8_mqa_logits(args[0][0], args[1], args[2], ks, ke, clean_logits=clean_logits)
    assert out.dtype == torch.float32 and out.shape == (len(WINDOWS), 300)
    assert_logits_close(out.cpu(), *ragged_expected(dq, ks, ke))


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_mqa_logits_compressed_rows(device, fp4):
    """max_seqlen_k > 0: row t's column c is key ks[t] + c (DeepGEMM's compressed logits)."""
    args, dq = make_ragged(device, fp4, rows=len(WINDOWS), n_keys=300)
    ks, ke = ragged_windows(device)
    width = int(max(e - s for s, e in WINDOWS))
    out = indexer.fp8_fp4_mqa_logits(*args, ks, ke, clean_logits=False, max_seqlen_k=width)
    assert out.shape == (len(WINDOWS), width)
    assert_logits_close(out.cpu(), *ragged_expected(dq, ks, ke, width))


def test_mqa_logits_bf16_output(device):
    args, dq = make_ragged(device, False, rows=len(WINDOWS), n_keys=300)
    ks, ke = ragged_windows(device)
    out = indexer.fp8_fp4_mqa_logits(*args, ks, ke, logits_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_logits_close(out.cpu(), *ragged_expected(dq, ks, ke), rel=BF16_TOL)


def test_mqa_logits_key_scale_extremes(device):
    """Per-key scales from the smallest normal fp32 up to 2^100: the scale multiplies exactly."""
    n_keys = 200
    exponents = torch.tensor([-126.0, -60.0, -1.0, 0.0, 17.0, 60.0, 100.0])
    scale = torch.exp2(exponents[torch.arange(n_keys) % len(exponents)]) * (1 + torch.rand(n_keys))
    args, dq = make_ragged(device, False, rows=3, n_keys=n_keys, k_scale=scale)
    ks = torch.tensor([0, 0, 50], dtype=torch.int32, device=device)
    ke = torch.tensor([200, 7, 199], dtype=torch.int32, device=device)
    out = indexer.fp8_mqa_logits(args[0][0], args[1], args[2], ks, ke)
    assert_logits_close(out.cpu(), *ragged_expected(dq, ks, ke))


# ----------------------------------------------------------------------------- paged inputs


def make_paged(
    device: str, fp4: bool, batch: int, next_n: int, block_kv: int, blocks_per_request: int, block_stride_pad: int = 64
):
    """A scattered paged cache: every request's blocks land at random physical blocks, among them the
    blocks of one extra request nobody reads, with a padded block stride (a shared multi-layer
    allocation). Returns kernel arguments, the block table and the dequantised twins."""
    capacity = blocks_per_request * block_kv
    keys = torch.randn(batch + 1, capacity, HEAD_DIM)
    width = (HEAD_DIM // 2 if fp4 else HEAD_DIM) + 4
    cache, table = ref.paged_cache_from_keys(
        keys,
        block_kv,
        fp4,
        block_kv * width + block_stride_pad,
        physical_blocks=torch.randperm((batch + 1) * blocks_per_request),
    )
    table = table[:batch]
    q_src = torch.randn(batch, next_n, HEADS, HEAD_DIM)
    weights = torch.randn(batch * next_n, HEADS)
    if fp4:
        q = ref.quantize_fp4(q_src)
        q_f = ref.dequant_fp4(*q)
        k_blocks, scales = ref.split_fp4_paged_cache(cache), None
    else:
        q = (q_src.to(FP8), None)
        q_f = q[0].float()
        k_blocks, scales = ref.split_fp8_paged_cache(cache)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    args = ((to(q[0]), to(q[1])), cache.to(device), weights.to(device))
    return args, table.to(device), (q_f, k_blocks, weights, scales)


def paged_expected(dq, context_lens, table, max_context_len):
    q_f, k_blocks, w, scales = dq
    context_lens, table = context_lens.cpu(), table.cpu()
    expected = ref.paged_mqa_logits(q_f, k_blocks, w, context_lens, table, max_context_len, scales)
    bound = ref.paged_mqa_logits(
        q_f.abs(),
        k_blocks.abs(),
        w.abs(),
        context_lens,
        table,
        max_context_len,
        None if scales is None else scales.abs(),
    )
    return expected, bound


# (block_kv, next_n, context lengths per request and MTP row): empty and one-key rows, lengths that
# are not multiples of block_kv, a full table; next_n = 2 rows see one key less on the first row.
PAGED_CASES = {
    "v4-page64-mtp2": (64, 2, [[0, 1], [63, 64], [129, 130], [191, 192]]),
    "page16-next1": (16, 1, [[0], [1], [37], [64]]),
}


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_paged_mqa_logits_2d_context_lens(device, fp4, case):
    block_kv, next_n, lens = PAGED_CASES[case]
    batch = len(lens)
    blocks_per_request = -(-max(max(r) for r in lens) // block_kv)
    args, table, dq = make_paged(device, fp4, batch, next_n, block_kv, blocks_per_request)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    max_context_len = blocks_per_request * block_kv - 3  # not a multiple of the 128-key tile
    meta = indexer.get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms=132)
    if fp4:
        out = indexer.fp8_fp4_paged_mqa_logits(args[0], args[1], args[2], context_lens, table, meta, max_context_len)
    else:
        out = indexer.fp8_paged_mqa_logits(args[0][0], args[1], args[2], context_lens, table, meta, max_context_len)
    assert out.dtype == torch.float32 and out.shape == (batch * next_n, max_context_len)
    assert_logits_close(out.cpu(), *paged_expected(dq, context_lens, table, max_context_len))


def test_paged_mqa_logits_1d_context_lens_are_causal(device):
    """A 1-D context_lens [B] means row (b, n) sees context_lens[b] - next_n + n + 1 keys (DeepGEMM's
    legacy convention): the same logits as the equivalent 2-D lengths."""
    block_kv, next_n = 64, 2
    args, table, dq = make_paged(device, False, 3, next_n, block_kv, 3)
    lens_1d = torch.tensor([1, 100, 192], dtype=torch.int32, device=device)
    lens_2d = torch.stack([lens_1d - 1, lens_1d], dim=1).contiguous()
    meta = indexer.get_paged_mqa_logits_metadata(lens_2d, block_kv, num_sms=8)
    out_1d = indexer.fp8_paged_mqa_logits(args[0][0], args[1], args[2], lens_1d, table, meta, 192)
    out_2d = indexer.fp8_paged_mqa_logits(args[0][0], args[1], args[2], lens_2d, table, meta, 192)
    assert torch.equal(out_1d, out_2d)
    assert_logits_close(out_1d.cpu(), *paged_expected(dq, lens_1d, table, 192))


def test_paged_mqa_logits_bf16_output_and_varlen_indices(device):
    block_kv = 64
    args, table, dq = make_paged(device, False, 3, 1, block_kv, 2)
    context_lens = torch.tensor([[5], [64], [128]], dtype=torch.int32, device=device)
    meta = indexer.get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms=8)
    indices = torch.arange(3, dtype=torch.int32, device=device)
    out = indexer.fp8_fp4_paged_mqa_logits(
        args[0], args[1], args[2], context_lens, table, meta, 128, logits_dtype=torch.bfloat16, indices=indices
    )
    assert out.dtype == torch.bfloat16
    assert_logits_close(out.cpu(), *paged_expected(dq, context_lens, table, 128), rel=BF16_TOL)


def test_paged_mqa_logits_metadata_shape(device):
    context_lens = torch.tensor([[3, 4], [7, 8]], dtype=torch.int32, device=device)
    meta = indexer.get_paged_mqa_logits_metadata(context_lens, 64, 132)
    assert meta.shape == (133, 2) and meta.dtype == torch.int32 and meta.device == context_lens.device
    assert indexer.get_paged_mqa_logits_metadata(context_lens[:, 0].contiguous(), 64, 4).shape == (5, 2)


def test_storage_formats_round_trip():
    """The writers and readers of the FP8/FP4 formats agree, and FP4 decodes DeepGEMM's way."""
    # e2m1 codes 0..15 with scale bytes 127 (x1) and 130 (x8): low nibble first.
    packed = torch.tensor([[0x10 | 0x0, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2], dtype=torch.uint8)
    scales = torch.tensor([127 | (130 << 8)], dtype=torch.int32)  # only group 0 is used (D = 32)
    values = ref.dequant_fp4(packed[:, :16], scales)
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6] * 2)
    assert torch.equal(values[0], expected)
    x = torch.tensor([[3.0, -0.75, 1e-3, 0.0] * 32])  # 128 values, exact in e2m1 x 2^k
    assert torch.equal(ref.dequant_fp4(*ref.quantize_fp4(x)), torch.where(x.abs() < 0.01, 0.0, x))
    keys = torch.randn(2, 16, HEAD_DIM)
    values8, scales8 = ref.quantize_fp8_keys(keys)
    cache = ref.pack_paged_cache(values8, scales8, block_stride=16 * (HEAD_DIM + 4) + 12)
    assert cache.shape == (2, 16, 1, HEAD_DIM + 4) and cache.stride(0) == 16 * (HEAD_DIM + 4) + 12
    back, back_scales = ref.split_fp8_paged_cache(cache)
    assert torch.equal(back, values8.float()) and torch.equal(back_scales, scales8)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel or reference launch fails the test: bad input must be refused before it."""

    def launched(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    # The Triton launchers, and the dequantisers every reference launch starts with.
    for name in (
        "_mqa_logits_triton",
        "_paged_mqa_logits_triton",
        "_dequant_query",
        "_dequant_ragged_keys",
        "_dequant_paged_keys",
    ):
        monkeypatch.setattr(indexer, name, launched)


def _ragged_call(**changes):
    args, _ = make_ragged("cpu", False, rows=2, n_keys=20)
    kw = dict(
        q=args[0][0],
        kv=args[1],
        weights=args[2],
        cu_seq_len_k_start=torch.zeros(2, dtype=torch.int32),
        cu_seq_len_k_end=torch.full((2,), 20, dtype=torch.int32),
    )
    kw.update(changes)
    return kw


RAGGED_BAD = {
    "q": dict(q=torch.randn(2, HEADS, HEAD_DIM, dtype=torch.bfloat16)),
    "kv[0]": dict(kv=(torch.randn(20, 64).to(FP8), torch.ones(20))),
    "kv[1]": dict(kv=(torch.randn(20, HEAD_DIM).to(FP8), torch.ones(19))),
    "weights": dict(weights=torch.randn(3, HEADS)),
    "cu_seq_len_k_start": dict(cu_seq_len_k_start=torch.zeros(2, dtype=torch.int64)),
    "cu_seq_len_k_end": dict(cu_seq_len_k_end=torch.zeros(3, dtype=torch.int32)),
    "clean_logits": dict(clean_logits=True, max_seqlen_k=20),
    "max_seqlen_k": dict(max_seqlen_k=-1),
}


@pytest.mark.parametrize("name", list(RAGGED_BAD))
def test_mqa_logits_bad_input(no_launch, name):
    with pytest.raises(KernelInputError, match=rf"^{re.escape(name)}: "):
        indexer.fp8_mqa_logits(**_ragged_call(**RAGGED_BAD[name]))


def test_fp4_mqa_logits_bad_input(no_launch):
    q = ref.quantize_fp4(torch.randn(2, HEADS, HEAD_DIM))
    kv = ref.quantize_fp4(torch.randn(20, HEAD_DIM))
    ks, ke = torch.zeros(2, dtype=torch.int32), torch.full((2,), 20, dtype=torch.int32)
    w = torch.randn(2, HEADS)
    fp8_kv = (torch.randn(20, HEAD_DIM).to(FP8), torch.ones(20))
    with pytest.raises(KernelInputError, match=r"^kv\[0\]: "):  # FP4 q needs FP4 keys
        indexer.fp8_fp4_mqa_logits(q, fp8_kv, w, ks, ke)
    with pytest.raises(KernelInputError, match=r"^q\[1\]: "):
        indexer.fp8_fp4_mqa_logits((q[0], q[1][:1]), kv, w, ks, ke)
    with pytest.raises(KernelInputError, match=r"^logits_dtype: "):
        indexer.fp8_fp4_mqa_logits(q, kv, w, ks, ke, logits_dtype=torch.float16)
    with pytest.raises(KernelInputError, match=r"^q: "):
        indexer.fp8_fp4_mqa_logits(q[0], kv, w, ks, ke)  # not a (values, scales) pair


def _paged_call(**changes):
    args, table, _ = make_paged("cpu", False, 2, 2, 16, 2)
    context_lens = torch.tensor([[3, 4], [20, 21]], dtype=torch.int32)
    kw = dict(
        q=args[0][0],
        kv_cache=args[1],
        weights=args[2],
        context_lens=context_lens,
        block_table=table,
        schedule_meta=torch.zeros(9, 2, dtype=torch.int32),
        max_context_len=32,
    )
    kw.update(changes)
    return kw


PAGED_BAD = {
    "q": dict(q=torch.randn(2, 2, HEADS, HEAD_DIM, dtype=torch.bfloat16)),
    "kv_cache": dict(kv_cache=torch.zeros(4, 16, 1, HEAD_DIM + 8, dtype=torch.uint8)),
    "weights": dict(weights=torch.randn(2, HEADS)),  # needs B * next_n = 4 rows
    "context_lens": dict(context_lens=torch.zeros(3, 2, dtype=torch.int32)),
    "block_table": dict(block_table=torch.zeros(3, 2, dtype=torch.int32)),
    "schedule_meta": dict(schedule_meta=torch.zeros(9, 3, dtype=torch.int32)),
    "max_context_len": dict(max_context_len=-5),
    "indices": dict(indices=torch.zeros(2, dtype=torch.int32)),  # varlen needs next_n == 1
}


@pytest.mark.parametrize("name", list(PAGED_BAD))
def test_paged_mqa_logits_bad_input(no_launch, name):
    with pytest.raises(KernelInputError, match=rf"^{re.escape(name)}: "):
        indexer.fp8_paged_mqa_logits(**_paged_call(**PAGED_BAD[name]))


# ----------------------------------------------------------------------------- graph safety

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
KERNELS = (
    "_mqa_logits_kernel",
    "_paged_mqa_logits_kernel",
    "_mqa_topk_partial_kernel",
    "_paged_topk_partial_kernel",
    "_topk_merge_kernel",
)


def test_wrappers_never_synchronise(monkeypatch):
    """Every public entry point, FP8 and FP4, reaches its launches without reading a tensor value on
    the host (the calls a CUDA graph capture cannot contain), and its grids are plain ints from shapes."""
    grids = []

    class RecordingKernel:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    ragged = [make_ragged("cpu", fp4, rows=3, n_keys=50)[0] for fp4 in (False, True)]
    paged = [make_paged("cpu", fp4, 2, 2, 16, 2)[:2] for fp4 in (False, True)]
    ks, ke = torch.zeros(3, dtype=torch.int32), torch.full((3,), 50, dtype=torch.int32)
    context_lens = torch.tensor([[3, 4], [31, 32]], dtype=torch.int32)
    for name in KERNELS:
        monkeypatch.setattr(indexer, name, RecordingKernel())

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation in a wrapper")

    for method in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, method, host_sync)

    for q, kv, w in ragged:
        indexer.fp8_fp4_mqa_logits(q, kv, w, ks, ke)
        indexer.fp8_fp4_mqa_logits(q, kv, w, ks, ke, clean_logits=False, max_seqlen_k=40)
        indexer.fp8_mqa_topk(q, kv, w, ks, ke, topk=8)
    for (q, cache, w), table in paged:
        meta = indexer.get_paged_mqa_logits_metadata(context_lens, 16, 4)
        indexer.fp8_fp4_paged_mqa_logits(q, cache, w, context_lens, table, meta, 32)
        indexer.fp8_paged_mqa_topk(q, cache, w, context_lens, table, topk=8)
    monkeypatch.undo()
    assert len(grids) == 2 * (3 + 1 + 2 + 1)
    assert all(isinstance(g, tuple) and all(type(n) is int and n > 0 for n in g) for g in grids), grids
