"""The V4 attention references (reference/model.py, reference/attention.py) against transformers.

transformers' DeepSeek-V4 modules (transformers.models.deepseek_v4) are built on tiny random
configs in fp32 eval mode and run on random hidden states; the reference pipeline gets the same
weights (read from the modules) and recomputes everything from the hidden states with its own
code: projections and norms, RoPE, compressor, indexer scores, candidate sets, sparse attention
with the sink, inverse RoPE, grouped output projection.

Configs (both use the real V4 ratios 4 (CSA) and a ratio 16 or 128 (HCA), and YaRN on the
compressed layers with the real parameters: base 160000, factor 16, original 65536, beta 32/1):
- "tiny":   hidden 64, 4 heads x head_dim 64 (rope 16), q_lora 32, 2 output groups of rank 16,
            window 8, CSA ratio 4, HCA ratio 16, indexer 8 heads x 32 (top-3), 45 tokens
            (45 is not a multiple of 4 or 16: the trailing partial blocks must stay uncompressed).
- "v4dims": the real per-head shapes: 64 heads x head_dim 512 (rope 64), 8 output groups,
            window 128, CSA ratio 4, HCA ratio 128, indexer 64 heads x 128 (top-16), with hidden
            256, q_lora 64 and o_lora 32 to stay cheap; 300 tokens (2 HCA blocks, 75 CSA entries,
            a window that slides).

Tolerances: everything is fp32 on both sides and only the order of the reductions differs
(matmul blocking, softmax with or without the sink column, which max is subtracted), so the
results agree to a few fp32 ulps of the O(1..7) values, amplified by at most a few hundred terms
per sum (measured: at most 1.2e-6): ATOL = RTOL = 1e-5 for attention outputs, compressed entries
and indexer scores and RoPE, 1e-6 for the norms and the sink factor, exact equality for index
sets and masks.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from transformers import DeepseekV4Config
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from ds_plugins.kernels.reference import model as ref
from ds_plugins.kernels.reference.attention import sparse_attention

ATOL = 1e-5
RTOL = 1e-5

# Real V4-Flash rope settings (research notes 1.1), used by every config below.
YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=64,
        rope_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        csa_ratio=4,
        hca_ratio=16,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=3,
        seq_len=45,
    ),
    "v4dims": dict(
        hidden_size=256,
        num_attention_heads=64,
        head_dim=512,
        rope_dim=64,
        q_lora_rank=64,
        o_groups=8,
        o_lora_rank=32,
        sliding_window=128,
        csa_ratio=4,
        hca_ratio=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=16,
        seq_len=300,
    ),
}
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


def make_config(shape: str) -> DeepseekV4Config:
    s = SHAPES[shape]
    cfg = DeepseekV4Config(
        vocab_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        hidden_size=s["hidden_size"],
        num_attention_heads=s["num_attention_heads"],
        head_dim=s["head_dim"],
        partial_rotary_factor=s["rope_dim"] / s["head_dim"],
        q_lora_rank=s["q_lora_rank"],
        o_groups=s["o_groups"],
        o_lora_rank=s["o_lora_rank"],
        sliding_window=s["sliding_window"],
        compress_rates={"compressed_sparse_attention": s["csa_ratio"], "heavily_compressed_attention": s["hca_ratio"]},
        index_n_heads=s["index_n_heads"],
        index_head_dim=s["index_head_dim"],
        index_topk=s["index_topk"],
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        rope_parameters=dict(YARN),
    )
    cfg._attn_implementation = "eager"
    return cfg


def ratio_of(cfg: DeepseekV4Config, layer_type: str) -> int:
    return cfg.compress_rates.get(layer_type, 0)


@torch.no_grad()
def make_attention(cfg: DeepseekV4Config, layer_type: str, seed: int = 1) -> torch.nn.Module:
    """transformers' attention layer with every parameter drawn at random (norm weights near 1,
    sinks around 2 so that they visibly take probability mass)."""
    module = hf.DeepseekV4Attention(cfg, LAYER_TYPES.index(layer_type)).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("sinks"):
            p.copy_(2.0 + noise)
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("position_bias"):
            p.copy_(0.5 * noise)
        else:  # projections: unit-variance outputs for unit-variance inputs
            p.copy_(noise / math.sqrt(p.shape[-1]))
    return module


def hidden_states(cfg: DeepseekV4Config, seq_len: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(seq_len, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# transformers side


@torch.no_grad()
def run_transformers(module, cfg, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> dict:
    """One forward of transformers' DeepseekV4Attention on x [T, hidden] (batch 1), with the
    intermediate tensors it computes captured by hooks."""
    if positions is None:
        positions = torch.arange(x.shape[0])
    captured: dict = {}
    hooks = [module.o_a_proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("o", args[0][0]))]
    if module.compressor is not None:

        def grab_compressor(m, args, output):
            captured["compressed_kv"] = output[0][0, 0]
            captured["block_bias"] = None if output[1] is None else output[1][0, 0]

        hooks.append(module.compressor.register_forward_hook(grab_compressor))
    indexer = getattr(module.compressor, "indexer", None)
    if indexer is not None:
        hooks.append(indexer.register_forward_hook(lambda m, a, out: captured.__setitem__("topk", out[0])))
        hooks.append(
            indexer.scorer.register_forward_hook(
                lambda m, a, out: captured.update(scores=out[0], index_q=a[0][0], index_keys=a[1][0])
            )
        )
    rotary = hf.DeepseekV4RotaryEmbedding(cfg)
    batch = x[None]
    pos = positions[None]
    embeddings = {kind: rotary(batch, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=cfg,
        inputs_embeds=batch,
        attention_mask=None,
        past_key_values=cache,
        position_ids=pos,
        layer_idx=module.layer_idx,
    )
    try:
        out, weights = module(
            batch, position_embeddings=embeddings, position_ids=pos, attention_mask=mask, past_key_values=cache
        )
    finally:
        for h in hooks:
            h.remove()
    captured.update(out=out[0], weights=weights[0], mask=mask[0, 0])
    return captured


# ----------------------------------------------------------------------------------------------
# reference side: the same weights, our math


def weights_of(module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def inv_freq_for(cfg, layer_type: str) -> torch.Tensor:
    return ref.layer_inv_freq(
        ratio_of(cfg, layer_type),
        cfg.qk_rope_head_dim,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        factor=YARN["factor"],
        original_max_position=YARN["original_max_position_embeddings"],
        beta_fast=YARN["beta_fast"],
        beta_slow=YARN["beta_slow"],
    )


def indexer_scores(w: dict, cfg, x, qr, positions, inv_freq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lightning-indexer scores [T, N] without the FP4/Hadamard simulation (research notes 2.4):
    sum_h relu(q_h . k_j) * (x weights_proj^T)_h * index_head_dim^-0.5 * index_n_heads^-0.5.
    Also returns the indexer's compressed keys [N, index_head_dim] and rotated queries."""
    p = "compressor.indexer."
    keys = ref.compress_kv(
        x,
        w[p + "kv_proj.weight"],
        w[p + "gate_proj.weight"],
        w[p + "position_bias"],
        w[p + "kv_norm.weight"],
        inv_freq,
        ratio_of(cfg, "compressed_sparse_attention"),
        overlap=True,
        eps=cfg.rms_norm_eps,
    )
    q = (qr @ w[p + "q_b_proj.weight"].t()).view(x.shape[0], cfg.index_n_heads, cfg.index_head_dim)
    q = ref.apply_rope(q, positions, inv_freq)
    head_weight = (x @ w[p + "scorer.weights_proj.weight"].t()) * (cfg.index_head_dim**-0.5 * cfg.index_n_heads**-0.5)
    return (torch.einsum("thd,nd->thn", q, keys).relu() * head_weight[..., None]).sum(dim=1), keys, q


def run_reference(module, cfg, layer_type: str, x: torch.Tensor, positions: torch.Tensor | None = None) -> dict:
    """The whole layer from hidden states x [T, hidden] (positions 0..T-1) with reference code;
    `positions` picks which query rows to compute (default: all)."""
    w = weights_of(module)
    t = x.shape[0]
    all_pos = torch.arange(t)
    positions = all_pos if positions is None else positions
    eps = cfg.rms_norm_eps
    inv_freq = inv_freq_for(cfg, layer_type)
    ratio = ratio_of(cfg, layer_type)

    qr = ref.rms_norm(x @ w["q_a_proj.weight"].t(), w["q_a_norm.weight"], eps)
    q = ref.rms_norm((qr @ w["q_b_proj.weight"].t()).view(t, cfg.num_attention_heads, cfg.head_dim), eps=eps)
    kv = ref.rms_norm(x @ w["kv_proj.weight"].t(), w["kv_norm.weight"], eps)
    result: dict = {}

    compressed = indices = None
    if layer_type != "sliding_attention":
        compressed = ref.compress_kv(
            x,
            w["compressor.kv_proj.weight"],
            w["compressor.gate_proj.weight"],
            w["compressor.position_bias"],
            w["compressor.kv_norm.weight"],
            inv_freq,
            ratio,
            overlap=layer_type == "compressed_sparse_attention",
            eps=eps,
        )
        if layer_type == "heavily_compressed_attention":
            indices = ref.c128_indices(positions, ratio, num_compressed=compressed.shape[0])
        else:
            scores, keys, index_q = indexer_scores(w, cfg, x, qr, all_pos, inv_freq)
            indices = ref.c4_indices(scores[positions], positions, cfg.index_topk, ratio)
            result.update(scores=scores, index_keys=keys, index_q=index_q)
    o = ref.attention_layer(
        q[positions],
        kv,
        positions,
        w["sinks"],
        inv_freq,
        window=cfg.sliding_window,
        compressed_kv=compressed,
        compressed_indices=indices,
    )
    out = ref.grouped_output_projection(o, w["o_a_proj.weight"], w["o_b_proj.weight"], cfg.o_groups)
    result.update(o=o, out=out, compressed_kv=compressed, compressed_indices=indices, q=q, kv=kv, inv_freq=inv_freq)
    return result


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@functools.lru_cache(maxsize=None)
def prefill_run(shape: str, layer_type: str):
    """One prefill of each side per (config, layer type), shared by the tests that only read it
    (keeps the file fast on a busy 2-core machine). Returns cfg, module, x, transformers, reference."""
    cfg = make_config(shape)
    module = make_attention(cfg, layer_type)
    x = hidden_states(cfg, SHAPES[shape]["seq_len"])
    return cfg, module, x, run_transformers(module, cfg, x), run_reference(module, cfg, layer_type, x)


# ----------------------------------------------------------------------------------------------
# Small pieces: norms, RoPE layout, YaRN frequencies


def test_rms_norm_matches_transformers():
    x = torch.randn(5, 3, 64)
    weight = 1 + 0.3 * torch.randn(64)
    norm = hf.DeepseekV4RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight)
        close(ref.rms_norm(x, weight), norm(x), atol=1e-6, rtol=1e-6)
        close(ref.rms_norm(x), hf.DeepseekV4UnweightedRMSNorm(eps=1e-6)(x), atol=1e-6, rtol=1e-6)


def test_rope_is_interleaved_on_the_trailing_slice():
    """Official layout: complex rotation of pairs (x[2i], x[2i+1]) on the LAST rope_dim channels.

    transformers' code does the same (apply_rotary_pos_emb rotates x[..., -rope_dim:] with an
    interleaved rotate_half), although the DeepseekV4Attention docstring says "Partial RoPE on the
    first rope_head_dim of each head": the assertions on the leading channels show the code wins.
    """
    t, h, d, rope_dim = 7, 3, 64, 16
    x = torch.randn(t, h, d)
    positions = torch.tensor([0, 1, 2, 5, 100, 4095, 65535])
    inv_freq = ref.yarn_inv_freq(rope_dim, 160000.0, 16.0, 65536)
    ours = ref.apply_rope(x, positions, inv_freq)

    # independent statement of the math: multiply complex numbers
    angle = positions[:, None, None].float() * inv_freq[None, None, :]
    as_complex = torch.view_as_complex(x[..., -rope_dim:].reshape(t, h, rope_dim // 2, 2).contiguous())
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
    close(ours[..., -rope_dim:], expected)
    assert torch.equal(ours[..., :-rope_dim], x[..., :-rope_dim]), "the leading (NoPE) channels must not move"

    # transformers, fed the same frequencies ([B, H, S, D] layout, cos/sin per pair)
    freqs = positions[None, :, None].float() * inv_freq
    theirs = hf.apply_rotary_pos_emb(x.transpose(0, 1)[None], freqs.cos(), freqs.sin())[0].transpose(0, 1)
    close(ours, theirs)
    assert torch.equal(theirs[..., :-rope_dim], x[..., :-rope_dim]), (
        "transformers rotates the trailing slice (its docstring's 'first rope_head_dim' is wrong)"
    )
    # not the GPT-NeoX pairing (x[i], x[i + rope_dim/2]), which gives a different result
    half = rope_dim // 2
    first, second = x[..., -rope_dim:][..., :half], x[..., -rope_dim:][..., half:]
    cos, sin = angle.cos(), angle.sin()
    neox = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    assert not torch.allclose(ours[..., -rope_dim:], neox, atol=1e-3)

    back = ref.apply_rope(ours, positions, inv_freq, inverse=True)
    close(back, x)


def test_yarn_frequencies_match_official_and_transformers():
    """Compressed layers: YaRN on base 160000 with low/high = 15/25 and no mscale; sliding layers:
    plain base 10000. Checked against transformers on the real V4-Flash rope config."""
    assert ref.yarn_correction_range(64, 160000.0, 65536, 32, 1) == (15, 25)
    freq = ref.layer_inv_freq(4)
    plain = ref.rope_inv_freq(64, 160000.0)
    assert torch.equal(freq[:15], plain[:15]), "pairs below low keep their frequency"
    close(freq[25:], plain[25:] / 16, atol=0, rtol=1e-6)
    assert torch.all((freq[15:25] <= plain[15:25]) & (freq[15:25] >= plain[15:25] / 16))
    assert torch.equal(ref.layer_inv_freq(4), ref.layer_inv_freq(128))

    real = DeepseekV4Config(
        rope_scaling={
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    rotary = hf.DeepseekV4RotaryEmbedding(real)
    close(rotary.compress_inv_freq, ref.layer_inv_freq(4), atol=0, rtol=1e-6)
    close(rotary.main_inv_freq, ref.layer_inv_freq(0), atol=0, rtol=1e-6)
    assert rotary.compress_attention_scaling == 1.0 and rotary.main_attention_scaling == 1.0  # no mscale


def test_transformers_default_config_is_not_v4_flash():
    """Known differences, stated explicitly (configuration_deepseek_v4.py in transformers 5.23):
    DeepseekV4Config() without rope_scaling/rope_parameters gives the compressed layers plain RoPE
    on base 160000 (line 317: rope_type defaults to "default"), while the official model always
    uses YaRN there; and without compress_ratios/layer_types its schedule is HCA, HCA, HCA, CSA, ...
    (lines 269-274, "V4-Pro default") with no sliding-only layer, unlike V4-Flash's 0, 0, 4, 128,
    .... The real config.json carries rope_scaling and compress_ratios, which fix both; a hand-built
    config must pass them, as make_config does."""
    default = DeepseekV4Config()
    rotary = hf.DeepseekV4RotaryEmbedding(default)
    close(rotary.compress_inv_freq, ref.rope_inv_freq(64, 160000.0), atol=0, rtol=1e-6)
    assert not torch.allclose(rotary.compress_inv_freq, ref.layer_inv_freq(4), rtol=1e-3)
    assert default.layer_types[:4] == ["heavily_compressed_attention"] * 3 + ["compressed_sparse_attention"]
    flash = DeepseekV4Config(compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])
    assert flash.layer_types[:4] == [
        "sliding_attention",
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    ]


def test_nested_rope_parameters_without_attention_factor_get_yarn_mscale():
    """Known difference, stated explicitly: transformers forces YaRN's attention_factor to 1.0 (the
    official model has no mscale) only when it builds the nested rope_parameters itself
    (configuration_deepseek_v4.py:318-319). A config that already arrives nested
    ({"main": ..., "compress": {yarn, no attention_factor}}) is kept as is (lines 302-304), and
    transformers then scales cos/sin by 0.1*ln(16)+1 = 1.277 on every compressed layer."""
    nested = {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
        "compress": {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
            "rope_theta": 160000.0,
            "partial_rotary_factor": 0.125,
        },
    }
    rotary = hf.DeepseekV4RotaryEmbedding(DeepseekV4Config(rope_parameters=nested))
    assert rotary.compress_attention_scaling == pytest.approx(0.1 * math.log(16.0) + 1.0)
    flat = hf.DeepseekV4RotaryEmbedding(DeepseekV4Config(rope_parameters=dict(YARN)))
    assert flat.compress_attention_scaling == 1.0
    close(flat.compress_inv_freq, ref.layer_inv_freq(4), atol=0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Candidate sets (pure math)


def test_window_indices_at_sequence_start_and_later():
    idx = ref.window_indices(torch.tensor([0, 2, 6, 7, 20]), window=8)
    assert idx.dtype == torch.int32 and idx.shape == (5, 8)
    assert idx[0].tolist() == [0] + [-1] * 7
    assert idx[1].tolist() == [0, 1, 2] + [-1] * 5
    assert idx[2].tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    assert idx[3].tolist() == list(range(8))
    assert idx[4].tolist() == list(range(13, 21)), "window of 8 = t-7 .. t, the current token included"
    real = ref.window_indices(torch.tensor([126, 127, 1000]))
    assert (real[0] >= 0).sum() == 127 and real[1].tolist() == list(range(128))
    assert real[2].tolist() == list(range(873, 1001))


def test_c128_indices_are_complete_blocks():
    positions = torch.tensor([0, 126, 127, 254, 255, 300])
    idx = ref.c128_indices(positions, ratio=128, num_compressed=3)
    assert idx.tolist() == [[-1, -1, -1], [-1, -1, -1], [0, -1, -1], [0, -1, -1], [0, 1, -1], [0, 1, -1]]
    assert ref.c128_indices(positions, ratio=128).shape == (6, 2)  # default: what the last position completes


def test_c4_indices_top_k_of_visible_entries():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4, 1)
    scores[3] = torch.tensor([0.0, 9.0, 1.0, 8.0, 2.0, 7.0])
    positions = torch.tensor([2, 3, 11, 23])  # visible counts 0, 1, 3, 6
    idx = ref.c4_indices(scores, positions, topk=4, ratio=4)
    assert idx.tolist() == [[-1, -1, -1, -1], [0, -1, -1, -1], [0, 1, 2, -1], [1, 3, 5, 4]]
    # future entries never win, even with the highest score
    future = ref.c4_indices(torch.tensor([[0.0, 100.0, 50.0]]), torch.tensor([4]), topk=2)
    assert future.tolist() == [[0, -1]]
    # top-k wider than the number of entries: padded with -1
    wide = ref.c4_indices(torch.tensor([[1.0, 2.0]]), torch.tensor([7]), topk=5)
    assert wide.tolist() == [[1, 0, -1, -1, -1]]


def test_union_indices_pack_valid_first_with_offset():
    window = torch.tensor([[0, -1, -1], [0, 1, 2]], dtype=torch.int32)
    compressed = torch.tensor([[-1, -1], [1, 0]], dtype=torch.int32)
    idx, lengths = ref.union_indices(window, compressed, compressed_offset=10)
    assert idx.tolist() == [[0, -1, -1, -1, -1], [0, 1, 2, 11, 10]]
    assert lengths.tolist() == [1, 5]
    # both conventions give the same attention: -1 skipping, and topk_length
    q, kv = torch.randn(2, 3, 16), torch.randn(12, 16)
    sink = torch.randn(3)
    with_len = sparse_attention(q, kv, idx, 0.25, d_v=16, attn_sink=sink, topk_length=lengths)
    without = sparse_attention(q, kv, idx, 0.25, d_v=16, attn_sink=sink)
    for a, b in zip(with_len, without):
        close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Compressor


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer_type", ["compressed_sparse_attention", "heavily_compressed_attention"])
def test_compressor_matches_transformers(shape, layer_type):
    """Compressed entries of the attention compressor (ratio 4 overlapping; HCA ratio 16/128
    non-overlapping) and, for CSA, of the indexer's own compressor (index_head_dim, overlapping):
    per-channel softmax with the position bias, RMSNorm, YaRN RoPE at the block start."""
    cfg, module, x, theirs, ours = prefill_run(shape, layer_type)
    n_blocks = x.shape[0] // ratio_of(cfg, layer_type)
    assert ours["compressed_kv"].shape == theirs["compressed_kv"].shape == (n_blocks, cfg.head_dim)
    close(ours["compressed_kv"], theirs["compressed_kv"])
    if layer_type == "compressed_sparse_attention":
        assert ours["index_keys"].shape == (n_blocks, cfg.index_head_dim)
        close(ours["index_keys"], theirs["index_keys"])
        close(ours["index_q"], theirs["index_q"])
        close(ours["scores"], theirs["scores"])


def test_overlap_compressor_first_block_uses_only_its_own_half():
    """Entry 0 of the overlapping compressor has no previous block: it must equal a
    non-overlapping compression of block 0 restricted to the second channel half. A sequence
    shorter than one block has no entry yet."""
    d, ratio, hidden = 8, 4, 16
    x = torch.randn(12, hidden)
    wkv, wgate = torch.randn(2 * d, hidden), torch.randn(2 * d, hidden)
    ape, norm_w = torch.randn(ratio, 2 * d), torch.rand(d) + 0.5
    inv_freq = ref.rope_inv_freq(4, 10000.0)
    over = ref.compress_kv(x, wkv, wgate, ape, norm_w, inv_freq, ratio, overlap=True)
    own_half = ref.compress_kv(x[:ratio], wkv[d:], wgate[d:], ape[:, d:], norm_w, inv_freq, ratio, overlap=False)
    assert over.shape == (3, d)
    close(over[0], own_half[0], atol=1e-6, rtol=1e-6)
    # fewer tokens than one block: nothing to compress yet, for both kinds
    assert ref.compress_kv(x[:3], wkv, wgate, ape, norm_w, inv_freq, ratio, overlap=True).shape == (0, d)
    assert ref.compress_kv(x[:3], wkv[d:], wgate[d:], ape[:, d:], norm_w, inv_freq, ratio, overlap=False).shape == (
        0,
        d,
    )


# ----------------------------------------------------------------------------------------------
# Whole attention layer


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_attention_layer_matches_transformers(shape, layer_type):
    """Sliding (window + sink), HCA (window + every complete 16/128-block) and CSA (window +
    indexer top-k): the de-rotated attention output before wo_a and the layer output."""
    cfg, module, x, theirs, ours = prefill_run(shape, layer_type)
    close(ours["o"].reshape(theirs["o"].shape), theirs["o"])
    close(ours["out"], theirs["out"])
    if layer_type == "compressed_sparse_attention":
        # the selection: our c4_indices on transformers' own scores gives transformers' top-k
        # exactly, and on our recomputed scores the same sets
        t = x.shape[0]
        on_their_scores = ref.c4_indices(theirs["scores"], torch.arange(t), cfg.index_topk, ratio_of(cfg, layer_type))
        assert torch.equal(on_their_scores.long(), theirs["topk"])
        assert torch.equal(ours["compressed_indices"].sort(dim=-1).values, theirs["topk"].sort(dim=-1).values.int())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_transformers_mask_equals_candidate_sets(shape, layer_type):
    """transformers' additive mask (sliding-window causal mask + the compressor's block bias) lets
    query t see exactly our candidate set: raw tokens t-W+1..t (current included), and compressed
    entry j iff j < (t+1)//ratio (HCA) or j is among the indexer's picks (CSA). Its attention
    weights are non-zero exactly there."""
    cfg, module, x, theirs, ours = prefill_run(shape, layer_type)
    t = x.shape[0]
    n = 0 if ours["compressed_kv"] is None else ours["compressed_kv"].shape[0]
    allowed_theirs = theirs["mask"] > torch.finfo(torch.float32).min / 2
    if n:
        allowed_theirs = torch.cat((allowed_theirs, theirs["block_bias"] == 0), dim=-1)
    idx, _ = ref.union_indices(
        ref.window_indices(torch.arange(t), cfg.sliding_window), ours["compressed_indices"], compressed_offset=t
    )
    allowed_ours = torch.zeros(t, t + n + 1, dtype=torch.bool)
    allowed_ours.scatter_(1, torch.where(idx >= 0, idx.long(), t + n), True)
    allowed_ours = allowed_ours[:, :-1]
    assert torch.equal(allowed_theirs, allowed_ours)
    assert torch.equal(theirs["weights"].ne(0).any(dim=0), allowed_ours)
    if layer_type == "heavily_compressed_attention":
        visible = (torch.arange(t)[:, None] + 1) // ratio_of(cfg, layer_type) > torch.arange(n)[None, :]
        assert torch.equal(allowed_theirs[:, t:], visible)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_sink_enters_the_denominator_only(layer_type):
    """transformers' attention probabilities (sink column dropped) sum to exp(lse)/(exp(lse)+exp(sink))
    per query and head, with lse over the candidates only; in the reference the sink scales the
    output by the same factor and leaves lse and max_logits unchanged."""
    cfg, module, x, theirs, ours = prefill_run("tiny", layer_type)
    t = x.shape[0]
    sink = module.sinks.detach()
    q = ref.apply_rope(ours["q"], torch.arange(t), ours["inv_freq"])
    kv = ref.apply_rope(ours["kv"], torch.arange(t), ours["inv_freq"])
    buffer = kv if ours["compressed_kv"] is None else torch.cat((kv, ours["compressed_kv"]))
    idx, lengths = ref.union_indices(
        ref.window_indices(torch.arange(t), cfg.sliding_window), ours["compressed_indices"], compressed_offset=t
    )
    scale = cfg.head_dim**-0.5
    out_s, max_s, lse_s = sparse_attention(q, buffer, idx, scale, d_v=cfg.head_dim, attn_sink=sink, topk_length=lengths)
    out_n, max_n, lse_n = sparse_attention(q, buffer, idx, scale, d_v=cfg.head_dim, topk_length=lengths)
    assert torch.equal(lse_s, lse_n) and torch.equal(max_s, max_n)
    kept = torch.sigmoid(lse_n - sink[None, :])  # [T, H]
    close(out_s, out_n * kept[..., None], atol=1e-6, rtol=1e-6)
    close(theirs["weights"].sum(dim=-1).transpose(0, 1), kept)
    assert kept.max() < 0.999 and kept.min() > 0.001, "the sinks must matter in this test"


DECODE_STEPS = {  # call boundaries: a prefill ending inside a block, single tokens, a multi-token chunk
    "tiny": [0, 21, 22, 23, 24, 30, 31, 32, 45],  # ratio 16 block completes at 31, ratio 4 at 23, 27, ...
    "v4dims": [0, 254, 255, 256, 300],  # token 255 completes HCA block 1 (tokens 128..255) and a CSA block
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_cached_decode_matches_reference(shape, layer_type):
    """transformers with its DynamicCache (prefill, then single tokens and one multi-token chunk):
    every step equals the reference run on the tokens seen so far, for the new query positions only
    (attention_layer with fewer queries than kv rows), and that equals the full-sequence reference
    (nothing leaks from the future). This checks the decode-time candidate sets: window ring of W
    tokens, compressed entries emitted once their block is complete, the overlap state carried
    across calls."""
    cfg, module, x, _, full = prefill_run(shape, layer_type)
    cache = DynamicCache(config=cfg)
    bounds = DECODE_STEPS[shape]
    assert bounds[-1] == x.shape[0]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        theirs = run_transformers(module, cfg, x[start:stop], torch.arange(start, stop), cache=cache)
        ours = run_reference(module, cfg, layer_type, x[:stop], positions=torch.arange(start, stop))
        close(ours["out"], theirs["out"])
        close(ours["out"], full["out"][start:stop])


def fp8_block_qat(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The official FP8 quantise-dequantise of kv's NoPE channels (research notes 2.8): per block of
    64, scale 2^ceil(log2(amax/448)) (ue8m0), values rounded to e4m3."""
    blocks = x.unflatten(-1, (-1, block))
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4) / 448.0)))
    return ((blocks / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).flatten(-2)


def test_transformers_applies_no_fp8_qat():
    """Known difference, stated explicitly: the official model rounds kv's 448 NoPE channels to FP8
    (block 64, ue8m0) before attention, transformers does not (modeling_deepseek_v4.py:832-833:
    kv_norm then RoPE only; likewise no FP8 on compressed entries and no Hadamard/FP4 in the
    indexer). The reference follows transformers here on purpose (module docstring); this test
    shows the comparison is sensitive enough that QAT would not go unnoticed."""
    cfg, module, x, theirs, ours = prefill_run("v4dims", "sliding_attention")
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    kv_qat = torch.cat((fp8_block_qat(ours["kv"][:, :nope]), ours["kv"][:, nope:]), dim=-1)
    o_qat = ref.attention_layer(
        ours["q"], kv_qat, torch.arange(x.shape[0]), module.sinks.detach(), ours["inv_freq"], window=cfg.sliding_window
    )
    close(ours["o"].reshape(theirs["o"].shape), theirs["o"])
    assert (o_qat.reshape(theirs["o"].shape) - theirs["o"]).abs().max() > 100 * ATOL
