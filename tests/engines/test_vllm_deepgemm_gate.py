"""The DeepGEMM gate patches, in real vLLM processes started the way vLLM's plugin loader runs us.

`vllm.platforms.cuda` needs libcuda to import, so on a CPU machine the platform patch can only be seen
armed; its check/install/undo are exercised on vLLM's own `Platform.support_deep_gemm` classmethod (the
base class of CudaPlatformBase, same shape). `vllm.utils.deep_gemm` imports on CPU: the cached function
is checked for real.
"""

import pytest

pytestmark = pytest.mark.engines

LOAD = "import vllm.plugins as p\np.load_general_plugins()\n"
NO_SM12X = "--capability 12.0 --lib deep_gemm=no-sm12x --lib flashinfer=sm120"


# The platform patch, exercised on vLLM's own Platform class in a plan decided for a simulated SM120.
ON_VLLM_PLATFORM = (
    "import logging\n"
    "from ds_plugins import patching\n"
    "from ds_plugins.vllm.dsv4 import deepgemm_gate as g\n"
    "from ds_plugins.policy import decide\n"
    "from ds_plugins.simulate import from_env_value\n"
    "from ds_plugins.probe import installed_engines\n"
    "from vllm.platforms.interface import Platform\n"
)


def outcomes(state):
    return {o["patch"]: o["state"] for o in state["outcomes"]}


def test_off_replaces_the_cached_gate_and_clears_answers_cached_before(vllm_env):
    res = vllm_env.run(
        "import vllm.utils.deep_gemm as d\n"
        "original = d.is_deep_gemm_supported\n"
        "original()\n"
        "assert original.cache_info().currsize == 1\n"
        + LOAD
        + "assert original.cache_info().currsize == 0, 'an answer from before the patch survived'\n"
        "from vllm.utils.deep_gemm import is_deep_gemm_supported\n"
        "assert is_deep_gemm_supported is not original and is_deep_gemm_supported() is False\n"
        "assert d.is_deep_gemm_supported is is_deep_gemm_supported\n"
        "print('GATE-OFF-OK')\n",
        env={"DS_PLUGINS_SIMULATE": NO_SM12X},
    ).ok()
    assert "GATE-OFF-OK" in res.proc.stdout
    assert res.state["decisions"]["deepgemm"] == "off"
    done = outcomes(res.state)
    assert done["vllm.deepgemm_off.utils"] == "applied"
    # vllm.platforms.cuda is not importable without libcuda: the patch waits for vLLM to import it
    assert done["vllm.deepgemm_off.platform"] == "armed"
    assert done["vllm.deepgemm_on.platform"] == "not-selected"


def test_modules_imported_after_the_plugin_bind_the_patched_gate(vllm_env):
    res = vllm_env.run(
        LOAD + "import sys\nassert 'vllm.utils.deep_gemm' not in sys.modules\n"
        "from vllm.utils.deep_gemm import is_deep_gemm_supported\n"
        "assert is_deep_gemm_supported() is False and 'ds-plugins' in is_deep_gemm_supported.__doc__\n"
        "print('LATE-IMPORT-OK')\n",
        env={"DS_PLUGINS_SIMULATE": NO_SM12X},
    ).ok()
    assert "LATE-IMPORT-OK" in res.proc.stdout
    assert outcomes(res.state)["vllm.deepgemm_off.utils"] == "applied"


@pytest.mark.parametrize(
    "machine",
    ["--capability 9.0 --lib deep_gemm=yes", "--capability 12.0 --lib deep_gemm=sm12x --lib flashinfer=sm120"],
)
def test_gate_left_as_shipped_where_vllm_is_right(vllm_env, machine):
    res = vllm_env.run(
        "import vllm.utils.deep_gemm as d\noriginal = d.is_deep_gemm_supported\n"
        + LOAD
        + "from vllm.utils.deep_gemm import is_deep_gemm_supported\n"
        "assert is_deep_gemm_supported is original\nprint('UNTOUCHED-OK')\n",
        env={"DS_PLUGINS_SIMULATE": machine},
    ).ok()
    assert "UNTOUCHED-OK" in res.proc.stdout
    assert res.state["decisions"]["deepgemm"] == "upstream"
    assert all(
        state == "not-selected" for patch, state in outcomes(res.state).items() if patch.startswith("vllm.deepgemm_")
    )


@pytest.mark.parametrize("patch_name, forced", [("PLATFORM_OFF", False), ("PLATFORM_ON", True)])
def test_platform_patch_on_vllms_own_support_deep_gemm_classmethod(vllm_env, patch_name, forced):
    """check/install/undo of the platform patch, on vLLM's Platform class (CudaPlatformBase's base)."""
    res = vllm_env.run(
        ON_VLLM_PLATFORM + "import vllm.utils.deep_gemm as d\n"
        "shipped = Platform.support_deep_gemm()\n"
        f"patch = g.{patch_name}._replace(module='vllm.platforms.interface', attribute='Platform.support_deep_gemm')\n"
        f"value = {'on' if forced else 'off'!r}\n"
        "plan = decide(from_env_value('--capability 12.0 --lib deep_gemm=no-sm12x', installed_engines()), 'vllm',\n"
        "              {'DS_PLUGINS_DEEPGEMM': value})\n"
        "assert plan.value('deepgemm') == value, plan\n"
        "d.is_deep_gemm_supported()\n"
        "[done] = patching.apply([patch], plan, logging.getLogger('t'))\n"
        "assert done.state == 'applied', done\n"
        f"assert Platform.support_deep_gemm() is {forced}\n"
        "assert isinstance(vars(Platform)['support_deep_gemm'], classmethod)\n"
        "assert d.is_deep_gemm_supported.cache_info().currsize == 0\n"
        "again = patching.apply([patch], plan, logging.getLogger('t'))\n"
        "assert again[0].state == 'applied'\n"
        "patching.revert([done])\n"
        "assert Platform.support_deep_gemm() is shipped\n"
        "print('PLATFORM-PATCH-OK')\n",
        state=False,
    ).ok()
    assert "PLATFORM-PATCH-OK" in res.proc.stdout


def test_platform_patch_skips_a_gate_that_moved(vllm_env):
    """A support_deep_gemm that is no longer a classmethod: one warning, vLLM's attribute untouched."""
    res = vllm_env.run(
        ON_VLLM_PLATFORM
        + "patch = g.PLATFORM_OFF._replace(module='vllm.platforms.interface', attribute='Platform.is_cuda')\n"
        "before = vars(Platform)['is_cuda']\n"
        "plan = decide(from_env_value('--capability 12.0 --lib deep_gemm=no-sm12x', installed_engines()), 'vllm')\n"
        "[done] = patching.apply([patch], plan, logging.getLogger('t'))\n"
        "assert done.state == 'skipped' and 'classmethod' in done.detail, done\n"
        "assert vars(Platform)['is_cuda'] is before\n"
        "print('SKIP-OK')\n",
        state=False,
    ).ok()
    assert "SKIP-OK" in res.proc.stdout
    assert len(res.lines("skipping patch vllm.deepgemm_off.platform")) == 1
