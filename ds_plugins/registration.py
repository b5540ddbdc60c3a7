"""What an engine entry point runs, once per process: probe, decide, patch, say so.

Shared by the vLLM and SGLang adapters. Guarantees: idempotent (engines call
plugins in every process, sometimes twice; the SGLang hook and entry point may
both fire), cheap (no torch/Triton/engine import here), and it never raises into
the engine: a bad DS_PLUGINS_* value or an internal failure is one error line and
an untouched engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from . import __version__, patching, settings

if TYPE_CHECKING:
    from .policy import Plan

# Kept off the disabled path: probe, policy and landscape are imported when first needed.

PatchSource = Callable[[], Sequence[patching.Patch]]
# (decision, value) -> the adapter feature that carries it with no runtime patch (ds_plugins.effects)
CarrierSource = Callable[[], Mapping[tuple[str, str], str]]


class Registration:
    """What registration did in this process, for one engine."""

    def __init__(self, engine: str):
        self.engine = engine
        self.via: str | None = None
        self.calls = 0
        self.state = "new"  # new | prepared | registered | disabled | config-error | failed
        self.plan: Plan | None = None
        self.error: str | None = None
        self.outcomes: list = []
        self.elapsed_ms = 0.0  # time spent deciding and patching in this process (bench/startup.py)
        self.notes: dict[str, str] = {}  # adapter features served without a patch: feature -> state line

    def snapshot(self) -> dict:
        """JSON-friendly view, for tests and debugging."""
        return {
            "engine": self.engine,
            "via": self.via,
            "calls": self.calls,
            "state": self.state,
            "error": self.error,
            "status": self.plan.status if self.plan else None,
            "decisions": {d.id: d.value for d in self.plan.decisions} if self.plan else {},
            "outcomes": [o.public() for o in patching.outcomes().values()],
            "pid": os.getpid(),
            "elapsed_ms": round(self.elapsed_ms, 3),
            "notes": dict(self.notes),
        }


_lock = threading.RLock()
_registrations: dict[str, Registration] = {}


def get(engine: str) -> Registration:
    with _lock:
        return _registrations.setdefault(engine, Registration(engine))


def _title(engine: str) -> str:
    from .landscape import ENGINE_TITLE

    return ENGINE_TITLE[engine]


def current_probe():
    """This machine, or the one DS_PLUGINS_SIMULATE describes."""
    from .probe import installed_engines, probe

    simulated = settings.value("DS_PLUGINS_SIMULATE")
    if simulated:
        from .simulate import from_env_value

        return from_env_value(simulated, installed_engines())
    return probe()


def decide(probe, engine: str) -> Plan:
    from .policy import decide as policy_decide

    return policy_decide(probe, engine)


def _plan(reg: Registration, log: logging.Logger) -> Plan:
    if reg.plan is None:
        found = current_probe()
        if found.simulated:
            log.warning("ds-plugins: DS_PLUGINS_SIMULATE is set: deciding for a simulated machine, not this one")
        reg.plan = decide(found, reg.engine)
    return reg.plan


def _fail(reg: Registration, exc: BaseException, log: logging.Logger) -> None:
    title = _title(reg.engine)
    if isinstance(exc, settings.ConfigError):
        reg.state, reg.error = "config-error", str(exc)
        log.error("ds-plugins: %s. ds-plugins does nothing in this process; %s runs as shipped.", exc, title)
        return
    reg.state, reg.error = "failed", f"{type(exc).__name__}: {exc}"
    try:
        show = settings.value("DS_PLUGINS_DEBUG") == "1"
    except settings.ConfigError:  # reported already: a bad value fails settings.read before anything runs
        show = False
    log.error(
        "ds-plugins %s: internal error (%s), %s left as shipped%s",
        __version__,
        reg.error,
        title,
        "" if show else "; set DS_PLUGINS_DEBUG=1 for the traceback",
        exc_info=show,
    )


def prepare(engine: str, via: str, log: logging.Logger) -> Registration:
    """Decide without patching: for hooks that must act before the engine is imported."""
    with _lock:
        reg = get(engine)
        if reg.state != "new":
            return reg
        reg.via = via
        start = time.perf_counter()
        try:
            if settings.disabled():
                reg.state = "disabled"
                return reg
            _plan(reg, log)
            reg.state = "prepared"
        except Exception as exc:
            _fail(reg, exc, log)
        finally:
            reg.elapsed_ms += (time.perf_counter() - start) * 1e3
        return reg


def register(
    engine: str, via: str, patches: PatchSource, log: logging.Logger, carriers: CarrierSource = dict
) -> Registration:
    """The body of an engine entry point. Returns the per-process registration record."""
    with _lock:
        reg = get(engine)
        reg.calls += 1
        if reg.state not in ("new", "prepared"):
            log.debug("ds-plugins: already %s in this process (via %s); nothing to do", reg.state, reg.via)
            return reg
        if reg.via is None:
            reg.via = via
        start = time.perf_counter()
        title = _title(engine)
        try:
            if settings.disabled():
                reg.state = "disabled"
                log.info("ds-plugins: disabled by DS_PLUGINS_DISABLE; %s runs as shipped", title)
                return reg
            plan = _plan(reg, log)
            if plan.status != "supported":
                reg.state = "registered"
                log.warning("ds-plugins %s: %s; doing nothing", __version__, plan.status_reason)
                return reg
            declared = list(patches())
            reg.outcomes = patching.apply(declared, plan, log)
            reg.state = "registered"
            log.info("%s", summary(plan, declared, reg.outcomes, carriers()))
        except Exception as exc:
            _fail(reg, exc, log)
        finally:
            reg.elapsed_ms += (time.perf_counter() - start) * 1e3
        return reg


def summary(
    plan: Plan,
    declared: Sequence[patching.Patch],
    outcomes: Sequence[patching.Outcome],
    carriers: Mapping[tuple[str, str], str],
) -> str:
    """The start-up line: the same account of the plan (ds_plugins.effects) as doctor's verdict."""
    from .effects import account, sentence

    title = _title(plan.engine)
    head = f"ds-plugins {__version__} for {title} {plan.engine_version} on {plan.target}"
    plumbing = {p.id for p in declared if p.implements[0] == patching.EVERY_PLAN}  # carries no decision
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.patch_id not in plumbing:
            counts[o.state] = counts.get(o.state, 0) + 1
    patched = (
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("not-selected", "other-version")) or "none"
    )
    body = sentence(title, account(plan, declared, carriers))
    return f"{head}: {body}; patches: {patched}. `ds-plugins doctor` explains each decision."
