"""The indexer reference (reference/indexer.py) against transformers' DeepSeek-V4 lightning indexer.

transformers.models.deepseek_v4's `DeepseekV4Indexer` (fp32, eval, stateless: no cache) is built on a
tiny random config with V4's real indexer shape (64 heads x head_dim 128, compression ratio 4,
64 rope dims) and run on random hidden states and q-LoRA inputs. A forward hook on its scorer
(`DeepseekV4IndexerScorer`) captures transformers' own intermediate tensors:
- q: the indexer queries after q_b_proj and the interleaved RoPE on the last 64 dims, [B, S, 64, 128];
- compressed_kv: the indexer keys from its compressor (overlapping windows, RMSNorm, RoPE at the
  block start), [B, T, 128], T = S // 4;
- hidden_states, from which the head weights are w = weights_proj(x) * 64^-0.5 * 128^-0.5
  (the scorer's weights_scaling and softmax_scale, the factors serving engines fold into the
  weights they pass to the kernels).
The reference is then fed exactly these tensors: `mqa_logits` with ks = 0 and ke = (t + 1) // 4 (the
causal rule: query t sees the compressed entries whose 4 tokens are all <= t) must reproduce the
scorer's scores on the visible entries, and `mqa_topk` must select what transformers selects:
the same entries (top min(index_topk, T), best first, -1 where a row sees fewer). Queries
t < 3 see nothing; S = 67 leaves 3 tokens that are not compressed.

What this covers: the score formula sum_h ReLU(q_h . k_j) w_h, the causal visibility of compressed
entries and the top-k selection with -1 padding. What it does not: how q and the keys are made
(projections, compressor, RoPE: other tests), and the serving-time quantisation (FP8 or MXFP4 q/k,
Hadamard rotation), which transformers does not model; test_indexer_logits/topk check the kernels
on quantised inputs against this same reference.

Tolerance: both sides are fp32 and differ only in summation order (64 heads x 128 dims),
so scores agree to (D + H) * 2^-24 = 1.2e-5 of the sum of absolute terms (same bound as the kernel
tests); index sets must be equal (the scores are distinct random values).
"""

from __future__ import annotations

import pytest
import torch

hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers import DeepseekV4Config  # noqa: E402

from ds_plugins.kernels.reference import indexer as ref  # noqa: E402

FP32_TOL = 1.2e-5
RATIO = 4


def make_indexer(index_topk: int, seed: int = 0) -> torch.nn.Module:
    cfg = DeepseekV4Config(
        vocab_size=32,
        num_hidden_layers=1,
        layer_types=["compressed_sparse_attention"],
        hidden_size=64,
        num_attention_heads=2,
        head_dim=512,
        partial_rotary_factor=64 / 512,
        q_lora_rank=32,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=index_topk,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    assert cfg.compress_rates["compressed_sparse_attention"] == RATIO
    indexer = hf.DeepseekV4Indexer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in indexer.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name == "position_bias":
                param.copy_(torch.randn(param.shape, generator=gen))
            else:  # linear [out, in]
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return indexer


@torch.no_grad()
def run_transformers(indexer: torch.nn.Module, batch: int, seq_len: int):
    """transformers' top-k indices and the scorer's inputs and output."""
    captured = {}

    def hook(module, inputs, output):
        captured["q"], captured["keys"], captured["hidden"] = inputs
        captured["scores"] = output

    handle = indexer.scorer.register_forward_hook(hook)
    hidden = torch.randn(batch, seq_len, indexer.kv_proj.in_features)
    q_lora = torch.randn(batch, seq_len, indexer.q_b_proj.in_features)
    positions = torch.arange(seq_len).expand(batch, -1)
    try:
        top_k = indexer(hidden, q_lora, positions, None, 0)
    finally:
        handle.remove()
    weights = indexer.scorer.weights_proj(captured["hidden"]).float()
    weights = weights * indexer.scorer.weights_scaling * indexer.scorer.softmax_scale
    return top_k, captured, weights


@pytest.mark.parametrize("index_topk", [8, 40], ids=["topk8", "topk40-more-than-entries"])
def test_reference_matches_transformers_indexer(index_topk):
    batch, seq_len = 2, 67
    indexer = make_indexer(index_topk)
    top_k, captured, weights = run_transformers(indexer, batch, seq_len)
    q, keys, hf_scores = captured["q"], captured["keys"], captured["scores"]
    entries = keys.shape[1]
    assert entries == seq_len // RATIO and q.shape[2:] == (64, 128)
    assert top_k.shape == (batch, seq_len, min(index_topk, entries))

    ks = torch.zeros(seq_len, dtype=torch.int32)
    ke = ((torch.arange(seq_len) + 1) // RATIO).to(torch.int32)  # causal: entries j < (t + 1) // 4
    for b in range(batch):
        logits = ref.mqa_logits(q[b], keys[b], weights[b], ks, ke)
        bound = ref.mqa_logits(q[b].abs(), keys[b].abs(), weights[b].abs(), ks, ke)
        visible = logits != float("-inf")
        assert torch.equal(visible, torch.arange(entries)[None, :] < ke[:, None])
        err = (logits[visible] - hf_scores[b][visible]).abs()
        assert torch.all(err <= FP32_TOL * bound[visible]), f"batch {b}: max score error {err.max():.3g}"

        ours = ref.mqa_topk(q[b], keys[b], weights[b], ks, ke, topk=top_k.shape[-1])
        theirs = top_k[b].to(torch.int32)
        for t in range(seq_len):
            count = min(int(ke[t]), top_k.shape[-1])
            assert torch.all(ours[t, count:] == -1) and torch.all(theirs[t, count:] == -1), f"row {t}: padding"
            assert set(ours[t, :count].tolist()) == set(theirs[t, :count].tolist()), f"batch {b} row {t}"
            picked = logits[t, ours[t, :count].long()]
            assert torch.all(picked[1:] <= picked[:-1]), f"row {t}: not best first"
