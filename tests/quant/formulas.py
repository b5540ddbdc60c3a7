"""The documented formulas, written out in float64 on the test side (the oracle for every path).

msModelSlim's W8A8_DYNAMIC, W4A8_DYNAMIC (the exact y = (x_q·W)·s_w·s_x, scale_bias ignored) and
static W8A8; DeepSeek-V4's SwiGLU clamp as transformers' DeepseekV4 applies it.
"""

import torch


def dynq(x):
    """Per token: s = max|x|/127 and x_q = round(x / s), both in fp32 as the NPU op computes them."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(x))
    return q.clamp(-128, 127).double(), s.double()


def linear_dynamic(x, w_int, w_scale):
    q, s = dynq(x)
    return (q @ w_int.double().T) * w_scale.double().reshape(1, -1) * s


def linear_static(x, w_int, in_scale, in_offset, quant_bias, deq):
    q = torch.round(x.float() / in_scale.float() + in_offset.float()).clamp(-128, 127).double()  # fp32, as npu_quantize
    return (q @ w_int.double().T + quant_bias.double()) * deq.double()


def expert(x_row_q, s_x, w1, s1, w3, s3, w2, s2, limit):
    g = (x_row_q @ w1.double().T) * s1.double().reshape(1, -1) * s_x
    u = (x_row_q @ w3.double().T) * s3.double().reshape(1, -1) * s_x
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    a = torch.nn.functional.silu(g) * u
    aq, sa = dynq(a)
    return (aq @ w2.double().T) * s2.double().reshape(1, -1) * sa


def moe(x, topk_weights, topk_ids, experts, limit):
    """experts[e] = (w1, s1, w3, s3, w2, s2) with integer weight values (int4 already unpacked)."""
    q, s = dynq(x)
    out = torch.zeros(x.shape[0], experts[0][4].shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            out[t] += float(topk_weights[t, j]) * expert(q[t : t + 1], s[t : t + 1], *experts[e], limit)[0]
    return out
