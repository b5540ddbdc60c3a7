"""Engine-agnostic torch modules that hold a quantized layer as stored (no dequantise-at-load) and
run it through `compute`: the CPU path of the tests and of bench/quant.py, and a template for an
engine adapter's layer methods. Resident bytes ≈ checkpoint bytes: weights stay int8 (W4A8 packed),
scales stay fp32, `weight_offset` (always zero: symmetric) and `scale_bias` (a kernel helper) are
checked and dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from . import arith, compute
from .errors import AscendFormatError
from .loader import Checkpoint


def _flat_scale(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).float().contiguous()


def _check_zero_offset(ckpt: Checkpoint, module: str, tensors: dict) -> None:
    off = tensors.get("weight_offset")
    if off is not None and bool(off.ne(0).any()):
        raise AscendFormatError(
            ckpt.modules[module].tensors["weight_offset"].file,
            f"{module}.weight_offset",
            "asymmetric weights (non-zero weight_offset) are not supported; msModelSlim writes zeros for these schemes",
        )


class QuantLinear(nn.Module):
    """W8A8_DYNAMIC or W8A8 (static) linear, loaded from one checkpoint module."""

    def __init__(self, ckpt: Checkpoint, module: str):
        super().__init__()
        spec = ckpt.modules[module]
        t = ckpt.module_tensors(module)
        _check_zero_offset(ckpt, module, t)
        self.scheme = spec.scheme
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.register_buffer("weight", t["weight"].contiguous())
        if self.scheme == "W8A8_DYNAMIC":
            self.register_buffer("weight_scale", _flat_scale(t["weight_scale"]))
            self.register_buffer("bias", t["bias"].float() if "bias" in t else None)
        elif self.scheme == "W8A8":
            self.register_buffer("input_scale", t["input_scale"].float().reshape(()))
            self.register_buffer("input_offset", t["input_offset"].float().reshape(()))
            self.register_buffer("quant_bias", t["quant_bias"].to(torch.int32).reshape(-1))
            self.register_buffer("deq_scale", arith.decode_deq_scale(t["deq_scale"]).reshape(-1))
        else:
            raise AscendFormatError(
                str(ckpt.description.path), f"{module}.weight", f"{self.scheme} is not a linear scheme"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "W8A8_DYNAMIC":
            return compute.linear_dynamic(x, self.weight, self.weight_scale, self.bias)
        return compute.linear_static(
            x, self.weight, self.input_scale, self.input_offset, self.quant_bias, self.deq_scale
        )


class QuantExperts(nn.Module):
    """All routed experts of one MoE layer: `<moe>.<E>.{gate,up,down}` = w1/w3/w2 (or *_proj)."""

    def __init__(self, ckpt: Checkpoint, moe: str, num_experts: int, swiglu_limit: float | None):
        super().__init__()
        names = ("w1", "w3", "w2") if f"{moe}.0.w1" in ckpt.modules else ("gate_proj", "up_proj", "down_proj")
        members = [f"{moe}.{e}.{n}" for e in range(num_experts) for n in names]
        absent = next((m for m in members if m not in ckpt.modules and f"{m}.weight" not in ckpt.tensors), None)
        if absent is not None:
            raise AscendFormatError(
                str(ckpt.description.path),
                f"{absent}.weight",
                f"the layer has {num_experts} routed experts, but the checkpoint has no {absent}",
            )
        schemes = {ckpt.scheme_of(m) for m in members}
        if len(schemes) != 1 or not schemes <= {"W8A8_DYNAMIC", "W4A8_DYNAMIC"}:
            odd = (
                next(m for m in members if ckpt.scheme_of(m) not in ("W8A8_DYNAMIC", "W4A8_DYNAMIC"))
                if not schemes <= {"W8A8_DYNAMIC", "W4A8_DYNAMIC"}
                else members[0]
            )
            raise AscendFormatError(
                str(ckpt.description.path),
                f"{odd}.weight",
                f"routed experts need one of W8A8_DYNAMIC / W4A8_DYNAMIC, found {sorted(schemes)}",
            )
        self.scheme = schemes.pop()
        self.packed = self.scheme == "W4A8_DYNAMIC"
        self.limit = swiglu_limit
        w13, s13, w2, s2 = [], [], [], []
        for e in range(num_experts):
            parts = []
            for n in names:
                module = f"{moe}.{e}.{n}"
                t = ckpt.module_tensors(module)
                _check_zero_offset(ckpt, module, t)
                parts.append(t)
            gate, up, down = parts
            w13.append(torch.cat([gate["weight"], up["weight"]], 0))
            s13.append(torch.cat([_flat_scale(gate["weight_scale"]), _flat_scale(up["weight_scale"])]))
            w2.append(down["weight"])
            s2.append(_flat_scale(down["weight_scale"]))
        self.register_buffer("w13", torch.stack(w13))
        self.register_buffer("s13", torch.stack(s13))
        self.register_buffer("w2", torch.stack(w2))
        self.register_buffer("s2", torch.stack(s2))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return compute.moe(
            hidden_states,
            top_k_weights,
            top_k_index,
            self.w13,
            self.s13,
            self.w2,
            self.s2,
            packed_int4=self.packed,
            limit=self.limit,
        )


def resident_nbytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters()
    )
