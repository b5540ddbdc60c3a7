"""DeepSeek-V4 attention-layer math around the sparse attention core, from the model's equations.

Plain fp32 PyTorch, one readable function per step, used as the oracle for the kernels and
checked against transformers' DeepSeek-V4 modules (tests/kernels/test_reference_vs_transformers.py).
Sources: research notes sections 2.2 (attention), 2.3 (compressor), 2.8 (QAT) and 6 (gotchas),
which follow the official inference `model.py`.

What one attention layer computes for query token t (positions count from 0 in the sequence):

    q   = RoPE(rms(q_b(rms_w(q_a(x)))), t)        per-head RMS without weight, [T, H, D]
    kv  = RoPE(rms_w(wkv(x)), t)                   one latent, key and value, [T, D]
    C   = compressor(x)                            compressed entries, ratio 4 or 128 layers
    S_t = window(t) U compressed candidates(t)
    o   = sparse_attention(q, [kv | C], S_t, sink)
    o   = RoPE^-1(o, t)                            de-rotate the rope slice of the output
    out = wo_b(grouped wo_a(o))

Layout facts (official model, and transformers agrees in code):
- RoPE rotates the LAST `rope_dim` channels of a head (D = nope | rope), and pairs are
  interleaved: (x[2i], x[2i+1]) is multiplied by exp(i * pos * f_i) as one complex number.
  This is not the GPT-NeoX "rotate_half" pairing (x[i], x[i + rope_dim/2]).
- Sliding-only layers (ratio 0) use base 10000 without YaRN; compressed layers (ratio 4/128)
  use base 160000 with YaRN (factor 16, original length 65536, beta 32/1, no mscale) for the
  attention, the compressor and the indexer alike.
- Compressed entry i of a ratio-R layer sits at position i*R (the block start) for RoPE, and
  query t may see it iff i < (t+1)//R (its block is complete).

Deliberately left out: the FP8 (block 64, ue8m0) quantise-dequantise of the 448 NoPE channels
of kv and of the compressed entries, and the Hadamard + FP4 simulation of the indexer keys and
queries (notes 2.8). transformers does not apply them either, so the cross-check compares like
with like; the kernels' own tests cover the FP8 cache format.
"""

from __future__ import annotations

import math

import torch

from ds_plugins.kernels.reference.attention import sparse_attention

# Real-model constants (notes section 1); the functions take them as arguments so tiny test
# configs can use other values.
WINDOW = 128
ROPE_DIM = 64
ROPE_THETA = 10000.0
COMPRESS_ROPE_THETA = 160000.0
YARN_FACTOR = 16.0
YARN_ORIGINAL_MAX_POSITION = 65536
YARN_BETA_FAST = 32
YARN_BETA_SLOW = 1


# ----------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps), times `weight` if given. fp32 result.

    V4 uses the weighted form for q_norm, kv_norm and the compressor norms, and the unweighted
    form per query head (over all 512 dims) after wq_b.
    """
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


# ----------------------------------------------------------------------------------------------
# Rotary embedding


def rope_inv_freq(rope_dim: int, base: float) -> torch.Tensor:
    """Plain RoPE frequencies f_i = base^(-2i/rope_dim), i = 0 .. rope_dim/2 - 1 (fp32)."""
    return 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))


def yarn_correction_range(
    rope_dim: int,
    base: float,
    original_max_position: int,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
) -> tuple[int, int]:
    """The pair indices (low, high) between which YaRN ramps from interpolated to original frequencies.

    The pair whose wavelength makes `n` full turns over the original context sits at
    rope_dim * ln(L / (2 pi n)) / (2 ln base); low uses n = beta_fast (rounded down), high
    n = beta_slow (rounded up), clamped to [0, rope_dim - 1]. Base 160000, rope_dim 64,
    L = 65536 gives (15, 25).
    """

    def pair_index(turns: float) -> float:
        return rope_dim * math.log(original_max_position / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(pair_index(beta_fast))
    high = math.ceil(pair_index(beta_slow))
    return max(low, 0), min(high, rope_dim - 1)


def yarn_inv_freq(
    rope_dim: int,
    base: float,
    factor: float,
    original_max_position: int,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
) -> torch.Tensor:
    """YaRN frequencies: pairs below `low` keep f_i (high frequency, extrapolated), pairs above
    `high` use f_i / factor (interpolated), with a linear blend in between. No mscale: V4 does
    not scale cos/sin."""
    freq = rope_inv_freq(rope_dim, base)
    low, high = yarn_correction_range(rope_dim, base, original_max_position, beta_fast, beta_slow)
    span = max(high - low, 1e-3)  # guards low == high
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / span).clamp(0.0, 1.0)
    keep = 1.0 - ramp  # weight of the original frequency
    return freq * keep + (freq / factor) * (1.0 - keep)


def layer_inv_freq(
    compress_ratio: int,
    rope_dim: int = ROPE_DIM,
    *,
    rope_theta: float = ROPE_THETA,
    compress_rope_theta: float = COMPRESS_ROPE_THETA,
    factor: float = YARN_FACTOR,
    original_max_position: int = YARN_ORIGINAL_MAX_POSITION,
    beta_fast: float = YARN_BETA_FAST,
    beta_slow: float = YARN_BETA_SLOW,
) -> torch.Tensor:
    """The frequencies one layer uses for q, kv, its compressor and its indexer.

    Sliding-only layers (compress_ratio 0): plain RoPE, base 10000. Compressed layers: YaRN on
    base 160000.
    """
    if compress_ratio == 0:
        return rope_inv_freq(rope_dim, rope_theta)
    return yarn_inv_freq(rope_dim, compress_rope_theta, factor, original_max_position, beta_fast, beta_slow)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*len(inv_freq) channels of x [T, ..., D] at positions [T] (fp32 result).

    Interleaved pairs: (x[2i], x[2i+1]) -> (a cos - b sin, a sin + b cos) with angle
    pos * inv_freq[i], counted within the rope slice. `inverse` rotates by -angle, which is how
    V4 removes the query-position rotation from the attention output's rope slice.
    """
    rope_dim = 2 * inv_freq.numel()
    x = x.float()
    angle = positions.to(torch.float32)[:, None] * inv_freq.float().to(x.device)[None, :]  # [T, rope_dim/2]
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 2)), angle.shape[1])  # broadcast over heads
    cos, sin = torch.cos(angle), torch.sin(angle)
    if inverse:
        sin = -sin
    pairs = x[..., x.shape[-1] - rope_dim :].unflatten(-1, (rope_dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., : x.shape[-1] - rope_dim], rotated), dim=-1)


# ----------------------------------------------------------------------------------------------
# Candidate sets. Indices address rows of one sequence's buffers; -1 marks "no candidate".


def window_indices(positions: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Raw-token candidates of the sliding window: [T, window] int32.

    Row t lists max(0, t-window+1) .. t in ascending order (the current token included), padded
    with -1 at the end while t < window-1 (sequence start). Row index = position in the sequence.
    """
    pos = positions.long()[:, None]
    first = (pos - window + 1).clamp(min=0)
    idx = first + torch.arange(window, device=positions.device)[None, :]
    return torch.where(idx <= pos, idx, -1).to(torch.int32)


def c128_indices(positions: torch.Tensor, ratio: int = 128, num_compressed: int | None = None) -> torch.Tensor:
    """Compressed candidates of a heavily compressed (HCA) layer: every complete block.

    [T, num_compressed] int32; row t holds j for j < (t+1)//ratio, then -1. num_compressed is the
    number of compressed entries in the buffer (default: as many as the last position completes).
    """
    if num_compressed is None:
        num_compressed = (int(positions.max()) + 1) // ratio if positions.numel() else 0
    visible = ((positions.long() + 1) // ratio)[:, None]
    j = torch.arange(num_compressed, device=positions.device)[None, :]
    return torch.where(j < visible, j, -1).to(torch.int32)


def c4_indices(scores: torch.Tensor, positions: torch.Tensor, topk: int, ratio: int = 4) -> torch.Tensor:
    """Compressed candidates of a CSA layer: the indexer's top-k among visible entries.

    scores [T, N] (indexer score of query t for compressed entry j) -> [T, topk] int32 in
    descending score order. Entry j is visible to t iff j < (t+1)//ratio; a row with fewer than
    topk visible entries is padded with -1.
    """
    n = scores.shape[-1]
    visible_count = ((positions.long() + 1) // ratio)[:, None]
    j = torch.arange(n, device=scores.device)[None, :]
    masked = scores.float().masked_fill(j >= visible_count, float("-inf"))
    k = min(topk, n)
    picked = masked.topk(k, dim=-1).indices
    picked = torch.where(picked < visible_count, picked, -1)
    if k < topk:
        picked = torch.cat((picked, picked.new_full((picked.shape[0], topk - k), -1)), dim=-1)
    return picked.to(torch.int32)


def union_indices(
    window_idx: torch.Tensor, compressed_idx: torch.Tensor | None, compressed_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One index list per query over the concatenated buffer [raw tokens | compressed entries].

    Compressed index j becomes compressed_offset + j (compressed_offset = number of raw rows),
    so a single sparse attention covers both parts with one softmax. Valid entries are packed to
    the front, window part first, and the rest is -1, so the result serves both kernel
    conventions: -1 skipping, and `topk_length` (the second return value, int32 [T]).
    (vLLM's prefill puts the compressed part first in buffer and list; softmax is order-free.)
    """
    parts = [window_idx.long()]
    if compressed_idx is not None:
        c = compressed_idx.long()
        parts.append(torch.where(c >= 0, c + compressed_offset, -1))
    idx = torch.cat(parts, dim=-1)
    invalid = idx < 0
    order = torch.sort(invalid.to(torch.int8), dim=-1, stable=True).indices
    packed = idx.gather(-1, order)
    return packed.to(torch.int32), (~invalid).sum(dim=-1).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Compressor


def compress_kv(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    ratio: int,
    overlap: bool | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Compressed KV entries of one sequence whose tokens sit at positions 0..T-1: [T//ratio, d].

    x [T, hidden]; wkv, wgate [c*d, hidden] with c = 2 if overlap else 1; ape [ratio, c*d];
    norm_weight [d]. Tokens past the last complete block are not compressed (yet).

    Per token: kv = x wkv^T, g = x wgate^T + ape[pos mod ratio]. Each entry is a per-channel
    softmax over its rows of g, weighting the same rows of kv:
    - non-overlapping (ratio 128): rows = the ratio tokens of block i, all d channels;
    - overlapping (ratio 4): 2*ratio rows = block i-1 with channels [0, d) followed by block i
      with channels [d, 2d); block -1 contributes nothing (kv 0, g -inf).
    Then RMSNorm(norm_weight) and RoPE on the last rope channels at position i*ratio (the block
    start). The FP8/FP4 simulation of the official model is not applied (see module doc).
    """
    if overlap is None:
        overlap = ratio == 4
    x = x.float()
    kv = x @ wkv.float().t()
    gate = x @ wgate.float().t()
    n_blocks = x.shape[0] // ratio
    d = wkv.shape[0] // (2 if overlap else 1)
    kv = kv[: n_blocks * ratio].view(n_blocks, ratio, kv.shape[-1])
    gate = gate[: n_blocks * ratio].view(n_blocks, ratio, gate.shape[-1]) + ape.float()[None]
    if overlap:
        # block i-1's first channel half, shifted down one block; [:n_blocks] keeps T < ratio empty
        prev_kv = torch.cat((kv.new_zeros(1, ratio, d), kv[:-1, :, :d]), dim=0)[:n_blocks]
        prev_gate = torch.cat((gate.new_full((1, ratio, d), float("-inf")), gate[:-1, :, :d]), dim=0)[:n_blocks]
        kv = torch.cat((prev_kv, kv[:, :, d:]), dim=1)  # [n, 2*ratio, d]
        gate = torch.cat((prev_gate, gate[:, :, d:]), dim=1)
    pooled = (kv * torch.softmax(gate, dim=1)).sum(dim=1)  # per-channel softmax over rows
    pooled = rms_norm(pooled, norm_weight, eps)
    block_start = torch.arange(n_blocks, device=x.device) * ratio
    return apply_rope(pooled, block_start, inv_freq)


# ----------------------------------------------------------------------------------------------
# The layer core


def attention_layer(
    q: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    attn_sink: torch.Tensor | None,
    inv_freq: torch.Tensor,
    *,
    window: int = WINDOW,
    compressed_kv: torch.Tensor | None = None,
    compressed_indices: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """One V4 attention layer from projected q/kv to the de-rotated output, before wo_a: [S, H, D].

    q [S, H, D]: per-head RMS-normed queries at `positions` [S], not yet rotated.
    kv [T_kv, D]: kv_norm'ed latents of the sequence's raw tokens, row i = position i (so every
        query position must be < T_kv), not yet rotated.
    compressed_kv [N, D]: the layer's compressed entries (compress_kv output, already rotated).
    compressed_indices [S, K]: per query, compressed entries to attend (c128_indices for HCA,
        c4_indices for CSA), -1 = none. Omit both for a sliding-only layer.
    sm_scale defaults to D^-0.5 (512^-0.5 for the real model, no YaRN mscale).
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q = apply_rope(q, positions, inv_freq)
    kv = apply_rope(kv, torch.arange(kv.shape[0], device=kv.device), inv_freq)
    buffer = kv
    if compressed_kv is not None:
        buffer = torch.cat((kv, compressed_kv.float()), dim=0)
    indices, lengths = union_indices(
        window_indices(positions, window), compressed_indices if compressed_kv is not None else None, kv.shape[0]
    )
    out, _, _ = sparse_attention(q, buffer, indices, scale, d_v=head_dim, attn_sink=attn_sink, topk_length=lengths)
    return apply_rope(out, positions, inv_freq, inverse=True)


def grouped_output_projection(o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, n_groups: int) -> torch.Tensor:
    """V4's output projection: o [T, H, D] -> [T, hidden].

    Heads are split into n_groups consecutive groups; group g's H*D/n_groups values go through its
    own block of wo_a ([n_groups * r, H*D/n_groups], rows g*r .. g*r+r-1), then the n_groups*r
    intermediate values through wo_b [hidden, n_groups * r].
    """
    t = o.shape[0]
    grouped = o.float().reshape(t, n_groups, -1)
    per_group = wo_a.float().view(n_groups, -1, grouped.shape[-1])  # [G, r, H*D/G]
    mid = torch.einsum("tgi,gri->tgr", grouped, per_group).reshape(t, -1)
    return mid @ wo_b.float().t()
