"""bench/gpu_run.py, the prepared device run: end to end on CPU (interpreter, tiny shapes) so the
first GPU minute is not spent on a typo; its prerequisite check; and, on a GPU, its checks at
DeepSeek-V4's real shapes as `gpu`-marked tests."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "prerequisites",
    "ds-plugins selftest",
    "forced routes",
    "kernels vs references at V4 shapes",
    "CUDA-graph capture and replay",
    "benchmark",
    "gpu-marked tests",
]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_step_and_writes_one_results_file(tmp_path):
    env = dict(os.environ, DSP_COMMIT="abc1234")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--cpu-smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["gpu-run-CPU__Triton_interpreter_-abc1234.json"]
    result = json.loads(files[0].read_text())
    assert [s["step"] for s in result["steps"]] == STEPS
    assert all(s["status"] == "passed" for s in result["steps"]), result["steps"]
    checks = {c["name"] for s in result["steps"] for c in s.get("checks", [])}
    assert {
        "sparse decode b=2 s_q=2 (MTP)",
        "sparse prefill (SM12x config)",
        "indexer paged logits, FP4 cache",
        "indexer paged top-k=16 (tl.topk), FP8 cache",
        "CUDA graph: fp8_einsum",
    } <= checks
    assert {r["kernel"] for r in result["benchmark"]["results"]} >= {"flash_mla_with_kvcache", "fp8_einsum"}
    assert "== gpu_run summary" in proc.stdout and "all steps passed" in proc.stdout


def test_a_spent_budget_starts_nothing_and_the_results_file_says_so(tmp_path):
    env = dict(os.environ, DSP_COMMIT="abc1234")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_run.py"),
            "--cpu-smoke",
            "--budget",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-run-CPU__Triton_interpreter_-abc1234.json").read_text())
    assert [s["step"] for s in result["steps"]] == STEPS
    assert [s["status"] for s in result["steps"]] == ["passed"] + ["not run"] * (len(STEPS) - 1)
    assert "INCOMPLETE (not run: ds-plugins selftest, forced routes" in proc.stdout


def test_missing_prerequisites_are_named(monkeypatch, capsys):
    gpu_run = _load("gpu_run")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert gpu_run.main(["--cpu-smoke"]) == gpu_run.EXIT_PREREQUISITES
    out = capsys.readouterr().out
    assert "missing: python module 'triton' is not installed" in out and "nothing was measured" in out


def test_a_gpu_run_needs_cuda(monkeypatch):
    gpu_run = _load("gpu_run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing, _ = gpu_run.prerequisites(cpu_smoke=False)
    assert missing and "no CUDA device visible" in missing[0]


def test_forced_routes_reach_the_triton_kernels_on_sm90():
    checks = _load("gpu_checks").forced_route_checks((9, 0))
    assert [c.ok for c in checks] == [True], checks


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("group", ["correctness_checks", "graph_checks"])
def test_gpu_checks_at_v4_shapes(group):
    checks = getattr(_load("gpu_checks"), group)("cuda", small=False)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_test_files_the_device_machine_cannot_import_are_named(tmp_path):
    (tmp_path / "test_needs_absent.py").write_text("import os\nimport no_such_module_xyz.sub\n")
    (tmp_path / "test_fine.py").write_text("import os\nimport torch\n\ndef f():\n    import not_at_top_level\n")
    assert _load("gpu_run").uncollectable_tests(tmp_path) == {
        str(tmp_path / "test_needs_absent.py"): ["no_such_module_xyz"]
    }


def test_checks_past_their_deadline_are_not_started():
    import time

    gpu_checks = _load("gpu_checks")
    checks = gpu_checks.correctness_checks("cpu", small=True, deadline=time.monotonic() - 1)
    assert checks and all(not c.ran and not c.ok and c.seconds == 0.0 for c in checks)
