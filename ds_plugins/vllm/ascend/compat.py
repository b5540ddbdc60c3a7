"""The vLLM interfaces the "ascend" quantization config and its layer methods rely on, found by probing the
imported vLLM (imports vLLM: loaded only by config / methods).

What moved across the vLLM matrix (0.20 -> 0.33; ci/ascend_seams.py proves each fact in every wheel):
  * the MoE layer class a QuantizationConfig is handed: `FusedMoE` (a class, 0.20-0.23; `RoutedExperts` is
    an alias of it from 0.22), then `RoutedExperts` (0.24+, where `FusedMoE` became a factory function);
  * `FusedMoeWeightScaleSupported` moved from `fused_moe.layer` to `fused_moe.routed_experts` (0.24); the
    `fused_moe` package exports it, and `FusedMoEMethodBase`, in every version;
  * `FusedMoEMethodBase.apply` gained `shared_experts` (0.22); vLLM's callers pass its arguments by keyword.
The rest (LinearBase, LinearMethodBase, UnquantizedLinearMethod, RowParallelLinear, the vLLM parameter
classes, set_weight_attrs, register_quantization_config) did not move.

Anything not found raises ImportError with one line naming what is missing: install.install turns that
into its one warning and leaves vLLM as shipped, instead of a layer failing half way through a load.
"""

from __future__ import annotations

import inspect
from typing import Any

from vllm.model_executor.layers import fused_moe as _fused_moe

# The keyword arguments AscendMoEMethod.apply accepts (methods): the union of what vLLM 0.20-0.33 pass.
MOE_APPLY_PARAMS = ("layer", "x", "topk_weights", "topk_ids", "shared_experts", "shared_experts_input")


def _need(module, name: str):
    value = getattr(module, name, None)
    if value is None:
        raise ImportError(
            f"{module.__name__}.{name} is missing: this vLLM's MoE quantization interface is not one ds-plugins knows"
        )
    return value


def moe_layer_class(module=_fused_moe) -> type:
    """The class of the MoE layers vLLM hands `QuantizationConfig.get_quant_method`."""
    for name in ("RoutedExperts", "FusedMoE"):
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    raise ImportError(
        f"{module.__name__} exports neither a RoutedExperts nor a FusedMoE class: this vLLM's MoE "
        "layer is not one ds-plugins knows"
    )


def unsupported_moe_apply_params(base: type[Any]) -> list[str]:
    """Parameters of `base.apply` (vLLM's FusedMoEMethodBase) that AscendMoEMethod.apply does not take."""
    params = inspect.signature(base.apply).parameters
    return [
        n
        for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in MOE_APPLY_PARAMS
    ]


MoELayer = moe_layer_class()
FusedMoEMethodBase = _need(_fused_moe, "FusedMoEMethodBase")
FusedMoeWeightScaleSupported = _need(_fused_moe, "FusedMoeWeightScaleSupported")
_extra = unsupported_moe_apply_params(FusedMoEMethodBase)
if _extra:
    raise ImportError(
        f"vLLM's FusedMoEMethodBase.apply takes {', '.join(_extra)}, which ds-plugins' MoE method "
        f"does not (it takes {', '.join(MOE_APPLY_PARAMS)})"
    )
