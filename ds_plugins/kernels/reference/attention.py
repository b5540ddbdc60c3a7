"""DeepSeek-V4 sparse attention, from the math: the oracle for every sparse-MLA kernel.

One latent serves as key and value (head_dim 512 = 448 NoPE + 64 RoPE, the value is
all 512 dims). For query token t and head h over its candidate set S_t:

    s_i   = sm_scale * <q[t,h], kv[i]>                          i in S_t
    lse   = log(sum_i exp(s_i))                                  natural log
    out   = sum_i exp(s_i - lse) kv[i][:d_v]  *  exp(lse) / (exp(lse) + exp(sink[h]))

The sink joins the softmax denominator only; it changes neither lse nor max_logits.
Invalid candidates (index -1, or >= the number of kv rows, or past topk_length) are
skipped. A row with no valid candidate gives out = 0, max_logits = -inf, lse = +inf
(FlashMLA's convention).
"""

from __future__ import annotations

import torch


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s_q, h, d_qk], kv [s_kv, d_qk], indices [s_q, topk] (int) -> out [s_q, h, d_v] (q's dtype),
    max_logits [s_q, h] fp32, lse [s_q, h] fp32. All math in fp32."""
    s_q, h, _ = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(topk, device=idx.device)[None, :] < topk_length.long()[:, None]
    gathered = kv.float()[idx.clamp(0, max(s_kv - 1, 0))]  # [s_q, topk, d_qk]
    scores = torch.einsum("thd,tkd->thk", q.float(), gathered) * sm_scale  # [s_q, h, topk]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    max_logits = scores.amax(dim=-1)  # -inf on empty rows
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # 0 on empty rows
    out = torch.einsum("thk,tkd->thd", probs, gathered[..., :d_v])
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink), stable for any magnitude
        out = out * torch.sigmoid(lse - attn_sink.float()[None, :])[..., None].nan_to_num(0.0)
    empty = ~valid.any(dim=-1)  # [s_q]
    lse = lse.masked_fill(empty[:, None], float("inf"))
    return out.to(q.dtype), max_logits, lse
