"""Freeze a process (SIGSTOP) and return only once every one of its threads has stopped.

`kill(pid, SIGSTOP)` returns as soon as the signal is queued; the process stops when one of its threads
dequeues it, and the other threads only when that one has told them to. On a loaded machine that takes
long enough for a running thread (mooncake's transfer server, woken by a request) to serve a request
the test meant to hit a frozen peer. The fault tests wait here, on /proc, until the freeze is real.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc/.../stat file after the command name (state first), or None once it is gone.
    The name, in parentheses, may hold spaces: the fields follow its closing parenthesis."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _states(pid: int) -> list[str]:
    """The state letter of each thread of pid ('T' stopped, 't' traced, 'Z' exited); none once reaped."""
    return [f[0] for stat in Path(f"/proc/{pid}/task").glob("*/stat") if (f := _stat_fields(stat))]


def wait_stopped(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        running = {pid: s for pid in pids if (s := _states(pid)) and not all(x in "TtZX" for x in s)}
        if not running:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not stopped within {timeout} s (thread states): {running}")
        time.sleep(0.01)


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_stopped([pid])


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group pgid."""
    return [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if (f := _stat_fields(stat)) and int(f[2]) == pgid  # state, ppid, pgrp
    ]


def freeze_group(pgid: int) -> None:
    os.killpg(pgid, signal.SIGSTOP)
    wait_stopped(group_pids(pgid))
