"""The DeepSeek-V4 model hook-up and the CUDA-graph switch, in real vLLM processes.

The registry entries are read back from vLLM's own ModelRegistry, the class is resolved through
vLLM's own model-inspection subprocess (a process kind vLLM starts, which loads general plugins
itself), and the CUDA-graph switch is checked on a real VllmConfig built from a V4 config.json.
"""

import json

import pytest
from packaging.version import Version

from ds_plugins import policy, simulate

pytestmark = pytest.mark.engines

LOAD = "import vllm.plugins as p\np.load_general_plugins()\n"
ROUTED = "--capability 12.0 --lib deep_gemm=no-sm12x"  # no FlashInfer SM120 kernels, no SM12x DeepGEMM
UPSTREAM_SM120 = "--capability 12.0 --lib deep_gemm=sm12x --lib flashinfer=sm120"
ARCHS = {"DeepseekV4ForCausalLM": "DeepseekV4ForCausalLM", "DeepSeekV4MTPModel": "DeepSeekV4MTP"}

READ_REGISTRY = (
    "from vllm.model_executor.models.registry import ModelRegistry as R\n"
    "import json\n"
    "print('REG ' + json.dumps({a: [R.models[a].module_name, R.models[a].class_name] for a in "
    + repr(tuple(ARCHS))
    + "}))\n"
)


def registry(res):
    [line] = [x for x in res.proc.stdout.splitlines() if x.startswith("REG ")]
    return json.loads(line[4:])


def test_routed_sm12x_points_v4_at_the_hookup_in_every_inspecting_process(vllm_env):
    res = vllm_env.run(
        LOAD
        + READ_REGISTRY
        + "info = R.models['DeepseekV4ForCausalLM'].inspect_model_cls()\n"  # vLLM's inspection subprocess
        "assert info.is_text_generation_model and info.supports_pp, info\n"
        "cls = R.models['DeepseekV4ForCausalLM'].load_model_cls()\n"
        "mtp = R.models['DeepSeekV4MTPModel'].load_model_cls()\n"
        "from ds_plugins.vllm.dsv4 import registry as ours\n"
        "import importlib\n"
        "for c, arch in ((cls, 'DeepseekV4ForCausalLM'), (mtp, 'DeepSeekV4MTPModel')):\n"
        "    mod, name = ours.ORIGINALS[arch]\n"
        "    upstream = getattr(importlib.import_module(mod), name)\n"
        "    assert c.__mro__[1] is upstream and c.ds_plugins_upstream is upstream, c.__mro__\n"
        "    assert c.__name__ == upstream.__name__ and c.__module__ == 'ds_plugins.vllm.dsv4.hookup'\n"
        "print('HOOKUP-OK')\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    assert "HOOKUP-OK" in res.proc.stdout
    assert res.state["decisions"]["dsv4_model"] == "ds_plugins"
    assert registry(res) == {a: ["ds_plugins.vllm.dsv4.hookup", c] for a, c in ARCHS.items()}
    assert {o["patch"]: o["state"] for o in res.state["outcomes"]}["vllm.dsv4_model.registry"] == "applied"


@pytest.mark.parametrize("machine", ["--capability 9.0 --lib deep_gemm=yes", "--capability 10.0", UPSTREAM_SM120])
def test_registry_left_as_shipped_where_upstream_serves_v4(vllm_env, machine):
    res = vllm_env.run(LOAD + READ_REGISTRY, env={"DS_PLUGINS_SIMULATE": machine}).ok()
    assert res.state["decisions"]["dsv4_model"] == "upstream"
    assert all(module.startswith("vllm.") for module, _ in registry(res).values()), registry(res)


def test_dsv4_model_upstream_switch_keeps_vllms_classes(vllm_env):
    """DS_PLUGINS_DSV4_MODEL=upstream where ds-plugins would route: vLLM's own classes stay. Where vLLM's
    own path has a blocker on that GPU that only the ds-plugins path covers (0.27: the FP8 block linears'
    e8m0 scales), the switch makes the plan unsupported, naming the blocker and the upgrade, as doctor
    says for the same machine; never "upstream" on a path that would crash."""
    switch = {"DS_PLUGINS_DSV4_MODEL": "upstream"}
    res = vllm_env.run(LOAD + READ_REGISTRY, env={"DS_PLUGINS_SIMULATE": ROUTED, **switch}).ok()
    doctor = policy.decide(simulate.from_env_value(ROUTED, {"vllm": vllm_env.version}), "vllm", env=switch)
    assert res.state["status"] == doctor.status
    assert res.state["decisions"] == {d.id: d.value for d in doctor.decisions}
    if Version(vllm_env.version) < Version("0.28"):
        assert doctor.status == "unsupported", doctor
        assert "FP8 block-scaled linear" in doctor.status_reason and "upgrade to vLLM >= " in doctor.status_reason
    else:
        assert res.state["decisions"]["dsv4_model"] == "upstream"
    assert all(module.startswith("vllm.") for module, _ in registry(res).values())


def test_hooked_class_refuses_to_build_when_a_route_was_skipped(vllm_env):
    res = vllm_env.run(
        LOAD + "from ds_plugins import patching\n"
        "from ds_plugins.vllm.dsv4 import hookup, routes\n"
        "assert routes.PATCHES, 'no routes declared'\n"
        "from vllm.version import __version__ as V\n"
        "first = next(p for p in routes.PATCHES if p.covers(V))\n"
        "patching._record(patching.Outcome(first.id, 'skipped', 'target not found (test)'))\n"
        "from vllm.model_executor.models.registry import ModelRegistry as R\n"
        "cls = R.models['DeepseekV4ForCausalLM'].load_model_cls()\n"
        "try:\n"
        "    cls(vllm_config=None)\n"
        "except hookup.RoutesMissing as e:\n"
        "    print('REFUSED ' + str(e))\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    [line] = res.lines("REFUSED ")
    assert "DS_PLUGINS_DSV4_MODEL=upstream" in line and "target not found (test)" in line


def _v4_config(folder, arch="DeepseekV4ForCausalLM", model_type="deepseek_v4"):
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": [arch],
                "model_type": model_type,
                "hidden_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 512,
                "qk_rope_head_dim": 64,
                "vocab_size": 1024,
                "max_position_embeddings": 4096,
                "torch_dtype": "bfloat16",
                "compress_ratios": [1, 4],
                "sliding_window": 128,
                "q_lora_rank": 64,
                "o_lora_rank": 64,
                "o_groups": 2,
                "index_topk": 16,
                "index_n_heads": 4,
                "index_head_dim": 128,
                "hc_mult": 2,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "intermediate_size": 128,
            }
        )
    )
    return folder


BUILD_CONFIG = (
    "from vllm.config import ModelConfig, VllmConfig, DeviceConfig\n"
    "mc = ModelConfig(model={path!r}, skip_tokenizer_init=True)\n"
    "vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device='cpu'))\n"
    "print('CG', vc.model_config.enforce_eager, vc.compilation_config.cudagraph_mode.name)\n"
)


def _cg(res):
    [line] = [x for x in res.proc.stdout.splitlines() if x.startswith("CG ")]
    _, eager, mode = line.split()
    return eager == "True", mode


def test_cudagraph_off_makes_v4_on_our_path_eager_through_vllms_own_switch(vllm_env, tmp_path):
    code = LOAD + BUILD_CONFIG.format(path=str(_v4_config(tmp_path / "v4")))
    off = vllm_env.run(code, env={"DS_PLUGINS_SIMULATE": ROUTED, "DS_PLUGINS_CUDAGRAPH": "off"}).ok()
    assert off.state["decisions"]["cudagraph"] == "off"
    assert _cg(off) == (True, "NONE")
    assert len(off.lines("CUDA graphs off for DeepSeek-V4")) == 1
    default = vllm_env.run(code, env={"DS_PLUGINS_SIMULATE": ROUTED}).ok()
    assert default.state["decisions"]["cudagraph"] == "on"
    assert _cg(default)[0] is False and not default.lines("CUDA graphs off")


def test_cudagraph_off_leaves_other_models_alone(vllm_env, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "intermediate_size": 128,
                "vocab_size": 256,
                "max_position_embeddings": 512,
                "torch_dtype": "bfloat16",
            }
        )
    )
    res = vllm_env.run(
        LOAD + BUILD_CONFIG.format(path=str(folder)), env={"DS_PLUGINS_SIMULATE": ROUTED, "DS_PLUGINS_CUDAGRAPH": "off"}
    ).ok()
    assert _cg(res)[0] is False and not res.lines("CUDA graphs off")


# --- the process kinds vLLM starts, each loading plugins from its own call site ---------------------------------
# The engine-core process calls the same load_general_plugins() (checked in every wheel by the landscape fact
# `general_plugins`); it cannot be started without a GPU platform.

STATE_AFTER = (
    "from vllm.model_executor.models.registry import ModelRegistry as R\n"
    "from vllm.utils.deep_gemm import is_deep_gemm_supported\n"
    "print('AFTER', R.models['DeepseekV4ForCausalLM'].module_name, is_deep_gemm_supported())\n"
)


def _after(res):
    [line] = [x for x in res.proc.stdout.splitlines() if x.startswith("AFTER ")]
    return line.split()[1:]


def test_api_server_process_engine_args_run_the_plugin(vllm_env, tmp_path):
    res = vllm_env.run(
        "import sys\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "assert 'ds_plugins.registration' not in sys.modules\n"
        f"EngineArgs(model={str(_v4_config(tmp_path / 'v4'))!r}, skip_tokenizer_init=True)\n" + STATE_AFTER,
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    assert res.state["calls"] == 1 and res.state["via"] == "vllm.general_plugins"
    assert _after(res) == ["ds_plugins.vllm.dsv4.hookup", "False"]


def test_worker_process_init_worker_runs_the_plugin_before_the_worker_exists(vllm_env, tmp_path):
    (tmp_path / "dsp_probe_worker.py").write_text(
        "class Worker:\n"
        "    def __init__(self, **kwargs):\n"
        "        import ds_plugins.registration as r\n"
        "        print('WORKER-SAW', r.get('vllm').state)\n"
    )
    res = vllm_env.run(
        "from vllm.config import ModelConfig, VllmConfig, DeviceConfig\n"
        f"mc = ModelConfig(model={str(_v4_config(tmp_path / 'v4'))!r}, skip_tokenizer_init=True)\n"
        "vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device='cpu'))\n"
        "import ds_plugins.registration as r\n"
        "assert r.get('vllm').calls == 0\n"
        "vc.parallel_config.worker_cls = 'dsp_probe_worker.Worker'\n"
        "from vllm.v1.worker.worker_base import WorkerWrapperBase\n"
        "WorkerWrapperBase(rpc_rank=0).init_worker([{'vllm_config': vc}])\n" + STATE_AFTER,
        env={"DS_PLUGINS_SIMULATE": ROUTED},
        pythonpath=(str(tmp_path),),
    ).ok()
    assert "WORKER-SAW registered" in res.proc.stdout
    assert _after(res) == ["ds_plugins.vllm.dsv4.hookup", "False"]


def test_vllms_model_loader_builds_the_hooked_class_the_new_way(vllm_env, tmp_path):
    """vLLM's initialize_model reads the class's __init__ signature: it must see (vllm_config, prefix), or it
    falls back to guessing old-style arguments. A skipped route stops the build at our check, before any layer."""
    res = vllm_env.run(
        LOAD + "import inspect, warnings\n"
        "from ds_plugins import patching\n"
        "from ds_plugins.vllm.dsv4 import hookup\n"
        "from vllm.config import ModelConfig, VllmConfig, DeviceConfig\n"
        f"mc = ModelConfig(model={str(_v4_config(tmp_path / 'v4'))!r}, skip_tokenizer_init=True)\n"
        "vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device='cpu'))\n"
        "from vllm.model_executor.models.registry import ModelRegistry as R\n"
        "cls = R.models['DeepseekV4ForCausalLM'].load_model_cls()\n"
        "params = inspect.signature(cls.__init__).parameters\n"
        "assert 'vllm_config' in params and 'prefix' in params, params\n"
        "patching._record(patching.Outcome('vllm.route.prefill', 'skipped', 'target not found (test)'))\n"
        "from vllm.model_executor.model_loader.utils import initialize_model\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    initialize_model(vllm_config=vc, model_class=cls)\n"
        "except hookup.RoutesMissing as e:\n"
        "    print('REFUSED ' + str(e))\n",
        env={"DS_PLUGINS_SIMULATE": ROUTED},
    ).ok()
    [line] = res.lines("REFUSED ")
    assert "vllm.route.prefill" in line
    assert not res.lines("old-style model class")
