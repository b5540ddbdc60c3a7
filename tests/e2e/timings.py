"""Wall-clock figures of the end-to-end tests, printed in pytest's terminal summary (for the README's
test-time note): server start-up, each request, each whole test."""

from __future__ import annotations

_records: list[tuple[str, float]] = []


def record(what: str, seconds: float) -> None:
    _records.append((what, seconds))


def records() -> list[tuple[str, float]]:
    return list(_records)
