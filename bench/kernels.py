"""Kernel benchmark: achieved TFLOP/s and GB/s, the roofline bound on this GPU, and the speed-up
over the PyTorch reference, for every ds-plugins kernel, in one run.

    python bench/kernels.py [--save]        # --save writes bench/results/kernels-<gpu>-<commit>.json

Roofline: a kernel's bound is max(flops / peak_flops, bytes / peak_bandwidth); "% of roofline" is
that bound divided by the measured time. Peaks are measured here, at start-up (a large bf16
matmul for tensor-core FLOP/s, a large device-to-device copy for bandwidth), so the bound is what
this GPU really reaches, and the spec-sheet figures for known GPUs are printed beside them. FLOP
and byte counts are computed the same way for every kernel (see each case): FLOPs of the useful
math (2 per multiply-add), bytes that must cross DRAM at least once.

Goals (issue #3, measured on an H100; SM120 follows from the same roofline model): sparse decode
at batch 64, 64 heads, 128 window + 512 compressed candidates >= 60% of its roofline bound; sparse
prefill >= 300 TFLOP/s; paged indexer logits >= 60% of DRAM bandwidth; every kernel >= 10x its
reference. Without a GPU the script runs a CPU smoke pass (the interpreter, tiny shapes) and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core TFLOP/s and DRAM TB/s from vendor spec sheets, for the record only.
SPEC = {
    "H100 80GB HBM3": (989.0, 3.35), "H100 PCIe": (756.0, 2.0), "H200": (989.0, 4.8),
    "RTX PRO 6000 Blackwell": (503.8, 1.79), "GB10": (None, 0.273),
}


class Case(NamedTuple):
    name: str
    problem: str
    flops: float
    bytes: float
    kernel: object      # () -> None
    reference: object   # () -> None
    goal: str | None    # "roofline>=0.6" | "tflops>=300" | "bandwidth>=0.6"


def _time_ms(fn, reps: int = 20) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _peaks() -> tuple[float, float]:
    """(TFLOP/s of a large bf16 matmul, TB/s of a large copy) on this GPU."""
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ a, reps=10)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), reps=10)
    return tflops, 2 * x.numel() / ms / 1e9


def _cases(dev: str = "cuda", small: bool = False) -> list[Case]:
    """The benchmark problems (small=True: the same problems shrunk, to check the wiring on a CPU)."""
    import torch
    from ds_plugins.kernels import (flash_mla_sparse_fwd, flash_mla_with_kvcache, fp8_einsum, fp8_mqa_logits,
                                    fp8_paged_mqa_logits, fp8_paged_mqa_topk, get_mla_metadata,
                                    get_paged_mqa_logits_metadata, tf32_hc_prenorm_gemm)
    from ds_plugins.kernels.kv_cache import BYTES_PER_TOKEN, quantize_kv_cache
    from ds_plugins.kernels.reference import einsum as ref_einsum
    from ds_plugins.kernels.reference import indexer as ref_indexer
    from ds_plugins.kernels.reference import mhc as ref_mhc
    from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd, ref_sparse_decode
    cases = []

    # Sparse decode: batch 64, 64 heads, 128 window + 512 compressed candidates (V4-Flash C4 layer).
    b, h, win, extra = (2, 64, 16, 16) if small else (64, 64, 128, 512)
    q = torch.randn(b, 1, h, 512, device=dev).bfloat16()
    cache = quantize_kv_cache(torch.randn(b * 4, 256, 512, device=dev).bfloat16())
    xcache = quantize_kv_cache(torch.randn(b * 64, 64, 512, device=dev).bfloat16())
    idx = torch.randint(0, b * 4 * 256, (b, 1, win), device=dev, dtype=torch.int32)
    xidx = torch.randint(0, b * 64 * 64, (b, 1, extra), device=dev, dtype=torch.int32)
    sink = torch.randn(h, device=dev)
    meta, _ = get_mla_metadata()
    attended = win + extra
    cases.append(Case(
        "flash_mla_with_kvcache", f"b={b} h={h} {win}+{extra} candidates",
        2 * b * h * attended * (512 + 512),
        b * attended * BYTES_PER_TOKEN + 2 * b * h * 512 * 2,
        lambda: flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, 512 ** -0.5, False, True, idx, sink,
                                       xcache, xidx),
        lambda: ref_sparse_decode(q, cache, idx, None, sink, xcache, xidx, None, 512 ** -0.5),
        "roofline>=0.6"))

    # Sparse prefill: 4096 tokens, 64 heads, 128 window + 512 top-k.
    s_q, topk, s_kv = (2, 32, 256) if small else (4096, 640, 32768)
    pq = torch.randn(s_q, h, 512, device=dev).bfloat16()
    pkv = torch.randn(s_kv, 1, 512, device=dev).bfloat16()
    pidx = torch.randint(0, s_kv, (s_q, 1, topk), device=dev, dtype=torch.int32)
    cases.append(Case(
        "flash_mla_sparse_fwd", f"s_q={s_q} h={h} topk={topk}",
        2 * s_q * h * topk * (512 + 512), s_q * topk * 512 * 2 + 2 * s_q * h * 512 * 2,
        lambda: flash_mla_sparse_fwd(pq, pkv, pidx, 512 ** -0.5, 512, sink),
        lambda: ref_flash_mla_sparse_fwd(pq, pkv, pidx, 512 ** -0.5, 512, sink),
        "tflops>=300"))

    # Indexer, prefill: 4096 query rows against 16384 compressed keys (ragged, causal windows).
    m, n, hi, d = (4, 128, 64, 128) if small else (4096, 16384, 64, 128)
    iq = (torch.randn(m, hi, d, device=dev)).to(torch.float8_e4m3fn)
    k, ksc = ref_indexer.quantize_fp8_keys(torch.randn(n, d, device=dev))
    w = torch.randn(m, hi, device=dev)
    ke = torch.linspace(1, n, m, device=dev).to(torch.int32)
    ks = torch.zeros(m, device=dev, dtype=torch.int32)
    visible = float(ke.sum())
    cases.append(Case(
        "fp8_mqa_logits", f"M={m} N={n} H={hi} D={d}", 2 * visible * hi * d,
        n * (d + 4) + m * hi * (d + 4) + m * n * 4,
        lambda: fp8_mqa_logits(iq, (k, ksc), w, ks, ke),
        lambda: ref_indexer.mqa_logits(iq, k.float(), w, ks, ke, ksc), None))

    # Indexer, decode: batch 64, 16384 compressed keys each (a 64K-token context), paged.
    bb, ctx = (2, 128) if small else (64, 16384)
    dq = torch.randn(bb, 1, hi, d, device=dev).to(torch.float8_e4m3fn)
    pcache, table = ref_indexer.paged_cache_from_keys(torch.randn(bb, ctx, d, device=dev), 64)
    lens = torch.full((bb, 1), ctx, device=dev, dtype=torch.int32)
    dw = torch.randn(bb, hi, device=dev)
    pmeta = get_paged_mqa_logits_metadata(lens, 64, 132)
    values, scales = ref_indexer.split_fp8_paged_cache(pcache)
    cases.append(Case(
        "fp8_paged_mqa_logits", f"B={bb} context={ctx} H={hi} D={d}", 2 * bb * ctx * hi * d,
        bb * ctx * (d + 4) + bb * ctx * 4,
        lambda: fp8_paged_mqa_logits(dq, pcache, dw, lens, table, pmeta, ctx),
        lambda: ref_indexer.paged_mqa_logits(dq, values, dw, lens, table, ctx, scales), "bandwidth>=0.6"))
    cases.append(Case(
        "fp8_paged_mqa_topk", f"B={bb} context={ctx} topk=512", 2 * bb * ctx * hi * d, bb * ctx * (d + 4),
        lambda: fp8_paged_mqa_topk(dq, pcache, dw, lens, table, min(512, ctx), ctx),
        lambda: ref_indexer.paged_mqa_topk(dq, values, dw, lens, table, ctx, min(512, ctx), scales), None))

    # mHC prenorm GEMM: 8192 tokens, N=24, K=4*4096.
    mm = 2 if small else 8192
    a = torch.randn(mm, 16384, device=dev).bfloat16()
    bw = torch.randn(24, 16384, device=dev)
    dd, sq = torch.empty(4, mm, 24, device=dev), torch.empty(4, mm, device=dev)
    cases.append(Case(
        "tf32_hc_prenorm_gemm", f"M={mm} N=24 K=16384 splits=4", 2 * mm * 24 * 16384,
        mm * 16384 * 2 + 24 * 16384 * 4,
        lambda: tf32_hc_prenorm_gemm(a, bw, dd, sq, 4),
        lambda: ref_mhc.hc_prenorm_gemm(a, bw, dd, sq, 4), None))

    # Grouped output projection: 4096 tokens, 8 groups, r=4096, d=1024.
    t, r, dd_ = (2, 256, 128) if small else (4096, 4096, 1024)
    ea = ref_einsum.quantize_per_token(torch.randn(t, 8, r, device=dev))
    ew = ref_einsum.quantize_per_block(torch.randn(8, dd_, r, device=dev))
    eo = torch.empty(t, 8, dd_, device=dev, dtype=torch.bfloat16)
    cases.append(Case(
        "fp8_einsum", f"b={t} h=8 r={r} d={dd_}", 2 * t * 8 * r * dd_,
        t * 8 * r + 8 * dd_ * r + t * 8 * dd_ * 2,
        lambda: fp8_einsum("bhr,hdr->bhd", ea, ew, eo),
        lambda: ref_einsum.fp8_einsum_bhr_hdr_bhd(ea, ew, eo), None))
    return cases


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_run(save: bool) -> int:
    import torch
    name = torch.cuda.get_device_name(0)
    cap = torch.cuda.get_device_capability(0)
    peak_tflops, peak_tbs = _peaks()
    spec = next((v for k, v in SPEC.items() if k in name), None)
    print(f"{name} (SM{cap[0]}{cap[1]}), commit {_commit()}: measured peaks {peak_tflops:.0f} TFLOP/s bf16 matmul, "
          f"{peak_tbs:.2f} TB/s copy" + (f"; spec {spec[0]} TFLOP/s, {spec[1]} TB/s" if spec else ""))
    rows = []
    print(f"{'kernel':<24}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'roofline':>10}{'vs ref':>8}  goal")
    for case in _cases():
        ms = _time_ms(case.kernel)
        ref_ms = _time_ms(case.reference, reps=3)
        tflops, gbs = case.flops / ms / 1e9, case.bytes / ms / 1e6
        bound_ms = max(case.flops / (peak_tflops * 1e9), case.bytes / (peak_tbs * 1e9))
        roof, speedup = bound_ms / ms, ref_ms / ms
        met = {"roofline>=0.6": roof >= 0.6, "tflops>=300": tflops >= 300,
               "bandwidth>=0.6": gbs / (peak_tbs * 1e3) >= 0.6, None: True}[case.goal] and speedup >= 10
        rows.append({"kernel": case.name, "problem": case.problem, "ms": ms, "tflops": tflops, "gbs": gbs,
                     "roofline_fraction": roof, "reference_ms": ref_ms, "speedup": speedup,
                     "goal": case.goal, "goal_met": met})
        print(f"{case.name:<24}{ms:>9.3f}{tflops:>9.1f}{gbs:>8.0f}{roof:>9.0%}{speedup:>7.0f}x  "
              f"{(case.goal or '') + ' & 10x ref'}: {'met' if met else 'NOT met'}")
    if save:
        out = ROOT / "bench" / "results" / f"kernels-{name.replace(' ', '_')}-{_commit()}.json"
        out.write_text(json.dumps({"gpu": name, "capability": cap, "commit": _commit(),
                                   "peak_tflops_bf16": peak_tflops, "peak_tbs_copy": peak_tbs, "results": rows},
                                  indent=2) + "\n")
        print(f"saved {out}")
    return 0


def cpu_smoke() -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from ds_plugins.kernels.selftest import main
    print("no GPU found: CPU smoke run only (Triton interpreter, tiny shapes); "
          "no throughput or roofline figures are meaningful here")
    return main()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", action="store_true", help="write bench/results/kernels-<gpu>-<commit>.json")
    args = ap.parse_args(argv)
    import torch
    return gpu_run(args.save) if torch.cuda.is_available() else cpu_smoke()


if __name__ == "__main__":
    sys.exit(main())
