"""The schemes' arithmetic in plain PyTorch: the reference every compute path is tested against,
and the CPU path itself (msModelSlim's W8A8_DYNAMIC, W4A8_DYNAMIC and static W8A8).

int8 x int8 products are summed exactly (int32 accumulation, as the NPU and the Triton kernels do);
scales are applied in fp32 afterwards.
"""

from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 (aclnnDynamicQuant): s = max|x_row|/127, x_q = round(x/s).

    Returns (x_q int8 [..., K], s fp32 [...]). An all-zero row gets s = 0 and x_q = 0.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)  # fp32 x / s, half-to-even
    return q, scale


def static_quant(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """W8A8 static activation quant (npu_quantize): x_q = clamp(round(x/input_scale + input_offset))."""
    q = torch.round(x.float() / input_scale.float() + input_offset.float())
    return q.clamp_(-128, 127).to(torch.int8)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a[M,K] @ b[N,K]^T for int8 operands (float64 holds every partial sum exactly
    for K < 2^53 / 128^2, so this is exact for any real layer)."""
    return (a.double() @ b.double().T).to(torch.int32)


def decode_deq_scale(deq: torch.Tensor) -> torch.Tensor:
    """deq_scale is fp32, or (non-bf16 models) the fp32 bit pattern stored in an int64."""
    if deq.dtype != torch.int64:
        return deq.float()
    low = deq & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)  # to the signed int32 range before narrowing
    return low.to(torch.int32).view(torch.float32)


def encode_deq_scale_int64(deq: torch.Tensor) -> torch.Tensor:
    """The int64 form msModelSlim writes (for tests and tools): fp32 bits zero-extended."""
    return deq.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """msModelSlim W4A8 packing: int4 values [out, in] -> int8 [out/2, in],
    packed[j, k] = (W[2j+1, k] << 4) | (W[2j, k] & 0xF)."""
    if w.shape[0] % 2:
        raise ValueError(f"pack_int4: the output dim must be even, got {tuple(w.shape)}")
    w = w.to(torch.int16)
    lo, hi = w[0::2], w[1::2]
    byte = ((hi << 4) | (lo & 0xF)) & 0xFF
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 [out/2, in] (or [..., out/2, in]) -> int8 int4 values [out, in]."""
    p16 = p.to(torch.int16)
    lo = ((p16 & 0xF) ^ 8) - 8  # sign-extend the low nibble: (p << 4) >> 4
    hi = p16 >> 4  # arithmetic shift keeps the sign of the high nibble
    out = torch.stack([lo, hi], dim=-2)  # [..., out/2, 2, in]
    shape = list(p.shape)
    shape[-2] *= 2
    return out.reshape(shape).to(torch.int8)


def w8a8_dynamic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y[t,n] = (Σ_k x_q[t,k]·W[n,k]) · weight_scale[n] · s_x[t] (+ bias[n])."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, sx = dynamic_quant(x2)
    y = int_mm(xq, weight).float() * weight_scale.reshape(1, -1).float() * sx.unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*shape[:-1], -1)


def w8a8_static_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    quant_bias: torch.Tensor | None,
    deq_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = (x_q·W^T + quant_bias) · deq_scale; the float bias is folded into quant_bias by the saver.
    quant_bias None: a row-parallel shard other than rank 0 (the bias is added once)."""
    shape = x.shape
    xq = static_quant(x.reshape(-1, shape[-1]), input_scale, input_offset)
    acc = int_mm(xq, weight)
    if quant_bias is not None:
        acc = acc + quant_bias.to(torch.int32).reshape(1, -1)
    y = acc.float() * decode_deq_scale(deq_scale).reshape(1, -1)
    return y.to(out_dtype or x.dtype).reshape(*shape[:-1], -1)


def swiglu(h: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(gate)·up on [.., 2I] (gate first); DeepSeek-V4 clamps gate above and up both sides."""
    gate, up = h.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return torch.nn.functional.silu(gate) * up


def expert_mlp(
    xq: torch.Tensor,
    sx: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    limit: float | None,
) -> torch.Tensor:
    """One expert on already-quantized tokens; w13 [2I, H] / w2 [H, I] as int8 values (int4 unpacked)."""
    h = int_mm(xq, w13).float() * s13.reshape(1, -1).float() * sx.unsqueeze(-1)
    a = swiglu(h, limit)
    aq, sa = dynamic_quant(a)
    return int_mm(aq, w2).float() * s2.reshape(1, -1).float() * sa.unsqueeze(-1)


def moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    *,
    packed_int4: bool,
    limit: float | None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k topk_weights[t,k] · Expert_{topk_ids[t,k]}(x[t]) for W8A8_DYNAMIC or W4A8_DYNAMIC experts.

    w13 [E, 2I, H] int8 (or [E, I, H] packed int4), s13 [E, 2I]; w2 [E, H, I] (or [E, H/2, I]), s2 [E, H].
    expert_map (global id -> local id or -1), as vLLM keeps it under expert parallelism.
    """
    xq, sx = dynamic_quant(x)
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map[ids].long()
    out = torch.zeros(x.shape[0], w2.shape[1] * (2 if packed_int4 else 1), dtype=torch.float32, device=x.device)
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        a13 = unpack_int4(w13[e]) if packed_int4 else w13[e]
        a2 = unpack_int4(w2[e]) if packed_int4 else w2[e]
        y = expert_mlp(xq[tok], sx[tok], a13, s13[e], a2, s2[e], limit)
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(-1))
    return out.to(x.dtype)


def scale_bias(weight_int: torch.Tensor, weight_scale: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """The W4A8 kernel helper msModelSlim stores: 8·s[n]·Σ_k W[n,k] (over `chunks` K-slices).
    Not part of the math (research §1.7); used to cross-check a checkpoint at load."""
    w = weight_int.double()
    sums = torch.stack([c.sum(dim=-1) for c in w.chunk(chunks, dim=-1)], dim=-1)
    return (8.0 * weight_scale.double().reshape(-1, 1) * sums).float()
