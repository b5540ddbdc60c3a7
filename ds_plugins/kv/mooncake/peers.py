"""The request lifecycle on each side of a transfer, engine-agnostic.

KVSource (prefill worker): `expose(request_id)` keeps a finished prompt's blocks until the sink says
Done, or until abort_timeout_s passes (a sink that died must not pin them forever); `poll_finished()`
returns the requests whose blocks may now be freed, each exactly once.

KVSink (decode worker): `fetch(...)` runs in a worker pool: layout handshake (cached per source),
plan, one batched TransferEngine read, then Done to the source, always, whether the read worked or
not, so the source frees its blocks in either case. A read counts only if the source acknowledges
that Done (it still held the blocks); a rejected or unanswered Done fails the request. `poll()`
returns one RecvResult per fetch; on failure it names the local blocks that hold no valid data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine import Engine
from .handshake import HandshakeClient, HandshakeServer
from .layout import plan, spans
from .messages import Ack, Done, FromSource, GetLayout, Layout, Region, Reject, ToSource

log = logging.getLogger(__name__)

SLOW_S = 1.0  # a fetch slower than this is logged with the time of each step


class KVSource:
    def __init__(self, engine: Engine, engine_id: str, tp_rank: int, groups: Sequence[Sequence[Region]],
                 host: str, port: int, abort_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.engine_id, self.tp_rank = engine_id, tp_rank
        self._engine, self._clock, self._abort_timeout_s = engine, clock, abort_timeout_s
        self._layout = Layout(engine_id=engine_id, tp_rank=tp_rank, session=engine.session,
                              groups=[list(g) for g in groups])
        engine.register(spans(groups))
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}      # request id -> deadline
        self._finished: set[str] = set()
        self.failed: dict[str, str] = {}          # request id -> what the sink reported (for logs/tests)
        try:
            self._server = HandshakeServer(host, port, self._handle, name=f"{engine_id}-tp{tp_rank}")
        except BaseException:
            engine.unregister_all()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    @property
    def rejected(self) -> int:
        return self._server.rejected

    def expose(self, request_id: str, timeout_s: float | None = None) -> None:
        with self._lock:
            self._pending[request_id] = self._clock() + (self._abort_timeout_s if timeout_s is None else timeout_s)

    def release(self, request_id: str) -> None:
        """Free at once (this rank is not the one its sink reads)."""
        with self._lock:
            self._pending.pop(request_id, None)
            self._finished.add(request_id)

    @property
    def pending(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def poll_finished(self) -> set[str]:
        now = self._clock()
        with self._lock:
            for rid, deadline in list(self._pending.items()):
                if now >= deadline:
                    del self._pending[rid]
                    self._finished.add(rid)
                    log.warning("mooncake source %s: request %s was not fetched within %.0f s; freeing its blocks",
                                self.engine_id, rid, self._abort_timeout_s)
            out, self._finished = self._finished, set()
        return out

    def _handle(self, msg: ToSource) -> FromSource:
        if msg.engine_id != self.engine_id:
            return Reject(reason=f"unknown engine id {msg.engine_id!r}: this is {self.engine_id!r}")
        if isinstance(msg, GetLayout):
            return self._layout
        with self._lock:
            if self._pending.pop(msg.request_id, None) is None:
                return Reject(reason=f"unknown request {msg.request_id!r} (never exposed here, already "
                                     "released, or expired)")
            self._finished.add(msg.request_id)
            if not msg.ok:
                self.failed[msg.request_id] = msg.error
        if not msg.ok:
            log.warning("mooncake source %s: sink %s failed request %s: %s", self.engine_id, msg.requester,
                        msg.request_id, msg.error)
        return Ack()

    def close(self) -> None:
        self._server.close()
        self._engine.unregister_all()


@dataclass(frozen=True)
class SourceRef:
    """Where a request's blocks are: the source's handshake address and engine id, its request id there."""
    host: str
    port: int
    engine_id: str
    request_id: str


@dataclass
class RecvResult:
    request_id: str
    ok: bool
    nbytes: int = 0
    failed_blocks: set[int] = field(default_factory=set)
    error: str = ""


class KVSink:
    def __init__(self, engine: Engine, engine_id: str, groups: Sequence[Sequence[Region]], handshake_timeout_s: float,
                 num_workers: int = 4, null_block: int | None = None, register: bool = True):
        self.engine_id = engine_id
        self._engine, self._null = engine, null_block
        self._groups = [list(g) for g in groups]
        if register:
            engine.register(spans(groups))
        self._client = HandshakeClient(handshake_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="mooncake-sink")
        self._layouts: dict[tuple[str, int], Layout] = {}
        self._lock = threading.Lock()
        self._results: list[RecvResult] = []
        self._inflight = 0

    def fetch(self, request_id: str, source: SourceRef, local_blocks: Sequence[Sequence[int]],
              remote_blocks: Sequence[Sequence[int]]) -> None:
        """Start filling `local_blocks` (per group) from the source's `remote_blocks`; empty local: release only."""
        with self._lock:
            self._inflight += 1
        self._pool.submit(self._run, request_id, source, [list(b) for b in local_blocks],
                          [list(b) for b in remote_blocks])

    def poll(self) -> list[RecvResult]:
        with self._lock:
            out, self._results = self._results, []
        return out

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def _layout_of(self, source: SourceRef) -> Layout:
        key = (source.host, source.port)
        layout = self._layouts.get(key)
        if layout is None or layout.engine_id != source.engine_id:
            reply = self._client.request(source.host, source.port,
                                         GetLayout(engine_id=source.engine_id, requester=self.engine_id))
            if not isinstance(reply, Layout) or reply.engine_id != source.engine_id:
                raise RuntimeError(f"{source.host}:{source.port} answered GetLayout({source.engine_id!r}) "
                                   f"with {reply!r}")
            layout = self._layouts[key] = reply
        return layout

    def _run(self, request_id: str, source: SourceRef, local_blocks: list[list[int]],
             remote_blocks: list[list[int]]) -> None:
        wanted = {b for g in local_blocks for b in g if b != self._null}
        result = RecvResult(request_id, ok=True)
        marks = [("start", time.monotonic())]
        try:
            if wanted:
                layout = self._layout_of(source)
                marks.append(("layout", time.monotonic()))
                p = plan(self._groups, layout.groups, local_blocks, remote_blocks, self._null)
                self._engine.read(layout.session, p.local, p.remote, p.lengths)
                marks.append(("read", time.monotonic()))
                result.nbytes = p.nbytes
                if p.unfilled:
                    result.failed_blocks = {b for _, b in p.unfilled}
                    result.error = f"{len(p.unfilled)} blocks have no counterpart at the source"
        except Exception as exc:
            # A cached layout may be stale (the source restarted): forget it so the next request asks again.
            self._layouts.pop((source.host, source.port), None)
            result = RecvResult(request_id, ok=False, failed_blocks=wanted, error=f"{type(exc).__name__}: {exc}")
            log.warning("mooncake sink %s: request %s from %s:%d failed: %s", self.engine_id, request_id,
                        source.host, source.port, result.error)
        try:
            self._client.request(source.host, source.port,
                                 Done(engine_id=source.engine_id, request_id=source.request_id, ok=result.ok,
                                      error=result.error, requester=self.engine_id))
        except Exception as exc:
            # Unconfirmed: the source may have freed (and reused) the blocks before or while we read
            # them (expired, released by someone else, restarted), so what we read cannot be trusted.
            log.warning("mooncake sink %s: could not tell %s:%d that request %s is done: %s", self.engine_id,
                        source.host, source.port, request_id, exc)
            if result.ok and wanted:
                result = RecvResult(request_id, ok=False, failed_blocks=wanted,
                                    error=f"source did not confirm it held the blocks: {type(exc).__name__}: {exc}")
        marks.append(("done", time.monotonic()))
        if marks[-1][1] - marks[0][1] > SLOW_S:
            log.warning("mooncake sink %s: request %s took %.1f s (%s)", self.engine_id, request_id,
                        marks[-1][1] - marks[0][1],
                        ", ".join(f"{name} {t - prev:.2f} s" for (_, prev), (name, t) in zip(marks, marks[1:])))
        with self._lock:
            self._results.append(result)
            self._inflight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        self._engine.unregister_all()

    @property
    def open_sockets(self) -> int:
        return self._client.open_sockets


__all__ = ["Ack", "KVSink", "KVSource", "RecvResult", "Reject", "SourceRef"]
