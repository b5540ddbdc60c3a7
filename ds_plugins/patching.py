"""Declared, version-ranged, probed, reversible changes to an engine.

A Patch names its target (`module` + dotted `attribute`), the engine versions it
is written for, the policy decision it implements, a `check` that the target
still looks the way the patch assumes, and an `install` that makes the change
and returns how to undo it. The declaration is the one source: `patches/<id>.toml`
and docs/patches.md are generated from it (`python ci/patch_records.py write`), and a test fails
when they differ.

Rules: the target module is never imported by us. If the engine has
imported it already the patch is applied at once, otherwise the moment the
engine imports it (importhook). A failed check skips the patch with one
warning and leaves the engine as shipped. Applying twice is a no-op.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, NamedTuple

from . import importhook

MARKER = "__ds_plugins_patch__"
# `implements` of a patch that no decision selects: it serves every supported plan (ds-plugins' own
# plumbing in the engine, e.g. its start-up line), and carries no decision value.
EVERY_PLAN = "*"


class Target(NamedTuple):
    """The resolved target: `owner.<name>` is what the patch changes."""

    module: ModuleType
    owner: Any
    name: str
    value: Any  # the static attribute (a classmethod object stays a classmethod)


class Patch(NamedTuple):
    id: str
    engine: str  # "vllm" | "sglang"
    module: str  # dotted module path, e.g. "vllm.platforms.cuda"
    attribute: str  # dotted path inside it, e.g. "CudaPlatform.support_deep_gemm"
    versions: str  # engine versions it is written for: ">=A" or ">=A,<B" (landscape.in_range)
    implements: tuple[str, tuple[str, ...]]  # (decision id, decision values that select it)
    why: str
    retire: str  # what upstream change or version makes it unnecessary
    check: Callable[[Target], str | None]  # None if the target looks as expected, else why not
    install: Callable[[Target], Callable[[], None]]  # makes the change, returns the undo
    how: str = ""  # what the installed change does, in one sentence (rendered into docs/patches.md)
    upstream: tuple[str, ...] = ()  # "owner/repo#N": the upstream issues and PRs that motivate it
    # Test files (repository paths) that back it: tests/engines and tests/e2e run the real engine ("live"),
    # tests/contract read the wheels' source ("AST"); none means the range rests on a reading.
    evidence: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"

    def covers(self, version: str) -> bool:
        from .landscape import in_range

        return in_range(self.versions, version, what=f"patch {self.id}")

    def selected_by(self, plan) -> bool:
        decision, values = self.implements
        return decision == EVERY_PLAN or plan.value(decision) in values


def replace_attribute(factory: Callable[[Any], Any]) -> Callable[[Target], Callable[[], None]]:
    """An `install` that sets owner.name = factory(original) and restores it on undo."""

    def install(target: Target) -> Callable[[], None]:
        replacement = factory(target.value)
        setattr(target.owner, target.name, replacement)

        def undo() -> None:
            setattr(target.owner, target.name, target.value)

        return undo

    return install


def parameters(func: Any) -> tuple[str, ...] | None:
    """Named parameters of a plain Python function; None for a builtin or a *args forwarder, whose
    signature says nothing about the call shapes it takes."""
    code = getattr(func, "__code__", None)
    if code is None or code.co_flags & 0x04:  # CO_VARARGS
        return None
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def accepts_what_the_original_takes(pick: Callable[[Any], Callable]) -> Callable[[Target], str | None]:
    """A `check` for routing a function to `pick(original)`: every parameter the engine's function
    takes (so every argument its callers may pass) must be one the replacement accepts."""

    def check(target: Target) -> str | None:
        if not callable(target.value):
            return f"{target.name} is not a function here"
        theirs = parameters(target.value)
        if not theirs:
            return None  # a builtin or a forwarder: the contract tests check the callers instead
        extra = sorted(set(theirs) - set(parameters(pick(target.value)) or ()))
        if extra:
            return f"{target.name} takes {', '.join(extra)} here, which the ds-plugins replacement does not"
        return None

    return check


def route_to(patch_id: str, pick: Callable[[Any], Callable]) -> Callable[[Target], Callable[[], None]]:
    """An `install` that rebinds the target to `pick(original)`, through a function of its own per patch
    (so each site carries its own marker) that keeps the replacement's signature and the original."""

    def factory(original: Any) -> Callable:
        replacement = pick(original)

        @functools.wraps(replacement)
        def routed(*args, **kwargs):
            return replacement(*args, **kwargs)

        routed.__ds_plugins_route__ = patch_id  # type: ignore[attr-defined]
        routed.__ds_plugins_original__ = original  # type: ignore[attr-defined]
        return routed

    return replace_attribute(factory)


class Route(NamedTuple):
    """A function an engine calls, at `module.attribute`, answered by a ds-plugins adapter: the rows of
    both engines' route tables (ds_plugins/vllm/dsv4/routes.py, ds_plugins/sglang/routes.py); `patch`
    makes the Patch that binds it."""

    id: str
    module: str
    attribute: str
    versions: str
    implements: tuple[str, tuple[str, ...]]
    why: str
    retire: str
    adapter: str = ""  # the adapter's name, where the engine adapter chooses by name
    # Routes of one group apply wholly or not at all (the engine adapter's `check` enforces it).
    group: str = ""
    upstream: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()

    def patch(
        self, engine: str, pick: Callable[[Any], Callable], check: Callable[[Target], str | None] | None = None
    ) -> Patch:
        """The Patch rebinding the site to `pick(original)`; by default it checks that the adapter
        takes every parameter the original takes."""
        how = (
            f"rebinds `{self.attribute}` in `{self.module}` to the ds-plugins adapter "
            f"`{self.adapter or self.attribute}`, keeping the engine's function beside it"
        )
        return Patch(
            self.id,
            engine,
            self.module,
            self.attribute,
            self.versions,
            self.implements,
            self.why,
            self.retire,
            check or accepts_what_the_original_takes(pick),
            route_to(self.id, pick),
            how=how,
            upstream=self.upstream,
            evidence=self.evidence,
        )


def _static_value(owner: Any, name: str) -> Any:
    """The attribute as stored (a classmethod stays a classmethod), like inspect.getattr_static
    for the cases patches meet: module attributes and class attributes along the MRO.
    (inspect itself costs ~12 ms to import, in every engine process.)"""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name]
        raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
    namespace = getattr(owner, "__dict__", None)
    if namespace is not None and name in namespace:
        return namespace[name]
    return getattr(owner, name)


def _marker_of(value: Any) -> str | None:
    func = getattr(value, "__func__", value)
    return getattr(func, MARKER, None)


def resolve(patch: Patch, module: ModuleType) -> Target:
    """Walk `patch.attribute` inside the imported module. Raises AttributeError if it moved."""
    owner: Any = module
    parts = patch.attribute.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return Target(module, owner, parts[-1], _static_value(owner, parts[-1]))


# --- per-process record ------------------------------------------------------------


class Outcome:
    """What happened to one patch in this process."""

    __slots__ = ("patch_id", "state", "detail", "undo")

    def __init__(self, patch_id: str, state: str, detail: str = "", undo: Callable[[], None] | None = None):
        self.patch_id = patch_id
        self.state = state  # applied | armed | skipped | not-selected | other-version | failed | reverted
        self.detail = detail
        self.undo = undo

    def __repr__(self) -> str:
        return f"Outcome({self.patch_id!r}, {self.state!r}, {self.detail!r})"

    def public(self) -> dict:
        return {"patch": self.patch_id, "state": self.state, "detail": self.detail}


_lock = threading.RLock()
_outcomes: dict[str, Outcome] = {}


def outcomes() -> dict[str, Outcome]:
    with _lock:
        return dict(_outcomes)


def _record(outcome: Outcome) -> Outcome:
    with _lock:
        _outcomes[outcome.patch_id] = outcome
    return outcome


def _apply_now(patch: Patch, module: ModuleType, log: logging.Logger) -> Outcome:
    try:
        target = resolve(patch, module)
    except AttributeError as exc:
        return _skip(patch, f"target not found ({exc})", log)
    if _marker_of(target.value) == patch.id:
        return _record(Outcome(patch.id, "applied", "already in place"))
    problem = patch.check(target)
    if problem:
        return _skip(patch, problem, log)
    undo = patch.install(target)
    # Whatever now sits at the target carries the patch id, so that a second
    # registration (another plugin loader, a reload of ours) sees it is done.
    current = _static_value(target.owner, target.name)
    if current is not target.value:
        _mark(current, patch.id)
    log.debug("ds-plugins: applied %s to %s", patch.id, patch.target)
    return _record(Outcome(patch.id, "applied", "", undo))


def _mark(value: Any, patch_id: str) -> None:
    func = getattr(value, "__func__", value)
    try:
        setattr(func, MARKER, patch_id)
    except (AttributeError, TypeError):  # builtins cannot carry it; the record still does
        pass


def _skip(patch: Patch, why: str, log: logging.Logger) -> Outcome:
    log.warning("ds-plugins: skipping patch %s on %s: %s; upstream behaviour kept", patch.id, patch.target, why)
    return _record(Outcome(patch.id, "skipped", why))


def apply(patches: Iterable[Patch], plan, log: logging.Logger) -> list[Outcome]:
    """Apply the patches the plan selects, now or when their module is imported.

    If installing one raises, every patch applied by this call is undone and the
    exception propagates: the caller reports it and the engine stays as shipped.
    """
    done: list[Outcome] = []
    try:
        for patch in patches:
            with _lock:
                previous = _outcomes.get(patch.id)
            if previous is not None and previous.state in ("applied", "armed"):
                continue  # idempotent: registration ran before in this process
            if not patch.selected_by(plan):
                decision, _ = patch.implements
                _record(Outcome(patch.id, "not-selected", f"{decision}={plan.value(decision)}"))
                continue
            if not patch.covers(plan.engine_version):
                # Version-ranged alternatives (the same route at another site in older releases): not a
                # problem, so no warning; doctor and the record say which one this version uses.
                _record(
                    Outcome(
                        patch.id,
                        "other-version",
                        f"written for {plan.engine} {patch.versions}, found {plan.engine_version}",
                    )
                )
                continue
            module = sys.modules.get(patch.module)
            if module is not None:
                done.append(_apply_now(patch, module, log))
            else:
                done.append(_record(Outcome(patch.id, "armed", f"applies when {patch.module} is imported")))
                importhook.when_imported(patch.module, _deferred(patch, log))
    except Exception:
        revert(done)
        raise
    return [o for o in (outcomes().get(p.id) for p in patches) if o is not None]


def _deferred(patch: Patch, log: logging.Logger) -> Callable[[ModuleType], None]:
    def on_import(module: ModuleType) -> None:
        with _lock:
            if _outcomes.get(patch.id, Outcome(patch.id, "")).state != "armed":
                return  # reverted or disabled meanwhile
        try:
            _apply_now(patch, module, log)
        except Exception as exc:  # never break the engine's import
            log.error(
                "ds-plugins: patch %s failed while %s was imported (%s: %s); upstream behaviour kept",
                patch.id,
                patch.module,
                type(exc).__name__,
                exc,
            )
            _record(Outcome(patch.id, "failed", f"{type(exc).__name__}: {exc}"))

    return on_import


def revert(applied: Iterable[Outcome]) -> None:
    """Undo applied patches (newest first) and disarm armed ones."""
    for outcome in reversed(list(applied)):
        if outcome.state not in ("applied", "armed"):
            continue
        if outcome.undo is not None:
            outcome.undo()
        _record(Outcome(outcome.patch_id, "reverted", "undone after a registration failure"))
