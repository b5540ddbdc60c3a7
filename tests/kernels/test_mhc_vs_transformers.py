"""The mHC reference (and the prenorm GEMM kernel inside it) against transformers' DeepSeek-V4 modules.

A tiny DeepseekV4Config (hidden 128, hc_mult 4, 20 Sinkhorn iterations) with random parameters.
Parameter mapping, ours <- transformers (no transposes needed):
- DeepseekV4HyperConnection.fn [(2+n)n, n*D]  -> fn   (F.linear(x, fn) = x @ fn^T, the GEMM's b)
- .base [(2+n)n] -> base; .scale [3] -> scale (pre, post, comb); config.hc_eps -> hc_eps,
  config.rms_norm_eps -> rms_eps, config.hc_sinkhorn_iters -> sinkhorn_iters
- mixes are laid out [pre n | post n | comb n*n], comb row-major: comb[j, k] = mixes[2n + n*j + k]
- its forward returns (post, comb, collapsed); ref_hc_pre returns (y = collapsed, post, comb)
- [B, S, n, D] streams are flattened to our [T = B*S, n, D]
- DeepseekV4HyperHead.hc_fn [n, n*D], .hc_base [n], .hc_scale [1] -> ref_hc_head's fn, base, scale
Convention differences bridged (numerically, not structurally):
- transformers RMS-normalises x before the projection, (x * rsqrt(mean x^2 + eps)) @ fn^T; we (and
  DeepGEMM's callers) project first and scale after: (x @ fn^T) * rsqrt(sum x^2 / K + eps).
  Equal in exact arithmetic; in fp32 they differ by rounding only.
- the post-mix (DeepseekV4DecoderLayer.forward) casts post and comb to the streams' dtype (bf16)
  and mixes in bf16; ref_hc_post mixes in fp32 and rounds once. Both use comb transposed:
  X'_k = post_k F + sum_j comb[j, k] X_j.

Tolerances, stated once:
- post, comb (fp32): the mixes differ only by fp32 rounding (~1e-7 relative) through smooth,
  contracting maps (sigmoid, softmax, Sinkhorn): absolute 1e-5.
- collapsed y (bf16): one rounding of nearly equal fp32 sums can land one bf16 ulp apart: 2^-7 relative.
- columns of comb sum to 1 - O(hc_eps): absolute 1e-5.
- post-mix (bf16): transformers rounds post, comb, the matmul and the sum to bf16 (4 roundings of
  at most 2^-8 relative each) where we round once: 2^-6 of M = |post||F| + sum_j |comb[j,k]||X_j|.
"""

import pytest
import torch
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4DecoderLayer,
    DeepseekV4HyperConnection,
    DeepseekV4HyperHead,
)

from ds_plugins.kernels._runtime import use_triton
from ds_plugins.kernels.mhc import tf32_hc_prenorm_gemm
from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm, ref_hc_head, ref_hc_post, ref_hc_pre

HIDDEN, HC_MULT, ITERS = 128, 4, 20
BATCH, SEQ = 2, 3
MIX_ATOL, Y_REL, COLSUM_ATOL, POST_MIX_REL = 1e-5, 2.0**-7, 1e-5, 2.0**-6

# the GEMM inside our mHC step: the PyTorch reference, or the Triton kernel (interpreter on CPU)
GEMMS = [
    pytest.param(hc_prenorm_gemm, None, id="reference"),
    pytest.param(tf32_hc_prenorm_gemm, None, id="triton"),
    pytest.param(tf32_hc_prenorm_gemm, 3, id="triton-splitk3"),
]


@pytest.fixture(scope="module")
def config():
    return DeepseekV4Config(
        hidden_size=HIDDEN,
        hc_mult=HC_MULT,
        hc_sinkhorn_iters=ITERS,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=4,
        vocab_size=64,
    )


def _randomise_hc(module, fn_name, base_name, scale_name, gen):
    """fn sized so the normalised mixes are O(1) (a non-trivial Sinkhorn); base, scale O(1)."""
    fn, base, scale = (getattr(module, n) for n in (fn_name, base_name, scale_name))
    with torch.no_grad():
        fn.copy_(torch.randn(fn.shape, generator=gen) * 1.5 / fn.shape[1] ** 0.5)
        base.copy_(torch.randn(base.shape, generator=gen))
        scale.copy_(torch.rand(scale.shape, generator=gen) * 1.5 + 0.5)
    return fn.detach(), scale.detach(), base.detach()


def _streams(gen):
    return (torch.randn(BATCH, SEQ, HC_MULT, HIDDEN, generator=gen) * 3).bfloat16()


def _check_gemm_is_exercised(gemm):
    if gemm is tf32_hc_prenorm_gemm:
        assert use_triton(torch.empty(1))  # CPU under TRITON_INTERPRET=1: the Triton kernel, not the fallback


@pytest.mark.parametrize("gemm,num_splits", GEMMS)
def test_hc_pre_matches_transformers_hyper_connection(config, gemm, num_splits):
    _check_gemm_is_exercised(gemm)
    gen = torch.Generator().manual_seed(10)
    module = DeepseekV4HyperConnection(config)
    fn, scale, base = _randomise_hc(module, "fn", "base", "scale", gen)
    streams = _streams(gen)
    with torch.no_grad():
        post_tf, comb_tf, collapsed_tf = module(streams)

    y, post, comb = ref_hc_pre(
        streams.flatten(0, 1),
        fn,
        scale,
        base,
        config.hc_eps,
        config.hc_sinkhorn_iters,
        config.rms_norm_eps,
        num_splits=num_splits,
        prenorm_gemm=gemm,
    )
    torch.testing.assert_close(post, post_tf.flatten(0, 1), rtol=0, atol=MIX_ATOL)
    torch.testing.assert_close(comb, comb_tf.flatten(0, 1), rtol=0, atol=MIX_ATOL)
    torch.testing.assert_close(y.float(), collapsed_tf.flatten(0, 1).float(), rtol=Y_REL, atol=0)
    assert y.dtype == collapsed_tf.dtype == torch.bfloat16
    # manifold constraint: columns sum to 1 (Sinkhorn ends on a column normalisation; rows are only
    # approximately normalised after 20 iterations, so they are not asserted)
    torch.testing.assert_close(comb.sum(-2), torch.ones(BATCH * SEQ, HC_MULT), rtol=0, atol=COLSUM_ATOL)
    # the comb is not symmetric, so a transposed mapping could not pass the checks above by accident
    assert (comb - comb.transpose(-1, -2)).abs().max() > 1e-2


@pytest.mark.parametrize("gemm,num_splits", GEMMS)
def test_hc_head_matches_transformers_hyper_head(config, gemm, num_splits):
    _check_gemm_is_exercised(gemm)
    gen = torch.Generator().manual_seed(11)
    module = DeepseekV4HyperHead(config)
    fn, scale, base = _randomise_hc(module, "hc_fn", "hc_base", "hc_scale", gen)
    streams = _streams(gen)
    with torch.no_grad():
        out_tf = module(streams)
    out = ref_hc_head(
        streams.flatten(0, 1),
        fn,
        scale,
        base,
        config.hc_eps,
        config.rms_norm_eps,
        num_splits=num_splits,
        prenorm_gemm=gemm,
    )
    assert out.dtype == out_tf.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_tf.flatten(0, 1).float(), rtol=Y_REL, atol=0)


class _FixedOutput(torch.nn.Module):
    """Stands in for attention or the MoE: returns a fixed sublayer output F, whatever its input."""

    def __init__(self, output, returns_tuple):
        super().__init__()
        self.output, self.returns_tuple = output, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (self.output, None) if self.returns_tuple else self.output


class _IdentityHyperConnection(torch.nn.Module):
    """post = 0, comb = I: the second HC site of the layer then passes its streams through unchanged."""

    def forward(self, streams):
        shape = streams.shape[:-1]
        eye = torch.eye(shape[-1]).expand(*shape, shape[-1])
        return torch.zeros(shape), eye, streams[..., 0, :]


def test_hc_post_matches_transformers_decoder_layer(config):
    """DeepseekV4DecoderLayer with attention returning a fixed F, the real attn_hc, and the ffn site made
    an exact pass-through: its output is transformers' post-mix X' = post F + comb^T X of the first site."""
    gen = torch.Generator().manual_seed(12)
    layer = DeepseekV4DecoderLayer(config, layer_idx=0)
    fn, scale, base = _randomise_hc(layer.attn_hc, "fn", "base", "scale", gen)
    streams = _streams(gen)
    f = (torch.randn(BATCH, SEQ, HIDDEN, generator=gen) * 2).bfloat16()
    layer.self_attn = _FixedOutput(f, returns_tuple=True)
    layer.mlp = _FixedOutput(torch.zeros_like(f), returns_tuple=False)
    layer.ffn_hc = _IdentityHyperConnection()
    with torch.no_grad():
        out_tf = layer(streams)

    x = streams.flatten(0, 1)
    _, post, comb = ref_hc_pre(x, fn, scale, base, config.hc_eps, config.hc_sinkhorn_iters, config.rms_norm_eps)
    out = ref_hc_post(f.flatten(0, 1), x, post, comb)
    assert out.dtype == out_tf.dtype == torch.bfloat16
    magnitude = post[..., None] * f.flatten(0, 1).float().abs()[:, None, :] + torch.einsum(
        "tjk,tjd->tkd", comb, x.float().abs()
    )
    err = (out.float() - out_tf.flatten(0, 1).float()).abs()
    assert (err <= POST_MIX_REL * magnitude).all(), (err / magnitude).max()
    # the transpose matters: mixing with comb instead of comb^T is far outside the tolerance
    wrong = ref_hc_post(f.flatten(0, 1), x, post, comb.transpose(-1, -2))
    assert ((wrong.float() - out_tf.flatten(0, 1).float()).abs() > POST_MIX_REL * magnitude).any()
