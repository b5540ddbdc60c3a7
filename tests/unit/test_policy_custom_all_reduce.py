"""custom_all_reduce: off exactly on vLLM, SM120/SM121, more than one visible GPU, and NVML saying no NVLink.

Through the real policy (ds_plugins.policy.decide), the simulated machine's flags (ds_plugins.simulate), doctor,
explain and the start-up line; stock libraries of each vLLM wheel (ds_plugins.stock), so the plans are the ones
a plain `pip install vllm==X` gets.
"""

import argparse
import shlex

import pytest

from ds_plugins import doctor, effects, explain, known_failures, registration, stock
from ds_plugins import simulate
from ds_plugins.policy import DECISION_IDS, OVERRIDE_VAR, decide
from ds_plugins.probe import LINKS, Device, Probe
from ds_plugins.settings import ConfigError

CAPS = {"SM120": (12, 0), "SM121": (12, 1), "SM90": (9, 0), "SM100": (10, 0)}
PATCH_ID = "vllm.custom_all_reduce.off"


def machine(gpus=2, device="SM120", links="pcie", engine="vllm", version="0.30.0") -> Probe:
    devices = tuple(Device("cuda", i, "gpu", CAPS[device]) for i in range(gpus))
    return Probe(
        "3.11",
        {engine: version},
        None,
        None,
        devices,
        "",
        stock.libraries(engine, version),
        simulated=True,
        gpu_links=links,
        gpu_links_note=f"test: {links}",
    )


def decision(probe=None, engine="vllm", **env):
    plan = decide(probe or machine(), engine, env=env)
    assert plan.status == "supported", plan.status_reason
    return plan.decision("custom_all_reduce")


def test_it_is_a_decision_with_a_switch_and_an_effect():
    assert "custom_all_reduce" in DECISION_IDS and OVERRIDE_VAR["custom_all_reduce"] == "DS_PLUGINS_CUSTOM_ALL_REDUCE"
    assert effects.effect("custom_all_reduce", "off").kind == effects.CHANGES
    assert effects.effect("custom_all_reduce", "upstream").kind == effects.NONE


@pytest.mark.parametrize("version", ["0.20.0", "0.24.0", "0.28.0", "0.30.0", "0.33.0"])
@pytest.mark.parametrize("device", ["SM120", "SM121"])
@pytest.mark.parametrize("gpus", [2, 4])
def test_sm12x_pcie_only_gpus_on_vllm_turn_it_off(version, device, gpus):
    d = decision(machine(gpus, device, "pcie", version=version))
    assert d.value == "off" and d.source == "policy" and d.active
    assert "vllm-project/vllm#47266" in d.reason and f"{gpus} x {device}" in d.reason and "test: pcie" in d.reason


@pytest.mark.parametrize(
    "links, said", [("nvlink", "NVLink-connected"), ("mixed", "others not"), ("unknown", "not known here")]
)
def test_nvlink_mixed_or_an_unknown_topology_keep_upstream(links, said):
    d = decision(machine(2, "SM120", links))
    assert d.value == "upstream" and said in d.reason and not d.active


@pytest.mark.parametrize("device", ["SM90", "SM100"])
def test_other_gpus_keep_upstream_even_without_nvlink(device):
    d = decision(machine(2, device, "pcie"))
    assert d.value == "upstream" and device in d.reason


def test_one_gpu_keeps_upstream():
    d = decision(machine(1, "SM120", "single"))
    assert d.value == "upstream" and "one visible GPU" in d.reason
    # a one-GPU probe whose topology field says pcie (cannot happen from NVML) still is not a pair
    assert decision(machine(1, "SM120", "pcie")).value == "upstream"


def test_sglang_is_left_alone_even_when_forced():
    d = decision(machine(2, "SM120", "pcie", engine="sglang", version="0.5.23"), engine="sglang")
    assert d.value == "upstream" and "SGLang" in d.reason
    d = decision(
        machine(2, "SM120", "pcie", engine="sglang", version="0.5.23"),
        engine="sglang",
        DS_PLUGINS_CUSTOM_ALL_REDUCE="off",
    )
    assert d.value == "upstream"


def test_the_switch():
    forced = decision(machine(2, "SM120", "nvlink"), DS_PLUGINS_CUSTOM_ALL_REDUCE="off")
    assert forced.value == "off" and forced.source == "DS_PLUGINS_CUSTOM_ALL_REDUCE"
    assert "the rules said upstream" in forced.reason
    assert decision(machine(2, "SM90", "nvlink"), DS_PLUGINS_CUSTOM_ALL_REDUCE="off").value == "off"
    kept = decision(machine(2, "SM120", "pcie"), DS_PLUGINS_CUSTOM_ALL_REDUCE="upstream")
    assert kept.value == "upstream" and kept.source == "DS_PLUGINS_CUSTOM_ALL_REDUCE"
    assert decision(machine(2, "SM120", "pcie"), DS_PLUGINS_CUSTOM_ALL_REDUCE="auto").value == "off"
    same = decision(machine(2, "SM120", "pcie"), DS_PLUGINS_CUSTOM_ALL_REDUCE="off")
    assert same.value == "off" and "also what DS_PLUGINS_CUSTOM_ALL_REDUCE=off asks" in same.reason
    with pytest.raises(ConfigError, match="DS_PLUGINS_CUSTOM_ALL_REDUCE='nccl'.*auto, off, upstream"):
        decide(machine(), "vllm", env={"DS_PLUGINS_CUSTOM_ALL_REDUCE": "nccl"})


def test_an_engine_before_deepseek_v4_is_unsupported():
    plan = decide(machine(2, "SM120", "pcie", version="0.19.1"), "vllm", env={})
    assert plan.status == "unsupported" and plan.value("custom_all_reduce") == "unsupported"


def test_the_patch_carries_it_on_every_v4_vllm_and_the_startup_line_says_so():
    for version in ("0.20.0", "0.30.0", "0.33.0"):
        plan = decide(machine(version=version), "vllm", env={})
        acc = effects.account(plan, doctor.declared_patches("vllm"), doctor.adapter_carriers("vllm"))
        assert "custom_all_reduce=off" in acc.changes and acc.carriers["custom_all_reduce=off"] == (PATCH_ID,)
    plan = decide(machine(), "vllm", env={})
    declared = doctor.declared_patches("vllm")
    from ds_plugins import patching

    armed = [patching.Outcome(p.id, "armed") for p in declared if p.selected_by(plan) and p.covers("0.30.0")]
    assert [o.patch_id for o in armed] == [PATCH_ID]
    line = registration.summary(plan, declared, armed, doctor.adapter_carriers("vllm"))
    assert "changes custom_all_reduce=off" in line and "patches: 1 armed" in line


def _sim(flags):
    parser = argparse.ArgumentParser(exit_on_error=False)
    simulate.add_arguments(parser)
    return simulate.build(parser.parse_args(shlex.split(flags)))


def test_simulate_takes_the_topology():
    two = "--engine vllm==0.30.0 --capability 12.0 --capability 12.0"
    assert _sim(f"{two} --gpu-link pcie").gpu_links == "pcie"
    assert decide(_sim(f"{two} --gpu-link PCIE"), "vllm", env={}).value("custom_all_reduce") == "off"
    assert decide(_sim(f"{two} --gpu-link nvlink"), "vllm", env={}).value("custom_all_reduce") == "upstream"
    unknown = _sim(two)
    assert unknown.gpu_links == "unknown" and "--gpu-link not given" in unknown.gpu_links_note
    assert decide(unknown, "vllm", env={}).value("custom_all_reduce") == "upstream"
    assert _sim("--engine vllm==0.30.0 --capability 12.0").gpu_links == "single"
    assert set(simulate.GPU_LINKS) < set(LINKS)
    with pytest.raises(simulate.SimulateError, match="--gpu-link 'pcie': it needs two or more --capability GPUs"):
        _sim("--engine vllm==0.30.0 --capability 12.0 --gpu-link pcie")
    with pytest.raises(simulate.SimulateError, match="--gpu-link 'fast': expected one of nvlink, pcie, mixed, unknown"):
        _sim(f"{two} --gpu-link fast")
    with pytest.raises(ConfigError, match="DS_PLUGINS_SIMULATE: --gpu-link"):
        simulate.from_env_value("--capability 12.0 --gpu-link nvlink", {"vllm": "0.30.0"})


def test_doctor_lists_the_decision_and_the_patch():
    report = doctor.build(_sim("--engine vllm==0.30.0 --capability 12.0 --capability 12.0 --gpu-link pcie"), env={})
    entry = report["engines"]["vllm"]
    d = {x["id"]: x for x in entry["decisions"]}["custom_all_reduce"]
    assert d["value"] == "off" and d["effect"] == "changes"
    assert entry["changes"] == ["custom_all_reduce=off"] and entry["carriers"]["custom_all_reduce=off"] == [PATCH_ID]
    text = doctor.render(report)
    assert "  custom_all_reduce   off" in text and "gpu links    pcie (from --gpu-link pcie)" in text
    assert f"{PATCH_ID}  vllm.config.parallel.ParallelConfig.__post_init__  [>=0.20]  applies" in text
    assert "changes custom_all_reduce=off" in report["verdict"]


def test_explain_says_where_the_known_failure_is_handled():
    record = known_failures.BY_ID["custom_all_reduce_p2p"]
    assert record.handled_by == ("custom_all_reduce", ("off",))
    [pcie] = explain.assess(
        record, _sim("--engine vllm==0.28.0 --capability 12.0 --capability 12.0 --gpu-link pcie"), env={}
    )
    assert pcie.state == explain.HANDLED and "custom_all_reduce=off" in pcie.reason
    [nvlink] = explain.assess(
        record, _sim("--engine vllm==0.28.0 --capability 12.0 --capability 12.0 --gpu-link nvlink"), env={}
    )
    assert nvlink.state == explain.NOT_HANDLED and "custom_all_reduce=upstream" in nvlink.reason
    [opted_out] = explain.assess(
        record,
        _sim("--engine vllm==0.28.0 --capability 12.0 --capability 12.0 --gpu-link pcie"),
        env={"DS_PLUGINS_CUSTOM_ALL_REDUCE": "upstream"},
    )
    assert opted_out.state == explain.NOT_HANDLED
    [sglang] = explain.assess(
        record, _sim("--engine sglang==0.5.23 --capability 12.0 --capability 12.0 --gpu-link pcie"), env={}
    )
    assert sglang.state == explain.NOT_HANDLED and "custom_all_reduce=upstream" in sglang.reason
