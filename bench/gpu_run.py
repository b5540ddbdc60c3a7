"""The prepared device run: everything a GPU session should prove about the ds-plugins kernels, in
one command, inside a time budget, with only torch, triton and this checkout.

    DSP_COMMIT=$(git rev-parse --short HEAD) python bench/gpu_run.py          # on a CUDA GPU
    python bench/gpu_run.py --cpu-smoke --out-dir /tmp/x                     # CPU: interpreter, tiny shapes

Steps, in order, most telling first (each is recorded; a step that cannot run says why):
1. prerequisites: torch, triton, packaging (ds-plugins' own dependency), a CUDA device (with
   --cpu-smoke: numpy instead, for the interpreter), pytest (optional: without it step 6 is not
   run). Anything required missing: exit 2 at once, each missing piece named.
2. `ds-plugins selftest` (in a subprocess, as a user runs it).
3. the forced routes: DS_PLUGINS_SPARSE_MLA / DS_PLUGINS_INDEXER=triton decided by ds-plugins'
   policy for this GPU's compute capability (they reach the Triton kernels on SM90 too).
4. bench/gpu_checks.py: each kernel against its reference at V4's real shapes (k = 512 top-k through
   tl.topk, MTP with 2 query tokens, split-KV at 64K and 256K context, FP4 and FP8 indexer caches,
   the SM12x launch configurations run on this GPU); then every kernel captured in a CUDA graph and
   replayed on changed inputs (bitwise equal to eager; capture fails on any host sync, and the eager
   call runs under torch's sync debug mode "error").
5. bench/kernels.py's measurements (what `bench/kernels.py --save` records): ratios to the copy
   bandwidth and bf16/fp8 GEMM measured in this process, speed-up over the reference, goals.
6. every `gpu`-marked test under tests/kernels (`pytest -m gpu -x`) with the time left (--cpu-smoke
   only collects them); test files whose imports are absent here (transformers) are named, not run.
One results file, bench/results/gpu-run-<gpu>-<commit>.json (--out-dir elsewhere), rewritten after
every step so a run cut short keeps what it did; the commit is DSP_COMMIT or git's (a copy of the
tree without .git: pass DSP_COMMIT). Then a one-screen summary. Exit 0: every step ran and passed;
1: a check failed; 2: prerequisites missing; 3: all that ran passed but something was not run
(time budget, no pytest).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_PREREQUISITES, EXIT_INCOMPLETE = 0, 1, 2, 3
DEFAULT_BUDGET_S = 450  # the whole run, GPU; the issue allows 8 minutes of one device call
# How the budget is shared: the kernel checks start nothing new once CHECKS_LEAVE_S remain (the
# benchmark and the tests need them); the benchmark starts no new case once TESTS_LEAVE_S remain.
CHECKS_LEAVE_S, TESTS_LEAVE_S = 180, 60


def prerequisites(cpu_smoke: bool) -> tuple[list[str], list[str]]:
    """(missing requirements, missing optional pieces), each a plain sentence."""
    missing, optional = [], []
    # packaging: ds-plugins' own dependency (its policy compares versions); numpy: Triton's interpreter.
    for module in ("torch", "triton", "packaging") + (("numpy",) if cpu_smoke else ()):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python module {module!r} is not installed ({sys.executable})")
    if not missing and not cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            missing.append(
                f"no CUDA device visible to torch {torch.__version__} (torch.cuda.is_available() is "
                f"False); use --cpu-smoke on a machine without a GPU"
            )
    if importlib.util.find_spec("pytest") is None:
        optional.append(
            "pytest is not installed: the gpu-marked tests (step 6) cannot run; "
            "bench/gpu_checks.py covers the same kernels"
        )
    return missing, optional


class Run:
    """Steps' records and the time budget."""

    def __init__(self, budget_s: float | None):
        self.start = time.monotonic()
        self.budget_s = budget_s  # None: no budget (the CPU smoke run unless --budget is given)
        self.steps: list[dict] = []

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.monotonic() - self.start)

    def timeout(self, cap: float, keep: float = 0.0) -> float:
        """A subprocess timeout: what is left of the budget less `keep`, at most cap, at least 30 s."""
        return max(30.0, min(cap, self.left() - keep))

    def record(self, name: str, status: str, detail: str, seconds: float, **extra) -> None:
        """status: passed | failed | not run."""
        self.steps.append({"step": name, "status": status, "detail": detail, "seconds": round(seconds, 1), **extra})
        print(f"[{time.monotonic() - self.start:6.0f}s] {name}: {status.upper()}  {detail}", flush=True)


def _env(cpu_smoke: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


def step_selftest(run: Run, cpu_smoke: bool) -> None:
    t0 = time.monotonic()
    if run.left() < 30:
        run.record("ds-plugins selftest", "not run", "time budget spent", 0.0)
        return
    code = "import sys; from ds_plugins.cli import main; sys.exit(main(['selftest']))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=_env(cpu_smoke),
            capture_output=True,
            text=True,
            timeout=run.timeout(150 if run.budget_s else 900, CHECKS_LEAVE_S),
        )
    except subprocess.TimeoutExpired:
        run.record("ds-plugins selftest", "failed", "timed out", time.monotonic() - t0)
        return
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    run.record(
        "ds-plugins selftest",
        "passed" if proc.returncode == 0 else "failed",
        f"exit {proc.returncode}; {lines[-1] if lines else 'no output'}",
        time.monotonic() - t0,
        output=lines[-20:],
    )


def _top_level_imports(path: Path) -> set[str]:
    """Top-level package names a test module imports at module level (not inside functions, not
    through pytest.importorskip, which pytest turns into a skip with the reason)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def uncollectable_tests(folder: Path) -> dict[str, list[str]]:
    """Test files under folder that cannot be imported here, with the modules they miss (the device
    machine has torch and triton, not transformers or the engines)."""
    out = {}
    for path in sorted(folder.glob("test_*.py")):
        absent = sorted(name for name in _top_level_imports(path) if importlib.util.find_spec(name) is None)
        if absent:
            out[str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)] = absent
    return out


def step_pytest(run: Run, cpu_smoke: bool, have_pytest: bool) -> None:
    t0 = time.monotonic()
    if not have_pytest:
        run.record("gpu-marked tests", "not run", "pytest is not installed", 0.0)
        return
    if run.left() < 40:
        run.record("gpu-marked tests", "not run", "time budget spent", 0.0)
        return
    # test_gpu_run.py's gpu tests are step 4 itself: not run twice. test_no_spills.py has no gpu test
    # (it compiles offline). Files that cannot be imported here are named in the record, not collected.
    absent = uncollectable_tests(ROOT / "tests" / "kernels")
    ignored = ["tests/kernels/test_gpu_run.py", "tests/kernels/test_no_spills.py", *absent]
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        "-m",
        "gpu",
        "tests/kernels",
        *(f"--ignore={path}" for path in ignored),
        "-x" if not cpu_smoke else "--collect-only",
    ]
    skipped_files = "; ".join(f"{Path(path).name} (needs {', '.join(mods)})" for path, mods in absent.items())
    try:
        proc = subprocess.run(
            args, cwd=ROOT, env=_env(cpu_smoke), capture_output=True, text=True, timeout=run.timeout(900, 10)
        )
    except subprocess.TimeoutExpired as exc:
        # Stopped at the budget: what ran is read from pytest's progress characters (. pass, F fail, E error).
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        progress = "".join(
            line.split(" [")[0] for line in partial.splitlines() if line and set(line.split(" [")[0]) <= set(".FEsxX")
        )
        counts = {c: progress.count(c) for c in ".FEs"}
        bad = counts["F"] + counts["E"]
        run.record(
            "gpu-marked tests",
            "failed" if bad else "passed",
            f"stopped at the time budget after {time.monotonic() - t0:.0f}s: {counts['.']} passed, {bad} "
            f"failed, {counts['s']} skipped before that"
            + (f"; not collected here: {skipped_files}" if skipped_files else ""),
            time.monotonic() - t0,
            output=partial.splitlines()[-30:],
            not_collected=absent,
            incomplete=True,
        )
        return
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip()[-200:]
    if skipped_files:
        last += f"; not collected here: {skipped_files}"
    if cpu_smoke:  # no CUDA here: the selection must collect (it does the same on a GPU) and select nothing
        ok = proc.returncode in (0, 5)
        run.record(
            "gpu-marked tests",
            "passed" if ok else "failed",
            f"collected only (no CUDA): {last}",
            time.monotonic() - t0,
            output=lines[-30:],
            not_collected=absent,
        )
    else:
        run.record(
            "gpu-marked tests",
            "passed" if proc.returncode == 0 else "failed",
            last,
            time.monotonic() - t0,
            output=lines[-30:],
            not_collected=absent,
        )


def step_checks(run: Run, device: str, small: bool) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_checks
    import torch

    capability = tuple(torch.cuda.get_device_capability(0)) if device == "cuda" else None
    deadline = None if run.budget_s is None else run.start + run.budget_s - CHECKS_LEAVE_S
    groups = (
        ("forced routes", lambda: gpu_checks.forced_route_checks(capability)),
        ("kernels vs references at V4 shapes", lambda: gpu_checks.correctness_checks(device, small, deadline)),
        ("CUDA-graph capture and replay", lambda: gpu_checks.graph_checks(device, small, deadline)),
    )
    for name, fn in groups:
        if deadline is not None and time.monotonic() > deadline:
            run.record(name, "not run", "time budget spent", 0.0)
            continue
        t0 = time.monotonic()
        torch.manual_seed(0)
        checks = fn()
        failed = [c for c in checks if c.ran and not c.ok]
        not_run = [c for c in checks if not c.ran]
        for c in checks:
            mark = "ok  " if c.ok else "FAIL" if c.ran else "skip"
            print(f"        {mark} {c.name}: {c.detail} [{c.seconds:.1f}s]", flush=True)
        detail = f"{len(checks) - len(failed) - len(not_run)}/{len(checks)} passed"
        if failed:
            detail += f"; failed: {', '.join(c.name for c in failed)}"
        if not_run:
            detail += f"; not run (time budget): {len(not_run)}"
        run.record(
            name,
            "failed" if failed else "passed",
            detail,
            time.monotonic() - t0,
            checks=[c._asdict() for c in checks],
            incomplete=bool(not_run),
        )


def step_bench(run: Run, device: str, small: bool) -> dict | None:
    sys.path.insert(0, str(ROOT / "bench"))
    import kernels as bench_kernels

    if run.left() < 20:
        run.record("benchmark", "not run", "time budget spent", 0.0)
        return None
    t0 = time.monotonic()
    # The gpu-marked tests come last and get what the benchmark leaves (at least TESTS_LEAVE_S).
    report = bench_kernels.run(
        device, small, budget_s=None if run.budget_s is None else max(0.0, run.left() - TESTS_LEAVE_S)
    )
    rows = [r for r in report["results"] if "not_run" not in r]
    skipped = len(report["results"]) - len(rows)
    below = [f"{r['kernel']} {r['problem']}" for r in rows if r["goal_met"] is False]
    detail = f"{len(rows)} cases measured" + (f", {skipped} not run (time budget)" if skipped else "")
    if small:
        detail += " (CPU interpreter: the figures only prove the wiring; goals are not judged)"
    else:
        detail += f"; below goal: {len(below)}" if below else "; every goal met"
    # Below a goal is a finding, not a failed run: the summary and the results file list each case.
    run.record(
        "benchmark",
        "passed" if rows else "not run",
        detail,
        time.monotonic() - t0,
        below_goal=below,
        incomplete=bool(skipped),
    )
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: Triton interpreter, tiny shapes")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S} on a GPU, none with --cpu-smoke)",
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results", help="where the results file goes")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before ds_plugins.kernels is imported
    sys.path.insert(0, str(ROOT))
    run = Run(args.budget if args.budget is not None else None if args.cpu_smoke else DEFAULT_BUDGET_S)

    missing, optional = prerequisites(args.cpu_smoke)
    for line in missing:
        print(f"missing: {line}")
    for line in optional:
        print(f"note: {line}")
    if missing:
        print("gpu_run: cannot run; nothing was measured")
        return EXIT_PREREQUISITES
    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (Triton interpreter)"
    cap = tuple(torch.cuda.get_device_capability(0)) if device == "cuda" else None
    print(
        f"gpu_run on {gpu}{f' (SM{cap[0]}{cap[1]})' if cap else ''}: torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, budget {f'{run.budget_s:.0f}s' if run.budget_s else 'none'}"
    )
    run.record(
        "prerequisites",
        "passed",
        "torch, triton" + (", CUDA" if device == "cuda" else "") + ("; " + "; ".join(optional) if optional else ""),
        0.0,
    )

    sys.path.insert(0, str(ROOT / "bench"))
    import kernels as bench_kernels

    commit = bench_kernels.commit()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / bench_kernels.results_name("gpu-run", gpu, commit)
    state = {"benchmark": None}

    def save() -> dict:
        """The results file as it stands: rewritten after every step, so a run cut short keeps what it did."""
        result = {
            "gpu": gpu,
            "capability": cap,
            "commit": commit,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "cpu_smoke": args.cpu_smoke,
            "seconds": round(time.monotonic() - run.start, 1),
            "steps": run.steps,
            "benchmark": state["benchmark"],
        }
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result

    def bench():
        state["benchmark"] = step_bench(run, device, small=args.cpu_smoke)

    # Most telling first: should the budget run out, what is left out is the small-shape tests, which the
    # interpreter runs on every CPU too.
    steps = (
        ("ds-plugins selftest", lambda: step_selftest(run, args.cpu_smoke)),
        ("kernel checks", lambda: step_checks(run, device, small=args.cpu_smoke)),
        ("benchmark", bench),
        ("gpu-marked tests", lambda: step_pytest(run, args.cpu_smoke, not optional)),
    )
    for name, fn in steps:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # one broken step must not lose the others' results
            trace = traceback.format_exc().splitlines()
            run.record(
                name,
                "failed",
                f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                time.monotonic() - t0,
                traceback=trace[-25:],
            )
        save()
    result = save()
    report = state["benchmark"]

    failed = [s["step"] for s in run.steps if s["status"] == "failed"]
    not_run = [s["step"] for s in run.steps if s["status"] == "not run" or s.get("incomplete")]
    print(f"\n== gpu_run summary: {gpu}, commit {commit}, {result['seconds']:.0f}s ==")
    for s in run.steps:
        print(f"  {s['status'].upper():<8} {s['step']:<36} {s['detail'][:110]}")
    if report and not args.cpu_smoke:
        print(
            f"  peaks: copy {report['peaks']['copy_tbs']:.2f} TB/s, bf16 GEMM {report['peaks']['bf16_tflops']:.0f} "
            f"TFLOP/s, fp8 GEMM {report['peaks']['fp8_tflops'] or 0:.0f} TFLOP/s"
        )
        for r in report["results"]:
            if "not_run" in r:
                continue
            goal = ", ".join(g for g in (r["goal"], "10x ref" if r["speedup"] else None) if g)
            verdict = f"{goal}: {'met' if r['goal_met'] else 'NOT met'}" if goal else ""
            ratio = f" {r['vs_4k_per_token']:.2f}x 4K" if "vs_4k_per_token" in r else ""
            print(
                f"  {r['kernel'][:22]:<22} {r['problem'][:34]:<34} {r['ms']:8.3f} ms "
                f"{r['bandwidth_fraction']:4.0%} copy "
                f"{r['compute_fraction']:4.0%} gemm {r['roofline_fraction']:4.0%} roof "
                f"{(str(round(r['speedup'])) + 'x ref') if r['speedup'] else '':>8} {verdict}{ratio}"
            )
    print(f"results: {out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return EXIT_FAILED
    if not_run:
        print(f"INCOMPLETE (not run: {', '.join(not_run)})")
        return EXIT_INCOMPLETE
    print("all steps passed")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
