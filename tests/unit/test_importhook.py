import sys

from ds_plugins import importhook
from tests.internals import hook_pending


def test_before_and_after_run_around_the_module_body(module_factory):
    name = module_factory(
        "dsp_hook_target_a",
        """
        import sys
        seen_flag = getattr(sys, "_dsp_flag", None)
        value = 41
    """,
    )
    order = []

    def before(module):
        order.append(("before", hasattr(module, "value")))
        sys._dsp_flag = "set before"

    def after(module):
        order.append(("after", module.value))

    assert importhook.when_imported(name, before, before=True)
    assert importhook.when_imported(name, after)
    assert hook_pending(name)
    import dsp_hook_target_a

    assert order == [("before", False), ("after", 41)]
    assert dsp_hook_target_a.seen_flag == "set before"  # the before-hook ran ahead of the body
    assert not hook_pending(name)
    # the module sees its real loader, not our wrapper
    assert type(dsp_hook_target_a.__loader__).__name__ == "SourceFileLoader"
    assert type(dsp_hook_target_a.__spec__.loader).__name__ == "SourceFileLoader"
    del sys._dsp_flag


def test_after_hook_on_an_imported_module_runs_at_once_and_before_hook_reports_too_late(module_factory):
    name = module_factory("dsp_hook_target_b", "x = 1\n")
    __import__(name)
    got = []
    assert importhook.when_imported(name, lambda m: got.append(m.x))
    assert got == [1]
    assert importhook.when_imported(name, lambda m: got.append("late"), before=True) is False
    assert got == [1]


def test_failing_callback_does_not_break_the_import(module_factory, caplog):
    name = module_factory("dsp_hook_target_c", "y = 2\n")

    def broken(module):
        raise RuntimeError("boom")

    importhook.when_imported(name, broken)
    import dsp_hook_target_c

    assert dsp_hook_target_c.y == 2
    assert "import hook" in caplog.text and "boom" in caplog.text


def test_submodule_and_package_targets(module_factory):
    name = module_factory("dsp_hook_pkg.inner", "z = 3\n")
    got = []
    importhook.when_imported("dsp_hook_pkg", lambda m: got.append(m.__name__))
    importhook.when_imported(name, lambda m: got.append(m.z))
    import dsp_hook_pkg.inner  # noqa: F401

    assert got == ["dsp_hook_pkg", 3]


def test_failed_import_keeps_the_hook_for_a_retry(module_factory):
    name = module_factory("dsp_hook_target_d", "raise ImportError('not yet')\n")
    got = []
    importhook.when_imported(name, lambda m: got.append("after"))
    try:
        __import__(name)
    except ImportError:
        pass
    assert got == [] and hook_pending(name)
    sys.modules.pop(name, None)
    # clean up the pending hook so it cannot leak into other tests
    importhook._after.pop(name, None)


def test_other_imports_are_untouched(module_factory):
    name = module_factory("dsp_hook_unrelated", "w = 4\n")
    importhook.when_imported("dsp_hook_never_imported", lambda m: None)
    mod = __import__(name)
    assert type(mod.__spec__.loader).__name__ == "SourceFileLoader"
    importhook._after.pop("dsp_hook_never_imported", None)
