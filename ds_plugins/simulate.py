"""A hypothetical environment, from flags: `ds-plugins doctor --simulate ...` and DS_PLUGINS_SIMULATE.

The simulated machine has what the flags give it, so the answer does not depend on the machine the
command runs on:

- each `--engine NAME==VERSION` installs that engine as a plain `pip install` would, with the kernel
  libraries its stock wheel vendors or pins (ds_plugins/stock.py); with several engines, a later one's
  library replaces an earlier one's of the same name, as a later `pip install` would;
- each `--lib NAME=SPEC` then replaces that library outright (`--lib vllm.third_party.deep_gemm=no`
  removes it);
- without `--engine` the machine starts with no library at all;
- with two or more `--capability` GPUs, `--gpu-link` says how they are connected (nvlink, pcie, mixed);
  without it the topology is unknown, as on a machine whose NVML cannot be read.

DS_PLUGINS_SIMULATE, read inside a real engine process, keeps that engine's real version unless
--engine says otherwise (without stock libraries for it: only an --engine flag brings those).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from . import stock
from .probe import ENGINES, LINK_MIXED, LINK_NVLINK, LINK_PCIE, LINK_SINGLE, LINK_UNKNOWN, Device, Library, Probe
from .settings import ConfigError

# Libraries a simulation may name, with the features each can have (stock.FEATURES), and the other
# spellings each library accepts for its features.
LIBRARY_FEATURES: dict[str, tuple[str, ...]] = {name: tuple(f) for name, f in stock.FEATURES.items()}
FEATURE_ALIASES: dict[str, dict[str, str]] = {
    "deep_gemm": {"sm120": "sm12x", "sm121": "sm12x"},
    stock.VENDORED_DEEP_GEMM: {"sm120": "sm12x", "sm121": "sm12x"},
    "flashinfer": {"sm120": "sm120_sparse_mla"},
}


# What --gpu-link accepts (probe.LINKS, less what the GPU count decides: single).
GPU_LINKS = (LINK_NVLINK, LINK_PCIE, LINK_MIXED, LINK_UNKNOWN)


class SimulateError(ValueError):
    """A --simulate flag (or a flag in DS_PLUGINS_SIMULATE) that does not describe a machine; the message
    names the flag."""


def _features_help() -> str:
    return "; ".join(
        f"{name} {', '.join(features)}"
        + (f" (also {'/'.join(FEATURE_ALIASES[name])})" if FEATURE_ALIASES.get(name) else "")
        for name, features in LIBRARY_FEATURES.items()
        if features
    )


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="an engine installed as `pip install NAME==VERSION` would, with the kernel libraries "
        "its stock wheel vendors or pins, e.g. vllm==0.24.0 or sglang==0.5.12 "
        "(repeatable, one per engine)",
    )
    parser.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="MAJOR.MINOR",
        help="a CUDA GPU of this compute capability, e.g. 12.0 (repeatable, one per GPU)",
    )
    parser.add_argument(
        "--gpu-link",
        default=None,
        metavar="KIND",
        help=f"how the --capability GPUs are connected: {', '.join(GPU_LINKS)} (NVLink between every "
        f"pair, none, some); default: unknown, as where NVML cannot be read",
    )
    parser.add_argument("--npu", default=None, metavar="N", help="N Ascend NPUs (0 or more)")
    parser.add_argument(
        "--lib",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="replaces that library, stock or not: yes, no, its features or no-<feature>, "
        "version=X, comma-separated; e.g. --lib vllm.third_party.deep_gemm=no removes "
        "vLLM's vendored DeepGEMM (repeatable, once per library); "
        f"names: {', '.join(LIBRARY_FEATURES)}; features: {_features_help()}",
    )
    parser.add_argument(
        "--torch",
        metavar="VERSION",
        default=None,
        help="torch version, shown by doctor only: no decision depends on it",
    )


def _version(flag: str, text: str, given: str, example: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        Version(text)
    except InvalidVersion:
        raise SimulateError(f"{flag} {given!r}: {text!r} is not a version (e.g. {example})") from None
    return text


def _engine(text: str) -> tuple[str, str]:
    name, sep, version = text.partition("==")
    name, version = name.strip().lower(), version.strip()
    if not sep or name not in ENGINES or not version:
        raise SimulateError(f"--engine {text!r}: expected NAME==VERSION with NAME one of {', '.join(ENGINES)}")
    return name, _version("--engine", version, text, "0.24.0")


def _capability(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in text.split("."))
    except ValueError:
        raise SimulateError(f"--capability {text!r}: expected MAJOR.MINOR, e.g. 12.0") from None
    if major < 1 or minor < 0:
        raise SimulateError(f"--capability {text!r}: expected MAJOR.MINOR with MAJOR >= 1, e.g. 12.0")
    return major, minor


def _count(text) -> int:
    if text is None:
        return 0
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = None
    if n is None or n < 0:
        raise SimulateError(f"--npu {str(text)!r}: expected a number of NPUs, 0 or more")
    return n


def _links(text, gpus: int) -> tuple[str, str]:
    """(Probe.gpu_links, its note) for --gpu-link and the number of simulated GPUs."""
    kind = None if text is None else str(text).strip().lower()
    if kind is not None and kind not in GPU_LINKS:
        raise SimulateError(f"--gpu-link {str(text)!r}: expected one of {', '.join(GPU_LINKS)}")
    if gpus < 2:
        if kind not in (None, LINK_UNKNOWN):
            raise SimulateError(f"--gpu-link {text!r}: it needs two or more --capability GPUs to connect")
        return LINK_SINGLE, "fewer than two simulated GPUs"
    if kind is None:
        return LINK_UNKNOWN, "--gpu-link not given"
    return kind, f"from --gpu-link {kind}"


def _feature(text: str, name: str, token: str) -> str:
    known = LIBRARY_FEATURES[name]
    aliases = FEATURE_ALIASES.get(name, {})
    feature = aliases.get(token, token)
    if feature not in known:
        allowed = ", ".join(known) if known else "none"
        also = f"; also spelled {', '.join(f'{a} ({f})' for a, f in aliases.items())}" if aliases else ""
        raise SimulateError(f"--lib {text!r}: {name} has no feature {token!r} (features: {allowed}{also})")
    return feature


def _library(text: str, stocked: dict[str, Library]) -> Library:
    name, sep, spec = text.partition("=")
    name = name.strip()
    if name not in LIBRARY_FEATURES:
        raise SimulateError(f"--lib {text!r}: unknown library {name!r}; known: {', '.join(LIBRARY_FEATURES)}")
    tokens = [t.strip() for t in (spec if sep else "yes").split(",") if t.strip()]
    if not tokens:
        raise SimulateError(f"--lib {text!r}: expected NAME=SPEC with SPEC yes, no, features or version=X")
    present, version, features, without = True, None, set(), set()
    for token in tokens:
        lowered = token.lower()
        if lowered in ("yes", "present"):
            continue
        if lowered in ("no", "absent"):
            present = False
        elif lowered.startswith("version="):
            version = _version("--lib", token.split("=", 1)[1].strip(), text, f"{name}=version=1.0")
        elif lowered.startswith("no-"):
            without.add(_feature(text, name, lowered[3:]))
        else:
            features.add(_feature(text, name, lowered))
    if not present and (features or without or version):
        raise SimulateError(f"--lib {text!r}: 'no' removes {name}; it cannot also have a version or features")
    if features & without:
        raise SimulateError(f"--lib {text!r}: {', '.join(sorted(features & without))} both given and negated")
    replaced = stocked.get(name)
    over = f"; replaces the stock wheel's {replaced.describe()}" if replaced else ""
    if not present:
        return Library(name, False, note=f"removed by --lib {text}{over}")
    known = LIBRARY_FEATURES[name]
    has = ", ".join(("" if f in features else "no ") + f for f in known)
    note = f"from --lib {text}" + (f": {has}" if has else "") + over
    return Library(name, True, version, None, tuple(sorted(features)), note)


def build(args: argparse.Namespace, base_engines: dict[str, str] | None = None) -> Probe:
    """The simulated probe; raises SimulateError naming the bad flag."""
    engines = dict(base_engines or {})
    libraries: dict[str, Library] = {}
    named: set[str] = set()
    for text in args.engine:
        name, version = _engine(text)
        if name in named:
            raise SimulateError(f"--engine {text!r}: {name} is already given ({name}=={engines[name]})")
        named.add(name)
        engines[name] = version
        libraries.update(stock.libraries(name, version))
    devices = [Device("cuda", i, "simulated GPU", _capability(c)) for i, c in enumerate(args.capability)]
    links, links_note = _links(getattr(args, "gpu_link", None), len(devices))
    devices += [Device("npu", i, "simulated Ascend NPU") for i in range(_count(args.npu))]
    torch = _version("--torch", args.torch.strip(), args.torch, "2.11.0") if args.torch is not None else None
    stocked = dict(libraries)
    overridden: set[str] = set()
    for text in args.lib:
        lib = _library(text, stocked)
        if lib.name in overridden:
            raise SimulateError(f"--lib {text!r}: {lib.name} is already given by another --lib")
        overridden.add(lib.name)
        libraries[lib.name] = lib
    return Probe(
        python=sys.version.split()[0],
        engines=engines,
        torch=torch,
        torch_cuda=None,
        devices=tuple(devices),
        device_note="",
        libraries=libraries,
        simulated=True,
        # a stock install: the engine's own distribution (a real engine kept by DS_PLUGINS_SIMULATE: unknown)
        distributions={name: name for name in named},
        gpu_links=links,
        gpu_links_note=links_note,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad DS_PLUGINS_SIMULATE must not exit the engine process
        raise SimulateError(message)


def from_env_value(value: str, real_engines: dict[str, str]) -> Probe:
    """The probe described by a DS_PLUGINS_SIMULATE value. Every error, argparse's included, is a
    settings.ConfigError whose message starts with "DS_PLUGINS_SIMULATE:" and names the bad flag."""
    parser = _Parser(prog="DS_PLUGINS_SIMULATE", add_help=False, allow_abbrev=False)
    add_arguments(parser)
    try:
        return build(parser.parse_args(shlex.split(value)), base_engines=real_engines)
    except ValueError as exc:  # SimulateError, argparse's (through _Parser.error), shlex's unbalanced quotes
        raise ConfigError(f"DS_PLUGINS_SIMULATE: {exc}") from None
