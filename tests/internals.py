"""Test-only views of ds-plugins' per-process state (kept out of the product modules)."""

from __future__ import annotations

from ds_plugins import importhook, patching

# Source for child interpreters (tests/engines' scripts): the same check as `hook_pending`.
HOOK_PENDING_SRC = "def hook_pending(name):\n    return name in importhook._before or name in importhook._after\n"


def clear_patch_records() -> None:
    """Forget this process's patch outcomes (what a reload of ds_plugins.patching would do)."""
    with patching._lock:
        patching._outcomes.clear()


def hook_pending(name: str) -> bool:
    """Whether an import hook for module `name` is still waiting in this process."""
    with importhook._lock:
        return name in importhook._before or name in importhook._after
