"""`fp8_einsum`: DeepGEMM's grouped FP8 einsum for V4's wo_a, "bhr,hdr->bhd", as a Triton kernel.

    d[b, h, n] = c[b, h, n] + sum_r A[b, h, r] W[h, n, r]     A, W float8_e4m3fn with block scales

Contract (DeepGEMM `fp8_einsum(expr, a, b, d, c=None, recipe=(1, 128, 128))`, returns None):
a = (A [b, h, r], A's scales), b = (W [h, d, r], W's scales), d [b, h, d] bf16 (or fp32), c
optional with d's shape and dtype (may be d itself). Only "bhr,hdr->bhd" is supported.

Scale layouts accepted (reference/einsum.py defines the encodings):
- recipe (1, 128, 128), what vLLM passes on SM90: A scales float32 [b, h, r/128], W scales
  float32 [h, d/128, r/128] (the checkpoint's 128x128 blocks).
- recipe (1, 1, 128), what vLLM passes on SM100 and SM12x: A scales int32 [b, h, r/512] packed
  UE8M0, W scales int32 [h, d, r/512] packed UE8M0 per row (DeepGEMM's transform of the 128x128
  scales); float32 [.., r/128] scales are accepted with this recipe too.
Any strides are accepted, so the TMA-aligned, MN-major ("transposed") scale buffers that
`fused_inv_rope_fp8_quant` writes, and its group-major activation buffer seen through
`.transpose(0, 1)`, are read in place with no copy. float32 scales are used exactly (DeepGEMM
would round them to powers of two on SM100/SM12x; real scales already are).
Rejected with a KernelInputError naming the argument: any other expression, gran_m != 1,
gran_k != 128, gran_n other than 1 or 128, scale tensors of another dtype or shape.

Kernel: one program per (tile of b, group h, tile of d). For each 128-wide block of r it does an
FP8 dot into a fresh fp32 tile and adds it scaled by (A's scale per row) x (W's scale per
column): promotion per scale block, as DeepGEMM does. The grid depends on shapes only.
"""

from __future__ import annotations

import numbers

import torch

from ds_plugins.kernels._runtime import HAVE_TRITON, INTERPRET, KernelInputError, expect, next_pow2, use_triton
from ds_plugins.kernels.reference.einsum import (
    SCALE_BLOCK_K,
    fp8_einsum_bhr_hdr_bhd,
    num_packed_words,
    num_scale_blocks,
)

SUPPORTED_EXPR = "bhr,hdr->bhd"
SUPPORTED_GRAN_N = (1, 128)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ds_plugins.kernels._tl import dot

    @triton.jit
    def _fp8_bhr_hdr_bhd_kernel(
        a_ptr,
        sa_ptr,
        w_ptr,
        sw_ptr,
        c_ptr,
        d_ptr,
        B,
        D,
        R,
        stride_ab,
        stride_ah,
        stride_ar,
        stride_sab,
        stride_sah,
        stride_sak,
        stride_wh,
        stride_wd,
        stride_wr,
        stride_swh,
        stride_swd,
        stride_swk,
        stride_cb,
        stride_ch,
        stride_cd,
        stride_db,
        stride_dh,
        stride_dd,
        GRAN_N: tl.constexpr,
        A_PACKED: tl.constexpr,
        W_PACKED: tl.constexpr,
        HAS_C: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)

        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K)
        mask_b = offs_b < B
        mask_d = offs_d < D
        a_rows = a_ptr + h * stride_ah + offs_b.to(tl.int64)[:, None] * stride_ab
        w_cols = w_ptr + h * stride_wh + offs_d.to(tl.int64)[None, :] * stride_wd
        sa_rows = sa_ptr + h * stride_sah + offs_b.to(tl.int64) * stride_sab
        # output row n of W reads scale row n // gran_n (gran_n = 128: the checkpoint's blocks; 1: per row)
        sw_rows = sw_ptr + h * stride_swh + (offs_d // GRAN_N).to(tl.int64) * stride_swd

        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
        for kb in range(0, tl.cdiv(R, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            mask_k = k < R
            a = tl.load(a_rows + k[None, :] * stride_ar, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_cols + k[:, None] * stride_wr, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            block = dot(a, w, tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32), INTERPRET)
            # Scales of block kb: float32, or UE8M0 byte kb % 4 of int32 word kb // 4 (2^(byte-127),
            # built by placing the byte in a float32's exponent field). Inlined, not a helper: each
            # nested jit call costs a builtin re-patch in the interpreter.
            if A_PACKED:
                a_word = tl.load(sa_rows + (kb // 4) * stride_sak, mask=mask_b, other=0)
                a_scale = (((a_word >> ((kb % 4) * 8)) & 0xFF) << 23).to(tl.float32, bitcast=True)
            else:
                a_scale = tl.load(sa_rows + kb * stride_sak, mask=mask_b, other=0.0)
            if W_PACKED:
                w_word = tl.load(sw_rows + (kb // 4) * stride_swk, mask=mask_d, other=0)
                w_scale = (((w_word >> ((kb % 4) * 8)) & 0xFF) << 23).to(tl.float32, bitcast=True)
            else:
                w_scale = tl.load(sw_rows + kb * stride_swk, mask=mask_d, other=0.0)
            acc += block * a_scale[:, None] * w_scale[None, :]

        mask = mask_b[:, None] & mask_d[None, :]
        if HAS_C:  # c may alias d: each element is read and then written by this program only
            acc += tl.load(
                c_ptr + h * stride_ch + offs_b.to(tl.int64)[:, None] * stride_cb + offs_d[None, :] * stride_cd,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
        if INTERPRET and OUT_BF16:
            # The interpreter's fp32 -> bf16 cast truncates (Triton 3.9); a GPU rounds to nearest
            # even. Round here (integer add on the bits, carry included) so both give the same bf16.
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            acc = tl.where(acc != acc, acc, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        d_out = d_ptr + h * stride_dh + offs_b.to(tl.int64)[:, None] * stride_db + offs_d[None, :] * stride_dd
        tl.store(d_out, acc.to(d_ptr.dtype.element_ty), mask=mask)


def _pair(name: str, value) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise KernelInputError(f"{name}: expected a (fp8 tensor, scale tensor) pair, got {type(value).__name__}")
    return value[0], value[1]


def _check_recipe(recipe) -> tuple[int, int, int]:
    if (
        not isinstance(recipe, (tuple, list))
        or len(recipe) != 3
        or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) for g in recipe)
    ):
        raise KernelInputError(f"recipe: expected a (gran_m, gran_n, gran_k) tuple of ints, got {recipe!r}")
    gran_m, gran_n, gran_k = (int(g) for g in recipe)
    if gran_m != 1 or gran_k != SCALE_BLOCK_K or gran_n not in SUPPORTED_GRAN_N:
        raise KernelInputError(f"recipe: supported are (1, 1, 128) and (1, 128, 128), got {tuple(recipe)!r}")
    return gran_m, gran_n, gran_k


def _check_scales(name: str, sf, leading: tuple[int, int], length: int, device) -> None:
    """float32 [*leading, ceil(length/128)] or int32 packed UE8M0 [*leading, ceil(length/512)]."""
    expect(name, sf, dtype=(torch.float32, torch.int32), ndim=3, device=device)
    last = num_scale_blocks(length) if sf.dtype == torch.float32 else num_packed_words(length)
    expect(name, sf, shape=(*leading, last))


def _validate(expr, a, b, d, c, recipe) -> int:
    """All checks, before any launch; returns gran_n."""
    if not isinstance(expr, str) or "".join(expr.split()) != SUPPORTED_EXPR:
        raise KernelInputError(f"expr: unsupported einsum expression {expr!r}; only {SUPPORTED_EXPR!r} is implemented")
    _, gran_n, _ = _check_recipe(recipe)
    a_values, a_sf = _pair("a", a)
    w_values, w_sf = _pair("b", b)
    expect("a[0]", a_values, dtype=torch.float8_e4m3fn, ndim=3)
    device = a_values.device
    batch, groups, length = a_values.shape
    expect("b[0]", w_values, dtype=torch.float8_e4m3fn, ndim=3, device=device)
    expect("b[0]", w_values, shape=(groups, None, length))
    out_dim = w_values.shape[1]
    _check_scales("a[1]", a_sf, (batch, groups), length, device)
    _check_scales("b[1]", w_sf, (groups, -(-out_dim // gran_n)), length, device)
    expect("d", d, dtype=(torch.bfloat16, torch.float32), shape=(batch, groups, out_dim), device=device)
    if c is not None:
        expect("c", c, dtype=d.dtype, shape=(batch, groups, out_dim), device=device)
    return gran_n


def _launch_triton(a, b, d, c, gran_n: int) -> None:
    a_values, a_sf = a
    w_values, w_sf = b
    batch, groups, length = a_values.shape
    out_dim = w_values.shape[1]
    if INTERPRET:  # few, large numpy ops (W's fp8 tiles are converted once per batch tile: one for b <= 32)
        block_b, block_d = 32, min(1024, max(16, next_pow2(out_dim)))
    else:  # decode-sized batches: narrow d tiles so 8 groups still fill the GPU
        block_b = 16 if batch <= 16 else 32 if batch <= 32 else 64
        block_d = 64 if batch <= 64 else 128
    c_arg = c if c is not None else d
    grid = (triton.cdiv(batch, block_b), groups, triton.cdiv(out_dim, block_d))
    _fp8_bhr_hdr_bhd_kernel[grid](
        a_values,
        a_sf,
        w_values,
        w_sf,
        c_arg,
        d,
        batch,
        out_dim,
        length,
        *a_values.stride(),
        *a_sf.stride(),
        *w_values.stride(),
        *w_sf.stride(),
        *c_arg.stride(),
        *d.stride(),
        GRAN_N=gran_n,
        A_PACKED=a_sf.dtype == torch.int32,
        W_PACKED=w_sf.dtype == torch.int32,
        HAS_C=c is not None,
        OUT_BF16=d.dtype == torch.bfloat16,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        BLOCK_K=SCALE_BLOCK_K,
        # the 64x128 tile (batch > 64) spilled at 4 warps on sm_120a (16/16 bytes); 8 do not
        INTERPRET=INTERPRET,
        num_warps=8 if block_b * block_d > 64 * 64 else 4,
    )


def _launch_reference(a, b, d, c, gran_n: int) -> None:
    fp8_einsum_bhr_hdr_bhd(a, b, d, c, recipe=(1, gran_n, SCALE_BLOCK_K))


def fp8_einsum(
    expr: str,
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d: torch.Tensor,
    c: torch.Tensor | None = None,
    recipe: tuple[int, int, int] = (1, 128, 128),
) -> None:
    """DeepGEMM's `fp8_einsum` for "bhr,hdr->bhd": d = c + einsum(A, W) with block-scaled FP8 A and W.

    Writes d in place and returns None, like DeepGEMM. See the module docstring for layouts."""
    gran_n = _validate(expr, a, b, d, c, recipe)
    if d.numel() == 0:
        return
    if use_triton(a[0]):
        _launch_triton(a, b, d, c, gran_n)
    else:
        _launch_reference(a, b, d, c, gran_n)
