"""The request lifecycle on each side of a transfer, engine-agnostic.

KVSource (prefill worker): `expose(request_id)` keeps a finished prompt's blocks until the sink says
Done, or until abort_timeout_s passes (a sink that died must not pin them forever); the hold starts
when the prefill hands the request off (the decode side is told then) and each Hold from the decode
side renews it, so a request queued at D for longer than abort_timeout_s is still there to read;
`poll_finished()` returns the requests whose blocks may now be freed, each exactly once.

HoldRenewer (decode scheduler): sends those Holds, for the requests it watches, every third of the
timeout, until they are allocated (the read follows) or finished.

KVSink (decode worker): `fetch(...)` runs in a worker pool of its source's own (num_workers threads per
source address, so a stalled source holds up only its own requests): layout handshake (cached per source),
plan, one batched TransferEngine read, then Done to the source, always, whether the read worked or
not, so the source frees its blocks in either case. A read counts only if the source acknowledges
that Done (it still held the blocks); a rejected or unanswered Done fails the request. `poll()`
returns one RecvResult per fetch; on failure it names the local blocks that hold no valid data.
Deadline: a request that waited in its source's queue longer than `queue_deadline_s` (default: the
handshake timeout) while that source's last fetch ended with it silent (no answer to Done), with no
answer from it since, fails at once without contacting it (its blocks there are freed by the source's
abort timeout): a stalled source costs its queued requests one timeout, not one timeout each.

Both sides talk only to allowed, authenticated peers (handshake.py, auth.py), and nothing they keep
per request or per peer grows without bound: requests leave on release or expiry, failure reports
are capped (MAX_FAILED_KEPT), idle per-source pools and layouts past MAX_SOURCES are closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .allow import AllowList
from .auth import Authenticator
from .engine import Engine
from .handshake import HandshakeClient, HandshakeServer, PeerTimeout
from .layout import plan, spans
from .messages import Ack, Done, FromSource, GetLayout, Hold, Layout, Region, Reject, ToSource

log = logging.getLogger(__name__)

SLOW_S = 1.0  # a fetch slower than this is logged with the time of each step
MAX_FAILED_KEPT = 1024  # KVSource.failed: the latest failure reports (for logs and tests)
MAX_SOURCES = 64  # KVSink: idle per-source pools (and their cached layouts) kept beyond this are closed
MAX_HOLD_IDS = 512  # request ids per Hold message (keeps it far below the handshake's message limit)


class KVSource:
    def __init__(
        self,
        engine: Engine,
        engine_id: str,
        tp_rank: int,
        groups: Sequence[Sequence[Region]],
        host: str,
        port: int,
        abort_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        auth: Authenticator | None = None,
        allowed: AllowList | None = None,
        tp_size: int = 0,
        decode_tp_size: int = 0,
    ):
        self.engine_id, self.tp_rank = engine_id, tp_rank
        self._engine, self._clock, self._abort_timeout_s = engine, clock, abort_timeout_s
        self._decode_tp = decode_tp_size
        self._layout = Layout(
            engine_id=engine_id,
            tp_rank=tp_rank,
            session=engine.session,
            groups=[list(g) for g in groups],
            tp_size=tp_size,
        )
        engine.register(spans(groups))
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # request id -> deadline
        self._finished: set[str] = set()
        self.failed: OrderedDict[str, str] = OrderedDict()  # request id -> what the sink reported (latest)
        try:
            self._server = HandshakeServer(
                host, port, self._handle, name=f"{engine_id}-tp{tp_rank}", auth=auth, allowed=allowed
            )
        except BaseException:
            engine.unregister_all()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    @property
    def rejected(self) -> int:
        return self._server.rejected

    @property
    def refused(self) -> int:
        """Messages refused before reading them: address not allowed, or not authenticated."""
        return self._server.refused

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
                    log.warning(
                        "mooncake source %s: request %s was not fetched within %.0f s; freeing its blocks",
                        self.engine_id,
                        rid,
                        self._abort_timeout_s,
                    )
            out, self._finished = self._finished, set()
        return out

    def _handle(self, msg: ToSource) -> FromSource:
        if msg.engine_id != self.engine_id:
            return Reject(reason=f"unknown engine id {msg.engine_id!r}: this is {self.engine_id!r}")
        if isinstance(msg, GetLayout):
            if self._decode_tp and msg.decode_tp_size and msg.decode_tp_size != self._decode_tp:
                return Reject(
                    reason=f"TP mismatch: the sink runs decode tp_size {msg.decode_tp_size}, this "
                    f"prefill is configured with decode.tp_size {self._decode_tp} "
                    "(kv_connector_extra_config.decode.tp_size must match on both sides)"
                )
            return self._layout
        if isinstance(msg, Hold):
            if len(msg.request_ids) > MAX_HOLD_IDS:
                return Reject(reason=f"Hold of {len(msg.request_ids)} requests: at most {MAX_HOLD_IDS} per message")
            renewed = self._clock() + self._abort_timeout_s
            with self._lock:
                for rid in msg.request_ids:
                    if rid in self._pending:
                        self._pending[rid] = max(self._pending[rid], renewed)
            return Ack()
        with self._lock:
            if self._pending.pop(msg.request_id, None) is None:
                return Reject(
                    reason=f"unknown request {msg.request_id!r} (never exposed here, already released, or expired)"
                )
            self._finished.add(msg.request_id)
            if not msg.ok:
                self.failed[msg.request_id] = msg.error
                while len(self.failed) > MAX_FAILED_KEPT:
                    self.failed.popitem(last=False)
        if not msg.ok:
            log.warning(
                "mooncake source %s: sink %s failed request %s: %s",
                self.engine_id,
                msg.requester,
                msg.request_id,
                msg.error,
            )
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
    tp_size: int = 0  # the source's TP size as the request says (0: not checked)


@dataclass
class RecvResult:
    request_id: str
    ok: bool
    nbytes: int = 0
    failed_blocks: set[int] = field(default_factory=set)
    error: str = ""


class KVSink:
    def __init__(
        self,
        engine: Engine,
        engine_id: str,
        groups: Sequence[Sequence[Region]],
        handshake_timeout_s: float,
        num_workers: int = 4,
        null_block: int | None = None,
        register: bool = True,
        auth: Authenticator | None = None,
        allowed: AllowList | None = None,
        tp_size: int = 0,
        queue_deadline_s: float | None = None,
    ):
        self.engine_id = engine_id
        self._engine, self._null, self._workers, self._tp_size = engine, null_block, num_workers, tp_size
        self._queue_deadline_s = handshake_timeout_s if queue_deadline_s is None else queue_deadline_s
        self._groups = [list(g) for g in groups]
        if register:
            engine.register(spans(groups))
        self._client = HandshakeClient(handshake_timeout_s, auth=auth, allowed=allowed)
        # Per source address: its own pool, its requests in flight, its layout; least recently used first.
        self._sources: OrderedDict[tuple[str, int], _Source] = OrderedDict()
        self._lock = threading.Lock()
        self._results: list[RecvResult] = []
        self._inflight = 0
        self._closed = False

    def fetch(
        self,
        request_id: str,
        source: SourceRef,
        local_blocks: Sequence[Sequence[int]],
        remote_blocks: Sequence[Sequence[int]],
    ) -> None:
        """Start filling `local_blocks` (per group) from the source's `remote_blocks`; empty local: release only."""
        key = (source.host, source.port)
        with self._lock:
            if self._closed:
                raise RuntimeError("KVSink is closed")
            peer = self._sources.get(key)
            if peer is None:
                peer = self._sources[key] = _Source(
                    ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=f"mooncake-sink-{source.port}")
                )
            self._sources.move_to_end(key)
            peer.inflight += 1
            self._inflight += 1
            self._close_idle()  # after counting this request, so its own pool is not idle
        peer.pool.submit(
            self._run,
            request_id,
            source,
            [list(b) for b in local_blocks],
            [list(b) for b in remote_blocks],
            time.monotonic(),
        )

    def _close_idle(self) -> None:
        for key, peer in list(self._sources.items()):
            if len(self._sources) <= MAX_SOURCES:
                break
            if peer.inflight == 0:
                del self._sources[key]
                peer.pool.shutdown(wait=False)

    def poll(self) -> list[RecvResult]:
        with self._lock:
            out, self._results = self._results, []
        return out

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    @property
    def sources(self) -> int:
        """Source addresses with a pool (and maybe a cached layout) here."""
        with self._lock:
            return len(self._sources)

    def _layout_of(self, source: SourceRef) -> Layout:
        peer = self._sources.get((source.host, source.port))
        layout = peer.layout if peer else None
        if layout is None or layout.engine_id != source.engine_id:
            reply = self._client.request(
                source.host,
                source.port,
                GetLayout(engine_id=source.engine_id, requester=self.engine_id, decode_tp_size=self._tp_size),
            )
            if not isinstance(reply, Layout) or reply.engine_id != source.engine_id:
                raise RuntimeError(
                    f"{source.host}:{source.port} answered GetLayout({source.engine_id!r}) with {reply!r}"
                )
            layout = reply
            if peer is not None:
                peer.layout = layout
        if source.tp_size and layout.tp_size and layout.tp_size != source.tp_size:
            raise RuntimeError(
                f"TP mismatch: the request names remote_tp_size {source.tp_size}, the prefill "
                f"at {source.host}:{source.port} runs tp_size {layout.tp_size}"
            )
        return layout

    def _forget_layout(self, source: SourceRef) -> None:
        peer = self._sources.get((source.host, source.port))
        if peer is not None:
            peer.layout = None

    def _failing(self, source: SourceRef, queued_at: float) -> str:
        """Why this request, queued at `queued_at`, fails without contacting its source ('' if it does not)."""
        with self._lock:
            peer = self._sources.get((source.host, source.port))
            failing = peer.failing if peer is not None else ""
        waited = time.monotonic() - queued_at
        if not failing or waited <= self._queue_deadline_s:
            return ""
        return (
            f"waited {waited:.1f} s (more than {self._queue_deadline_s:g} s) for {source.host}:{source.port}, "
            f"whose last fetch failed ({failing}); not tried"
        )

    def _mark(self, source: SourceRef, failure: str) -> None:
        with self._lock:
            peer = self._sources.get((source.host, source.port))
            if peer is not None:
                peer.failing = failure[:200]

    def _run(
        self,
        request_id: str,
        source: SourceRef,
        local_blocks: list[list[int]],
        remote_blocks: list[list[int]],
        queued_at: float,
    ) -> None:
        wanted = {b for g in local_blocks for b in g if b != self._null}
        skipped = self._failing(source, queued_at)
        if skipped:
            log.warning("mooncake sink %s: request %s failed: %s", self.engine_id, request_id, skipped)
            self._finish(source, RecvResult(request_id, ok=False, failed_blocks=wanted, error=skipped))
            return
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
            self._forget_layout(source)
            result = RecvResult(request_id, ok=False, failed_blocks=wanted, error=f"{type(exc).__name__}: {exc}")
            log.warning(
                "mooncake sink %s: request %s from %s:%d failed: %s",
                self.engine_id,
                request_id,
                source.host,
                source.port,
                result.error,
            )
        try:
            self._client.request(
                source.host,
                source.port,
                Done(
                    engine_id=source.engine_id,
                    request_id=source.request_id,
                    ok=result.ok,
                    error=result.error,
                    requester=self.engine_id,
                ),
            )
        except Exception as exc:
            # Unconfirmed: the source may have freed (and reused) the blocks before or while we read
            # them (expired, released by someone else, restarted), so what we read cannot be trusted.
            log.warning(
                "mooncake sink %s: could not tell %s:%d that request %s is done: %s",
                self.engine_id,
                source.host,
                source.port,
                request_id,
                exc,
            )
            if result.ok and wanted:
                result = RecvResult(
                    request_id,
                    ok=False,
                    failed_blocks=wanted,
                    error=f"source did not confirm it held the blocks: {type(exc).__name__}: {exc}",
                )
            # Silent (stalled, dead, unreachable): its queued requests past the deadline skip it. An
            # answer, even a refusal, shows it responsive.
            self._mark(source, f"{type(exc).__name__}: {exc}" if isinstance(exc, PeerTimeout) else "")
        else:
            self._mark(source, "")
        marks.append(("done", time.monotonic()))
        if marks[-1][1] - marks[0][1] > SLOW_S:
            log.warning(
                "mooncake sink %s: request %s took %.1f s (%s)",
                self.engine_id,
                request_id,
                marks[-1][1] - marks[0][1],
                ", ".join(f"{name} {t - prev:.2f} s" for (_, prev), (name, t) in zip(marks, marks[1:])),
            )
        self._finish(source, result)

    def _finish(self, source: SourceRef, result: RecvResult) -> None:
        with self._lock:
            self._results.append(result)
            self._inflight -= 1
            peer = self._sources.get((source.host, source.port))
            if peer is not None:
                peer.inflight -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = [p.pool for p in self._sources.values()]
            self._sources.clear()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        self._engine.unregister_all()

    @property
    def open_sockets(self) -> int:
        return self._client.open_sockets


class HoldRenewer:
    """Renews, at each request's sources, the hold on requests the decode side still waits to read.

    One daemon thread, started on the first watch; a renewal that fails is logged at debug level only:
    the request then expires at its source and its read fails cleanly (Done is answered "unknown").
    """

    def __init__(self, client: HandshakeClient, engine_id: str, interval_s: float):
        self._client, self.engine_id, self._interval = client, engine_id, interval_s
        self._watched: dict[str, tuple[str, list[tuple[str, int]], str]] = {}  # rid -> (engine, addrs, remote rid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(
        self, request_id: str, remote_engine_id: str, addresses: Sequence[tuple[str, int]], remote_request_id: str
    ) -> None:
        with self._lock:
            self._watched[request_id] = (remote_engine_id, list(addresses), remote_request_id)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="mooncake-hold-renewer", daemon=True)
                self._thread.start()

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._watched.pop(request_id, None)

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def renew_now(self) -> None:
        with self._lock:
            by_target: dict[tuple[str, int, str], list[str]] = {}
            for engine, addrs, rid in self._watched.values():
                for host, port in addrs:
                    by_target.setdefault((host, port, engine), []).append(rid)
        for (host, port, engine), rids in by_target.items():
            if self._stop.is_set():
                return
            for i in range(0, len(rids), MAX_HOLD_IDS):
                try:
                    self._client.request(
                        host,
                        port,
                        Hold(engine_id=engine, request_ids=rids[i : i + MAX_HOLD_IDS], requester=self.engine_id),
                    )
                except Exception as exc:
                    log.debug("mooncake: hold renewal at %s:%d failed: %s", host, port, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.renew_now()

    def close(self) -> None:
        """Stop renewing and close the client (the renewer owns it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._client.timeout_s + 1)  # renew_now stops between targets
        self._client.close()


@dataclass
class _Source:
    pool: ThreadPoolExecutor
    inflight: int = 0
    layout: Layout | None = None
    failing: str = ""  # went silent at its last fetch ('' once it answers): queued requests past the deadline skip it


__all__ = ["Ack", "HoldRenewer", "KVSink", "KVSource", "RecvResult", "Reject", "SourceRef"]
