"""custom_all_reduce=off (known failure custom_all_reduce_p2p, vllm#47266): the patch `vllm.custom_all_reduce.off`
on vLLM's real ParallelConfig, and its seam in the source of every matrix wheel.

Live (every live vLLM of ci/versions.toml: 0.24, 0.27, 0.28, 0.30): the plan comes from the real policy for two
SM120 GPUs NVML reports without NVLink; ds-plugins' patching applies the patch to the installed
`vllm.config.parallel`; vLLM's own ParallelConfig is then built as `EngineArgs.create_engine_config` builds it
(tensor_parallel_size, disable_custom_all_reduce). This machine has no GPU, so vLLM's platform is
UnspecifiedPlatform, whose use_custom_allreduce() is False and makes ParallelConfig switch custom all-reduce off by
itself; the script gives the platform the answer CudaPlatformBase gives (True, checked in every matrix wheel by the
AST test below), so the config is what a CUDA box gets as shipped. Other matrix versions: the seam, the flag's way
in from the engine arguments, the worker reading it, and the CUDA platform's answer, by AST
(ci/vllm_seams.check_custom_all_reduce).
"""

import shutil

import pytest
from packaging.version import Version

from ci import upstream, vllm_seams
from ci.upstream_facts import parse
from ds_plugins.vllm.dsv4 import custom_all_reduce

LIVE = """
import logging, pickle
import vllm
from vllm.platforms import current_platform
from vllm.config.parallel import ParallelConfig
from ds_plugins import patching, stock
from ds_plugins.policy import decide
from ds_plugins.probe import Device, Probe
from ds_plugins.vllm.dsv4 import custom_all_reduce

current_platform.use_custom_allreduce = lambda: True  # CudaPlatformBase's answer (see the module docstring)

def build(**kw):
    return ParallelConfig(distributed_executor_backend="mp", **kw)

print("AS-SHIPPED", build(tensor_parallel_size=2).disable_custom_all_reduce)
gpus = tuple(Device("cuda", i, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0)) for i in range(2))
probe = Probe("3.11", {"vllm": vllm.__version__}, None, None, gpus, "", stock.libraries("vllm", vllm.__version__),
              gpu_links=%(links)r, gpu_links_note="from the test")
plan = decide(probe, "vllm")  # this process's DS_PLUGINS_* switches
print("DECISION", plan.value("custom_all_reduce"))
patching.apply([custom_all_reduce.PATCH], plan, logging.getLogger("vllm.ds_plugins"))
patching.apply([custom_all_reduce.PATCH], plan, logging.getLogger("vllm.ds_plugins"))  # twice: a no-op
print("OUTCOME", patching.outcomes()[custom_all_reduce.PATCH.id].state)
tp2 = build(tensor_parallel_size=2)
print("TP2", tp2.disable_custom_all_reduce, tp2.world_size)
print("PICKLED", pickle.loads(pickle.dumps(tp2)).disable_custom_all_reduce)
print("TP1", build(tensor_parallel_size=1).disable_custom_all_reduce)
print("USER", build(tensor_parallel_size=2, disable_custom_all_reduce=True).disable_custom_all_reduce)
print("PP2", build(tensor_parallel_size=1, pipeline_parallel_size=2).disable_custom_all_reduce)
"""
LINE = "ds-plugins: --disable-custom-all-reduce set for tensor_parallel_size=2"


@pytest.mark.engines
def test_the_patch_sets_disable_custom_all_reduce_on_vllms_own_parallel_config(vllm_env):
    res = vllm_env.run(LIVE % {"links": "pcie"}, state=False).ok()
    out = res.proc.stdout
    assert "AS-SHIPPED False" in out  # vLLM as shipped keeps custom all-reduce on for tp=2 on CUDA
    assert "DECISION off" in out and "OUTCOME applied" in out
    assert "TP2 True 2" in out and "PICKLED True" in out  # what travels to the engine core and the workers
    assert "TP1 False" in out and "PP2 False" in out  # no tensor-parallel all-reduce: left alone
    assert "USER True" in out
    lines = res.lines(LINE)
    assert len(lines) == 1, res.output[-3000:]  # one line, for the config it changed (not for the user's own)
    assert "no NVLink between these SM12x GPUs" in lines[0] and "vllm-project/vllm#47266" in lines[0]
    assert "DS_PLUGINS_CUSTOM_ALL_REDUCE=upstream leaves vLLM's choice alone" in lines[0]


@pytest.mark.engines
def test_the_switch_opts_out_or_forces_it(vllm_env):
    res = vllm_env.run(LIVE % {"links": "pcie"}, env={"DS_PLUGINS_CUSTOM_ALL_REDUCE": "upstream"}, state=False).ok()
    out = res.proc.stdout
    assert "DECISION upstream" in out and "OUTCOME not-selected" in out
    assert "TP2 False 2" in out and "USER True" in out
    assert not res.lines(LINE)
    res = vllm_env.run(LIVE % {"links": "nvlink"}, env={"DS_PLUGINS_CUSTOM_ALL_REDUCE": "off"}, state=False).ok()
    out = res.proc.stdout
    assert "DECISION off" in out and "TP2 True 2" in out
    [line] = res.lines(LINE)
    assert "DS_PLUGINS_CUSTOM_ALL_REDUCE=off asks for it" in line


THROUGH_THE_PLUGIN_LOADER = """
import vllm.plugins
from vllm.platforms import current_platform
current_platform.use_custom_allreduce = lambda: True  # CudaPlatformBase's answer (see the module docstring)
vllm.plugins.load_general_plugins()  # ds-plugins' entry point: probe (simulated), policy, patching
from vllm.config.parallel import ParallelConfig
from ds_plugins import patching
print("OUTCOME", patching.outcomes()["vllm.custom_all_reduce.off"].state)
print("TP2", ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="mp").disable_custom_all_reduce)
"""


@pytest.mark.engines
def test_vllms_plugin_loader_arms_it_for_two_pcie_only_sm120_gpus(vllm_env):
    # the simulated machine: two SM120 GPUs without NVLink, with the wheel's stock libraries
    simulated = f"--engine vllm=={vllm_env.version} --capability 12.0 --capability 12.0 --gpu-link pcie"
    res = vllm_env.run(THROUGH_THE_PLUGIN_LOADER, env={"DS_PLUGINS_SIMULATE": simulated}).ok()
    assert res.state["decisions"]["custom_all_reduce"] == "off" and res.state["status"] == "supported"
    assert "OUTCOME applied" in res.proc.stdout and "TP2 True" in res.proc.stdout
    [startup] = res.lines(f"ds-plugins 0.1.0 for vLLM {vllm_env.version}")
    assert "custom_all_reduce=off" in startup
    assert len(res.lines(LINE)) == 1
    # the same machine with NVLink: nothing selected, vLLM as shipped
    simulated = simulated.replace("pcie", "nvlink")
    res = vllm_env.run(THROUGH_THE_PLUGIN_LOADER, env={"DS_PLUGINS_SIMULATE": simulated}).ok()
    assert res.state["decisions"]["custom_all_reduce"] == "upstream"
    assert "OUTCOME not-selected" in res.proc.stdout and "TP2 False" in res.proc.stdout


V4_VLLM = [v for e, v in upstream.matrix() if e == "vllm" and Version(v) >= Version("0.20")]


@pytest.mark.contract
@pytest.mark.parametrize("version", V4_VLLM)
def test_the_seam_in_every_matrix_wheel_ast(version):
    assert custom_all_reduce.PATCH.covers(version)
    assert vllm_seams.check_patch(upstream.source("vllm", version), custom_all_reduce.PATCH) is None


SEAM_FILES = (
    "vllm/config/parallel.py",
    "vllm/engine/arg_utils.py",
    "vllm/v1/worker/gpu_worker.py",
    "vllm/platforms/cuda.py",
)


def _copy(tmp_path, version="0.30.0"):
    src = upstream.source("vllm", version)
    for rel in SEAM_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, tmp_path / rel)
    parse.cache_clear()
    return tmp_path


def _edit(root, rel, old, new):
    path = root / rel
    text = path.read_text()
    assert old in text, (rel, old)
    path.write_text(text.replace(old, new, 1))
    parse.cache_clear()


@pytest.mark.contract
@pytest.mark.parametrize(
    "rel, old, new, message",
    [
        (
            "vllm/config/parallel.py",
            "disable_custom_all_reduce: bool = False",
            "disable_custom_all_reduce: bool = True",
            "has no field disable_custom_all_reduce: bool = False",
        ),
        (
            "vllm/config/parallel.py",
            "    def __post_init__(self) -> None:",
            "    def __post_init__(self, extra) -> None:",
            "ParallelConfig.__post_init__ is not a def (self)",
        ),
        (
            "vllm/engine/arg_utils.py",
            "disable_custom_all_reduce=self.disable_custom_all_reduce",
            "disable_custom_all_reduce=False",
            "does not build ParallelConfig",
        ),
        (
            "vllm/v1/worker/gpu_worker.py",
            "set_custom_all_reduce(not parallel_config.disable_custom_all_reduce)",
            "set_custom_all_reduce(True)",
            "does not call set_custom_all_reduce",
        ),
    ],
)
def test_the_seam_check_names_what_moved(tmp_path, rel, old, new, message):
    root = _copy(tmp_path)
    assert vllm_seams.check_patch(root, custom_all_reduce.PATCH) is None  # the copy as shipped passes
    _edit(root, rel, old, new)
    problem = vllm_seams.check_patch(root, custom_all_reduce.PATCH)
    assert problem is not None and message in problem, problem


@pytest.mark.contract
def test_the_seam_check_notices_a_cuda_platform_that_keeps_it_off(tmp_path):
    root = _copy(tmp_path)
    text = (root / "vllm/platforms/cuda.py").read_text()
    marker = "def use_custom_allreduce(cls) -> bool:\n        return True"
    assert marker in text
    _edit(root, "vllm/platforms/cuda.py", marker, "def use_custom_allreduce(cls) -> bool:\n        return False")
    assert "CudaPlatformBase.use_custom_allreduce is not `return True`" in vllm_seams.check_patch(
        root, custom_all_reduce.PATCH
    )
