"""ds_plugins.kv.amx: a P/D decode worker on a CPU with AMX tiles holds the tile permission after
registering its caches (without it, vLLM's CPU attention ends the worker with SIGILL on a first
forward over loaded KV; the end-to-end case is tests/e2e/test_pd_e2e.py's Llama P/D).

Each case runs in a fresh interpreter: the permission is per process and cannot be dropped, so the
check reads it before and after, with Linux's own answer (arch_prctl ARCH_GET_XCOMP_PERM).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, json, sys
import torch
from ds_plugins.kv.amx import allow_amx_tiles

libc = ctypes.CDLL(None, use_errno=True)
SYS_arch_prctl, ARCH_GET_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1022, 18

def granted():
    mask = ctypes.c_uint64(0)
    if libc.syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        raise OSError(ctypes.get_errno(), "ARCH_GET_XCOMP_PERM")
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)

device = sys.argv[1]
caches = [torch.zeros(4, 16, dtype=torch.bfloat16, device=device) for _ in range(2)]
before = granted()
asked = allow_amx_tiles(caches)
print("RESULT " + json.dumps({"before": before, "asked": asked, "after": granted()}))
"""


def _amx_tiles() -> bool:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


needs_amx = pytest.mark.skipif(not _amx_tiles(), reason="needs a Linux x86-64 CPU with AMX tiles")


def _run(device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, device],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


@needs_amx
def test_cpu_caches_get_the_tile_permission_a_fresh_process_lacks():
    got = _run("cpu")
    assert got == {"before": False, "asked": True, "after": True}, got


def test_no_cpu_cache_asks_nothing():
    got = _run("meta")
    assert got["asked"] is False and got["after"] == got["before"], got
