"""Official engine wheels, fetched once and kept as plain source trees for AST checks.

`source(engine, version)` returns a folder holding the wheel's .py files, its
METADATA and FILES.txt (every file name in the wheel, for checks on non-Python
files such as DeepGEMM's kernel headers). Wheels come from the package index
through pip (so pip's own cache serves repeats) and are deleted once unpacked;
the unpacked trees stay under the cache folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS_FILE = ROOT / "ci" / "versions.toml"


def cache_dir() -> Path:
    path = Path(os.environ.get("DSP_CACHE") or Path.home() / ".cache" / "ds-plugins")
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, dict[str, list[str]]]:
    with VERSIONS_FILE.open("rb") as f:
        return tomllib.load(f)


def matrix() -> list[tuple[str, str]]:
    return [(engine, v) for engine, spec in versions().items() for v in spec["matrix"]]


def _wanted(name: str, package: str) -> bool:
    top = name.split("/", 1)[0]
    return (name.endswith(".py") and top == package) or name.endswith(".dist-info/METADATA")


def _download(dist: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(into), f"{dist}=={version}"]
    subprocess.run(cmd, check=True)
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {dist}=={version}, got {[w.name for w in wheels]}")
    return wheels[0]


def unpack(wheel: Path, package: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for name in names:
            if _wanted(name, package):
                zf.extract(name, dest)
    meta = next(dest.glob("*.dist-info/METADATA"))
    shutil.copy(meta, dest / "METADATA")
    (dest / "FILES.txt").write_text("\n".join(names) + "\n")
    (dest / "WHEEL").write_text(wheel.name + "\n")


# Distributions whose top-level package is not their name with "_" for "-".
PACKAGE_OF = {"flashinfer-python": "flashinfer", "sgl-deep-gemm": "deep_gemm"}
# Kernel libraries an engine wheel pins exactly, whose own wheels the compat table reads.
PINNED_LIBS = {"vllm": ("flashinfer-python",), "sglang": ("sgl-deep-gemm",)}


def source(dist: str, version: str) -> Path:
    """Unpacked wheel of `dist` (an engine, or a library an engine pins) at `version`; fetched on first use."""
    package = PACKAGE_OF.get(dist, dist.replace("-", "_"))
    dest = cache_dir() / "upstream" / f"{dist}-{version}"
    if (dest / ".complete").exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _download(dist, version, Path(tmp))
        partial = Path(tmp) / "tree"
        unpack(wheel, package, partial)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(partial), dest)
    (dest / ".complete").touch()
    return dest


def requirement_pin(src: Path, dist: str) -> str | None:
    """The exact version a wheel pins for `dist` (Requires-Dist: dist==X), if any."""
    for line in (src / "METADATA").read_text().splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].split(";")[0].strip()
            name, sep, pinned = req.partition("==")
            if sep and name.strip().lower().replace("_", "-") == dist:
                return pinned.strip()
    return None


def main(argv: list[str]) -> int:
    """`python ci/upstream.py fetch`: fetch and unpack every matrix version and the kernel libraries it pins."""
    if argv[:1] != ["fetch"]:
        print("usage: python ci/upstream.py fetch", file=sys.stderr)
        return 2
    for engine, version in matrix():
        print(f"{engine} {version}: {source(engine, version)}")
        for dist, pinned, path in pinned_sources(engine, version):
            print(f"  {dist} {pinned}: {path}")
    return 0


def pinned_sources(engine: str, version: str) -> list[tuple[str, str, Path]]:
    """(dist, pinned version, unpacked source) for the kernel libraries this engine wheel pins."""
    src = source(engine, version)
    out = []
    for dist in PINNED_LIBS[engine]:
        pinned = requirement_pin(src, dist)
        if pinned:
            out.append((dist, pinned, source(dist, pinned)))
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
