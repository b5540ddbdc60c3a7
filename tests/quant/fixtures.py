"""Small msModelSlim checkpoints built with the test-side writer, and their float64 references."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import formulas, writer


def unpack_np(packed: torch.Tensor) -> torch.Tensor:
    """Test-side unpack of the documented packing (inverse of writer.pack_int4_np)."""
    p = packed.to(torch.int16) & 0xFF
    lo, hi = p & 0xF, p >> 4
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    out = torch.empty(p.shape[0] * 2, p.shape[1], dtype=torch.int16)
    out[0::2], out[1::2] = lo, hi
    return out


def layer_checkpoint(directory: Path, H=64, Q=32, D=32, I=32, E=4, T=5) -> dict:
    """DeepSeek-native names: attn.wq_a + attn.wkv W8A8_DYNAMIC, attn.wo_a W8A8 static with the int64
    deq_scale form, attn.wo_b FLOAT, 4 routed experts W4A8_DYNAMIC. Returns the reference data."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    wq_a, wkv = writer.w8a8_dynamic(rnd(Q, H)), writer.w8a8_dynamic(rnd(D, H))
    wo_a = writer.w8a8_static(rnd(D, H), rnd(D), calib=x.float(), deq_int64=True)
    modules = {
        "layers.0.attn.wq_a": ("W8A8_DYNAMIC", wq_a),
        "layers.0.attn.wkv": ("W8A8_DYNAMIC", wkv),
        "layers.0.attn.wo_a": ("W8A8", wo_a),
    }
    experts = []
    for e in range(E):
        w1, w3, w2 = (
            writer.w4a8_dynamic(rnd(I, H) * 40, "gate"),
            writer.w4a8_dynamic(rnd(I, H) * 40, "up"),
            writer.w4a8_dynamic(rnd(H, I) * 40, "down"),
        )
        for n, t in (("w1", w1), ("w3", w3), ("w2", w2)):
            modules[f"layers.0.ffn.experts.{e}.{n}"] = ("W4A8_DYNAMIC", t)
        experts.append((w1["_int"], w1["weight_scale"], w3["_int"], w3["weight_scale"], w2["_int"], w2["weight_scale"]))
    floats = {
        "layers.0.attn.wo_b.weight": rnd(H, Q).to(torch.bfloat16),
        "hc_head_fn": rnd(4, 4 * H),
        "layers.0.attn_norm.weight": torch.ones(H),
    }
    writer.write(directory, modules, floats)
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": H,
                "intermediate_size": 2 * H,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "num_hidden_layers": 1,
                "vocab_size": 128,
                "max_position_embeddings": 256,
                "rms_norm_eps": 1e-6,
                "torch_dtype": "bfloat16",
            }
        )
    )
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    tw = torch.rand(T, 2, generator=g)
    deq = torch.from_numpy(wo_a["deq_scale"].numpy().astype("uint32").view("float32"))
    return {
        "H": H,
        "Q": Q,
        "D": D,
        "I": I,
        "E": E,
        "x": x,
        "topk_ids": ids,
        "topk_weights": tw,
        "fused_wqa_wkv": torch.cat(
            [
                formulas.linear_dynamic(x, wq_a["weight"], wq_a["weight_scale"]),
                formulas.linear_dynamic(x, wkv["weight"], wkv["weight_scale"]),
            ],
            1,
        ).float(),
        "wo_a": formulas.linear_static(
            x, wo_a["weight"], wo_a["input_scale"], wo_a["input_offset"], wo_a["quant_bias"], deq
        ).float(),
        "moe": formulas.moe(x, tw, ids, experts, 10.0).float(),
        "experts": experts,
    }
