"""`quant_model_description.json`: global keys and one quant type per saved tensor.

Format (what msModelSlim's "ascendV1" saver writes): a flat JSON
object. Keys that name a tensor map to a type string; the global keys below carry settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AscendFormatError

FILENAME = "quant_model_description.json"

# Types this loader computes. FLOAT = kept in the model dtype (norms, router, embed, head, ...).
SUPPORTED_TYPES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC")
# Types msModelSlim / vllm-ascend know but ds-plugins does not compute: a clear error, not a guess.
KNOWN_UNSUPPORTED = (
    "W8A16",
    "W8A8_MIX",
    "W4A16",
    "W4A4_DYNAMIC",
    "W4A4_FLATQUANT_DYNAMIC",
    "W4A4_MXFP4",
    "W4A8_MXFP",
    "W8A8_MXFP8",
    "W8A8FP8_DYNAMIC",
    "FAKQuant",
    "INT8_DYNAMIC",
    "C8",
)

# Global (non-tensor) keys. The attention/KV-cache ones must be absent or empty here: quantized
# KV caches and attention are vllm-ascend features ds-plugins does not implement.
# `n_mtp_layers`: how many MTP layers the DeepSeek-V4 adapter quantized (`mtp.<i>.*`, i < n).
GLOBAL_KEYS = (
    "version",
    "model_quant_type",
    "group_size",
    "metadata",
    "optional",
    "is_rot_used",
    "ascend_quant_method",
    "kv_cache_type",
    "fa_quant_type",
    "indexer_quant_type",
    "reduce_quant_type",
    "kv_quant_type",
    "n_mtp_layers",
)
UNSUPPORTED_GLOBALS = ("kv_cache_type", "fa_quant_type", "indexer_quant_type", "reduce_quant_type", "kv_quant_type")


@dataclass(frozen=True)
class Description:
    path: str
    types: dict[str, str]  # tensor key -> quant type
    version: str | None = None
    model_quant_type: str | None = None
    group_size: int = 0
    extras: dict = field(default_factory=dict)  # the other global keys, as read

    def type_of(self, tensor_key: str) -> str | None:
        return self.types.get(tensor_key)

    @property
    def is_deepseek_native(self) -> bool:
        """DeepSeek-V4 msModelSlim checkpoints keep DeepSeek's own names (`hc_head_fn`, `layers.N.attn...`)."""
        return "hc_head_fn" in self.types or any(k.startswith("layers.") for k in self.types)


def _looks_like_tensor(key: str) -> bool:
    """Tensor keys are dotted module paths; DeepSeek-V4's few top-level tensors (`hc_head_fn`, ...) are
    the undotted exception, and they are only taken as tensors when they carry a quant type."""
    return "." in key


def parse(path: str | Path) -> Description:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise AscendFormatError(str(path), None, f"{FILENAME} not found (is this a msModelSlim output directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AscendFormatError(str(path), None, f"not valid JSON ({exc})") from None
    return from_dict(raw, str(path))


def from_dict(raw, path: str = FILENAME) -> Description:
    if not isinstance(raw, dict):
        raise AscendFormatError(path, None, f"expected a JSON object, got {type(raw).__name__}")
    types: dict[str, str] = {}
    extras: dict = {}
    for key, value in raw.items():
        if key in GLOBAL_KEYS:
            extras[key] = value
            continue
        if not _looks_like_tensor(key) and (not isinstance(value, str) or value not in SUPPORTED_TYPES):
            raise AscendFormatError(
                path,
                key,
                f"unknown global key (value {value!r}): neither a tensor name nor "
                f"one of the global keys {', '.join(GLOBAL_KEYS)}",
            )
        if not isinstance(value, str):
            raise AscendFormatError(path, key, f"a tensor's quant type must be a string, got {value!r}")
        if value not in SUPPORTED_TYPES:
            known = " (known to msModelSlim, not implemented by ds-plugins)" if value in KNOWN_UNSUPPORTED else ""
            raise AscendFormatError(
                path, key, f"unknown quant type {value!r}{known}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        types[key] = value
    if not types:
        raise AscendFormatError(path, None, "lists no tensors")
    for key in UNSUPPORTED_GLOBALS:
        if extras.get(key) not in (None, "", "FLOAT"):
            raise AscendFormatError(
                path,
                key,
                f"quantized attention/KV cache ({key}={extras[key]!r}) is not "
                "supported by ds-plugins; only vllm-ascend on Ascend implements it",
            )
    group_size = extras.get("group_size", 0)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise AscendFormatError(path, "group_size", f"must be a non-negative integer, got {group_size!r}")
    n_mtp = extras.get("n_mtp_layers", None)
    if n_mtp is not None and (not isinstance(n_mtp, int) or isinstance(n_mtp, bool) or n_mtp < 0):
        raise AscendFormatError(path, "n_mtp_layers", f"must be a non-negative integer, got {n_mtp!r}")
    if group_size and "W4A8_DYNAMIC" in types.values():
        raise AscendFormatError(
            path,
            "group_size",
            f"per-group W4A8 (group_size={group_size}) is not supported "
            "(vllm-ascend rejects it too); only per-channel (0)",
        )
    return Description(
        path=path,
        types=types,
        version=extras.get("version"),
        model_quant_type=extras.get("model_quant_type"),
        group_size=group_size,
        extras=extras,
    )
