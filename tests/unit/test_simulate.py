"""The simulated machine (`doctor --simulate`, DS_PLUGINS_SIMULATE): stock wheels, --lib overrides, errors.

Everything goes through the real flag parser (simulate.add_arguments), simulate.build / from_env_value
and the real policy; stock.py's data itself is checked against the wheels in
tests/contract/test_stock_wheels.py.
"""

import argparse
import shlex

import pytest

from ds_plugins import doctor, simulate, stock
from ds_plugins.policy import decide
from ds_plugins.settings import ConfigError


def probe_for(flags: str):
    parser = argparse.ArgumentParser(exit_on_error=False)
    simulate.add_arguments(parser)
    return simulate.build(parser.parse_args(shlex.split(flags)))


def plan_for(flags: str, engine: str):
    return decide(probe_for(flags), engine, env={})


# --- a stock install, no --lib ----------------------------------------------------


def test_stock_vllm_0_24_on_sm120_turns_its_vendored_deepgemm_off():
    probe = probe_for("--engine vllm==0.24.0 --capability 12.0")
    vendored = probe.library("vllm.third_party.deep_gemm")
    assert vendored.present and vendored.version == "0.24.0" and not vendored.has("sm12x")
    # 0.6.12 names V4's decode but takes none of the SM120 arguments vLLM 0.24 passes (probe.py)
    assert probe.library("flashinfer").version == "0.6.12" and not probe.library("flashinfer").has("sm120_sparse_mla")
    assert not probe.library("deep_gemm").present
    deepgemm = decide(probe, "vllm", env={}).decision("deepgemm")
    assert deepgemm.value == "off"
    assert "vllm.third_party.deep_gemm 0.24.0 has no SM12x kernels" in deepgemm.reason


def test_stock_vllm_0_27_revendored_deepgemm_without_sm120_is_off_again():
    assert plan_for("--engine vllm==0.27.0 --capability 12.0", "vllm").value("deepgemm") == "off"
    assert plan_for("--engine vllm==0.27.0 --capability 12.1", "vllm").value("deepgemm") == "off"


def test_stock_vllm_0_30_has_sm12x_deepgemm_and_flashinfer_so_upstream_serves_everything():
    plan = plan_for("--engine vllm==0.30.0 --capability 12.0", "vllm")
    assert plan.value("deepgemm") == "upstream"
    assert "vllm.third_party.deep_gemm 0.30.0 has SM12x kernels" in plan.decision("deepgemm").reason
    assert (plan.value("sparse_mla"), plan.value("indexer")) == ("upstream", "upstream")


def test_stock_sglang_brings_its_pinned_deepgemm_and_flashinfer():
    probe = probe_for("--engine sglang==0.5.12 --capability 12.0")
    assert probe.library("deep_gemm").version == "0.1.0" and not probe.library("deep_gemm").has("sm12x")
    assert probe.library("flashinfer").version == "0.6.11.post1"
    assert decide(probe, "sglang", env={}).status == "unsupported"  # 0.5.12 on SM12x: the path manifest
    deepgemm = plan_for("--engine sglang==0.5.13 --capability 12.1", "sglang").decision("deepgemm")
    assert deepgemm.value == "off" and "deep_gemm 0.1.2 has no SM12x kernels" in deepgemm.reason
    # 0.5.19 pins an sgl-deep-gemm with SM12x kernels; its gate does not guard SM121 yet
    plan = plan_for("--engine sglang==0.5.19 --capability 12.1", "sglang")
    assert (
        plan.value("deepgemm") == "upstream" and "deep_gemm 0.1.7 has SM12x kernels" in plan.decision("deepgemm").reason
    )


def test_library_notes_say_they_come_from_the_stock_wheel():
    libs = probe_for("--engine vllm==0.24.0 --capability 12.0").libraries
    assert libs["vllm.third_party.deep_gemm"].note == "stock vllm 0.24.0 wheel: vendored, no SM12x kernels"
    assert libs["flashinfer"].note.startswith("stock vllm 0.24.0 wheel: pinned, no SM120 sparse-MLA decode")
    text = doctor.render(doctor.build(probe_for("--engine vllm==0.24.0 --capability 12.0"), env={}))
    assert "vllm.third_party.deep_gemm 0.24.0 (stock vllm 0.24.0 wheel: vendored, no SM12x kernels)" in text


def test_a_version_between_or_beyond_the_checked_ones_is_labelled_assumed():
    between = probe_for("--engine vllm==0.26.0").library("flashinfer")
    assert between.version is None and "not checked; assumed like 0.25.0's" in between.note
    assert "0.25.0 pins 0.6.13" in between.note
    newer = probe_for("--engine vllm==0.99.0").library("vllm.third_party.deep_gemm")
    assert newer.version == "0.99.0" and "newer than the newest checked; assumed like 0.33.0's" in newer.note
    assert probe_for("--engine vllm==0.18.0").libraries == {}  # before anything checked: nothing assumed


def test_without_engine_the_machine_is_empty():
    probe = probe_for("--capability 12.0")
    assert probe.engines == {} and probe.libraries == {} and probe.simulated


def test_a_later_engine_replaces_an_earlier_ones_library_as_a_later_pip_install_would():
    probe = probe_for("--engine vllm==0.30.0 --engine sglang==0.5.12 --capability 12.0")
    assert probe.library("flashinfer").version == "0.6.11.post1"  # sglang's pin, installed last
    assert probe.library("vllm.third_party.deep_gemm").has("sm12x")
    # vLLM prefers a site-packages DeepGEMM over its vendored one: sglang's sgl-deep-gemm 0.1.0 here
    assert (
        plan_for("--engine vllm==0.30.0 --engine sglang==0.5.12 --capability 12.0", "vllm").value("deepgemm") == "off"
    )


# --- --lib overrides ----------------------------------------------------------------


def test_lib_no_removes_a_stock_library():
    probe = probe_for("--engine vllm==0.24.0 --capability 12.0 --lib vllm.third_party.deep_gemm=no")
    lib = probe.library("vllm.third_party.deep_gemm")
    assert not lib.present and "removed by --lib" in lib.note and "vllm.third_party.deep_gemm 0.24.0" in lib.note
    assert decide(probe, "vllm", env={}).decision("deepgemm").reason.startswith("no DeepGEMM installed")


def test_lib_replaces_a_stock_library_and_says_so():
    probe = probe_for("--engine vllm==0.24.0 --capability 12.0 --lib flashinfer=no-sm120_sparse_mla")
    fi = probe.library("flashinfer")
    assert fi.present and fi.features == () and fi.version is None
    assert fi.note == (
        "from --lib flashinfer=no-sm120_sparse_mla: no sm120_sparse_mla; replaces the stock wheel's flashinfer 0.6.12"
    )
    assert decide(probe, "vllm", env={}).value("sparse_mla") == "triton"
    fixed = plan_for("--engine vllm==0.24.0 --capability 12.0 --lib vllm.third_party.deep_gemm=sm12x", "vllm")
    assert fixed.value("deepgemm") == "upstream" and fixed.value("indexer") == "upstream"


def test_lib_adds_a_site_deepgemm_that_vllm_prefers():
    plan = plan_for("--engine vllm==0.27.0 --capability 12.0 --lib deep_gemm=sm12x,version=2.5.0", "vllm")
    assert (
        plan.value("deepgemm") == "upstream" and "deep_gemm 2.5.0 has SM12x kernels" in plan.decision("deepgemm").reason
    )


@pytest.mark.parametrize(
    "name,alias,feature",
    [
        ("deep_gemm", "sm120", "sm12x"),
        ("deep_gemm", "sm121", "sm12x"),
        ("deep_gemm", "SM12X", "sm12x"),
        ("vllm.third_party.deep_gemm", "sm121", "sm12x"),
        ("flashinfer", "sm120", "sm120_sparse_mla"),
    ],
)
def test_each_library_has_its_own_feature_aliases(name, alias, feature):
    assert probe_for(f"--lib {name}={alias}").library(name).features == (feature,)
    assert probe_for(f"--lib {name}=no-{alias}").library(name).features == ()


def test_torch_is_shown_only():
    with_torch = probe_for("--engine vllm==0.24.0 --capability 12.0 --torch 2.11.0")
    assert with_torch.torch == "2.11.0"
    assert decide(with_torch, "vllm", env={}) == plan_for("--engine vllm==0.24.0 --capability 12.0", "vllm")


def test_npu_count():
    assert [d.kind for d in probe_for("--npu 2").devices] == ["npu", "npu"]
    assert probe_for("--npu 0").devices == ()


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        ("--npu -1", "--npu '-1': expected a number of NPUs, 0 or more"),
        ("--npu two", "--npu 'two': expected a number of NPUs, 0 or more"),
        ("--torch banana", "--torch 'banana': 'banana' is not a version (e.g. 2.11.0)"),
        ("--capability 12", "--capability '12': expected MAJOR.MINOR, e.g. 12.0"),
        ("--capability twelve", "--capability 'twelve': expected MAJOR.MINOR, e.g. 12.0"),
        ("--capability -1.0", "--capability '-1.0': expected MAJOR.MINOR with MAJOR >= 1, e.g. 12.0"),
        ("--engine vllm=0.22.1", "--engine 'vllm=0.22.1': expected NAME==VERSION with NAME one of vllm, sglang"),
        ("--engine tgi==1.0", "--engine 'tgi==1.0': expected NAME==VERSION with NAME one of vllm, sglang"),
        ("--engine vllm==banana", "--engine 'vllm==banana': 'banana' is not a version (e.g. 0.24.0)"),
        (
            "--engine vllm==0.24.0 --engine vllm==0.30.0",
            "--engine 'vllm==0.30.0': vllm is already given (vllm==0.24.0)",
        ),
        ("--lib cutlass=yes", "--lib 'cutlass=yes': unknown library 'cutlass'; known: deep_gemm, "),
        (
            "--lib deep_gemm=sm90",
            "--lib 'deep_gemm=sm90': deep_gemm has no feature 'sm90' (features: sm12x; also spelled sm120 (sm12x), "
            "sm121 (sm12x))",
        ),
        ("--lib deep_gemm=sm120_sparse_mla", "deep_gemm has no feature 'sm120_sparse_mla' (features: sm12x;"),
        (
            "--lib flashinfer=sm12x",
            "--lib 'flashinfer=sm12x': flashinfer has no feature 'sm12x' (features: sm120_sparse_mla; "
            "also spelled sm120 (sm120_sparse_mla))",
        ),
        ("--lib flash_mla=sm120", "--lib 'flash_mla=sm120': flash_mla has no feature 'sm120' (features: none)"),
        ("--lib flashinfer=no-sm121", "flashinfer has no feature 'sm121'"),
        ("--lib deep_gemm=no,sm12x", "--lib 'deep_gemm=no,sm12x': 'no' removes deep_gemm; it cannot also have"),
        ("--lib deep_gemm=sm12x,no-sm120", "--lib 'deep_gemm=sm12x,no-sm120': sm12x both given and negated"),
        ("--lib deep_gemm=version=new", "--lib 'deep_gemm=version=new': 'new' is not a version"),
        ("--lib deep_gemm=", "--lib 'deep_gemm=': expected NAME=SPEC"),
        (
            "--lib deep_gemm=sm12x --lib deep_gemm=no",
            "--lib 'deep_gemm=no': deep_gemm is already given by another --lib",
        ),
    ],
)
def test_bad_flags_are_simulate_errors_naming_the_flag(flags, message):
    with pytest.raises(simulate.SimulateError) as exc:
        probe_for(flags)
    assert message in str(exc.value)
    assert isinstance(exc.value, ValueError) and not isinstance(exc.value, ConfigError)


# --- DS_PLUGINS_SIMULATE ----------------------------------------------------------------


def test_env_value_keeps_the_real_engine_and_adds_no_stock_library_without_engine():
    probe = simulate.from_env_value("--capability 12.0", {"vllm": "0.30.0"})
    assert probe.engines == {"vllm": "0.30.0"} and probe.libraries == {}
    probe = simulate.from_env_value("--engine vllm==0.24.0 --capability 12.0", {"vllm": "0.30.0"})
    assert probe.engines == {"vllm": "0.24.0"} and not probe.library("vllm.third_party.deep_gemm").has("sm12x")


@pytest.mark.parametrize(
    "value,names",
    [
        ("--capability twelve", "--capability 'twelve'"),
        ("--npu -1", "--npu '-1'"),
        ("--torch banana", "--torch 'banana'"),
        ("--lib deep_gemm=sm90", "--lib 'deep_gemm=sm90'"),
        ("--no-such-flag", "unrecognized arguments: --no-such-flag"),
        ("--npu", "argument --npu: expected one argument"),
        ("--eng vllm==0.30.0", "unrecognized arguments: --eng"),  # no abbreviations inside an engine process
        ("vllm==0.30.0", "unrecognized arguments: vllm==0.30.0"),
        ("--lib 'deep_gemm=sm12x", "No closing quotation"),
    ],
)
def test_every_bad_env_value_is_a_config_error_naming_the_variable_and_the_flag(value, names):
    with pytest.raises(ConfigError) as exc:
        simulate.from_env_value(value, {})
    assert str(exc.value).startswith("DS_PLUGINS_SIMULATE: ") and names in str(exc.value)


def test_feature_catalogue_is_the_stock_one():
    assert set(simulate.LIBRARY_FEATURES) == set(stock.FEATURES)
    assert set(simulate.FEATURE_ALIASES) <= set(stock.FEATURES)
    for name, aliases in simulate.FEATURE_ALIASES.items():
        assert set(aliases.values()) <= set(simulate.LIBRARY_FEATURES[name])
