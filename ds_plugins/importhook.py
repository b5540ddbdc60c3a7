"""Run callbacks just before and just after a named module is imported.

Used for two things: the SGLang PYTHONPATH hook (act when `sglang` is imported,
and before its body runs, because SGLang reads some switches into module
constants at import time), and deferred patches (patch a target module the
moment the engine imports it, never importing it ourselves). wrapt's
`when_imported` offers only the "after" half, hence this small finder.

Stdlib only: it is imported at interpreter start by the PYTHONPATH hook.
"""

from __future__ import annotations

import _thread
import sys
from collections.abc import Callable
from types import ModuleType

# Deliberately light (no importlib.abc, logging or threading): this module is imported at
# every interpreter start by the PYTHONPATH hook. The finder and loader follow the
# importlib protocols by duck typing.

Callback = Callable[[ModuleType], None]

_lock = _thread.RLock()
_before: dict[str, list[Callback]] = {}
_after: dict[str, list[Callback]] = {}
_resolving: set[str] = set()  # names whose spec we are looking up right now (no recursion)


def _run(callbacks: list[Callback], module: ModuleType) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception:  # a hook must never break the import it rides on
            import logging

            logging.getLogger("ds_plugins.importhook").exception(
                "ds-plugins: import hook %r for %s failed", callback, module.__name__
            )


class _HookedLoader:
    def __init__(self, wrapped, name: str):
        self._wrapped = wrapped
        self._name = name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: the module's own code (and
        # importlib.resources) must see the loader it would have had without us.
        module.__loader__ = self._wrapped
        if module.__spec__ is not None:
            module.__spec__.loader = self._wrapped
        with _lock:
            before = _before.pop(self._name, [])
        _run(before, module)
        self._wrapped.exec_module(module)
        with _lock:
            after = _after.pop(self._name, [])
        _run(after, sys.modules.get(self._name, module))

    def __getattr__(self, attr):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._wrapped, attr)


class _Finder:
    """Wraps the loader of modules that have callbacks waiting; invisible for the rest."""

    def find_spec(self, fullname, path, target=None):
        with _lock:
            if (fullname not in _before and fullname not in _after) or fullname in _resolving:
                return None
            _resolving.add(fullname)
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            with _lock:
                _resolving.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


_finder = _Finder()


def _ensure_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def when_imported(name: str, callback: Callback, *, before: bool = False) -> bool:
    """Call `callback(module)` when module `name` is imported in this process.

    before=False: after the module body ran; if it is already imported, right now.
    before=True: after the module object exists but before its body runs; if it
    is already imported that moment has passed, and False is returned.
    Returns True when the callback has run or is waiting, False if it never will.
    """
    module = sys.modules.get(name)
    if module is not None:
        if before:
            return False
        _run([callback], module)
        return True
    with _lock:
        (_before if before else _after).setdefault(name, []).append(callback)
        _ensure_finder()
    return True
