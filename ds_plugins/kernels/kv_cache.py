"""DeepSeek-V4's FP8 sparse KV cache ("MODEL1" in FlashMLA, "fp8_ds_mla" in vLLM): layout, quantiser, reader.

One cache entry holds one 512-dim latent (448 NoPE + 64 RoPE) in 584 bytes. The bytes of a
page of `page` tokens are NOT stored token after token; a page is

    [ page x 576 B token data ][ page x 8 B scales ][ padding to a multiple of 576 B ]
      token data = 448 e4m3 NoPE values, then 64 bf16 RoPE values (128 B), unquantised
      scales     = 7 UE8M0 bytes (one per 64 NoPE values, value 2^(byte-127)), then 1 pad byte

so token `o` of page `p` has its data at p*page_stride + o*576 and its scales at
p*page_stride + page*576 + o*8. Engines hand the cache over as a (num_blocks, page, 1, 584)
uint8/fp8 view whose stride(1) == 584 matches no physical per-token offset: only stride(0),
the padded page size, is meaningful. A slot is block*page + offset (what the decode
kernel's indices hold).

The quantiser is FlashMLA's test quantiser (tests/quant.py, MODEL1_FP8Sparse), re-derived:
per 64 NoPE values, scale = 2^ceil(log2(max(amax / 448, 1e-4))), e4m3 = x / scale. Note the
floor applies to amax/448 (so the smallest scale is 2^-13, byte 114); vLLM's V4 cache writers
(models/deepseek_v4/common/ops/fused_compress_quant_cache.py) floor amax itself
(max(amax, 1e-4) / 448, smallest scale 2^-22) and saturate at +-448. Both give valid caches;
the reader and the kernels accept any scale byte.
"""

from __future__ import annotations

import torch

HEAD_DIM = 512  # one latent = key = value
NOPE_DIM = 448  # quantised to e4m3
ROPE_DIM = 64  # kept in bf16
QUANT_TILE = 64  # NoPE values sharing one UE8M0 scale
NUM_SCALES = NOPE_DIM // QUANT_TILE  # 7
TOKEN_DATA_BYTES = NOPE_DIM + 2 * ROPE_DIM  # 576: e4m3 NoPE + bf16 RoPE
SCALE_BYTES = NUM_SCALES + 1  # 8: 7 scales + 1 pad
BYTES_PER_TOKEN = TOKEN_DATA_BYTES + SCALE_BYTES  # 584
PAGE_ALIGN = 576  # a page's allocation is rounded up to this many bytes
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-4  # floor on amax / 448 (FlashMLA's quantiser)
UE8M0_BIAS = 127

CACHE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)


def page_nbytes(page_size: int) -> int:
    """Bytes one page occupies (its stride): page*584 rounded up to a multiple of 576."""
    return -(-page_size * BYTES_PER_TOKEN // PAGE_ALIGN) * PAGE_ALIGN


def _page_bytes(cache: torch.Tensor) -> torch.Tensor:
    """The (num_blocks, page*584) bytes of each page actually used, read through stride(0).

    The (num_blocks, page, 1, 584) view says nothing true about where a token's bytes are,
    so go back to the underlying storage: each page starts stride(0) bytes after the last.
    """
    num_blocks, page = cache.shape[0], cache.shape[1]
    raw = cache.view(torch.uint8)
    return raw.as_strided((num_blocks, page * BYTES_PER_TOKEN), (raw.stride(0), 1))


def _ue8m0_exponents(amax: torch.Tensor) -> torch.Tensor:
    """ceil(log2(max(amax / 448, 1e-4))) as int32, exactly (frexp, not a rounded log2)."""
    need = torch.clamp_min(amax.float() / E4M3_MAX, SCALE_FLOOR)
    mantissa, exponent = torch.frexp(need)  # need = mantissa * 2^exponent, mantissa in [0.5, 1)
    return (exponent - (mantissa == 0.5).to(exponent.dtype)).to(torch.int32)


def quantize_kv_cache(kv: torch.Tensor) -> torch.Tensor:
    """kv [num_blocks, page, 512] (or [num_blocks, page, 1, 512]) -> uint8 cache viewed as
    [num_blocks, page, 1, 584], pages padded to a multiple of 576 bytes (stride(0) = page_nbytes(page))."""
    if kv.dim() == 4:
        kv = kv.squeeze(2)
    num_blocks, page, dim = kv.shape
    if dim != HEAD_DIM:
        raise ValueError(f"kv: expected last dimension {HEAD_DIM}, got {dim}")
    x = kv.to(torch.bfloat16).float()

    nope = x[..., :NOPE_DIM].reshape(num_blocks, page, NUM_SCALES, QUANT_TILE)
    exponents = _ue8m0_exponents(nope.abs().amax(dim=-1))  # [nb, page, 7]
    # Division by a power of two is exact; |nope / scale| <= 448, so the cast never overflows.
    e4m3 = (nope / torch.pow(2.0, exponents.float())[..., None]).to(torch.float8_e4m3fn)

    storage = torch.zeros(num_blocks, page_nbytes(page), dtype=torch.uint8, device=kv.device)
    data = storage[:, : page * TOKEN_DATA_BYTES].view(num_blocks, page, TOKEN_DATA_BYTES)
    data[..., :NOPE_DIM] = e4m3.reshape(num_blocks, page, NOPE_DIM).view(torch.uint8)
    data[..., NOPE_DIM:] = x[..., NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    scales = storage[:, page * TOKEN_DATA_BYTES : page * BYTES_PER_TOKEN].view(num_blocks, page, SCALE_BYTES)
    scales[..., :NUM_SCALES] = (exponents + UE8M0_BIAS).to(torch.uint8)
    return storage[:, : page * BYTES_PER_TOKEN].view(num_blocks, page, 1, BYTES_PER_TOKEN)


def _decode_tokens(data: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """data [..., 576] uint8, scale_bytes [..., 7] uint8 -> [..., 512] bf16 (exact: e4m3 * 2^k fits bf16)."""
    nope = data[..., :NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
    scale = scale_bytes.contiguous().view(torch.float8_e8m0fnu).float()  # 2^(byte - 127)
    nope = nope.unflatten(-1, (NUM_SCALES, QUANT_TILE)) * scale[..., None]
    rope = data[..., NOPE_DIM:].contiguous().view(torch.bfloat16)
    return torch.cat([nope.flatten(-2).to(torch.bfloat16), rope], dim=-1)


def dequantize_kv_cache(cache: torch.Tensor) -> torch.Tensor:
    """uint8/fp8 cache [num_blocks, page, 1, 584] -> [num_blocks, page, 512] bf16."""
    num_blocks, page = cache.shape[0], cache.shape[1]
    pages = _page_bytes(cache)
    data = pages[:, : page * TOKEN_DATA_BYTES].reshape(num_blocks, page, TOKEN_DATA_BYTES)
    scales = pages[:, page * TOKEN_DATA_BYTES :].reshape(num_blocks, page, SCALE_BYTES)[..., :NUM_SCALES]
    return _decode_tokens(data, scales)


def gather_kv_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of `cache` at `slots` (any shape, slot = block*page + offset) -> [*slots.shape, 512] bf16.

    Reads only the gathered tokens' bytes. Invalid slots (< 0 or >= num_blocks*page) give zero rows.
    """
    num_blocks, page = cache.shape[0], cache.shape[1]
    pages = _page_bytes(cache)
    slots = slots.long()
    valid = (slots >= 0) & (slots < num_blocks * page)
    safe = torch.where(valid, slots, torch.zeros_like(slots))
    block, offset = safe // page, safe % page
    data_cols = offset[..., None] * TOKEN_DATA_BYTES + torch.arange(TOKEN_DATA_BYTES, device=slots.device)
    scale_cols = (
        page * TOKEN_DATA_BYTES + offset[..., None] * SCALE_BYTES + torch.arange(NUM_SCALES, device=slots.device)
    )
    data = pages[block[..., None], data_cols]  # [..., 576]
    scale_bytes = pages[block[..., None], scale_cols]  # [..., 7]
    rows = _decode_tokens(data, scale_bytes)
    return rows.masked_fill(~valid[..., None], 0.0)
