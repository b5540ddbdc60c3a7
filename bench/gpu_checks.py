"""The device run's own checks (bench/gpu_run.py): each kernel against its PyTorch reference at
DeepSeek-V4's real shapes, and each kernel captured in a CUDA graph and replayed on changed inputs.

Needs only torch, triton and this checkout (no pytest). small=True shrinks every problem so the
same code runs on a CPU under Triton's interpreter (the CPU smoke run, tests/kernels/test_gpu_run.py).
tests/kernels/test_gpu_run.py also runs these checks as `gpu`-marked tests at the real shapes.

Tolerances are the kernel tests' own (see tests/kernels/*): bf16 outputs 2^-6 of the reference's
largest magnitude, fp32 outputs 2^-12 (TF32 GEMM: 2^-9), top-k lists at most 1% of positions
different (random scores tie only by accident at the k-th place).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

BF16, FP32, TF32, TOPK = 2.0**-6, 2.0**-12, 2.0**-9, 0.01


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str
    seconds: float
    ran: bool = True  # False: not started, the time budget was spent (ok is then False too)


def _rel_error(got, ref) -> float:
    # the selftest's measure (largest error over the reference's largest finite value; inf on a NaN/inf
    # mismatch), imported here so ds_plugins.kernels loads after TRITON_INTERPRET is decided
    from ds_plugins.kernels.selftest import _rel_error as rel_error

    return rel_error(got, ref)


def _topk_mismatch(got, ref) -> float:
    rows = [set(g.tolist()) ^ set(r.tolist()) for g, r in zip(got.cpu(), ref.cpu())]
    return sum(len(x) for x in rows) / max(1, 2 * got.numel())


def _measure(name: str, fn: Callable[[], tuple[float, float, str]], deadline: float | None = None) -> Check:
    """fn -> (error, bound, shape text). Past deadline (a time.monotonic() value) fn is not started."""
    if deadline is not None and time.monotonic() > deadline:
        return Check(name, False, "not run: time budget spent", 0.0, ran=False)
    start = time.perf_counter()
    try:
        error, bound, shape = fn()
    except Exception as exc:  # a check that cannot run is a failed check, named with its error
        return Check(
            name,
            False,
            f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            time.perf_counter() - start,
        )
    return Check(name, error <= bound, f"{shape}: error {error:.3g} (bound {bound:.3g})", time.perf_counter() - start)


# ------------------------------------------------------------------ problem builders


def decode_problem(device: str, b: int, s_q: int, h: int, window: int, extra: int, context: int):
    """Sparse FP8 decode inputs: a window cache (page 256) and a compressed C4 cache (page 64) sized
    for `context` tokens per request; indices spread over the whole cache, some -1; per-request lengths."""
    import torch
    from ds_plugins.kernels.kv_cache import quantize_kv_cache

    win_pages = max(1, b * min(context, 4 * window) // 256)
    x_pages = max(1, b * (context // 4) // 64)
    cache = quantize_kv_cache(torch.randn(win_pages, 256, 512, device=device).bfloat16())
    xcache = quantize_kv_cache(torch.randn(x_pages, 64, 512, device=device).bfloat16())
    q = torch.randn(b, s_q, h, 512, device=device).bfloat16()
    idx = torch.randint(-1, win_pages * 256, (b, s_q, window), device=device, dtype=torch.int32)
    xidx = torch.randint(-1, x_pages * 64, (b, s_q, extra), device=device, dtype=torch.int32)
    lens = torch.randint(1, window + 1, (b,), device=device, dtype=torch.int32)
    xlens = torch.randint(1, extra + 1, (b,), device=device, dtype=torch.int32)
    sink = torch.randn(h, device=device)
    return q, cache, idx, lens, sink, xcache, xidx, xlens


def paged_indexer_problem(device: str, b: int, next_n: int, context: int, fp4: bool, block_kv: int = 64):
    """Paged indexer inputs (64 heads, D 128), scattered block table, per-row lengths up to `context`."""
    import torch
    from ds_plugins.kernels.reference import indexer as ref

    keys = torch.randn(b, context, 128, device=device)
    perm = torch.randperm(b * context // block_kv, device=device)
    cache, table = ref.paged_cache_from_keys(keys, block_kv, fp4=fp4, physical_blocks=perm)
    qf = torch.randn(b, next_n, 64, 128, device=device)
    q = ref.quantize_fp4(qf) if fp4 else (qf.to(torch.float8_e4m3fn), None)
    lens = torch.randint(max(1, context // 2), context + 1, (b, next_n), device=device, dtype=torch.int32)
    w = torch.randn(b * next_n, 64, device=device)
    if fp4:
        k_blocks, k_scales = ref.split_fp4_paged_cache(cache), None
        q_ref = ref.dequant_fp4(*q)
    else:
        k_blocks, k_scales = ref.split_fp8_paged_cache(cache)
        q_ref = q[0].float()
    return q, cache, table, lens, w, q_ref, k_blocks, k_scales


def ragged_indexer_problem(device: str, m: int, n: int, fp4: bool):
    import torch
    from ds_plugins.kernels.reference import indexer as ref

    qf, kf = torch.randn(m, 64, 128, device=device), torch.randn(n, 128, device=device)
    if fp4:
        q, kv = ref.quantize_fp4(qf), ref.quantize_fp4(kf)
        q_ref, k_ref, k_scale = ref.dequant_fp4(*q), ref.dequant_fp4(*kv), None
    else:
        q, kv = (qf.to(torch.float8_e4m3fn), None), ref.quantize_fp8_keys(kf)
        q_ref, k_ref, k_scale = q[0].float(), kv[0].float(), kv[1]
    ke = torch.linspace(1, n, m, device=device).to(torch.int32)
    ks = (ke - n // 2).clamp_min(0).to(torch.int32)
    w = torch.randn(m, 64, device=device)
    return q, kv, w, ks, ke, q_ref, k_ref, k_scale


# ------------------------------------------------------------------ correctness at V4 shapes


def correctness_checks(device: str, small: bool, deadline: float | None = None) -> list[Check]:
    import torch
    from ds_plugins import kernels as k
    from ds_plugins.kernels import sparse_mla
    from ds_plugins.kernels.reference import indexer as ref
    from ds_plugins.kernels.reference.sparse_mla import ref_sparse_decode

    checks = []
    topk = 16 if small else 512  # tl.topk runs in the interpreter too (tiles <= 64 keys)

    def decode(b, s_q, context, splits=None):
        def run():
            h, window, extra = (16, 32, 64) if small else (64, 128, 512)
            q, cache, idx, lens, sink, xcache, xidx, xlens = decode_problem(device, b, s_q, h, window, extra, context)
            out, lse = sparse_mla.sparse_decode_fwd(q, cache, idx, lens, sink, xcache, xidx, xlens, num_splits=splits)
            rout, rlse = ref_sparse_decode(q, cache, idx, lens, sink, xcache, xidx, xlens, 512**-0.5)
            err = max(_rel_error(out, rout) / BF16, _rel_error(lse, rlse) / FP32)
            return err, 1.0, f"b={b} s_q={s_q} h={h} {window}+{extra} context={context} splits={splits or 'auto'}"

        return run

    for b, s_q in ((1, 1), (64, 1), (1, 2), (64, 2)) if not small else ((2, 1), (2, 2)):
        checks.append(
            _measure(f"sparse decode b={b} s_q={s_q}{' (MTP)' if s_q == 2 else ''}", decode(b, s_q, 4096), deadline)
        )
    for context in (64 * 1024, 256 * 1024) if not small else (2048,):
        checks.append(
            _measure(
                f"sparse decode split-KV context={context // 1024}K",
                decode(1, 1, context, splits=8 if not small else 2),
                deadline,
            )
        )

    def prefill(capability):
        def run():
            s_q, h, s_kv = (4, 64, 192) if small else (512, 64, 32768)
            q = torch.randn(s_q, h, 512, device=device).bfloat16()
            kv = torch.randn(s_kv, 1, 512, device=device).bfloat16()
            idx = torch.randint(-1, s_kv, (s_q, 1, topk + 128 if not small else 64), device=device, dtype=torch.int32)
            sink = torch.randn(h, device=device)
            from ds_plugins.kernels._runtime import launch_target
            from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd

            with launch_target(capability):
                out, mx, lse = k.flash_mla_sparse_fwd(q, kv, idx, 512**-0.5, 512, sink)
            rout, rmx, rlse = ref_flash_mla_sparse_fwd(q, kv, idx, 512**-0.5, 512, sink)
            err = max(_rel_error(out, rout) / BF16, _rel_error(lse, rlse) / FP32, _rel_error(mx, rmx) / FP32)
            return err, 1.0, f"s_q={s_q} h={h} topk={idx.shape[-1]} config={sparse_mla.prefill_config(capability)}"

        return run

    checks.append(_measure("sparse prefill (this GPU's config)", prefill(None), deadline))
    checks.append(_measure("sparse prefill (SM12x config)", prefill((12, 0)), deadline))

    for fp4 in (False, True):
        fmt = "FP4" if fp4 else "FP8"

        def paged_logits(fp4=fp4):
            b, next_n, context = (2, 2, 256) if small else (8, 2, 16384)
            q, cache, table, lens, w, q_ref, k_blocks, k_scales = paged_indexer_problem(device, b, next_n, context, fp4)
            meta = k.get_paged_mqa_logits_metadata(lens, 64, 132)
            got = k.fp8_fp4_paged_mqa_logits(q, cache, w, lens, table, meta, context)
            want = ref.paged_mqa_logits(q_ref, k_blocks, w, lens, table, context, k_scales)
            return _rel_error(got, want) / FP32, 1.0, f"B={b} next_n={next_n} context={context}"

        def paged_topk(fp4=fp4, context=None):
            b, next_n = (2, 2) if small else (2, 2)
            context = context or (256 if small else 16384)
            q, cache, table, lens, w, q_ref, k_blocks, k_scales = paged_indexer_problem(device, b, next_n, context, fp4)
            got = k.fp8_paged_mqa_topk(q if fp4 else q[0], cache, w, lens, table, topk, context)
            want = ref.paged_mqa_topk(q_ref, k_blocks, w, lens, table, context, topk, k_scales)
            return _topk_mismatch(got, want), TOPK, f"B={b} next_n={next_n} context={context} topk={topk}"

        def ragged(fp4=fp4):
            m, n = (4, 256) if small else (256, 8192)
            q, kv, w, ks, ke, q_ref, k_ref, k_scale = ragged_indexer_problem(device, m, n, fp4)
            got = k.fp8_fp4_mqa_logits(q, kv, w, ks, ke)
            want = ref.mqa_logits(q_ref, k_ref, w, ks, ke, k_scale)
            top = k.fp8_mqa_topk(q if fp4 else q[0], kv, w, ks, ke, topk)
            rtop = ref.mqa_topk(q_ref, k_ref, w, ks, ke, topk, k_scale)
            return max(_rel_error(got, want) / FP32, _topk_mismatch(top, rtop) / TOPK), 1.0, f"M={m} N={n} topk={topk}"

        checks.append(_measure(f"indexer paged logits, {fmt} cache", paged_logits, deadline))
        checks.append(_measure(f"indexer paged top-k={topk} (tl.topk), {fmt} cache", paged_topk, deadline))
        checks.append(_measure(f"indexer ragged logits + top-k={topk}, {fmt} keys", ragged, deadline))
        if not small:
            for context in (65536, 262144):
                checks.append(
                    _measure(
                        f"indexer paged top-k, {fmt}, context={context // 1024}K (split rows)",
                        lambda fp4=fp4, c=context // 4: paged_topk(fp4, c),
                        deadline,
                    )
                )

    def prenorm():
        from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm

        m, kk = (4, 1024) if small else (4096, 16384)
        a = torch.randn(m, kk, device=device).bfloat16()
        bw = torch.randn(24, kk, device=device) * 0.01
        d, sq = torch.empty(4, m, 24, device=device), torch.empty(4, m, device=device)
        rd, rsq = torch.empty_like(d), torch.empty_like(sq)
        k.tf32_hc_prenorm_gemm(a, bw, d, sq, 4)
        hc_prenorm_gemm(a, bw, rd, rsq, 4)
        bound = TF32 if device == "cuda" else FP32
        return max(_rel_error(d, rd), _rel_error(sq, rsq)) / bound, 1.0, f"M={m} N=24 K={kk} splits=4"

    def einsum(batch):
        def run():
            from ds_plugins.kernels.reference import einsum as ref_einsum

            r, dd = (512, 256) if small else (4096, 1024)
            a = ref_einsum.quantize_per_token(torch.randn(batch, 8, r, device=device))
            w = ref_einsum.quantize_per_block(torch.randn(8, dd, r, device=device))
            out = torch.empty(batch, 8, dd, device=device, dtype=torch.bfloat16)
            want = torch.empty_like(out)
            k.fp8_einsum("bhr,hdr->bhd", a, w, out)
            ref_einsum.fp8_einsum_bhr_hdr_bhd(a, w, want)
            return _rel_error(out, want) / BF16, 1.0, f"b={batch} h=8 r={r} d={dd}"

        return run

    checks.append(_measure("mHC prenorm GEMM", prenorm, deadline))
    for batch in (2,) if small else (8, 64, 256):
        checks.append(_measure(f"fp8_einsum b={batch}", einsum(batch), deadline))
    return checks


# ------------------------------------------------------------------ CUDA graphs


class _Graph:
    """torch.cuda.CUDAGraph on a GPU; on a CPU (smoke run) 'replay' just calls the function again, so
    the copy-in / compare logic below runs everywhere."""

    def __init__(self, fn, device: str):
        import torch

        self.fn, self.device = fn, device
        if device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # compile and warm up outside capture
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # Capturing fails on any host synchronisation (cudaStreamSynchronize, .item(), ...) inside.
            with torch.cuda.graph(self.graph):
                self.out = fn()
        else:
            self.out = fn()

    def replay(self):
        import torch

        if self.device == "cuda":
            self.graph.replay()
            torch.cuda.synchronize()
            return self.out
        return self.fn()


def _outputs(value):
    import torch

    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(t for t in value if isinstance(t, torch.Tensor))


def _graph_check(
    name: str,
    device: str,
    inputs: list,
    fn: Callable,
    refill: Callable,
    written: Callable = None,
    deadline: float | None = None,
):
    """Capture fn (reading the static `inputs`), refill the inputs in place with new values, replay,
    and compare with an eager call on the same new inputs: bitwise equal (the same kernels)."""
    import torch

    def run():
        graph = _Graph(fn, device)
        refill()
        got = [t.clone() for t in (_outputs(graph.replay()) or written())]
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # an eager call that syncs raises here
        try:
            want = [t.clone() for t in (_outputs(fn()) or written())]
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        same = all(
            torch.equal(torch.nan_to_num(g.float(), 7.0, 8.0, 9.0), torch.nan_to_num(w.float(), 7.0, 8.0, 9.0))
            for g, w in zip(got, want)
        )
        return (0.0 if same else 1.0), 0.0, "replay on new inputs == eager" if same else "replay differs from eager"

    return _measure(f"CUDA graph: {name}", run, deadline)


def graph_checks(device: str, small: bool, deadline: float | None = None) -> list[Check]:
    import torch
    from ds_plugins import kernels as k
    from ds_plugins.kernels import sparse_mla
    from ds_plugins.kernels.reference import einsum as ref_einsum

    checks = []
    topk = 16 if small else 512

    def fill(*tensors):
        def refill():
            for t in tensors:
                if t.dtype in (torch.int32, torch.int64):
                    t.copy_(torch.randint_like(t, 0, int(t.max().item()) + 1 if t.numel() else 1))
                elif t.dtype == torch.float8_e4m3fn:
                    t.copy_(torch.randn(t.shape, device=t.device).to(t.dtype))
                else:
                    t.copy_(torch.randn_like(t.float()).to(t.dtype))

        return refill

    h, window, extra = (16, 32, 64) if small else (64, 128, 512)
    for b, s_q, splits in ((2, 2, None), (1, 1, 4)) if small else ((64, 1, None), (4, 2, None), (1, 1, 8)):
        q, cache, idx, lens, sink, xcache, xidx, xlens = decode_problem(device, b, s_q, h, window, extra, 4096)
        checks.append(
            _graph_check(
                f"sparse decode b={b} s_q={s_q} splits={splits or 'auto'}",
                device,
                [q, idx, lens, xidx, xlens],
                functools.partial(
                    sparse_mla.sparse_decode_fwd, q, cache, idx, lens, sink, xcache, xidx, xlens, num_splits=splits
                ),
                fill(q, lens, xlens),
                deadline=deadline,
            )
        )
    # The entry point the engines call (FlashMLA's name and arguments; its split count is fixed on
    # the first call, in the sched meta, so replays never re-plan), MTP shape.
    b, s_q = (2, 2) if small else (32, 2)
    q, cache, idx, lens, sink, xcache, xidx, xlens = decode_problem(device, b, s_q, h, window, extra, 4096)
    meta, _ = k.get_mla_metadata()
    checks.append(
        _graph_check(
            f"flash_mla_with_kvcache b={b} s_q={s_q}",
            device,
            [q, lens, xlens],
            lambda q=q, cache=cache, idx=idx, lens=lens, sink=sink, xcache=xcache, xidx=xidx, xlens=xlens, meta=meta: (
                k.flash_mla_with_kvcache(
                    q, cache, None, None, 512, meta, None, None, False, True, idx, sink, xcache, xidx, lens, xlens
                )
            ),
            fill(q, lens, xlens),
            deadline=deadline,
        )
    )

    s_q, s_kv = (4, 192) if small else (256, 8192)
    pq = torch.randn(s_q, h, 512, device=device).bfloat16()
    pkv = torch.randn(s_kv, 1, 512, device=device).bfloat16()
    pidx = torch.randint(-1, s_kv, (s_q, 1, 64 if small else 640), device=device, dtype=torch.int32)
    psink = torch.randn(h, device=device)
    checks.append(
        _graph_check(
            "sparse prefill",
            device,
            [pq, pkv],
            lambda: k.flash_mla_sparse_fwd(pq, pkv, pidx, 512**-0.5, 512, psink),
            fill(pq, pkv),
            deadline=deadline,
        )
    )

    for fp4 in (False, True):
        fmt = "FP4" if fp4 else "FP8"
        context = 256 if small else 16384
        q, cache, table, lens, w, *_ = paged_indexer_problem(device, 2, 2, context, fp4)
        meta = k.get_paged_mqa_logits_metadata(lens, 64, 132)
        qv = q[0]
        checks.append(
            _graph_check(
                f"indexer paged logits, {fmt}",
                device,
                [qv, w, lens],
                lambda q=q, c=cache, t=table, l=lens, w=w, m=meta: k.fp8_fp4_paged_mqa_logits(
                    q, c, w, l, t, m, context
                ),
                fill(w, lens),
                deadline=deadline,
            )
        )
        checks.append(
            _graph_check(
                f"indexer paged top-k={topk}, {fmt}",
                device,
                [qv, w, lens],
                lambda q=q, c=cache, t=table, l=lens, w=w, fp4=fp4: k.fp8_paged_mqa_topk(
                    q if fp4 else q[0], c, w, l, t, topk, context
                ),
                fill(w, lens),
                deadline=deadline,
            )
        )
        m, n = (4, 256) if small else (256, 8192)
        rq, kv, rw, ks, ke, *_ = ragged_indexer_problem(device, m, n, fp4)
        checks.append(
            _graph_check(
                f"indexer ragged logits, {fmt}",
                device,
                [rw],
                lambda q=rq, kv=kv, w=rw, ks=ks, ke=ke: k.fp8_fp4_mqa_logits(q, kv, w, ks, ke),
                fill(rw),
                deadline=deadline,
            )
        )
        checks.append(
            _graph_check(
                f"indexer ragged top-k={topk}, {fmt}",
                device,
                [rw],
                lambda q=rq, kv=kv, w=rw, ks=ks, ke=ke, fp4=fp4: k.fp8_mqa_topk(
                    q if fp4 else q[0], kv, w, ks, ke, topk
                ),
                fill(rw),
                deadline=deadline,
            )
        )

    mm, kk = (4, 1024) if small else (4096, 16384)
    a = torch.randn(mm, kk, device=device).bfloat16()
    bw = torch.randn(24, kk, device=device)
    d, sq = torch.empty(4, mm, 24, device=device), torch.empty(4, mm, device=device)
    checks.append(
        _graph_check(
            "mHC prenorm GEMM",
            device,
            [a],
            lambda: k.tf32_hc_prenorm_gemm(a, bw, d, sq, 4),
            fill(a),
            written=lambda: (d, sq),
            deadline=deadline,
        )
    )
    batch, r, dd = (2, 512, 256) if small else (64, 4096, 1024)
    ea = ref_einsum.quantize_per_token(torch.randn(batch, 8, r, device=device))
    ew = ref_einsum.quantize_per_block(torch.randn(8, dd, r, device=device))
    eo = torch.empty(batch, 8, dd, device=device, dtype=torch.bfloat16)
    checks.append(
        _graph_check(
            "fp8_einsum",
            device,
            [ea[0]],
            lambda: k.fp8_einsum("bhr,hdr->bhd", ea, ew, eo),
            fill(ea[0]),
            written=lambda: (eo,),
            deadline=deadline,
        )
    )
    return checks


def forced_route_checks(capability: tuple[int, int] | None) -> list[Check]:
    """DS_PLUGINS_SPARSE_MLA=triton / DS_PLUGINS_INDEXER=triton choose the Triton kernels for vLLM on
    this GPU's capability (policy: forcing applies on any CUDA target), decided by ds-plugins' own
    policy on a probe of this machine with the newest tested vLLM in it (vLLM itself is not here)."""
    start = time.perf_counter()
    from ds_plugins import landscape
    from ds_plugins.policy import decide
    from ds_plugins.probe import Device, Probe

    cap = capability or (9, 0)
    version = landscape.NEWEST_TESTED["vllm"]
    probe = Probe("3.11", {"vllm": version}, None, None, (Device("cuda", 0, "this GPU", cap),), "", {})
    env = {"DS_PLUGINS_SPARSE_MLA": "triton", "DS_PLUGINS_INDEXER": "triton"}
    plan = {d.id: d for d in decide(probe, "vllm", env=env).decisions}
    ok = plan["sparse_mla"].value == "triton" and plan["indexer"].value == "triton"
    detail = (
        f"vLLM {version} on SM{cap[0]}{cap[1]}: sparse_mla={plan['sparse_mla'].value}, "
        f"indexer={plan['indexer'].value}, dsv4_model={plan['dsv4_model'].value}"
    )
    return [Check("forced routes reach the Triton kernels", ok, detail, time.perf_counter() - start)]
