"""Runs inside a real vLLM environment (tests/quant/test_vllm.py): ds-plugins' "ascend" config
registered with vLLM's own API, vLLM's own CLI parser, its config verification, and its real linear
and FusedMoE layers built on CPU and loaded through their own weight loaders.

Runs in a directory holding `ckpt/` (the checkpoint) and `ref.pt` (the float64 references). Prints `OK <name>`
per check; any failure raises.
"""

import logging

import torch

ckpt_dir, ref_path = "ckpt", "ref.pt"  # in the working directory the test gives
ref = torch.load(ref_path)
log = logging.getLogger("vllm.ds_plugins")

# vLLM's CUDA wheel finds no platform on a CPU-only machine; its CPU platform builds layers on CPU.
import vllm.platforms as platforms  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402

platforms._current_platform = CpuPlatform()

from ds_plugins.registration import current_probe, decide  # noqa: E402
from ds_plugins.vllm.ascend import install as ascend_quant  # noqa: E402
from vllm.config import LoadConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers import quantization as q  # noqa: E402

try:  # vLLM >= 0.30 moved the serve parser; `vllm serve` builds its parser with this function
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:  # older layout
    from vllm.utils import FlexibleArgumentParser


def serve_args():
    return make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", ckpt_dir, "--quantization", "ascend"])


def model_config():
    return EngineArgs(model=ckpt_dir, quantization="ascend", dtype="bfloat16").create_model_config()


# Before install: vLLM refuses the method (in argparse where it has choices, else in config verification).
assert "ascend" not in q.QUANTIZATION_METHODS, "ascend registered before install()"
try:
    serve_args()
    model_config()
except (SystemExit, ValueError) as exc:
    assert isinstance(exc, SystemExit) or "ascend" in str(exc), exc
else:
    raise AssertionError("vLLM accepted --quantization ascend before ds-plugins registered it")

plan = decide(current_probe(), "vllm")
assert plan.value("ascend_quant") == "ds_plugins", plan.decision("ascend_quant")
state = ascend_quant.install(plan, log)
assert state == "registered 'ascend'", state
assert ascend_quant.install(plan, log) == state  # idempotent
from ds_plugins.vllm.ascend.config import AscendQuantConfig  # noqa: E402

assert q.get_quantization_config("ascend") is AscendQuantConfig
print("OK registered", flush=True)

args = serve_args()  # vLLM's own `vllm serve` parser
assert args.quantization == "ascend"
print("OK parser", flush=True)

# vLLM's config verification knows the method; building the quant config reads + validates the checkpoint.
mc = model_config()
assert mc.quantization == "ascend"
quant_config = VllmConfig._get_quantization_config(mc, LoadConfig())
assert isinstance(quant_config, AscendQuantConfig) and quant_config.checkpoint is not None

# A broken checkpoint stops vLLM's config building with our error, naming file and key.
from ds_plugins.quant.ascend import AscendFormatError  # noqa: E402

bad = EngineArgs(model="ckpt_bad", quantization="ascend", dtype="bfloat16").create_model_config()
try:
    VllmConfig._get_quantization_config(bad, LoadConfig())
except AscendFormatError as exc:
    assert "layers.0.attn.wkv.weight_scale" in str(exc) and "quant_model_description.json" in str(exc), exc
else:
    raise AssertionError("a checkpoint with a listed-but-absent tensor was accepted")
print("OK config", flush=True)

# Real layers on CPU.
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer  # noqa: E402
from vllm.model_executor.layers.fused_moe.layer import fused_moe_make_expert_params_mapping  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM  # noqa: E402

from ds_plugins.vllm.ascend import methods  # noqa: E402

# The function that builds a MoE layer: FusedMoEFactory from 0.27, before that FusedMoE (0.22-0.25).
FusedMoEFactory = getattr(fused_moe_layer, "FusedMoEFactory", None) or fused_moe_layer.FusedMoE

# As vLLM's configure_quant_config does: the model's packed map (0.30 declares one, 0.28 does not).
quant_config.packed_modules_mapping = dict(getattr(DeepseekV4ForCausalLM, "packed_modules_mapping", {}))
mapper = DeepseekV4ForCausalLM.hf_to_vllm_mapper  # what configure_quant_config hands over, per version
for how in ("get_rename_mapper", "get_unstacked_mapper"):  # 0.30 / 0.28
    if hasattr(mapper, how):
        mapper = getattr(mapper, how)()
        break
quant_config.apply_vllm_mapper(mapper)
ckpt = quant_config.checkpoint
H, Q, D, I, E = ref["H"], ref["Q"], ref["D"], ref["I"], ref["E"]

with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{ref['port']}", backend="gloo"
    )
    initialize_model_parallel(1, 1)

    # attn.wq_a + attn.wkv -> vLLM's fused_wqa_wkv (W8A8_DYNAMIC), loaded shard by shard.
    fused = MergedColumnParallelLinear(
        H,
        [Q, D],
        bias=False,
        quant_config=quant_config,
        params_dtype=torch.bfloat16,
        prefix="model.layers.0.attn.fused_wqa_wkv",
        disable_tp=True,
    )
    assert isinstance(fused.quant_method, methods.W8A8DynamicLinearMethod), type(fused.quant_method)
    params = dict(fused.named_parameters())
    for shard, src in enumerate(("layers.0.attn.wq_a", "layers.0.attn.wkv")):
        for suffix in ("weight", "weight_scale", "weight_offset"):
            p = params[suffix]
            p.weight_loader(p, ckpt.read(f"{src}.{suffix}"), shard)
    fused.quant_method.process_weights_after_loading(fused)
    x = ref["x"].to(torch.bfloat16)
    y = fused(x)
    y = y[0] if isinstance(y, tuple) else y
    want = ref["fused_wqa_wkv"]
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), want, rtol=1e-2, atol=1e-3), (
        (y.float() - want).abs().max()
    )
    assert fused.weight.dtype == torch.int8 and not hasattr(fused, "weight_offset")
    print("OK linear_w8a8_dynamic", flush=True)

    # wo_b is FLOAT in the DeepSeek-V4 recipes: vLLM's own unquantized method.
    wo_b = RowParallelLinear(
        Q, H, bias=False, quant_config=quant_config, params_dtype=torch.bfloat16, prefix="model.layers.0.attn.wo_b"
    )
    assert isinstance(wo_b.quant_method, UnquantizedLinearMethod), type(wo_b.quant_method)
    print("OK linear_float", flush=True)

    # W8A8 static, int64 deq_scale, on a row-parallel layer (checkpoint module `layers.0.attn.wo_a`).
    static = RowParallelLinear(
        H, D, bias=False, quant_config=quant_config, params_dtype=torch.bfloat16, prefix="model.layers.0.attn.wo_a"
    )
    assert isinstance(static.quant_method, methods.W8A8StaticLinearMethod), type(static.quant_method)
    params = dict(static.named_parameters())
    assert params["deq_scale"].dtype == torch.int64  # created in the checkpoint's dtype
    for suffix, p in params.items():
        p.weight_loader(p, ckpt.read(f"layers.0.attn.wo_a.{suffix}"))
    static.quant_method.process_weights_after_loading(static)
    y = static(x)
    y = y[0] if isinstance(y, tuple) else y
    want = ref["wo_a"]
    assert torch.allclose(y.float(), want, rtol=1e-2, atol=1e-3), (y.float() - want).abs().max()
    print("OK linear_w8a8_static", flush=True)

    # Routed experts, W4A8_DYNAMIC, through vLLM's FusedMoE factory and its expert weight loader.
    moe = FusedMoEFactory(
        num_experts=E,
        top_k=2,
        hidden_size=H,
        intermediate_size=I,
        quant_config=quant_config,
        params_dtype=torch.bfloat16,
        prefix="model.layers.0.ffn.experts",
        swiglu_limit=10.0,
    )
    routed = getattr(moe, "routed_experts", moe)
    assert isinstance(routed.quant_method, methods.AscendMoEMethod) and routed.quant_method.packed
    params = dict(routed.named_parameters())
    mapping = fused_moe_make_expert_params_mapping(
        routed, ckpt_gate_proj_name="w1", ckpt_down_proj_name="w2", ckpt_up_proj_name="w3", num_experts=E
    )
    loaded = 0
    for key in ckpt.tensors:
        if ".ffn.experts." not in key:
            continue
        name = "model." + key
        for param_name, weight_name, expert_id, shard_id in mapping:
            if weight_name not in name:
                continue
            mapped = name.replace(weight_name, param_name)
            p = params[mapped.rsplit(".", 1)[1]]
            assert p.weight_loader(
                p, ckpt.read(key), mapped, shard_id=shard_id, expert_id=expert_id, return_success=True
            )
            loaded += 1
            break
    assert loaded == E * 3 * 4, loaded
    routed.quant_method.process_weights_after_loading(routed)
    assert routed.w13_weight.shape == (E, I, H) and routed.w13_weight.dtype == torch.int8  # still packed
    if hasattr(routed, "forward_modular"):  # what vLLM's MoE runner calls after routing
        out = routed.forward_modular(x, ref["topk_weights"], ref["topk_ids"])
    else:
        out = routed.quant_method.apply(routed, x, ref["topk_weights"], ref["topk_ids"], None, None)
    want = ref["moe"]
    assert torch.allclose(out.float(), want, rtol=2e-2, atol=2e-3), (out.float() - want).abs().max()
    print("OK moe_w4a8", flush=True)

# Names: our DeepSeek-V4 rename rules agree with vLLM's own DeepSeek-V4 mapper on every main-model key.
from ds_plugins.quant.ascend import names  # noqa: E402

full = DeepseekV4ForCausalLM.hf_to_vllm_mapper
for key in ref["native_keys"]:
    if key.startswith("mtp."):  # loaded by the MTP model, whose renames live in its load_weights
        continue
    theirs = full._map_name(key)
    for tag in (".scale",):
        assert not key.endswith(tag)
    ours = names.dsv4_to_vllm(key, 43)
    assert ours == theirs, (key, ours, theirs)
print("OK names", flush=True)
