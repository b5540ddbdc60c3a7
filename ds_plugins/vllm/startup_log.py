"""ds-plugins' start-up line in vLLM processes that configure logging after loading plugins.

From vLLM 0.32 the API server loads general plugins before it configures logging
(`vllm.logger.configure_logging`, called from the CLI with the parsed arguments); until then the
`vllm` logger has no handler and an INFO line goes nowhere. So the adapter logs through `Holding`:
while no handler would print a line, INFO and DEBUG lines are held, and the declared patch below
logs them right after vLLM's `configure_logging` has run. Warnings and errors are never held
(Python's last-resort handler prints them already). Where vLLM configures logging at import
(<= 0.30), every line goes out at once and nothing is patched for this.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from ..patching import EVERY_PLAN, Patch, Target, outcomes, replace_attribute

PATCH_ID = "vllm.startup_log.configure_logging"
_held: list[tuple[logging.Logger, int, str, tuple]] = []
_lock = threading.Lock()


def _waiting() -> bool:
    """True while the patch that releases held lines is in place in this process."""
    outcome = outcomes().get(PATCH_ID)
    return outcome is not None and outcome.state in ("applied", "armed")


class Holding:
    """The logger registration writes to: INFO/DEBUG held while nothing would print them."""

    def __init__(self, log: logging.Logger):
        self._log = log

    def _emit(self, level: int, msg: str, args: tuple, kwargs: dict) -> None:
        if not self._log.isEnabledFor(level) and self._log.hasHandlers():
            return
        if level < logging.WARNING and not self._log.hasHandlers() and _waiting():
            with _lock:
                _held.append((self._log, level, msg, args))
            return
        self._log.log(level, msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs):
        self._emit(logging.DEBUG, msg, args, kwargs)

    def info(self, msg, *args, **kwargs):
        self._emit(logging.INFO, msg, args, kwargs)

    def warning(self, msg, *args, **kwargs):
        self._log.warning(msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs):
        self._log.error(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else (isEnabledFor, name, ...) is the logger's
        return getattr(self._log, name)


def release() -> int:
    """Log the held lines now (through the loggers and handlers vLLM has just configured)."""
    with _lock:
        lines, _held[:] = list(_held), []
    for log, level, msg, args in lines:
        log.log(level, msg, *args)
    return len(lines)


def _check(target: Target) -> str | None:
    code = getattr(target.value, "__code__", None)
    if code is None or code.co_argcount < 1:
        return "expected configure_logging(config)"
    return None


def _wrap(original: Any):
    @functools.wraps(original)
    def configure_logging(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            release()

    return configure_logging


PATCH = Patch(
    id=PATCH_ID,
    engine="vllm",
    module="vllm.logger",
    attribute="configure_logging",
    versions=">=0.32",
    implements=(EVERY_PLAN, ()),
    why="vLLM 0.32+ configures logging after the API server has loaded plugins, so ds-plugins' start-up "
    "line there would be dropped; held lines are logged once vLLM's configure_logging has run",
    retire="when vLLM configures logging before loading general plugins in every process",
    check=_check,
    install=replace_attribute(_wrap),
    how="vLLM's configure_logging runs as shipped, then logs the start-up lines ds-plugins held back",
    evidence=("tests/e2e/test_plugin_e2e.py", "tests/unit/test_startup_log.py", "tests/contract/test_vllm_seams.py"),
)
