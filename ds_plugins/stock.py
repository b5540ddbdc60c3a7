"""What a plain `pip install <engine>==<version>` brings: the kernel libraries its wheel vendors or pins.

Data, per engine and version range, in the probe's terms (`probe.Library`: the same library names and
features the probe reads on a real machine), so that `ds-plugins doctor --simulate --engine vllm==0.24.0`
starts from the machine that install gives and not from an empty one. The policy reads DeepGEMM
(vLLM's vendored copy, or sgl-deep-gemm) and FlashInfer from it.

Each range's data was read from the official wheels of the versions in its `checked` tuple, and the wheels
it pins; tests/contract/test_stock_wheels.py re-reads every version of ci/versions.toml (ci/compat.py
`stock_libraries`) and fails if anything here differs. A version inside a range that was not checked
itself (or newer than the newest checked) is assumed to ship what the nearest older checked wheel ships:
its libraries carry no pinned version then, and their note says so.

Left out: libraries the engine does not pin exactly (triton comes with torch's own pin), and compiled
kernels under an engine's own package other than DeepGEMM (vLLM's vendored FlashMLA), which the probe
does not read either. Cheap to import: no torch, no engine.
"""

from __future__ import annotations

from typing import NamedTuple

from . import landscape
from .probe import Library

VENDORED_DEEP_GEMM = "vllm.third_party.deep_gemm"

# Every library the probe reads, with the features it can have and what each means.
FEATURES: dict[str, dict[str, str]] = {
    "deep_gemm": {"sm12x": "SM12x kernels"},
    VENDORED_DEEP_GEMM: {"sm12x": "SM12x kernels"},
    "flash_mla": {},
    "flashinfer": {"sm120_sparse_mla": "SM120 sparse-MLA decode for V4"},
    "triton": {},
    "vllm_ascend": {},
    "torch_npu": {},
    "mooncake": {},
}
# Libraries that live inside an engine's own package: their version is the engine's (as the probe reads it).
VENDORED_BY = {VENDORED_DEEP_GEMM: "vllm"}


class Wheel(NamedTuple):
    engine: str
    versions: str  # ">=A" or ">=A,<B", as landscape.Fact
    checked: tuple[str, ...]  # the releases in the range whose wheels this was read from
    torch: str  # the torch version the wheel pins
    libraries: tuple[Library, ...]  # versions: the pinned ones (None for a vendored library)

    def holds(self, version: str) -> bool:
        return landscape.in_range(self.versions, version, what=f"stock {self.engine} wheel {self.versions}")


def _lib(name: str, version: str | None, *features: str) -> Library:
    return Library(name, True, version, None, features)


def _vendored(*features: str) -> Library:
    return _lib(VENDORED_DEEP_GEMM, None, *features)


WHEELS: tuple[Wheel, ...] = (
    # vLLM: FlashInfer pinned (flashinfer-python==X); DeepGEMM vendored under vllm/third_party since 0.20.
    Wheel("vllm", ">=0.19.1,<0.20.0", ("0.19.1",), "2.10.0", (_lib("flashinfer", "0.6.6"),)),
    Wheel("vllm", ">=0.20.0,<0.22.1", ("0.20.0", "0.20.2"), "2.11.0", (_vendored(), _lib("flashinfer", "0.6.8.post1"))),
    Wheel("vllm", ">=0.22.1,<0.23.0", ("0.22.1",), "2.11.0", (_vendored(), _lib("flashinfer", "0.6.11.post2"))),
    # FlashInfer 0.6.12/0.6.13 name V4's decode but take none of the SM120 arguments vLLM passes (probe.py).
    Wheel("vllm", ">=0.23.0,<0.25.0", ("0.23.0", "0.24.0"), "2.11.0", (_vendored(), _lib("flashinfer", "0.6.12"))),
    Wheel("vllm", ">=0.25.0,<0.27.0", ("0.25.0",), "2.11.0", (_vendored("sm12x"), _lib("flashinfer", "0.6.13"))),
    # 0.27.0 re-vendored a DeepGEMM without the SM120 kernels.
    Wheel(
        "vllm",
        ">=0.27.0,<0.28.0",
        ("0.27.0",),
        "2.13.0",
        (_vendored(), _lib("flashinfer", "0.6.16.post3", "sm120_sparse_mla")),
    ),
    Wheel(
        "vllm",
        ">=0.28.0,<0.30.0",
        ("0.28.0",),
        "2.13.0",
        (_vendored("sm12x"), _lib("flashinfer", "0.6.16.post3", "sm120_sparse_mla")),
    ),
    Wheel(
        "vllm",
        ">=0.30.0,<0.33.0",
        ("0.30.0",),
        "2.13.0",
        (_vendored("sm12x"), _lib("flashinfer", "0.6.18.post1", "sm120_sparse_mla")),
    ),
    Wheel(
        "vllm",
        ">=0.33.0",
        ("0.33.0",),
        "2.14.0",
        (_vendored("sm12x"), _lib("flashinfer", "0.7.2.post1", "sm120_sparse_mla")),
    ),
    # SGLang: FlashInfer pinned (flashinfer_python==X), DeepGEMM as sgl-deep-gemm==X since 0.5.12,
    # FlashMLA as sgl-flash-mla==X since 0.5.23.
    Wheel("sglang", ">=0.5.10,<0.5.11", ("0.5.10",), "2.9.1", (_lib("flashinfer", "0.6.7.post2"),)),
    Wheel("sglang", ">=0.5.11,<0.5.12", ("0.5.11",), "2.11.0", (_lib("flashinfer", "0.6.8.post1"),)),
    Wheel(
        "sglang",
        ">=0.5.12,<0.5.13",
        ("0.5.12",),
        "2.11.0",
        (_lib("flashinfer", "0.6.11.post1"), _lib("deep_gemm", "0.1.0")),
    ),
    Wheel(
        "sglang", ">=0.5.13,<0.5.15", ("0.5.13",), "2.11.0", (_lib("flashinfer", "0.6.12"), _lib("deep_gemm", "0.1.2"))
    ),
    Wheel(
        "sglang", ">=0.5.15,<0.5.19", ("0.5.15",), "2.11.0", (_lib("flashinfer", "0.6.12"), _lib("deep_gemm", "0.1.4"))
    ),
    Wheel(
        "sglang",
        ">=0.5.19,<0.5.20",
        ("0.5.19",),
        "2.13.0",
        (_lib("flashinfer", "0.6.18", "sm120_sparse_mla"), _lib("deep_gemm", "0.1.7", "sm12x")),
    ),
    Wheel(
        "sglang",
        ">=0.5.20,<0.5.23",
        ("0.5.20", "0.5.21"),
        "2.13.0",
        (_lib("flashinfer", "0.6.18", "sm120_sparse_mla"), _lib("deep_gemm", "0.2.0", "sm12x")),
    ),
    Wheel(
        "sglang",
        ">=0.5.23",
        ("0.5.23",),
        "2.14.1",
        (
            _lib("flashinfer", "0.7.2", "sm120_sparse_mla"),
            _lib("deep_gemm", "0.2.3.post2", "sm12x"),
            _lib("flash_mla", "1.0.0"),
        ),
    ),
)


def wheel(engine: str, version: str) -> Wheel | None:
    """The range `version` falls in; None before the first one (older than anything checked)."""
    return next((w for w in WHEELS if w.engine == engine and w.holds(version)), None)


def checked(engine: str, version: str) -> str | None:
    """The checked release `version` is (its wheel was read), or None."""
    w = wheel(engine, version)
    if w is None:
        return None
    from packaging.version import Version

    return next((c for c in w.checked if Version(c) == Version(version)), None)


def basis(engine: str, version: str) -> str | None:
    """The checked release whose wheel stands for `version`: itself if it was checked, else the nearest
    older checked release of its range. None where no range holds it."""
    w = wheel(engine, version)
    if w is None:
        return None
    from packaging.version import Version

    here = checked(engine, version)
    if here:
        return here
    older = [c for c in w.checked if Version(c) <= landscape.release(version)]
    return max(older or w.checked, key=Version)


def _features_text(lib: Library) -> str:
    known = FEATURES.get(lib.name, {})
    return ", ".join(("has " if f in lib.features else "no ") + text for f, text in known.items())


def libraries(engine: str, version: str) -> dict[str, Library]:
    """The libraries a stock install of `engine`==`version` has, as the probe would report them, each
    with a note naming the wheel it comes from. {} before the first range."""
    w = wheel(engine, version)
    if w is None:
        return {}
    based_on = basis(engine, version)
    exact = checked(engine, version) is not None
    if exact:
        origin = f"stock {engine} {version} wheel"
    elif landscape.is_newer_than_tested(engine, version):
        origin = f"stock {engine} {version} wheel (newer than the newest checked; assumed like {based_on}'s)"
    else:
        origin = f"stock {engine} {version} wheel (not checked; assumed like {based_on}'s)"
    out = {}
    for lib in w.libraries:
        vendored = lib.name in VENDORED_BY
        how = "vendored" if vendored else "pinned" if exact else f"{based_on} pins {lib.version}"
        detail = ", ".join(x for x in (how, _features_text(lib)) if x)
        version_here = version if vendored else (lib.version if exact else None)
        out[lib.name] = lib._replace(version=version_here, note=f"{origin}: {detail}")
    return out


def torch(engine: str, version: str) -> str | None:
    """The torch version the stock wheel pins (None where the range's data is only assumed or absent)."""
    w = wheel(engine, version)
    return w.torch if w is not None and checked(engine, version) else None
