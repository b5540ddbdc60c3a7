"""vLLM's calls into FlashMLA and DeepGEMM, answered by ds_plugins.kernels.

Each function here takes exactly the arguments vLLM's DeepSeek-V4 code passes at that call site (routes.py
checks the site still has that shape before binding it) and hands them to our kernel, whose contract is the
upstream library's. What differs from the kernel's own contract is only what vLLM adds:

- `out=`: vLLM's vendored FlashMLA writes into a caller buffer; our kernels return a fresh one, copied in.
- FlashMLA's `FlashMLASchedMeta`: vLLM's metadata builder makes them (or, on SM12x, none: routes.py then
  hands out ours). A foreign object gets one of ours attached on first use, so one plan still serves
  every layer of a type within a step, as FlashMLA's does.
- vLLM's DeepGEMM wrappers: `max_seqlen_k` (0.33) or `clean_logits` (earlier) in sixth place, the slot
  count for the paged metadata: all just forwarded.

Imported only when a route is installed, i.e. when vLLM imports the V4 module it patches (torch is loaded then).
"""

from __future__ import annotations

import torch

from ds_plugins.kernels import einsum, indexer, mhc, sparse_mla

_SCHED_ATTR = "_ds_plugins_sched_meta"


def new_sched_meta() -> sparse_mla.SparseDecodeSchedMeta:
    return sparse_mla.get_mla_metadata()[0]


def _our_sched_meta(meta):
    if isinstance(meta, sparse_mla.SparseDecodeSchedMeta):
        return meta
    if meta is None:
        # A site that kept no plan (vLLM's builder returns none on SM12x): plan per call, from shapes.
        return new_sched_meta()
    ours = getattr(meta, _SCHED_ATTR, None)
    if ours is None:
        ours = new_sched_meta()
        setattr(meta, _SCHED_ATTR, ours)
    return ours


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result.view(out.shape) if out.shape != result.shape else result)
    return out


# --- FlashMLA (vllm.v1.attention.ops.flashmla names, bound in the V4 attention modules) -------------------

def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None, out=None, enable_batch_invariant=False):
    if enable_batch_invariant:
        # vLLM 0.33's FlashMLA takes this flag. Our split count follows the batch shape, and splits change the
        # summation order; one split makes each token's result independent of what else is in the batch.
        if indices is None or not is_fp8_kvcache or causal or num_splits is not None:
            raise sparse_mla.KernelInputError("enable_batch_invariant: only with the sparse FP8 decode "
                                              "(indices, is_fp8_kvcache=True, causal=False, num_splits=None)")
        result, lse = sparse_mla.sparse_decode_fwd(
            q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices_in_kvcache,
            extra_topk_length, head_dim_v, softmax_scale, num_splits=1)
        return _into(out, result), lse
    result, lse = sparse_mla.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, head_dim_v, _our_sched_meta(tile_scheduler_metadata),
        num_splits=num_splits, softmax_scale=softmax_scale, causal=causal, is_fp8_kvcache=is_fp8_kvcache,
        indices=indices, attn_sink=attn_sink, extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
        extra_topk_length=extra_topk_length)
    return _into(out, result), lse


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, out=None):
    result, max_logits, lse = sparse_mla.flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=d_v,
                                                              attn_sink=attn_sink, topk_length=topk_length)
    return _into(out, result), max_logits, lse


def get_mla_metadata(*args, **kwargs):
    return sparse_mla.get_mla_metadata(*args, **kwargs)


# --- DeepGEMM, as vLLM's wrappers in vllm.utils.deep_gemm call it ----------------------------------------

def fp8_fp4_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits):
    """vLLM <= 0.30: the sixth argument is clean_logits."""
    return indexer.fp8_fp4_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=clean_logits)


def fp8_fp4_mqa_logits_varlen(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, max_seqlen_k):
    """vLLM 0.33: the sixth argument is max_seqlen_k (logits [M, max_seqlen_k], column c = key ks + c)."""
    return indexer.fp8_fp4_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=False,
                                      max_seqlen_k=max_seqlen_k)


def fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=False):
    """vLLM's pre-rename name (FP8 only): q is the e4m3 tensor itself."""
    return indexer.fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=clean_logits)


def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len,
                             clean_logits=False, indices=None):
    return indexer.fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata,
                                            max_model_len, clean_logits=clean_logits, indices=indices)


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len,
                         clean_logits=False):
    return indexer.fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata,
                                        max_model_len, clean_logits=clean_logits)


def get_paged_mqa_logits_metadata(context_lens, block_size, num_sms, indices=None):
    return indexer.get_paged_mqa_logits_metadata(context_lens, block_size, num_sms, indices=indices)


def fp8_einsum(equation, a, b, d, c=None, recipe=(1, 128, 128)):
    einsum.fp8_einsum(equation, a, b, d, c, recipe=recipe)


def tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split):
    mhc.tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split)
