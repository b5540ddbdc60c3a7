"""msModelSlim (`--quantization ascend`) benchmark.

    python bench/quant.py [--save]    # --save writes bench/results/quant-cpu.json (and quant-<gpu>.json on CUDA)

1. Resident weight memory vs checkpoint size (goal <= 1.05x), on any machine: a DeepSeek-V4-Flash-shaped
   slice (one layer's W8A8_DYNAMIC attention linears wq_a/wq_b/wkv, shared expert, and N routed W4A8_DYNAMIC
   experts at the real sizes hidden 4096, q_lora 1024, 64 heads x 512, moe_inter 2048) is written as a real
   msModelSlim checkpoint (safetensors + description) and loaded with ds_plugins.quant.ascend.modules; the
   resident bytes of the loaded modules are compared with the checkpoint's bytes (whole files, and the
   quantized tensors alone). Weights stay int8 / packed int4; offsets (zeros) and scale_bias are dropped.
2. On a CUDA GPU: W8A8 GEMM (dynamic per-token activation quant + int8 Triton GEMM) and the W4A8 grouped MoE
   (in-kernel int4 unpack) against a bf16 GEMM of the same shape (torch.matmul; for the MoE, the dense bf16
   GEMMs of the routed rows: [T*k, H] x [H, 2I] and [T*k, I] x [I, H]). Goal >= 1.5x at large batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_plugins.quant.ascend import compute  # noqa: E402
from ds_plugins.quant.ascend.loader import Checkpoint  # noqa: E402
from ds_plugins.quant.ascend.modules import QuantExperts, QuantLinear, resident_nbytes  # noqa: E402

H, QL, NH, HD, I = 4096, 1024, 64, 512, 2048


def _w8(out, inp, g):
    return {
        "weight": torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g),
        "weight_scale": torch.rand(out, 1, generator=g) * 1e-3,
        "weight_offset": torch.zeros(out, 1),
    }


def _w4(out, inp, down, g):
    return {
        "weight": torch.randint(-128, 128, (out // 2, inp), dtype=torch.int8, generator=g),
        "weight_scale": torch.rand(out, 1, generator=g) * 1e-2,
        "weight_offset": torch.zeros(out, 1),
        "scale_bias": torch.rand(out, 16 if down else 1, generator=g),
    }


def write_slice(d: Path, experts: int) -> dict[str, str]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    modules = {
        "layers.0.attn.wq_a": ("W8A8_DYNAMIC", _w8(QL, H, g)),
        "layers.0.attn.wq_b": ("W8A8_DYNAMIC", _w8(NH * HD, QL, g)),
        "layers.0.attn.wkv": ("W8A8_DYNAMIC", _w8(HD, H, g)),
        "layers.0.ffn.shared_experts.w1": ("W8A8_DYNAMIC", _w8(I, H, g)),
        "layers.0.ffn.shared_experts.w3": ("W8A8_DYNAMIC", _w8(I, H, g)),
        "layers.0.ffn.shared_experts.w2": ("W8A8_DYNAMIC", _w8(H, I, g)),
    }
    for e in range(experts):
        modules[f"layers.0.ffn.experts.{e}.w1"] = ("W4A8_DYNAMIC", _w4(I, H, False, g))
        modules[f"layers.0.ffn.experts.{e}.w3"] = ("W4A8_DYNAMIC", _w4(I, H, False, g))
        modules[f"layers.0.ffn.experts.{e}.w2"] = ("W4A8_DYNAMIC", _w4(H, I, True, g))
    tensors, types = {}, {}
    for m, (scheme, parts) in modules.items():
        for s, t in parts.items():
            tensors[f"{m}.{s}"], types[f"{m}.{s}"] = t, scheme
    save_file(tensors, str(d / "quant_model_weights.safetensors"))
    (d / "quant_model_description.json").write_text(json.dumps({"version": "1.0.0", "group_size": 0, **types}))
    return {m: s for m, (s, _) in modules.items()}


def memory(experts: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        plan = write_slice(d, experts)
        file_bytes = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        t0 = time.perf_counter()
        ckpt = Checkpoint(d)
        validate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = [QuantLinear(ckpt, m) for m, s in plan.items() if s == "W8A8_DYNAMIC"]
        loaded.append(QuantExperts(ckpt, "layers.0.ffn.experts", experts, swiglu_limit=10.0))
        load_s = time.perf_counter() - t0
        resident = sum(resident_nbytes(m) for m in loaded)
        tensor_bytes = ckpt.nbytes
        compute_bytes = sum(i.nbytes for k, i in ckpt.tensors.items() if k.endswith((".weight", ".weight_scale")))
    return {
        "slice": f"DeepSeek-V4-Flash layer slice: wq_a, wq_b, wkv, shared expert (W8A8_DYNAMIC), "
        f"{experts} routed experts (W4A8_DYNAMIC)",
        "checkpoint_file_bytes": file_bytes,
        "checkpoint_tensor_bytes": tensor_bytes,
        "weight_and_scale_bytes": compute_bytes,
        "resident_bytes": resident,
        "resident_over_checkpoint": round(resident / tensor_bytes, 4),
        "resident_over_weights_and_scales": round(resident / compute_bytes, 4),
        "goal": "resident <= 1.05 x checkpoint",
        "met": resident <= 1.05 * tensor_bytes,
        "validate_s": round(validate_s, 4),
        "load_s": round(load_s, 3),
    }


def _time(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def gpu() -> dict:
    dev = "cuda"
    out = {"gpu": torch.cuda.get_device_name(), "gemm": [], "moe": []}
    for M in (16, 256, 4096, 16384):
        N, K = 4096, 4096
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
        s = torch.rand(N, device=dev) * 1e-3
        wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        tq = _time(lambda: compute.linear_dynamic(x, w, s))
        tb = _time(lambda: x @ wb.T)
        out["gemm"].append(
            {
                "M": M,
                "N": N,
                "K": K,
                "w8a8_s": tq,
                "bf16_s": tb,
                "speedup": round(tb / tq, 3),
                "w8a8_tflops": round(2 * M * N * K / tq / 1e12, 1),
            }
        )
    E, k = 32, 6
    for T in (64, 1024, 8192):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        w13 = torch.randint(-128, 128, (E, I, H), device=dev, dtype=torch.int8)  # packed: 2I channels
        w2 = torch.randint(-128, 128, (E, H // 2, I), device=dev, dtype=torch.int8)
        s13, s2 = torch.rand(E, 2 * I, device=dev) * 1e-3, torch.rand(E, H, device=dev) * 1e-3
        ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
        tw = torch.rand(T, k, device=dev)
        tq = _time(lambda: compute.moe(x, tw, ids, w13, s13, w2, s2, packed_int4=True, limit=10.0), iters=5)
        xa = torch.randn(T * k, H, device=dev, dtype=torch.bfloat16)
        b1 = torch.randn(H, 2 * I, device=dev, dtype=torch.bfloat16)
        a2 = torch.randn(T * k, I, device=dev, dtype=torch.bfloat16)
        b2 = torch.randn(I, H, device=dev, dtype=torch.bfloat16)
        tb = _time(lambda: (xa @ b1, a2 @ b2), iters=5)
        out["moe"].append(
            {"tokens": T, "experts": E, "top_k": k, "w4a8_s": tq, "bf16_gemm_s": tb, "speedup": round(tb / tq, 3)}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    cpu = {"machine": platform.machine(), "torch": torch.__version__, "memory": memory(args.experts)}
    print(json.dumps(cpu, indent=1))
    if args.save:
        (ROOT / "bench" / "results" / "quant-cpu.json").write_text(json.dumps(cpu, indent=1) + "\n")
    if torch.cuda.is_available():
        res = gpu()
        print(json.dumps(res, indent=1))
        if args.save:
            name = res["gpu"].replace(" ", "-").lower()
            (ROOT / "bench" / "results" / f"quant-{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    else:
        print("no CUDA GPU: GEMM / MoE throughput not measured")


if __name__ == "__main__":
    main()
