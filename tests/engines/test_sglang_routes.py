"""SGLang kernel routes in a real SGLang process (0.5.23 here: its own SM120 path, so ds-plugins routes only
when DS_PLUGINS_SPARSE_MLA=triton forces it). DS_PLUGINS_SIMULATE gives the policy an SM120 GPU; SGLang's
module `sglang.kernels.ops.attention.flash_mla_sm120` is real and imported by the test code, as SGLang's
attention backend imports it, after registration (the route waits for it) or before (applied at once)."""

import pytest

from ds_plugins_sglang import sglang_path

pytestmark = pytest.mark.engines

SM120 = {"DS_PLUGINS_SIMULATE": "--capability 12.0 --lib deep_gemm=no-sm12x"}
FORCED = {**SM120, "DS_PLUGINS_SPARSE_MLA": "triton"}
MODULE = "sglang.kernels.ops.attention.flash_mla_sm120"
SHOW = "f = m.flash_mla_with_kvcache_sm120\nprint('ROUTE', getattr(f, '__ds_plugins_route__', None), f.__module__)\n"


def outcomes(res) -> dict:
    return {o["patch"]: o for o in res.state["outcomes"]}


@pytest.mark.parametrize("order", ["register-then-import", "import-then-register"])
def test_forced_triton_replaces_sglangs_sm120_function(sglang_plugins_env, order):
    register = "import sglang.srt.plugins as p\np.load_plugins()\n"
    load = f"import {MODULE} as m\n"
    res = sglang_plugins_env.run(
        (register + load if order == "register-then-import" else load + register) + SHOW, env=FORCED
    ).ok()
    assert "ROUTE sglang.route.decode_sm120 ds_plugins.sglang.routes" in res.proc.stdout
    states = {k: v["state"] for k, v in outcomes(res).items()}
    assert states["sglang.route.decode_sm120"] == "applied"
    assert states["sglang.route.decode_sm120_legacy"] == "other-version"
    assert states["sglang.route.decode"] == "other-version"  # 0.5.12's FlashMLA route
    assert res.state["decisions"]["sparse_mla"] == "triton"


def test_by_default_sglangs_own_sm120_path_stays(sglang_plugins_env):
    res = sglang_plugins_env.run(
        f"import sglang.srt.plugins as p\np.load_plugins()\nimport {MODULE} as m\n" + SHOW, env=SM120
    ).ok()
    assert f"ROUTE None {MODULE}" in res.proc.stdout
    assert res.state["decisions"]["sparse_mla"] == "upstream"
    assert outcomes(res)["sglang.route.decode_sm120"]["state"] == "not-selected"


def test_a_moved_sm120_seam_is_skipped_with_one_warning(sglang_plugins_env):
    """SGLang's function replaced by one with another call shape (as a future release might): the route
    is skipped with one warning, SGLang keeps that function, and registration goes on."""
    res = sglang_plugins_env.run(
        f"import {MODULE} as m\n"
        "def flash_mla_with_kvcache_sm120(q, k_cache, block_table, cache_seqlens):\n"
        "    return 'theirs'\n"
        "m.flash_mla_with_kvcache_sm120 = flash_mla_with_kvcache_sm120\n"
        "import sglang.srt.plugins as p\np.load_plugins()\n"
        "print('CALL', m.flash_mla_with_kvcache_sm120(1, 2, 3, 4))\n",
        env=FORCED,
    ).ok()
    [warning] = res.lines("skipping patch sglang.route.decode_sm120")
    assert "block_table, cache_seqlens" in warning and "upstream behaviour kept" in warning
    assert "CALL theirs" in res.proc.stdout
    assert outcomes(res)["sglang.route.decode_sm120"]["state"] == "skipped"
    assert res.state["state"] == "registered"


def test_the_hook_applies_the_same_route_once_with_the_entry_point(sglang_plugins_env):
    res = sglang_plugins_env.run(
        f"import sglang\nimport sglang.srt.plugins as p\np.load_plugins()\nimport {MODULE} as m\n" + SHOW,
        env=FORCED,
        pythonpath=(sglang_path(),),
    ).ok()
    assert "ROUTE sglang.route.decode_sm120 ds_plugins.sglang.routes" in res.proc.stdout
    assert res.state["via"] == "pythonpath-hook" and res.state["calls"] == 2
    assert outcomes(res)["sglang.route.decode_sm120"]["state"] == "applied"
