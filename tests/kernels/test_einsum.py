"""fp8_einsum("bhr,hdr->bhd") (Triton) against its reference: V4's grouped wo_a projection.

Real V4 dims in the main test: h = o_groups = 8, r = 8 heads x 512 = 4096, d = o_lora_rank = 1024,
with b = 1 and b = 19 tokens (not a multiple of the batch tile: 16 to 64 rows on a GPU, 32 in the
interpreter), in the layouts vLLM passes:
- SM90 recipe (1, 128, 128): activation scales float32, TMA-aligned and MN-major; weight scales
  the checkpoint's float32 128x128 blocks;
- SM100/SM12x recipe (1, 1, 128): activation scales int32 packed UE8M0, TMA-aligned, MN-major;
  weight scales int32 packed UE8M0 per row (DeepGEMM's transform), MN-major;
and in both, activations stored group-major and seen through .transpose(0, 1)
(vLLM's `fused_inv_rope_fp8_quant`). Edge-case tests use smaller r and d to keep the
interpreter fast.

Tolerance, stated once: the kernel rounds its fp32 result to bf16 (half an ulp: 2^-9 relative)
and sums in a different order from the reference (fp32 over r = 4096 terms: below 2^-12 of
S = |A| @ |W|^T, the sum of |terms| of the dequantised operands). We allow
|d - ref| <= 2^-8 |ref| + 2^-12 S. FP8 products are exact in fp32, and power-of-two scales
multiply exactly, so the bound holds for any scale magnitudes that stay in range.
"""

import pytest
import torch

from ds_plugins.kernels import einsum as einsum_module
from ds_plugins.kernels._runtime import KernelInputError, use_triton
from ds_plugins.kernels.einsum import fp8_einsum
from ds_plugins.kernels.reference.einsum import (
    block_scales,
    dequantize,
    fp8_einsum_bhr_hdr_bhd,
    pack_ue8m0,
    quantize_per_block,
    quantize_per_token,
    unpack_ue8m0,
)

EXPR = "bhr,hdr->bhd"
GROUPS, RANK_IN, RANK_OUT = 8, 4096, 1024  # o_groups, 8 heads x 512, o_lora_rank
REL, ABS_REL = 2.0**-8, 2.0**-12


def _tma_aligned(n: int) -> int:
    return -(-n // 4) * 4  # 16-byte alignment of 4-byte scale elements


def _mn_major(sf: torch.Tensor) -> torch.Tensor:
    """[G, MN, L] -> same values in a TMA-aligned MN-major buffer (stride 1 along MN)."""
    g, mn, last = sf.shape
    mn_al = _tma_aligned(mn)
    buf = torch.zeros(g * last * mn_al, dtype=sf.dtype, device=sf.device)
    buf = buf.as_strided((g, mn, last), (last * mn_al, 1, mn_al))
    buf.copy_(sf)
    return buf


def _vllm_activation(values: torch.Tensor, scales: torch.Tensor, packed: bool):
    """Activations as vLLM's fused_inv_rope_fp8_quant returns them: [T, G, r] views of group-major buffers."""
    group_major_values = values.transpose(0, 1).contiguous()  # [G, T, r]
    sf = pack_ue8m0(scales) if packed else scales  # [T, G, L]
    return group_major_values.transpose(0, 1), _mn_major(sf.transpose(0, 1)).transpose(0, 1)


def _vllm_weight(values: torch.Tensor, block_sf: torch.Tensor, packed: bool):
    """SM90: 128x128 float32 block scales as loaded; SM12x: per-row packed UE8M0, MN-major (DeepGEMM's transform)."""
    if not packed:
        return values, block_sf
    per_row = block_sf.repeat_interleave(128, dim=1)[:, : values.shape[1]]
    return values, _mn_major(pack_ue8m0(per_row))


def _block_magnitudes(*block_shape, block_dims, device):
    """2^U{-6..6} per block, expanded by 128 along block_dims: every 128-block gets its own scale."""
    mags = torch.exp2(torch.randint(-6, 7, block_shape, device=device).float())
    for dim in block_dims:
        mags = mags.repeat_interleave(128, dim=dim)
    return mags


def _problem(batch, groups, rank_in, rank_out, device, packed=True):
    x = torch.randn(batch, groups, rank_in, device=device) * _block_magnitudes(
        batch, groups, rank_in // 128, block_dims=(-1,), device=device
    )
    w = (
        torch.randn(groups, rank_out, rank_in, device=device)
        * 0.02
        * _block_magnitudes(groups, rank_out // 128, rank_in // 128, block_dims=(-2, -1), device=device)
    )
    xq, xs = quantize_per_token(x)
    wq, ws = quantize_per_block(w)
    a = _vllm_activation(xq, xs, packed)
    b = _vllm_weight(wq, ws, packed)
    recipe = (1, 1, 128) if packed else (1, 128, 128)
    return a, b, recipe, (dequantize(xq, xs), dequantize(wq, ws, 128))


def _assert_matches(d, a_deq, w_deq, c=None):
    ref = torch.einsum("bhr,hdr->bhd", a_deq, w_deq) + (0 if c is None else c.float())
    bound = torch.einsum("bhr,hdr->bhd", a_deq.abs(), w_deq.abs())
    err = (d.float() - ref).abs()
    assert torch.isfinite(d.float()).all()
    assert (err <= REL * ref.abs() + ABS_REL * bound).all(), (err / (REL * ref.abs() + ABS_REL * bound)).max()


@pytest.mark.parametrize("layout,batch", [("sm90", 19), ("sm12x", 1), ("sm12x", 19)])
def test_fp8_einsum_matches_reference_v4_dims(device, layout, batch):
    a, b, recipe, (a_deq, w_deq) = _problem(batch, GROUPS, RANK_IN, RANK_OUT, device, packed=layout == "sm12x")
    d = torch.full((batch, GROUPS, RANK_OUT), float("nan"), device=device, dtype=torch.bfloat16)
    assert use_triton(a[0])
    assert fp8_einsum(EXPR, a, b, d, recipe=recipe) is None
    _assert_matches(d, a_deq, w_deq)
    # the reference, through the same layouts, agrees with the plain dequantised product
    d_ref = torch.empty(batch, GROUPS, RANK_OUT, device=device)
    fp8_einsum_bhr_hdr_bhd(a, b, d_ref, recipe=recipe)
    torch.testing.assert_close(d_ref, torch.einsum("bhr,hdr->bhd", a_deq, w_deq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("alias", [False, True])
def test_fp8_einsum_accumulates_into_c(device, dtype, alias):
    """DeepGEMM's semantics: d = c + a @ b; c may be d itself (in-place accumulation)."""
    a, b, recipe, (a_deq, w_deq) = _problem(5, GROUPS, 512, 256, device, packed=True)
    c = torch.randn(5, GROUPS, 256, device=device).to(dtype)
    c_copy = c.clone()
    d = c if alias else torch.empty_like(c)
    fp8_einsum(EXPR, a, b, d, c=c, recipe=recipe)
    _assert_matches(d, a_deq, w_deq, c=c_copy)
    if not alias:
        assert torch.equal(c, c_copy)


@pytest.mark.parametrize("packed", [False, True])
def test_fp8_einsum_scale_extremes(device, packed):
    """Scales from 2^-40 to 2^40 per block (activation and weight independently), FP8 values at
    +-448 and at the smallest e4m3 subnormal (2^-9): products stay within fp32/bf16 range."""
    batch, rank_in, rank_out = 5, 1024, 256
    gen = torch.Generator().manual_seed(1)
    xq = (torch.randn(batch, GROUPS, rank_in, generator=gen) * 100).to(torch.float8_e4m3fn)
    wq = (torch.randn(GROUPS, rank_out, rank_in, generator=gen) * 100).to(torch.float8_e4m3fn)
    for t in (xq, wq):  # plant the extremes of e4m3
        flat = t.view(-1)
        flat[::7] = 448.0
        flat[3::11] = -448.0
        flat[5::13] = 2.0**-9
    xs = torch.exp2(torch.randint(-40, 41, (batch, GROUPS, rank_in // 128), generator=gen).float())
    ws = torch.exp2(torch.randint(-40, 41, (GROUPS, rank_out // 128, rank_in // 128), generator=gen).float())
    xq, wq, xs, ws = (t.to(device) for t in (xq, wq, xs, ws))
    a = _vllm_activation(xq, xs, packed)
    b = _vllm_weight(wq, ws, packed)
    d = torch.empty(batch, GROUPS, rank_out, device=device, dtype=torch.bfloat16)
    fp8_einsum(EXPR, a, b, d, recipe=(1, 1, 128) if packed else (1, 128, 128))
    _assert_matches(d, dequantize(xq, xs), dequantize(wq, ws, 128))


def test_fp8_einsum_empty_batch_is_a_no_op(device):
    a, b, recipe, _ = _problem(1, GROUPS, 256, 128, device)
    a = (a[0][:0], a[1][:0])
    d = torch.empty(0, GROUPS, 128, device=device, dtype=torch.bfloat16)
    assert fp8_einsum(EXPR, a, b, d, recipe=recipe) is None


# ---- the reference's own building blocks --------------------------------------------------------


def test_ue8m0_packing_is_little_endian_by_block():
    # word 0x807F7E81: byte 0 (block 0) = 0x81 -> 2^2, byte 1 = 0x7E -> 2^-1, byte 2 = 0x7F -> 1, byte 3 = 0x80 -> 2
    word = torch.tensor([[0x807F7E81 - 2**32]], dtype=torch.int32)
    assert unpack_ue8m0(word, 4).tolist() == [[4.0, 0.5, 1.0, 2.0]]
    assert unpack_ue8m0(word, 3).tolist() == [[4.0, 0.5, 1.0]]
    scales = torch.exp2(torch.randint(-100, 101, (3, 7)).float())
    assert torch.equal(block_scales(pack_ue8m0(scales), 7 * 128), scales)


def test_reference_contracts_the_right_indices():
    """Small integers (exact in e4m3) and unit scales: the reference is an exact integer einsum."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 5, (3, 2, 256), generator=gen).float()
    w = torch.randint(-4, 5, (2, 130, 256), generator=gen).float()
    a = (x.to(torch.float8_e4m3fn), torch.ones(3, 2, 2))
    for recipe, sw in (((1, 128, 128), torch.ones(2, 2, 2)), ((1, 1, 128), torch.ones(2, 130, 2))):
        d = torch.empty(3, 2, 130)
        fp8_einsum_bhr_hdr_bhd(a, (w.to(torch.float8_e4m3fn), sw), d, recipe=recipe)
        assert torch.equal(d, torch.einsum("bhr,hdr->bhd", x, w))


def test_quantisers_round_scales_to_powers_of_two_within_e4m3_precision():
    x = torch.randn(4, 3, 300) * 10
    q, s = quantize_per_token(x)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    err = (dequantize(q, s) - x).abs()
    assert (err <= 2.0**-4 * x.abs() + 2.0**-9 * s.repeat_interleave(128, -1)[..., :300]).all()
    w = torch.randn(2, 200, 300)
    q, s = quantize_per_block(w)
    assert s.shape == (2, 2, 3)
    assert (dequantize(q, s, 128) - w).abs().max() <= 2.0**-4 * w.abs().max()


# ---- bad input: a KernelInputError naming the argument, raised before any launch ----------------


def _good():
    a, b, recipe, _ = _problem(3, GROUPS, 256, 128, "cpu", packed=True)
    return dict(expr=EXPR, a=a, b=b, d=torch.empty(3, GROUPS, 128, dtype=torch.bfloat16), c=None, recipe=recipe)


def _set(key, index, value):
    def corrupt(g):
        if index is None:
            g[key] = value(g)
        else:
            pair = list(g[key])
            pair[index] = value(g)
            g[key] = tuple(pair)

    return corrupt


BAD_INPUTS = [
    ("expr", _set("expr", None, lambda g: "bhd,hdr->bhr")),  # other expression
    ("expr", _set("expr", None, lambda g: None)),
    ("recipe", _set("recipe", None, lambda g: (1, 128, 32))),  # gran_k 32 (FP4 recipes)
    ("recipe", _set("recipe", None, lambda g: (128, 1, 128))),
    ("recipe", _set("recipe", None, lambda g: (1, 64, 128))),
    ("a", _set("a", None, lambda g: g["a"][0])),  # not a pair
    ("a\\[0\\]", _set("a", 0, lambda g: g["a"][0].to(torch.bfloat16))),  # wrong dtype
    ("a\\[0\\]", _set("a", 0, lambda g: g["a"][0][0])),  # wrong rank
    ("b\\[0\\]", _set("b", 0, lambda g: g["b"][0][:, :, :128])),  # wrong last dim (r)
    ("b\\[0\\]", _set("b", 0, lambda g: g["b"][0][:4])),  # mismatched groups
    ("a\\[1\\]", _set("a", 1, lambda g: g["a"][1][:2])),  # mismatched batch
    ("a\\[1\\]", _set("a", 1, lambda g: g["a"][1].float())),  # float32 but packed width
    ("a\\[1\\]", _set("a", 1, lambda g: g["a"][1].to(torch.int64))),  # wrong dtype
    ("b\\[1\\]", _set("b", 1, lambda g: torch.ones(GROUPS, 1, 2))),  # 128x128 blocks, per-row recipe
    ("d", _set("d", None, lambda g: g["d"].half())),  # wrong dtype
    ("d", _set("d", None, lambda g: torch.empty(4, GROUPS, 128, dtype=torch.bfloat16))),  # mismatched batch
    ("d", _set("d", None, lambda g: torch.empty(3, GROUPS, 64, dtype=torch.bfloat16))),  # wrong last dim
    ("c", _set("c", None, lambda g: torch.empty(3, GROUPS, 128))),  # dtype differs from d
    ("c", _set("c", None, lambda g: torch.empty(3, GROUPS, 64, dtype=torch.bfloat16))),
]


@pytest.mark.parametrize("name,corrupt", BAD_INPUTS)
def test_bad_input_names_the_argument_before_launch(monkeypatch, name, corrupt):
    def launched(*_):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(einsum_module, "_launch_triton", launched)
    monkeypatch.setattr(einsum_module, "_launch_reference", launched)
    args = _good()
    corrupt(args)
    with pytest.raises(KernelInputError, match=rf"^{name}:"):
        fp8_einsum(**args)
