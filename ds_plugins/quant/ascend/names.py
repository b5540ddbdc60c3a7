"""DeepSeek-V4 msModelSlim checkpoints keep DeepSeek's own tensor names (`layers.N.attn.wq_a`,
`layers.N.ffn.experts.E.w1`, `embed`, `head`, `hc_head_fn`, `mtp.0.*`); engines name modules
their own way. These rules rename a checkpoint tensor key to the engine's key (renames only:
fusing `wq_a`+`wkv` or `w1`+`w3` into one layer is the engine's packed-module map, applied when a
layer asks for its scheme).

vLLM: what its DeepSeek-V4 loader does to each name (main model: WeightsMapper of
`vllm/models/deepseek_v4/nvidia/model.py`; MTP: `DeepSeekV4MTP.load_weights`); a contract test
compares these rules with vLLM's own mapper.
transformers: its `conversion_mapping["deepseek_v4"]` renames (the float model the tests use).
"""

from __future__ import annotations

import re
from typing import Any

# Layers vLLM builds by fusing checkpoint modules (its DeepSeek-V4 loaders' stacked_params_mapping,
# and the usual HF fusions), for models that do not declare packed_modules_mapping.
VLLM_FUSED = {
    "fused_wqa_wkv": ("wq_a", "wkv"),
    "fused_wkv_wgate": ("wkv", "wgate"),
    "gate_up_proj": ("w1", "w3", "gate_proj", "up_proj"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
}

_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
# Parts of an MTP layer that live beside its transformer block (vLLM `_rewrite_spec_layer_name`).
_MTP_TOP = (
    "embed_tokens",
    "enorm",
    "hnorm",
    "h_proj",
    "e_proj",
    "shared_head",
    "hc_head_fn",
    "hc_head_base",
    "hc_head_scale",
)


def dsv4_to_vllm(key: str, num_hidden_layers: int) -> str:
    """A DeepSeek-V4 checkpoint tensor key -> the vLLM parameter/module path it loads into."""
    m = _MTP.match(key)
    if m:
        i, rest = int(m[1]), m[2]
        rest = {
            "emb.tok_emb.weight": "embed_tokens.weight",
            "head.weight": "shared_head.head.weight",
            "norm.weight": "shared_head.norm.weight",
        }.get(rest, rest)
        layer = f"model.layers.{num_hidden_layers + i}."
        if not rest.startswith(_MTP_TOP):
            layer += "mtp_block."
        return layer + rest.replace(".shared_experts.w2", ".shared_experts.down_proj")
    if key.startswith("layers."):
        key = "model." + key
    elif key == "embed.weight" or key.startswith("embed."):
        key = "model.embed_tokens" + key[len("embed") :]
    elif key == "head.weight" or key.startswith("head."):
        key = "lm_head" + key[len("head") :]
    elif key.startswith(("norm.", "hc_head")):
        key = "model." + key
    key = key.replace(".shared_experts.w2", ".shared_experts.down_proj")
    if key.endswith(".ffn.gate.bias"):
        key = key[: -len("bias")] + "e_score_correction_bias"
    return key


# (pattern, replacement), applied in order, as transformers' DeepSeek-V4 conversion renames them.
_HF_RULES: list[tuple[Any, str]] = [  # the patterns, compiled just below
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.", "embed_tokens."),
    (r"^head\.", "lm_head."),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_HF_RULES = [(re.compile(p), r) for p, r in _HF_RULES]


def dsv4_to_transformers(key: str) -> str:
    """A DeepSeek-V4 checkpoint tensor key -> transformers' DeepseekV4 name ("model." prefix for the
    decoder, as the HF model nests it). Routed experts keep their `experts.E.w1/w2/w3` form: transformers
    stores them fused in one 3-D parameter, which a loader assembles per expert."""
    for pattern, repl in _HF_RULES:
        key = pattern.sub(repl, key)
    if key.startswith("layers."):
        key = "model." + key
    return key
