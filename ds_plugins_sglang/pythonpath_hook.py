"""Armed by our sitecustomize in every interpreter; acts only if that interpreter imports sglang."""

from __future__ import annotations

VIA = "pythonpath-hook"


def _before_sglang(_module) -> None:
    from . import prepare

    prepare(VIA)


def _after_sglang(_module) -> None:
    from . import register

    register(VIA)


def install() -> None:
    from ds_plugins import importhook, settings

    try:
        if settings.disabled():
            return
    except settings.ConfigError:
        pass  # armed anyway: the registration reports the bad value through SGLang's logger, once sglang loads
    # A before-hook cannot run for a module that is already imported; then the
    # after-hook runs at once, which is the most that is still possible.
    importhook.when_imported("sglang", _before_sglang, before=True)
    importhook.when_imported("sglang", _after_sglang)
