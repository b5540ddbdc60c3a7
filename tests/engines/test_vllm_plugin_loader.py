"""vLLM's own plugin loader, in a fresh process of a real pip-installed vLLM, runs our entry point."""

import json

import pytest

pytestmark = pytest.mark.engines

LOAD = "import vllm.plugins as p\np.load_general_plugins()\np.load_general_plugins()\n"
SM120 = "--capability 12.0 --lib deep_gemm=no-sm12x --lib flashinfer=sm120"


def test_load_general_plugins_discovers_and_runs_ds_plugins(vllm_env):
    res = vllm_env.run(
        "import importlib.metadata as m\n"
        "eps = {e.name: e.value for e in m.entry_points(group='vllm.general_plugins')}\n"
        "assert eps.get('ds_plugins') == 'ds_plugins:register', eps\n" + LOAD
    ).ok()
    state = res.state
    assert state["via"] == "vllm.general_plugins" and state["calls"] == 1
    assert state["state"] == "registered" and state["status"] == "supported"
    # one line through vLLM's logger, saying what ds-plugins did
    [line] = res.lines(f"ds-plugins 0.1.0 for vLLM {vllm_env.version}")
    assert "ds_plugins" in line or "vllm.ds_plugins" in line or "INFO" in line
    assert "`ds-plugins doctor` explains" in line


def test_registering_again_in_the_same_process_is_a_noop(vllm_env):
    res = vllm_env.run(LOAD + "import ds_plugins\nds_plugins.register()\nds_plugins.register()\n").ok()
    assert res.state["calls"] == 3 and res.state["state"] == "registered"
    assert len(res.lines("ds-plugins 0.1.0 for vLLM")) == 1


def test_vllm_plugins_allow_list_is_respected(vllm_env):
    res = vllm_env.run(LOAD, env={"VLLM_PLUGINS": "lora_filesystem_resolver"}).ok()
    assert res.state["calls"] == 0
    res = vllm_env.run(LOAD, env={"VLLM_PLUGINS": "ds_plugins"}).ok()
    assert res.state["calls"] == 1 and res.state["state"] == "registered"


def test_decisions_inside_vllm_match_doctor(vllm_env):
    env = {"DS_PLUGINS_SIMULATE": SM120}
    inside = vllm_env.run(LOAD, env=env).ok().state
    doctor = vllm_env.run(
        "import sys\nfrom ds_plugins.cli import main\nsys.exit(main(['doctor', '--json']))", env=env, state=False
    ).ok()
    report = json.loads(doctor.proc.stdout)
    assert inside["decisions"] == {d["id"]: d["value"] for d in report["engines"]["vllm"]["decisions"]}
    assert inside["decisions"]["indexer"] == "triton"  # vLLM >= 0.24 with DeepGEMM lacking SM12x kernels


def test_bad_switch_is_one_error_line_and_vllm_carries_on(vllm_env):
    res = vllm_env.run(LOAD + "print('VLLM-STILL-LOADING-PLUGINS-OK')\n", env={"DS_PLUGINS_SPARSE_MLA": "bogus"}).ok()
    assert res.state["state"] == "config-error"
    [line] = res.lines("DS_PLUGINS_SPARSE_MLA='bogus'")
    assert "auto, triton, upstream" in line and "runs as shipped" in line
    assert "VLLM-STILL-LOADING-PLUGINS-OK" in res.proc.stdout


def test_internal_failure_is_one_error_line_and_vllm_carries_on(vllm_env):
    res = vllm_env.run(
        "import ds_plugins.registration as r\n"
        "def broken(*a, **k):\n    raise RuntimeError('injected')\n"
        "r.decide = broken\n" + LOAD
    ).ok()
    assert res.state["state"] == "failed"
    [line] = res.lines("internal error")
    assert "RuntimeError: injected" in line and "left as shipped" in line


def test_disabled_means_no_probe_and_no_patch(vllm_env):
    res = vllm_env.run(
        LOAD + "import sys\nprint('PROBE-IMPORTED', 'ds_plugins.probe' in sys.modules)\n",
        env={"DS_PLUGINS_DISABLE": "1"},
    ).ok()
    assert res.state["state"] == "disabled"
    assert "PROBE-IMPORTED False" in res.proc.stdout


def test_no_torch_triton_or_engine_module_is_imported_because_of_us(vllm_env):
    code = LOAD + "import sys, json\nprint('MODS ' + json.dumps(sorted(sys.modules)))\n"
    on = vllm_env.run(code).ok()
    off = vllm_env.run(code, env={"DS_PLUGINS_DISABLE": "1"}).ok()

    def mods(res):
        return set(json.loads(next(x for x in res.proc.stdout.splitlines() if x.startswith("MODS "))[5:]))

    added = mods(on) - mods(off)
    heavy = sorted(
        m
        for m in added
        if m.split(".")[0] in ("torch", "triton", "vllm", "sglang", "deep_gemm", "flashinfer", "transformers")
    )
    assert heavy == []
    assert all(
        m.split(".")[0] in ("ds_plugins", "pynvml")
        or m.split(".")[0] in __import__("sys").stdlib_module_names
        or m.startswith("packaging")
        for m in added
    ), sorted(added)
