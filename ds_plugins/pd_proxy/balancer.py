"""Which prefill or decode instance takes the next request: the healthy one with the fewest requests in
flight, ties taken in turn (round robin). Health comes from the periodic /health checks (app.py) and from
requests: an instance the proxy cannot connect to is down until its /health answers 200 again."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger("ds_plugins.pd_proxy")


@dataclass
class Instance:
    side: str  # "prefill" or "decode"
    url: str
    healthy: bool = True
    in_flight: int = 0
    error: str | None = None  # why it is down
    served: int = 0  # requests it has taken

    def describe(self) -> dict:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "served": self.served,
            **({"error": self.error} if self.error else {}),
        }


class Side:
    """The instances of one side (prefill or decode)."""

    def __init__(self, name: str, urls: tuple[str, ...] | list[str]):
        self.name = name
        self.instances = [Instance(name, url) for url in urls]
        self._turn = 0

    def pick(self, exclude: tuple[Instance, ...] | list[Instance] = ()) -> Instance | None:
        """The healthy instance (not in `exclude`) with the fewest requests in flight; None if there is none."""
        n = len(self.instances)
        order = [self.instances[(self._turn + i) % n] for i in range(n)]
        ready = [inst for inst in order if inst.healthy and inst not in exclude]
        if not ready:
            return None
        self._turn = (self._turn + 1) % n
        return min(ready, key=lambda inst: inst.in_flight)  # min keeps the first of equals: the turn's

    @contextlib.contextmanager
    def using(self, inst: Instance):
        inst.in_flight += 1
        inst.served += 1
        try:
            yield inst
        finally:
            inst.in_flight -= 1

    def mark(self, inst: Instance, error: str | None) -> None:
        """Record a health result (None: healthy); log the changes only."""
        if error is None and not inst.healthy:
            log.info("%s %s is up again", self.name, inst.url)
        elif error is not None and inst.healthy:
            log.warning("%s %s is down: %s", self.name, inst.url, error)
        inst.healthy, inst.error = error is None, error

    def any_healthy(self) -> bool:
        return any(inst.healthy for inst in self.instances)

    def why_unavailable(self) -> str:
        return "; ".join(f"{inst.url}: {inst.error or 'busy'}" for inst in self.instances)

    def describe(self) -> list[dict]:
        return [inst.describe() for inst in self.instances]
