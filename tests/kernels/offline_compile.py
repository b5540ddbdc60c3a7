"""Compile every launch variant the kernel wrappers choose, offline, for a GPU target, and read
ptxas's report (registers, spill stores/loads, shared memory). No GPU is needed.

    python tests/kernels/offline_compile.py [--targets 90,120,121] [--json]

How: the public wrappers are called on CPU tensors at DeepSeek-V4's real shapes inside
`launch_target(capability)` (so they plan their launches as on that GPU); `JITFunction.run` is
replaced by a recorder, so nothing launches. Each recorded launch is bound and specialised the way
Triton's launcher does it (its own binder and `_pack_args`), then `triton.compile`d for
`GPUTarget("cuda", capability, 32)`: Triton runs its bundled ptxas with its own flags (`-v`,
`--regAllocOptLevel=2`, `--gpu-name=sm_XXXa`) and, with TRITON_DUMP_PTXAS_LOG on, prints the
log this module parses. Reports are cached under ~/.cache/ds-plugins/ptxas-reports, keyed by the
kernel's source hash (dependencies included), its specialisation, options, target and Triton's
version, so an unchanged kernel is not recompiled on the next run.

Must run in a process without TRITON_INTERPRET (interpreted kernels cannot be compiled), which is
why tests/kernels/test_no_spills.py starts it as a subprocess (and asserts no variant spills).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DSP_PTXAS_REPORT_CACHE", Path.home() / ".cache" / "ds-plugins" / "ptxas-reports"))
TARGETS = {"90": (9, 0), "120": (12, 0), "121": (12, 1)}


class Launch(NamedTuple):
    case: str  # which wrapper call planned it
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict


class Report(NamedTuple):
    kernel: str
    target: str
    variant: str  # constexprs and options that make it a distinct binary
    registers: int
    spill_stores: int
    spill_loads: int
    smem: int
    case: str


def _record_launches(case_fns) -> list[Launch]:
    """Run the wrapper calls with triton's launcher replaced by a recorder."""
    from triton.runtime.jit import JITFunction

    from ds_plugins.kernels import einsum, indexer, mhc, sparse_mla

    launches: list[Launch] = []
    current = [""]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(current[0], self, args, kwargs))

    saved = JITFunction.run
    modules = (einsum, indexer, mhc, sparse_mla)
    saved_use = [m.use_triton for m in modules]
    JITFunction.run = record
    for m in modules:
        m.use_triton = lambda t: True  # CPU tensors, planned as on the GPU (nothing launches)
    try:
        for name, fn in case_fns:
            current[0] = name
            fn()
    finally:
        JITFunction.run = saved
        for m, use in zip(modules, saved_use):
            m.use_triton = use
    return launches


def _cases():
    """(name, call) pairs: every wrapper at V4's real shapes, each branch of its launch planning."""
    import torch

    from ds_plugins import kernels as k
    from ds_plugins.kernels.kv_cache import quantize_kv_cache
    from ds_plugins.kernels.reference import indexer as ref_indexer

    cases = []

    # Sparse prefill: V4-Flash's 64 heads (V4-Pro's 128 get the same head blocks) and a two-way
    # tensor-parallel shard (32); with and without per-token lengths.
    for h in (32, 64):
        for lengths in (True, False):
            q = torch.zeros(2, h, 512, dtype=torch.bfloat16)
            kv = torch.zeros(64, 1, 512, dtype=torch.bfloat16)
            idx = torch.zeros(2, 1, 640, dtype=torch.int32)
            sink = torch.zeros(h)
            tl_ = torch.full((2,), 640, dtype=torch.int32) if lengths else None
            cases.append(
                (
                    f"prefill h={h} topk_length={lengths}",
                    lambda q=q, kv=kv, idx=idx, sink=sink, tl_=tl_: k.flash_mla_sparse_fwd(
                        q, kv, idx, 512**-0.5, 512, sink, tl_
                    ),
                )
            )

    # Sparse decode: window 128 + 512 compressed, 1 or 2 query tokens (MTP); batch 64 (one split),
    # batch 1 (split-KV, partials + combine kernel); with and without per-request lengths.
    cache = quantize_kv_cache(torch.zeros(4, 256, 512).bfloat16())
    xcache = quantize_kv_cache(torch.zeros(16, 64, 512).bfloat16())
    # Head blocks are 32 here whatever the head count; the variants are one query token in one split
    # (h=64, b=64), one token in two splits (h=32, b=64) and two tokens in many (MTP, b=1).
    for h, b, s_q in ((64, 64, 1), (32, 64, 1), (64, 1, 2)):
        for lengths in (True,):
            q = torch.zeros(b, s_q, h, 512, dtype=torch.bfloat16)
            idx = torch.zeros(b, s_q, 128, dtype=torch.int32)
            xidx = torch.zeros(b, s_q, 512, dtype=torch.int32)
            lens = torch.full((b,), 128, dtype=torch.int32) if lengths else None
            xlens = torch.full((b,), 512, dtype=torch.int32) if lengths else None
            cases.append(
                (
                    f"decode h={h} b={b} s_q={s_q} lengths={lengths}",
                    lambda q=q, idx=idx, xidx=xidx, lens=lens, xlens=xlens, h=h: k.flash_mla_with_kvcache(
                        q,
                        cache,
                        None,
                        None,
                        512,
                        k.get_mla_metadata()[0],
                        None,
                        None,
                        False,
                        True,
                        idx,
                        torch.zeros(h),
                        xcache,
                        xidx,
                        lens,
                        xlens,
                    ),
                )
            )

    # Indexer: 64 heads, head dim 128, FP8 and FP4 keys; ragged (prefill) and paged (decode, block 64).
    m, n, heads, d = 4, 1024, 64, 128
    fp8_q = torch.zeros(m, heads, d).to(torch.float8_e4m3fn)
    fp8_k = ref_indexer.quantize_fp8_keys(torch.zeros(n, d))
    fp4_q = (torch.zeros(m, heads, d // 2, dtype=torch.uint8), torch.zeros(m, heads, dtype=torch.int32))
    fp4_k = (torch.zeros(n, d // 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.int32))
    w = torch.zeros(m, heads)
    ks = torch.zeros(m, dtype=torch.int32)
    ke = torch.full((m,), n, dtype=torch.int32)
    for fmt, q, kv in (("fp8", (fp8_q, None), fp8_k), ("fp4", fp4_q, fp4_k)):
        for max_seqlen_k in (0,):  # a compressed row (max_seqlen_k > 0) differs only in its base
            cases.append(
                (
                    f"mqa_logits {fmt} max_seqlen_k={max_seqlen_k}",
                    lambda q=q, kv=kv, s=max_seqlen_k: k.fp8_fp4_mqa_logits(
                        q, kv, w, ks, ke, clean_logits=s == 0, max_seqlen_k=s
                    ),
                )
            )
        cases.append((f"mqa_topk {fmt} topk=512", lambda q=q, kv=kv: k.fp8_mqa_topk(q, kv, w, ks, ke, 512)))
    # 16384 keys: the top-k is split over 4 programs per row (n_splits is then not the constant 1).
    long_n = 16384
    long_ke = torch.full((m,), long_n, dtype=torch.int32)
    for fmt, q, kv in (
        ("fp8", (fp8_q, None), ref_indexer.quantize_fp8_keys(torch.zeros(long_n, d))),
        ("fp4", fp4_q, (torch.zeros(long_n, d // 2, dtype=torch.uint8), torch.zeros(long_n, dtype=torch.int32))),
    ):
        cases.append(
            (
                f"mqa_topk {fmt} topk=512 keys={long_n} (split)",
                lambda q=q, kv=kv: k.fp8_mqa_topk(q, kv, w, ks, long_ke, 512),
            )
        )

    b, next_n, ctx, block_kv = 2, 2, 1024, 64
    table = torch.arange(b * ctx // block_kv, dtype=torch.int32).reshape(b, -1)
    pw = torch.zeros(b * next_n, heads)
    pq8 = torch.zeros(b, next_n, heads, d).to(torch.float8_e4m3fn)
    pq4 = (torch.zeros(b, next_n, heads, d // 2, dtype=torch.uint8), torch.zeros(b, next_n, heads, dtype=torch.int32))
    cache8 = torch.zeros(table.numel(), block_kv, 1, d + 4, dtype=torch.uint8)
    cache4 = torch.zeros(table.numel(), block_kv, 1, d // 2 + 4, dtype=torch.uint8)
    meta = torch.zeros(133, 2, dtype=torch.int32)
    for fmt, q, cache_ in (("fp8", (pq8, None), cache8), ("fp4", pq4, cache4)):
        for lens in (torch.full((b, next_n), ctx, dtype=torch.int32),):  # 1-D lens: one load less
            cases.append(
                (
                    f"paged_logits {fmt} context_lens {lens.dim()}-D",
                    lambda q=q, c=cache_, lens=lens: k.fp8_fp4_paged_mqa_logits(q, c, pw, lens, table, meta, ctx),
                )
            )
            cases.append(
                (
                    f"paged_topk {fmt} topk=512 context_lens {lens.dim()}-D",
                    lambda q=q, c=cache_, lens=lens: k.fp8_paged_mqa_topk(
                        q if fmt == "fp4" else q[0], c, pw, lens, table, 512, ctx
                    ),
                )
            )
    # A 64K-token context (16384 compressed keys): the paged top-k split over 4 programs per row.
    long_ctx = 16384
    long_table = torch.arange(b * long_ctx // block_kv, dtype=torch.int32).reshape(b, -1)
    long_lens = torch.full((b, next_n), long_ctx, dtype=torch.int32)
    for fmt, q, width in (("fp8", pq8, d + 4), ("fp4", pq4, d // 2 + 4)):
        long_cache = torch.zeros(long_table.numel(), block_kv, 1, width, dtype=torch.uint8)
        cases.append(
            (
                f"paged_topk {fmt} topk=512 context={long_ctx} (split)",
                lambda q=q, c=long_cache: k.fp8_paged_mqa_topk(q, c, pw, long_lens, long_table, 512, long_ctx),
            )
        )

    # mHC prenorm GEMM: N = 24, K = 4 * 4096 (V4-Flash) and 4 * 7168 (V4-Pro), with and without splits.
    for kk in (16384,):  # K is a loop bound, not a compile-time constant
        for splits in (None, 4):
            a = torch.zeros(8, kk, dtype=torch.bfloat16)
            bw = torch.zeros(24, kk)
            dd = torch.zeros(8, 24) if splits is None else torch.zeros(splits, 8, 24)
            sq = torch.zeros(8) if splits is None else torch.zeros(splits, 8)
            cases.append(
                (
                    f"hc_prenorm K={kk} splits={splits}",
                    lambda a=a, bw=bw, dd=dd, sq=sq, s=splits: k.tf32_hc_prenorm_gemm(a, bw, dd, sq, s),
                )
            )

    # fp8_einsum (wo_a: 8 groups, r = 4096, d = 1024): each batch tier, both scale recipes.
    fp8 = torch.float8_e4m3fn
    wv = torch.zeros(8, 1024, 4096).to(fp8)
    for batch in (8, 32, 64, 256):
        av = torch.zeros(batch, 8, 4096).to(fp8)
        out = torch.zeros(batch, 8, 1024, dtype=torch.bfloat16)
        for recipe, a_sf, w_sf in (
            ((1, 128, 128), torch.zeros(batch, 8, 32), torch.zeros(8, 8, 32)),
            ((1, 1, 128), torch.zeros(batch, 8, 8, dtype=torch.int32), torch.zeros(8, 1024, 8, dtype=torch.int32)),
        ):
            cases.append(
                (
                    f"einsum b={batch} recipe={recipe}",
                    lambda a=(av, a_sf), w=(wv, w_sf), out=out, r=recipe: k.fp8_einsum(
                        "bhr,hdr->bhd", a, w, out, None, r
                    ),
                )
            )
    return cases


def _variant(launch: Launch, signature: dict, constexprs: dict, options) -> str:
    names = [p.name for p in launch.fn.params]
    consts = ", ".join(
        f"{names[path[0]]}={value}" for path, value in sorted(constexprs.items()) if names[path[0]] != "INTERPRET"
    )
    cap = f" maxnreg={options.maxnreg}" if options.maxnreg is not None else ""
    return f"{consts}; num_warps={options.num_warps} num_stages={options.num_stages}{cap}"


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _compile(launch: Launch, target_name: str) -> Report:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", TARGETS[target_name][0] * 10 + TARGETS[target_name][1], 32)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    variant = _variant(launch, signature, constexprs, options)
    key = hashlib.sha256(
        json.dumps(
            [
                fn.cache_key,
                str(signature),
                str(sorted(constexprs.items())),
                str(attrs),
                str(options),
                target_name,
                triton.__version__,
            ]
        ).encode()
    ).hexdigest()
    cached = CACHE / f"{key}.json"
    if cached.exists():
        return Report(**{**json.loads(cached.read_text()), "case": launch.case})
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(
            f"{fn.__name__} for sm_{target.arch}: no ptxas report in the compile log "
            f"(was it served from Triton's cache?):\n{text[-2000:]}"
        )
    report = Report(
        fn.__name__,
        target_name,
        variant,
        int(regs.group(1)),
        int(spill.group(1)),
        int(spill.group(2)),
        int(compiled.metadata.shared),
        launch.case,
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({f: v for f, v in report._asdict().items() if f != "case"}))
    return report


def ptxas_for(target_name: str) -> dict:
    """The ptxas Triton itself runs for this target (its bundled binary unless TRITON_PTXAS_PATH
    says otherwise): path and version. Raises RuntimeError, naming the path, where it is missing."""
    from triton.backends.nvidia.compiler import get_ptxas

    major, minor = TARGETS[target_name]
    tool = get_ptxas(major * 10 + minor)
    if tool is None or not tool.path or not Path(tool.path).is_file():
        raise RuntimeError(
            f"offline_compile: no ptxas for sm_{target_name}a in this triton "
            f"({getattr(tool, 'path', None)!r}); set TRITON_PTXAS_PATH or install a triton wheel "
            f"that bundles it"
        )
    return {"path": str(tool.path), "version": str(tool.version)}


def compile_all(targets: list[str], only: str = "") -> list[Report]:
    """One report per distinct (kernel, variant, target)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("offline_compile: run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled)")
    # A Triton cache hit would skip ptxas (no report): Triton always compiles here, and our own
    # report cache decides what needs compiling.
    from triton import knobs

    knobs.compilation.always_compile = True
    from ds_plugins.kernels._runtime import launch_target

    for name in targets:
        ptxas_for(name)  # fail first, and plainly, where Triton has no ptxas
    reports, seen = [], set()
    for name in targets:
        with launch_target(TARGETS[name]):
            launches = _record_launches([c for c in _cases() if only in c[0]])
        for launch in launches:
            report = _compile(launch, name)
            ident = (report.kernel, report.variant, name)
            if ident not in seen:
                seen.add(ident)
                reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="90,120,121", help="comma-separated: 90, 120, 121")
    ap.add_argument("--only", default="", help="only the wrapper calls whose case name contains this")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    reports = compile_all(args.targets.split(","), args.only)
    if args.json:
        print(
            json.dumps(
                {
                    "triton": __import__("triton").__version__,
                    "ptxas": {name: ptxas_for(name) for name in args.targets.split(",")},
                    "reports": [r._asdict() for r in reports],
                }
            )
        )
    else:
        for r in reports:
            flag = "SPILLS" if r.spill_stores or r.spill_loads else "ok"
            print(
                f"sm_{r.target}a {r.kernel:<28} regs={r.registers:<4} spill={r.spill_stores}/{r.spill_loads} "
                f"smem={r.smem // 1024}KiB {flag}  [{r.variant}]  ({r.case})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
