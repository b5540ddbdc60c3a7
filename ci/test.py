"""The one test command (README, .ci/run): set everything up on a fresh machine, then run the suite.

    python3 ci/test.py [pytest args...]

1. builds or reuses the engine environments (ci/envs.py: real vLLM and SGLang wheels),
2. fetches the official wheel of every version in ci/versions.toml (ci/upstream.py), and sets up
   mooncake-transfer-engine with the native libraries it needs (ci/mooncake_env.py),
3. checks that docs/compat.md is what ci/compat.py generates, lints the tree and checks its format
   (`ruff check`, `ruff format --check`) and type-checks ds_plugins and ds_plugins_sglang (`mypy`),
   all configured in pyproject.toml,
4. runs pytest in the main environment, with every engine test required (not skipped); the
   kernel tests run the Triton kernels in Triton's CPU interpreter (tests/kernels/conftest.py).
   Without arguments it runs in two parts: every folder but tests/e2e on all cores (pytest-xdist,
   one worker per core, at most 4, each test file kept in one worker so its module fixtures are
   built once), then tests/e2e alone, whose servers bind half the cores each (tests/e2e/test_pd_e2e.py:
   servers that share cores stall each other). With arguments, one pytest run with exactly those.
Downloads are cached under $DSP_CACHE (default ~/.cache/ds-plugins) and pip's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci import envs, mooncake_env, upstream  # noqa: E402


def main(argv: list[str]) -> int:
    made = envs.setup()
    upstream.main(["fetch"])
    main_python = made["main_python"]
    # The suite sets the DS_PLUGINS_* switches it tests itself; none may leak in from the caller.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_PLUGINS_")}
    env.update(DSP_TEST_ENVS=made["registry"], DSP_REQUIRE_ENGINES="1")
    # Triton's interpreter (the kernel tests) runs its tl.dot through NumPy's BLAS, whose threads
    # only fight each other on a 2-core machine: one thread each is measurably faster.
    env.setdefault("OMP_NUM_THREADS", "1")
    # mooncake-transfer-engine and the native libraries it loads, for the KV-transfer tests (tests/kv/)
    env.update(mooncake_env.setup())
    stale = subprocess.run([main_python, "ci/compat.py", "check"], cwd=upstream.ROOT, env=env).returncode
    lint = subprocess.run([made["lint_python"], "-m", "ruff", "check", "."], cwd=upstream.ROOT).returncode
    lint = (
        subprocess.run([made["lint_python"], "-m", "ruff", "format", "--check", "."], cwd=upstream.ROOT).returncode
        or lint
    )
    lint = subprocess.run([made["lint_python"], "-m", "mypy"], cwd=upstream.ROOT).returncode or lint
    tests = 0
    for args in _runs(argv):
        tests = (
            subprocess.run(
                [main_python, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=upstream.ROOT, env=env
            ).returncode
            or tests
        )
    return tests or stale or lint


E2E = "tests/e2e"


def _runs(argv: list[str]) -> list[list[str]]:
    """The pytest runs: the caller's arguments as one run, or the whole suite in its two parts."""
    if argv:
        return [argv]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cores, 4)
    parallel = ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []
    return [[*parallel, f"--ignore={E2E}"], [E2E]]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
