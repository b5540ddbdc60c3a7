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
from typing import NamedTuple

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


class Device(NamedTuple):
    kind: str  # "cuda" | "npu"
    index: int
    name: str
    capability: tuple[int, int] | None = None  # CUDA compute capability

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
            Device(d["kind"], d["index"], d["name"], tuple(d["capability"]) if d.get("capability") else None)
            for d in data["devices"]
        )
        libraries = {
            k: Library(v["name"], v["present"], v.get("version"), v.get("location"),
                       tuple(v.get("features", ())), v.get("note", ""))
            for k, v in data.get("libraries", {}).items()
        }
        return cls(data["python"], dict(data["engines"]), data.get("torch"), data.get("torch_cuda"),
                   devices, data.get("device_note", ""), libraries, bool(data.get("simulated")))


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


def installed_engines() -> dict[str, str]:
    return {name: v for name in ENGINES if (v := _version(name)) is not None}


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
    return deep_gemm_at("vllm.third_party.deep_gemm", root, _version("vllm"),
                         "vendored in the vLLM wheel")


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
    note = (f"flashinfer.decode provides {FLASHINFER_SM120_SPARSE_MLA}" if has
            else f"flashinfer.decode has no {FLASHINFER_SM120_SPARSE_MLA} (no SM120 sparse MLA for V4)")
    if has:
        missing = _missing_dsv4_decode_shapes(root)
        if missing:
            has = False
            note = (f"flashinfer.decode provides {FLASHINFER_SM120_SPARSE_MLA}, but its SM120 dispatch table lacks "
                    f"V4's decode shapes (heads, top-k) {', '.join(map(str, missing))}")
    return Library("flashinfer", True, version, str(root), ("sm120_sparse_mla",) if has else (), note)


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
        node = ast.parse(text[start:text.index("\n)", start) + 2]).body[0].value
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

def visible(entries: list[str], index: int, uuid: str) -> bool:
    for entry in entries:
        if entry.isdigit() and int(entry) == index:
            return True
        if entry.startswith("GPU-") and uuid.startswith(entry):
            return True
    return False


def _cuda_devices(env) -> tuple[list[Device], str]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return [], "CUDA_VISIBLE_DEVICES hides every GPU"
    # Only talk to NVML where an NVIDIA driver is loaded: elsewhere even importing
    # the binding costs more than the rest of the probe.
    if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/usr/lib/wsl/lib/libnvidia-ml.so.1")):
        return [], "no NVIDIA driver loaded"
    try:
        import pynvml  # nvidia-ml-py: NVML does not initialise CUDA in this process
    except ImportError:
        return [], "NVIDIA driver present, but nvidia-ml-py (pynvml) is not installed, so GPUs were not read"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML failed to initialise: {exc}"
    devices: list[Device] = []
    try:
        entries = [e.strip() for e in visible.split(",")] if visible else None
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            if entries is not None and not visible(entries, index, uuid):
                continue
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(Device("cuda", len(devices), name, (int(major), int(minor))))
    except pynvml.NVMLError as exc:
        return devices, f"NVML error while listing GPUs: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return devices, f"{len(devices)} GPU(s) via NVML" if devices else "NVML lists no visible GPU"


def _npu_devices(env) -> tuple[list[Device], str]:
    try:
        names = os.listdir("/dev")
    except OSError:
        return [], ""
    ids = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"davinci(\d+)", n)))
    visible = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible:
        wanted = {int(x) for x in visible.split(",") if x.strip().isdigit()}
        ids = [i for i in ids if i in wanted]
    devices = [Device("npu", i, "Ascend NPU") for i, _ in enumerate(ids)]
    return devices, f"{len(devices)} Ascend NPU(s) under /dev/davinci*" if devices else ""


def devices(env=None) -> tuple[tuple[Device, ...], str]:
    env = os.environ if env is None else env
    cuda, cuda_note = _cuda_devices(env)
    npu, npu_note = _npu_devices(env)
    notes = "; ".join(n for n in (cuda_note, npu_note) if n)
    return tuple(cuda + npu), notes


def probe(env=None) -> Probe:
    """Read this machine. Cheap: no torch, engine or kernel-library import."""
    torch_version, torch_cuda = _torch()
    found, note = devices(env)
    return Probe(
        python=sys.version.split()[0],
        engines=installed_engines(),
        torch=torch_version,
        torch_cuda=torch_cuda,
        devices=found,
        device_note=note,
        libraries=libraries(),
    )
