import logging
import sys

import pytest

import ds_plugins
from ds_plugins import patching, registration
from ds_plugins.patching import Patch, replace_attribute

LOG = logging.getLogger("test.ds_plugins.registration")

SM120_VLLM_0_30 = "--engine vllm==0.30.0 --capability 12.0 --lib deep_gemm=no-sm12x --lib flashinfer=sm120"


def gate(module):
    return Patch(
        id="test.gate",
        engine="vllm",
        module=module,
        attribute="support_deep_gemm",
        versions=">=0.24",
        implements=("deepgemm", ("off",)),
        why="test",
        retire="never",
        check=lambda t: None,
        install=replace_attribute(lambda orig: lambda: False),
    )


@pytest.fixture
def target(module_factory):
    name = module_factory("dsp_reg_target", "def support_deep_gemm():\n    return True\n")
    return __import__(name)


def records(caplog, level):
    return [r for r in caplog.records if r.levelno == level and r.name == LOG.name]


def test_register_is_idempotent_and_says_what_it_did_once(target, fresh_state, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", SM120_VLLM_0_30)

    def source():
        return [gate(target.__name__)]

    first = registration.register("vllm", "vllm.general_plugins", source, LOG)
    replaced = target.support_deep_gemm
    second = registration.register("vllm", "vllm.general_plugins", source, LOG)
    assert first is second and second.calls == 2 and second.state == "registered"
    assert target.support_deep_gemm is replaced and target.support_deep_gemm() is False
    [info] = records(caplog, logging.INFO)
    line = info.getMessage()
    assert "vLLM 0.30.0" in line and "deepgemm=off" in line and "1 applied" in line
    # decisions that no patch of this build serves are named, not hidden
    assert "would change indexer=triton" in line and "which this build does not implement yet" in line
    assert "simulated" in records(caplog, logging.WARNING)[0].getMessage()


def test_disable_turns_everything_off_before_any_probe(target, fresh_state, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_DISABLE", "1")
    monkeypatch.setattr(registration, "current_probe", lambda: pytest.fail("probed while disabled"))
    reg = registration.register("vllm", "vllm.general_plugins", lambda: [gate(target.__name__)], LOG)
    assert reg.state == "disabled" and target.support_deep_gemm() is True


def test_bad_switch_is_one_error_line_naming_it_and_nothing_applied(target, fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", SM120_VLLM_0_30)
    monkeypatch.setenv("DS_PLUGINS_DEEPGEMM", "sometimes")
    reg = registration.register("vllm", "x", lambda: [gate(target.__name__)], LOG)
    assert reg.state == "config-error"
    [err] = records(caplog, logging.ERROR)
    assert "DS_PLUGINS_DEEPGEMM='sometimes'" in err.getMessage() and "auto, on, off, upstream" in err.getMessage()
    assert target.support_deep_gemm() is True


def test_bad_simulate_value_does_not_exit_the_engine(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--capability twelve")
    reg = registration.register("vllm", "x", lambda: [], LOG)
    assert reg.state == "config-error" and "--capability 'twelve'" in reg.error
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--no-such-flag")
    registration._registrations.clear()
    reg = registration.register("vllm", "x", lambda: [], LOG)
    assert reg.state == "config-error" and "DS_PLUGINS_SIMULATE" in reg.error


def test_internal_failure_is_one_error_line_and_leaves_the_engine_untouched(target, fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", SM120_VLLM_0_30)

    def explode(target_):
        raise RuntimeError("kaput")

    good = gate(target.__name__)
    bad = good._replace(id="test.bad", install=explode)
    reg = registration.register("vllm", "x", lambda: [good, bad], LOG)
    assert reg.state == "failed" and "kaput" in reg.error
    [err] = records(caplog, logging.ERROR)
    assert "internal error" in err.getMessage() and "DS_PLUGINS_DEBUG=1" in err.getMessage()
    assert not err.exc_info
    assert target.support_deep_gemm() is True  # the good patch was rolled back
    assert patching.outcomes()["test.gate"].state == "reverted"


def test_debug_adds_the_traceback(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("DS_PLUGINS_DEBUG", "1")
    monkeypatch.setattr(registration, "decide", lambda *a, **k: (_ for _ in ()).throw(KeyError("x")))
    registration.register("vllm", "x", lambda: [], LOG)
    [err] = records(caplog, logging.ERROR)
    assert err.exc_info and err.exc_info[0] is KeyError


def test_unsupported_engine_does_nothing_and_says_why(target, fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", "--engine vllm==0.19.1 --capability 12.0")
    reg = registration.register("vllm", "x", lambda: [gate(target.__name__)], LOG)
    assert reg.state == "registered" and reg.plan.status == "unsupported"
    [warn] = [r for r in records(caplog, logging.WARNING) if "needs vLLM" in r.getMessage()]
    assert ">= 0.20.0" in warn.getMessage()
    assert target.support_deep_gemm() is True


def test_prepare_then_register_decides_once(fresh_state, monkeypatch):
    monkeypatch.setenv("DS_PLUGINS_SIMULATE", SM120_VLLM_0_30)
    calls = []
    real = registration.current_probe
    monkeypatch.setattr(registration, "current_probe", lambda: calls.append(1) or real())
    assert registration.prepare("vllm", "hook", LOG).state == "prepared"
    reg = registration.register("vllm", "entry-point", lambda: [], LOG)
    assert reg.state == "registered" and reg.via == "hook" and len(calls) == 1


def test_vllm_entry_point_survives_a_broken_adapter(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ds_plugins.vllm", None)  # import of the adapter fails
    ds_plugins.register()  # must not raise
    assert "could not load its vLLM adapter" in caplog.text


def test_sglang_entry_point_survives_a_broken_core(monkeypatch, caplog):
    import ds_plugins_sglang

    monkeypatch.setitem(sys.modules, "ds_plugins.registration", None)
    ds_plugins_sglang.register()
    ds_plugins_sglang.prepare("hook")
    assert caplog.text.count("ds-plugins could not load") == 2
