"""SGLang's DeepGEMM gate under ds-plugins, in real SGLang processes (tests/engines/sglang_gate_script.py).

- The decision reaches a multiprocessing "spawn" child (SGLang's schedulers, TP workers and detokenizer
  are such children) through the PYTHONPATH hook and through the entry point, and SGLang's own flags
  say so there: SGLANG_ENABLE_JIT_DEEPGEMM, envs.SGLANG_ENABLE_JIT_DEEPGEMM.get(), and the configurer's
  ENABLE_JIT_DEEPGEMM, computed by SGLang's real configurer on a (faked) SM120 where it would be True.
- A gate computed before ds-plugins decided (stale import): the declared patch turns the constants off,
  and the copy another module took with `from ... import`.
- A value the user set explicitly wins, with one warning. An unknown layout: the patch is skipped with
  one warning and SGLang keeps its value. SGLang 0.5.10 (no V4): nothing is set.
"""

import json
from pathlib import Path

import pytest

from ds_plugins_sglang import sglang_path

pytestmark = pytest.mark.engines

HOOK = (sglang_path(),)
SCRIPT = Path(__file__).with_name("sglang_gate_script.py")
OFF = {"DS_PLUGINS_DEEPGEMM": "off"}


def gate_reports(res) -> dict:
    return {
        r["where"]: r
        for r in (json.loads(line[5:]) for line in res.proc.stdout.splitlines() if line.startswith("GATE "))
    }


def run_script(env, how, when, extra_env=None, tmp_path=None):
    return env.run(
        script=SCRIPT,
        env={"GATE_HOW": how, "GATE_WHEN": when, **(extra_env or {})},
        pythonpath=HOOK if how == "hook" else (),
        cwd=tmp_path,
    ).ok()


@pytest.mark.parametrize("how", ["hook", "entry"])
def test_off_reaches_a_spawned_child_in_sglangs_own_flags(sglang_plugins_env, how, tmp_path):
    res = run_script(sglang_plugins_env, how, "spawn", OFF, tmp_path)
    out = gate_reports(res)
    parent, child = out["parent"], out["child"]
    assert parent["pid"] != child["pid"]
    assert parent["registration"]["decisions"]["deepgemm"] == "off"
    assert parent["env"] == child["env"] == "0"
    assert child["sglang_switch"] is False
    assert child["ENABLE_JIT_DEEPGEMM"] is False and child["DEEPGEMM_SCALE_UE8M0"] is False
    assert child["copy_in_batch_invariant_ops"] is False
    if how == "entry":  # the child's own load_plugins() registered after the configurer was imported
        assert child["registration"]["via"] == "sglang.srt.plugins"
    else:
        assert child["registration"]["via"] == "pythonpath-hook"
    assert child["registration"]["state"] == "registered"


@pytest.mark.parametrize("how", ["hook", "entry"])
def test_without_a_decision_sglangs_gate_says_yes_in_the_same_child(sglang_plugins_env, how, tmp_path):
    """The control for the test above: the faked SM120 does make SGLang's gate say True."""
    res = run_script(sglang_plugins_env, how, "spawn", {"DS_PLUGINS_DEEPGEMM": "upstream"}, tmp_path)
    child = gate_reports(res)["child"]
    assert child["env"] is None and child["sglang_switch"] is True
    assert child["ENABLE_JIT_DEEPGEMM"] is True and child["copy_in_batch_invariant_ops"] is True


def test_a_gate_computed_before_registration_is_patched_with_its_copies(sglang_plugins_env, tmp_path):
    res = run_script(sglang_plugins_env, "entry", "stale", OFF, tmp_path)
    out = gate_reports(res)
    before, after = out["before"], out["after"]
    assert before["ENABLE_JIT_DEEPGEMM"] is True and before["copy_in_batch_invariant_ops"] is True
    assert after["ENABLE_JIT_DEEPGEMM"] is False and after["copy_in_batch_invariant_ops"] is False
    assert after["DEEPGEMM_SCALE_UE8M0"] is False and after["DEEPGEMM_NEED_TMA_ALIGNED_SCALES"] is True
    assert after["env"] == "0"
    outcomes = {o["patch"]: o["state"] for o in after["registration"]["outcomes"]}
    assert outcomes["sglang.deepgemm_off.configurer"] == "applied"


def test_the_users_explicit_switch_wins_with_one_warning(sglang_plugins_env, tmp_path):
    res = run_script(sglang_plugins_env, "entry", "stale", {**OFF, "SGLANG_ENABLE_JIT_DEEPGEMM": "1"}, tmp_path)
    after = gate_reports(res)["after"]
    assert after["env"] == "1" and after["ENABLE_JIT_DEEPGEMM"] is True
    outcomes = {o["patch"]: o for o in after["registration"]["outcomes"]}
    assert outcomes["sglang.deepgemm_off.configurer"]["state"] == "skipped"
    [skip] = res.lines("skipping patch sglang.deepgemm_off.configurer")
    assert "SGLANG_ENABLE_JIT_DEEPGEMM=1 was set explicitly" in skip
    assert len(res.lines("keeps the user's value")) == 1


def test_the_users_explicit_switch_reaches_the_child_unchanged(sglang_plugins_env, tmp_path):
    res = run_script(sglang_plugins_env, "hook", "spawn", {**OFF, "SGLANG_ENABLE_JIT_DEEPGEMM": "true"}, tmp_path)
    child = gate_reports(res)["child"]
    assert child["env"] == "true" and child["ENABLE_JIT_DEEPGEMM"] is True


def test_a_configurer_that_looks_different_is_skipped_with_one_warning(sglang_plugins_env):
    res = sglang_plugins_env.run(
        "import sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import sglang_gate_script as g\n"
        "c = g.import_configurer()\n"
        "c.DEEPGEMM_SCALE_UE8M0 = 'ue8m0'   # a layout this patch was not written for\n"
        "import sglang.srt.plugins as p\np.load_plugins()\n"
        "print('AFTER', c.ENABLE_JIT_DEEPGEMM, c.DEEPGEMM_SCALE_UE8M0)\n",
        env=OFF,
    ).ok()
    [skip] = res.lines("skipping patch sglang.deepgemm_off.configurer")
    assert "DEEPGEMM_SCALE_UE8M0 is not a bool here" in skip and "upstream behaviour kept" in skip
    assert "AFTER False ue8m0" in res.proc.stdout  # SGLang's values untouched (False on a CPU)
    outcomes = {o["patch"]: o["state"] for o in res.state["outcomes"]}
    assert outcomes["sglang.deepgemm_off.configurer"] == "skipped"
    assert res.state["state"] == "registered"


def test_the_hook_sets_the_switch_only_where_sglang_has_deepseek_v4(sglang_env):
    """Through the hook on every live version: 0.5.10 (no V4) is unsupported, so nothing is set even
    when asked to; 0.5.12+ get the switch before SGLang's body runs."""
    res = sglang_env.run(
        "import os, sglang\nprint('ENV', os.environ.get('SGLANG_ENABLE_JIT_DEEPGEMM'))\n", pythonpath=HOOK, env=OFF
    ).ok()
    if sglang_env.version >= "0.5.12":
        assert "ENV 0" in res.proc.stdout and res.state["status"] == "supported"
    else:
        assert "ENV None" in res.proc.stdout
        assert res.state["status"] == "unsupported" and res.state["outcomes"] == []


def test_simulated_policy_defaults_set_the_switches_in_the_spawned_child(sglang_plugins_env, tmp_path):
    """The policy's defaults, named by DS_PLUGINS_SIMULATE (the SGLang code is 0.5.23's): SGLang 0.5.13 on
    SM121 with a DeepGEMM without SM12x kernels decides deepgemm=off, so SGLANG_ENABLE_JIT_DEEPGEMM=0 reaches
    the spawned child. 0.5.12 on SM12x is unsupported (the path manifest) and sets nothing; its
    SGLANG_OPT_FP8_WO_A_GEMM=0 goes with indexer=triton where 0.5.12 is served (forced, on SM90), and the
    user's own value of it stays."""
    simulate = {"DS_PLUGINS_SIMULATE": "--engine sglang==0.5.13 --capability 12.1 --lib deep_gemm=no-sm12x"}
    res = run_script(sglang_plugins_env, "hook", "spawn", simulate, tmp_path)
    child = gate_reports(res)["child"]
    assert child["registration"]["decisions"]["deepgemm"] == "off"
    assert child["env"] == "0" and child["ENABLE_JIT_DEEPGEMM"] is False
    unsupported = sglang_plugins_env.run(
        "import os, sglang\nprint('ENV', os.environ.get('SGLANG_ENABLE_JIT_DEEPGEMM'), "
        "os.environ.get('SGLANG_OPT_FP8_WO_A_GEMM'))\n",
        pythonpath=HOOK,
        env={"DS_PLUGINS_SIMULATE": "--engine sglang==0.5.12 --capability 12.0 --lib deep_gemm=no-sm12x"},
    ).ok()
    assert "ENV None None" in unsupported.proc.stdout and unsupported.state["status"] == "unsupported"
    forced = {"DS_PLUGINS_SIMULATE": "--engine sglang==0.5.12 --capability 9.0", "DS_PLUGINS_INDEXER": "triton"}
    res = sglang_plugins_env.run(
        "import os, sglang\nprint('WO_A', os.environ.get('SGLANG_OPT_FP8_WO_A_GEMM'))\n"
        "from sglang.srt.environ import envs\nprint('SGLANG_SAYS', envs.SGLANG_OPT_FP8_WO_A_GEMM.get())\n",
        pythonpath=HOOK,
        env=forced,
    ).ok()
    assert res.state["decisions"]["indexer"] == "triton"
    assert "WO_A 0" in res.proc.stdout and "SGLANG_SAYS False" in res.proc.stdout
    mine = sglang_plugins_env.run(
        "import os, sglang\nprint('WO_A', os.environ.get('SGLANG_OPT_FP8_WO_A_GEMM'))\n",
        pythonpath=HOOK,
        env={**forced, "SGLANG_OPT_FP8_WO_A_GEMM": "1"},
    ).ok()
    assert "WO_A 1" in mine.proc.stdout
    assert len(mine.lines("SGLANG_OPT_FP8_WO_A_GEMM=1 was set explicitly")) == 1
