"""Official engine wheels, fetched once and kept as plain source trees for AST checks.

`source(engine, version)` returns a folder holding the wheel's .py files, its
METADATA and FILES.txt (every file name in the wheel, for checks on non-Python
files such as DeepGEMM's kernel headers). Wheels come from the package index
through pip (so pip's own cache serves repeats) and are deleted once unpacked;
the unpacked trees stay under the cache folder.
"""

from __future__ import annotations

import fnmatch
import os
import re
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
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(into),
        f"{dist}=={version}",
    ]
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
PACKAGE_OF = {"flashinfer-python": "flashinfer", "sgl-deep-gemm": "deep_gemm", "sgl-flash-mla": "flash_mla"}


# The probe's library for each distribution a stock engine wheel may pin, by canonical distribution name
# (the distributions ds_plugins/probe.py reads versions from); each library's name is also its package.
LIBRARY_OF_DIST = {
    "flashinfer-python": "flashinfer",
    "deep-gemm": "deep_gemm",
    "sgl-deep-gemm": "deep_gemm",
    "flash-mla": "flash_mla",
    "sgl-flash-mla": "flash_mla",
    "triton": "triton",
    "vllm-ascend": "vllm_ascend",
    "torch-npu": "torch_npu",
    "mooncake-transfer-engine": "mooncake",
}


def wheel_requirements(src: Path) -> dict:
    """{canonical distribution: packaging Requirement} for every `Requires-Dist` a plain install of this
    wheel follows on Linux x86_64 (no extra)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    where = {"extra": "", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    reqs = {}
    for line in (src / "METADATA").read_text().splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(where):
                reqs[canonicalize_name(req.name)] = req
    return reqs


def wheel_pins(src: Path) -> dict[str, str]:
    """{canonical distribution: version} for every exact pin (`name[extras]==X`) among the wheel's
    requirements (wheel_requirements); other requirements are left out."""
    pins = {}
    for name, req in wheel_requirements(src).items():
        spec = list(req.specifier)
        if len(spec) == 1 and spec[0].operator == "==":
            pins[name] = spec[0].version
        elif name in LIBRARY_OF_DIST:
            raise ValueError(
                f"{src.name}: requires {req}, not an exact pin: the version a stock install "
                f"gets is not a fact of the wheel"
            )
    return pins


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


# Printable runs in a binary; kept: those with a space (messages, format strings) or naming a source file.
_RUN = re.compile(rb"[\x20-\x7e]{6,}")
_KEEP = re.compile(rb"[\x20-\x7e]* [\x20-\x7e]*|[\x20-\x7e]*\.(?:cu|cuh|h|hpp|cpp|cc|cxx|py)")


def _is_binary(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".so") or ".so." in base


def _is_binary(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".so") or ".so." in base


def binary_strings(dist: str, version: str, globs: set[str]) -> dict[str, str]:
    """member -> its string table, for the compiled members of the wheel matching `globs`.

    Kept under <cache>/upstream-strings/<dist>-<version>/: `members.txt` (every compiled member of the
    wheel) and one `<member>.strings` per extracted member. The wheel is downloaded only when a wanted
    member has not been extracted yet; all globs asked for in one call are extracted from one download."""
    dest = cache_dir() / "upstream-strings" / f"{dist}-{version}"
    index = dest / "members.txt"

    def wanted(members: list[str]) -> list[str]:
        return [m for m in members if any(fnmatch.fnmatch(m, g) for g in globs)]

    if index.exists():
        members = index.read_text().split()
        if all((dest / f"{m}.strings").exists() for m in wanted(members)):
            return {m: (dest / f"{m}.strings").read_text(errors="replace") for m in wanted(members)}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _download(dist, version, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            members = [i.filename for i in zf.infolist() if _is_binary(i.filename)]
            for m in wanted(members):
                out = dest / f"{m}.strings"
                if out.exists():
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                runs = (r for r in _RUN.findall(zf.read(m)) if _KEEP.fullmatch(r))
                partial = out.with_name(out.name + ".partial")
                partial.write_bytes(b"\n".join(runs) + b"\n")
                partial.replace(out)
        dest.mkdir(parents=True, exist_ok=True)
        partial = index.with_name("members.txt.partial")
        partial.write_text("\n".join(members) + "\n")
        partial.replace(index)
    return {m: (dest / f"{m}.strings").read_text(errors="replace") for m in wanted(members)}


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
    """(dist, pinned version, unpacked source) for the kernel libraries this engine wheel pins exactly."""
    pins = wheel_pins(source(engine, version))
    return [(dist, pinned, source(dist, pinned)) for dist, pinned in pins.items() if dist in LIBRARY_OF_DIST]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
