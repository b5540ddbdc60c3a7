"""Real engines, run in subprocesses: environments come from ci/envs.py (the README test command).

Tests ask for `vllm_env`, `sglang_env` (every live SGLang) or `sglang_plugins_env` (live SGLang
with the entry-point framework, >= 0.5.11); they run once per environment. Without the
environments, these tests skip with the reason, unless DSP_REQUIRE_ENGINES=1 (set by
`python3 ci/test.py`), where a missing environment is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.version import Version

from ci.upstream import versions

STATE_TAG = "DSP-STATE "
STATE_SNIPPET = (
    "\nimport json as _j, ds_plugins.registration as _r\n"
    "print('" + STATE_TAG + "' + _j.dumps(_r.get({engine!r}).snapshot()), flush=True)\n"
)


@dataclass
class EngineEnv:
    engine: str
    version: str
    python: str
    pythonpath: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.engine}=={self.version}"

    def run(
        self,
        code: str | None = None,
        *,
        script: Path | None = None,
        env: dict | None = None,
        pythonpath: tuple[str, ...] = (),
        state: bool = True,
        timeout: int = 600,
        cwd: Path | None = None,
    ) -> "Result":
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DS_PLUGINS_", "VLLM_PLUGINS", "SGLANG_PLUGINS", "PYTHONPATH"))
        }
        clean.update(env or {})
        path = [*pythonpath, *self.pythonpath]
        if path:
            clean["PYTHONPATH"] = os.pathsep.join(path)
        if script is not None:
            cmd = [self.python, str(script)]
        else:
            cmd = [self.python, "-c", code + (STATE_SNIPPET.format(engine=self.engine) if state else "")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean, timeout=timeout, cwd=cwd)
        return Result(proc)


@dataclass
class Result:
    proc: subprocess.CompletedProcess

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def ok(self) -> "Result":
        assert self.proc.returncode == 0, self.output[-6000:]
        return self

    def states(self) -> list[dict]:
        return [
            json.loads(line[len(STATE_TAG) :]) for line in self.proc.stdout.splitlines() if line.startswith(STATE_TAG)
        ]

    @property
    def state(self) -> dict:
        found = self.states()
        assert found, self.output[-6000:]
        return found[-1]

    def lines(self, needle: str) -> list[str]:
        """Output lines holding `needle`, our own state dumps left out."""
        return [line for line in self.output.splitlines() if needle in line and not line.startswith(STATE_TAG)]


def _registry() -> dict | None:
    path = os.environ.get("DSP_TEST_ENVS")
    if not path or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())["envs"]


def _params(engine: str, min_version: str | None = None):
    wanted = [v for v in versions()[engine]["live"] if min_version is None or Version(v) >= Version(min_version)]
    registry = _registry()
    required = os.environ.get("DSP_REQUIRE_ENGINES") == "1"
    params = []
    for v in wanted:
        entry = (registry or {}).get(f"{engine}=={v}")
        if entry is not None:
            params.append(
                pytest.param(EngineEnv(engine, v, entry["python"], entry.get("pythonpath", [])), id=f"{engine}-{v}")
            )
        elif required:
            params.append(pytest.param(None, id=f"{engine}-{v}-missing"))
        else:
            params.append(
                pytest.param(
                    None,
                    id=f"{engine}-{v}",
                    marks=pytest.mark.skip(
                        reason="real engines not set up: run `python3 ci/test.py` (the README test command)"
                    ),
                )
            )
    return params


def pytest_generate_tests(metafunc):
    for name, engine, minimum in (
        ("vllm_env", "vllm", None),
        ("sglang_env", "sglang", None),
        ("sglang_plugins_env", "sglang", "0.5.11"),
    ):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _params(engine, minimum), indirect=True)


def _fixture(request):
    env = request.param
    if env is None:
        pytest.fail("DSP_REQUIRE_ENGINES=1 but this engine environment is missing from DSP_TEST_ENVS")
    out = env.run("import importlib.metadata as m; print(m.version(%r))" % env.engine, state=False).ok()
    assert out.proc.stdout.strip() == env.version, f"{env} environment holds {out.proc.stdout.strip()}"
    return env


@pytest.fixture
def vllm_env(request):
    return _fixture(request)


@pytest.fixture
def sglang_env(request):
    return _fixture(request)


@pytest.fixture
def sglang_plugins_env(request):
    return _fixture(request)


pytestmark = pytest.mark.engines
