"""A hypothetical environment, from flags: `ds-plugins doctor --simulate ...` and DS_PLUGINS_SIMULATE.

The simulated machine starts empty (no engine, no GPU, no library) and has
exactly what the flags give it, so the answer does not depend on the machine
the command runs on. DS_PLUGINS_SIMULATE, read inside a real engine process,
keeps that engine's real version unless --engine says otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .probe import ENGINES, Device, Library, Probe
from .settings import ConfigError

# Libraries a simulation may name, with the features each can have.
LIBRARY_FEATURES: dict[str, tuple[str, ...]] = {
    "deep_gemm": ("sm12x",),
    "vllm.third_party.deep_gemm": ("sm12x",),
    "flash_mla": (),
    "flashinfer": ("sm120_sparse_mla",),
    "triton": (),
    "vllm_ascend": (),
    "torch_npu": (),
    "mooncake": (),
}
_FEATURE_ALIASES = {"sm120": "sm120_sparse_mla", "sm121": "sm12x", "sm120_kernels": "sm12x"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", action="append", default=[], metavar="NAME==VERSION",
                        help="an installed engine, e.g. vllm==0.22.1 or sglang==0.5.12 (repeatable)")
    parser.add_argument("--capability", action="append", default=[], metavar="MAJOR.MINOR",
                        help="a CUDA GPU of this compute capability, e.g. 12.0 (repeatable, one per GPU)")
    parser.add_argument("--npu", type=int, default=0, metavar="N", help="N Ascend NPUs")
    parser.add_argument("--lib", action="append", default=[], metavar="NAME=SPEC",
                        help="an installed library: yes, no, a feature (deep_gemm=sm12x, flashinfer=sm120) "
                             "or no-<feature> (deep_gemm=no-sm12x); version=X adds a version; "
                             f"names: {', '.join(LIBRARY_FEATURES)}")
    parser.add_argument("--torch", metavar="VERSION", default=None, help="torch version")


def _engine(text: str) -> tuple[str, str]:
    name, sep, version = text.partition("==")
    name = name.strip().lower()
    if not sep or name not in ENGINES or not version.strip():
        raise ConfigError(f"--engine {text!r}: expected NAME==VERSION with NAME one of {', '.join(ENGINES)}")
    from packaging.version import InvalidVersion, Version
    try:
        Version(version.strip())
    except InvalidVersion:
        raise ConfigError(f"--engine {text!r}: {version.strip()!r} is not a version") from None
    return name, version.strip()


def _capability(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise ConfigError(f"--capability {text!r}: expected MAJOR.MINOR, e.g. 12.0") from None
    return major, minor


def _library(text: str) -> Library:
    name, sep, spec = text.partition("=")
    name = name.strip()
    if name not in LIBRARY_FEATURES:
        raise ConfigError(f"--lib {text!r}: unknown library {name!r}; known: {', '.join(LIBRARY_FEATURES)}")
    known = LIBRARY_FEATURES[name]
    present, version, features = True, None, set()
    for token in (t.strip() for t in (spec if sep else "yes").split(",") if t.strip()):
        lowered = token.lower()
        if lowered in ("yes", "present"):
            continue
        if lowered in ("no", "absent"):
            present = False
        elif lowered.startswith("version="):
            version = token.split("=", 1)[1]
        else:
            negate = lowered.startswith("no-")
            feature = lowered[3:] if negate else lowered
            feature = _FEATURE_ALIASES.get(feature, feature)
            if feature not in known:
                allowed = ", ".join(known) if known else "none"
                raise ConfigError(f"--lib {text!r}: {name} has no feature {feature!r} (features: {allowed})")
            if not negate:
                features.add(feature)
    if not present:
        return Library(name, False)
    note = "simulated" + ("" if not known else f": {', '.join(sorted(features)) or 'no ' + ', '.join(known)}")
    return Library(name, True, version, None, tuple(sorted(features)), note)


def build(args: argparse.Namespace, base_engines: dict[str, str] | None = None) -> Probe:
    engines = dict(base_engines or {})
    for text in args.engine:
        name, version = _engine(text)
        engines[name] = version
    devices = [Device("cuda", i, "simulated GPU", _capability(c)) for i, c in enumerate(args.capability)]
    devices += [Device("npu", i, "simulated Ascend NPU") for i in range(args.npu)]
    libraries = {lib.name: lib for lib in map(_library, args.lib)}
    return Probe(
        python=sys.version.split()[0],
        engines=engines,
        torch=args.torch,
        torch_cuda=None,
        devices=tuple(devices),
        device_note="",
        libraries=libraries,
        simulated=True,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad DS_PLUGINS_SIMULATE must not exit the engine process
        raise ConfigError(f"DS_PLUGINS_SIMULATE: {message}")


def from_env_value(value: str, real_engines: dict[str, str]) -> Probe:
    """The probe described by a DS_PLUGINS_SIMULATE value."""
    parser = _Parser(prog="DS_PLUGINS_SIMULATE", add_help=False)
    add_arguments(parser)
    try:
        args = parser.parse_args(shlex.split(value))
    except ValueError as exc:
        raise ConfigError(f"DS_PLUGINS_SIMULATE: {exc}") from None
    return build(args, base_engines=real_engines)
