"""The safetensors side of a checkpoint, read from file headers only (no tensor data is touched).

Validation runs on these headers so that every error is raised before a weight is placed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AscendFormatError

# safetensors dtype tags -> the names the scheme rules use (torch-free on purpose).
DTYPES = {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "F16": "float16",
          "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
_MAX_HEADER = 100 << 20


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
        return n * _ITEMSIZE.get(self.dtype, 1)


_ITEMSIZE = {"int8": 1, "uint8": 1, "bool": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4, "float32": 4,
             "int64": 8, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e8m0fnu": 1}


def read_header(file: Path) -> dict[str, TensorInfo]:
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise AscendFormatError(str(file), None, "not a safetensors file (shorter than its 8-byte header size)")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise AscendFormatError(str(file), None, f"not a safetensors file (header size {size})")
            meta = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AscendFormatError(str(file), None, f"unreadable safetensors header ({exc})") from None
    out = {}
    for key, entry in meta.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"), str(entry.get("dtype")).lower())
        out[key] = TensorInfo(key, dtype, tuple(int(d) for d in entry["shape"]), str(file))
    return out


def scan(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint directory: key -> (dtype, shape, file).

    With a `*.safetensors.index.json`, its weight_map must agree with the files' headers.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AscendFormatError(str(directory), None, "no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for key, info in read_header(file).items():
            if key in tensors:
                raise AscendFormatError(str(file), key, f"tensor also stored in {tensors[key].file}")
            tensors[key] = info
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AscendFormatError(str(index), "weight_map", f"unreadable index ({exc})") from None
        for key, fname in weight_map.items():
            info = tensors.get(key)
            if info is None or Path(info.file).name != fname:
                raise AscendFormatError(str(index), key, f"index points to {fname}, but "
                                        + ("no file holds it" if info is None else f"it is in {Path(info.file).name}"))
    return tensors
