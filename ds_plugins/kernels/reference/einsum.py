"""The grouped FP8 output projection `fp8_einsum("bhr,hdr->bhd")`, from the math: the oracle.

V4's wo_a (research notes 2.2): the attention output of b tokens is cut into h = o_groups = 8
groups of r = 8 heads x 512 = 4096 values, and group h is projected by its own [d = o_lora_rank
= 1024, r] matrix:

    d[b, h, n] = c[b, h, n] + sum_r  A[b, h, r] * W[h, n, r]          (c optional, same dtype as d)

Both operands are FP8 e4m3 with block scales along r (gran_k = 128), DeepGEMM's `recipe =
(gran_m, gran_n, gran_k)`:
- activations: one scale per (token, group, 128-block of r)            (gran_m = 1);
- weights:     one scale per (group, gran_n rows of d, 128-block of r)  (gran_n = 128: the
  checkpoint's 128x128 blocks; gran_n = 1: per row, the 128x128 scale repeated over its 128 rows,
  what DeepGEMM's SM100/SM120 scale transform produces).
A scale tensor is either float32 [..., ceil(r/128)] or int32 [..., ceil(r/512)] holding packed
UE8M0 exponents: word w, byte j (bits 8j..8j+7) is block 4w+j, value 2^(byte - 127). Byte 0 is
decoded to 0 and byte 255 to inf (an exponent placed in a float32's exponent field, the same
bit trick vLLM uses to upcast e8m0); real quantisers never produce either.
"""

from __future__ import annotations

import torch

SCALE_BLOCK_K = 128  # gran_k: one scale per 128 values along the contracted dim
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def num_scale_blocks(length: int) -> int:
    return -(-length // SCALE_BLOCK_K)


def num_packed_words(length: int) -> int:
    """int32 words holding the UE8M0 scales of `length` values (4 exponents per word)."""
    return -(-num_scale_blocks(length) // 4)


def unpack_ue8m0(packed: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """int32 [..., words] of packed UE8M0 exponents -> float32 [..., num_blocks] scales."""
    shifts = torch.arange(4, device=packed.device, dtype=torch.int32) * 8
    exponents = (packed[..., None].to(torch.int32) >> shifts) & 0xFF  # [..., words, 4]
    scales = (exponents << 23).view(torch.float32)  # 2^(e - 127)
    return scales.flatten(-2)[..., :num_blocks]


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., blocks] powers of two -> int32 [..., ceil(blocks/4)] packed exponents (pad: byte 0)."""
    exponents = (scales.float().contiguous().view(torch.int32) >> 23) & 0xFF
    pad = -exponents.shape[-1] % 4
    exponents = torch.nn.functional.pad(exponents, (0, pad)).unflatten(-1, (-1, 4))
    shifts = torch.arange(4, device=scales.device, dtype=torch.int64) * 8
    return _wrap_int32((exponents.to(torch.int64) << shifts).sum(-1))


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> the int32 with the same bit pattern."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def block_scales(sf: torch.Tensor, length: int) -> torch.Tensor:
    """A scale tensor (float32, or int32 packed UE8M0) -> float32 [..., ceil(length/128)]."""
    if sf.dtype == torch.int32:
        return unpack_ue8m0(sf, num_scale_blocks(length))
    return sf.float()


def dequantize(values: torch.Tensor, scales: torch.Tensor, rows_per_scale: int = 1) -> torch.Tensor:
    """fp8 [..., rows, L] with float32 scales [..., ceil(rows/rows_per_scale), ceil(L/128)] -> fp32."""
    rows, length = values.shape[-2:]
    per_row = scales.repeat_interleave(rows_per_scale, dim=-2)[..., :rows, :]
    per_value = per_row.repeat_interleave(SCALE_BLOCK_K, dim=-1)[..., :length]
    return values.float() * per_value


def fp8_einsum_bhr_hdr_bhd(
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d: torch.Tensor,
    c: torch.Tensor | None = None,
    recipe: tuple[int, int, int] = (1, 128, 128),
) -> None:
    """Reference for `fp8_einsum("bhr,hdr->bhd", a, b, d, c, recipe)`: writes d in place (fp32 math).

    a = (A [b, h, r] e4m3, scales [b, h, *]), b = (W [h, d, r] e4m3, scales [h, ceil(d/gran_n), *]),
    d [b, h, d] bf16 or fp32, c like d or None. Inputs are assumed already validated."""
    a_values, a_sf = a
    w_values, w_sf = b
    length = a_values.shape[-1]
    a_deq = dequantize(a_values, block_scales(a_sf, length), rows_per_scale=1)
    w_deq = dequantize(w_values, block_scales(w_sf, length), rows_per_scale=recipe[1])
    out = torch.einsum("bhr,hdr->bhd", a_deq, w_deq)
    if c is not None:
        out = out + c.float()
    d.copy_(out)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., L] -> (e4m3 [..., L], float32 power-of-two scales [..., ceil(L/128)]): 1x128 blocks,
    scale = 2^ceil(log2(amax/448)) (UE8M0 rounding, as V4's activation quantiser)."""
    length = x.shape[-1]
    pad = -length % SCALE_BLOCK_K
    blocks = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, SCALE_BLOCK_K))
    amax = blocks.abs().amax(-1).clamp_min(1e-10)
    scales = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (blocks / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :length]
    return q.to(torch.float8_e4m3fn), scales


def quantize_per_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, L] -> (e4m3, float32 power-of-two scales [..., ceil(R/128), ceil(L/128)]): 128x128 blocks."""
    rows, length = w.shape[-2:]
    pr, pl = -rows % SCALE_BLOCK_K, -length % SCALE_BLOCK_K
    padded = torch.nn.functional.pad(w.float(), (0, pl, 0, pr))
    # [..., R/128, 128, L/128, 128]
    blocks = padded.unflatten(-1, (-1, SCALE_BLOCK_K)).unflatten(-3, (-1, SCALE_BLOCK_K))
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-10)  # [.., R/128, L/128]
    scales = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (blocks / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.flatten(-2).flatten(-3, -2)[..., :rows, :length]
    return q.to(torch.float8_e4m3fn), scales
