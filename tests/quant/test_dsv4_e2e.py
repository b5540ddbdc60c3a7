"""A tiny DeepSeek-V4 (transformers' own model, float32) quantized the way the msModelSlim DeepSeek-V4 recipes
do it (research §1.4: attention linears W8A8_DYNAMIC except wo_a/wo_b/compressor/indexer weights_proj,
shared experts W8A8_DYNAMIC, routed experts W4A8_DYNAMIC; everything else FLOAT), written under
DeepSeek's native names, loaded back through ds-plugins (names.dsv4_to_transformers finds each module),
and run: logits within the stated tolerance of the float original.

Tolerances (stated once): against the float model, relative L2 error of the logits <= 0.25 (measured 0.17; int4 routed
experts dominate: naive per-channel minmax int4 on Gaussian weights); against the same model with the quantized
weights dequantised to float, <= 0.03 (what is left is per-token int8 activation rounding)."""

import copy

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from ds_plugins.quant.ascend import arith, names
from ds_plugins.quant.ascend.loader import Checkpoint
from ds_plugins.quant.ascend.modules import QuantExperts, QuantLinear

from . import writer

TOL_FLOAT, TOL_DEQUANT = 0.25, 0.03
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
E, I = 4, 32


def tiny_config() -> DeepseekV4Config:
    cfg = DeepseekV4Config(
        vocab_size=128,
        num_hidden_layers=3,
        layer_types=list(LAYER_TYPES),
        hidden_size=64,
        num_attention_heads=4,
        head_dim=64,
        partial_rotary_factor=0.25,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        index_n_heads=8,
        index_head_dim=32,
        index_topk=3,
        n_routed_experts=E,
        num_experts_per_tok=2,
        moe_intermediate_size=I,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    cfg._attn_implementation = "eager"
    return cfg


def recipe(cfg):
    """Native module names -> scheme, per the msModelSlim DeepSeek-V4 W4A8 recipe."""
    out = {}
    for layer, kind in enumerate(LAYER_TYPES):
        p = f"layers.{layer}"
        for m in ("attn.wq_a", "attn.wq_b", "attn.wkv"):
            out[f"{p}.{m}"] = "W8A8_DYNAMIC"
        if kind == "compressed_sparse_attention":
            out[f"{p}.attn.indexer.wq_b"] = "W8A8_DYNAMIC"
        for m in ("w1", "w2", "w3"):
            out[f"{p}.ffn.shared_experts.{m}"] = "W8A8_DYNAMIC"
            for e in range(E):
                out[f"{p}.ffn.experts.{e}.{m}"] = "W4A8_DYNAMIC"
    return out


def float_weight(model, native: str) -> torch.Tensor:
    m = names.dsv4_to_transformers(native + ".weight").rsplit(".", 1)[0]
    if ".experts." in m:  # transformers keeps routed experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        moe, e, proj = m.rsplit(".", 2)
        experts = model.get_submodule(moe.replace(".experts", ".experts"))
        e = int(e)
        return {"w1": experts.gate_up_proj[e, :I], "w3": experts.gate_up_proj[e, I:], "w2": experts.down_proj[e]}[proj]
    return model.get_submodule(m).weight


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the weights so quantization error is not hidden by tiny magnitudes
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "hc" not in name and "embed" not in name:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    plan = recipe(cfg)
    modules = {}
    for native, scheme in plan.items():
        w = float_weight(model, native).detach()
        if scheme == "W4A8_DYNAMIC":
            modules[native] = (scheme, writer.w4a8_dynamic(w, "down" if native.endswith("w2") else "gate"))
        else:
            modules[native] = (scheme, writer.w8a8_dynamic(w))
    d = tmp_path_factory.mktemp("dsv4")
    writer.write(d, modules, {"hc_head_fn": model.model.hc_head.hc_fn.detach()})
    ckpt = Checkpoint(d)

    quant, dequant = copy.deepcopy(model), copy.deepcopy(model)
    for layer in range(cfg.num_hidden_layers):
        hf_moe = names.dsv4_to_transformers(f"layers.{layer}.ffn.experts.0.w1.weight").rsplit(".", 3)[0]
        parent, attr = hf_moe.rsplit(".", 1)
        setattr(
            quant.get_submodule(parent), attr, QuantExperts(ckpt, f"layers.{layer}.ffn.experts", E, cfg.swiglu_limit)
        )
    for native, scheme in plan.items():
        if ".ffn.experts." in native:
            continue
        hf = names.dsv4_to_transformers(native + ".weight").rsplit(".", 1)[0]
        parent, attr = hf.rsplit(".", 1)
        assert isinstance(quant.get_submodule(hf), torch.nn.Linear), hf
        setattr(quant.get_submodule(parent), attr, QuantLinear(ckpt, native))
    with torch.no_grad():  # the dequantised reference: same integer weights, float compute
        for native in plan:
            t = ckpt.module_tensors(native)
            w = arith.unpack_int4(t["weight"]) if plan[native] == "W4A8_DYNAMIC" else t["weight"]
            deq = w.float() * t["weight_scale"].reshape(-1, 1)
            float_weight(dequant, native).copy_(deq)
    return model, quant, dequant, ckpt


def test_every_native_module_maps_to_a_transformers_module(models):
    model, _, _, ckpt = models
    for module in ckpt.modules:
        if ".ffn.experts." in module:
            continue
        hf = names.dsv4_to_transformers(module + ".weight").rsplit(".", 1)[0]
        assert isinstance(model.get_submodule(hf), torch.nn.Linear), (module, hf)
    assert (
        names.dsv4_to_transformers("layers.1.attn.indexer.wq_b.weight")
        == "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"
    )


def test_quantized_dsv4_logits_match_float(models):
    model, quant, dequant, _ = models
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        got = quant(ids).logits
        deq = dequant(ids).logits
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert torch.isfinite(got).all()
    print(f"logits rel err: vs dequantised {rel(got, deq):.4f}, vs float {rel(got, ref):.4f}")
    assert rel(got, deq) <= TOL_DEQUANT, rel(got, deq)
    assert rel(got, ref) <= TOL_FLOAT, rel(got, ref)
    # the quantized model is not trivially the float one (the checkpoint really is int8/int4)
    assert rel(got, ref) > 1e-4
    n_quant = sum(isinstance(m, (QuantLinear, QuantExperts)) for m in quant.modules())
    assert n_quant == 3 * (1 + 3 + 3) + 1  # per layer: experts + wq_a/wq_b/wkv + shared w1/w2/w3; + one indexer wq_b
