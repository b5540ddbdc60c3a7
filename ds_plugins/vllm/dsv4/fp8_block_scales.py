"""Block-FP8 linears with DeepGEMM off on SM12x: the checkpoint's e8m0 weight scales become float32 for CUTLASS.

DeepSeek-V4's checkpoint (`scale_fmt: ue8m0`, 128x128 blocks) makes vLLM's `Fp8LinearMethod` register each
linear's `weight_scale_inv` as `torch.float8_e8m0fnu` (`DeepseekV4FP8Config.is_scale_e8m0`; 0.20: the V4
model's own FP8 config). `_POSSIBLE_FP8_BLOCK_KERNELS` is first-fit: with DeepGEMM off (vLLM's own gate in
0.20-0.23, ds-plugins' `deepgemm=off` in 0.24 and 0.27) the first kernel that qualifies on SM12x is
`CutlassFp8BlockScaledMMKernel`. Its post-load processing is the base class's
(`Fp8BlockScaledMMLinearKernel.process_weights_after_loading`), which keeps the scales' dtype; the only
e8m0 -> float32 step is `deepgemm_post_process_fp8_weight_block`, on the DeepGEMM path. CUTLASS's block
scaled-mm reads float32 scales, so the memory-profiling forward's first linear raises.

Upstream's answer (0.28's `B12xFp8BlockScaledMMKernel`, an SM12x kernel listed after CUTLASS) is the same
idea inside a kernel's own post-load step: turn e8m0 scales into float32 there. The seam here is the same
step of the CUTLASS kernel: `CutlassFp8BlockScaledMMKernel.process_weights_after_loading` (inherited in
every release 0.20-0.33; the patch gives the class one of its own, which runs vLLM's and then converts the
block scale in place of the parameter, through vLLM's `replace_parameter`). The conversion is exact:
byte e -> 2**(e - 127) (e = 0 gives the float32 subnormal 2**-127, e = 255 e8m0fnu's NaN). It touches
only layers whose block scale is e8m0; float32 scales (Flash-Base checkpoints) stay as they are.

Selected by `indexer=triton`: the decision that holds exactly where the installed DeepGEMM has no SM12x
kernels and ds-plugins answers V4's DeepGEMM calls (0.20-0.24 and 0.27 on SM12x, or any version whose
DeepGEMM lacks them). Only the CUTLASS kernel changes, and vLLM picks it only where DeepGEMM's block kernel
does not qualify, so a plan where DeepGEMM serves is unaffected.
"""

from __future__ import annotations

import logging
from typing import Any

from ...patching import Patch, Target, parameters

_log = logging.getLogger("vllm.ds_plugins")
MODULE = "vllm.model_executor.kernels.linear.scaled_mm.cutlass"
KERNEL = "CutlassFp8BlockScaledMMKernel"
BASE = "Fp8BlockScaledMMLinearKernel"
# Fp8LinearMethod registers the block scale as weight_scale_inv, compressed-tensors as weight_scale:
# vLLM's kernels use weight_scale_inv when it is set, else weight_scale (FP8BlockParams).
SCALE_NAMES = ("weight_scale_inv", "weight_scale")
_said = False


def e8m0_to_float32(scale: Any) -> Any:
    """float8_e8m0fnu (or its uint8 bytes) -> float32, exactly: byte e is 2**(e - 127), 255 is NaN."""
    import torch

    exponent = scale.contiguous().view(torch.uint8).to(torch.int32)
    bits = torch.where(exponent == 0, 1 << 22, exponent << 23)  # 2**-127 is float32's subnormal 0x00400000
    bits = torch.where(exponent == 255, 0x7FC00000, bits)
    return bits.view(torch.float32)


def block_scale_name(layer: Any) -> str | None:
    """The layer's block-scale parameter, by vLLM's own preference (weight_scale_inv, else weight_scale)."""
    for name in SCALE_NAMES:
        if getattr(layer, name, None) is not None:
            return name
    return None


def upcast_block_scale(layer: Any) -> bool:
    """Replace an e8m0 block scale of `layer` by its exact float32 value; True if it did."""
    import torch

    name = block_scale_name(layer)
    if name is None or getattr(layer, name).dtype != torch.float8_e8m0fnu:
        return False
    from vllm.model_executor.utils import replace_parameter  # loaded with the kernel module we patch

    replace_parameter(layer, name, e8m0_to_float32(getattr(layer, name).data))
    global _said
    if not _said:
        _said = True
        _log.info(
            "ds-plugins: block-FP8 linear weight scales e8m0 -> float32 for CUTLASS (DeepGEMM does not "
            "serve this GPU, and CUTLASS reads float32 scales)"
        )
    return True


def _check(target: Target) -> str | None:
    owner = target.owner
    if not isinstance(owner, type) or BASE not in {k.__name__ for k in owner.__mro__}:
        return f"expected {KERNEL} to derive from {BASE}"
    if parameters(getattr(target.value, "__func__", target.value)) != ("self", "layer"):
        return "expected process_weights_after_loading(self, layer)"
    if not callable(getattr(owner, "apply_block_scaled_mm", None)):
        return f"{KERNEL} has no apply_block_scaled_mm"
    return None


def _install(target: Target):
    original = target.value
    owner, name = target.owner, target.name
    had_own = name in vars(owner)

    def process_weights_after_loading(self, layer):
        original(self, layer)
        upcast_block_scale(layer)

    process_weights_after_loading.__qualname__ = f"{owner.__qualname__}.{name}"
    process_weights_after_loading.__doc__ = (
        "ds-plugins: vLLM's post-load processing, then e8m0 block scales "
        "-> float32 (ds_plugins/vllm/dsv4/fp8_block_scales.py)"
    )
    process_weights_after_loading.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, name, process_weights_after_loading)

    def undo() -> None:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # inherited again, as shipped

    return undo


PATCH = Patch(
    id="vllm.fp8_linear.e8m0_scales_fp32",
    engine="vllm",
    module=MODULE,
    attribute=f"{KERNEL}.process_weights_after_loading",
    versions=">=0.20",
    implements=("indexer", ("triton",)),
    why="with DeepGEMM off, first-fit gives V4's block-FP8 linears to CutlassFp8BlockScaledMMKernel, which "
    "keeps the checkpoint's e8m0 weight scales (only DeepGEMM's post-processing converts them) and reads "
    "float32 scales: the memory-profiling forward's first linear raises",
    retire="vLLM's CUTLASS block-FP8 kernel converts e8m0 scales itself, or a kernel that reads e8m0 precedes it "
    "on SM12x (no release up to 0.33.0 does; 0.28's B12x kernel converts but comes after CUTLASS)",
    check=_check,
    install=_install,
    how="after vLLM's own post-load processing of a block-FP8 linear that CUTLASS serves, e8m0 weight scales "
    "are replaced by the same powers of two in float32",
    evidence=("tests/engines/test_vllm_covers_fp8_oproj.py", "tests/contract/test_vllm_seams.py"),
)
