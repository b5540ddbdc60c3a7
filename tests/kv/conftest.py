"""Mooncake tests: the real mooncake-transfer-engine wheel, in child processes on 127.0.0.1 over TCP.

The wheel's native dependencies come from ci/mooncake_env.py (the test command sets DSP_MOONCAKE_ENV;
without it the fixture builds or reuses the same cached tree). Every test here runs under a hard
per-test alarm, and every child is killed at teardown, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEST_TIMEOUT_S = 60

# V4-shaped KV groups (64-token blocks): FP8 latent KV at 584 B/token for the compressed (ratio-4) and the
# sliding-window groups, the compressed one padded to a 1 KiB multiple as V4's aligned layouts are, and
# the indexer's FP8 keys at 128 B + a 4 B scale per token. Two layers per group, 16 blocks per layer.
BLOCK_TOKENS = 64
V4_LAYOUT = [
    [{"block_len": BLOCK_TOKENS * 584, "stride": 37888, "num_blocks": 16}] * 2,
    [{"block_len": BLOCK_TOKENS * 584, "stride": BLOCK_TOKENS * 584, "num_blocks": 16}] * 2,
    [{"block_len": BLOCK_TOKENS * 132, "stride": BLOCK_TOKENS * 132, "num_blocks": 16}] * 2,
]


@pytest.fixture(autouse=True)
def _hard_timeout(request):
    # A module that starts vLLM processes sets a longer TIMEOUT_S (their imports alone take tens of seconds
    # on a loaded 2-core machine).
    limit = getattr(request.module, "TIMEOUT_S", TEST_TIMEOUT_S)

    def fire(signum, frame):
        raise TimeoutError(f"test exceeded {limit} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def mooncake_spec() -> dict:
    sys.path.insert(0, str(ROOT))
    from ci import mooncake_env

    try:
        return mooncake_env.spec()
    except Exception as exc:  # no network, no compiler, no apt: say so
        if os.environ.get("DSP_REQUIRE_ENGINES") == "1":
            raise
        pytest.skip(f"mooncake test environment cannot be built here: {exc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A child process speaking JSON lines; reads never block past their timeout."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.events: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def expect(self, kind: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event within {timeout} s; stderr:\n{self.tail()}") from None
            if ev is None:
                raise AssertionError(f"child exited ({self.proc.poll()}) before {kind!r}; stderr:\n{self.tail()}")
            if ev["event"] == kind:
                return ev

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        return "".join(self.stderr[-40:])

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def spawn(mooncake_spec):
    """spawn(script, *args, extra_env) -> Child with the mooncake environment; all are killed at teardown."""
    sys.path.insert(0, str(ROOT))
    from ci.mooncake_env import child_env

    children: list[Child] = []

    def make(script: Path, *args: str, python: str | None = None) -> Child:
        env = child_env(mooncake_spec)
        env.pop("DSP_MOONCAKE_ENV", None)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
        env.setdefault("GLOG_minloglevel", "1")  # mooncake's INFO lines are noise here
        child = Child([python or sys.executable, str(script), *args], env)
        children.append(child)
        return child

    yield make
    for c in children:
        c.kill()
