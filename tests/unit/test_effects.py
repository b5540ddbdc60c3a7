"""The one decision table (ds_plugins.effects): the start-up line, doctor's verdict and its "not in this
build yet" list all say what it says, on every row of the policy table and for the cases a user meets."""

import logging

import pytest

from ds_plugins import doctor, effects, registration
from ds_plugins.policy import DECISION_IDS, decide
from ds_plugins.probe import Device, Library, Probe
from tests.unit.test_policy_table import CASES, make_probe


def _account(plan):
    return effects.account(plan, doctor.declared_patches(plan.engine), doctor.adapter_carriers(plan.engine))


def _startup_line(plan):
    return registration.summary(plan, doctor.declared_patches(plan.engine), [], doctor.adapter_carriers(plan.engine))


def test_table_has_every_decision_and_only_known_kinds():
    assert tuple(effects.TABLE) == DECISION_IDS
    for values in effects.TABLE.values():
        assert "upstream" in values and values["upstream"].kind == effects.NONE
        assert all(e.kind in (effects.NONE, effects.CHANGES, effects.OFFERS) and e.meaning for e in values.values())


@pytest.mark.parametrize("engine,version,device,expected", CASES, ids=[f"{e}-{v}-{d}" for e, v, d, _ in CASES])
def test_reports_agree_with_the_table_on_every_policy_row(engine, version, device, expected):
    probe = make_probe(engine, version, device)
    plan = decide(probe, engine, env={})
    report = doctor.build(probe, env={})["engines"][engine]
    for d in plan.decisions:  # every value the policy produces is in the table (KeyError otherwise)
        assert effects.effect(d.id, d.value).kind == report["decisions"][DECISION_IDS.index(d.id)]["effect"]
    if plan.status != "supported":
        assert not plan.acting and report["not_in_this_build"] == []
        return
    acc = _account(plan)
    acting = [f"{d.id}={d.value}" for d in plan.decisions if d.active]
    assert sorted(acc.changes + acc.offers + acc.missing) == sorted(acting)
    assert (report["changes"], report["offers"], report["not_in_this_build"]) == (
        list(acc.changes),
        list(acc.offers),
        list(acc.missing),
    )
    line = _startup_line(plan)
    verdict = doctor.build(probe, env={})["verdict"]
    clause = effects.sentence("vLLM" if engine == "vllm" else "SGLang", acc)
    assert clause in line and clause in verdict
    for key in acc.changes:
        assert key in line and key in verdict and report["carriers"][key]
    if not acc.changes and not acc.missing:
        assert "nothing to do here" in verdict and "nothing to do here" in line
    # the default build carries every value the policy picks on its own
    assert acc.missing == ()


def _sim(engine, version, devices, libs=(), env=None):
    probe = Probe(
        "3.11", {engine: version}, None, None, tuple(devices), "", {lib.name: lib for lib in libs}, simulated=True
    )
    return probe, decide(probe, engine, env=env or {})


NPU2 = [Device("npu", 0, "Ascend NPU"), Device("npu", 1, "Ascend NPU")]


def test_vllm_ascend_host_is_not_reported_as_missing():
    probe, plan = _sim("vllm", "0.30.0", NPU2, [Library("vllm_ascend", True, "0.30.0")])
    assert plan.value("ascend_quant") == "vllm-ascend"
    acc = _account(plan)
    assert acc.missing == () and acc.nothing_to_do
    line = _startup_line(plan)
    assert "not in this build" not in line and "does not implement" not in line and "nothing to do here" in line
    assert "does not implement" not in doctor.build(probe, env={})["verdict"]


def test_switched_off_features_are_not_reported_as_missing():
    env = {"DS_PLUGINS_ASCEND_QUANT": "off", "DS_PLUGINS_MOONCAKE": "off"}
    probe, plan = _sim("vllm", "0.30.0", [Device("cuda", 0, "H100", (9, 0))], [Library("mooncake", True)], env)
    assert (plan.value("ascend_quant"), plan.value("mooncake_connector")) == ("off", "off")
    report = doctor.build(probe, env=env)
    assert report["engines"]["vllm"]["not_in_this_build"] == []
    assert report["verdict"] == "supported: nothing to do here on vLLM: upstream handles every feature"


def test_sm90_verdict_says_nothing_changes_and_names_the_opt_in():
    probe, plan = _sim("vllm", "0.30.0", [Device("cuda", 0, "H100", (9, 0))])
    verdict = doctor.build(probe, env={})["verdict"]
    assert "changes" not in verdict and "nothing to do here on vLLM" in verdict
    assert "offers ascend_quant=ds_plugins (opt-in)" in verdict


def test_forced_value_without_a_carrier_is_reported_missing_everywhere():
    env = {"DS_PLUGINS_INDEXER": "triton"}
    probe, plan = _sim("sglang", "0.5.15", [Device("cuda", 0, "RTX PRO 6000", (12, 0))], env=env)
    acc = _account(plan)
    assert acc.missing == ("indexer=triton",)
    assert "would change indexer=triton, which this build does not implement yet" in _startup_line(plan)
    assert doctor.build(probe, env=env)["engines"]["sglang"]["not_in_this_build"] == ["indexer=triton"]


def test_startup_line_in_a_live_registration_uses_the_same_account(fresh_state, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--engine vllm==0.30.0 --capability 9.0")
    log = logging.getLogger("test.effects")
    registration.register(
        "vllm", "test", lambda: doctor.declared_patches("vllm"), log, carriers=lambda: doctor.adapter_carriers("vllm")
    )
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == log.name]
    assert "nothing to do here on vLLM" in line and "offers ascend_quant=ds_plugins (opt-in)" in line
