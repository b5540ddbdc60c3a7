"""`state()`, the line doctor prints: true for the environment it runs in, and cheap."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.kv.conftest import ROOT

CODE = (
    "import sys, ds_plugins.vllm.mooncake.connector as m; print(m.state()); "
    "print(sorted(x for x in ('torch', 'vllm', 'mooncake') if x in sys.modules))"
)


def run(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_state_reports_available_where_the_engine_can_load(mooncake_spec):
    from ci.mooncake_env import child_env

    env = child_env(mooncake_spec)
    line, imported = run(env)
    assert line.startswith(f"available: mooncake-transfer-engine {mooncake_spec['mooncake']} (tcp; rdma:"), line
    assert imported == "[]"  # neither torch, vLLM nor the 100 MB engine.so was loaded to say so


def test_state_names_the_missing_driver_library(mooncake_spec):
    from ci.mooncake_env import child_env

    env = child_env(mooncake_spec)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in env["LD_LIBRARY_PATH"].split(os.pathsep) if not p.endswith("/stub")
    )
    line, _ = run(env)
    assert line.startswith(
        f"unavailable: mooncake-transfer-engine {mooncake_spec['mooncake']} installed, but its "
        "engine.so cannot find libcuda.so.1"
    ), line


def test_the_0_1_module_path_is_the_same_module():
    """Configurations written for ds-plugins 0.1 name `ds_plugins.vllm.mooncake_connector`: vLLM importing
    that path gets the connector module itself (same classes, same MODULE_PATH), not a copy."""
    code = (
        "import ds_plugins.vllm.mooncake_connector as old, ds_plugins.vllm.mooncake.connector as new; "
        "print('SAME', old is new, old.MooncakeConnectorV1 is new.DSV4MooncakeConnector, old.MODULE_PATH)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("SAME ")]  # vLLM logs to stdout too
    assert line.split() == ["SAME", "True", "True", "ds_plugins.vllm.mooncake.connector"]
