"""Sparse FP8 decode (`flash_mla_with_kvcache`, sparse path): the Triton kernel under the interpreter
against `ref_sparse_decode`, and the reference against `sparse_attention` on the logical rows.

Real V4 head counts and head dim (64 / 128 heads, 512); small batches, windows and top-k so the
interpreter stays fast (V4 uses a 128-token window and 512 compressed candidates).

Tolerances (stated once, by dtype):
- out (bf16): |out - ref| <= 2^-8 * colmax + 2^-7 * |ref|. The kernel rounds the softmax weights to
  bf16 before the p.V tensor-core dot (relative 2^-9 each), which moves an output column by at most
  2^-9 * max over candidates of |V[:, col]| (colmax, taken over the cache); both sides then round to
  bf16, one ulp apart at most (2^-7 relative). A tiny floor (2^-120) covers subnormal columns.
- lse (fp32): rtol = atol = 2^-15 (FlashMLA's own test uses 2.01/65536): both sides compute logits
  from the same bf16 values in fp32, only the summation order differs. Infinite lse must match exactly.
- reference vs sparse_attention on the same rows: same math, same fp32 -> out within one bf16 ulp,
  lse within 2^-20 relative.
"""

import dataclasses
import math

import pytest
import torch

from ds_plugins.kernels import sparse_mla
from ds_plugins.kernels._runtime import KernelInputError
from ds_plugins.kernels.kv_cache import dequantize_kv_cache, quantize_kv_cache
from ds_plugins.kernels.reference.attention import sparse_attention
from ds_plugins.kernels.reference.sparse_mla import ref_sparse_decode
from ds_plugins.kernels.sparse_mla import (
    SparseDecodeSchedMeta,
    decode_num_splits,
    flash_mla_with_kvcache,
    get_mla_metadata,
    sparse_decode_fwd,
)

OUT_COL_ATOL = 2.0**-8
OUT_RTOL = 2.0**-7
OUT_FLOOR = 2.0**-120
LSE_TOL = 2.0**-15

PAGE = 64  # window (SWA) cache page
EXTRA_PAGE = 3  # the compressed cache has its own page size (V4: block_size / ratio); odd on purpose
WINDOW = 32  # window top-k (V4: 128)
EXTRA_TOPK = 40  # compressed top-k (V4: 512)
RATIO = 4  # C4 layers: one compressed entry per 4 tokens


# ------------------------------------------- cases -------------------------------------------


@dataclasses.dataclass
class Paged:
    """A paged FP8 cache holding several requests' rows in shuffled physical pages."""

    cache: torch.Tensor
    table: torch.Tensor  # [b, max_pages]: physical page of each logical page
    rows: list  # per request: its logical rows as the cache stores them (dequantised)
    page: int

    def slots(self, batch: int, positions: torch.Tensor) -> torch.Tensor:
        safe = positions.clamp_min(0)
        slot = self.table[batch][safe // self.page] * self.page + safe % self.page
        return torch.where(positions >= 0, slot, -1).to(torch.int32)


def build_paged(lengths, page, spare_pages=2, kv_fn=None) -> Paged:
    pages = [max(1, math.ceil(n / page)) for n in lengths]
    total = sum(pages) + spare_pages  # spare pages hold rows nobody may read
    physical = torch.randperm(total)
    table = torch.zeros(len(lengths), max(pages), dtype=torch.long)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = physical[start : start + n]
        start += n
    kv = torch.randn(total, page, 512)
    if kv_fn is not None:
        kv = kv_fn(kv)
    cache = quantize_kv_cache(kv.bfloat16())
    stored = dequantize_kv_cache(cache)
    rows = [stored[table[b, torch.arange(n) // page], torch.arange(n) % page] for b, n in enumerate(lengths)]
    return Paged(cache, table, rows, page)


def cache_to(cache: torch.Tensor, device) -> torch.Tensor:
    """Move a quantised cache with its whole padded pages, so stride(0) stays the padded page size."""
    num_blocks, page = cache.shape[0], cache.shape[1]
    pages = cache.as_strided((num_blocks, cache.stride(0)), (cache.stride(0), 1)).to(device)
    return pages[:, : page * 584].view(num_blocks, page, 1, 584)


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    main: Paged
    indices: torch.Tensor
    topk_length: torch.Tensor | None
    attn_sink: torch.Tensor | None
    extra: Paged | None = None
    extra_indices: torch.Tensor | None = None
    extra_topk_length: torch.Tensor | None = None
    window_pos: torch.Tensor | None = None  # logical positions behind indices (-1: none)
    extra_pos: torch.Tensor | None = None

    def to(self, device) -> "Case":
        """The same case on `device` (FP8 caches keep their padded page layout)."""

        def move(t):
            return None if t is None else t.to(device)

        def paged(p):
            return None if p is None else dataclasses.replace(p, cache=cache_to(p.cache, device))

        return dataclasses.replace(
            self,
            q=move(self.q),
            main=paged(self.main),
            indices=move(self.indices),
            topk_length=move(self.topk_length),
            attn_sink=move(self.attn_sink),
            extra=paged(self.extra),
            extra_indices=move(self.extra_indices),
            extra_topk_length=move(self.extra_topk_length),
        )

    def args(self):
        return (
            self.q,
            self.main.cache,
            self.indices,
            self.topk_length,
            self.attn_sink,
            self.extra.cache if self.extra else None,
            self.extra_indices,
            self.extra_topk_length,
        )

    def colmax(self):
        """Largest |value| per column over every row a candidate could read."""
        caches = [self.main.cache] + ([self.extra.cache] if self.extra else [])
        return torch.stack([dequantize_kv_cache(c).float().abs().amax(dim=(0, 1)) for c in caches]).amax(0)


def make_case(
    lengths,
    s_q,
    h_q,
    window=WINDOW,
    extra_topk=EXTRA_TOPK,
    with_extra=True,
    sink="random",
    garbage_past_length=False,
    main_kv_fn=None,
    extra_kv_fn=None,
) -> Case:
    """Requests of the given lengths; query token j of request b sits at position len - s_q + j. Window
    candidates are the last `window` positions (-1 before the start), compressed candidates a random
    top-k of the visible compressed entries (-1 padded)."""
    b = len(lengths)
    main = build_paged(lengths, PAGE, kv_fn=main_kv_fn)
    window_pos = torch.full((b, s_q, window), -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        for j in range(s_q):
            t = n - s_q + j
            visible = torch.arange(max(0, t - window + 1), max(0, t + 1))
            window_pos[i, j, : len(visible)] = visible
    topk_length = torch.tensor([min(n, window) for n in lengths], dtype=torch.int32)
    indices = torch.stack([main.slots(i, window_pos[i]) for i in range(b)])
    if garbage_past_length:
        # Valid slots past topk_length that would change the answer if read.
        for i in range(b):
            indices[i, :, topk_length[i] :] = main.slots(i, torch.zeros(window - topk_length[i], dtype=torch.long))

    case = Case(torch.randn(b, s_q, h_q, 512).bfloat16(), main, indices, topk_length, None, window_pos=window_pos)
    if sink == "random":
        case.attn_sink = torch.randn(h_q) * 2
    elif sink is not None:
        case.attn_sink = sink
    if with_extra:
        n_comp = [n // RATIO for n in lengths]
        extra = build_paged([max(c, 1) for c in n_comp], EXTRA_PAGE, kv_fn=extra_kv_fn)
        extra_pos = torch.full((b, s_q, extra_topk), -1, dtype=torch.long)
        for i, n in enumerate(lengths):
            for j in range(s_q):
                visible = max(0, n - s_q + j + 1) // RATIO
                chosen = torch.randperm(visible)[:extra_topk]
                extra_pos[i, j, : len(chosen)] = chosen
        case.extra, case.extra_pos = extra, extra_pos
        case.extra_indices = torch.stack([extra.slots(i, extra_pos[i]) for i in range(b)])
        case.extra_topk_length = torch.tensor([min(c, extra_topk) for c in n_comp], dtype=torch.int32)
        if garbage_past_length:
            for i in range(b):
                cut = case.extra_topk_length[i]
                case.extra_indices[i, :, cut:] = extra.slots(i, torch.zeros(extra_topk - cut, dtype=torch.long))
    return case


# ------------------------------------------- checks ------------------------------------------


def assert_decode_close(out, lse, ref_out, ref_lse, colmax):
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "out must be finite, empty rows included"
    err = (out.float() - ref_out.float()).abs()
    bound = OUT_COL_ATOL * colmax + OUT_RTOL * ref_out.float().abs() + OUT_FLOOR
    assert torch.all(err <= bound), f"out: worst excess {(err - bound).max().item():.3g}"
    torch.testing.assert_close(lse, ref_lse, rtol=LSE_TOL, atol=LSE_TOL)


def run_and_check(case: Case, device, num_splits=None):
    """The kernel on `device` (the interpreter on CPU) against the reference on CPU."""
    out, lse = sparse_decode_fwd(*case.to(device).args(), num_splits=num_splits)
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse = ref_sparse_decode(*case.args())
    assert_decode_close(out, lse, ref_out, ref_lse, case.colmax())
    return out, lse, ref_out, ref_lse


# ------------------------------------- kernel vs reference -----------------------------------


def test_the_kernel_path_is_what_runs(device):
    """Guard against comparing the reference with itself: on CPU without a GPU the interpreter must be
    on (tests/kernels/conftest.py sets TRITON_INTERPRET before ds_plugins.kernels is imported)."""
    if device == "cuda" or not torch.cuda.is_available():
        assert sparse_mla.use_triton(torch.empty(0, device=device))


@pytest.mark.parametrize("h_q", [64, 128])
def test_mtp_window_and_compressed(h_q, device):
    """MTP (s_q=2), windows straddling page boundaries in shuffled pages, compressed candidates from
    a cache with its own odd page size, both top-k lengths, per-head sink; one request near its start."""
    case = make_case([150, 70, 9], s_q=2, h_q=h_q)
    _, lse, _, _ = run_and_check(case, device)
    assert torch.isfinite(lse).all()
    # The windows really cross page boundaries and land in non-consecutive physical pages.
    first, last = case.window_pos[0, 1, 0], case.window_pos[0, 1, WINDOW - 1]
    assert first // PAGE != last // PAGE
    assert case.main.table[0, first // PAGE] + 1 != case.main.table[0, last // PAGE]


@pytest.mark.parametrize("lengths", [[1, 3], [2, 0]])
def test_window_at_sequence_start(lengths, device):
    """Requests of 0..3 tokens: windows mostly -1, few or no compressed entries, MTP tokens before
    the start attend to nothing (out 0, lse +inf)."""
    case = make_case(lengths, s_q=2, h_q=64)
    _, _, _, ref_lse = run_and_check(case, device)
    assert torch.isinf(ref_lse).any()  # the case does contain empty rows


def test_zero_topk_lengths(device):
    """topk_length 0 and extra_topk_length 0: nothing attended -> out 0, lse +inf; other requests unaffected."""
    case = make_case([100, 60], s_q=1, h_q=64)
    case.topk_length[0] = 0
    case.extra_topk_length[0] = 0
    out, lse, _, _ = run_and_check(case, device)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))
    assert torch.isfinite(lse[1]).all()


def test_all_indices_invalid(device):
    """-1 everywhere for one request; slots past the cache's last one for the other (FlashMLA would
    fault on those; here they are skipped like -1)."""
    case = make_case([100, 60], s_q=2, h_q=64)
    num_slots = case.main.cache.shape[0] * PAGE
    num_extra_slots = case.extra.cache.shape[0] * EXTRA_PAGE
    case.indices[0] = -1
    case.extra_indices[0] = -1
    case.indices[1] = num_slots + torch.arange(WINDOW, dtype=torch.int32)
    case.extra_indices[1] = num_extra_slots
    case.topk_length = case.extra_topk_length = None
    out, lse, _, _ = run_and_check(case, device)
    assert torch.all(out == 0) and torch.all(lse == float("inf"))


def test_first_chunks_empty_later_ones_valid(device):
    """A row whose first candidate steps hold nothing valid (whole window list -1 for one request,
    first 32 window candidates -1 for the other) must still pick up the later ones."""
    case = make_case([150, 120], s_q=1, h_q=64, window=64)
    case.indices[0] = -1
    case.indices[1, :, :32] = -1
    _, lse, _, _ = run_and_check(case, device)
    assert torch.isfinite(lse).all()


def test_lengths_cut_valid_indices(device):
    """Fewer valid candidates than top-k, and valid-looking slots past topk_length that must be ignored."""
    case = make_case([20, 13], s_q=1, h_q=64, garbage_past_length=True)
    run_and_check(case, device)
    # The slots past each length would change the answer if they were read.
    ref_cut, _ = ref_sparse_decode(*case.args())
    for uncut in (dataclasses.replace(case, topk_length=None), dataclasses.replace(case, extra_topk_length=None)):
        assert not torch.equal(ref_sparse_decode(*uncut.args())[0], ref_cut)


def test_window_only_no_sink_no_lengths(device):
    case = make_case([90, 40], s_q=1, h_q=64, with_extra=False, sink=None)
    case.topk_length = None
    run_and_check(case, device)


@pytest.mark.parametrize("h_q", [20, 64])
def test_padded_and_odd_head_counts(h_q, device):
    """16 real heads padded with zero queries to 64 (vLLM pads to 64/128): the padded rows are finite
    (uniform softmax); and a head count that is not a power of two."""
    case = make_case([80, 33], s_q=2, h_q=h_q)
    if h_q == 64:
        case.q[:, :, 16:] = 0
    out, lse, _, _ = run_and_check(case, device)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(1e4 - lse) = inf -> 0
def test_sink_extremes(device):
    """sink -inf (no effect), 0, +inf (out 0), large positive/negative, per head."""
    specials = torch.tensor([float("-inf"), 0.0, float("inf"), 1e4, -1e4, 30.0, -30.0, 1.0])
    sink = specials.repeat(8)
    case = make_case([120, 50], s_q=1, h_q=64, sink=sink)
    out, _, _, _ = run_and_check(case, device)
    no_sink = sparse_decode_fwd(*dataclasses.replace(case, attn_sink=None).to(device).args())[0].cpu()
    heads = torch.arange(64)
    assert torch.all(out[:, :, (heads % 8) == 2] == 0)  # +inf
    assert torch.all(out[:, :, (heads % 8) == 3] == 0)  # 1e4
    assert torch.equal(out[:, :, (heads % 8) == 0], no_sink[:, :, (heads % 8) == 0])  # -inf
    assert torch.equal(out[:, :, (heads % 8) == 4], no_sink[:, :, (heads % 8) == 4])  # -1e4


def test_fp8_scale_extremes(device):
    """Blocks of tiny and huge magnitude (UE8M0 bytes at the quantiser's floor, 114, and near 219),
    mixed in one row; queries are zero on the huge block so logits stay finite while the output
    carries its values."""

    def extremes(kv):
        kv[..., 0:64] *= 2.0**90  # huge block
        kv[..., 64:128] *= 1e-30  # tiny block: floored scale
        kv[..., 128:192] *= 1e-6
        return kv

    case = make_case([100, 70], s_q=1, h_q=64, main_kv_fn=extremes, extra_kv_fn=extremes)
    case.q[..., 0:64] = 0
    bytes_ = case.main.cache.view(torch.uint8).as_strided(
        (case.main.cache.shape[0], case.main.cache.stride(0)), (case.main.cache.stride(0), 1)
    )
    scale_bytes = bytes_[:, PAGE * 576 : PAGE * 584].reshape(-1, PAGE, 8)[..., :7]
    assert scale_bytes[..., 0].min() >= 200 and scale_bytes[..., 1].max() == 114
    out, _, _, _ = run_and_check(case, device)
    assert out[..., :64].float().abs().max() > 2.0**80


def test_raw_scale_bytes_near_both_ends(device):
    """The kernel reads any UE8M0 byte, not only the quantiser's range (114..247 for bf16 input):
    scale bytes 1, 2, 7 (2^-126..2^-120) and 238, 244 (2^111, 2^117) written directly, e4m3 values
    kept below 0.5 so the huge columns stay finite; queries are zero on the huge blocks."""
    case = make_case([64, 64], s_q=1, h_q=64, with_extra=False)
    cache = case.main.cache
    storage = cache.as_strided((cache.shape[0], cache.stride(0)), (cache.stride(0), 1))
    scale_area = storage[:, PAGE * 576 : PAGE * 584].view(-1, PAGE, 8)
    scale_area[..., :7] = torch.tensor([1, 2, 238, 7, 244, 127, 100], dtype=torch.uint8)
    nope = storage[:, : PAGE * 576].view(-1, PAGE, 576)[..., :448]
    nope.copy_((torch.rand(nope.shape) - 0.5).to(torch.float8_e4m3fn).view(torch.uint8))
    case.q[..., 128:192] = 0
    case.q[..., 256:320] = 0
    out, _, _, _ = run_and_check(case, device)
    assert out[..., 256:320].float().abs().max() > 2.0**100


def test_split_kv_on_and_off_agree(device):
    """1, 2 and 5 splits of the candidate axis (split boundaries inside the window list, at its end
    and inside the compressed list) give the reference's answer and agree with each other. (Each
    split rounds its softmax weights to bf16 against its own running max, so splits differ from
    each other by the same p-rounding term the reference tolerance allows, not by exactly zero.)
    The empty request checks that merging splits with nothing gives out 0 and lse +inf."""
    case = make_case([200, 90, 0], s_q=2, h_q=64, window=96, extra_topk=128)
    assert sparse_mla.DECODE_CONFIG.block_n == 16  # 6 window + 8 compressed chunks of 16
    outs = [run_and_check(case, device, num_splits=n)[:2] for n in (1, 2, 5)]
    for out, lse in outs[1:]:
        assert_decode_close(out, lse, *outs[0], case.colmax())


def test_split_count_is_a_function_of_shapes():
    """The split heuristic reads shapes and a device constant only: the benchmark shape (batch 64,
    64 heads, 128 + 512 candidates) already fills an H100 and gets none; a 1M-token C128 decode
    (128 + 8192 candidates, batch 1) gets many; never more than MAX_SPLITS."""
    assert decode_num_splits(64, 1, 64, 128, 512, target_programs=132) == 1
    long = decode_num_splits(1, 1, 64, 128, 8192, target_programs=132)
    assert 16 <= long <= sparse_mla.MAX_SPLITS
    assert decode_num_splits(1, 1, 64, 128, 0, target_programs=132) == 1  # too few candidates to split
    assert decode_num_splits(1, 1, 128, 128, 10**7, target_programs=10**6) == sparse_mla.MAX_SPLITS


# --------------------------------- reference vs sparse_attention ----------------------------


def test_reference_matches_sparse_attention_on_logical_rows():
    """The reference reads pages through slots; here the same attention is computed from each
    request's logical rows and positions, with no paging at all: the layout code is checked
    independently of the kernel."""
    case = make_case([150, 70, 5], s_q=2, h_q=64)
    ref_out, ref_lse = ref_sparse_decode(*case.args())
    b, s_q = case.q.shape[:2]
    scale = 512**-0.5
    for i in range(b):
        n_window = case.main.rows[i].shape[0]
        rows = torch.cat([case.main.rows[i], case.extra.rows[i]])
        window = case.window_pos[i].masked_fill(torch.arange(WINDOW) >= case.topk_length[i], -1)
        extra = case.extra_pos[i].masked_fill(torch.arange(EXTRA_TOPK) >= case.extra_topk_length[i], -1)
        extra = torch.where(extra >= 0, extra + n_window, -1)
        out, _, lse = sparse_attention(
            case.q[i], rows, torch.cat([window, extra], dim=-1), scale, attn_sink=case.attn_sink
        )
        assert torch.allclose(ref_out[i].float(), out.float(), rtol=OUT_RTOL, atol=0)
        torch.testing.assert_close(ref_lse[i].T, lse, rtol=2.0**-20, atol=2.0**-20)


# ---------------------------------- FlashMLA's Python contract -------------------------------


def test_flash_mla_with_kvcache_contract(device):
    """Arguments by FlashMLA's names and order; the sched meta records the first call's shapes and
    rejects other shapes later; lse comes back as [b, h_q, s_q]."""
    cpu_case = make_case([100, 40], s_q=2, h_q=64)
    case = cpu_case.to(device)
    sched, none = get_mla_metadata(case.topk_length, 64, 1, whatever=True)
    assert none is None and isinstance(sched, SparseDecodeSchedMeta) and not sched.have_initialized
    kwargs = dict(
        softmax_scale=None,
        causal=False,
        is_fp8_kvcache=True,
        indices=case.indices,
        attn_sink=case.attn_sink,
        extra_k_cache=case.extra.cache,
        extra_indices_in_kvcache=case.extra_indices,
        topk_length=case.topk_length,
        extra_topk_length=case.extra_topk_length,
    )
    out, lse = flash_mla_with_kvcache(case.q, case.main.cache, None, None, 512, sched, None, **kwargs)
    assert sched.have_initialized and sched.config.b == 2 and sched.config.extra_page_block_size == EXTRA_PAGE
    assert lse.shape == (2, 64, 2)
    ref_out, ref_lse = ref_sparse_decode(*cpu_case.args())
    assert_decode_close(out.cpu(), lse.cpu(), ref_out, ref_lse, cpu_case.colmax())

    # Same shapes, other lengths: fine (no value-dependent plan).
    kwargs["topk_length"] = case.topk_length - 1
    flash_mla_with_kvcache(case.q, case.main.cache, None, None, 512, sched, **kwargs)
    # Other batch: the sched meta says so.
    kwargs.update(
        indices=case.indices[:1],
        extra_indices_in_kvcache=case.extra_indices[:1],
        topk_length=case.topk_length[:1],
        extra_topk_length=case.extra_topk_length[:1],
    )
    with pytest.raises(KernelInputError, match="tile_scheduler_metadata.*b 2 -> 1"):
        flash_mla_with_kvcache(case.q[:1], case.main.cache, None, None, 512, sched, **kwargs)


def test_reference_dispatch_without_triton(monkeypatch):
    """Where Triton cannot run, the public function returns the reference's answer in the same layout."""
    case = make_case([50, 20], s_q=2, h_q=64)
    monkeypatch.setattr(sparse_mla, "use_triton", lambda t: False)
    out, lse = flash_mla_with_kvcache(
        case.q,
        case.main.cache,
        None,
        None,
        512,
        get_mla_metadata()[0],
        is_fp8_kvcache=True,
        indices=case.indices,
        attn_sink=case.attn_sink,
        extra_k_cache=case.extra.cache,
        extra_indices_in_kvcache=case.extra_indices,
        topk_length=case.topk_length,
        extra_topk_length=case.extra_topk_length,
    )
    ref_out, ref_lse = ref_sparse_decode(*case.args())
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse) and lse.shape == (2, 64, 2)


# ---------------------------------------- bad input ------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come before it."""

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched before the bad argument was reported")

    for name in ("_sparse_decode_kernel", "_combine_splits_kernel"):
        monkeypatch.setattr(sparse_mla, name, Forbidden())


def _bad(case, **change):
    args = dict(
        q=case.q,
        k_cache=case.main.cache,
        block_table=None,
        cache_seqlens=None,
        head_dim_v=512,
        tile_scheduler_metadata=get_mla_metadata()[0],
        is_fp8_kvcache=True,
        indices=case.indices,
        attn_sink=case.attn_sink,
        extra_k_cache=case.extra.cache,
        extra_indices_in_kvcache=case.extra_indices,
        topk_length=case.topk_length,
        extra_topk_length=case.extra_topk_length,
    )
    args.update(change)
    return args


BAD_DECODE = {
    "q": lambda c: dict(q=c.q.half()),  # dtype
    "q ": lambda c: dict(q=torch.zeros(2, 1, 64, 576, dtype=torch.bfloat16)),  # last dim (V3.2's 576)
    "indices": lambda c: dict(indices=c.indices[:1]),  # batch != q's batch
    "indices  ": lambda c: dict(indices=c.indices.long()),
    "k_cache": lambda c: dict(k_cache=torch.zeros(4, 64, 1, 656, dtype=torch.uint8)),  # V3.2's 656 bytes
    "k_cache ": lambda c: dict(k_cache=c.main.cache.view(torch.uint8).float()),
    "attn_sink": lambda c: dict(attn_sink=torch.zeros(63)),  # length != h_q
    "attn_sink ": lambda c: dict(attn_sink=torch.zeros(64, dtype=torch.bfloat16)),
    "topk_length": lambda c: dict(topk_length=c.topk_length.long()),
    "extra_k_cache": lambda c: dict(extra_k_cache=torch.zeros(4, 3, 1, 512, dtype=torch.uint8)),
    "extra_indices_in_kvcache": lambda c: dict(extra_k_cache=None, extra_topk_length=None),
    "extra_topk_length": lambda c: dict(extra_topk_length=torch.zeros(3, dtype=torch.int32)),
    "head_dim_v": lambda c: dict(head_dim_v=448),
    "indices   ": lambda c: dict(indices=None),  # the dense path
    "is_fp8_kvcache": lambda c: dict(is_fp8_kvcache=False),
    "causal": lambda c: dict(causal=True),
    "num_splits": lambda c: dict(num_splits=4),
}


@pytest.mark.parametrize("name", list(BAD_DECODE))
def test_bad_input_names_the_argument(name, no_launch):
    case = make_case([70, 30], s_q=1, h_q=64)
    with pytest.raises(KernelInputError, match=f"^{name.strip()}:"):
        flash_mla_with_kvcache(**_bad(case, **BAD_DECODE[name](case)))


def test_cache_view_with_wrong_token_stride(no_launch):
    """A (blocks, page, 1, 584) tensor whose stride(1) is not 584 is not V4's cache view."""
    case = make_case([70, 30], s_q=1, h_q=64)
    wide = torch.zeros(4, PAGE, 1, 600, dtype=torch.uint8)[..., :584]
    with pytest.raises(KernelInputError, match="^k_cache:.*stride"):
        flash_mla_with_kvcache(**_bad(case, k_cache=wide))
