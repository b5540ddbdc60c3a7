"""SGLang seams: each ds-plugins route, installed the way the patch installs it, called with CPU tensors
shaped and passed exactly as that SGLang version's call site passes them, against the references in
ds_plugins/kernels/reference (TRITON_INTERPRET=1, from tests/kernels/conftest.py).

Call shapes (read from the wheels; tests/contract/test_sglang_seams.py pins them by AST):
- 0.5.12 deepseek_v4_backend: `flash_mla.flash_mla_with_kvcache(q=[b,1,h,512] bf16, k_cache=swa cache
  [pages, page, 1, 584], head_dim_v=512, block_table=None, cache_seqlens=None,
  tile_scheduler_metadata=flash_mla.get_mla_metadata()[0], softmax_scale, is_fp8_kvcache=True,
  indices=[b,1,topk] (topk % 64 == 0), topk_length=[b], attn_sink=[h] fp32, extra_k_cache,
  extra_indices_in_kvcache, extra_topk_length)[0]`.
- 0.5.12 dsv4/indexer + metadata: `get_paged_mqa_logits_metadata(c4_lens [b,1] int32, 64, num_sms)`, then
  `fp8_paged_mqa_logits(q_fp8 [b,1,64,128], cache [blocks,64,1,132] uint8, weights [b,64], c4_lens [b,1],
  page_table, metadata, max_c4_seq_len, False)`.
- 0.5.12 deepseek_v4 mHC: `tf32_hc_prenorm_gemm(x_flat bf16 [m, hc*hidden], hc_fn fp32 [mix, hc*hidden],
  d_out [m, mix] fp32, s_out [m] fp32, num_splits=None)`; its default caller layers/mhc.py:mhc_pre passes
  `num_splits=S` (SGLang's `_compute_num_split_for_mhc_pre`) with d [S, m, mix] and sqr_sum [S, m].
- 0.5.13+ (forced): `flash_mla_with_kvcache_sm120(q=..., k_cache=..., head_dim_v=..., softmax_scale=...,
  indices=..., topk_length=..., attn_sink=..., extra_k_cache=..., extra_indices_in_kvcache=...,
  extra_topk_length=...)[0]`, here on the real installed SGLang module, also against SGLang's own
  PyTorch fallback for SM120.
"""

from __future__ import annotations

import types

import pytest
import torch

from ds_plugins import patching
from ds_plugins.kernels.kv_cache import dequantize_kv_cache, quantize_kv_cache
from ds_plugins.kernels.reference import indexer as ref_indexer
from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm
from ds_plugins.kernels.reference.sparse_mla import ref_sparse_decode
from ds_plugins.sglang import routes

HEADS, D_QK, D_V = 64, 512, 512  # V4 attention: 64 heads per rank (Flash TP1), 448 NoPE + 64 RoPE
IDX_HEADS, IDX_DIM = 64, 128  # V4 indexer
OUT_COL_ATOL, OUT_RTOL, LSE_TOL = 2.0**-8, 2.0**-7, 2.0**-15  # as tests/kernels/test_sparse_decode.py
FP32_TOL = 1.2e-5  # as tests/kernels/test_indexer_logits.py


def route(route_id: str) -> patching.Patch:
    return next(p for p in routes.PATCHES if p.id == route_id)


def install_on_placeholder(patch: patching.Patch):
    """The library module the 0.5.12 route patches (flash_mla / deep_gemm are not installed on a CPU
    machine): a module whose original function must never be reached once the route is in place."""
    module = types.ModuleType(patch.module)

    def placeholder(attribute):
        def original(*args, **kwargs):
            raise AssertionError(f"{patch.module}.{attribute} was called: the route is not in place")

        return original

    # every route on that module is there (a route group checks each member before any is installed)
    for other in routes.ROUTES:
        if other.module == patch.module:
            setattr(module, other.attribute, placeholder(other.attribute))
    original = getattr(module, patch.attribute)
    target = patching.resolve(patch, module)
    assert patch.check(target) is None
    patch.install(target)
    assert getattr(module, patch.attribute) is not original
    return module


def sparse_case(batch=2, page=64, extra_page=16, topk=64, extra_topk=64):
    """A V4 SWA cache and a C4 compressed cache (own page size), and SGLang's aligned index lists."""
    swa = quantize_kv_cache(torch.randn(4, page, 512).bfloat16())
    extra = quantize_kv_cache(torch.randn(6, extra_page, 512).bfloat16())
    indices = torch.randint(0, 4 * page, (batch, 1, topk), dtype=torch.int32)
    indices[0, 0, 40:] = -1  # SGLang pads with -1 to the 64 alignment
    extra_indices = torch.randint(0, 6 * extra_page, (batch, 1, extra_topk), dtype=torch.int32)
    kwargs = dict(
        q=torch.randn(batch, 1, HEADS, D_QK).bfloat16(),
        k_cache=swa,
        head_dim_v=D_V,
        softmax_scale=D_QK**-0.5,
        indices=indices,
        topk_length=torch.tensor([40, topk], dtype=torch.int32),
        attn_sink=torch.randn(HEADS),
        extra_k_cache=extra,
        extra_indices_in_kvcache=extra_indices,
        extra_topk_length=torch.tensor([extra_topk, 23], dtype=torch.int32),
    )
    return kwargs


def expected_decode(kw):
    return ref_sparse_decode(
        kw["q"],
        kw["k_cache"],
        kw["indices"],
        kw["topk_length"],
        kw["attn_sink"],
        kw["extra_k_cache"],
        kw["extra_indices_in_kvcache"],
        kw["extra_topk_length"],
        kw["softmax_scale"],
        d_v=kw["head_dim_v"],
    )


def assert_out_close(out, ref_out, kw):
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    # Column bound over every candidate row of both caches (tests/kernels/test_sparse_decode.py's rule).
    rows = [dequantize_kv_cache(kw[name]).float().reshape(-1, 512) for name in ("k_cache", "extra_k_cache")]
    colmax = torch.cat(rows).abs().amax(0)[: ref_out.shape[-1]]
    err = (out.float() - ref_out.float()).abs()
    allowed = OUT_COL_ATOL * colmax + OUT_RTOL * ref_out.float().abs() + 2.0**-120
    assert (err <= allowed).all(), f"max error {err.max().item():.3g}"


def test_0512_decode_route_matches_reference():
    plan = install_on_placeholder(route("sglang.route.decode_plan"))
    flash_mla = install_on_placeholder(route("sglang.route.decode"))
    kw = sparse_case()
    # deepseek_v4_backend 0.5.12: _create_flashmla_metadata() -> flash_mla.get_mla_metadata()[0]
    sched = plan.get_mla_metadata()[0]
    out = flash_mla.flash_mla_with_kvcache(
        q=kw["q"],
        k_cache=kw["k_cache"],
        head_dim_v=kw["head_dim_v"],
        block_table=None,
        cache_seqlens=None,
        tile_scheduler_metadata=sched,
        softmax_scale=kw["softmax_scale"],
        is_fp8_kvcache=True,
        indices=kw["indices"],
        topk_length=kw["topk_length"],
        attn_sink=kw["attn_sink"],
        extra_k_cache=kw["extra_k_cache"],
        extra_indices_in_kvcache=kw["extra_indices_in_kvcache"],
        extra_topk_length=kw["extra_topk_length"],
    )[0]
    ref_out, _ = expected_decode(kw)
    assert_out_close(out, ref_out, kw)
    # The same plan object serves the next layer of the same batch (SGLang keeps one per ratio).
    again = flash_mla.flash_mla_with_kvcache(
        q=kw["q"],
        k_cache=kw["k_cache"],
        head_dim_v=512,
        block_table=None,
        cache_seqlens=None,
        tile_scheduler_metadata=sched,
        softmax_scale=kw["softmax_scale"],
        is_fp8_kvcache=True,
        indices=kw["indices"],
        topk_length=kw["topk_length"],
        attn_sink=kw["attn_sink"],
        extra_k_cache=kw["extra_k_cache"],
        extra_indices_in_kvcache=kw["extra_indices_in_kvcache"],
        extra_topk_length=kw["extra_topk_length"],
    )[0]
    assert torch.equal(again, out)


def test_0512_indexer_routes_match_reference():
    deep_gemm = install_on_placeholder(route("sglang.route.indexer_logits"))
    schedule = install_on_placeholder(route("sglang.route.indexer_schedule"))
    batch, block_kv, blocks = 3, 64, 3
    keys = torch.randn(batch, blocks * block_kv, IDX_DIM)
    cache, table = ref_indexer.paged_cache_from_keys(keys, block_kv, physical_blocks=torch.randperm(batch * blocks))
    assert cache.shape[1:] == (block_kv, 1, 132)  # SGLang's view: (blocks, 64, 1, 132)
    q_fp8 = torch.randn(batch, IDX_HEADS, IDX_DIM).to(torch.float8_e4m3fn).unsqueeze(1)
    weights = torch.randn(batch, IDX_HEADS, 1).squeeze(2)  # [b, H, 1].squeeze(2)
    c4_lens = torch.tensor([1, 70, 190], dtype=torch.int32).unsqueeze(-1)  # 1-D lens get .unsqueeze(-1)
    meta = schedule.get_paged_mqa_logits_metadata(c4_lens, block_kv, 132)
    max_len = 190
    logits = deep_gemm.fp8_paged_mqa_logits(q_fp8, cache, weights, c4_lens, table, meta, max_len, False)
    k_blocks, scales = ref_indexer.split_fp8_paged_cache(cache)
    q_f = q_fp8.float()
    expected = ref_indexer.paged_mqa_logits(q_f, k_blocks, weights, c4_lens, table, max_len, scales)
    bound = ref_indexer.paged_mqa_logits(
        q_f.abs(), k_blocks.abs(), weights.abs(), c4_lens, table, max_len, scales.abs()
    )
    assert logits.shape == (batch, max_len)
    masked = expected == float("-inf")
    assert torch.equal(logits == float("-inf"), masked)
    assert ((logits[~masked] - expected[~masked]).abs() <= FP32_TOL * bound[~masked]).all()


def test_0512_mhc_prenorm_route_matches_reference():
    deep_gemm = install_on_placeholder(route("sglang.route.mhc_prenorm"))
    hc_mult, hidden, m = 4, 256, 5  # V4: hc_mult 4 (hidden 4096/7168)
    mix_hc = (2 + hc_mult) * hc_mult
    x = torch.randn(m, hc_mult, hidden).bfloat16()
    hc_fn = torch.randn(mix_hc, hc_mult * hidden) * 0.02
    x_flat = x.flatten(1).bfloat16()
    d_out = torch.empty((m, mix_hc), dtype=torch.float)
    s_out = torch.empty((m,), dtype=torch.float)
    deep_gemm.tf32_hc_prenorm_gemm(x_flat, hc_fn.float().contiguous(), d_out, s_out, num_splits=None)
    d_ref, s_ref = torch.empty_like(d_out), torch.empty_like(s_out)
    hc_prenorm_gemm(x_flat, hc_fn.float(), d_ref, s_ref)
    torch.testing.assert_close(d_out, d_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_out, s_ref, rtol=1e-5, atol=1e-5)


def sglang_0512_num_splits(num_tokens: int, hc_hidden_size: int, sms: int) -> int:
    """SGLang 0.5.12's own `_compute_num_split_for_mhc_pre` (layers/mhc.py), read from the official wheel
    and run as written, for a GPU with `sms` multiprocessors (it asks torch.cuda for the count)."""
    import ast

    from ci import upstream

    source = (upstream.source("sglang", "0.5.12") / "sglang/srt/layers/mhc.py").read_text()
    [fn] = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "_compute_num_split_for_mhc_pre"
    ]
    cuda = types.SimpleNamespace(get_device_properties=lambda index: types.SimpleNamespace(multi_processor_count=sms))
    namespace = {"torch": types.SimpleNamespace(cuda=cuda)}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "sglang/srt/layers/mhc.py", "exec"), namespace)  # noqa: S102
    return namespace["_compute_num_split_for_mhc_pre"](num_tokens, hc_hidden_size)


@pytest.mark.parametrize("num_tokens,sms", [(5, 188), (70, 48)])  # RTX PRO 6000 (188 SMs), GB10 (48)
def test_0512_mhc_prenorm_route_from_the_default_caller_mhc_pre(num_tokens, sms):
    """The default caller (SGLANG_OPT_USE_TILELANG_MHC_PRE is on in 0.5.12): layers/mhc.py:mhc_pre asks for
    SGLang's split count and passes 3-D split-K outputs, which its fused TileLang kernel then sums:
    `tf32_hc_prenorm_gemm(residual_flat.view(num_tokens, hc_hidden_size), fn, gemm_out_mul [S, m, mix],
    gemm_out_sqrsum [S, m], num_splits=S)`."""
    deep_gemm = install_on_placeholder(route("sglang.route.mhc_prenorm"))
    hc_mult, hidden = 4, 4096  # V4-Flash: hc_mult 4, hidden 4096
    hc_mult3, hc_hidden = hc_mult * 2 + hc_mult * hc_mult, hc_mult * hidden
    residual = torch.randn(num_tokens, hc_mult, hidden).bfloat16()
    fn = torch.randn(hc_mult3, hc_hidden) * 0.02
    n_splits = sglang_0512_num_splits(num_tokens, hc_hidden, sms)
    assert n_splits > 1  # the split-K form, not the 2-D one
    gemm_out_mul = torch.empty(n_splits, num_tokens, hc_mult3, dtype=torch.float32)
    gemm_out_sqrsum = torch.empty(n_splits, num_tokens, dtype=torch.float32)
    residual_flat = residual.view(-1, hc_mult, hidden)
    deep_gemm.tf32_hc_prenorm_gemm(
        residual_flat.view(num_tokens, hc_hidden), fn, gemm_out_mul, gemm_out_sqrsum, num_splits=n_splits
    )
    d_ref = torch.empty(num_tokens, hc_mult3)
    s_ref = torch.empty(num_tokens)
    hc_prenorm_gemm(residual_flat.view(num_tokens, hc_hidden), fn, d_ref, s_ref)
    torch.testing.assert_close(gemm_out_mul.sum(0), d_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm_out_sqrsum.sum(0), s_ref, rtol=1e-5, atol=1e-4)


@pytest.fixture
def sglang_sm120():
    """The real SGLang SM120 module of the installed SGLang (0.5.23 in the test environment)."""
    module = pytest.importorskip(
        "sglang.kernels.ops.attention.flash_mla_sm120",
        reason="needs the installed SGLang >= 0.5.16 (the test environment has 0.5.23)",
    )
    patch = route("sglang.route.decode_sm120")
    original = module.flash_mla_with_kvcache_sm120
    target = patching.resolve(patch, module)
    assert patch.check(target) is None
    undo = patch.install(target)
    try:
        yield module, original
    finally:
        undo()
    assert module.flash_mla_with_kvcache_sm120 is original


def test_sm120_route_on_real_sglang_matches_reference_and_sglang_fallback(sglang_sm120):
    module, original = sglang_sm120
    kw = sparse_case()
    out = module.flash_mla_with_kvcache_sm120(**kw)[0]  # the 0.5.23 call site's keywords
    ref_out, _ = expected_decode(kw)
    assert_out_close(out, ref_out, kw)
    # SGLang's own pure-PyTorch SM120 path (what SGLANG_SM120_FLASHMLA_BACKEND=torch runs) agrees too.
    theirs, _ = module._sm120_sparse_decode_fwd(
        kw["q"],
        kw["k_cache"],
        kw["indices"],
        kw["topk_length"],
        kw["attn_sink"],
        kw["head_dim_v"],
        kw["softmax_scale"],
        kw["extra_k_cache"],
        kw["extra_indices_in_kvcache"],
        kw["extra_topk_length"],
    )
    assert_out_close(out, theirs.to(torch.bfloat16).reshape(out.shape), kw)


def test_sm120_route_rejects_a_keyword_sglang_never_passes(sglang_sm120):
    module, _ = sglang_sm120
    kw = sparse_case()
    with pytest.raises(TypeError, match="block_table"):
        module.flash_mla_with_kvcache_sm120(block_table=None, **kw)
