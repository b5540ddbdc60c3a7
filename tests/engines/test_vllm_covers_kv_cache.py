"""Blocker 4 (--kv-cache-dtype auto asserts for DeepSeek-V4 on vLLM <= 0.28; vllm#47174): the cover
`vllm.dsv4_model.kv_cache_fp8`, in real vLLM processes and in the source of every matrix wheel.

Live (every live vLLM of ci/versions.toml: 0.24, 0.27, 0.28, 0.30): the patch is applied by ds-plugins' patching in
a plan with kv_cache_dtype=fp8, then vLLM's own `VllmConfig.try_verify_and_update_config` (called unbound:
VllmConfig cannot be built without a GPU platform) dispatches on the architecture to V4's config hook, with vLLM's
own CacheConfig; the result goes through vLLM's own `_resolve_dsv4_kv_cache_dtype`, the function that asserts. Other
matrix versions: the seam and the assert, by AST (`..._ast`).
"""

import ast

import pytest
from packaging.version import Version

from ci import upstream
from ds_plugins.landscape import in_range
from ds_plugins.vllm.dsv4 import kv_cache

LIVE = """
import logging, types
import vllm
from vllm.config import CacheConfig
from vllm.config.vllm import VllmConfig
from ds_plugins import patching
from ds_plugins.policy import DECISION_IDS, Decision, Plan
from ds_plugins.vllm.dsv4 import kv_cache
import vllm.models.deepseek_v4.attention as attention

values = dict.fromkeys(DECISION_IDS, "upstream")
values["kv_cache_dtype"] = "fp8"
plan = Plan("vllm", vllm.__version__, "supported", "", "SM120",
            tuple(Decision(i, v, "test") for i, v in values.items()))
if kv_cache.PATCH.covers(vllm.__version__):
    try:  # vLLM as shipped: the default dtype meets the fp8_ds_mla assert
        attention._resolve_dsv4_kv_cache_dtype(True, CacheConfig().cache_dtype, CacheConfig())
        raise SystemExit("vLLM accepted auto without the patch")
    except AssertionError as exc:
        print("UPSTREAM-ASSERTS", exc)
patching.apply([kv_cache.PATCH], plan, logging.getLogger("vllm.ds_plugins"))
import vllm.model_executor.models.config
print("OUTCOME", patching.outcomes()[kv_cache.PATCH.id].state)
cache = CacheConfig()
assert cache.cache_dtype == "auto"
if kv_cache.PATCH.covers(vllm.__version__):
    model = types.SimpleNamespace(architecture="DeepseekV4ForCausalLM", config_updated=False, is_hybrid=False,
                                  convert_type="none", model_weights="")
    VllmConfig.try_verify_and_update_config(types.SimpleNamespace(model_config=model, cache_config=cache))
    print("AFTER-HOOK", cache.cache_dtype)
print("RESOLVED", attention._resolve_dsv4_kv_cache_dtype(True, cache.cache_dtype, cache)[0], cache.cache_dtype)
"""


@pytest.mark.engines
def test_kv_cache_auto_becomes_fp8_through_vllms_own_config_hook(vllm_env):
    res = vllm_env.run(LIVE, state=False).ok()
    out = res.proc.stdout
    if kv_cache.PATCH.covers(vllm_env.version):
        assert "UPSTREAM-ASSERTS DeepseekV4 fp8_ds_mla layout only supports fp8 kv-cache, got auto" in out
        assert "OUTCOME applied" in out
        assert "AFTER-HOOK fp8" in out
        assert len(res.lines("ds-plugins: --kv-cache-dtype auto -> fp8 for DeepSeek-V4")) == 1
    else:  # the retire condition: vLLM maps auto to fp8 itself, and the patch stays out of the way
        assert "OUTCOME other-version" in out
        assert not res.lines("ds-plugins: --kv-cache-dtype auto")
    assert "RESOLVED fp8_ds_mla fp8_ds_mla" in out


def _fp8_assert_sites(version: str) -> list[str]:
    """Where V4's attention asserts the KV-cache dtype starts with fp8 (`assert <x>.startswith("fp8")`)."""
    root = upstream.source("vllm", version) / "vllm"
    files = [root / "model_executor/layers/deepseek_v4_attention.py", root / "models/deepseek_v4/attention.py"]
    found = []
    for path in files:
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Assert)
                and isinstance(node.test, ast.Call)
                and getattr(node.test.func, "attr", None) == "startswith"
                and [getattr(a, "value", None) for a in node.test.args] == ["fp8"]
            ):
                found.append(f"{path.name}:{node.lineno}")
    return found


V4_VLLM = [v for e, v in upstream.matrix() if e == "vllm" and Version(v) >= Version("0.20")]


@pytest.mark.contract
@pytest.mark.parametrize("version", V4_VLLM)
def test_kv_cache_fp8_seam_and_the_assert_it_answers_ast(version):
    # the seam (V4's config hook, the architecture map, VllmConfig calling it): ci/vllm_seams.py's contract
    from ci import vllm_seams

    assert vllm_seams.check_patch(upstream.source("vllm", version), kv_cache.PATCH) is None
    asserts = _fp8_assert_sites(version)
    if in_range(kv_cache.PATCH.versions, version, what="test"):
        assert asserts, f"vLLM {version}: no fp8 KV-cache assert left: the patch's range is too wide"
    else:
        assert not asserts, f"vLLM {version} still asserts fp8 ({asserts}): the patch's range is too narrow"
        attention = (upstream.source("vllm", version) / "vllm/models/deepseek_v4/attention.py").read_text()
        assert 'if kv_cache_dtype == "auto":\n            kv_cache_dtype = "fp8"' in attention
