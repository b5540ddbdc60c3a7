"""Fused indexer top-k (`fp8_mqa_topk`, `fp8_paged_mqa_topk`) against torch.topk over the reference logits.

The kernels never build a logits row: each (row, split) program keeps a running best list and a
merge kernel combines the splits (indexer.py's docstring). Here the reference computes the full
logits (reference/indexer.py) and the checks are, per row:
- the selected positions are the torch.topk set of the reference logits (positions relative to ks
  for the ragged version, logical positions for the paged one), as many as there are visible keys
  up to topk, then -1 padding;
- their reference scores come out in descending order.
Inputs are random (distinct scores, so no ties). Both sides score the same quantised inputs and
differ only in fp32 summation order, so a score may differ by FP32_TOL * bound (bound = the same
formula on |q|, |k|, |w|; test_indexer_logits.py derives FP32_TOL = 1.2e-5 from (D + H) * 2^-24).
A set difference is accepted only between keys whose reference scores are that close to the k-th
best (a near-tie at the boundary); none occurs with these seeds, but the rule keeps the test about
top-k selection rather than summation order. Real V4 indexer shape: 64 heads x head_dim 128,
topk 512 in one case (plus small topk values to keep the interpreter fast).
"""

from __future__ import annotations

import re

import pytest
import torch

from ds_plugins.kernels import indexer
from ds_plugins.kernels._runtime import KernelInputError
from ds_plugins.kernels.reference import indexer as ref

FP32_TOL = 1.2e-5
HEADS, HEAD_DIM = 64, 128
FP8 = torch.float8_e4m3fn


def assert_topk(positions: torch.Tensor, logits: torch.Tensor, bound: torch.Tensor, topk: int) -> None:
    """positions [rows, topk] from a kernel vs reference logits [rows, cols] (column = position)."""
    assert positions.dtype == torch.int32 and positions.shape == (logits.shape[0], topk)
    for row, (pos, scores, mags) in enumerate(zip(positions.long(), logits, bound)):
        visible = int(torch.isfinite(scores).sum())
        count = min(topk, visible)
        assert torch.all(pos[:count] >= 0) and torch.all(pos[count:] == -1), f"row {row}: padding {pos.tolist()}"
        picked = pos[:count]
        assert picked.unique().numel() == count, f"row {row}: repeated positions"
        got = scores[picked]
        assert torch.isfinite(got).all(), f"row {row}: a selected key is not visible"
        tol = FP32_TOL * mags[picked]
        assert torch.all(got[1:] <= got[:-1] + tol[1:] + tol[:-1]), f"row {row}: not best first"
        if count == 0:
            continue
        expected = torch.topk(scores, count).indices
        kth = scores[expected].min()
        kth_tol = FP32_TOL * mags.max()
        mismatched = set(picked.tolist()) ^ set(expected.tolist())
        near_tie = all(abs(scores[p].item() - kth.item()) <= 2 * kth_tol for p in mismatched)
        assert near_tie, f"row {row}: top-{count} set differs from torch.topk at {sorted(mismatched)}"


def quantised_query(q_src: torch.Tensor, fp4: bool):
    """(kernel q, dequantised q): FP8 tensor, or FP4 (values, scales) pair."""
    if fp4:
        q = ref.quantize_fp4(q_src)
        return q, ref.dequant_fp4(*q)
    q = q_src.to(FP8)
    return q, q.float()


def to_device(x, device):
    if isinstance(x, tuple):
        return tuple(to_device(t, device) for t in x)
    return x.to(device) if x is not None else None


# ----------------------------------------------------------------------------- ragged (prefill)


def ragged_problem(device: str, fp4: bool, windows: list[tuple[int, int]], n_keys: int):
    q, q_f = quantised_query(torch.randn(len(windows), HEADS, HEAD_DIM), fp4)
    k_src = torch.randn(n_keys, HEAD_DIM)
    if fp4:
        kv = ref.quantize_fp4(k_src)
        k_f, scale = ref.dequant_fp4(*kv), None
    else:
        kv = ref.quantize_fp8_keys(k_src)
        k_f, scale = kv[0].float(), kv[1]
    weights = torch.randn(len(windows), HEADS)
    ks = torch.tensor([w[0] for w in windows], dtype=torch.int32)
    ke = torch.tensor([w[1] for w in windows], dtype=torch.int32)
    # Reference logits in relative columns: column p of row t is key ks[t] + p.
    logits = ref.mqa_logits(q_f, k_f, weights, ks, ke, scale, max_seqlen_k=n_keys)
    bound = ref.mqa_logits(q_f.abs(), k_f.abs(), weights.abs(), ks, ke, scale, max_seqlen_k=n_keys)
    args = (to_device(q, device), to_device(kv, device), weights.to(device), ks.to(device), ke.to(device))
    return args, logits, bound


# Windows at the start of the keys, empty, single key, fewer keys than topk, long, across tiles, the tail.
RAGGED_WINDOWS = [(0, 0), (0, 1), (0, 9), (0, 300), (40, 290), (128, 256), (290, 300)]


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("topk,num_splits", [(16, None), (20, 3)], ids=["topk16", "topk20-3splits"])
def test_mqa_topk_matches_reference(device, fp4, topk, num_splits):
    args, logits, bound = ragged_problem(device, fp4, RAGGED_WINDOWS, n_keys=300)
    out = indexer.fp8_mqa_topk(*args, topk=topk, num_splits=num_splits)
    assert_topk(out.cpu(), logits, bound, topk)


def test_mqa_topk_positions_are_relative_to_ks(device):
    """Prepending keys and shifting ks/ke by as much changes nothing: positions count from ks."""
    args, _, _ = ragged_problem(device, False, [(0, 200), (50, 180)], n_keys=200)
    q, (k, scale), w, ks, ke = args
    extra = 37
    k_shifted = torch.cat([torch.randn(extra, HEAD_DIM, device=device).to(FP8), k])
    scale_shifted = torch.cat([torch.rand(extra, device=device) + 0.5, scale])
    out = indexer.fp8_mqa_topk(q, (k, scale), w, ks, ke, topk=16)
    out_shifted = indexer.fp8_mqa_topk(q, (k_shifted, scale_shifted), w, ks + extra, ke + extra, topk=16)
    assert torch.equal(out, out_shifted)
    assert int(out[1].max()) < 130  # window of 130 keys


# ----------------------------------------------------------------------------- paged (decode)


def paged_problem(
    device: str, fp4: bool, lens: list[list[int]], block_kv: int, blocks_per_request: int, context_lens_1d: bool = False
):
    """Scattered blocks (random physical order, one unused request's blocks among them), padded block stride."""
    batch, next_n = len(lens), len(lens[0])
    keys = torch.randn(batch + 1, blocks_per_request * block_kv, HEAD_DIM)
    width = (HEAD_DIM // 2 if fp4 else HEAD_DIM) + 4
    cache, table = ref.paged_cache_from_keys(
        keys, block_kv, fp4, block_kv * width + 32, physical_blocks=torch.randperm((batch + 1) * blocks_per_request)
    )
    table = table[:batch].contiguous()
    q, q_f = quantised_query(torch.randn(batch, next_n, HEADS, HEAD_DIM), fp4)
    weights = torch.randn(batch * next_n, HEADS)
    if context_lens_1d:  # row (b, n) sees lens[b] - next_n + n + 1 keys
        context_lens = torch.tensor([row[-1] for row in lens], dtype=torch.int32)
    else:
        context_lens = torch.tensor(lens, dtype=torch.int32)
    k_blocks, scales = (ref.split_fp4_paged_cache(cache), None) if fp4 else ref.split_fp8_paged_cache(cache)
    capacity = blocks_per_request * block_kv
    logits = ref.paged_mqa_logits(q_f, k_blocks, weights, context_lens, table, capacity, scales)
    bound = ref.paged_mqa_logits(q_f.abs(), k_blocks.abs(), weights.abs(), context_lens, table, capacity, scales)
    args = (to_device(q, device), cache.to(device), weights.to(device), context_lens.to(device), table.to(device))
    return args, logits, bound


# next_n = 2 (MTP): empty and one-key rows, fewer keys than topk, lengths that are not multiples of
# block_kv (64, V4's indexer page), a full table.
PAGED_LENS = [[0, 1], [7, 8], [100, 101], [191, 192]]


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("num_splits", [None, 2])
def test_paged_topk_matches_reference(device, fp4, num_splits):
    args, logits, bound = paged_problem(device, fp4, PAGED_LENS, block_kv=64, blocks_per_request=3)
    out = indexer.fp8_paged_mqa_topk(*args, topk=16, num_splits=num_splits)
    assert_topk(out.cpu(), logits, bound, 16)


def test_paged_topk_v4_topk512(device):
    """V4's real top-512, over up to 1100 keys: 3 tiles of 512 keys per row, merged across 2 splits."""
    lens = [[300, 301], [1099, 1100]]
    args, logits, bound = paged_problem(device, False, lens, block_kv=64, blocks_per_request=18)
    out = indexer.fp8_paged_mqa_topk(*args, topk=512, num_splits=2)
    assert_topk(out.cpu(), logits, bound, 512)


def test_paged_topk_1d_context_lens(device):
    args, logits, bound = paged_problem(
        device, False, PAGED_LENS, block_kv=64, blocks_per_request=3, context_lens_1d=True
    )
    out = indexer.fp8_paged_mqa_topk(*args, topk=16)
    assert_topk(out.cpu(), logits, bound, 16)


def test_paged_topk_max_context_len_bounds_positions(device):
    args, logits, bound = paged_problem(device, False, [[150, 151]], block_kv=64, blocks_per_request=3)
    out = indexer.fp8_paged_mqa_topk(*args, topk=16, max_context_len=120)
    assert_topk(out.cpu(), logits[:, :120], bound[:, :120], 16)


def test_topk_never_materialises_logits(device, monkeypatch):
    """Every tensor the paged top-k allocates is far smaller than one [rows, context] logits matrix."""
    args, logits, bound = paged_problem(device, False, [[2000, 2001]], block_kv=64, blocks_per_request=64)
    rows, context = 2, 64 * 64
    sizes = []
    real_empty = torch.empty

    def recording_empty(*shape, **kwargs):
        t = real_empty(*shape, **kwargs)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    out = indexer.fp8_paged_mqa_topk(*args, topk=128)
    monkeypatch.undo()
    assert sizes and max(sizes) <= rows * context // 4, f"allocations {sizes}"
    assert_topk(out.cpu(), logits, bound, 128)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    for name in (
        "_mqa_topk_triton",
        "_paged_topk_triton",
        "_dequant_query",
        "_dequant_ragged_keys",
        "_dequant_paged_keys",
    ):
        monkeypatch.setattr(indexer, name, launched)


@pytest.mark.parametrize(
    "name,changes",
    [
        ("topk", dict(topk=0)),
        ("num_splits", dict(num_splits=0)),
        ("max_context_len", dict(max_context_len=-1)),
        ("weights", dict(weights=torch.randn(3, HEADS))),
        ("context_lens", dict(context_lens=torch.zeros(1, 3, dtype=torch.int32))),
        ("kv_cache", dict(kv_cache=torch.zeros(4, 64, 1, HEAD_DIM // 2 + 4, dtype=torch.uint8))),  # FP4 width, FP8 q
    ],
)
def test_paged_topk_bad_input(no_launch, name, changes):
    args, _, _ = paged_problem("cpu", False, [[5, 6]], block_kv=64, blocks_per_request=1)
    kw = dict(zip(("q", "kv_cache", "weights", "context_lens", "block_table"), args))
    kw.update(changes)
    with pytest.raises(KernelInputError, match=rf"^{re.escape(name)}: "):
        indexer.fp8_paged_mqa_topk(**kw)


def test_mqa_topk_bad_input(no_launch):
    q = torch.randn(2, HEADS, HEAD_DIM).to(FP8)
    kv = (torch.randn(20, HEAD_DIM).to(FP8), torch.ones(20))
    w, ks, ke = torch.randn(2, HEADS), torch.zeros(2, dtype=torch.int32), torch.full((2,), 20, dtype=torch.int32)
    with pytest.raises(KernelInputError, match=r"^topk: "):
        indexer.fp8_mqa_topk(q, kv, w, ks, ke, topk=-3)
    with pytest.raises(KernelInputError, match=r"^q: "):
        indexer.fp8_mqa_topk(q.float(), kv, w, ks, ke)
    with pytest.raises(KernelInputError, match=r"^cu_seq_len_k_end: "):
        indexer.fp8_mqa_topk(q, kv, w, ks, ke[:1])
