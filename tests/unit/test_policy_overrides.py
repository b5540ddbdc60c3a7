"""DS_PLUGINS_* overrides: what each does, and that bad values are clear errors."""

import pytest

from ds_plugins import settings
from ds_plugins.policy import decide
from ds_plugins.probe import Library

from .test_policy_table import STOCK_LIBS, make_probe


def plan(engine="vllm", version="0.22.1", device="SM120", libs=STOCK_LIBS, **env):
    return decide(make_probe(engine, version, device, libs), engine, env=env)


def test_deepgemm_override_values():
    assert plan(DS_PLUGINS_DEEPGEMM="off").value("deepgemm") == "off"
    forced = plan(version="0.30.0", DS_PLUGINS_DEEPGEMM="on").decision("deepgemm")
    assert forced.value == "on" and forced.source == "DS_PLUGINS_DEEPGEMM"
    assert "forced by DS_PLUGINS_DEEPGEMM=on" in forced.reason and "the rules said off" in forced.reason
    assert plan(version="0.30.0", DS_PLUGINS_DEEPGEMM="upstream").value("deepgemm") == "upstream"
    assert plan(version="0.30.0", DS_PLUGINS_DEEPGEMM="auto").value("deepgemm") == "off"
    # agreeing override: value unchanged, the reason says both
    same = plan(version="0.30.0", DS_PLUGINS_DEEPGEMM="off").decision("deepgemm")
    assert same.value == "off" and "also what DS_PLUGINS_DEEPGEMM=off asks" in same.reason


def test_sparse_mla_and_indexer_overrides():
    p = plan(version="0.30.0", DS_PLUGINS_SPARSE_MLA="triton")
    assert p.value("sparse_mla") == "triton" and p.value("dsv4_model") == "ds_plugins"
    p = plan(version="0.30.0", DS_PLUGINS_SPARSE_MLA="upstream", DS_PLUGINS_INDEXER="upstream")
    assert p.value("sparse_mla") == p.value("indexer") == p.value("dsv4_model") == "upstream"
    assert p.value("cudagraph") == "upstream"
    # Where upstream has no SM12x kernel (0.22.1: FlashMLA, DeepGEMM), forcing it is not served half-way:
    # the plan is unsupported and says which kernel and what to upgrade to.
    p = plan(DS_PLUGINS_SPARSE_MLA="upstream", DS_PLUGINS_INDEXER="upstream")
    assert p.status == "unsupported" and {d.value for d in p.decisions} == {"unsupported"}
    assert p.status_reason.startswith("unsupported on SM120 with vLLM 0.22.1: FP8 block-scaled linear (CUTLASS")
    assert "(and 5 more)" in p.status_reason  # o_proj, FlashMLA prefill/decode, indexer logits/paged logits
    assert p.status_reason.endswith("upgrade to vLLM >= 0.30.0")
    # forcing our kernels is allowed on any CUDA GPU, but means nothing on a CPU
    assert plan(device="SM90", DS_PLUGINS_SPARSE_MLA="triton").value("sparse_mla") == "triton"
    assert plan(device="CPU", DS_PLUGINS_SPARSE_MLA="triton").value("sparse_mla") == "upstream"


def test_dsv4_model_upstream_switches_the_triton_path_off():
    p = plan(version="0.30.0", DS_PLUGINS_DSV4_MODEL="upstream")
    assert p.value("dsv4_model") == "upstream"
    assert p.value("indexer") == "upstream" and "model hook-up" in p.decision("indexer").reason
    assert p.value("cudagraph") == "upstream"
    # on 0.22.1 the Triton path is the only one that serves SM12x: without the hook-up it is unsupported
    assert plan(DS_PLUGINS_DSV4_MODEL="upstream").status == "unsupported"


def test_cudagraph_override_only_on_our_path():
    assert plan(DS_PLUGINS_CUDAGRAPH="off").value("cudagraph") == "off"
    assert plan(DS_PLUGINS_CUDAGRAPH="off").decision("cudagraph").active
    assert not plan().decision("cudagraph").active  # "on" leaves graphs as the engine has them
    assert plan(device="SM90", DS_PLUGINS_CUDAGRAPH="off").value("cudagraph") == "upstream"


def test_ascend_quant_rules_and_override():
    assert plan().value("ascend_quant") == "ds_plugins"
    with_ascend = {**STOCK_LIBS, "vllm_ascend": Library("vllm_ascend", True, "0.23.0")}
    assert plan(libs=with_ascend).value("ascend_quant") == "vllm-ascend"
    npu = {"torch_npu": Library("torch_npu", True, "2.14.0")}
    assert "torch_npu" in plan(device="Ascend", libs=npu).decision("ascend_quant").reason
    assert plan(DS_PLUGINS_ASCEND_QUANT="off").value("ascend_quant") == "off"
    assert plan(engine="sglang", version="0.5.23").value("ascend_quant") == "upstream"


def test_mooncake_rules_and_override():
    assert plan().value("mooncake_connector") == "unavailable"
    with_mc = {**STOCK_LIBS, "mooncake": Library("mooncake", True, "0.3.13.post1")}
    assert plan(libs=with_mc).value("mooncake_connector") == "ds_plugins"
    assert plan(libs=with_mc, DS_PLUGINS_MOONCAKE="off").value("mooncake_connector") == "off"


def test_unsupported_engine_ignores_overrides_but_still_validates_them():
    p = plan(version="0.19.1", DS_PLUGINS_SPARSE_MLA="triton")
    assert p.value("sparse_mla") == "unsupported"
    with pytest.raises(settings.ConfigError, match="DS_PLUGINS_SPARSE_MLA"):
        plan(version="0.19.1", DS_PLUGINS_SPARSE_MLA="nope")


@pytest.mark.parametrize(
    "var,bad",
    [
        ("DS_PLUGINS_DEEPGEMM", "maybe"),
        ("DS_PLUGINS_SPARSE_MLA", "flashmla"),
        ("DS_PLUGINS_INDEXER", "1"),
        ("DS_PLUGINS_CUDAGRAPH", "sometimes"),
        ("DS_PLUGINS_DSV4_MODEL", "ds_plugins"),
        ("DS_PLUGINS_ASCEND_QUANT", "on"),
        ("DS_PLUGINS_MOONCAKE", "yes"),
        ("DS_PLUGINS_DISABLE", "2"),
    ],
)
def test_bad_override_names_variable_and_allowed_values(var, bad):
    with pytest.raises(settings.ConfigError) as err:
        plan(**{var: bad})
    message = str(err.value)
    assert var in message and repr(bad) in message
    choices = settings.BY_NAME[var].choices
    assert all(c in message for c in choices)


def test_unknown_variable_is_an_error_naming_it():
    with pytest.raises(settings.ConfigError, match="DS_PLUGINS_SPARSEMLA") as err:
        plan(DS_PLUGINS_SPARSEMLA="triton")
    assert "DS_PLUGINS_SPARSE_MLA" in str(err.value)  # the list of known names helps spot the typo


def test_values_are_case_and_space_tolerant():
    assert plan(version="0.30.0", DS_PLUGINS_DEEPGEMM=" ON ").value("deepgemm") == "on"
    assert plan(DS_PLUGINS_SPARSE_MLA="").value("sparse_mla") == "triton"  # empty = default


def test_disable_flag_spellings():
    for on in ("1", "true", "YES", "on"):
        assert settings.disabled({"DS_PLUGINS_DISABLE": on})
    for off in ("0", "false", "no", "", "off"):
        assert not settings.disabled({"DS_PLUGINS_DISABLE": off})
    with pytest.raises(settings.ConfigError, match="DS_PLUGINS_DISABLE='please'"):
        settings.disabled({"DS_PLUGINS_DISABLE": "please"})  # the same error everywhere, never a guess
    assert not settings.disabled({})
