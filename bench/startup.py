"""Start-up cost of ds-plugins, against the same run without it, in one run.

    python bench/startup.py [--runs 15] [--python PATH] [--json FILE]

Measures, in fresh processes of a Python that has vLLM, SGLang and ds-plugins installed
(the test environment `python3 ci/test.py` builds), alternating with/without each round:

  vllm   vLLM's own `load_general_plugins()`: with ds-plugins, and without it
         (VLLM_PLUGINS = every other installed general plugin)
  sglang `import sglang` with `PYTHONPATH=$(ds-plugins sglang-path)` and without
  python interpreter start (`python -c pass`) with and without the PYTHONPATH hook

For each: the medians with and without, their ratio, "added" (the median of the per-round
differences: whole-process noise on a shared machine is several times our cost, so this
figure is noisy), and "ours" where it can be read directly: the time ds-plugins spent
inside the process (its registration's own clock, `Registration.elapsed_ms`, which
covers importing its modules, probing, deciding and patching). Also which modules
ds-plugins adds (goal: no torch/triton import caused by us). Goal (issue #2): under 30 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "triton", "vllm", "sglang", "transformers", "deep_gemm", "flashinfer")

OURS = """
reg = sys.modules.get("ds_plugins.registration")
ours = reg.get(ENGINE).elapsed_ms if reg else None
"""
VLLM_CHILD = (
    """
import json, sys, time
import vllm.plugins as p
before = set(sys.modules)
t = time.perf_counter(); p.load_general_plugins(); dt = time.perf_counter() - t
ENGINE = "vllm"
"""
    + OURS
    + """
print("RESULT " + json.dumps({"ms": dt * 1e3, "ours": ours, "added": sorted(set(sys.modules) - before)}))
"""
)
SGLANG_CHILD = (
    """
import json, os, sys, time
for name in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
    __import__(name)
before = set(sys.modules)
t = time.perf_counter(); import sglang; dt = time.perf_counter() - t
ENGINE = "sglang"
"""
    + OURS
    + """
print("RESULT " + json.dumps({"ms": dt * 1e3, "ours": ours, "added": sorted(set(sys.modules) - before)}))
"""
)


def _env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DS_PLUGINS_", "VLLM_PLUGINS", "SGLANG_PLUGINS", "PYTHONPATH"))
    }
    env.update(extra)
    return env


def _child(python: str, code: str, env: dict) -> dict:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def _wall(python: str, env: dict) -> dict:
    t = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return {"ms": (time.perf_counter() - t) * 1e3, "ours": None, "added": []}


def _shared_imports(python: str) -> str:
    """Modules ds-plugins' registration imports that `import sglang` imports anyway.

    Our before-hook runs ahead of SGLang's own imports, so it is the first to import e.g.
    importlib.metadata or packaging; SGLang would pay for them a moment later. Preloading
    them in both variants keeps that shifted cost out of "ours_net"."""
    ours = (
        "import sys; b = set(sys.modules); import ds_plugins.registration, ds_plugins.policy, "
        "ds_plugins.probe, ds_plugins.landscape, ds_plugins.patching; "
        "print(','.join(sorted(m for m in set(sys.modules) - b if not m.startswith('ds_plugins'))))"
    )
    engine = "import sys; b = set(sys.modules); import sglang; print(','.join(sorted(set(sys.modules) - b)))"

    def run(code):
        return set(
            subprocess.run([python, "-c", code], capture_output=True, text=True, env=_env(), check=True)
            .stdout.strip()
            .split(",")
        )

    return ",".join(sorted(run(ours) & run(engine)))


def _other_vllm_plugins(python: str) -> str:
    code = (
        "import importlib.metadata as m; print(','.join(sorted(e.name for e in "
        "m.entry_points(group='vllm.general_plugins') if e.name != 'ds_plugins')))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _paired(runs: int, variants: dict) -> dict:
    """variants: name -> zero-arg callable returning {"ms", "added"}; run in turn each round."""
    results = {name: [] for name in variants}
    for i in range(runs + 1):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            r = variants[name]()
            if i > 0:  # round 0 warms caches (.pyc files, page cache)
                results[name].append(r)
    return results


def _summary(results: dict, with_: str, without: str) -> dict:
    a = [r["ms"] for r in results[with_]]
    b = [r["ms"] for r in results[without]]
    added_modules = sorted(set(results[with_][0]["added"]) - set(results[without][0]["added"]))
    ours = [r["ours"] for r in results[with_] if r["ours"] is not None]
    return {
        "ours_ms": statistics.median(ours) if ours else None,
        f"{with_}_ms": statistics.median(a),
        f"{without}_ms": statistics.median(b),
        "added_ms": statistics.median(x - y for x, y in zip(a, b)),
        "ratio": statistics.median(a) / statistics.median(b),
        "modules_added_by_ds_plugins": added_modules,
        "heavy_modules_added_by_ds_plugins": [m for m in added_modules if m.split(".")[0] in HEAVY],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    py = args.python
    hook = subprocess.run(
        [py, "-m", "ds_plugins.cli", "sglang-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    others = _other_vllm_plugins(py)

    vllm = _paired(
        args.runs,
        {
            "with": lambda: _child(py, VLLM_CHILD, _env()),
            "without": lambda: _child(py, VLLM_CHILD, _env(VLLM_PLUGINS=others)),
        },
    )
    sglang = _paired(
        args.runs,
        {
            "with": lambda: _child(py, SGLANG_CHILD, _env(PYTHONPATH=hook)),
            "without": lambda: _child(py, SGLANG_CHILD, _env()),
        },
    )
    shared = _shared_imports(py)
    sglang_net = _paired(
        args.runs,
        {
            "with": lambda: _child(py, SGLANG_CHILD, _env(PYTHONPATH=hook, BENCH_PRELOAD=shared)),
            "without": lambda: _child(py, SGLANG_CHILD, _env(BENCH_PRELOAD=shared)),
        },
    )
    start = _paired(
        args.runs * 3,
        {  # cheap runs: more of them
            "with": lambda: _wall(py, _env(PYTHONPATH=hook)),
            "without": lambda: _wall(py, _env()),
        },
    )
    report = {
        "machine": f"{platform.node()} {platform.machine()} ({os.cpu_count()} CPUs), {platform.python_version()}",
        "runs": args.runs,
        "vllm_load_general_plugins": _summary(vllm, "with", "without"),
        "sglang_import_with_hook": _summary(sglang, "with", "without"),
        "sglang_import_with_hook_shared_imports_preloaded": {
            **_summary(sglang_net, "with", "without"),
            "preloaded": shared.split(","),
        },
        "python_start_with_hook": _summary(start, "with", "without"),
    }
    rows = [
        ("vLLM load_general_plugins()", report["vllm_load_general_plugins"]),
        ("import sglang (PYTHONPATH hook)", report["sglang_import_with_hook"]),
        ("  same, shared imports preloaded", report["sglang_import_with_hook_shared_imports_preloaded"]),
        ("python -c pass (PYTHONPATH hook)", report["python_start_with_hook"]),
    ]
    print(f"{report['machine']}; {args.runs} paired runs, medians (python start: {3 * args.runs})")
    print(f"{'measure':<34}{'with':>10}{'without':>10}{'ratio':>8}{'added':>10}{'ours':>9}  heavy imports by us")
    for name, s in rows:
        ours = f"{s['ours_ms']:>7.1f}ms" if s["ours_ms"] is not None else f"{'-':>9}"
        print(
            f"{name:<34}{s['with_ms']:>8.1f}ms{s['without_ms']:>8.1f}ms{s['ratio']:>8.3f}{s['added_ms']:>8.1f}ms"
            f"{ours}  {', '.join(s['heavy_modules_added_by_ds_plugins']) or 'none'}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
