"""The SGLang adapter.

Two ways in, one registration per process:
- SGLang >= 0.5.11 calls `register` through the `sglang.srt.plugins` entry point
  (launcher, schedulers, TP workers, detokenizer where its version does).
- On every version, `ds-plugins sglang-path` on PYTHONPATH runs our
  sitecustomize in each interpreter (SGLang spawns its workers), which arms
  `pythonpath_hook`: decide just before `sglang` is imported, register just after.
Whichever comes first does the work; the other finds it done.

Kept import-light: the PYTHONPATH hook imports this package at interpreter start.
"""

from __future__ import annotations

# Under SGLang's logger tree, so SGLang's logging configuration applies to us.
LOGGER_NAME = "sglang.ds_plugins"


def _log():
    import logging  # not at module level: this package is imported at interpreter start

    return logging.getLogger(LOGGER_NAME)


def _apply_env(reg) -> None:
    """SGLang's own switches from the decisions (SGLANG_ENABLE_JIT_DEEPGEMM, ...), before SGLang's
    import-time reads of them run here or in any worker it spawns."""
    if reg.plan is None or reg.plan.status != "supported" or reg.state not in ("prepared", "registered"):
        return
    try:
        from ds_plugins.sglang.deepgemm_gate import apply_env

        apply_env(reg.plan, _log())
    except Exception as exc:  # never into SGLang
        _log().error("ds-plugins: could not set SGLang's DeepGEMM switch (%s: %s)", type(exc).__name__, exc)


def register(via: str = "sglang.srt.plugins") -> None:
    """SGLang general-plugin entry point: idempotent, cheap, never raises into SGLang."""
    try:
        import ds_plugins.registration as registration
        from ds_plugins.sglang import adapter_carriers, declared_patches
    except Exception as exc:  # a broken install must not take SGLang down
        _log().error("ds-plugins could not load (%s: %s); SGLang runs as shipped", type(exc).__name__, exc)
        return
    # Decide and set SGLang's switch first: a patch's check reads it (the user's own value wins).
    _apply_env(registration.prepare("sglang", via=via, log=_log()))
    registration.register("sglang", via=via, patches=declared_patches, log=_log(), carriers=adapter_carriers)


def prepare(via: str) -> None:
    """Decide before SGLang is imported (it reads some switches into constants at import)."""
    try:
        import ds_plugins.registration as registration
    except Exception as exc:
        _log().error("ds-plugins could not load (%s: %s); SGLang runs as shipped", type(exc).__name__, exc)
        return
    _apply_env(registration.prepare("sglang", via=via, log=_log()))


def sglang_path() -> str:
    """The folder to put on PYTHONPATH: it holds only our sitecustomize.py."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "pythonpath")
