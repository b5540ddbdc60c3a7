"""ds_plugins.vllm.ascend.install.install: what it does for each policy decision, with real plans from the policy on
simulated machines. Where it does not register, it must not import torch or vLLM (it runs in every
vLLM process); where vllm-ascend is installed it defers. Runs in subprocesses for a clean sys.modules."""

import json
import subprocess
import sys

import pytest

CODE = """
import json, logging, os, sys
from ds_plugins.registration import current_probe, decide
from ds_plugins.vllm.ascend import install as ascend_quant
plan = decide(current_probe(), "vllm")
state = ascend_quant.install(plan, logging.getLogger("t"))
print(json.dumps({"value": plan.value("ascend_quant"), "state": state,
                  "heavy": sorted(m for m in ("torch", "vllm") if m in sys.modules)}))
"""


def run(env):
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DS_PLUGINS_")}
    out = subprocess.run(
        [sys.executable, "-c", CODE], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "env,value,state",
    [
        (
            {"DS_PLUGINS_SIMULATE": "--engine vllm==0.30.0 --capability 9.0 --lib vllm_ascend=yes"},
            "vllm-ascend",
            "deferred to vllm-ascend (it registers --quantization ascend itself)",
        ),
        (
            {"DS_PLUGINS_SIMULATE": "--engine vllm==0.30.0 --capability 9.0", "DS_PLUGINS_ASCEND_QUANT": "off"},
            "off",
            "off",
        ),
    ],
)
def test_install_steps_aside_without_importing_torch(env, value, state):
    got = run(env)
    assert got == {"value": value, "state": state, "heavy": []}, got
