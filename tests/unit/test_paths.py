"""The path manifest's model (ds_plugins.paths.model) and the policy's verdict from it, on real vLLM rows."""

from ds_plugins import paths
from ds_plugins.paths.model import Blockers, device_class, uncovered
from ds_plugins.probe import Device, Library, Probe
from ds_plugins.policy import decide
from ds_plugins import stock


def _row(stage, kernel_part, versions):
    return next(
        r
        for r in paths.rows("vllm")
        if r.stage == stage and kernel_part in r.kernel and r.versions == versions and "sm120" in r.devices
    )


def test_applies_by_range_and_device():
    fp8 = _row("profile", "CUTLASS", ">=0.27.0,<0.28.0")
    assert fp8.applies("0.27.0", "sm120") and fp8.applies("0.27.0rc1", "sm121")
    assert not fp8.applies("0.28.0", "sm120") and not fp8.applies("0.27.0", "sm90")


def test_covered_by_only_when_the_plan_has_the_covers_value():
    kv = _row("weight_load", "KV-cache", ">=0.22.0,<0.30.0")
    assert kv.covered_by({"kv_cache_dtype": "fp8"}) and not kv.covered_by({"kv_cache_dtype": "upstream"})
    assert not kv.covered_by({"sparse_mla": "triton"})
    fp8 = _row("profile", "CUTLASS", ">=0.27.0,<0.28.0")  # covered where ds-plugins answers V4's DeepGEMM calls
    assert fp8.covered_by({"indexer": "triton"}) and not fp8.covered_by({"indexer": "upstream", "deepgemm": "off"})


def test_uncovered_lists_blockers_and_the_upgrade():
    rows = paths.rows("vllm")
    found = uncovered(rows, "0.28.0", "sm120", {"kv_cache_dtype": "upstream"})
    assert [r.stage for r in found.rows] == ["weight_load"] and found.upgrade_to == "0.30.0"
    assert not uncovered(rows, "0.28.0", "sm120", {"kv_cache_dtype": "fp8"})
    assert not uncovered(rows, "0.28.0", "sm90", {})
    # 0.27's CUTLASS/o_proj blockers are fixed in 0.28, but 0.28's path still has a blocker (the KV dtype):
    # the target is the first release with none, not the newest fixed_in.
    assert uncovered(rows, "0.27.0", "sm120", {"kv_cache_dtype": "fp8"}).upgrade_to == "0.30.0"


def test_upgrade_target_is_the_first_named_release_without_a_blocker():
    from ds_plugins.paths.model import Row, upgrade_target

    rows = (
        Row("vllm", "decode", "a", "engine_c", ">=0.20.0,<0.24.0", ("sm120",), "blocker", "", fixed_in="0.24.0"),
        Row("vllm", "decode", "b", "engine_c", ">=0.25.0,<0.26.0", ("sm120",), "blocker", ""),
        Row("vllm", "decode", "c", "engine_c", ">=0.20.0", ("sm120",), "has_code", ""),
    )
    assert upgrade_target(rows, "0.21.0", "sm120") == "0.24.0"
    assert upgrade_target(rows, "0.25.0", "sm120") == "0.26.0"
    assert upgrade_target(rows, "0.21.0", "sm90") == "0.24.0"  # nothing applies on sm90 at 0.24 either
    last = rows + (Row("vllm", "decode", "d", "engine_c", ">=0.26.0", ("sm120",), "blocker", ""),)
    assert upgrade_target(last, "0.25.0", "sm120") is None


def test_device_class():
    assert [device_class(c) for c in [(12, 0), (12, 1), (9, 0), (10, 0), (8, 0), None]] == [
        "sm120",
        "sm121",
        "sm90",
        "sm100",
        None,
        None,
    ]
    assert paths.blockers("vllm", "0.27.0", (8, 0), {}) == Blockers((), None)


def _plan(version, capability, env=None):
    probe = Probe(
        "",
        {"vllm": version},
        None,
        None,
        (Device("cuda", 0, "gpu", capability),),
        "",
        stock.libraries("vllm", version),
        simulated=True,
    )
    return decide(probe, "vllm", env=env or {})


def test_a_blocker_row_makes_the_plan_unsupported_with_the_upgrade_sentence():
    assert _plan("0.27.0", (12, 0)).status == "supported"  # every blocker there has its cover in the plan
    plan = _plan("0.27.0", (12, 0), {"DS_PLUGINS_INDEXER": "upstream"})  # the FP8-linear cover's decision off
    assert plan.status == "unsupported"
    assert plan.status_reason.startswith("unsupported on SM120 with vLLM 0.27.0: FP8 block-scaled linear (CUTLASS")
    assert plan.status_reason.endswith("upgrade to vLLM >= 0.30.0")
    assert {d.value for d in plan.decisions} == {"unsupported"}


def test_the_kv_dtype_decision_covers_auto_on_sm12x_only_where_vllm_asserts():
    for version in ("0.25.0", "0.28.0"):
        plan = _plan(version, (12, 0))
        assert plan.status == "supported" and plan.value("kv_cache_dtype") == "fp8", plan.status_reason
    assert _plan("0.30.0", (12, 0)).value("kv_cache_dtype") == "upstream"  # 0.30 maps auto to fp8 itself
    assert _plan("0.28.0", (9, 0)).value("kv_cache_dtype") == "upstream"  # SM90 is left as shipped
    assert _plan("0.28.0", (9, 0)).status == "supported"


def test_forcing_the_cover_off_makes_a_supported_version_unsupported():
    probe = Probe(
        "",
        {"vllm": "0.28.0"},
        None,
        None,
        (Device("cuda", 0, "gpu", (12, 0)),),
        "",
        stock.libraries("vllm", "0.28.0"),
        simulated=True,
    )
    plan = decide(probe, "vllm", env={"DS_PLUGINS_KV_CACHE_DTYPE": "upstream"})
    assert plan.status == "unsupported" and "fp8_ds_mla KV-cache dtype" in plan.status_reason


def test_a_row_about_a_stock_library_is_lifted_by_the_library_installed_instead():
    rows = paths.rows("vllm")
    stock_only = uncovered(rows, "0.25.0", "sm120", {"kv_cache_dtype": "fp8"})
    assert any("FlashInfer SM120, pinned FlashInfer too old" in r.kernel for r in stock_only.rows)
    newer = uncovered(
        rows,
        "0.25.0",
        "sm120",
        {"kv_cache_dtype": "fp8"},
        lambda library, feature: (library, feature) == ("flashinfer", "sm120_sparse_mla"),
    )
    assert not newer
    # the policy asks the probe: a FlashInfer with the SM120 V4 decode leaves attention upstream, supported
    probe = Probe(
        "",
        {"vllm": "0.25.0"},
        None,
        None,
        (Device("cuda", 0, "gpu", (12, 0)),),
        "",
        {
            **stock.libraries("vllm", "0.25.0"),
            "flashinfer": Library("flashinfer", True, "0.6.18", "/site", ("sm120_sparse_mla",)),
        },
        simulated=True,
    )
    plan = decide(probe, "vllm", env={})
    assert plan.status == "supported" and plan.value("sparse_mla") == "upstream"
