"""References for FlashMLA's two sparse entry points, built on `sparse_attention` (the math).

- `ref_flash_mla_sparse_fwd`: the prefill contract (`flash_mla_sparse_fwd`): bf16 kv rows with one
  KV head, indices [s_q, 1, topk] into them.
- `ref_sparse_decode`: the sparse FP8 decode contract (`flash_mla_with_kvcache` with indices):
  candidates are slots of V4's paged FP8 cache, from two sets (the window cache with `indices` and
  the compressed cache with `extra_indices`), each cut at its own per-request length. Both sets
  join ONE softmax, and the sink is applied once to the merged result.
"""

from __future__ import annotations

import torch

from ds_plugins.kernels.kv_cache import HEAD_DIM, gather_kv_slots
from ds_plugins.kernels.reference.attention import sparse_attention


def ref_flash_mla_sparse_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s_q, h_q, d_qk] bf16, kv [s_kv, 1, d_qk] bf16, indices [s_q, 1, topk] int32 (-1 or >= s_kv
    invalid), topk_length [s_q] -> out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32."""
    return sparse_attention(q, kv[:, 0], indices[:, 0], sm_scale, d_v=d_v, attn_sink=attn_sink, topk_length=topk_length)


def _candidates(
    k_cache: torch.Tensor, slots: torch.Tensor, length: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised rows [b, s_q, topk, 512] at `slots`, and which of them count [b, s_q, topk]:
    slot in range and position < the request's length."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    valid = (slots >= 0) & (slots < num_slots)
    if length is not None:
        position = torch.arange(slots.shape[-1], device=slots.device)
        valid &= position[None, None, :] < length.long()[:, None, None]
    return gather_kv_slots(k_cache, slots), valid


def ref_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    indices: torch.Tensor,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    d_v: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s_q, h_q, 512] bf16; k_cache / extra_k_cache: V4 FP8 caches [blocks, page, 1, 584] (own page
    sizes); indices [b, s_q, topk] / extra_indices [b, s_q, extra_topk] int32 slots (-1 invalid);
    topk_length / extra_topk_length [b]; attn_sink [h_q] fp32.
    -> out [b, s_q, h_q, d_v] bf16, lse [b, h_q, s_q] fp32 (natural log, +inf where nothing is attended)."""
    b, s_q, h_q, d_qk = q.shape
    if softmax_scale is None:
        softmax_scale = d_qk**-0.5
    rows, valid = _candidates(k_cache, indices, topk_length)
    if extra_k_cache is not None:
        extra_rows, extra_valid = _candidates(extra_k_cache, extra_indices, extra_topk_length)
        rows = torch.cat([rows, extra_rows], dim=2)
        valid = torch.cat([valid, extra_valid], dim=2)

    # Every query token gets its own block of gathered rows; point its indices at that block.
    tokens, candidates = b * s_q, rows.shape[2]
    kv = rows.reshape(tokens * candidates, HEAD_DIM)
    own_rows = torch.arange(tokens * candidates, device=q.device).view(tokens, candidates)
    flat_indices = torch.where(valid.reshape(tokens, candidates), own_rows, -1)
    out, _, lse = sparse_attention(
        q.reshape(tokens, h_q, d_qk), kv, flat_indices, softmax_scale, d_v=d_v, attn_sink=attn_sink
    )
    return out.view(b, s_q, h_q, d_v), lse.view(b, s_q, h_q).transpose(1, 2)
