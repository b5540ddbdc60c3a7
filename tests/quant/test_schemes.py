"""Every scheme and layer kind against the float64 formulas (formulas.py), through both portable paths:
the PyTorch arithmetic (the CPU path) and the Triton kernels (run by the interpreter here, on CUDA
where there is one). Checkpoints come from the test-side writer; weights are read back as stored."""

import pytest
import torch

from ds_plugins.quant.ascend import arith, compute
from ds_plugins.quant.ascend import triton_kernels as tk
from ds_plugins.quant.ascend.loader import Checkpoint
from ds_plugins.quant.ascend.modules import QuantExperts, QuantLinear, resident_nbytes

from . import formulas, writer
from .fixtures import layer_checkpoint, unpack_np

PATHS = ["torch", "triton"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("schemes")
    ref = layer_checkpoint(d)
    return Checkpoint(d), ref


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Force one compute path for CPU tensors."""
    monkeypatch.setattr(compute, "path_for", lambda t: request.param)
    return request.param


def test_w4a8_packing_follows_the_documented_sign_rule():
    q = torch.tensor([[-8, 7, -1, 0], [7, -8, 0, -1], [3, -3, 1, 2], [-5, 5, -7, 6]], dtype=torch.int8)
    packed = torch.from_numpy(writer.pack_int4_np(q.numpy()))  # the writer follows the doc, in numpy
    assert packed.shape == (2, 4)
    # packed[j, k] = (W[2j+1, k] << 4) | (W[2j, k] & 0xF), as a signed byte
    # (7 << 4) | (-8 & 0xF) = 0x78; (-8 << 4) | 7 = 0x87 = -121 as int8; (-5 << 4) | 3 = 0xB3 = -77
    assert (int(packed[0, 0]), int(packed[0, 1]), int(packed[1, 0])) == (0x78, -121, -77)
    assert torch.equal(arith.unpack_int4(packed), q)
    assert torch.equal(arith.pack_int4(q), packed)
    full = torch.randint(-8, 8, (64, 48), dtype=torch.int8)
    assert torch.equal(arith.unpack_int4(torch.from_numpy(writer.pack_int4_np(full.numpy()))), full)
    assert torch.equal(unpack_np(arith.pack_int4(full)).to(torch.int8), full)


def test_deq_scale_int64_bit_pattern_decodes_exactly():
    v = torch.tensor([1e-3, 3.5e-5, 0.25, 2.0**-20], dtype=torch.float32)
    stored = torch.from_numpy(v.numpy().view("uint32").astype("int64"))
    assert torch.equal(arith.decode_deq_scale(stored), v)
    assert torch.equal(arith.decode_deq_scale(v), v)
    assert torch.equal(arith.encode_deq_scale_int64(v), stored)


def test_linear_w8a8_dynamic(ck, path):
    c, ref = ck
    x = ref["x"]
    for module in ("layers.0.attn.wq_a", "layers.0.attn.wkv"):
        lin = QuantLinear(c, module)
        assert lin.weight.dtype == torch.int8
        t = c.module_tensors(module)
        want = formulas.linear_dynamic(x, t["weight"], t["weight_scale"])
        got = lin(x.float())
        # exact int32 sums; only the fp32 scale epilogue rounds
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
        assert lin(x).dtype == torch.bfloat16


def test_linear_w8a8_dynamic_with_bias(path):
    w = torch.randn(24, 40) * 0.1
    q = writer.w8a8_dynamic(w)
    bias = torch.randn(24)
    x = torch.randn(3, 2, 40)
    got = compute.linear_dynamic(x, q["weight"], q["weight_scale"].reshape(-1), bias)
    want = formulas.linear_dynamic(x.reshape(6, 40), q["weight"], q["weight_scale"]) + bias.double()
    assert got.shape == (3, 2, 24)
    torch.testing.assert_close(got.reshape(6, 24).double(), want, rtol=1e-6, atol=1e-6)
    # and the quantized layer is close to the float one (activation + weight int8 error only)
    torch.testing.assert_close(got, x @ w.T + bias, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("deq_int64", [False, True], ids=["deq_fp32", "deq_int64"])
def test_linear_w8a8_static(tmp_path, path, deq_int64):
    w, bias = torch.randn(40, 48) * 0.1, torch.randn(40) * 0.1
    calib = torch.randn(16, 48)
    parts = writer.w8a8_static(w, bias, calib, deq_int64)
    writer.write(tmp_path, {"layers.0.attn.wo_a": ("W8A8", parts)})
    c = Checkpoint(tmp_path)
    assert c.tensors["layers.0.attn.wo_a.deq_scale"].dtype == ("int64" if deq_int64 else "float32")
    lin = QuantLinear(c, "layers.0.attn.wo_a")
    x = torch.randn(5, 48)
    deq = (
        parts["deq_scale"]
        if not deq_int64
        else torch.from_numpy(parts["deq_scale"].numpy().astype("uint32").view("float32"))
    )
    want = formulas.linear_static(
        x, parts["weight"], parts["input_scale"], parts["input_offset"], parts["quant_bias"], deq
    )
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-6, atol=1e-6)
    # quant_bias folds in the float bias and the input-offset correction: close to x @ W^T + b
    torch.testing.assert_close(lin(x), x @ w.T + bias, rtol=0.05, atol=0.05)
    # a row-parallel rank other than 0 adds no quant_bias
    no_bias = compute.linear_static(x, lin.weight, lin.input_scale, lin.input_offset, None, lin.deq_scale)
    want0 = formulas.linear_static(
        x, parts["weight"], parts["input_scale"], parts["input_offset"], torch.zeros(40, dtype=torch.int32), deq
    )
    torch.testing.assert_close(no_bias.double(), want0, rtol=1e-6, atol=1e-6)


def test_moe_w4a8_dynamic(ck, path):
    c, ref = ck
    experts = QuantExperts(c, "layers.0.ffn.experts", ref["E"], swiglu_limit=10.0)
    assert experts.packed and experts.w13.shape == (4, 32, 64) and experts.w2.shape == (4, 32, 32)
    got = experts(ref["x"].float(), ref["topk_ids"], ref["topk_weights"])
    torch.testing.assert_close(got.double(), ref["moe"].double(), rtol=1e-3, atol=1e-4)


def test_moe_w8a8_dynamic_experts(tmp_path, path):
    E, H, I, T = 3, 48, 32, 6
    modules, experts = {}, []
    for e in range(E):
        parts = [writer.w8a8_dynamic(torch.randn(o, i) * 0.1) for o, i in ((I, H), (I, H), (H, I))]
        for name, p in zip(("gate_proj", "up_proj", "down_proj"), parts):
            modules[f"model.layers.1.mlp.experts.{e}.{name}"] = ("W8A8_DYNAMIC", p)
        experts.append(
            (
                parts[0]["weight"],
                parts[0]["weight_scale"],
                parts[1]["weight"],
                parts[1]["weight_scale"],
                parts[2]["weight"],
                parts[2]["weight_scale"],
            )
        )
    writer.write(tmp_path, modules)
    layer = QuantExperts(Checkpoint(tmp_path), "model.layers.1.mlp.experts", E, swiglu_limit=None)
    x = torch.randn(T, H)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]])
    tw = torch.rand(T, 2)
    torch.testing.assert_close(
        layer(x, ids, tw).double(), formulas.moe(x, tw, ids, experts, None), rtol=1e-3, atol=1e-4
    )


def test_moe_expert_map_drops_experts_of_other_ranks(ck, path):
    c, ref = ck
    layer = QuantExperts(c, "layers.0.ffn.experts", ref["E"], swiglu_limit=10.0)
    # global ids 0..7, this rank holds globals 4..7 as locals 0..3
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3])
    ids = ref["topk_ids"] + torch.tensor([[4, 0]])  # first slot on this rank, second elsewhere
    ids = torch.where(ids[:, 1:] >= 4, ids - torch.tensor([[0, 4]]), ids)
    got = compute.moe(
        ref["x"].float(),
        ref["topk_weights"],
        ids,
        layer.w13,
        layer.s13,
        layer.w2,
        layer.s2,
        packed_int4=True,
        limit=10.0,
        expert_map=expert_map,
    )
    local = torch.where(ids >= 4, ids - 4, torch.full_like(ids, -1))
    want = formulas.moe(ref["x"], ref["topk_weights"], local, ref["experts"], 10.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


def test_scale_bias_is_the_kernel_helper_not_part_of_the_math(ck):
    c, _ = ck
    for name, chunks in (("w1", 1), ("w2", 16)):
        t = c.module_tensors(f"layers.0.ffn.experts.1.{name}")
        w = arith.unpack_int4(t["weight"])
        torch.testing.assert_close(
            arith.scale_bias(w, t["weight_scale"], chunks), t["scale_bias"], rtol=1e-5, atol=1e-6
        )


def test_resident_weights_stay_quantized(ck):
    c, ref = ck
    layer = QuantExperts(c, "layers.0.ffn.experts", ref["E"], swiglu_limit=10.0)
    stored = sum(
        c.modules[f"layers.0.ffn.experts.{e}.{n}"].tensors[s].nbytes
        for e in range(4)
        for n in ("w1", "w2", "w3")
        for s in ("weight", "weight_scale")
    )
    assert resident_nbytes(layer) == stored  # int4 stays packed; offsets and scale_bias are not kept


def test_grouped_kernel_handles_empty_experts_and_odd_sizes():
    E, K, N, P = 5, 40, 48, 23
    ids = torch.sort(torch.tensor([0] * 7 + [3] * 15 + [5]))[0]  # experts 1, 2, 4 empty; 5 = dropped rows
    a = torch.randint(-128, 128, (P, K), dtype=torch.int8)
    sa = torch.rand(P)
    for packed in (False, True):
        wv = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)
        w = torch.stack([arith.pack_int4(x) for x in wv]) if packed else wv
        s = torch.rand(E, N)
        sched = tk.moe_schedule(ids, E, 16)
        got = tk.grouped_int8_mm(a, sa, w, s, sched, packed, 16)
        want = torch.zeros(P, N, dtype=torch.float64)
        for r in range(P):
            e = int(ids[r])
            if e < E:
                want[r] = (a[r].double() @ wv[e].double().T) * s[e].double() * float(sa[r])
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_int8_mm_kernel_exact_int32_accumulation():
    a = torch.full((3, 300), 127, dtype=torch.int8)
    b = torch.full((5, 300), -128, dtype=torch.int8)
    bias = torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32)
    got = tk.int8_scaled_mm(a, b, torch.ones(5), col_bias=bias)
    assert torch.equal(got, (torch.full((3, 5), 127 * -128 * 300) + bias).float())


@pytest.mark.npu
def test_npu_path_matches_the_formulas(ck):
    """On Ascend: the torch_npu ops vllm-ascend uses give the same results as the formulas."""
    import torch_npu  # noqa: F401

    c, ref = ck
    lin = QuantLinear(c, "layers.0.attn.wq_a").to("npu")
    t = c.module_tensors("layers.0.attn.wq_a")
    want = formulas.linear_dynamic(ref["x"], t["weight"], t["weight_scale"])
    torch.testing.assert_close(lin(ref["x"].to("npu")).float().cpu().double(), want, rtol=1e-2, atol=1e-3)
    experts = QuantExperts(c, "layers.0.ffn.experts", ref["E"], swiglu_limit=10.0).to("npu")
    got = experts(ref["x"].to("npu"), ref["topk_ids"].to("npu"), ref["topk_weights"].to("npu"))
    torch.testing.assert_close(got.float().cpu().double(), ref["moe"].double(), rtol=2e-2, atol=2e-3)
