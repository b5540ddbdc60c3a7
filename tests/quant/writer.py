"""Test-side msModelSlim writer: quantizes float weights the way the documented format says
(msModelSlim's schemes) and writes safetensors + description JSON.

Written independently of ds_plugins.quant (numpy for the int4 packing and the int64 deq_scale form),
so the loader is checked against the format, not against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def w8a8_dynamic(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel symmetric int8 weight (minmax)."""
    w = w.float()
    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": s, "weight_offset": torch.zeros_like(s)}


def pack_int4_np(q: np.ndarray) -> np.ndarray:
    """The documented packing: transpose to [in, out], pair consecutive out elements,
    byte = (w[2j+1] << 4) | (w[2j] & 0x0F), transpose back -> [out/2, in]."""
    t = q.astype(np.int16).T  # [in, out]
    byte = ((t[:, 1::2] << 4) | (t[:, 0::2] & 0x0F)) & 0xFF
    return byte.astype(np.uint8).view(np.int8).T.copy()


def w4a8_dynamic(w: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-channel symmetric int4, packed; scale_bias = 8·s·ΣW ([out,1] gate/up, [out,16] down)."""
    w = w.float()
    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 7.0
    q = torch.round(w / s).clamp(-8, 7).to(torch.int8)
    chunks = 16 if kind == "down" else 1
    qs = q.double().reshape(q.shape[0], chunks, -1).sum(-1)
    return {
        "weight": torch.from_numpy(pack_int4_np(q.numpy())),
        "weight_scale": s,
        "weight_offset": torch.zeros_like(s),
        "scale_bias": (8.0 * s.double() * qs).float(),
        "_int": q,
    }


def w8a8_static(w: torch.Tensor, bias: torch.Tensor | None, calib: torch.Tensor, deq_int64: bool) -> dict:
    """Static per-tensor asymmetric activations, per-channel symmetric weights."""
    lo, hi = float(calib.min()), float(calib.max())
    in_scale = (hi - lo) / 255.0
    in_offset = float(round(-lo / in_scale) - 128)
    q = w8a8_dynamic(w)
    deq = (in_scale * q["weight_scale"].reshape(-1)).float()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    qb = torch.round(b / deq.double() - q["weight"].double().sum(1) * in_offset).to(torch.int32)
    if deq_int64:  # the float32 bit pattern, zero-extended into int64
        deq_t = torch.from_numpy(deq.numpy().view(np.uint32).astype(np.int64))
    else:
        deq_t = deq
    out = {
        "weight": q["weight"],
        "input_scale": torch.tensor([in_scale], dtype=torch.float32),
        "input_offset": torch.tensor([in_offset], dtype=torch.float32),
        "deq_scale": deq_t,
        "quant_bias": qb,
        "weight_scale": q["weight_scale"],
        "weight_offset": q["weight_offset"],
    }
    return out


def write(
    directory: Path,
    modules: dict[str, tuple[str, dict]],
    floats: dict[str, torch.Tensor] | None = None,
    extras: dict | None = None,
    shards: int = 2,
) -> Path:
    """modules: checkpoint module -> (scheme, tensors by suffix); floats: FLOAT tensors by key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for module, (scheme, parts) in modules.items():
        for suffix, t in parts.items():
            if suffix.startswith("_"):
                continue
            tensors[f"{module}.{suffix}"] = t.contiguous()
            types[f"{module}.{suffix}"] = scheme
    for key, t in (floats or {}).items():
        tensors[key] = t.contiguous()
        types[key] = "FLOAT"
    desc = {
        "version": "1.0.0",
        "model_quant_type": max(set(types.values()) - {"FLOAT"} or {"FLOAT"}),
        "group_size": 0,
        **(extras or {}),
        **types,
    }
    (directory / "quant_model_description.json").write_text(json.dumps(desc, indent=1))
    keys = sorted(tensors)
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"quant_model_weights-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "quant_model_weights.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory
