"""DeepSeek-V4 lightning indexer: DeepGEMM's MQA-logits contracts and fused top-k, as Triton kernels.

score[t, j] = sum_h ReLU(q[t, h] . k[j]) * k_scale[j] * w[t, h]   (reference/indexer.py has the math,
the storage formats and the visibility rules; everything here must agree with it).

Upstream stand-ins (DeepGEMM `csrc/apis/attention.hpp`, same argument names, order and defaults):
- `fp8_mqa_logits`, `fp8_fp4_mqa_logits`: ragged prefill logits over one flat key array, each row
  sees keys ks <= j < ke. Output [M, N] fp32, or [M, max_seqlen_k] with column c = key ks + c.
- `get_paged_mqa_logits_metadata`, `fp8_paged_mqa_logits`, `fp8_fp4_paged_mqa_logits`: decode
  logits over the paged indexer cache -> [B * next_n, max_context_len].
The FP4 variants take q = (packed e2m1 int8/uint8, packed UE8M0 int32 scales) with FP4 keys, the
only FP4 combination DeepGEMM has and the one vLLM (`indexer_kv_dtype="mxfp4"`, formerly
`use_fp4_indexer_cache`) and SGLang (`--enable-deepseek-v4-fp4-indexer`) call.

Top-k entry points of our own (no upstream equivalent; they never materialise a logits row):
- `fp8_mqa_topk(q, kv, weights, ks, ke, topk=512)` -> int32 [M, topk], positions relative to ks
  (vLLM's `top_k_per_row_prefill` convention: request-local compressed positions).
- `fp8_paged_mqa_topk(q, kv_cache, weights, context_lens, block_table, topk=512)` -> int32
  [B * next_n, topk], logical positions (what vLLM's decode top-k writes).
Both accept an FP8 q tensor or an FP4 (values, scales) pair. Best first; -1 pads rows with fewer
visible keys than topk. Tie rule: equal scores keep the smaller position first.

How the top-k works: grid (rows, splits). Each program walks its slice of the row's visible keys
in tiles of T = next_pow2(topk) keys, scores a tile (tensor-core dots of the row's heads against
the keys, ReLU, head-weighted sum), packs each score with its position into one int64 sort key
(order-preserving fp32 bits high, 0x7FFFFFFF - position low, so equal scores order by position)
and merges the tile into a running [T] best list with a bitonic top-k of the 2T keys (Triton's
tl.topk), skipped when no key in the tile beats the list's worst. Each split writes its [T] list
to a workspace [rows, splits, T] and a merge kernel reduces the splits per row the same way.
Memory: O(rows * splits * T) with splits <= 64; no [rows, context] tensor exists. (Under the CPU
interpreter, tiles above 64 keys merge by rank instead, because the interpreted bitonic network
takes seconds per call; `_merge_best` explains. Both select exactly the T largest keys.)

Differences from DeepGEMM, all more permissive: any head count (padded to a power of two >= 16
in registers), any block_kv, a 1-D context_lens, and the logits outside the visible range are
always -inf (DeepGEMM leaves them unspecified unless clean_logits). `schedule_meta` and
`indices` are accepted and checked but not needed: the grid comes from shapes only and a row's
keys are found through its own block-table row. Nothing here synchronises with the host.
"""

from __future__ import annotations

import numbers

import torch

from ds_plugins.kernels._runtime import HAVE_TRITON, INTERPRET, KernelInputError, cdiv, expect, next_pow2, use_triton
from ds_plugins.kernels.reference import indexer as ref

FP8 = torch.float8_e4m3fn
FP4_PACKED_DTYPES = (torch.int8, torch.uint8)  # DeepGEMM tags packed FP4 as int8; vLLM stores uint8
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
LOGITS_DTYPES = (torch.float32, torch.bfloat16)
FP8_HEAD_DIMS = (32, 64, 128)
FP4_HEAD_DIMS = (64, 128)
SCALE_WORD_BYTES = 4  # fp32 scale, or 4 packed UE8M0 bytes, per key

# Tile sizes. Keys per dot ([heads, D] x [D, SUB_N]) and warps were chosen with ptxas (Triton 3.9,
# sm_90 and sm_120 targets, compiled without a GPU) as the largest that do not spill registers:
# FP4 keys are dequantised in registers first, and the top-k programs also hold the best list.
LOGITS_BLOCK_N = 128  # keys (output columns) per logits program
LOGITS_SUB_N = {False: 128, True: 32}  # by is_fp4
# Top-k: (keys per dot, warps, pipeline stages, register cap or None) by (is_fp4, paged). Paged FP8
# at 32 keys and FP4 at 8 warps: no spills on sm_90a/sm_120a/sm_121a (tests/kernels/test_no_spills.py).
# FP4 ragged: left to itself, ptxas holds that kernel to 128 registers on sm_120a and spills (64/48
# bytes); an explicit cap of 255 (.maxnreg) lets it use 220 and spill nothing (one program per SM
# either way at 8 warps: 2 would need <= 128).
TOPK_TILES = {
    (False, False): (64, 8, 3, None),
    (False, True): (32, 8, 3, None),
    (True, False): (16, 8, 3, 255),
    (True, True): (16, 8, 3, None),
}
MAX_SPLITS = 64  # top-k splits per row (bounds the workspace)
MIN_TILES_PER_SPLIT = 8  # a split walks at least this many top-k tiles before we add splits
SORT_MERGE_MAX_INTERPRETED = 64  # largest top-k tile merged by tl.topk under the interpreter

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ds_plugins.kernels._tl import dot

    # ------------------------------------------------------------------ dequantisation

    @triton.jit
    def _e2m1_to_float(code):
        """e2m1 code (int32, 0..15) -> fp32, built as fp32 bits: sign = bit 3; magnitude code m
        (0, .5, 1, 1.5, 2, 3, 4, 6 for m = 0..7) has exponent (m >> 1) - 1 and mantissa bit m & 1
        when m >= 2, and is 0.5 (m = 1) or 0 (m = 0) otherwise."""
        mag = code & 7
        normal = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)
        bits = tl.where(mag >= 2, normal, tl.where(mag == 1, 126 << 23, 0)) | ((code & 8) << 28)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _dequant_fp4_halves(packed, scale_bytes):
        """packed [R, D/2] uint8 (element 2i in the low nibble of byte i, 2i+1 in the high one) and
        each byte's UE8M0 scale [R, D/2] -> (even elements, odd elements), bf16 [R, D/2] each.
        Exact: a scale is a power of two and an e2m1 value has two significant bits. A dot product
        does not care about element order, so q and k both stay split this way (no interleave)."""
        codes = packed.to(tl.int32)
        scales = (scale_bytes.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        even = (_e2m1_to_float(codes & 15) * scales).to(tl.bfloat16)
        odd = (_e2m1_to_float(codes >> 4) * scales).to(tl.bfloat16)
        return even, odd

    @triton.jit
    def _load_fp4_rows(val_ptr, scale_ptr, val_off, scale_off, valid, D: tl.constexpr):
        """FP4 rows at byte offsets val_off (D/2 packed bytes) and scale_off (4 UE8M0 bytes, one per 32
        values: byte i of a row belongs to group i // 16) -> (even, odd) halves [R, D/2] bf16."""
        half = tl.arange(0, D // 2)
        packed = tl.load(val_ptr + val_off[:, None] + half[None, :], mask=valid[:, None], other=0)
        scale_bytes = tl.load(scale_ptr + scale_off[:, None] + (half // 16)[None, :], mask=valid[:, None], other=0)
        return _dequant_fp4_halves(packed, scale_bytes)

    # ------------------------------------------------------------------ query row, key tiles

    @triton.jit
    def _load_query(
        q_ptr, qsf_ptr, w_ptr, row, n_heads, stride_wm, BLOCK_H: tl.constexpr, D: tl.constexpr, IS_FP4: tl.constexpr
    ):
        """One query row: (q_a, q_b, w). FP8: q_a = q [BLOCK_H, D] fp8 (q_b repeats it, unused).
        FP4: the even and odd halves [BLOCK_H, D/2] bf16. w: head weights [BLOCK_H] fp32.
        Padded heads are zero in q and w, so they add nothing."""
        heads = tl.arange(0, BLOCK_H)
        head_ok = heads < n_heads
        row_head = row.to(tl.int64) * n_heads + heads  # flat (row, head) index
        if IS_FP4:
            q_a, q_b = _load_fp4_rows(q_ptr, qsf_ptr, row_head * (D // 2), row_head * 4, head_ok, D)
        else:
            dims = tl.arange(0, D)
            q_a = tl.load(q_ptr + row_head[:, None] * D + dims[None, :], mask=head_ok[:, None], other=0.0)
            q_b = q_a
        w = tl.load(w_ptr + row.to(tl.int64) * stride_wm + heads, mask=head_ok, other=0.0).to(tl.float32)
        return q_a, q_b, w

    @triton.jit
    def _key_scores(
        q_a,
        q_b,
        w,
        val_ptr,
        scale_ptr,
        val_off,
        scale_off,
        valid,
        BLOCK_H: tl.constexpr,
        SUB_N: tl.constexpr,
        D: tl.constexpr,
        IS_FP4: tl.constexpr,
        SCALE_BYTES: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Scores [SUB_N] of one query row against SUB_N keys. val_off / scale_off (int64) locate
        each key's values and scale word; invalid keys load as zeros (the caller masks them).
        SCALE_BYTES: the FP8 scale is read as 4 little-endian bytes (paged cache) instead of an fp32."""
        acc = tl.zeros((BLOCK_H, SUB_N), dtype=tl.float32)
        if IS_FP4:
            k_even, k_odd = _load_fp4_rows(val_ptr, scale_ptr, val_off, scale_off, valid, D)
            acc = dot(q_a, tl.trans(k_even), acc, INTERPRET)
            acc = dot(q_b, tl.trans(k_odd), acc, INTERPRET)
        else:
            dims = tl.arange(0, D)
            k = tl.load(val_ptr + val_off[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
            acc = dot(q_a, tl.trans(k), acc, INTERPRET)  # [heads, keys]
        scores = tl.sum(tl.maximum(acc, 0.0) * w[:, None], axis=0)
        if not IS_FP4:
            if SCALE_BYTES:
                bits = tl.load(scale_ptr + scale_off, mask=valid, other=0).to(tl.int32)
                bits = bits | (tl.load(scale_ptr + scale_off + 1, mask=valid, other=0).to(tl.int32) << 8)
                bits = bits | (tl.load(scale_ptr + scale_off + 2, mask=valid, other=0).to(tl.int32) << 16)
                bits = bits | (tl.load(scale_ptr + scale_off + 3, mask=valid, other=0).to(tl.int32) << 24)
                scale = bits.to(tl.float32, bitcast=True)
            else:
                scale = tl.load(scale_ptr + scale_off, mask=valid, other=0.0)
            scores = scores * scale
        return scores

    @triton.jit
    def _ragged_key_offsets(keys, valid, IS_FP4: tl.constexpr, D: tl.constexpr):
        """Flat key array: values [N, D] fp8 or [N, D/2] bytes; scales [N] fp32 or [N, 4] bytes."""
        safe = tl.where(valid, keys, 0).to(tl.int64)
        if IS_FP4:
            return safe * (D // 2), safe * 4
        return safe * D, safe

    @triton.jit
    def _paged_key_offsets(
        bt_row_ptr,
        pos,
        valid,
        max_blocks,
        n_blocks,
        stride_block,
        BLOCK_KV: tl.constexpr,
        D: tl.constexpr,
        IS_FP4: tl.constexpr,
    ):
        """Logical positions -> byte offsets of their values and scale words in the paged cache
        (block = [BLOCK_KV keys' values][BLOCK_KV scale words]). Positions past the block table,
        or whose block id is outside the cache, become invalid."""
        block = pos // BLOCK_KV
        slot = pos % BLOCK_KV
        in_table = valid & (block < max_blocks)
        physical = tl.load(bt_row_ptr + block, mask=in_table, other=-1)
        ok = in_table & (physical >= 0) & (physical < n_blocks)
        base = tl.where(ok, physical, 0).to(tl.int64) * stride_block
        if IS_FP4:
            val_off = base + slot * (D // 2)
            scale_off = base + BLOCK_KV * (D // 2) + slot * 4
        else:
            val_off = base + slot * D
            scale_off = base + BLOCK_KV * D + slot * 4
        return val_off, scale_off, ok

    @triton.jit
    def _row_length(ctx_ptr, row, next_n, CTX_2D: tl.constexpr):
        """Visible keys of query row (b, n): context_lens[b, n] (2-D), or context_lens[b] - next_n + n + 1 (1-D)."""
        if CTX_2D:
            length = tl.load(ctx_ptr + row)
        else:
            length = tl.load(ctx_ptr + row // next_n) - next_n + row % next_n + 1
        return tl.maximum(length, 0)

    # ------------------------------------------------------------------ logits kernels

    @triton.jit
    def _mqa_logits_kernel(
        q_ptr,
        qsf_ptr,
        k_ptr,
        ksf_ptr,
        w_ptr,
        ks_ptr,
        ke_ptr,
        out_ptr,
        n_heads,
        n_keys,
        n_cols,
        stride_wm,
        stride_om,
        COMPRESSED: tl.constexpr,
        IS_FP4: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SUB_N: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Row `row`, output columns [pid1 * BLOCK_N, +BLOCK_N), scored SUB_N keys per dot."""
        row = tl.program_id(0)
        block_start = tl.program_id(1) * BLOCK_N
        ks = tl.load(ks_ptr + row)
        ke = tl.minimum(tl.load(ke_ptr + row), n_keys)
        if COMPRESSED:
            base = ks  # column c of a compressed row is key ks + c
        else:
            base = ks * 0
        out_row = out_ptr + row.to(tl.int64) * stride_om
        # Keys of this block that the row sees: [first, last); blocks outside only write -inf.
        first = tl.maximum(tl.maximum(ks, 0), base + block_start)
        last = tl.minimum(ke, base + tl.minimum(block_start + BLOCK_N, n_cols))
        q_a, q_b, w = _load_query(q_ptr, qsf_ptr, w_ptr, row, n_heads, stride_wm, BLOCK_H, D, IS_FP4)
        for sub in range(0, BLOCK_N // SUB_N):
            cols = block_start + sub * SUB_N + tl.arange(0, SUB_N)
            keys = base + cols
            valid = (keys >= first) & (keys < last)
            out = tl.full((SUB_N,), float("-inf"), tl.float32)
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                val_off, scale_off = _ragged_key_offsets(keys, valid, IS_FP4, D)
                scores = _key_scores(
                    q_a, q_b, w, k_ptr, ksf_ptr, val_off, scale_off, valid, BLOCK_H, SUB_N, D, IS_FP4, False, INTERPRET
                )
                out = tl.where(valid, scores, float("-inf"))
            tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=cols < n_cols)

    @triton.jit
    def _paged_mqa_logits_kernel(
        q_ptr,
        qsf_ptr,
        kv_val_ptr,
        kv_byte_ptr,
        w_ptr,
        ctx_ptr,
        bt_ptr,
        out_ptr,
        n_heads,
        next_n,
        n_cols,
        max_blocks,
        n_blocks,
        stride_block,
        stride_bt,
        stride_wm,
        stride_om,
        CTX_2D: tl.constexpr,
        IS_FP4: tl.constexpr,
        BLOCK_KV: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SUB_N: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Row `row` = (b, n), logical positions [pid1 * BLOCK_N, +BLOCK_N), SUB_N keys per dot."""
        row = tl.program_id(0)
        block_start = tl.program_id(1) * BLOCK_N
        length = tl.minimum(_row_length(ctx_ptr, row, next_n, CTX_2D), n_cols)
        out_row = out_ptr + row.to(tl.int64) * stride_om
        bt_row = bt_ptr + (row // next_n).to(tl.int64) * stride_bt
        q_a, q_b, w = _load_query(q_ptr, qsf_ptr, w_ptr, row, n_heads, stride_wm, BLOCK_H, D, IS_FP4)
        for sub in range(0, BLOCK_N // SUB_N):
            pos = block_start + sub * SUB_N + tl.arange(0, SUB_N)
            out = tl.full((SUB_N,), float("-inf"), tl.float32)
            if block_start + sub * SUB_N < length:
                val_off, scale_off, ok = _paged_key_offsets(
                    bt_row, pos, pos < length, max_blocks, n_blocks, stride_block, BLOCK_KV, D, IS_FP4
                )
                scores = _key_scores(
                    q_a,
                    q_b,
                    w,
                    kv_val_ptr,
                    kv_byte_ptr,
                    val_off,
                    scale_off,
                    ok,
                    BLOCK_H,
                    SUB_N,
                    D,
                    IS_FP4,
                    True,
                    INTERPRET,
                )
                out = tl.where(ok, scores, float("-inf"))
            tl.store(out_row + pos, out.to(out_ptr.dtype.element_ty), mask=pos < n_cols)

    # ------------------------------------------------------------------ top-k

    @triton.jit
    def _empty_keys(SHAPE: tl.constexpr):
        """The sort key of 'no candidate': int64 min, below every real key; decodes to position -1."""
        return tl.full(SHAPE, 1, tl.int64) << 63

    @triton.jit
    def _sort_keys(scores, pos):
        """(fp32 score, int32 position >= 0) -> int64 key; larger key = better (higher score, then
        smaller position). The fp32 bits are made order-preserving as a signed int32; -0.0 becomes
        +0.0 first so that the two zeros tie (and order by position) as they compare equal."""
        bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - pos).to(tl.int64)

    @triton.jit
    def _key_positions(keys):
        empty = keys == (tl.full(keys.shape, 1, tl.int64) << 63)
        return tl.where(empty, -1, 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32))

    @triton.jit
    def _merge_best(best, candidates, T: tl.constexpr, SORT_MERGE: tl.constexpr):
        """The T largest keys of best [T] and candidates [T], in descending order. Skipped when no
        candidate beats the worst kept key. Keys are unique except the EMPTY filler.

        SORT_MERGE (every GPU launch): Triton's bitonic top-k of the 2T keys. Otherwise (the CPU
        interpreter at T > 64, where that network runs element by element and takes seconds per
        call): the same selection by rank, rank_i = number of keys that beat key i, key i going to
        slot rank_i: [2T, 2T] comparisons that numpy does at once but a GPU could not hold."""
        if tl.max(candidates, axis=0) > tl.min(best, axis=0):
            merged = tl.cat(best, candidates, dim=0)
            if SORT_MERGE:
                best = tl.topk(merged, T)
            else:
                idx = tl.arange(0, 2 * T)
                beats = (merged[None, :] > merged[:, None]) | (
                    (merged[None, :] == merged[:, None]) & (idx[None, :] < idx[:, None])
                )
                rank = tl.sum(beats.to(tl.int32), axis=1)
                slots = tl.arange(0, T)
                best = tl.max(
                    tl.where(rank[None, :] == slots[:, None], merged[None, :], _empty_keys((T, 2 * T))), axis=1
                )
        return best

    @triton.jit
    def _topk_partial(
        q_ptr,
        qsf_ptr,
        val_ptr,
        scale_ptr,
        w_ptr,
        ws_ptr,
        row,
        split,
        lo,
        hi,
        n_heads,
        stride_wm,
        n_splits,
        key_base,
        bt_ptr,
        next_n,
        stride_bt,
        max_blocks,
        n_blocks,
        stride_block,
        PAGED: tl.constexpr,
        IS_FP4: tl.constexpr,
        BLOCK_KV: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        T: tl.constexpr,
        SUB_N: tl.constexpr,
        SORT_MERGE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Best T keys of row `row` among positions [lo, hi); stores them in its workspace slot `split`.
        Ragged (PAGED false): position p is key key_base + p of the flat key arrays (the paged arguments
        are unused). Paged: p is a logical position of block-table row row // next_n."""
        best = _empty_keys((T,))
        if lo < hi:
            q_a, q_b, w = _load_query(q_ptr, qsf_ptr, w_ptr, row, n_heads, stride_wm, BLOCK_H, D, IS_FP4)
            if PAGED:
                bt_row = bt_ptr + (row // next_n).to(tl.int64) * stride_bt
            sub = tl.arange(0, T // SUB_N)
            for start in range(lo, hi, T):
                tile = _empty_keys((T // SUB_N, SUB_N))
                for c in range(0, T // SUB_N):
                    if start + c * SUB_N < hi:
                        pos = start + c * SUB_N + tl.arange(0, SUB_N)
                        if PAGED:
                            val_off, scale_off, valid = _paged_key_offsets(
                                bt_row, pos, pos < hi, max_blocks, n_blocks, stride_block, BLOCK_KV, D, IS_FP4
                            )
                        else:
                            keys = key_base + pos
                            valid = (pos < hi) & (keys >= 0)
                            val_off, scale_off = _ragged_key_offsets(keys, valid, IS_FP4, D)
                        scores = _key_scores(
                            q_a,
                            q_b,
                            w,
                            val_ptr,
                            scale_ptr,
                            val_off,
                            scale_off,
                            valid,
                            BLOCK_H,
                            SUB_N,
                            D,
                            IS_FP4,
                            PAGED,
                            INTERPRET,
                        )
                        sub_keys = tl.where(valid, _sort_keys(scores, pos), _empty_keys((SUB_N,)))
                        tile = tl.where(sub[:, None] == c, sub_keys[None, :], tile)
                best = _merge_best(best, tl.reshape(tile, (T,)), T, SORT_MERGE)
        tl.store(ws_ptr + (row.to(tl.int64) * n_splits + split) * T + tl.arange(0, T), best)

    @triton.jit
    def _mqa_topk_partial_kernel(
        q_ptr,
        qsf_ptr,
        k_ptr,
        ksf_ptr,
        w_ptr,
        ks_ptr,
        ke_ptr,
        ws_ptr,
        n_heads,
        n_keys,
        stride_wm,
        split_len,
        n_splits,
        IS_FP4: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        T: tl.constexpr,
        SUB_N: tl.constexpr,
        SORT_MERGE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Best T keys of row `row` among relative positions [split * split_len, +split_len) of its window."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        ks = tl.load(ks_ptr + row)
        ke = tl.minimum(tl.load(ke_ptr + row), n_keys)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, ke - ks)  # relative positions p, key ks + p
        _topk_partial(
            q_ptr,
            qsf_ptr,
            k_ptr,
            ksf_ptr,
            w_ptr,
            ws_ptr,
            row,
            split,
            lo,
            hi,
            n_heads,
            stride_wm,
            n_splits,
            ks,
            0,
            1,
            0,
            0,
            0,
            0,
            False,
            IS_FP4,
            1,
            BLOCK_H,
            D,
            T,
            SUB_N,
            SORT_MERGE,
            INTERPRET,
        )

    @triton.jit
    def _paged_topk_partial_kernel(
        q_ptr,
        qsf_ptr,
        kv_val_ptr,
        kv_byte_ptr,
        w_ptr,
        ctx_ptr,
        bt_ptr,
        ws_ptr,
        n_heads,
        next_n,
        n_cols,
        max_blocks,
        n_blocks,
        stride_block,
        stride_bt,
        stride_wm,
        split_len,
        n_splits,
        CTX_2D: tl.constexpr,
        IS_FP4: tl.constexpr,
        BLOCK_KV: tl.constexpr,
        BLOCK_H: tl.constexpr,
        D: tl.constexpr,
        T: tl.constexpr,
        SUB_N: tl.constexpr,
        SORT_MERGE: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Best T keys of row `row` among logical positions [split * split_len, +split_len)."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.minimum(_row_length(ctx_ptr, row, next_n, CTX_2D), n_cols)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        _topk_partial(
            q_ptr,
            qsf_ptr,
            kv_val_ptr,
            kv_byte_ptr,
            w_ptr,
            ws_ptr,
            row,
            split,
            lo,
            hi,
            n_heads,
            stride_wm,
            n_splits,
            0,
            bt_ptr,
            next_n,
            stride_bt,
            max_blocks,
            n_blocks,
            stride_block,
            True,
            IS_FP4,
            BLOCK_KV,
            BLOCK_H,
            D,
            T,
            SUB_N,
            SORT_MERGE,
            INTERPRET,
        )

    @triton.jit
    def _topk_merge_kernel(ws_ptr, out_ptr, n_splits, topk, stride_om, T: tl.constexpr, SORT_MERGE: tl.constexpr):
        """Merge a row's per-split best lists; write its first topk positions (best first, -1 padded)."""
        row = tl.program_id(0)
        offs = tl.arange(0, T)
        best = _empty_keys((T,))
        for split in range(0, n_splits):
            candidates = tl.load(ws_ptr + (row.to(tl.int64) * n_splits + split) * T + offs)
            best = _merge_best(best, candidates, T, SORT_MERGE)
        tl.store(out_ptr + row.to(tl.int64) * stride_om + offs, _key_positions(best), mask=offs < topk)


# ============================================================================ argument checks


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise KernelInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _split_pair(name: str, value) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise KernelInputError(f"{name}: expected a (values, scales) pair, got {type(value).__name__}")
    return value[0], value[1]


def _check_query(q_values: torch.Tensor, q_scales, ndim: int, name: str) -> tuple[bool, int, int]:
    """q values [..., H, D] fp8, or FP4 [..., H, D/2] int8/uint8 with scales [..., H] int32, ndim dims.
    Returns (is_fp4, heads, head_dim)."""
    is_fp4 = q_scales is not None
    if is_fp4:
        expect(f"{name}[0]", q_values, dtype=FP4_PACKED_DTYPES, ndim=ndim, contiguous=True)
        head_dim = 2 * q_values.shape[-1]
        if head_dim not in FP4_HEAD_DIMS:
            raise KernelInputError(
                f"{name}[0]: FP4 head_dim (2 x last dim) must be one of {FP4_HEAD_DIMS}, got {head_dim}"
            )
        expect(
            f"{name}[1]",
            q_scales,
            dtype=torch.int32,
            shape=tuple(q_values.shape[:-1]),
            device=q_values.device,
            contiguous=True,
        )
    else:
        expect(name, q_values, dtype=FP8, ndim=ndim, contiguous=True)
        head_dim = q_values.shape[-1]
        if head_dim not in FP8_HEAD_DIMS:
            raise KernelInputError(f"{name}: head_dim must be one of {FP8_HEAD_DIMS}, got {head_dim}")
    if q_values.shape[-2] < 1:
        raise KernelInputError(f"{name}: expected at least one head, got shape {list(q_values.shape)}")
    return is_fp4, q_values.shape[-2], head_dim


def _check_weights(weights: torch.Tensor, rows: int, heads: int, device: torch.device) -> None:
    expect("weights", weights, dtype=WEIGHT_DTYPES, shape=(rows, heads), device=device)
    if weights.stride(1) != 1 and heads > 1:
        raise KernelInputError("weights: the head dimension must be contiguous (stride(1) == 1)")


def _check_ragged(q, kv, weights, ks, ke):
    """Shared checks of the ragged entry points. Returns the normalised pieces."""
    q_values, q_scales = q
    is_fp4, heads, head_dim = _check_query(q_values, q_scales, 3, "q")
    rows = q_values.shape[0]
    device = q_values.device
    k_values, k_scales = _split_pair("kv", kv)
    if is_fp4:
        expect(
            "kv[0]", k_values, dtype=FP4_PACKED_DTYPES, ndim=2, last_dim=head_dim // 2, device=device, contiguous=True
        )
        expect("kv[1]", k_scales, dtype=torch.int32, shape=(k_values.shape[0],), device=device, contiguous=True)
    else:
        expect("kv[0]", k_values, dtype=FP8, ndim=2, last_dim=head_dim, device=device, contiguous=True)
        expect("kv[1]", k_scales, dtype=torch.float32, shape=(k_values.shape[0],), device=device, contiguous=True)
    _check_weights(weights, rows, heads, device)
    expect("cu_seq_len_k_start", ks, dtype=torch.int32, shape=(rows,), device=device, contiguous=True)
    expect("cu_seq_len_k_end", ke, dtype=torch.int32, shape=(rows,), device=device, contiguous=True)
    return q_values, q_scales, k_values, k_scales, is_fp4, rows, heads, head_dim


def _check_paged(q, kv_cache, weights, context_lens, block_table):
    """Shared checks of the paged entry points. Returns the normalised pieces."""
    q_values, q_scales = q
    is_fp4, heads, head_dim = _check_query(q_values, q_scales, 4, "q")
    batch, next_n = q_values.shape[:2]
    device = q_values.device
    value_bytes = head_dim // 2 if is_fp4 else head_dim
    expect("kv_cache", kv_cache, dtype=torch.uint8, ndim=4, last_dim=value_bytes + SCALE_WORD_BYTES, device=device)
    if kv_cache.shape[2] != 1:
        raise KernelInputError(
            f"kv_cache: expected one KV head (shape [blocks, block_kv, 1, W]), got {list(kv_cache.shape)}"
        )
    width = kv_cache.shape[3]
    block_kv = kv_cache.shape[1]
    if kv_cache.stride(3) != 1 or (block_kv > 1 and kv_cache.stride(1) != width):
        raise KernelInputError(
            "kv_cache: each block must hold its keys back to back (stride(1) == last dim, stride(3) == 1)"
        )
    if kv_cache.shape[0] > 1 and kv_cache.stride(0) < block_kv * width:
        raise KernelInputError(
            f"kv_cache: block stride {kv_cache.stride(0)} is smaller than a block ({block_kv} x {width} bytes)"
        )
    _check_weights(weights, batch * next_n, heads, device)
    expect("context_lens", context_lens, dtype=torch.int32, device=device, contiguous=True)
    if tuple(context_lens.shape) not in ((batch, next_n), (batch,)):
        raise KernelInputError(
            f"context_lens: expected shape [{batch}, {next_n}] or [{batch}] (q is "
            f"[B={batch}, next_n={next_n}, ...]), got {list(context_lens.shape)}"
        )
    expect("block_table", block_table, dtype=torch.int32, ndim=2, device=device)
    if block_table.shape[0] != batch:
        raise KernelInputError(
            f"block_table: expected {batch} rows (one per request in q), got shape {list(block_table.shape)}"
        )
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise KernelInputError("block_table: rows must be contiguous (stride(1) == 1)")
    return q_values, q_scales, is_fp4, batch, next_n, heads, head_dim


def _check_dtype_arg(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise KernelInputError(f"{name}: expected one of {allowed}, got {value!r}")


def _plan_splits(n_cols: int, tile: int, num_splits: int | None) -> tuple[int, int]:
    """(splits, keys per split) covering n_cols keys; a split is a whole number of tiles."""
    if num_splits is None:
        num_splits = min(MAX_SPLITS, max(1, cdiv(n_cols, MIN_TILES_PER_SPLIT * tile)))
    split_len = max(tile, cdiv(cdiv(max(n_cols, 1), num_splits), tile) * tile)
    return max(1, cdiv(n_cols, split_len)), split_len


# ============================================================================ Triton launches


def _query_args(q_values: torch.Tensor, q_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values pointer, scale-bytes pointer); FP4 pieces are passed as bytes."""
    if q_scales is None:
        return q_values, q_values  # the scale pointer is unused on the FP8 path
    return q_values.view(torch.uint8), q_scales.view(torch.uint8)


def _ragged_key_args(k_values: torch.Tensor, k_scales: torch.Tensor, is_fp4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if is_fp4:
        return k_values.view(torch.uint8), k_scales.view(torch.uint8)
    return k_values, k_scales


def _paged_key_args(kv_cache: torch.Tensor, is_fp4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values pointer, bytes pointer): fp8 values are read through an fp8 view of the same bytes."""
    return (kv_cache if is_fp4 else kv_cache.view(FP8)), kv_cache


def _sub_n(is_fp4: bool, width: int) -> int:
    return min(width, LOGITS_SUB_N[is_fp4])


def _block_h(heads: int) -> int:
    return max(16, next_pow2(heads))  # tl.dot needs >= 16 rows


def _mqa_logits_triton(
    q_values, q_scales, k_values, k_scales, weights, ks, ke, is_fp4, head_dim, max_seqlen_k, logits_dtype
):
    rows, heads = q_values.shape[:2]
    n_keys = k_values.shape[0]
    n_cols = max_seqlen_k if max_seqlen_k > 0 else n_keys
    out = torch.empty((rows, n_cols), dtype=logits_dtype, device=q_values.device)
    if rows == 0 or n_cols == 0:
        return out
    q_arg, qsf_arg = _query_args(q_values, q_scales)
    k_arg, ksf_arg = _ragged_key_args(k_values, k_scales, is_fp4)
    grid = (rows, cdiv(n_cols, LOGITS_BLOCK_N))
    _mqa_logits_kernel[grid](
        q_arg,
        qsf_arg,
        k_arg,
        ksf_arg,
        weights,
        ks,
        ke,
        out,
        heads,
        n_keys,
        n_cols,
        weights.stride(0),
        out.stride(0),
        COMPRESSED=max_seqlen_k > 0,
        IS_FP4=is_fp4,
        BLOCK_H=_block_h(heads),
        D=head_dim,
        BLOCK_N=LOGITS_BLOCK_N,
        SUB_N=_sub_n(is_fp4, LOGITS_BLOCK_N),
        INTERPRET=INTERPRET,
    )
    return out


def _paged_mqa_logits_triton(
    q_values, q_scales, kv_cache, weights, context_lens, block_table, is_fp4, head_dim, max_context_len, logits_dtype
):
    batch, next_n, heads = q_values.shape[:3]
    rows = batch * next_n
    out = torch.empty((rows, max_context_len), dtype=logits_dtype, device=q_values.device)
    if rows == 0 or max_context_len == 0:
        return out
    q_arg, qsf_arg = _query_args(q_values, q_scales)
    kv_val, kv_bytes = _paged_key_args(kv_cache, is_fp4)
    grid = (rows, cdiv(max_context_len, LOGITS_BLOCK_N))
    _paged_mqa_logits_kernel[grid](
        q_arg,
        qsf_arg,
        kv_val,
        kv_bytes,
        weights,
        context_lens,
        block_table,
        out,
        heads,
        next_n,
        max_context_len,
        block_table.shape[1],
        kv_cache.shape[0],
        kv_cache.stride(0),
        block_table.stride(0),
        weights.stride(0),
        out.stride(0),
        CTX_2D=context_lens.dim() == 2,
        IS_FP4=is_fp4,
        BLOCK_KV=kv_cache.shape[1],
        BLOCK_H=_block_h(heads),
        D=head_dim,
        BLOCK_N=LOGITS_BLOCK_N,
        SUB_N=_sub_n(is_fp4, LOGITS_BLOCK_N),
        INTERPRET=INTERPRET,
        num_warps=8,  # memory-bound decode: 8 warps halve the registers per thread (sm_120: 102 vs 160)
    )
    return out


def _topk_tile(topk: int, is_fp4: bool, paged: bool) -> tuple[int, int, int, int, int | None]:
    """(T: the running best list and keys per merge, keys per dot, warps, stages, register cap)."""
    tile = max(16, next_pow2(topk))
    sub_n, warps, stages, maxnreg = TOPK_TILES[(is_fp4, paged)]
    return tile, min(tile, sub_n), warps, stages, maxnreg


def _sort_merge(tile: int) -> bool:
    """Merge best lists with Triton's bitonic top-k: always on a GPU; in the interpreter only for small
    tiles (where the tests exercise it), the rank merge otherwise (see _merge_best)."""
    return not INTERPRET or tile <= SORT_MERGE_MAX_INTERPRETED


def _merge_splits(workspace: torch.Tensor, topk: int, tile: int) -> torch.Tensor:
    rows, n_splits, _ = workspace.shape
    out = torch.empty((rows, topk), dtype=torch.int32, device=workspace.device)
    _topk_merge_kernel[(rows,)](workspace, out, n_splits, topk, out.stride(0), T=tile, SORT_MERGE=_sort_merge(tile))
    return out


def _mqa_topk_triton(q_values, q_scales, k_values, k_scales, weights, ks, ke, is_fp4, head_dim, topk, num_splits):
    rows, heads = q_values.shape[:2]
    n_keys = k_values.shape[0]
    if rows == 0:
        return torch.empty((0, topk), dtype=torch.int32, device=q_values.device)
    tile, sub_n, warps, stages, maxnreg = _topk_tile(topk, is_fp4, paged=False)
    n_splits, split_len = _plan_splits(n_keys, tile, num_splits)
    workspace = torch.empty((rows, n_splits, tile), dtype=torch.int64, device=q_values.device)
    q_arg, qsf_arg = _query_args(q_values, q_scales)
    k_arg, ksf_arg = _ragged_key_args(k_values, k_scales, is_fp4)
    _mqa_topk_partial_kernel[(rows, n_splits)](
        q_arg,
        qsf_arg,
        k_arg,
        ksf_arg,
        weights,
        ks,
        ke,
        workspace,
        heads,
        n_keys,
        weights.stride(0),
        split_len,
        n_splits,
        IS_FP4=is_fp4,
        BLOCK_H=_block_h(heads),
        D=head_dim,
        T=tile,
        SUB_N=sub_n,
        SORT_MERGE=_sort_merge(tile),
        INTERPRET=INTERPRET,
        num_warps=warps,
        num_stages=stages,
        maxnreg=maxnreg,
    )
    return _merge_splits(workspace, topk, tile)


def _paged_topk_triton(
    q_values,
    q_scales,
    kv_cache,
    weights,
    context_lens,
    block_table,
    is_fp4,
    head_dim,
    max_context_len,
    topk,
    num_splits,
):
    batch, next_n, heads = q_values.shape[:3]
    rows = batch * next_n
    if rows == 0:
        return torch.empty((0, topk), dtype=torch.int32, device=q_values.device)
    tile, sub_n, warps, stages, maxnreg = _topk_tile(topk, is_fp4, paged=True)
    n_splits, split_len = _plan_splits(max_context_len, tile, num_splits)
    workspace = torch.empty((rows, n_splits, tile), dtype=torch.int64, device=q_values.device)
    q_arg, qsf_arg = _query_args(q_values, q_scales)
    kv_val, kv_bytes = _paged_key_args(kv_cache, is_fp4)
    _paged_topk_partial_kernel[(rows, n_splits)](
        q_arg,
        qsf_arg,
        kv_val,
        kv_bytes,
        weights,
        context_lens,
        block_table,
        workspace,
        heads,
        next_n,
        max_context_len,
        block_table.shape[1],
        kv_cache.shape[0],
        kv_cache.stride(0),
        block_table.stride(0),
        weights.stride(0),
        split_len,
        n_splits,
        CTX_2D=context_lens.dim() == 2,
        IS_FP4=is_fp4,
        BLOCK_KV=kv_cache.shape[1],
        BLOCK_H=_block_h(heads),
        D=head_dim,
        T=tile,
        SUB_N=sub_n,
        SORT_MERGE=_sort_merge(tile),
        INTERPRET=INTERPRET,
        num_warps=warps,
        num_stages=stages,
        maxnreg=maxnreg,
    )
    return _merge_splits(workspace, topk, tile)


# ============================================================================ reference launches


def _dequant_query(q_values: torch.Tensor, q_scales: torch.Tensor | None) -> torch.Tensor:
    return q_values.float() if q_scales is None else ref.dequant_fp4(q_values, q_scales)


def _dequant_ragged_keys(k_values, k_scales, is_fp4) -> tuple[torch.Tensor, torch.Tensor | None]:
    if is_fp4:
        return ref.dequant_fp4(k_values, k_scales), None
    return k_values.float(), k_scales


def _dequant_paged_keys(kv_cache, is_fp4) -> tuple[torch.Tensor, torch.Tensor | None]:
    if is_fp4:
        return ref.split_fp4_paged_cache(kv_cache), None
    return ref.split_fp8_paged_cache(kv_cache)


# ============================================================================ public API


def fp8_fp4_mqa_logits(
    q,
    kv,
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
    logits_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DeepGEMM `fp8_fp4_mqa_logits`. q = (q_fp8 [M, H, D], None) or (q_fp4 [M, H, D/2], q_sf [M, H] int32);
    kv = (k_fp8 [N, D], k_scale [N] fp32) or (k_fp4 [N, D/2], k_sf [N] int32); weights [M, H];
    ks/ke [M] int32 -> logits [M, N] (or [M, max_seqlen_k], column c = key ks + c) in logits_dtype,
    -inf outside ks <= j < ke."""
    q_values, q_scales = _split_pair("q", q)
    q_values, q_scales, k_values, k_scales, is_fp4, _, _, head_dim = _check_ragged(
        (q_values, q_scales), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end
    )
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k, 0)
    if max_seqlen_k > 0 and clean_logits:
        raise KernelInputError("clean_logits: must be False when max_seqlen_k > 0 (DeepGEMM's rule)")
    _check_dtype_arg("logits_dtype", logits_dtype, LOGITS_DTYPES)
    if use_triton(q_values):
        return _mqa_logits_triton(
            q_values,
            q_scales,
            k_values,
            k_scales,
            weights,
            cu_seq_len_k_start,
            cu_seq_len_k_end,
            is_fp4,
            head_dim,
            max_seqlen_k,
            logits_dtype,
        )
    k, k_scale = _dequant_ragged_keys(k_values, k_scales, is_fp4)
    return ref.mqa_logits(
        _dequant_query(q_values, q_scales), k, weights, cu_seq_len_k_start, cu_seq_len_k_end, k_scale, max_seqlen_k
    ).to(logits_dtype)


def fp8_mqa_logits(
    q: torch.Tensor,
    kv,
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    clean_logits: bool = True,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    """DeepGEMM `fp8_mqa_logits` (legacy FP8 API): q [M, H, D] e4m3, kv = (k [N, D] e4m3, k_scale [N] fp32)."""
    return fp8_fp4_mqa_logits(
        (q, None), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, torch.float32
    )


def get_paged_mqa_logits_metadata(
    context_lens: torch.Tensor, block_kv: int, num_sms: int, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepGEMM `get_paged_mqa_logits_metadata`: an int32 [num_sms + 1, 2] schedule on context_lens'
    device. Our paged kernels partition work from shapes alone, so it holds zeros (no host sync)."""
    expect("context_lens", context_lens, dtype=torch.int32)
    if context_lens.dim() not in (1, 2):
        raise KernelInputError(f"context_lens: expected [B, next_n] or [B], got shape {list(context_lens.shape)}")
    _check_int("block_kv", block_kv, 1)
    num_sms = _check_int("num_sms", num_sms, 1)
    if indices is not None:
        expect("indices", indices, dtype=torch.int32, ndim=1, device=context_lens.device)
    return torch.zeros((num_sms + 1, 2), dtype=torch.int32, device=context_lens.device)


def fp8_fp4_paged_mqa_logits(
    q,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    logits_dtype: torch.dtype = torch.float32,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepGEMM `fp8_fp4_paged_mqa_logits`. q = (q_fp8 [B, next_n, H, D], None) or
    (q_fp4 [B, next_n, H, D/2], q_sf [B, next_n, H] int32); kv_cache uint8 [blocks, block_kv, 1, D+4]
    (FP8) or [blocks, block_kv, 1, D/2+4] (FP4); weights [B*next_n, H]; context_lens [B, next_n]
    (or [B]) int32; block_table [B, max_blocks] int32 -> logits [B*next_n, max_context_len],
    -inf at positions >= the row's length. clean_logits has no effect (always clean)."""
    q_values, q_scales = _split_pair("q", q)
    q_values, q_scales, is_fp4, batch, next_n, _, head_dim = _check_paged(
        (q_values, q_scales), kv_cache, weights, context_lens, block_table
    )
    expect("schedule_meta", schedule_meta, dtype=torch.int32, ndim=2, last_dim=2, device=q_values.device)
    max_context_len = _check_int("max_context_len", max_context_len, 0)
    _check_dtype_arg("logits_dtype", logits_dtype, LOGITS_DTYPES)
    if indices is not None:
        expect("indices", indices, dtype=torch.int32, shape=(batch,), device=q_values.device)
        if next_n != 1:
            raise KernelInputError(f"indices: only allowed with next_n == 1 (DeepGEMM's varlen mode), got {next_n}")
    if use_triton(q_values):
        return _paged_mqa_logits_triton(
            q_values,
            q_scales,
            kv_cache,
            weights,
            context_lens,
            block_table,
            is_fp4,
            head_dim,
            max_context_len,
            logits_dtype,
        )
    k_blocks, k_scales = _dequant_paged_keys(kv_cache, is_fp4)
    return ref.paged_mqa_logits(
        _dequant_query(q_values, q_scales), k_blocks, weights, context_lens, block_table, max_context_len, k_scales
    ).to(logits_dtype)


def fp8_paged_mqa_logits(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    schedule_meta: torch.Tensor,
    max_context_len: int,
    clean_logits: bool = False,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepGEMM `fp8_paged_mqa_logits` (legacy FP8 API): q [B, next_n, H, D] e4m3, FP8 paged cache."""
    return fp8_fp4_paged_mqa_logits(
        (q, None),
        kv_cache,
        weights,
        context_lens,
        block_table,
        schedule_meta,
        max_context_len,
        clean_logits,
        torch.float32,
        indices,
    )


def _as_query_pair(q) -> tuple:
    """A top-k q: an FP8 tensor, or an FP4 (values, scales) pair (or (fp8, None))."""
    return (q, None) if isinstance(q, torch.Tensor) else _split_pair("q", q)


def fp8_mqa_topk(
    q,
    kv,
    weights: torch.Tensor,
    cu_seq_len_k_start: torch.Tensor,
    cu_seq_len_k_end: torch.Tensor,
    topk: int = 512,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Ragged (prefill) indexer top-k without a logits matrix: int32 [M, topk] of positions p relative
    to cu_seq_len_k_start (row t's p-th visible key is ks[t] + p), best first, -1 padded.
    Arguments as `fp8_fp4_mqa_logits` (q may be an FP8 tensor or an FP4 pair); num_splits
    overrides how many programs share a row (default: from the key count)."""
    q_values, q_scales, k_values, k_scales, is_fp4, _, _, head_dim = _check_ragged(
        _as_query_pair(q), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end
    )
    topk = _check_int("topk", topk, 1)
    if num_splits is not None:
        num_splits = _check_int("num_splits", num_splits, 1)
    if use_triton(q_values):
        return _mqa_topk_triton(
            q_values,
            q_scales,
            k_values,
            k_scales,
            weights,
            cu_seq_len_k_start,
            cu_seq_len_k_end,
            is_fp4,
            head_dim,
            topk,
            num_splits,
        )
    k, k_scale = _dequant_ragged_keys(k_values, k_scales, is_fp4)
    return ref.mqa_topk(
        _dequant_query(q_values, q_scales), k, weights, cu_seq_len_k_start, cu_seq_len_k_end, topk, k_scale
    )


def fp8_paged_mqa_topk(
    q,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    topk: int = 512,
    max_context_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Paged (decode) indexer top-k without a logits matrix: int32 [B*next_n, topk] of logical
    positions, best first, -1 padded. Arguments as `fp8_fp4_paged_mqa_logits` (q may be an FP8
    tensor or an FP4 pair). max_context_len bounds the positions considered (default: the block
    table's capacity, block_table.shape[1] * block_kv); num_splits overrides how many programs
    share a row (default: from max_context_len)."""
    q_values, q_scales, is_fp4, _, _, _, head_dim = _check_paged(
        _as_query_pair(q), kv_cache, weights, context_lens, block_table
    )
    topk = _check_int("topk", topk, 1)
    if max_context_len is None:
        max_context_len = block_table.shape[1] * kv_cache.shape[1]
    max_context_len = _check_int("max_context_len", max_context_len, 0)
    if num_splits is not None:
        num_splits = _check_int("num_splits", num_splits, 1)
    if use_triton(q_values):
        return _paged_topk_triton(
            q_values,
            q_scales,
            kv_cache,
            weights,
            context_lens,
            block_table,
            is_fp4,
            head_dim,
            max_context_len,
            topk,
            num_splits,
        )
    k_blocks, k_scales = _dequant_paged_keys(kv_cache, is_fp4)
    return ref.paged_mqa_topk(
        _dequant_query(q_values, q_scales),
        k_blocks,
        weights,
        context_lens,
        block_table,
        max_context_len,
        topk,
        k_scales,
    )
