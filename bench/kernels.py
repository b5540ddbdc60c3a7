"""Kernel benchmark: each ds-plugins kernel's achieved FLOP/s and bytes/s as ratios of what this GPU
measurably reaches in the same process, its speed-up over the PyTorch reference, and its goal.

    python bench/kernels.py [--save] [--budget SECONDS]   # --save: bench/results/kernels-<gpu>-<commit>.json

Peaks are measured here, at start-up: a large device-to-device copy (bandwidth), a large bf16
matmul and, where torch has it for this GPU, a large fp8 `torch._scaled_mm` (tensor-core FLOP/s).
Each kernel's FLOPs (2 per multiply-add of the useful math) and bytes (what must cross DRAM at
least once) give: bandwidth share = achieved bytes/s / copy bytes/s; compute share = achieved
FLOP/s / the matching GEMM's (fp8 for the fp8 kernels); roofline share = max(flops / peak_flops,
bytes / peak_bandwidth) / time. Spec-sheet figures of known GPUs are printed beside, for the record.

Goals (issue #18): sparse FP8 decode >= 60% of its roofline at V4-Flash shapes (64 heads, 512 top-k
+ 128 window, 1 and 2 query tokens, batch 1-64); decode at 64K-256K context within 1.5x of its 4K
cost per token; sparse prefill >= 300 TFLOP/s on SM90; paged indexer logits >= 60% of copy
bandwidth; every kernel >= 10x its reference. Without a GPU (or with --small) the same cases run
shrunk, on the CPU under Triton's interpreter: the figures then only prove the wiring.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core TFLOP/s and DRAM TB/s from vendor spec sheets, for the record only.
SPEC = {
    "H100 80GB HBM3": (989.0, 3.35),
    "H100 PCIe": (756.0, 2.0),
    "H200": (989.0, 4.8),
    "RTX PRO 6000 Blackwell": (503.8, 1.79),
    "GB10": (None, 0.273),
}
SPEEDUP_GOAL = 10.0
LONG_CONTEXT_GOAL = 1.5  # decode cost per token at 64K-256K context / at 4K


class Case(NamedTuple):
    name: str
    problem: str
    flops: float
    bytes: float
    kernel: object  # () -> None
    reference: object  # () -> None, or None: not timed (a long-context twin of a timed case)
    goal: str | None  # "roofline>=0.6" | "tflops>=300" | "bandwidth>=0.6" | "context<=1.5x" | None
    fp8: bool = False  # compare against the fp8 GEMM peak (fp8 tensor-core dots) instead of bf16


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, reps: int = 20, device: str = "cuda") -> float:
    """Median of reps calls (CUDA events on a GPU, wall clock on a CPU), after one warm-up call."""
    import torch

    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure_peaks(device: str = "cuda", small: bool = False) -> dict:
    """TB/s of a large copy, TFLOP/s of a large bf16 matmul and of an fp8 scaled matmul (None where
    torch has none for this device), measured now, in this process."""
    import torch

    n, size = (256, 1 << 22) if small else (8192, 1 << 30)
    x = torch.empty(size, device=device, dtype=torch.uint8)
    y = torch.empty_like(x)
    copy_tbs = 2 * size / _time_ms(lambda: y.copy_(x), 10, device) / 1e9
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / _time_ms(lambda: a @ a, 10, device) / 1e9
    fp8 = None
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = a.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        fp8 = (
            2 * n**3 / _time_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), 10, device) / 1e9
        )
    except (RuntimeError, AttributeError, TypeError):
        pass  # no fp8 GEMM in torch for this device: compute shares use bf16
    return {"copy_tbs": copy_tbs, "bf16_tflops": bf16, "fp8_tflops": fp8}


def _cases(dev: str = "cuda", small: bool = False) -> list[Case]:
    """The benchmark problems (small=True: the same problems shrunk, to check the wiring on a CPU)."""
    import torch
    from ds_plugins.kernels import (
        flash_mla_sparse_fwd,
        flash_mla_with_kvcache,
        fp8_einsum,
        fp8_mqa_logits,
        fp8_paged_mqa_logits,
        fp8_paged_mqa_topk,
        get_mla_metadata,
        get_paged_mqa_logits_metadata,
        tf32_hc_prenorm_gemm,
    )
    from ds_plugins.kernels.kv_cache import BYTES_PER_TOKEN, quantize_kv_cache
    from ds_plugins.kernels.reference import einsum as ref_einsum
    from ds_plugins.kernels.reference import indexer as ref_indexer
    from ds_plugins.kernels.reference import mhc as ref_mhc
    from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd, ref_sparse_decode

    cases = []

    # Sparse decode: 64 heads, 128 window + 512 compressed candidates (V4-Flash C4 layer); batch 1-64,
    # 1 and 2 query tokens (MTP); then batch 1 at 4K, 64K and 256K context (compressed cache sized
    # for it, candidates spread over all of it): the split-KV cost per token.
    h = 64
    sink = torch.randn(h, device=dev)

    def decode_case(b, s_q, win, extra, context, goal, timed=True):
        q = torch.randn(b, s_q, h, 512, device=dev).bfloat16()
        cache = quantize_kv_cache(torch.randn(max(1, b * 4), 256, 512, device=dev).bfloat16())
        x_pages = max(1, b * context // 4 // 64)
        xcache = quantize_kv_cache(torch.randn(x_pages, 64, 512, device=dev).bfloat16())
        idx = torch.randint(0, cache.shape[0] * 256, (b, s_q, win), device=dev, dtype=torch.int32)
        xidx = torch.randint(0, x_pages * 64, (b, s_q, extra), device=dev, dtype=torch.int32)
        meta, _ = get_mla_metadata()
        attended = win + extra
        return Case(
            "flash_mla_with_kvcache",
            f"b={b} s_q={s_q} h={h} {win}+{extra} context={context // 1024}K",
            2 * b * s_q * h * attended * (512 + 512),
            b * s_q * attended * BYTES_PER_TOKEN + 2 * b * s_q * h * 512 * 2,
            lambda: flash_mla_with_kvcache(
                q, cache, None, None, 512, meta, None, 512**-0.5, False, True, idx, sink, xcache, xidx
            ),
            (lambda: ref_sparse_decode(q, cache, idx, None, sink, xcache, xidx, None, 512**-0.5)) if timed else None,
            goal,
        )

    win, extra = (16, 16) if small else (128, 512)
    for b in (2,) if small else (1, 8, 64):
        for s_q in (1, 2):
            cases.append(decode_case(b, s_q, win, extra, 4096, "roofline>=0.6", timed=b == 64 or small))
    for context in (4096, 16384) if small else (4096, 65536, 262144):
        cases.append(decode_case(1, 1, win, extra, context, "context<=1.5x" if context > 4096 else None, timed=False))

    # Sparse prefill: 4096 tokens, 64 heads, 128 window + 512 top-k.
    s_q, topk, s_kv = (2, 32, 256) if small else (4096, 640, 32768)
    pq = torch.randn(s_q, h, 512, device=dev).bfloat16()
    pkv = torch.randn(s_kv, 1, 512, device=dev).bfloat16()
    pidx = torch.randint(0, s_kv, (s_q, 1, topk), device=dev, dtype=torch.int32)
    cases.append(
        Case(
            "flash_mla_sparse_fwd",
            f"s_q={s_q} h={h} topk={topk}",
            2 * s_q * h * topk * (512 + 512),
            s_q * topk * 512 * 2 + 2 * s_q * h * 512 * 2,
            lambda: flash_mla_sparse_fwd(pq, pkv, pidx, 512**-0.5, 512, sink),
            lambda: ref_flash_mla_sparse_fwd(pq, pkv, pidx, 512**-0.5, 512, sink),
            "tflops>=300" if not small else None,
        )
    )

    # Indexer, prefill: 4096 query rows against 16384 compressed keys (ragged, causal windows).
    m, n, hi, d = (4, 128, 64, 128) if small else (4096, 16384, 64, 128)
    iq = (torch.randn(m, hi, d, device=dev)).to(torch.float8_e4m3fn)
    k, ksc = ref_indexer.quantize_fp8_keys(torch.randn(n, d, device=dev))
    w = torch.randn(m, hi, device=dev)
    ke = torch.linspace(1, n, m, device=dev).to(torch.int32)
    ks = torch.zeros(m, device=dev, dtype=torch.int32)
    visible = float(ke.sum())
    cases.append(
        Case(
            "fp8_mqa_logits",
            f"M={m} N={n} H={hi} D={d}",
            2 * visible * hi * d,
            n * (d + 4) + m * hi * (d + 4) + m * n * 4,
            lambda: fp8_mqa_logits(iq, (k, ksc), w, ks, ke),
            lambda: ref_indexer.mqa_logits(iq, k.float(), w, ks, ke, ksc),
            None,
            fp8=True,
        )
    )

    # Indexer, decode: batch 64, 16384 compressed keys each (a 64K-token context), paged.
    bb, ctx = (2, 128) if small else (64, 16384)
    dq = torch.randn(bb, 1, hi, d, device=dev).to(torch.float8_e4m3fn)
    pcache, table = ref_indexer.paged_cache_from_keys(torch.randn(bb, ctx, d, device=dev), 64)
    lens = torch.full((bb, 1), ctx, device=dev, dtype=torch.int32)
    dw = torch.randn(bb, hi, device=dev)
    pmeta = get_paged_mqa_logits_metadata(lens, 64, 132)
    values, scales = ref_indexer.split_fp8_paged_cache(pcache)
    cases.append(
        Case(
            "fp8_paged_mqa_logits",
            f"B={bb} context={ctx} H={hi} D={d}",
            2 * bb * ctx * hi * d,
            bb * ctx * (d + 4) + bb * ctx * 4,
            lambda: fp8_paged_mqa_logits(dq, pcache, dw, lens, table, pmeta, ctx),
            lambda: ref_indexer.paged_mqa_logits(dq, values, dw, lens, table, ctx, scales),
            "bandwidth>=0.6",
            fp8=True,
        )
    )
    cases.append(
        Case(
            "fp8_paged_mqa_topk",
            f"B={bb} context={ctx} topk=512",
            2 * bb * ctx * hi * d,
            bb * ctx * (d + 4),
            lambda: fp8_paged_mqa_topk(dq, pcache, dw, lens, table, min(512, ctx), ctx),
            lambda: ref_indexer.paged_mqa_topk(dq, values, dw, lens, table, ctx, min(512, ctx), scales),
            None,
            fp8=True,
        )
    )

    # mHC prenorm GEMM: 8192 tokens, N=24, K=4*4096.
    mm = 2 if small else 8192
    a = torch.randn(mm, 16384, device=dev).bfloat16()
    bw = torch.randn(24, 16384, device=dev)
    dd, sq = torch.empty(4, mm, 24, device=dev), torch.empty(4, mm, device=dev)
    cases.append(
        Case(
            "tf32_hc_prenorm_gemm",
            f"M={mm} N=24 K=16384 splits=4",
            2 * mm * 24 * 16384,
            mm * 16384 * 2 + 24 * 16384 * 4,
            lambda: tf32_hc_prenorm_gemm(a, bw, dd, sq, 4),
            lambda: ref_mhc.hc_prenorm_gemm(a, bw, dd, sq, 4),
            None,
        )
    )

    # Grouped output projection: 4096 tokens, 8 groups, r=4096, d=1024.
    t, r, dd_ = (2, 256, 128) if small else (4096, 4096, 1024)
    ea = ref_einsum.quantize_per_token(torch.randn(t, 8, r, device=dev))
    ew = ref_einsum.quantize_per_block(torch.randn(8, dd_, r, device=dev))
    eo = torch.empty(t, 8, dd_, device=dev, dtype=torch.bfloat16)
    cases.append(
        Case(
            "fp8_einsum",
            f"b={t} h=8 r={r} d={dd_}",
            2 * t * 8 * r * dd_,
            t * 8 * r + 8 * dd_ * r + t * 8 * dd_ * 2,
            lambda: fp8_einsum("bhr,hdr->bhd", ea, ew, eo),
            lambda: ref_einsum.fp8_einsum_bhr_hdr_bhd(ea, ew, eo),
            None,
            fp8=True,
        )
    )
    return cases


def commit() -> str:
    """The checkout's commit (DSP_COMMIT wins: a copy of the tree without .git passes it in), plus
    '-dirty' when git says the tree differs from it."""
    given = os.environ.get("DSP_COMMIT")
    if given:
        return given
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ds_plugins", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _goal_met(case: Case, row: dict, capability) -> bool | None:
    """The case's own goal (None: it has none, or it does not apply to this GPU)."""
    if case.goal == "roofline>=0.6":
        return row["roofline_fraction"] >= 0.6
    if case.goal == "tflops>=300":
        return row["tflops"] >= 300 if capability and capability[0] == 9 else None
    if case.goal == "bandwidth>=0.6":
        return row["bandwidth_fraction"] >= 0.6
    if case.goal == "context<=1.5x":
        return row.get("vs_4k_per_token") is not None and row["vs_4k_per_token"] <= LONG_CONTEXT_GOAL
    return None


def run(device: str = "cuda", small: bool = False, budget_s: float | None = None, out=print) -> dict:
    """Measure every case; stop timing new cases once budget_s has passed (they are listed as not run)."""
    import torch

    start = time.monotonic()
    peaks = measure_peaks(device, small)
    cap = tuple(torch.cuda.get_device_capability(0)) if device == "cuda" else None
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (Triton interpreter)"
    spec = next((v for k, v in SPEC.items() if k in name), None)
    fp8_text = f"{peaks['fp8_tflops']:.0f}" if peaks["fp8_tflops"] else "n/a"
    out(
        f"{name}{f' (SM{cap[0]}{cap[1]})' if cap else ''}, commit {commit()}: measured copy "
        f"{peaks['copy_tbs']:.2f} TB/s, bf16 GEMM {peaks['bf16_tflops']:.0f} TFLOP/s, fp8 GEMM {fp8_text} TFLOP/s"
        + (f"; spec {spec[0]} TFLOP/s bf16, {spec[1]} TB/s" if spec else "")
    )
    out(f"{'kernel':<24}{'problem':<40}{'ms':>9}{'TFLOP/s':>9}{'%copy':>7}{'%gemm':>7}{'%roof':>7}{'vs ref':>8}  goal")
    rows, base_per_token = [], None
    for case in _cases(device, small):
        if budget_s is not None and time.monotonic() - start > budget_s:
            rows.append({"kernel": case.name, "problem": case.problem, "not_run": "time budget spent"})
            out(f"{case.name:<24}{case.problem:<40} not run: time budget spent")
            continue
        reps = 3 if small else 20
        ms = _time_ms(case.kernel, reps, device)
        ref_ms = _time_ms(case.reference, 1 if small else 3, device) if case.reference else None
        gemm = (peaks["fp8_tflops"] or peaks["bf16_tflops"]) if case.fp8 else peaks["bf16_tflops"]
        tflops, tbs = case.flops / ms / 1e9, case.bytes / ms / 1e9
        bound_ms = max(case.flops / (gemm * 1e9), case.bytes / (peaks["copy_tbs"] * 1e9))
        row = {
            "kernel": case.name,
            "problem": case.problem,
            "ms": ms,
            "tflops": tflops,
            "tbs": tbs,
            "bandwidth_fraction": tbs / peaks["copy_tbs"],
            "compute_fraction": tflops / gemm,
            "roofline_fraction": bound_ms / ms,
            "reference_ms": ref_ms,
            "speedup": ref_ms / ms if ref_ms else None,
            "goal": case.goal,
        }
        if "context=" in case.problem and case.reference is None:
            per_token = ms  # batch 1, one query token: ms per token
            if case.goal is None:
                base_per_token = per_token  # the 4K twin
            elif base_per_token:
                row["vs_4k_per_token"] = per_token / base_per_token
        goal_text = ", ".join(g for g in (case.goal, f">={SPEEDUP_GOAL:.0f}x ref" if ref_ms else None) if g)
        if small:
            # shrunk problems under the interpreter: no figure says anything about a GPU
            row["goal_met"] = None
            verdict = f"  {goal_text}: not judged (interpreter)" if goal_text else ""
        else:
            met = _goal_met(case, row, cap)
            speed_ok = row["speedup"] is None or row["speedup"] >= SPEEDUP_GOAL
            row["goal_met"] = (met is not False) and speed_ok
            verdict = f"  {goal_text}: {'met' if row['goal_met'] else 'NOT met'}" if goal_text else ""
        rows.append(row)
        extra = f" ({row['vs_4k_per_token']:.2f}x 4K)" if "vs_4k_per_token" in row else ""
        speedup = f"{row['speedup']:.0f}x" if ref_ms else "-"
        out(
            f"{case.name:<24}{case.problem:<40}{ms:>9.3f}{tflops:>9.1f}{row['bandwidth_fraction']:>7.0%}"
            f"{row['compute_fraction']:>7.0%}{row['roofline_fraction']:>7.0%}{speedup:>8}{verdict}{extra}"
        )
    return {
        "gpu": name,
        "capability": cap,
        "commit": commit(),
        "peaks": peaks,
        "spec": spec,
        "small": small,
        "results": rows,
    }


def results_name(prefix: str, gpu: str, commit_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in gpu)
    return f"{prefix}-{safe}-{commit_id}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", action="store_true", help="write bench/results/kernels-<gpu>-<commit>.json")
    ap.add_argument("--small", action="store_true", help="shrunk problems (what runs on a CPU)")
    ap.add_argument("--budget", type=float, default=None, help="stop starting new cases after this many seconds")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before ds_plugins.kernels is imported
        print("no GPU found: CPU smoke run only (Triton interpreter, tiny shapes); the figures only prove the wiring")
    report = run(device, args.small or device == "cpu", args.budget)
    if args.save:
        out = ROOT / "bench" / "results" / results_name("kernels", report["gpu"], report["commit"])
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
