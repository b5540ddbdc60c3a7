"""SGLang: the entry point through SGLang's own load_plugins(), and the PYTHONPATH hook in a
parent and a spawned child, with real pip-installed SGLang (0.5.23 with plugins, 0.5.10 hook-only)."""

import json
import sys
import textwrap

import pytest

from ds_plugins_sglang import sglang_path
from tests.internals import HOOK_PENDING_SRC

pytestmark = pytest.mark.engines

HOOK = (sglang_path(),)


def test_load_plugins_discovers_and_runs_ds_plugins(sglang_plugins_env):
    res = sglang_plugins_env.run(
        "import importlib.metadata as m\n"
        "eps = {e.name: e.value for e in m.entry_points(group='sglang.srt.plugins')}\n"
        "assert eps.get('ds_plugins') == 'ds_plugins_sglang:register', eps\n"
        "import sglang.srt.plugins as p\np.load_plugins()\np.load_plugins()\n"
    ).ok()
    state = res.state
    assert state["via"] == "sglang.srt.plugins" and state["calls"] == 1
    assert state["state"] == "registered" and state["status"] == "supported"


def test_hook_decides_before_sglang_runs_and_registers_after(sglang_env):
    res = sglang_env.run(
        "import sys\n"
        "from ds_plugins import importhook\n"
        + HOOK_PENDING_SRC
        + "assert hook_pending('sglang') and 'ds_plugins.registration' not in sys.modules\n"
        "seen = {}\n"
        "def early(_m):\n"
        "    import ds_plugins.registration as r\n"
        "    seen['state'] = r.get('sglang').state\n"
        # sglang.srt.environ is the first SGLang module `import sglang` pulls in, in every version
        "importhook.when_imported('sglang.srt.environ', early, before=True)\n"
        "import sglang\n"
        "print('EARLY', seen)\n",
        pythonpath=HOOK,
    ).ok()
    assert "EARLY {'state': 'prepared'}" in res.proc.stdout
    state = res.state
    assert state["via"] == "pythonpath-hook" and state["state"] == "registered" and state["calls"] == 1
    expected = "supported" if sglang_env.version >= "0.5.12" else "unsupported"
    assert state["status"] == expected
    if expected == "unsupported":
        [line] = res.lines("needs SGLang >= 0.5.12")
        assert "doing nothing" in line


def test_hook_reaches_a_spawned_child(sglang_env, tmp_path):
    script = tmp_path / "spawn_check.py"
    script.write_text(
        textwrap.dedent("""
        import json, multiprocessing as mp, os

        def child(queue):
            import sglang  # noqa: F401  (a scheduler/TP worker imports sglang like this)
            import ds_plugins.registration as r
            queue.put(r.get("sglang").snapshot())

        if __name__ == "__main__":
            import sglang  # noqa: F401
            import ds_plugins.registration as r
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start()
            kid = q.get(timeout=300)
            p.join(60)
            print("PARENT " + json.dumps(r.get("sglang").snapshot()))
            print("CHILD " + json.dumps(kid))
    """)
    )
    res = sglang_env.run(script=script, pythonpath=HOOK, cwd=tmp_path).ok()
    out = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
        for line in res.proc.stdout.splitlines()
        if line.startswith(("PARENT ", "CHILD "))
    }
    assert out["PARENT"]["via"] == out["CHILD"]["via"] == "pythonpath-hook"
    assert out["PARENT"]["state"] == out["CHILD"]["state"] == "registered"
    assert out["PARENT"]["pid"] != out["CHILD"]["pid"]


def test_hook_and_entry_point_do_not_double_apply(sglang_plugins_env):
    res = sglang_plugins_env.run(
        "import logging\n"
        "records = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record): records.append(record.getMessage())\n"
        "logging.getLogger('sglang.ds_plugins').addHandler(Keep())\n"
        "logging.getLogger('sglang.ds_plugins').setLevel(logging.INFO)\n"
        "import sglang\n"
        "import sglang.srt.plugins as p\np.load_plugins()\n"
        "print('SUMMARIES', sum('ds-plugins 0.1.0 for SGLang' in m for m in records))\n",
        pythonpath=HOOK,
    ).ok()
    state = res.state
    assert state["via"] == "pythonpath-hook" and state["calls"] == 2 and state["state"] == "registered"
    assert "SUMMARIES 1" in res.proc.stdout


def test_hook_leaves_processes_that_never_import_sglang_alone(sglang_env):
    code = "import sys, json\nprint('MODS ' + json.dumps(sorted(sys.modules)))\n"

    def mods(res):
        return set(json.loads(next(x for x in res.proc.stdout.splitlines() if x.startswith("MODS "))[5:]))

    with_hook = sglang_env.run(code, pythonpath=HOOK, state=False).ok()
    without = sglang_env.run(code, state=False).ok()
    added = mods(with_hook) - mods(without)
    ours = {m for m in added if m.split(".")[0] in ("ds_plugins", "ds_plugins_sglang", "sitecustomize")}
    assert ours <= {
        "sitecustomize",
        "ds_plugins",
        "ds_plugins.importhook",
        "ds_plugins.settings",
        "ds_plugins_sglang",
        "ds_plugins_sglang.pythonpath_hook",
    }
    others = added - ours
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in others), sorted(others)
    assert not {"torch", "sglang", "vllm", "triton", "packaging", "pynvml"} & {m.split(".")[0] for m in added}


def test_an_existing_sitecustomize_still_runs(sglang_env, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITECUSTOMIZE_RAN = True\n")
    res = sglang_env.run(
        "import builtins, sys\n"
        "from ds_plugins import importhook\n"
        + HOOK_PENDING_SRC
        + "print('OTHER', getattr(builtins, 'OTHER_SITECUSTOMIZE_RAN', False))\n"
        "print('ARMED', hook_pending('sglang'))\n"
        "print('MODULE', sys.modules['sitecustomize'].__file__)\n",
        pythonpath=(*HOOK, str(other)),
        state=False,
    ).ok()
    assert "OTHER True" in res.proc.stdout and "ARMED True" in res.proc.stdout
    assert f"MODULE {other / 'sitecustomize.py'}" in res.proc.stdout


def test_disable_keeps_the_hook_unarmed(sglang_env):
    res = sglang_env.run(
        "from ds_plugins import importhook\n"
        + HOOK_PENDING_SRC
        + "print('ARMED', hook_pending('sglang'))\nimport sglang\n",
        pythonpath=HOOK,
        env={"DS_PLUGINS_DISABLE": "1"},
    ).ok()
    assert "ARMED False" in res.proc.stdout
    assert res.state["calls"] == 0
