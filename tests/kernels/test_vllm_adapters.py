"""ds_plugins/vllm/dsv4/adapters.py beyond what vLLM 0.28/0.30 pass (tests/engines/ calls the rest through
the real vLLM): vLLM 0.33's `enable_batch_invariant` decode flag."""

import torch

from ds_plugins.kernels.kv_cache import quantize_kv_cache
from ds_plugins.kernels.reference.sparse_mla import ref_sparse_decode
from ds_plugins.vllm.dsv4 import adapters


def _problem(device, tokens):
    g = torch.Generator().manual_seed(3)
    cache = quantize_kv_cache(torch.randn(4, 64, 512, generator=g).bfloat16()).to(device)
    q = torch.randn(tokens, 1, 64, 512, generator=g).bfloat16().to(device)
    idx = torch.randint(0, 4 * 64, (tokens, 1, 96), generator=g, dtype=torch.int32).to(device)
    lens = torch.full((tokens,), 96, dtype=torch.int32, device=device)
    return q, cache, idx, lens


def test_batch_invariant_decode_gives_each_token_the_same_bits_in_any_batch(device):
    q, cache, idx, lens = _problem(device, 5)
    kw = dict(
        block_table=None,
        cache_seqlens=None,
        head_dim_v=512,
        tile_scheduler_metadata=None,
        is_fp8_kvcache=True,
        enable_batch_invariant=True,
    )
    whole, lse = adapters.flash_mla_with_kvcache(q, cache, indices=idx, topk_length=lens, **kw)
    for t in (0, 3):
        alone, alone_lse = adapters.flash_mla_with_kvcache(
            q[t : t + 1], cache, indices=idx[t : t + 1], topk_length=lens[t : t + 1], **kw
        )
        assert torch.equal(alone[0], whole[t]) and torch.equal(alone_lse[0], lse[t])
    ref, _ = ref_sparse_decode(q.cpu(), cache.cpu(), idx.cpu(), lens.cpu())
    torch.testing.assert_close(whole.float().cpu(), ref.float(), rtol=2**-7, atol=2**-6)


def test_out_buffer_is_written_in_place(device):
    q, cache, idx, lens = _problem(device, 2)
    out = torch.zeros(2, 1, 64, 512, dtype=torch.bfloat16, device=device)
    got, _ = adapters.flash_mla_with_kvcache(
        q, cache, None, None, 512, None, is_fp8_kvcache=True, indices=idx, topk_length=lens, out=out
    )
    assert got.data_ptr() == out.data_ptr() and out.abs().sum() > 0
