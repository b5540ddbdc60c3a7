"""Triton sparse MLA for DeepSeek-V4, behind FlashMLA's Python contract.

Public names (same arguments, order, defaults and return values as `flash_mla.flash_mla_interface`):

- `flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None)`:
  prefill over bf16 kv rows -> (out, max_logits, lse).
- `get_mla_metadata(*args, **kwargs)` -> (SparseDecodeSchedMeta(), None), and
  `flash_mla_with_kvcache(...)`: the sparse FP8 decode path over V4's paged cache (see kv_cache.py)
  -> (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32). The dense path is not implemented.

Both kernels compute, per query token and head, one online softmax over the selected rows
(natural-log lse, fp32 statistics and accumulators, bf16 tensor-core dots), apply the per-head
sink as out *= 1 / (1 + exp(sink - lse)), and give out 0 / lse +inf (max_logits -inf) to a row
with no valid candidate. A program owns one query token and a block of heads, so each gathered
(and, in decode, dequantised) KV row is fetched from memory once per head block and used by all
of its heads.

Decode splits the candidate axis (window candidates, then compressed ones) into `num_splits`
contiguous ranges, each written as a normalised partial (out, lse) and merged by a combine
kernel weighted by exp(lse_split - lse). The split count is chosen from shapes only
(`decode_num_splits`), so launches never depend on tensor values (CUDA-graph safe); variable
lengths (topk_length, -1 indices) are masks and loop bounds inside the kernels.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ds_plugins.kernels._runtime import (
    INTERPRET,
    KernelInputError,
    cdiv,
    expect,
    next_pow2,
    target_capability,
    use_triton,
)
from ds_plugins.kernels._tl import dot
from ds_plugins.kernels.kv_cache import BYTES_PER_TOKEN, CACHE_DTYPES, HEAD_DIM
from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd, ref_sparse_decode

# ---------------------------------------------------------------------------------------------
# Launch configuration. Not timed (no GPU was available); chosen from what ptxas reports when
# the kernels are compiled for sm_90 and sm_120 (Triton 3.9, registers / spills / shared memory):
# - q is never held whole in registers: under mma.sync (SM80, SM120; also what Triton emits on
#   SM90 for these shapes) a [BLOCK_H, 512] bf16 A operand costs ~128 registers per thread, which
#   made the first version spill. The logits are summed over 8 groups of 64 dims instead, each
#   [BLOCK_H, 64] slice of q re-read from L1. What stays live is the fp32 [BLOCK_H, 512]
#   accumulator: 64 (decode) / 128 (prefill) registers per thread at 8 warps.
# - Decode: 32 heads x 16 candidates, 8 warps: 209-220 registers, no spills, 66 KiB of shared
#   memory (fits SM120's 99 KiB per block). 32 candidates per step spilled; 64 heads spilled.
#   Each row is dequantised once per head block; at the benchmark shape (batch 64, 64 heads)
#   that is 128 programs, about one per SM of an H100, so no split-KV is needed there.
# - Prefill: all 64 heads of a token per program where shared memory allows (each gathered row
#   read once per token), 16 candidates, 8 warps: 248-254 registers, no spills, 72 KiB on SM90
#   but 98 KiB on SM120, too close to its 99 KiB limit; SM12x takes 32 heads (65 KiB, 172 regs).
# - num_stages = 2: Triton pipelines the gathers (index load -> row load) one step ahead.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_h: int  # heads per program (rounded down to the problem's, at least 16 for tl.dot)
    block_n: int  # candidates per online-softmax step
    num_warps: int
    num_stages: int


DECODE_CONFIG = LaunchConfig(block_h=32, block_n=16, num_warps=8, num_stages=2)
PREFILL_CONFIG = LaunchConfig(block_h=64, block_n=16, num_warps=8, num_stages=2)
PREFILL_CONFIG_SM12X = LaunchConfig(block_h=32, block_n=16, num_warps=8, num_stages=2)
COMBINE_BLOCK_H = 16
# Split-KV: aim for about one program per SM, but never give a split fewer than
# MIN_CANDIDATES_PER_SPLIT candidates: below that, writing and re-reading the fp32 partials
# costs more than the parallelism gains.
MIN_CANDIDATES_PER_SPLIT = 256
MAX_SPLITS = 64
DEFAULT_TARGET_PROGRAMS = 132  # SMs of an H100 SXM; used where no CUDA device is asked

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
ROW_DIM = HEAD_DIM  # 512: key dims = value dims (V includes the RoPE part)


# ----------------------------------------- Triton -------------------------------------------


@triton.jit
def _softmax_update(logits, valid, rows, m, l, acc, INTERPRET: tl.constexpr):
    """Fold BLOCK_N candidates into the running softmax of BLOCK_H queries.

    logits [BLOCK_H, BLOCK_N] fp32 (already scaled), rows [BLOCK_N, 512] bf16 (the values).
    m is the running max of the natural-units logits (so max_logits needs no conversion),
    l the running sum of exp(logit - m), acc the running sum of exp(logit - m) * row."""
    logits = tl.where(valid[None, :], logits, float("-inf"))
    m_new = tl.maximum(m, tl.max(logits, 1))
    # Rows that have seen no valid candidate yet keep m = -inf; shift them by 0 instead so the
    # exponentials below are exp(-inf) = 0 and never exp(-inf + inf) = NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((logits - shift[:, None]) * LOG2E)
    rescale = tl.exp2((m - shift) * LOG2E)
    l = l * rescale + tl.sum(p, 1)
    acc = dot(p.to(tl.bfloat16), rows, acc * rescale[:, None], INTERPRET)
    return m_new, l, acc


@triton.jit
def _finish(o, lse, nonempty, sink_ptr, heads, head_ok, HAS_SINK: tl.constexpr):
    """Apply the sink to a normalised output and FlashMLA's empty-row convention."""
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
        # exp(lse) / (exp(lse) + exp(sink)): sink = +inf -> 0, sink = -inf -> 1.
        o = o * (1.0 / (1.0 + tl.exp(sink - lse)))[:, None]
    o = tl.where(nonempty[:, None], o, 0.0)
    lse = tl.where(nonempty, lse, float("inf"))
    return o, lse


@triton.jit
def _bf16_step(
    q_rows,
    kv_ptr,
    kv_row_stride,
    s_kv,
    rows_idx,
    in_list,
    m,
    l,
    acc,
    sm_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One online-softmax step over BLOCK_N rows of a bf16 [s_kv, 1, 512] kv (invalid rows: masked).

    Logits are summed over 8 groups of 64 dims, re-reading each [BLOCK_H, 64] slice of q (L1-
    resident) per group rather than holding all of q as a dot operand: see _fp8_step."""
    valid = in_list & (rows_idx >= 0) & (rows_idx < s_kv)
    row_ptrs = kv_ptr + tl.where(valid, rows_idx, 0).to(tl.int64)[:, None] * kv_row_stride
    lane = tl.arange(0, 64)
    logits = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for group in tl.static_range(8):
        q_group = tl.load(q_rows + group * 64 + lane[None, :])
        k_group = tl.load(row_ptrs + group * 64 + lane[None, :], mask=valid[:, None], other=0.0)
        logits = dot(q_group, tl.trans(k_group), logits, INTERPRET)
    rows = tl.load(row_ptrs + tl.arange(0, 512)[None, :], mask=valid[:, None], other=0.0)
    return _softmax_update(logits * sm_scale, valid, rows, m, l, acc, INTERPRET)


@triton.jit
def _fp8_slot_addresses(page_stride, page_size, num_slots, slots, in_list):
    """Byte offsets of the slots' token data (448 e4m3 + 64 bf16) and scale bytes (7 UE8M0 + pad)
    in a V4 FP8 cache; invalid slots (not in the list, < 0, past the cache) point at byte 0, masked."""
    valid = in_list & (slots >= 0) & (slots < num_slots)
    safe = tl.where(valid, slots, 0)
    page = (safe // page_size).to(tl.int64)
    offset = (safe % page_size).to(tl.int64)
    page_base = page * page_stride
    return page_base + offset * 576, page_base + page_size * 576 + offset * 8, valid


@triton.jit
def _dequant(raw, scale_bytes):
    """e4m3 bytes times 2^(scale byte - 127) as bf16 (exact: e4m3 * 2^k is a bf16 value).

    The scale is built from its bits (exact for bytes 1..254; byte 0, 2^-127, reads as 0). The
    product is taken in fp32: under the interpreter, e4m3 -> bf16 casts are wrong (Triton 3.9)."""
    scale = (scale_bytes.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale).to(tl.bfloat16)


@triton.jit
def _fp8_group(cache_ptr, data, scales, valid, GROUP: tl.constexpr):
    """Dims [64*GROUP, 64*GROUP + 64) of the slots' rows as bf16 [BLOCK_N, 64]: e4m3 NoPE times its
    UE8M0 scale for groups 0..6 (exact: e4m3 * 2^k is a bf16), the bf16 RoPE part for group 7."""
    lane = tl.arange(0, 64)
    if GROUP < 7:
        raw = tl.load(cache_ptr + data[:, None] + (GROUP * 64) + lane[None, :], mask=valid[:, None], other=0)
        scale_bytes = tl.load(cache_ptr + scales + GROUP, mask=valid, other=0)
        return _dequant(raw, scale_bytes[:, None])
    else:
        rope_ptr = (cache_ptr + data + 448).to(tl.pointer_type(tl.bfloat16))
        return tl.load(rope_ptr[:, None] + lane[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _fp8_rows(cache_ptr, data, scales, valid, BLOCK_N: tl.constexpr):
    """Whole rows [BLOCK_N, 512] bf16, handled as 8 groups of 64 dims (see _fp8_group)."""
    group = tl.arange(0, 8)
    lane = tl.arange(0, 64)
    is_nope = group < 7
    raw = tl.load(
        cache_ptr + data[:, None, None] + (group[:, None] * 64 + lane[None, :])[None, :, :],
        mask=valid[:, None, None] & is_nope[None, :, None],
        other=0,
    )  # [N, 8, 64]
    scale_bytes = tl.load(
        cache_ptr + scales[:, None] + group[None, :], mask=valid[:, None] & is_nope[None, :], other=0
    )  # [N, 8]
    nope = _dequant(raw, scale_bytes[:, :, None])
    rope_ptr = (cache_ptr + data + 448).to(tl.pointer_type(tl.bfloat16))
    rope = tl.load(rope_ptr[:, None] + lane[None, :], mask=valid[:, None], other=0.0)  # [N, 64]
    rows = tl.where(is_nope[None, :, None], nope, rope[:, None, :])
    return tl.reshape(rows, [BLOCK_N, 512])


@triton.jit
def _fp8_step(
    q_rows,
    cache_ptr,
    page_stride,
    page_size,
    num_slots,
    slots,
    in_list,
    m,
    l,
    acc,
    sm_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One online-softmax step over BLOCK_N slots of a V4 FP8 cache.

    The logits are summed over the 8 groups of 64 dims, re-reading each [BLOCK_H, 64] slice of q
    (L1-resident) per group: a [BLOCK_H, 512] q held as a dot operand for the whole loop costs 128
    registers per thread under mma.sync (SM80/SM120), which is what made this kernel spill. The
    rows are then read again whole, as the p.V operand (L1 hits: the same bytes)."""
    data, scales, valid = _fp8_slot_addresses(page_stride, page_size, num_slots, slots, in_list)
    lane = tl.arange(0, 64)
    logits = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for group in tl.static_range(8):
        q_group = tl.load(q_rows + group * 64 + lane[None, :])
        logits = dot(q_group, tl.trans(_fp8_group(cache_ptr, data, scales, valid, group)), logits, INTERPRET)
    rows = _fp8_rows(cache_ptr, data, scales, valid, BLOCK_N)
    return _softmax_update(logits * sm_scale, valid, rows, m, l, acc, INTERPRET)


@triton.jit
def _sparse_prefill_kernel(
    q_ptr,
    q_stride_s,
    q_stride_h,
    kv_ptr,
    kv_row_stride,
    s_kv,
    idx_ptr,
    idx_stride_s,
    topk,
    topk_len_ptr,
    sink_ptr,
    out_ptr,
    max_logits_ptr,
    lse_ptr,
    h_q,
    sm_scale,
    HAS_TOPK_LEN: tl.constexpr,
    HAS_SINK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < h_q
    # Heads past h_q read head h_q - 1 (no masks in the inner loop); their results are not stored.
    q_rows = q_ptr + token * q_stride_s + tl.minimum(heads, h_q - 1)[:, None] * q_stride_h

    length = topk
    if HAS_TOPK_LEN:
        length = tl.maximum(tl.minimum(tl.load(topk_len_ptr + token), topk), 0)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)
    idx_row = idx_ptr + token * idx_stride_s
    for chunk in range(0, tl.cdiv(length, BLOCK_N)):
        pos = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        in_list = pos < length
        rows_idx = tl.load(idx_row + pos, mask=in_list, other=-1)
        m, l, acc = _bf16_step(
            q_rows, kv_ptr, kv_row_stride, s_kv, rows_idx, in_list, m, l, acc, sm_scale, BLOCK_H, BLOCK_N, INTERPRET
        )

    nonempty = l > 0.0
    lse = m + tl.log(tl.where(nonempty, l, 1.0))
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    o, lse = _finish(o, lse, nonempty, sink_ptr, heads, head_ok, HAS_SINK)
    out_rows = token * h_q + heads
    dims = tl.arange(0, 512)
    tl.store(out_ptr + out_rows[:, None] * 512 + dims[None, :], o.to(tl.bfloat16), mask=head_ok[:, None])
    tl.store(max_logits_ptr + out_rows, m, mask=head_ok)
    tl.store(lse_ptr + out_rows, lse, mask=head_ok)


@triton.jit
def _sparse_decode_kernel(
    q_ptr,
    q_stride_b,
    q_stride_s,
    q_stride_h,
    cache_ptr,
    page_stride,
    page_size,
    num_slots,
    idx_ptr,
    idx_stride_b,
    idx_stride_s,
    topk,
    topk_len_ptr,
    x_cache_ptr,
    x_page_stride,
    x_page_size,
    x_num_slots,
    x_idx_ptr,
    x_idx_stride_b,
    x_idx_stride_s,
    x_topk,
    x_topk_len_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    s_q,
    h_q,
    sm_scale,
    chunks_per_split,
    HAS_TOPK_LEN: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_X_TOPK_LEN: tl.constexpr,
    HAS_SINK: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Grid (b * s_q, head blocks, splits). The candidate axis is the window list's chunks
    followed by the extra list's chunks; split s takes chunks [s*chunks_per_split, +chunks_per_split).

    WRITE_PARTIAL: out/lse are [b*s_q, splits, h_q, 512] / [b*s_q, splits, h_q] fp32 partials
    (normalised out, lse = -inf for a split with nothing); else the final bf16 out [b, s_q, h_q, 512]
    and lse [b, s_q, h_q]."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    batch = token // s_q
    q_token = token % s_q
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < h_q
    # Heads past h_q read head h_q - 1 (no masks in the inner loop); their results are not stored.
    q_rows = q_ptr + batch * q_stride_b + q_token * q_stride_s + tl.minimum(heads, h_q - 1)[:, None] * q_stride_h

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)
    first = split * chunks_per_split
    stop = first + chunks_per_split

    # Window candidates: chunks [0, cdiv(topk, BLOCK_N)) of the split axis; the loop stops at
    # the request's topk_length, which only shortens the work, never moves chunk boundaries.
    length = topk
    if HAS_TOPK_LEN:
        length = tl.maximum(tl.minimum(tl.load(topk_len_ptr + batch), topk), 0)
    idx_row = idx_ptr + batch * idx_stride_b + q_token * idx_stride_s
    for chunk in range(first, tl.minimum(stop, tl.cdiv(length, BLOCK_N))):
        pos = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        in_list = pos < length
        slots = tl.load(idx_row + pos, mask=in_list, other=-1)
        m, l, acc = _fp8_step(
            q_rows,
            cache_ptr,
            page_stride,
            page_size,
            num_slots,
            slots,
            in_list,
            m,
            l,
            acc,
            sm_scale,
            BLOCK_H,
            BLOCK_N,
            INTERPRET,
        )

    # Extra (compressed-cache) candidates: the chunks after the window's on the split axis.
    if HAS_EXTRA:
        window_chunks = tl.cdiv(topk, BLOCK_N)
        x_length = x_topk
        if HAS_X_TOPK_LEN:
            x_length = tl.maximum(tl.minimum(tl.load(x_topk_len_ptr + batch), x_topk), 0)
        x_idx_row = x_idx_ptr + batch * x_idx_stride_b + q_token * x_idx_stride_s
        for chunk in range(
            tl.maximum(first - window_chunks, 0), tl.minimum(stop - window_chunks, tl.cdiv(x_length, BLOCK_N))
        ):
            pos = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
            in_list = pos < x_length
            slots = tl.load(x_idx_row + pos, mask=in_list, other=-1)
            m, l, acc = _fp8_step(
                q_rows,
                x_cache_ptr,
                x_page_stride,
                x_page_size,
                x_num_slots,
                slots,
                in_list,
                m,
                l,
                acc,
                sm_scale,
                BLOCK_H,
                BLOCK_N,
                INTERPRET,
            )

    nonempty = l > 0.0
    lse = m + tl.log(tl.where(nonempty, l, 1.0))
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    dims = tl.arange(0, 512)
    if WRITE_PARTIAL:
        part_rows = (token * tl.num_programs(2) + split) * h_q + heads
        tl.store(out_ptr + part_rows[:, None] * 512 + dims[None, :], o, mask=head_ok[:, None])
        tl.store(lse_ptr + part_rows, tl.where(nonempty, lse, float("-inf")), mask=head_ok)
    else:
        o, lse = _finish(o, lse, nonempty, sink_ptr, heads, head_ok, HAS_SINK)
        out_rows = token * h_q + heads
        tl.store(out_ptr + out_rows[:, None] * 512 + dims[None, :], o.to(tl.bfloat16), mask=head_ok[:, None])
        tl.store(lse_ptr + out_rows, lse, mask=head_ok)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    sink_ptr,
    out_ptr,
    lse_ptr,
    h_q,
    num_splits,
    HAS_SINK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Merge the splits of one query token: lse = logsumexp_s(lse_s), out = sum_s exp(lse_s - lse) out_s.
    Grid (b * s_q, head blocks)."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < h_q
    dims = tl.arange(0, 512)
    first_row = token * num_splits * h_q + heads

    top = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for split in range(0, num_splits):
        top = tl.maximum(top, tl.load(part_lse_ptr + first_row + split * h_q, mask=head_ok, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)
    for split in range(0, num_splits):
        rows = first_row + split * h_q
        weight = tl.exp(tl.load(part_lse_ptr + rows, mask=head_ok, other=float("-inf")) - shift)  # 0 if empty
        part = tl.load(part_out_ptr + rows[:, None] * 512 + dims[None, :], mask=head_ok[:, None], other=0.0)
        total += weight
        acc += weight[:, None] * part

    nonempty = total > 0.0
    lse = shift + tl.log(tl.where(nonempty, total, 1.0))
    o = acc / tl.where(nonempty, total, 1.0)[:, None]
    o, lse = _finish(o, lse, nonempty, sink_ptr, heads, head_ok, HAS_SINK)
    out_rows = token * h_q + heads
    tl.store(out_ptr + out_rows[:, None] * 512 + dims[None, :], o.to(tl.bfloat16), mask=head_ok[:, None])
    tl.store(lse_ptr + out_rows, lse, mask=head_ok)


# ----------------------------------------- helpers ------------------------------------------


def _head_block(h_q: int, largest: int) -> int:
    """Heads per program: a power of two in [16, largest] (tl.dot needs >= 16 rows)."""
    return min(largest, max(16, next_pow2(h_q)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _expect_same_device(q: torch.Tensor, **tensors) -> None:
    """Every given (non-None) tensor lives on q's device."""
    for name, t in tensors.items():
        if t is not None:
            expect(name, t, device=q.device)


def prefill_config(capability: tuple[int, int] | None) -> LaunchConfig:
    """SM12x (RTX PRO 6000, DGX Spark) has 99 KiB of shared memory per block: smaller head blocks.
    capability: what target_capability() says for the launch (None off-GPU)."""
    if capability is not None and capability[0] == 12:
        return PREFILL_CONFIG_SM12X
    return PREFILL_CONFIG


def decode_config(capability: tuple[int, int] | None) -> LaunchConfig:
    """The same decode tiles on every target (they fit SM12x's shared memory and spill nowhere)."""
    return DECODE_CONFIG


def _target_programs(device: torch.device) -> int:
    """How many programs fill the GPU (one per SM); a fixed stand-in off-GPU. A property of
    the device, never of tensor values, so the split count stays fixed under graph capture."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_TARGET_PROGRAMS


def decode_num_splits(
    b: int, s_q: int, h_q: int, topk: int, extra_topk: int, target_programs: int = DEFAULT_TARGET_PROGRAMS
) -> int:
    """Split-KV count for a decode launch, from shapes only: enough splits that
    b * s_q * head blocks * splits reaches target_programs, but at least MIN_CANDIDATES_PER_SPLIT
    candidates per split, and at most MAX_SPLITS."""
    programs = b * s_q * cdiv(h_q, _head_block(h_q, DECODE_CONFIG.block_h))
    wanted = max(1, target_programs // programs)
    return max(1, min(wanted, (topk + extra_topk) // MIN_CANDIDATES_PER_SPLIT, MAX_SPLITS))


# ----------------------------------------- prefill ------------------------------------------


def flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill. q [s_q, h_q, 512] bf16, kv [s_kv, 1, 512] bf16, indices [s_q, 1, topk]
    int32 (-1 or >= s_kv: skipped), attn_sink [h_q] fp32, topk_length [s_q] int32 (only
    indices[i, :, :topk_length[i]] count) -> out [s_q, h_q, 512] bf16, max_logits [s_q, h_q] fp32,
    lse [s_q, h_q] fp32 (natural log; a row with nothing valid: out 0, max_logits -inf, lse +inf)."""
    expect("q", q, dtype=torch.bfloat16, ndim=3, last_dim=ROW_DIM)
    s_q, h_q, _ = q.shape
    expect("kv", kv, dtype=torch.bfloat16, ndim=3, last_dim=ROW_DIM)
    expect("kv", kv, shape=(None, 1, ROW_DIM))
    expect("indices", indices, dtype=torch.int32, ndim=3)
    expect("indices", indices, shape=(s_q, 1, None))
    if indices.shape[-1] < 1:
        raise KernelInputError(f"indices: expected at least one candidate per token, got shape {list(indices.shape)}")
    if d_v != ROW_DIM:
        raise KernelInputError(f"d_v: only {ROW_DIM} is supported (V4: the value is the whole latent), got {d_v}")
    if attn_sink is not None:
        expect("attn_sink", attn_sink, dtype=torch.float32, shape=(h_q,))
    if topk_length is not None:
        expect("topk_length", topk_length, dtype=torch.int32, shape=(s_q,))
    _expect_same_device(q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)

    if not use_triton(q):
        return ref_flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)

    q = _last_dim_contiguous(q)
    kv = _last_dim_contiguous(kv)
    indices = _last_dim_contiguous(indices)
    out = torch.empty(s_q, h_q, ROW_DIM, dtype=torch.bfloat16, device=q.device)
    max_logits = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(s_q, h_q, dtype=torch.float32, device=q.device)
    if s_q == 0 or h_q == 0:
        return out, max_logits, lse
    config = prefill_config(target_capability(q.device))
    block_h = _head_block(h_q, config.block_h)
    sink = attn_sink.contiguous() if attn_sink is not None else out
    lengths = topk_length.contiguous() if topk_length is not None else indices
    grid = (s_q, cdiv(h_q, block_h))  # tokens on axis 0: up to 2^31 - 1 of them
    _sparse_prefill_kernel[grid](
        q,
        q.stride(0),
        q.stride(1),
        kv,
        kv.stride(0),
        kv.shape[0],
        indices,
        indices.stride(0),
        indices.shape[-1],
        lengths,
        sink,
        out,
        max_logits,
        lse,
        h_q,
        float(sm_scale),
        HAS_TOPK_LEN=topk_length is not None,
        HAS_SINK=attn_sink is not None,
        BLOCK_H=block_h,
        BLOCK_N=config.block_n,
        INTERPRET=INTERPRET,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out, max_logits, lse


# ----------------------------------------- decode -------------------------------------------


@dataclasses.dataclass
class SparseDecodeSchedMeta:
    """What `get_mla_metadata` returns and `flash_mla_with_kvcache` fills on its first call.

    Like FlashMLA's FlashMLASchedMeta, one object serves one configuration: the first call
    records it, later calls with other shapes are an error. Unlike FlashMLA's, planning reads
    no tensor values (the split count is a function of shapes), so nothing here needs a host
    sync, and reuse across different topk_length values is allowed."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    num_splits: int | None = None  # split-KV count fixed at the first call
    tile_scheduler_metadata: None = None  # FlashMLA's field name; no device-side plan is needed


def get_mla_metadata(*args, **kwargs) -> tuple[SparseDecodeSchedMeta, None]:
    """FlashMLA's current get_mla_metadata: arguments are accepted and ignored (kept for the old
    interface); returns (an empty sched meta, None)."""
    return SparseDecodeSchedMeta(), None


def _check_cache(name: str, cache: torch.Tensor) -> None:
    expect(name, cache, dtype=CACHE_DTYPES, ndim=4, last_dim=BYTES_PER_TOKEN)
    expect(name, cache, shape=(None, None, 1, BYTES_PER_TOKEN))
    if cache.stride(3) != 1 or cache.stride(1) != BYTES_PER_TOKEN:
        raise KernelInputError(
            f"{name}: expected the (num_blocks, page, 1, {BYTES_PER_TOKEN}) view of V4's FP8 "
            f"cache with stride(1) == {BYTES_PER_TOKEN}, got strides {tuple(cache.stride())}"
        )
    if cache.shape[0] > 1 and cache.stride(0) < cache.shape[1] * BYTES_PER_TOKEN:
        raise KernelInputError(
            f"{name}: page stride {cache.stride(0)} is smaller than a page "
            f"({cache.shape[1]} tokens x {BYTES_PER_TOKEN} bytes)"
        )


def _check_decode_args(
    q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length, head_dim_v
) -> None:
    expect("q", q, dtype=torch.bfloat16, ndim=4, last_dim=ROW_DIM)
    b, s_q, h_q, _ = q.shape
    _check_cache("k_cache", k_cache)
    expect("indices", indices, dtype=torch.int32, ndim=3)
    expect("indices", indices, shape=(b, s_q, None))
    if indices.shape[-1] < 1:
        raise KernelInputError(f"indices: expected at least one candidate per token, got shape {list(indices.shape)}")
    if head_dim_v != ROW_DIM:
        raise KernelInputError(f"head_dim_v: only {ROW_DIM} is supported, got {head_dim_v}")
    if topk_length is not None:
        expect("topk_length", topk_length, dtype=torch.int32, shape=(b,))
    if attn_sink is not None:
        expect("attn_sink", attn_sink, dtype=torch.float32, shape=(h_q,))
    if extra_k_cache is None:
        for name, t in (("extra_indices_in_kvcache", extra_indices), ("extra_topk_length", extra_topk_length)):
            if t is not None:
                raise KernelInputError(f"{name}: given without extra_k_cache")
    else:
        _check_cache("extra_k_cache", extra_k_cache)
        if extra_indices is None:
            raise KernelInputError("extra_indices_in_kvcache: required when extra_k_cache is given")
        expect("extra_indices_in_kvcache", extra_indices, dtype=torch.int32, ndim=3)
        expect("extra_indices_in_kvcache", extra_indices, shape=(b, s_q, None))
        if extra_topk_length is not None:
            expect("extra_topk_length", extra_topk_length, dtype=torch.int32, shape=(b,))
    _expect_same_device(
        q,
        k_cache=k_cache,
        indices=indices,
        topk_length=topk_length,
        attn_sink=attn_sink,
        extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices,
        extra_topk_length=extra_topk_length,
    )


def sparse_decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse FP8 decode without the sched-meta bookkeeping (what flash_mla_with_kvcache runs).

    num_splits: split-KV count; None picks decode_num_splits(...) from the shapes and the device.
    -> out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32 (a transposed view, as FlashMLA returns it)."""
    _check_decode_args(
        q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length, head_dim_v
    )
    if num_splits is not None and num_splits < 1:
        raise KernelInputError(f"num_splits: expected a positive split count, got {num_splits}")
    return _sparse_decode(
        q,
        k_cache,
        indices,
        topk_length,
        attn_sink,
        extra_k_cache,
        extra_indices,
        extra_topk_length,
        head_dim_v,
        softmax_scale,
        num_splits,
    )


def _sparse_decode(
    q,
    k_cache,
    indices,
    topk_length,
    attn_sink,
    extra_k_cache,
    extra_indices,
    extra_topk_length,
    head_dim_v,
    softmax_scale,
    num_splits,
):
    """sparse_decode_fwd after its argument checks: dispatch, allocate, launch."""
    b, s_q, h_q, d_qk = q.shape
    if softmax_scale is None:
        softmax_scale = d_qk**-0.5
    if not use_triton(q):
        return ref_sparse_decode(
            q,
            k_cache,
            indices,
            topk_length,
            attn_sink,
            extra_k_cache,
            extra_indices,
            extra_topk_length,
            softmax_scale,
            head_dim_v,
        )

    topk = indices.shape[-1]
    extra_topk = extra_indices.shape[-1] if extra_k_cache is not None else 0
    config = decode_config(target_capability(q.device))
    chunks = cdiv(topk, config.block_n) + cdiv(extra_topk, config.block_n)
    if num_splits is None:
        num_splits = decode_num_splits(b, s_q, h_q, topk, extra_topk, _target_programs(q.device))
    chunks_per_split = cdiv(chunks, min(num_splits, chunks))
    num_splits = cdiv(chunks, chunks_per_split)  # no split left without candidates

    q = _last_dim_contiguous(q)
    indices = _last_dim_contiguous(indices)
    cache = k_cache.view(torch.uint8)
    out = torch.empty(b, s_q, h_q, ROW_DIM, dtype=torch.bfloat16, device=q.device)
    lse = torch.empty(b, s_q, h_q, dtype=torch.float32, device=q.device)
    if b * s_q * h_q == 0:
        return out, lse.transpose(1, 2)
    if extra_k_cache is not None:
        x_cache = extra_k_cache.view(torch.uint8)
        x_indices = _last_dim_contiguous(extra_indices)
        x_args = (
            x_cache,
            x_cache.stride(0),
            x_cache.shape[1],
            x_cache.shape[0] * x_cache.shape[1],
            x_indices,
            x_indices.stride(0),
            x_indices.stride(1),
            extra_topk,
        )
    else:  # never read: HAS_EXTRA is False
        x_args = (cache, 0, 1, 0, indices, 0, 0, 0)
    sink = attn_sink.contiguous() if attn_sink is not None else lse
    lengths = topk_length.contiguous() if topk_length is not None else indices
    x_lengths = extra_topk_length.contiguous() if extra_topk_length is not None else indices

    block_h = _head_block(h_q, config.block_h)
    write_partial = num_splits > 1
    if write_partial:
        part_out = torch.empty(b * s_q, num_splits, h_q, ROW_DIM, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b * s_q, num_splits, h_q, dtype=torch.float32, device=q.device)
        dest = (part_out, part_lse)
    else:
        dest = (out, lse)
    grid = (b * s_q, cdiv(h_q, block_h), num_splits)
    _sparse_decode_kernel[grid](
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        cache,
        cache.stride(0),
        cache.shape[1],
        cache.shape[0] * cache.shape[1],
        indices,
        indices.stride(0),
        indices.stride(1),
        topk,
        lengths,
        *x_args,
        x_lengths,
        sink,
        *dest,
        s_q,
        h_q,
        float(softmax_scale),
        chunks_per_split,
        HAS_TOPK_LEN=topk_length is not None,
        HAS_EXTRA=extra_k_cache is not None,
        HAS_X_TOPK_LEN=extra_topk_length is not None,
        HAS_SINK=attn_sink is not None,
        WRITE_PARTIAL=write_partial,
        BLOCK_H=block_h,
        BLOCK_N=config.block_n,
        INTERPRET=INTERPRET,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if write_partial:
        combine_h = _head_block(h_q, COMBINE_BLOCK_H)
        _combine_splits_kernel[(b * s_q, cdiv(h_q, combine_h))](
            part_out,
            part_lse,
            sink,
            out,
            lse,
            h_q,
            num_splits,
            HAS_SINK=attn_sink is not None,
            BLOCK_H=combine_h,
            num_warps=4,
        )
    return out, lse.transpose(1, 2)


def _check_sched_meta(sched_meta, config: SparseDecodeSchedMeta.Config) -> None:
    if not isinstance(sched_meta, SparseDecodeSchedMeta):
        raise KernelInputError(
            "tile_scheduler_metadata: expected the object returned by "
            f"ds_plugins' get_mla_metadata(), got {type(sched_meta).__name__}"
        )
    if sched_meta.have_initialized and sched_meta.config != config:
        changed = ", ".join(
            f"{f.name} {getattr(sched_meta.config, f.name)!r} -> {getattr(config, f.name)!r}"
            for f in dataclasses.fields(config)
            if getattr(sched_meta.config, f.name) != getattr(config, f.name)
        )
        raise KernelInputError(
            "tile_scheduler_metadata: inconsistent with the call it was first used for "
            f"({changed}); get a new one from get_mla_metadata() for another shape"
        )


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: SparseDecodeSchedMeta,
    num_splits: None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode entry point, sparse FP8 path only (DeepSeek-V4's "MODEL1" cache).

    q [b, s_q, h_q, 512] bf16; k_cache [num_blocks, page, 1, 584] uint8/int8/fp8 (see kv_cache.py);
    indices [b, s_q, topk] int32 slots block*page + offset (-1 skipped); topk_length [b] int32;
    attn_sink [h_q] fp32; extra_k_cache (own page size) with extra_indices_in_kvcache [b, s_q, extra_topk]
    and extra_topk_length [b]: joined into the same softmax. block_table and cache_seqlens are not
    used by the sparse path. softmax_scale defaults to 512^-0.5.
    -> out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32 (natural log; +inf where nothing is attended)."""
    if indices is None:
        raise KernelInputError(
            "indices: ds-plugins implements only FlashMLA's sparse FP8 decode (indices given, "
            "is_fp8_kvcache=True); dense decode (indices=None, block_table/cache_seqlens) "
            "is not supported"
        )
    if not is_fp8_kvcache:
        raise KernelInputError(
            "is_fp8_kvcache: sparse decode needs the FP8 cache (is_fp8_kvcache=True); a bf16 KV cache is not supported"
        )
    if causal:
        raise KernelInputError("causal: must be False for sparse decode (the indices already select the keys)")
    if num_splits is not None:
        raise KernelInputError("num_splits: must be None (FlashMLA's interface keeps it only as a placeholder)")
    _check_decode_args(
        q,
        k_cache,
        indices,
        topk_length,
        attn_sink,
        extra_k_cache,
        extra_indices_in_kvcache,
        extra_topk_length,
        head_dim_v,
    )

    config = SparseDecodeSchedMeta.Config(
        b=q.shape[0],
        s_q=q.shape[1],
        h_q=q.shape[2],
        page_block_size=k_cache.shape[1],
        h_k=k_cache.shape[2],
        causal=causal,
        is_fp8_kvcache=is_fp8_kvcache,
        topk=indices.shape[-1],
        extra_page_block_size=extra_k_cache.shape[1] if extra_k_cache is not None else None,
        extra_topk=extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None,
    )
    sched_meta = tile_scheduler_metadata
    _check_sched_meta(sched_meta, config)
    if not sched_meta.have_initialized:
        sched_meta.have_initialized = True
        sched_meta.config = config
        sched_meta.num_splits = decode_num_splits(
            config.b, config.s_q, config.h_q, config.topk, config.extra_topk or 0, _target_programs(q.device)
        )
    return _sparse_decode(
        q,
        k_cache,
        indices,
        topk_length,
        attn_sink,
        extra_k_cache,
        extra_indices_in_kvcache,
        extra_topk_length,
        head_dim_v,
        softmax_scale,
        sched_meta.num_splits,
    )
