"""What the model's config.json says it has (decoder layers, MTP layers, routed experts, dtype), so
that tensors for modules the model does not have, and modules of the model with no tensors, are
refused before vLLM places a weight (vLLM skips unknown names and leaves unloaded parameters as
allocated, uninitialised memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import AscendFormatError

CONFIG = "config.json"
# The names model families use for the routed-expert count (DeepSeek, Qwen-MoE, Mixtral).
_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
_FLOAT16 = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


@dataclass(frozen=True)
class Layout:
    file: str
    num_hidden_layers: int | None = None
    num_mtp_layers: int = 0  # num_nextn_predict_layers
    num_experts: int | None = None
    dtype: str | None = None  # the model's 16-bit float dtype, if config.json names one


def _count(file: str, raw: Mapping[str, Any], key: str) -> int | None:
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise AscendFormatError(file, key, f"must be a non-negative integer, got {v!r}")
    return v


def from_dict(raw: Mapping[str, Any], file: str = CONFIG) -> Layout:
    if not isinstance(raw, Mapping):
        raise AscendFormatError(file, None, f"expected a JSON object, got {type(raw).__name__}")
    experts = next((n for n in (_count(file, raw, k) for k in _EXPERT_KEYS) if n is not None), None)
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    return Layout(
        file=file,
        num_hidden_layers=_count(file, raw, "num_hidden_layers"),
        num_mtp_layers=_count(file, raw, "num_nextn_predict_layers") or 0,
        num_experts=experts,
        dtype=_FLOAT16.get(str(dtype).removeprefix("torch.")) if dtype is not None else None,
    )


def read(directory: str | Path) -> Layout | None:
    """The layout from `<directory>/config.json`, or None where there is none (checks needing it are skipped)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AscendFormatError(str(path), None, f"not valid JSON ({exc})") from None
    return from_dict(raw, str(path))
