"""The safetensors side of a checkpoint, read from file headers only (no tensor data is touched).

Validation runs on these headers so that every error is raised before a weight is placed. The
header is held to the rules safetensors itself enforces when vLLM later opens the file (a JSON
object of {dtype, shape, data_offsets} entries, at most 100,000,000 bytes, data offsets that tile
the data region exactly, the data region ending at the end of the file): a file it would refuse at
weight load is refused here, with the file and the tensor named.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AscendFormatError

# safetensors dtype tags -> the names the scheme rules use (torch-free on purpose).
DTYPES = {
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
# safetensors' own limit on the header (MAX_HEADER_SIZE in its Rust core).
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _ITEMSIZE[self.dtype]


_ITEMSIZE = {
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e8m0fnu": 1,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(file: str, key: str, entry) -> tuple[TensorInfo, tuple[int, int]]:
    """One header entry -> its TensorInfo and data offsets, or AscendFormatError naming file and key."""

    def bad(problem: str):
        return AscendFormatError(file, key, f"bad safetensors header entry: {problem}")

    if not isinstance(entry, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {json.dumps(entry)[:60]}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise bad(f"no {field!r}")
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(tag, str) or tag not in DTYPES:
        raise bad(f"dtype {tag!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {json.dumps(shape)[:60]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"data_offsets must be [begin, end], got {json.dumps(offsets)[:60]}")
    info = TensorInfo(key, DTYPES[tag], tuple(shape), file)
    begin, end = offsets
    if end - begin != info.nbytes:
        raise bad(f"data_offsets {offsets} span {end - begin} bytes, but {tag} {shape} needs {info.nbytes}")
    return info, (begin, end)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, checked against the file's length; no tensor data is read."""
    name = str(file)
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise AscendFormatError(name, None, "not a safetensors file (shorter than its 8-byte header size)")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER:
                raise AscendFormatError(
                    name,
                    None,
                    f"not a safetensors file: header size {size} exceeds safetensors' limit of {MAX_HEADER:,} bytes",
                )
            raw = f.read(size)
            length = os.fstat(f.fileno()).st_size
        if len(raw) != size:
            raise AscendFormatError(
                name, None, f"truncated: the header is {size} bytes, the file holds {len(raw)} after the size field"
            )
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AscendFormatError(name, None, f"unreadable safetensors header ({exc})") from None
    if not isinstance(meta, dict):
        raise AscendFormatError(
            name, None, f"bad safetensors header: expected a JSON object, got a JSON {type(meta).__name__}"
        )
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in meta.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise AscendFormatError(name, key, "bad safetensors header: __metadata__ must map strings to strings")
            continue
        info, (begin, end) = _entry(name, key, entry)
        out[key] = info
        spans.append((begin, end, key))
    # safetensors requires the tensors to tile the data region exactly: no gap, no overlap, no tail.
    data = length - 8 - size
    pos = 0
    for begin, end, key in sorted(spans):
        if end > data:
            raise AscendFormatError(
                name,
                key,
                f"data_offsets [{begin}, {end}] reach past the end of the file's "
                f"{data}-byte data region (truncated, or wrong offsets)",
            )
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a gap (previous data ends at {pos})"
            raise AscendFormatError(name, key, f"bad safetensors header: data_offsets [{begin}, {end}] {what}")
        pos = end
    if pos != data:
        raise AscendFormatError(
            name, None, f"{data - pos} bytes after the last tensor's data (not a safetensors layout)"
        )
    return out


def scan(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint directory: key -> (dtype, shape, file).

    With a `*.safetensors.index.json`, its weight_map must agree with the files' headers both ways:
    every key it lists is in the file it names, and every tensor a file holds is listed.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AscendFormatError(str(directory), None, "no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    info: TensorInfo | None
    for file in files:
        for key, info in read_header(file).items():
            if key in tensors:
                raise AscendFormatError(str(file), key, f"tensor also stored in {tensors[key].file}")
            tensors[key] = info
    indexed: dict[str, str] = {}
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    for index in indexes:
        weight_map = read_weight_map(index)
        for key, fname in weight_map.items():
            info = tensors.get(key)
            if info is None or Path(info.file).name != fname:
                raise AscendFormatError(
                    str(index),
                    key,
                    f"index points to {fname}, but "
                    + ("no file holds it" if info is None else f"it is in {Path(info.file).name}"),
                )
            indexed[key] = str(index)
    if indexes:
        for key, info in tensors.items():
            if key not in indexed:
                raise AscendFormatError(
                    str(indexes[0]),
                    key,
                    f"{Path(info.file).name} holds this tensor but the index does not list it; regenerate the index",
                )
    return tensors


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a *.safetensors.index.json (tensor key -> file name), or one AscendFormatError."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor keys to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AscendFormatError(str(index), "weight_map", f"unreadable index ({exc})") from None
    return weight_map
