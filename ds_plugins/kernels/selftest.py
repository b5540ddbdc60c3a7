"""`ds-plugins selftest`: every kernel on a small built-in DeepSeek-V4-shaped problem, on whatever
is here, checked against its PyTorch reference.

On a CUDA GPU the Triton kernels run for real (what an RTX PRO 6000 owner runs before
`vllm serve`); on a CPU they run in Triton's interpreter, on smaller problems (the interpreter
is slow), which checks the same kernel code. Each row: kernel, where it ran, the error against
the reference (normalised by the reference's largest magnitude; for top-k, the share of
selected positions that differ), the bound it must meet, and the time of one call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple


class Result(NamedTuple):
    kernel: str
    device: str
    error: float
    bound: float
    ms: float
    shape: str

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def _where() -> tuple[str, str]:
    """(torch device, description). Sets TRITON_INTERPRET before the kernels are imported on a CPU."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return "cuda", f"{torch.cuda.get_device_name(0)} (SM{major}{minor})"
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu", "CPU, Triton interpreter"


def _timed(fn: Callable, device: str):
    import torch

    if device == "cuda":
        fn()  # compile and warm up
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) * 1e3


def _rel_error(got, ref) -> float:
    import torch

    got, ref = got.float(), ref.float()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(ref[~finite], got[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = ref[finite].abs().max().clamp_min(1e-30)
    return ((got[finite] - ref[finite]).abs().max() / scale).item()


def _topk_mismatch(got, ref) -> float:
    """Share of positions in got's rows that are not in ref's rows (sets; order free)."""
    rows = [(set(g.tolist()) ^ set(r.tolist())) for g, r in zip(got, ref)]
    return sum(len(x) for x in rows) / max(1, 2 * got.numel())


# bf16 output: 2^-7 relative is one rounding of the output plus bf16 softmax weights (2^-8) in the
# p.V dot; fp32 outputs accumulated in a different order: 2^-12 of the largest magnitude.
BF16 = 2.0**-6
FP32 = 2.0**-12


def _case_sparse_prefill(device: str, small: bool) -> Result:
    import torch
    from ds_plugins.kernels import flash_mla_sparse_fwd
    from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd

    s_q, h, s_kv, topk = (4, 64, 192, 64) if small else (256, 64, 8192, 512 + 128)
    q = torch.randn(s_q, h, 512, device=device).bfloat16()
    kv = torch.randn(s_kv, 1, 512, device=device).bfloat16()
    idx = torch.randint(-1, s_kv, (s_q, 1, topk), device=device, dtype=torch.int32)
    sink = torch.randn(h, device=device)
    args = (q, kv, idx, 512**-0.5, 512, sink)
    (out, _, lse), ms = _timed(lambda: flash_mla_sparse_fwd(*args), device)
    ref_out, _, ref_lse = ref_flash_mla_sparse_fwd(*args)
    err = max(_rel_error(out, ref_out) / BF16, _rel_error(lse, ref_lse) / FP32)
    return Result("flash_mla_sparse_fwd", device, err, 1.0, ms, f"s_q={s_q} h={h} topk={topk}")


def _case_sparse_decode(device: str, small: bool) -> Result:
    import torch
    from ds_plugins.kernels import flash_mla_with_kvcache, get_mla_metadata
    from ds_plugins.kernels.kv_cache import quantize_kv_cache
    from ds_plugins.kernels.reference.sparse_mla import ref_sparse_decode

    b, h, window, extra, page, extra_page = (2, 64, 32, 32, 64, 2) if small else (64, 64, 128, 512, 256, 64)
    q = torch.randn(b, 1, h, 512, device=device).bfloat16()
    cache = quantize_kv_cache(torch.randn(b * 4, page, 512, device=device).bfloat16())
    extra_cache = quantize_kv_cache(torch.randn(b * 4 * 32, extra_page, 512, device=device).bfloat16())
    idx = torch.randint(0, b * 4 * page, (b, 1, window), device=device, dtype=torch.int32)
    extra_idx = torch.randint(0, b * 4 * 32 * extra_page, (b, 1, extra), device=device, dtype=torch.int32)
    lens = torch.randint(1, window + 1, (b,), device=device, dtype=torch.int32)
    extra_lens = torch.randint(0, extra + 1, (b,), device=device, dtype=torch.int32)
    sink = torch.randn(h, device=device)
    meta, _ = get_mla_metadata()

    def run():
        return flash_mla_with_kvcache(
            q,
            cache,
            None,
            None,
            512,
            meta,
            softmax_scale=512**-0.5,
            is_fp8_kvcache=True,
            indices=idx,
            attn_sink=sink,
            extra_k_cache=extra_cache,
            extra_indices_in_kvcache=extra_idx,
            topk_length=lens,
            extra_topk_length=extra_lens,
        )

    (out, lse), ms = _timed(run, device)
    ref_out, ref_lse = ref_sparse_decode(q, cache, idx, lens, sink, extra_cache, extra_idx, extra_lens, 512**-0.5)
    err = max(_rel_error(out, ref_out) / BF16, _rel_error(lse, ref_lse) / FP32)
    return Result("flash_mla_with_kvcache", device, err, 1.0, ms, f"b={b} h={h} window={window} extra={extra}")


def _indexer_inputs(device: str, rows: int, keys: int, heads: int = 64, dim: int = 128):
    import torch
    from ds_plugins.kernels.reference.indexer import quantize_fp8_keys

    q = (torch.randn(rows, heads, dim, device=device) * 2).to(torch.float8_e4m3fn)
    k, k_scale = quantize_fp8_keys(torch.randn(keys, dim, device=device))
    weights = torch.randn(rows, heads, device=device)
    return q, k, k_scale, weights


def _case_mqa_logits(device: str, small: bool) -> Result:
    import torch
    from ds_plugins.kernels import fp8_mqa_logits
    from ds_plugins.kernels.reference.indexer import mqa_logits

    m, n = (8, 256) if small else (1024, 8192)
    q, k, k_scale, w = _indexer_inputs(device, m, n)
    ke = torch.randint(1, n + 1, (m,), device=device, dtype=torch.int32)
    ks = (ke - torch.randint(1, n + 1, (m,), device=device, dtype=torch.int32)).clamp_min(0)
    out, ms = _timed(lambda: fp8_mqa_logits(q, (k, k_scale), w, ks, ke), device)
    err = _rel_error(out, mqa_logits(q, k.float(), w, ks, ke, k_scale)) / FP32
    return Result("fp8_mqa_logits", device, err, 1.0, ms, f"M={m} N={n} H=64 D=128")


def _paged_inputs(device: str, small: bool):
    import torch
    from ds_plugins.kernels.reference.indexer import paged_cache_from_keys, split_fp8_paged_cache

    b, capacity, block_kv = (2, 256, 64) if small else (64, 16384, 64)
    q = (torch.randn(b, 1, 64, 128, device=device) * 2).to(torch.float8_e4m3fn)
    keys = torch.randn(b, capacity, 128, device=device)
    perm = torch.randperm(b * capacity // block_kv, device=device)
    cache, table = paged_cache_from_keys(keys, block_kv, physical_blocks=perm)
    lens = torch.randint(1, capacity + 1, (b, 1), device=device, dtype=torch.int32)
    w = torch.randn(b, 64, device=device)
    values, scales = split_fp8_paged_cache(cache)
    return q, cache, table, lens, w, capacity, values, scales


def _case_paged_logits(device: str, small: bool) -> Result:
    from ds_plugins.kernels import fp8_paged_mqa_logits, get_paged_mqa_logits_metadata
    from ds_plugins.kernels.reference.indexer import paged_mqa_logits

    q, cache, table, lens, w, capacity, values, scales = _paged_inputs(device, small)
    meta = get_paged_mqa_logits_metadata(lens, 64, 1)
    out, ms = _timed(lambda: fp8_paged_mqa_logits(q, cache, w, lens, table, meta, capacity), device)
    err = _rel_error(out, paged_mqa_logits(q, values, w, lens, table, capacity, scales)) / FP32
    return Result("fp8_paged_mqa_logits", device, err, 1.0, ms, f"B={q.shape[0]} context={capacity} H=64 D=128")


def _case_paged_topk(device: str, small: bool) -> Result:
    from ds_plugins.kernels import fp8_paged_mqa_topk
    from ds_plugins.kernels.reference.indexer import paged_mqa_topk

    q, cache, table, lens, w, capacity, values, scales = _paged_inputs(device, small)
    topk = 64 if small else 512
    out, ms = _timed(lambda: fp8_paged_mqa_topk(q, cache, w, lens, table, topk, capacity), device)
    ref = paged_mqa_topk(q, values, w, lens, table, capacity, topk, scales)
    # random scores tie only by accident: allow a sliver of swaps at the k-th score
    return Result(
        "fp8_paged_mqa_topk",
        device,
        _topk_mismatch(out, ref),
        0.01,
        ms,
        f"B={q.shape[0]} context={capacity} topk={topk}",
    )


def _case_prenorm(device: str, small: bool) -> Result:
    import torch
    from ds_plugins.kernels import tf32_hc_prenorm_gemm
    from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm

    m, splits = (4, 2) if small else (4096, 4)
    a = torch.randn(m, 16384, device=device).bfloat16()
    b = torch.randn(24, 16384, device=device) * 0.01
    d, sq = torch.empty(splits, m, 24, device=device), torch.empty(splits, m, device=device)
    rd, rsq = torch.empty_like(d), torch.empty_like(sq)
    _, ms = _timed(lambda: tf32_hc_prenorm_gemm(a, b, d, sq, splits), device)
    hc_prenorm_gemm(a, b, rd, rsq, splits)
    tf32 = 2.0**-9 if device == "cuda" else FP32  # the GPU dot is TF32 (10-bit mantissa)
    err = max(_rel_error(d, rd), _rel_error(sq, rsq)) / tf32
    return Result("tf32_hc_prenorm_gemm", device, err, 1.0, ms, f"M={m} N=24 K=16384 splits={splits}")


def _case_einsum(device: str, small: bool) -> Result:
    import torch
    from ds_plugins.kernels import fp8_einsum
    from ds_plugins.kernels.reference.einsum import fp8_einsum_bhr_hdr_bhd, quantize_per_block, quantize_per_token

    tokens, r, d_out = (2, 512, 256) if small else (256, 4096, 1024)  # V4: h=8 groups, r=4096, d=1024
    a = quantize_per_token(torch.randn(tokens, 8, r, device=device))
    w = quantize_per_block(torch.randn(8, d_out, r, device=device))
    out, ref = (torch.empty(tokens, 8, d_out, device=device, dtype=torch.bfloat16) for _ in range(2))
    _, ms = _timed(lambda: fp8_einsum("bhr,hdr->bhd", a, w, out), device)
    fp8_einsum_bhr_hdr_bhd(a, w, ref)
    return Result("fp8_einsum", device, _rel_error(out, ref) / BF16, 1.0, ms, f"b={tokens} h=8 r={r} d={d_out}")


# (kernel name as the rows and ds_plugins.kernels call it, case)
CASES = (
    ("flash_mla_sparse_fwd", _case_sparse_prefill),
    ("flash_mla_with_kvcache", _case_sparse_decode),
    ("fp8_mqa_logits", _case_mqa_logits),
    ("fp8_paged_mqa_logits", _case_paged_logits),
    ("fp8_paged_mqa_topk", _case_paged_topk),
    ("tf32_hc_prenorm_gemm", _case_prenorm),
    ("fp8_einsum", _case_einsum),
)

EXIT_OK, EXIT_MISMATCH, EXIT_CANNOT_RUN = 0, 1, 2


class CannotRun(RuntimeError):
    """What this machine lacks for the selftest, with the command that adds it."""


def missing_prerequisites(find_spec=None) -> list[str]:
    """Packages the selftest needs and this interpreter lacks: torch and triton everywhere, and numpy
    for Triton's CPU interpreter (a GPU-less machine). Checked without importing them."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    return [name for name in ("torch", "triton", "numpy") if find_spec(name) is None]


def run() -> tuple[str, list[Result]]:
    missing = missing_prerequisites()
    if missing:
        # numpy is needed only by Triton's CPU interpreter; but without torch we cannot tell, so ask for all
        raise CannotRun(
            f"cannot run here: needs {', '.join(missing)} (pip install {' '.join(missing)}; "
            f"torch and triton come with vLLM and SGLang, numpy runs Triton's CPU interpreter)"
        )
    device, where = _where()
    import torch

    torch.manual_seed(0)
    results = []
    for name, case in CASES:
        try:
            results.append(case(device, small=device == "cpu"))
        except Exception as exc:  # one broken kernel must not hide the others
            results.append(
                Result(name, device, float("inf"), 1.0, float("nan"), f"failed: {type(exc).__name__}: {exc}")
            )
    return where, results


def main(as_json: bool = False) -> int:
    try:
        where, results = run()
    except CannotRun as exc:
        if as_json:
            print(json.dumps({"device": None, "results": [], "error": str(exc), "exit_code": EXIT_CANNOT_RUN}))
        print(f"ds-plugins selftest: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if as_json:
        print(
            json.dumps(
                {
                    "device": where,
                    "results": [
                        {**r._asdict(), "ok": r.ok, "error": r.error if r.error != float("inf") else None}
                        for r in results
                    ],
                },
                indent=2,
            )
        )
    else:
        print(f"ds-plugins kernel selftest on {where}")
        print(f"{'kernel':<24}{'error/bound':>12}{'time':>12}  {'result':<6}  problem")
        for r in results:
            ratio = r.error / r.bound
            print(f"{r.kernel:<24}{ratio:>12.3g}{r.ms:>10.1f}ms  {'ok' if r.ok else 'FAIL':<6}  {r.shape}")
        bad = [r.kernel for r in results if not r.ok]
        print(
            f"{len(results) - len(bad)}/{len(results)} kernels match their references"
            + (f"; FAILED: {', '.join(bad)}" if bad else "")
        )
    return EXIT_OK if all(r.ok for r in results) else EXIT_MISMATCH
