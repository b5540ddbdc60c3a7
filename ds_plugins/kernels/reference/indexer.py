"""DeepSeek-V4 lightning indexer, from the math: the oracle for the indexer kernels.

For query row t (one token, or one MTP position of a decode request), with H indexer heads of
dimension D, head weights w[t, h] and the (dequantised) compressed indexer keys k[j]
(research notes 2.4 and 3.3):

    score[t, j] = sum_h  ReLU(q[t, h] . k[j]) * k_scale[j] * w[t, h]

k_scale is the per-key fp32 dequantisation scale of the FP8 key cache (1 for FP4 keys, whose
per-32 scales are applied when the keys are dequantised); it is applied outside the ReLU,
which for the non-negative scales a quantiser produces is the same as scaling the key.
Keys outside a row's visible range get -inf. A row's top-k is its k best visible keys, best
first; equal scores keep the smaller position first (a stable sort); when fewer than k keys
are visible the remaining slots hold -1.

Visible ranges:
- ragged (prefill, `fp8_mqa_logits`): keys ks[t] <= j < ke[t] of one flat key array; top-k
  positions are returned relative to ks[t] (request-local compressed positions).
- paged (decode, `fp8_paged_mqa_logits`): logical positions p < L of the row's request, where
  key p lives in block block_table[b, p // block_kv] at slot p % block_kv, and L is
  context_lens[b, n] for row (b, n) of a 2-D context_lens, or context_lens[b] - next_n + n + 1
  for a 1-D one (DeepGEMM's legacy causal convention; the same as 2-D when next_n = 1).

Storage formats decoded here (DeepGEMM's, which vLLM and SGLang write):
- FP8 key: e4m3 values and one fp32 scale per key.
- FP4 (MXFP4) value: e2m1 codes, two per byte, the even element in the low nibble; one
  UE8M0 scale byte per 32 values, four bytes packed into an int32 (byte g = group g, little
  endian). A scale byte e means 2^(e - 127), built as the fp32 bit pattern e << 23, so e = 0
  decodes to 0 (DeepGEMM's `cast_back_from_fp4` does the same).
- Paged cache block (uint8 [num_blocks, block_kv, 1, W]): all block_kv keys' values first,
  then all block_kv keys' scale words (fp32 for FP8, W = D + 4; packed UE8M0 for FP4,
  W = D/2 + 4). Block stride = kv_cache.stride(0) bytes, which may exceed block_kv * W.

Everything is computed in fp32.
"""

from __future__ import annotations

import torch

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ----------------------------------------------------------------------------- formats


def ue8m0_to_float(scale_bytes: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8) -> fp32 powers of two 2^(e-127), via the bit pattern e << 23."""
    return (scale_bytes.to(torch.int32) << 23).view(torch.float32)


def dequant_fp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 [..., D/2] (int8 or uint8) with packed UE8M0 scales [...] (int32) -> fp32 [..., D]."""
    codes = packed.contiguous().view(torch.uint8).to(torch.int64)
    codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)  # even element = low nibble
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=packed.device)
    values = magnitudes[codes & 0x7]
    values = torch.where((codes & 0x8) != 0, -values, values)
    head_dim = values.shape[-1]
    groups = head_dim // 32
    scale_bytes = scales.contiguous().view(torch.uint8).reshape(*scales.shape, 4)[..., :groups]
    values = values.reshape(*values.shape[:-1], groups, 32) * ue8m0_to_float(scale_bytes)[..., None]
    return values.reshape(*values.shape[:-2], head_dim)


def _blocks_as_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_kv, 1, W] uint8 -> [num_blocks, block_kv * W] bytes of each block."""
    num_blocks, block_kv, _, width = kv_cache.shape
    return torch.as_strided(
        kv_cache, (num_blocks, block_kv * width), (kv_cache.stride(0), 1), kv_cache.storage_offset()
    )


def split_fp8_paged_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 paged cache [nb, block_kv, 1, D+4] uint8 -> keys [nb, block_kv, D] fp32, scales [nb, block_kv] fp32."""
    num_blocks, block_kv, _, width = kv_cache.shape
    head_dim = width - 4
    blocks = _blocks_as_bytes(kv_cache)
    values = blocks[:, : block_kv * head_dim].reshape(num_blocks, block_kv, head_dim)
    scales = blocks[:, block_kv * head_dim : block_kv * width].reshape(num_blocks, block_kv, 4)
    return (
        values.contiguous().view(torch.float8_e4m3fn).float(),
        scales.contiguous().view(torch.float32).reshape(num_blocks, block_kv),
    )


def split_fp4_paged_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """FP4 paged cache [nb, block_kv, 1, D/2+4] uint8 -> dequantised keys [nb, block_kv, D] fp32."""
    num_blocks, block_kv, _, width = kv_cache.shape
    packed_dim = width - 4
    blocks = _blocks_as_bytes(kv_cache)
    packed = blocks[:, : block_kv * packed_dim].reshape(num_blocks, block_kv, packed_dim)
    scales = blocks[:, block_kv * packed_dim : block_kv * width].reshape(num_blocks, block_kv, 4)
    return dequant_fp4(packed, scales.contiguous().view(torch.int32).reshape(num_blocks, block_kv))


# ----------------------------------------------------------------------------- writers (tests, selftest)


def quantize_fp8_keys(x: torch.Tensor, power_of_two: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [..., D] -> (e4m3 [..., D], fp32 scale [...]) with scale = amax/448 per key (amax >= 1e-4),
    rounded up to a power of two when power_of_two (UE8M0, what V4's vLLM kernel writes)."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-4) / 448.0
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (x.float() / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def quantize_fp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] (D % 32 == 0, D <= 128) -> (packed e2m1 uint8 [..., D/2], packed UE8M0 int32 [...]):
    per 32 values s = 2^ceil(log2(amax / 6)), amax >= 6 * 2^-126 (V4's rule), value -> nearest e2m1 of x / s."""
    head_dim = x.shape[-1]
    groups = x.float().reshape(*x.shape[:-1], head_dim // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp_min(6.0 * 2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = (groups / torch.exp2(exponent)[..., None]).clamp(-6.0, 6.0).reshape(x.shape)
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=x.device)
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
    codes = codes | ((scaled < 0) & (codes != 0)).long() << 3
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scale_bytes = torch.zeros(*x.shape[:-1], 4, dtype=torch.uint8, device=x.device)
    scale_bytes[..., : head_dim // 32] = (exponent + 127).to(torch.uint8)
    return packed, scale_bytes.view(torch.int32).squeeze(-1)


def pack_paged_cache(values: torch.Tensor, scale_words: torch.Tensor, block_stride: int | None = None) -> torch.Tensor:
    """values [nb, block_kv, VB] (fp8 or uint8 bytes), scale words [nb, block_kv] (fp32 or int32) ->
    uint8 cache [nb, block_kv, 1, VB + 4] in DeepGEMM's block layout. block_stride (bytes, a multiple
    of 4, >= block_kv * (VB + 4)) leaves a gap after each block, as a shared multi-layer allocation does."""
    num_blocks, block_kv, value_bytes = values.shape
    width = value_bytes + 4
    stride = block_stride or block_kv * width
    storage = torch.zeros(num_blocks * stride, dtype=torch.uint8, device=values.device)
    blocks = storage.view(num_blocks, stride)
    blocks[:, : block_kv * value_bytes] = values.contiguous().view(torch.uint8).reshape(num_blocks, -1)
    blocks[:, block_kv * value_bytes : block_kv * width] = (
        scale_words.contiguous().view(torch.uint8).reshape(num_blocks, -1)
    )
    return torch.as_strided(storage, (num_blocks, block_kv, 1, width), (stride, width, width, 1))


def paged_cache_from_keys(
    keys: torch.Tensor,
    block_kv: int,
    fp4: bool = False,
    block_stride: int | None = None,
    physical_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise per-request keys [B, capacity, D] (capacity a multiple of block_kv) into a paged cache.
    Logical block i of request b is stored in physical block physical_blocks[b * blocks_per_request + i]
    (default: in order; pass a permutation for a scattered table). Returns (kv_cache, block_table int32)."""
    batch, capacity, head_dim = keys.shape
    per_request = capacity // block_kv
    blocks = keys.reshape(batch * per_request, block_kv, head_dim)
    if physical_blocks is None:
        physical_blocks = torch.arange(batch * per_request, device=keys.device)
    stored = torch.empty_like(blocks)
    stored[physical_blocks.long()] = blocks
    values, scales = quantize_fp4(stored) if fp4 else quantize_fp8_keys(stored)
    block_table = physical_blocks.to(torch.int32).reshape(batch, per_request)
    return pack_paged_cache(values, scales, block_stride), block_table.contiguous()


# ----------------------------------------------------------------------------- scores


def index_scores(
    q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, k_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """q [M, H, D], k [N, D], weights [M, H], k_scale [N] | None -> unmasked scores [M, N] fp32."""
    q, k, weights = q.float(), k.float(), weights.float()
    scores = q.new_zeros(q.shape[0], k.shape[0])
    for h in range(q.shape[1]):  # one head at a time keeps memory at [M, N]
        scores += torch.relu(q[:, h] @ k.T) * weights[:, h, None]
    if k_scale is not None:
        scores = scores * k_scale.float()[None, :]
    return scores


def mqa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    max_seqlen_k: int = 0,
) -> torch.Tensor:
    """Ragged logits: [M, N] with -inf outside ks[t] <= j < ke[t]; or, with max_seqlen_k > 0,
    [M, max_seqlen_k] where column c is key ks[t] + c (-inf where that key is not visible)."""
    n_keys = k.shape[0]
    scores = index_scores(q, k, weights, k_scale)
    ks, ke = ks.long()[:, None], ke.long()[:, None]
    if max_seqlen_k > 0:
        cols = ks + torch.arange(max_seqlen_k, device=q.device)[None, :]  # key index per column
    else:
        cols = torch.arange(n_keys, device=q.device)[None, :].expand(q.shape[0], -1)
    visible = (cols >= ks) & (cols < ke) & (cols >= 0) & (cols < n_keys)
    picked = scores.gather(1, cols.clamp(0, max(n_keys - 1, 0))) if n_keys else scores.new_zeros(cols.shape)
    return picked.masked_fill(~visible, float("-inf"))


def row_lengths(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """Visible keys per query row (b, n), flattened to [B * next_n] (see the module docstring)."""
    if context_lens.dim() == 2:
        return context_lens.long().reshape(-1)
    offsets = torch.arange(next_n, device=context_lens.device) - next_n + 1
    return (context_lens.long()[:, None] + offsets[None, :]).clamp_min(0).reshape(-1)


def paged_mqa_logits(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    k_scale_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, next_n, H, D], keys [num_blocks, block_kv, D] (+ scales [num_blocks, block_kv]),
    weights [B*next_n, H] -> logits [B*next_n, max_context_len], -inf at positions >= the row length."""
    batch, next_n, heads, head_dim = q.shape
    num_blocks, block_kv, _ = k_blocks.shape
    if num_blocks == 0 or block_table.shape[1] == 0:
        return q.new_full((batch * next_n, max_context_len), float("-inf"), dtype=torch.float32)
    lengths = row_lengths(context_lens, next_n)
    positions = torch.arange(max_context_len, device=q.device)
    block_idx = positions // block_kv
    in_table = block_idx < block_table.shape[1]
    physical = block_table.long()[:, block_idx.clamp(max=block_table.shape[1] - 1)]  # [B, P]
    in_cache = in_table[None, :] & (physical >= 0) & (physical < num_blocks)
    physical = physical.clamp(0, num_blocks - 1)
    slots = (positions % block_kv)[None, :].expand_as(physical)
    keys = k_blocks.float()[physical, slots]  # [B, P, D]
    scales = k_scale_blocks.float()[physical, slots] if k_scale_blocks is not None else None
    logits = q.new_zeros(batch * next_n, max_context_len, dtype=torch.float32)
    for b in range(batch):
        rows = slice(b * next_n, (b + 1) * next_n)
        logits[rows] = index_scores(q[b], keys[b], weights[rows], None if scales is None else scales[b])
    visible = (positions[None, :] < lengths[:, None]) & in_cache.repeat_interleave(next_n, dim=0)
    return logits.masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- top-k


def topk_from_logits(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Column indices of each row's topk best finite logits, best first (stable: equal scores keep
    the smaller column first), -1 where the row has fewer than topk visible (finite) columns."""
    rows, cols = logits.shape
    order = torch.sort(logits, dim=1, descending=True, stable=True)
    take = min(topk, cols)
    idx = order.indices[:, :take].to(torch.int32)
    idx = torch.where(order.values[:, :take] == float("-inf"), -1, idx)
    out = torch.full((rows, topk), -1, dtype=torch.int32, device=logits.device)
    out[:, :take] = idx
    return out


def mqa_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    topk: int,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged top-k: int32 [M, topk] of positions relative to ks[t] (key ks[t] + p), -1 padded."""
    width = max(k.shape[0], 1)  # a visible window never exceeds the key count
    return topk_from_logits(mqa_logits(q, k, weights, ks, ke, k_scale, max_seqlen_k=width), topk)


def paged_mqa_topk(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
    topk: int,
    k_scale_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged top-k: int32 [B*next_n, topk] of logical positions, -1 padded."""
    logits = paged_mqa_logits(q, k_blocks, weights, context_lens, block_table, max_context_len, k_scale_blocks)
    return topk_from_logits(logits, topk)
