"""Run inside a real vLLM (tests/engines/test_vllm_covers_fp8_oproj.py): V4's block-FP8 linears and its o_proj
with DeepGEMM off on SM12x, built from vLLM's own objects, before and after ds-plugins' covers.

- wo_a's parameters come from vLLM's own factories, as `Fp8LinearMethod.create_weights` makes them for
  DeepseekV4FP8Config (`is_scale_e8m0`): weight e4m3 [groups * o_lora_rank, r], block scale e8m0
  [groups * o_lora_rank / 128, r / 128]; the checkpoint's values are written into them.
- Post-load processing is vLLM's CutlassFp8BlockScaledMMKernel (the kernel first-fit picks with DeepGEMM
  off), configured as `init_fp8_linear_kernel` configures it for Fp8LinearMethod.
- The forward is vLLM's own `deep_gemm_fp8_o_proj` with the recipe vLLM's `compute_fp8_einsum_recipe`
  gives an SM12x GPU; its `fp8_einsum` is the routed name. Only the activation quantizer it calls first,
  `fused_inv_rope_fp8_quant` (a Triton kernel vLLM disables without a GPU), is replaced by one that
  writes its documented output layout (group-major e4m3, TMA-aligned MN-major int32 UE8M0 scales).

Prints one tagged line per fact; any mismatch raises.
"""

from __future__ import annotations

import logging
import socket

import torch

import vllm
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.kernels.linear.scaled_mm import cutlass
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import FP8ScaledMMLinearLayerConfig
from vllm.model_executor.layers.quantization.utils import fp8_utils
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, create_fp8_quant_key
from vllm.model_executor.parameter import BlockQuantScaleParameter
from vllm.models.deepseek_v4.nvidia.ops import o_proj
from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config
from vllm.platforms.interface import DeviceCapability
from vllm.utils.deep_gemm import get_tma_aligned_size

from ds_plugins import patching
from ds_plugins.kernels import einsum as our_einsum
from ds_plugins.kernels._runtime import KernelInputError, use_triton
from ds_plugins.kernels.reference import einsum as ref
from ds_plugins.policy import DECISION_IDS, Decision, Plan
from ds_plugins.vllm.dsv4 import fp8_block_scales, routes

torch.manual_seed(0)
TOKENS, GROUPS, RANK, HEADS_PER_GROUP, HEAD_DIM = 5, 2, 256, 1, 512  # V4: 8 groups, 1024, 8 heads of 512
WIDTH = HEADS_PER_GROUP * HEAD_DIM  # r: what one group of wo_a contracts
BLOCK = [128, 128]
CHECKPOINT_QUANT = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": BLOCK,
}  # DeepSeek-V4-Flash's quantization_config

quant_config = DeepseekV4FP8Config.from_config(CHECKPOINT_QUANT)
assert quant_config.is_scale_e8m0 and quant_config.weight_block_size == BLOCK
print("V4-CONFIG e8m0", quant_config.is_scale_e8m0)

# The checkpoint: wo_a as e4m3 with power-of-two 128x128 block scales, stored as e8m0 bytes.
true_weight = torch.randn(GROUPS * RANK, WIDTH) * 0.05
w_fp8, w_scale = ref.quantize_per_block(true_weight)  # float32 powers of two
w_e8m0 = ((w_scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8).view(torch.float8_e8m0fnu)


def checkpoint_loader(param, loaded) -> None:
    """What the model loader does with a replicated (TP 1) tensor: copy it in."""
    param.data.copy_(loaded)


def wo_a_layer() -> torch.nn.Module:
    """wo_a's parameters as Fp8LinearMethod.create_weights registers them (ColumnParallelLinear, TP 1)."""
    layer = torch.nn.Module()
    out, width = GROUPS * RANK, WIDTH
    layer.logical_widths, layer.input_size_per_partition, layer.output_size_per_partition = [out], width, out
    layer.orig_dtype, layer.weight_block_size = torch.bfloat16, BLOCK
    layer.register_parameter("weight", fp8_utils.create_fp8_weight_parameter(out, width, checkpoint_loader))
    scale = fp8_utils.create_fp8_scale_parameter(
        BlockQuantScaleParameter,
        [out],
        width,
        BLOCK,
        checkpoint_loader,
        scale_dtype=torch.float8_e8m0fnu if quant_config.is_scale_e8m0 else None,
    )
    layer.register_parameter("weight_scale_inv", scale)
    assert layer.weight.shape == w_fp8.shape and layer.weight_scale_inv.shape == w_e8m0.shape
    assert layer.weight_scale_inv.dtype == torch.float8_e8m0fnu
    layer.weight.weight_loader(layer.weight, w_fp8)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, w_e8m0)
    layer.is_bmm, layer.bmm_batch_size = True, GROUPS  # what DeepseekV4Attention sets on wo_a
    layer.input_scale = None  # Fp8LinearMethod.process_weights_after_loading, block-quant branch
    return layer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vLLM's parameters ask for the tensor-parallel rank, QuantFP8 (a CustomOp) for the current config.
CONFIG_SCOPE = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
CONFIG_SCOPE.__enter__()  # for the whole script (held: a dropped scope would restore "no config")
init_distributed_environment(
    world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{_free_port()}"
)
initialize_model_parallel(1, 1)
if True:
    kernel = cutlass.CutlassFp8BlockScaledMMKernel(
        FP8ScaledMMLinearLayerConfig(
            weight_quant_key=create_fp8_quant_key(static=True, group_shape=GroupShape(*BLOCK)),
            activation_quant_key=create_fp8_quant_key(static=False, group_shape=GroupShape(1, BLOCK[0])),
            weight_shape=(GROUPS * RANK, WIDTH),
            input_dtype=torch.bfloat16,
            out_dtype=torch.bfloat16,
        )
    )

# --- vLLM as shipped ----------------------------------------------------------------------------------------
shipped = wo_a_layer()
kernel.process_weights_after_loading(shipped)
print(
    "UPSTREAM-KEEPS",
    str(shipped.weight_scale_inv.dtype).replace("torch.", ""),
    tuple(shipped.weight.shape),
    tuple(shipped.weight_scale_inv.shape),
)
try:  # the kernel itself, as the route called it before its adapter took vLLM's 2-D wo_a
    our_einsum.fp8_einsum(
        "bhr,hdr->bhd",
        ref.quantize_per_token(torch.randn(1, GROUPS, WIDTH)),
        (shipped.weight, shipped.weight_scale_inv),
        torch.empty(1, GROUPS, RANK, dtype=torch.bfloat16),
        recipe=(1, 1, 128),
    )
    raise SystemExit("the kernel accepted a 2-D wo_a without the route's adapter")
except KernelInputError as exc:
    print("KERNEL-REFUSES-2D", exc)

# --- ds-plugins' covers, applied as registration applies them (plan: indexer=triton) ------------------------
moved = patching.Target(
    cutlass,
    cutlass.CutlassFp8BlockScaledMMKernel,
    "apply_block_scaled_mm",
    cutlass.CutlassFp8BlockScaledMMKernel.apply_block_scaled_mm,
)
print("CHECK-MOVED", fp8_block_scales._check(moved))  # a seam of another shape is refused
values = dict.fromkeys(DECISION_IDS, "upstream")
values["indexer"] = "triton"
plan = Plan(
    "vllm", vllm.__version__, "supported", "", "SM120", tuple(Decision(i, v, "test") for i, v in values.items())
)
oproj_route = next(p for p in routes.PATCHES if p.id == "vllm.route.o_proj_einsum")
applied = patching.apply([fp8_block_scales.PATCH, oproj_route], plan, logging.getLogger("vllm.ds_plugins"))
print("OUTCOMES", sorted((o.patch_id, o.state) for o in applied))
assert o_proj.fp8_einsum.__ds_plugins_route__ == "vllm.route.o_proj_einsum"

covered = wo_a_layer()
loader = covered.weight_scale_inv.weight_loader
kernel.process_weights_after_loading(covered)
scale = covered.weight_scale_inv
exact = torch.tensor([[2.0 ** (int(b) - 127) for b in row] for row in w_e8m0.view(torch.uint8)], dtype=torch.float64)
assert isinstance(scale, torch.nn.Parameter) and not scale.requires_grad and scale.weight_loader is loader
assert loader is checkpoint_loader
assert scale.dtype == torch.float32 and scale.shape == w_e8m0.shape and torch.equal(scale.double(), exact)
assert torch.equal(scale, fp8_utils._upcast_e8m0_to_fp32(w_e8m0))  # vLLM's own upcast, for normal exponents
assert torch.equal(covered.weight.view(torch.uint8), shipped.weight.view(torch.uint8))  # the weight is vLLM's
print("COVERED-SCALES float32 exact", tuple(scale.shape))

# --- the o_proj forward: vLLM's deep_gemm_fp8_o_proj on an SM12x recipe -----------------------------------------
o_proj.current_platform.get_device_capability = lambda *a, **k: DeviceCapability(12, 0)
recipe, tma_aligned = o_proj.compute_fp8_einsum_recipe()
assert tuple(recipe) == (1, 1, 128) and tma_aligned, (recipe, tma_aligned)
attention_out = torch.randn(TOKENS, GROUPS * HEADS_PER_GROUP, HEAD_DIM).bfloat16()
a_fp8, a_scale = ref.quantize_per_token(attention_out.float().view(TOKENS, GROUPS, WIDTH))
seen = {}


def activation_quantizer(o, positions, cos_sin_cache, *, n_groups, heads_per_group, tma_aligned_scales, **rest):
    """fused_inv_rope_fp8_quant's output layout (its RoPE inversion left out: positions are all 0)."""
    seen.update(n_groups=n_groups, heads_per_group=heads_per_group, tma_aligned_scales=tma_aligned_scales)
    tokens = o.shape[0]
    values = torch.empty(n_groups, tokens, WIDTH, dtype=torch.float8_e4m3fn)
    values.copy_(a_fp8.transpose(0, 1))
    packed = ref.pack_ue8m0(a_scale)  # [T, G, words]
    words, aligned = packed.shape[-1], get_tma_aligned_size(tokens, 4)
    scales = torch.zeros(n_groups * words * aligned, dtype=torch.int32).as_strided(
        (n_groups, tokens, words), (words * aligned, 1, aligned)
    )
    scales.copy_(packed.transpose(0, 1))
    return values.transpose(0, 1), scales.transpose(0, 1)


o_proj.fused_inv_rope_fp8_quant = activation_quantizer
print("EINSUM-PATH", "triton" if use_triton(a_fp8) else "reference")
want = torch.empty(TOKENS, GROUPS, RANK)
ref.fp8_einsum_bhr_hdr_bhd(
    (a_fp8, a_scale),
    (w_fp8.view(GROUPS, RANK, WIDTH), w_scale.view(GROUPS, RANK // 128, -1)),
    want,
    recipe=(1, 128, 128),
)
for name, layer in (("fp32", covered), ("e8m0", shipped)):  # e8m0: wo_a as vLLM leaves it without the FP8 cover
    z = o_proj.deep_gemm_fp8_o_proj(
        attention_out,
        torch.zeros(TOKENS, dtype=torch.int64),
        torch.zeros(16, 64),
        layer,
        torch.nn.Identity(),
        n_groups=GROUPS,
        heads_per_group=HEADS_PER_GROUP,
        nope_dim=448,
        rope_dim=64,
        o_lora_rank=RANK,
        einsum_recipe=recipe,
        tma_aligned_scales=tma_aligned,
    )
    assert seen == {"n_groups": GROUPS, "heads_per_group": HEADS_PER_GROUP, "tma_aligned_scales": True}, seen
    assert z.shape == (TOKENS, GROUPS * RANK) and z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float().view(TOKENS, GROUPS, RANK), want, rtol=2.0**-7, atol=1e-2)
    # and close to the unquantized projection (the checkpoint is what it approximates)
    exact_z = torch.einsum(
        "bhr,hdr->bhd", attention_out.float().view(TOKENS, GROUPS, WIDTH), true_weight.view(GROUPS, RANK, WIDTH)
    )
    assert (z.float().view_as(exact_z) - exact_z).abs().max() < 0.1 * exact_z.abs().max()
    print("OPROJ", name, "ok", float((z.float().view_as(want) - want).abs().max()))

# --- undo: the class inherits vLLM's method again ----------------------------------------------------------
patching.revert(applied)
assert "process_weights_after_loading" not in vars(cutlass.CutlassFp8BlockScaledMMKernel)
assert not hasattr(o_proj.fp8_einsum, "__ds_plugins_route__")
print("REVERTED")
