import logging
import sys

import pytest

from ds_plugins import patching
from ds_plugins.patching import Patch, replace_attribute
from ds_plugins.policy import Decision, Plan
from tests.internals import clear_patch_records

LOG = logging.getLogger("test.ds_plugins")

TARGET_SOURCE = """
class Platform:
    @classmethod
    def support_deep_gemm(cls):
        return True

    def plain(self):
        return "plain"

def helper():
    return "original"
"""


def plan(value="off", version="0.30.0"):
    return Plan("vllm", version, "supported", "", "", (Decision("deepgemm", value, "test"),))


def gate_patch(module, **kw):
    def factory(original):
        return classmethod(lambda cls: False)

    fields = dict(
        id="test.gate",
        engine="vllm",
        module=module,
        attribute="Platform.support_deep_gemm",
        versions=">=0.24",
        implements=("deepgemm", ("off",)),
        why="test",
        retire="never",
        check=lambda t: None if isinstance(t.value, classmethod) else "not a classmethod",
        install=replace_attribute(factory),
    )
    fields.update(kw)
    return Patch(**fields)


def test_applies_now_when_module_is_imported_and_twice_is_a_noop(module_factory, fresh_state):
    name = module_factory("dsp_patch_t1", TARGET_SOURCE)
    mod = __import__(name)
    patch = gate_patch(name)
    [outcome] = patching.apply([patch], plan(), LOG)
    assert outcome.state == "applied"
    assert mod.Platform.support_deep_gemm() is False
    replaced = mod.Platform.__dict__["support_deep_gemm"]
    assert getattr(replaced.__func__, patching.MARKER) == "test.gate"
    # a second registration in the same process changes nothing
    patching.apply([patch], plan(), LOG)
    assert mod.Platform.__dict__["support_deep_gemm"] is replaced
    # even with the per-process record gone (e.g. our module reloaded), the marker says it is done
    clear_patch_records()
    [again] = patching.apply([patch], plan(), LOG)
    assert again.state == "applied" and again.detail == "already in place"
    assert mod.Platform.__dict__["support_deep_gemm"] is replaced


def test_deferred_until_the_engine_imports_the_target(module_factory, fresh_state):
    name = module_factory("dsp_patch_t2", TARGET_SOURCE)
    assert name not in sys.modules
    [outcome] = patching.apply([gate_patch(name)], plan(), LOG)
    assert outcome.state == "armed"
    assert name not in sys.modules  # we never import the engine's module ourselves
    mod = __import__(name)
    assert mod.Platform.support_deep_gemm() is False
    assert patching.outcomes()["test.gate"].state == "applied"


def test_failed_check_skips_with_one_warning(module_factory, fresh_state, caplog):
    name = module_factory(
        "dsp_patch_t3",
        TARGET_SOURCE.replace("@classmethod", "@staticmethod").replace(
            "def support_deep_gemm(cls)", "def support_deep_gemm()"
        ),
    )
    mod = __import__(name)
    [outcome] = patching.apply([gate_patch(name)], plan(), LOG)
    assert outcome.state == "skipped" and "not a classmethod" in outcome.detail
    assert mod.Platform.support_deep_gemm() is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test.gate" in warnings[0].getMessage()


def test_moved_target_skips_with_one_warning(module_factory, fresh_state, caplog):
    name = module_factory("dsp_patch_t4", "class Other:\n    pass\n")
    __import__(name)
    [outcome] = patching.apply([gate_patch(name)], plan(), LOG)
    assert outcome.state == "skipped" and "target not found" in outcome.detail
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_not_selected_and_out_of_range(module_factory, fresh_state, caplog):
    name = module_factory("dsp_patch_t5", TARGET_SOURCE)
    mod = __import__(name)
    [o] = patching.apply([gate_patch(name)], plan(value="upstream"), LOG)
    assert o.state == "not-selected" and o.detail == "deepgemm=upstream"
    clear_patch_records()
    [o] = patching.apply([gate_patch(name)], plan(version="0.22.1"), LOG)
    assert o.state == "other-version" and "written for vllm >=0.24" in o.detail
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # another release's site: no warning
    assert mod.Platform.support_deep_gemm() is True


def test_failure_while_installing_reverts_everything_this_call_applied(module_factory, fresh_state):
    name = module_factory("dsp_patch_t6", TARGET_SOURCE)
    mod = __import__(name)
    good = gate_patch(name)

    def explode(target):
        raise RuntimeError("install failed")

    bad = gate_patch(name, id="test.bad", attribute="helper", check=lambda t: None, install=explode)
    original = mod.Platform.__dict__["support_deep_gemm"]
    with pytest.raises(RuntimeError, match="install failed"):
        patching.apply([good, bad], plan(), LOG)
    assert mod.Platform.__dict__["support_deep_gemm"] is original
    assert mod.Platform.support_deep_gemm() is True
    assert patching.outcomes()["test.gate"].state == "reverted"


def test_failure_of_a_deferred_patch_is_logged_not_raised(module_factory, fresh_state, caplog):
    name = module_factory("dsp_patch_t7", TARGET_SOURCE)

    def explode(target):
        raise RuntimeError("late failure")

    patching.apply([gate_patch(name, install=explode)], plan(), LOG)
    mod = __import__(name)  # the engine's import must succeed regardless
    assert mod.Platform.support_deep_gemm() is True
    assert patching.outcomes()["test.gate"].state == "failed"
    assert "late failure" in caplog.text


def test_plain_function_replacement_and_undo(module_factory, fresh_state):
    name = module_factory("dsp_patch_t8", TARGET_SOURCE)
    mod = __import__(name)
    patch = gate_patch(
        name,
        id="test.helper",
        attribute="helper",
        check=lambda t: None,
        install=replace_attribute(lambda orig: lambda: "patched:" + orig()),
    )
    [outcome] = patching.apply([patch], plan(), LOG)
    assert mod.helper() == "patched:original"
    patching.revert([outcome])
    assert mod.helper() == "original"
