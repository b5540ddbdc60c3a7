"""Run inside a real vLLM (tests/engines/test_vllm_routes.py): call each routed seam exactly as vLLM's
DeepSeek-V4 code calls it, through the name bound in vLLM's own module, and compare with the references.

Needs DS_PLUGINS_SIMULATE for an SM12x GPU whose libraries lack the kernels (so every route is selected)
and TRITON_INTERPRET=1 (our Triton kernels run on the CPU interpreter). Prints one "SEAM <name> ok" line
per seam; any mismatch raises.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

import vllm.plugins

vllm.plugins.load_general_plugins()

from vllm.version import __version__ as VLLM  # noqa: E402

from ds_plugins.kernels.kv_cache import dequantize_kv_cache, quantize_kv_cache  # noqa: E402
from ds_plugins.kernels.reference import einsum as ref_einsum  # noqa: E402
from ds_plugins.kernels.reference import indexer as ref_indexer  # noqa: E402
from ds_plugins.kernels.reference.mhc import hc_prenorm_gemm as ref_prenorm  # noqa: E402
from ds_plugins.kernels.reference.sparse_mla import ref_flash_mla_sparse_fwd, ref_sparse_decode  # noqa: E402
from ds_plugins.vllm.dsv4 import routes  # noqa: E402

torch.manual_seed(0)
V = tuple(int(x) for x in VLLM.split(".")[:2])
HEADS = 64  # vLLM pads V4's query heads to 64 or 128 for the FlashMLA-shaped path
ROW = 512


def site(route_id: str):
    """The module that holds this route's site in this vLLM, and the bound name."""
    for r in routes.ROUTES:
        if r.id == "vllm.route." + route_id and routes._function_patch(r).covers(VLLM):
            module = importlib.import_module(r.module)
            fn = getattr(module, r.attribute)
            assert getattr(fn, "__ds_plugins_route__", None) == r.id, f"{r.module}.{r.attribute} is not routed"
            return module, fn
    raise AssertionError(f"no {route_id} site for vLLM {VLLM}")


def ok(name: str) -> None:
    print(f"SEAM {name} ok", flush=True)


def close_bf16(out, ref, colmax, what):
    bound = 2.0**-8 * colmax + 2.0**-7 * ref.float().abs()
    err = (out.float() - ref.float()).abs()
    assert bool((err <= bound + 2.0**-120).all()), f"{what}: max excess {(err - bound).max().item()}"


def flashmla_module():
    return "decode_legacy" if V < (0, 22) else "decode"


# --- sparse decode, as DeepseekV4FlashMLAAttention._forward_decode calls it ------------------------------------
def decode():
    _, flash_mla_with_kvcache = site(flashmla_module())
    tokens, page, window, extra_page, extra_topk = 2, 64, 16, 16, 16
    swa = quantize_kv_cache(torch.randn(3, page, ROW).bfloat16())  # [blocks, page, 1, 584]
    comp = quantize_kv_cache(torch.randn(2, extra_page, ROW).bfloat16())
    q = torch.randn(tokens, HEADS, ROW).bfloat16()
    swa_indices = torch.randint(0, 3 * page, (tokens, 1, window), dtype=torch.int32)
    swa_indices[1, 0, -3:] = -1
    swa_lens = torch.tensor([window, window - 2], dtype=torch.int32)
    topk_indices = torch.randint(0, 2 * extra_page, (tokens, 1, extra_topk), dtype=torch.int32)
    topk_lens = torch.tensor([extra_topk, 5], dtype=torch.int32)
    sink = torch.randn(HEADS)
    output = torch.zeros(tokens, HEADS, ROW, dtype=torch.bfloat16)
    from vllm.v1.attention.ops.flashmla import FlashMLASchedMeta  # what vLLM's builder hands out

    plan = FlashMLASchedMeta()
    scale = ROW**-0.5
    for _ in range(2):  # the second call reuses the plan fixed by the first, as FlashMLA's does
        result, lse = flash_mla_with_kvcache(
            q=q.unsqueeze(1),
            k_cache=swa,
            block_table=None,
            head_dim_v=512,
            tile_scheduler_metadata=plan,
            cache_seqlens=None,
            is_fp8_kvcache=True,
            indices=swa_indices,
            topk_length=swa_lens,
            softmax_scale=scale,
            attn_sink=sink,
            extra_k_cache=comp,
            extra_indices_in_kvcache=topk_indices,
            extra_topk_length=topk_lens,
            out=output.unsqueeze(1),
        )
    assert result.data_ptr() == output.data_ptr(), "out= was not written in place"
    ref_out, ref_lse = ref_sparse_decode(
        q.unsqueeze(1), swa, swa_indices, swa_lens, sink, comp, topk_indices, topk_lens, scale
    )
    colmax = torch.cat([dequantize_kv_cache(c).float().reshape(-1, ROW) for c in (swa, comp)]).abs().amax(0)
    close_bf16(output.unsqueeze(1), ref_out, colmax, "decode out")
    torch.testing.assert_close(lse, ref_lse, rtol=2.0**-15, atol=2.0**-15)
    ok("decode")


# --- sparse prefill, as _forward_prefill calls it ----------------------------------------------------------
def prefill():
    _, flash_mla_sparse_fwd = site("prefill_legacy" if V < (0, 22) else "prefill")
    tokens, rows, topk = 3, 40, 24
    q = torch.randn(tokens, HEADS, ROW).bfloat16()
    kv = torch.randn(rows, ROW).bfloat16()
    combined = torch.randint(0, rows, (tokens, topk), dtype=torch.int32)
    combined[0, -4:] = -1
    lens = torch.tensor([topk - 4, topk, 7], dtype=torch.int32)
    sink = torch.randn(HEADS)
    output = torch.zeros(tokens + 2, HEADS, ROW, dtype=torch.bfloat16)
    flash_mla_sparse_fwd(
        q=q[0:tokens],
        kv=kv.view(-1, 1, q.shape[-1]),
        indices=combined.unsqueeze(1),
        sm_scale=ROW**-0.5,
        attn_sink=sink,
        topk_length=lens,
        out=output[0:tokens],
    )
    ref_out, _, _ = ref_flash_mla_sparse_fwd(q, kv.view(-1, 1, ROW), combined.unsqueeze(1), ROW**-0.5, 512, sink, lens)
    close_bf16(output[:tokens], ref_out, kv.float().abs().amax(0), "prefill out")
    assert not output[tokens:].any(), "prefill wrote outside out="
    ok("prefill")


# --- decode plans: vLLM's own builder method, on a stand-in SM120 platform ------------------------------------
def decode_plans():
    sparse_swa = importlib.import_module("vllm.v1.attention.backends.mla.sparse_swa")
    from ds_plugins.kernels.sparse_mla import SparseDecodeSchedMeta

    builder = sparse_swa.DeepseekSparseSWAMetadataBuilder
    me = types.SimpleNamespace(_layer_types=list(getattr(sparse_swa, "_LAYER_TYPES", ())) or None)
    if me._layer_types is None:  # the layer-type names are module constants in every version read
        me._layer_types = [v for k, v in vars(sparse_swa).items() if k.startswith("_LAYER_TYPE_")]
    plans = builder.build_tile_scheduler(me, 3)
    assert plans and all(isinstance(p, SparseDecodeSchedMeta) for p in plans.values() if p is not None), plans
    if V >= (0, 24):
        real = sparse_swa.current_platform
        sparse_swa.current_platform = types.SimpleNamespace(  # the GPU vLLM would see on an RTX PRO 6000
            is_rocm=lambda: False, is_xpu=lambda: False, is_device_capability_family=lambda c: c == 120
        )
        try:
            plans = builder.build_tile_scheduler(me, 3)
            assert all(isinstance(p, SparseDecodeSchedMeta) for p in plans.values()), plans
            assert all(p is None for p in builder.build_tile_scheduler(me, 0).values())
        finally:
            sparse_swa.current_platform = real
    ok("decode_plans")


# --- attention class on SM12x (0.24+): vLLM's own selector, on a stand-in SM120 platform ----------------------
def attention_class():
    if V < (0, 24):
        return
    model = importlib.import_module("vllm.models.deepseek_v4.nvidia.model")
    real = model.current_platform
    cap = types.SimpleNamespace(major=12, minor=0)
    model.current_platform = types.SimpleNamespace(
        get_device_capability=lambda *a, **k: cap,
        is_device_capability=lambda *a: False,
        is_device_capability_family=lambda c: c == 120,
    )
    config = types.SimpleNamespace(attention_config=types.SimpleNamespace(backend=None))
    try:
        chosen = model._select_dsv4_attn_cls(config)
        shipped = model._select_dsv4_attn_cls.__wrapped__(config)
    finally:
        model.current_platform = real
    assert shipped is model.DeepseekV4FlashInferSM120Attention, shipped
    assert chosen is model.DeepseekV4FlashMLAAttention, chosen
    ok("attention_class")


# --- indexer logits, as sparse_attn_indexer calls them -----------------------------------------------------
def indexer():
    module, logits_fn = site("indexer_logits")
    _, paged_fn = site("indexer_paged_logits")
    _, schedule_fn = site("indexer_schedule")
    heads, dim = 64, 128
    m, n = 5, 37
    q = torch.randn(m, heads, dim)
    q_fp8 = q.to(torch.float8_e4m3fn)
    k_fp8, k_scale = ref_indexer.quantize_fp8_keys(torch.randn(n, dim))
    weights = torch.randn(m, heads)
    ks = torch.tensor([0, 0, 3, 10, 20], dtype=torch.int32)
    ke = torch.tensor([5, 12, 20, 30, 37], dtype=torch.int32)
    if "max_seqlen_k" in (routes.parameters(logits_fn.__wrapped__) or ()):
        got = logits_fn((q_fp8, None), (k_fp8, k_scale), weights, ks, ke, 20)
        want = ref_indexer.mqa_logits(q_fp8.float(), k_fp8.float(), weights, ks, ke, k_scale, 20)
    else:
        got = logits_fn((q_fp8, None), (k_fp8, k_scale), weights, ks, ke, clean_logits=False)
        want = ref_indexer.mqa_logits(q_fp8.float(), k_fp8.float(), weights, ks, ke, k_scale)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "logits masks differ"
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-3)

    batch, next_n, block_kv = 2, 1, 64
    lens = torch.tensor([[70], [9]], dtype=torch.int32)
    keys = torch.randn(batch, 2 * block_kv, dim)
    cache, table = ref_indexer.paged_cache_from_keys(keys, block_kv, physical_blocks=torch.tensor([1, 0, 3, 2]))
    assert cache.dtype == torch.uint8 and tuple(cache.shape[1:]) == (block_kv, 1, dim + 4), cache.shape
    qd = torch.randn(batch, next_n, heads, dim).to(torch.float8_e4m3fn)
    w = torch.randn(batch * next_n, heads)
    schedule = schedule_fn(lens, block_kv, 132)
    kw = {} if V >= (0, 33) else {"clean_logits": False}
    got = paged_fn((qd, None), cache, w, lens, table, schedule, max_model_len=160, **kw)
    blocks, scales = ref_indexer.split_fp8_paged_cache(cache)
    want = ref_indexer.paged_mqa_logits(qd.float(), blocks, w, lens, table, 160, scales)
    finite = torch.isfinite(want)
    assert got.shape == (batch * next_n, 160) and torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-3)
    ok("indexer")


# --- grouped o_proj (wo_a), as deep_gemm_fp8_o_proj / the einsum custom op calls it ----------------------------
def o_proj():
    name = "o_proj_einsum_legacy" if V < (0, 22) else "o_proj_einsum_op" if V < (0, 23) else "o_proj_einsum"
    _, fp8_einsum = site(name)
    tokens, groups, r, d = 3, 2, 256, 256
    o_fp8, o_scale = ref_einsum.quantize_per_token(torch.randn(tokens, groups, r))
    w_fp8, w_scale = ref_einsum.quantize_per_block(torch.randn(groups, d, r))
    z = torch.empty(tokens, groups, d, dtype=torch.bfloat16)
    fp8_einsum("bhr,hdr->bhd", (o_fp8, o_scale), (w_fp8, w_scale), z, recipe=(1, 128, 128))
    want = torch.empty(tokens, groups, d, dtype=torch.float32)
    ref_einsum.fp8_einsum_bhr_hdr_bhd((o_fp8, o_scale), (w_fp8, w_scale), want, recipe=(1, 128, 128))
    torch.testing.assert_close(z.float(), want, rtol=2.0**-7, atol=1e-2)
    # SM12x takes vLLM's SM100 recipe (1, 1, 128): packed UE8M0 activation scales, per-row weight scales
    z2 = torch.empty_like(z)
    w_rows = w_scale.repeat_interleave(128, dim=1)[:, :d]
    fp8_einsum(
        "bhr,hdr->bhd",
        (o_fp8, ref_einsum.pack_ue8m0(o_scale)),
        (w_fp8, ref_einsum.pack_ue8m0(w_rows)),
        z2,
        recipe=(1, 1, 128),
    )
    torch.testing.assert_close(z2.float(), want, rtol=2.0**-7, atol=1e-2)
    ok("o_proj")


# --- mHC prenorm, as the tilelang mHC module calls it (function-local import) --------------------------------
def mhc():
    _, fn = site("mhc_prenorm")
    from vllm.utils.deep_gemm import tf32_hc_prenorm_gemm

    assert tf32_hc_prenorm_gemm is fn
    tokens, hc, hidden, splits = 4, 4, 64, 2
    residual_2d = torch.randn(tokens, hc * hidden).bfloat16()
    weight = torch.randn((2 + hc) * hc, hc * hidden)
    out = torch.empty(splits, tokens, (2 + hc) * hc)
    sqrsum = torch.empty(splits, tokens)
    tf32_hc_prenorm_gemm(residual_2d, weight, out, sqrsum, splits)
    want_d, want_s = torch.empty_like(out), torch.empty_like(sqrsum)
    ref_prenorm(residual_2d, weight, want_d, want_s, splits)
    torch.testing.assert_close(out, want_d, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sqrsum, want_s, rtol=1e-4, atol=1e-3)
    ok("mhc")


for check in (decode, prefill, decode_plans, attention_class, indexer, o_proj, mhc):
    check()
print("problems", routes.problems(), file=sys.stderr)
