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


def flash_mla_with_kvcache(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v,
    tile_scheduler_metadata,
    num_splits=None,
    softmax_scale=None,
    causal=False,
    is_fp8_kvcache=False,
    indices=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    topk_length=None,
    extra_topk_length=None,
    out=None,
    enable_batch_invariant=False,
):
    if enable_batch_invariant:
        # vLLM 0.33's FlashMLA takes this flag. Our split count follows the batch shape, and splits change the
        # summation order; one split makes each token's result independent of what else is in the batch.
        if indices is None or not is_fp8_kvcache or causal or num_splits is not None:
            raise sparse_mla.KernelInputError(
                "enable_batch_invariant: only with the sparse FP8 decode "
                "(indices, is_fp8_kvcache=True, causal=False, num_splits=None)"
            )
        result, lse = sparse_mla.sparse_decode_fwd(
            q,
            k_cache,
            indices,
            topk_length,
            attn_sink,
            extra_k_cache,
            extra_indices_in_kvcache,
            extra_topk_length,
            head_dim_v,
            softmax_scale,
            num_splits=1,
        )
        return _into(out, result), lse
    result, lse = sparse_mla.flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        _our_sched_meta(tile_scheduler_metadata),
        num_splits=num_splits,
        softmax_scale=softmax_scale,
        causal=causal,
        is_fp8_kvcache=is_fp8_kvcache,
        indices=indices,
        attn_sink=attn_sink,
        extra_k_cache=extra_k_cache,
        extra_indices_in_kvcache=extra_indices_in_kvcache,
        topk_length=topk_length,
        extra_topk_length=extra_topk_length,
    )
    return _into(out, result), lse


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, out=None):
    result, max_logits, lse = sparse_mla.flash_mla_sparse_fwd(
        q, kv, indices, sm_scale, d_v=d_v, attn_sink=attn_sink, topk_length=topk_length
    )
    return _into(out, result), max_logits, lse


def get_mla_metadata(*args, **kwargs):
    return sparse_mla.get_mla_metadata(*args, **kwargs)


# --- DeepGEMM, as vLLM's wrappers in vllm.utils.deep_gemm call it ----------------------------------------


def fp8_fp4_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits):
    """vLLM <= 0.30: the sixth argument is clean_logits."""
    return indexer.fp8_fp4_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=clean_logits)


def fp8_fp4_mqa_logits_varlen(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, max_seqlen_k):
    """vLLM 0.33: the sixth argument is max_seqlen_k (logits [M, max_seqlen_k], column c = key ks + c)."""
    return indexer.fp8_fp4_mqa_logits(
        q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=False, max_seqlen_k=max_seqlen_k
    )


def fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=False):
    """vLLM's pre-rename name (FP8 only): q is the e4m3 tensor itself."""
    return indexer.fp8_mqa_logits(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=clean_logits)


def fp8_fp4_paged_mqa_logits(
    q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len, clean_logits=False, indices=None
):
    return indexer.fp8_fp4_paged_mqa_logits(
        q,
        kv_cache,
        weights,
        context_lens,
        block_tables,
        schedule_metadata,
        max_model_len,
        clean_logits=clean_logits,
        indices=indices,
    )


def fp8_paged_mqa_logits(
    q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len, clean_logits=False
):
    return indexer.fp8_paged_mqa_logits(
        q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len, clean_logits=clean_logits
    )


def get_paged_mqa_logits_metadata(context_lens, block_size, num_sms, indices=None):
    return indexer.get_paged_mqa_logits_metadata(context_lens, block_size, num_sms, indices=indices)


def fp8_einsum(equation, a, b, d, c=None, recipe=(1, 128, 128)):
    """V4's o_proj `fp8_einsum("bhr,hdr->bhd", (o, o_scale), (wo_a.weight, wo_a's scale), z, recipe=...)`.

    With DeepGEMM serving, wo_a arrives as DeepGEMM's post-processing left it (3-D, transformed scales)
    and goes to the kernel unchanged. Without it (DeepGEMM off on SM12x) vLLM hands over the linear's
    own parameters: weight 2-D [groups * o_lora_rank, r] (group-major rows: the layer's `bmm_batch_size`
    groups of o_lora_rank output rows) and its 128x128 block scale 2-D [groups * o_lora_rank / 128,
    r / 128], e8m0 from the checkpoint or float32 (fp8_block_scales.py turned it). Those are viewed as
    [groups, o_lora_rank, r] and [groups, o_lora_rank / 128, r / 128] float32 (e8m0 exactly, 2**(e-127)),
    and the recipe's gran_n becomes 128: the scales are per 128 rows, whatever vLLM's recipe says for
    DeepGEMM's per-row layout ((1, 1, 128) on SM100/SM12x)."""
    b, recipe = _wo_a_as_grouped(b, d, recipe)
    einsum.fp8_einsum(equation, a, b, d, c, recipe=recipe)


def _wo_a_as_grouped(b, d, recipe):
    from ds_plugins.kernels._runtime import KernelInputError, expect
    from ds_plugins.kernels.reference.einsum import SCALE_BLOCK_K

    from .fp8_block_scales import e8m0_to_float32

    if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) and b[0].dim() == 2):
        return b, recipe  # DeepGEMM's 3-D layout (or a bad argument the kernel names)
    weight, scale = b
    expect("d", d, ndim=3)
    expect("b[1]", scale, dtype=(torch.float8_e8m0fnu, torch.float32), ndim=2, device=weight.device)
    groups, rows = d.shape[1], d.shape[2]
    length = weight.shape[1]
    block = SCALE_BLOCK_K
    if weight.shape[0] != groups * rows:
        raise KernelInputError(
            f"b[0]: a 2-D wo_a weight must have d's groups x rows = {groups} x {rows} rows, "
            f"got shape {list(weight.shape)}"
        )
    if rows % block:
        raise KernelInputError(
            f"d: o_lora_rank {rows} is not a multiple of the 128-row scale block, so wo_a's "
            f"2-D block scales cannot be split by group"
        )
    expect("b[1]", scale, shape=(groups * rows // block, -(-length // block)))
    if not (isinstance(recipe, (tuple, list)) and len(recipe) == 3 and recipe[1] in (1, block)):
        raise KernelInputError(f"recipe: supported are (1, 1, 128) and (1, 128, 128), got {recipe!r}")
    if scale.dtype == torch.float8_e8m0fnu:
        scale = e8m0_to_float32(scale)
    grouped = (weight.view(groups, rows, length), scale.reshape(groups, rows // block, scale.shape[1]))
    return grouped, (recipe[0], block, recipe[2])


def tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split):
    mhc.tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split)
