"""The path manifest's data model: what DeepSeek-V4 runs on each engine version and device class.

One `Row` per GPU kernel (or kernel family) that DeepSeek-V4's weight loading, memory profiling,
prefill, decode, MTP draft, sampling top-k, MoE and CUDA-graph capture reach, for a version range of
one engine and a set of device classes. A row says who provides the kernel, whether that provider
has code for the architecture (and what proves it: `Evidence` the contract tests re-check in every
matrix wheel and the libraries it pins), and, where it has none, which ds-plugins decision covers it.

The policy reads the manifest (`ds_plugins.paths.verdict`): a version is "supported" on a device
only if every blocker row there has its cover in the plan; otherwise it is "unsupported here:
upgrade to ..." with the first release whose path has no blocker there (`upgrade_target`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from ..landscape import in_range

# Device classes. SM90/SM100 rows prove "never changed": ds-plugins leaves them to the engine.
DEVICES = ("sm120", "sm121", "sm90", "sm100")
# The device classes every engine's manifest must cover, for every matrix version.
REQUIRED_DEVICES = ("sm120", "sm121", "sm90")
SM12X = ("sm120", "sm121")

STAGES = ("weight_load", "profile", "prefill", "decode", "mtp", "topk", "moe", "sampling", "cudagraph", "collective")
# "engine": the engine's own Python logic on the path (a config resolution, an assert), not a kernel.
PROVIDERS = (
    "engine",
    "engine_c",
    "engine_triton",
    "flashinfer",
    "deepgemm",
    "cutedsl",
    "tilelang",
    "flash_mla",
    "sgl_kernel",
    "cutlass",
    "marlin",
    "torch",
    "nccl",
    "ds_plugins",
)
# What the provider does for the row's device classes:
#   has_code   it has code for the architecture (evidence says why)
#   blocker    it has none, or fails there: the path crashes unless ds-plugins covers it
#   unverified nothing says it fails, nothing proves it runs (no GPU run yet); shown, not blocking
UPSTREAM = ("has_code", "blocker", "unverified")
# Evidence kinds, each re-checked by the contract tests in the wheel of every version the row covers:
#   source   `pattern` (a regular expression) occurs in `path` of `package`'s wheel
#   absent   `pattern` does not occur there (e.g. no SM120 branch)
#   binary   `pattern` occurs in the strings of the compiled member `path` (e.g. "sm_120")
#            (`path` "FILES.txt" means the wheel's member list, kept by ci/upstream.py: for kernel
#            headers and other non-Python members)
#   pin      the engine wheel's metadata pins `package` to a version matching `pattern`
#   reading  a fact read in the source or an upstream issue that no automatic check can hold
#            (`path` names where); allowed only for `unverified` rows and `refs`
EVIDENCE_KINDS = ("source", "absent", "binary", "pin", "reading")


class Evidence(NamedTuple):
    kind: str
    package: str  # the wheel: "vllm", "sglang", or a pinned library ("flashinfer-python", "sgl-kernel", ...)
    path: str  # a file inside the wheel (package-relative, e.g. "vllm/model_executor/layers/...py")
    pattern: str


class Cover(NamedTuple):
    """The ds-plugins decision that fills a blocker; `patch`, where set, is the declared patch that
    carries it (its version range must include the row's). An `unverified` row may name one too: where
    the failure depends on what the probe reads rather than on the device class (the GPU topology), the
    decision that takes the path away where the probe sees that condition; it never makes a version
    unsupported (only blockers do)."""

    decision: str  # a policy.DECISION_IDS entry
    value: str  # the value that covers: "triton", "off", ...
    patch: str | None = None


class Row(NamedTuple):
    engine: str  # "vllm" | "sglang"
    stage: str
    kernel: str  # what runs, in words ("FP8 block-scaled linear (CUTLASS)")
    provider: str
    versions: str  # ">=A" or ">=A,<B", as in landscape
    devices: tuple[str, ...]
    upstream: str
    why: str  # the selection logic and architecture evidence, in one or two sentences
    evidence: tuple[Evidence, ...] = ()
    cover: Cover | None = None
    fixed_in: str | None = None  # first release of the engine where upstream itself removed the blocker
    refs: tuple[str, ...] = ()  # upstream issues / PRs ("vllm#47174")
    requires: str | None = None  # what the user must add for this row to hold ("--kv-cache-dtype fp8")
    # (library, feature): the row describes the stock libraries of the version; where the probe finds
    # that library with that feature installed instead (a newer FlashInfer, a DeepGEMM with SM12x
    # kernels), the blocker does not hold on that machine.
    unless: tuple[str, str] | None = None

    def applies(self, version: str, device: str | None) -> bool:
        return device in self.devices and in_range(self.versions, version, what=f"row {self.kernel!r}")

    def covered_by(self, values: dict[str, str]) -> bool:
        return self.cover is not None and values.get(self.cover.decision) == self.cover.value


class Blockers(NamedTuple):
    """The uncovered blockers on one engine version and device, and the release to upgrade to."""

    rows: tuple[Row, ...]
    upgrade_to: str | None  # None: no release is known to remove every one of them

    def __bool__(self) -> bool:
        return bool(self.rows)


def device_class(capability: tuple[int, int] | None) -> str | None:
    if capability is None:
        return None
    major, minor = capability
    if major == 12:
        return "sm121" if minor == 1 else "sm120"
    if major == 9:
        return "sm90"
    if major == 10:
        return "sm100"
    return None


def _bounds(versions: str) -> list[str]:
    return re.findall(r"[<>=]=?\s*([0-9][0-9A-Za-z.]*)", versions)


def upgrade_target(rows: tuple[Row, ...], version: str, device: str) -> str | None:
    """The first release after `version` on whose path no blocker row applies at all on `device`
    (ds-plugins' covers are not counted: whether one is selected there depends on that release's
    libraries, which this machine does not have). Candidates are the versions the rows name
    (range bounds and fixed_in); None if none is free of blockers."""
    from packaging.version import Version

    names = {v for r in rows for v in (*_bounds(r.versions), *([r.fixed_in] if r.fixed_in else []))}
    later = sorted((v for v in names if Version(v) > Version(version)), key=Version)
    for candidate in later:
        if not any(r.upstream == "blocker" and r.applies(candidate, device) for r in rows):
            return candidate
    return None


def uncovered(
    rows: tuple[Row, ...],
    version: str,
    device: str,
    values: dict[str, str],
    has: Callable[[str, str], bool] = lambda library, feature: False,
) -> Blockers:
    """The blocker rows on `version`/`device` that the decision `values` leave uncovered; `has(library,
    feature)` says what the machine has installed (default: the stock libraries only)."""
    found = tuple(
        r
        for r in rows
        if r.upstream == "blocker"
        and r.applies(version, device)
        and not r.covered_by(values)
        and not (r.unless and has(*r.unless))
    )
    return Blockers(found, upgrade_target(rows, version, device) if found else None)
