"""The transfer core between two processes over real mooncake TCP: byte-exact, and failing cleanly.

Source and sink are separate child processes (tests/kv/peer_script.py), each with its own
TransferEngine on 127.0.0.1; the sink checks every block it received against the source's bytes.
"""

from __future__ import annotations

import json
import signal
import time

import zmq

from ds_plugins.kv.mooncake import messages
from ds_plugins.kv.mooncake.auth import Authenticator
from tests.frozen import freeze
from tests.kv.conftest import HERE, V4_LAYOUT, free_port

SCRIPT = HERE / "peer_script.py"

# Per KV group, the sink's blocks and, position by position, the source's. Group 1 is the sliding-window
# group: its leading positions are null (0) on both sides, as vLLM's hybrid manager leaves them.
REQ_A = {"local": [[3, 4, 5, 9], [0, 0, 6, 7], [1, 2, 3, 4]], "remote": [[10, 11, 12, 2], [0, 0, 8, 9], [5, 6, 7, 15]]}


def start(spawn, role: str, **spec):
    child = spawn(SCRIPT, json.dumps({"role": role, "layout": V4_LAYOUT, **spec}))
    return child, child.expect("ready")


def test_v4_groups_move_byte_exact_and_both_sides_release(spawn):
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=7, expose=["a", "b"])
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=7, source_engine_id="p0")

    sink.send(op="fetch", request_id="a", port=port, **REQ_A)
    a = sink.expect("result")
    assert a["ok"], a
    assert a["check"]["mismatched"] == [] and a["check"]["dirty"] == [], a["check"]
    # 4 + 2 + 4 positions with a block on both sides, each in 2 layers
    assert a["check"]["filled_blocks"] == (4 + 2 + 4) * 2
    assert a["nbytes"] == 2 * (4 * 37376 + 2 * 37376 + 4 * 8448)
    assert src.expect("finished")["request_id"] == "a"

    # A source position that is null under a real sink block cannot be filled: reported, not invented.
    sink.send(op="fetch", request_id="b", port=port, local=[[13], [14, 15], [8]], remote=[[1], [0, 4], [9]])
    b = sink.expect("result")
    assert b["ok"] and b["failed_blocks"] == [14], b
    assert b["check"]["mismatched"] == [], b["check"]
    assert src.expect("finished")["request_id"] == "b"

    for child in (sink, src):
        child.send(op="quit")
        closed = child.expect("closed")
        assert closed["registered"] == 0 and closed["threads"] == [], closed
        assert child.wait() == 0, child.tail()
    assert closed["pending"] == [] and closed["rejected"] == 0


class RawPeer:
    """A hand-driven client of a source's handshake socket: sends bytes, reads the sealed answer."""

    def __init__(self, port: int, secret: bytes | None = None, clock=time.time):
        self.port, self.auth = port, Authenticator(secret, clock=clock)
        self.ctx = zmq.Context()

    def send_raw(self, wire: bytes) -> bytes:
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{self.port}")
        s.send(wire)
        assert s.poll(5000), "source did not answer"
        data = s.recv()
        s.close()
        return data

    def ask(self, payload: bytes):
        wire, nonce = self.auth.seal_request(payload)
        return self.open(self.send_raw(wire), nonce)

    def open(self, data: bytes, nonce: bytes):
        return messages.decode_from_source(self.auth.open_answer(data, nonce))

    def close(self) -> None:
        self.ctx.term()


def bare(data: bytes):
    """An answer opened without checking its authentication (what a stranger gets to see)."""
    return messages.decode_from_source(Authenticator(None).open_answer(data, b""))


def test_malformed_and_unknown_messages_are_rejected_and_source_keeps_serving(spawn):
    port = free_port()
    src, ready = start(spawn, "source", engine_id="p0", port=port, seed=1, expose=["r1"])
    peer = RawPeer(port)
    try:
        bad = peer.ask(b"\x93garbage that is not msgpack of a known message")
        assert isinstance(bad, messages.Reject) and "malformed" in bad.reason
        pickled = peer.ask(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")  # a pickle stream: never unpickled
        assert isinstance(pickled, messages.Reject)
        wrong = peer.ask(messages.encode(messages.GetLayout(engine_id="p9", requester="x")))
        assert isinstance(wrong, messages.Reject) and "unknown engine id 'p9'" in wrong.reason
        stray = peer.ask(messages.encode(messages.Done(engine_id="p0", request_id="nope", ok=True)))
        assert isinstance(stray, messages.Reject) and "unknown request 'nope'" in stray.reason
        # Not even an envelope: refused before anything is read.
        unsealed = bare(peer.send_raw(messages.encode(messages.GetLayout(engine_id="p0"))))
        assert isinstance(unsealed, messages.Reject) and unsealed.reason.startswith("refused")
        good = peer.ask(messages.encode(messages.GetLayout(engine_id="p0", requester="x")))
        assert isinstance(good, messages.Layout) and good.session == ready["session"]
        assert [len(g) for g in good.groups] == [2, 2, 2]
        done = peer.ask(messages.encode(messages.Done(engine_id="p0", request_id="r1", ok=True)))
        assert isinstance(done, messages.Ack)
    finally:
        peer.close()
    assert src.expect("finished")["request_id"] == "r1"
    src.send(op="quit")
    closed = src.expect("closed")
    assert closed["rejected"] == 5 and closed["refused"] == 1 and closed["registered"] == 0 and closed["threads"] == []
    assert src.wait() == 0
    assert "rejected a malformed message" in src.tail()


SECRET = "s3cret-shared-by-p-and-d-0123456789"


def test_side_channel_needs_the_shared_secret_and_discloses_nothing_before(spawn):
    """A source with a secret: a stranger (no secret, another secret, a replayed or stale copy of a
    good request) gets one bare refusal, never the layout, and cannot release a held request; a
    sink with the secret still reads; each refusing address is logged once."""
    port = free_port()
    src, ready = start(spawn, "source", engine_id="p0", port=port, seed=2, expose=["held"], secret=SECRET)
    get = messages.encode(messages.GetLayout(engine_id="p0", requester="x"))
    release = messages.encode(messages.Done(engine_id="p0", request_id="held", ok=False, error="forged"))
    stranger, other, friend = (
        RawPeer(port),
        RawPeer(port, b"another-secret-of-enough-length"),
        RawPeer(port, SECRET.encode()),
    )
    late = RawPeer(port, SECRET.encode(), clock=lambda: time.time() - 600)
    try:
        answers = []
        for peer in (stranger, other, late):
            for payload in (get, release):
                wire, _ = peer.auth.seal_request(payload)
                answers.append(peer.send_raw(wire))
        wire, nonce = friend.auth.seal_request(get)
        first = friend.open(friend.send_raw(wire), nonce)
        assert isinstance(first, messages.Layout) and first.session == ready["session"]
        answers.append(friend.send_raw(wire))  # the same request again: a replay
        for data in answers:
            reply = bare(data)
            assert isinstance(reply, messages.Reject) and reply.reason.startswith("refused"), reply
            # Nothing about this source in a refusal: no engine id, no session, no address.
            assert b"p0" not in data and ready["session"].encode() not in data
    finally:
        for peer in (stranger, other, late, friend):
            peer.close()
    # "held" is still held: the real sink (with the secret) reads it and the source frees it then.
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=2, source_engine_id="p0", secret=SECRET)
    sink.send(op="fetch", request_id="held", port=port, **REQ_A)
    res = sink.expect("result")
    assert res["ok"] and res["check"]["mismatched"] == [], res
    fin = src.expect("finished")
    assert fin["request_id"] == "held" and fin["failed"] is None
    src.send(op="quit")
    closed = src.expect("closed")
    assert closed["refused"] == 7 and closed["pending"] == []
    assert src.tail().count("refused 127.0.0.1") == 1, src.tail()


def test_sink_and_source_with_different_secrets_fail_the_request_clearly(spawn):
    port, port2 = free_port(), free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=6, expose=["a"], secret=SECRET)
    open_src, _ = start(spawn, "source", engine_id="p1", port=port2, seed=6, expose=["b"])
    plain, _ = start(spawn, "sink", engine_id="d0", source_seed=6, source_engine_id="p0")
    plain.send(op="fetch", request_id="a", port=port, **REQ_A)
    res = plain.expect("result")
    assert not res["ok"] and "same shared secret" in res["error"], res
    assert res["check"]["dirty"] == []
    # A sink with a secret trusts no answer without it: a source without one (or an impostor on a
    # forged remote_host) cannot hand it a layout to read.
    sealed, _ = start(spawn, "sink", engine_id="d1", source_seed=6, source_engine_id="p1", secret=SECRET)
    sealed.send(op="fetch", request_id="b", port=port2, engine_id="p1", **REQ_A)
    res = sealed.expect("result")
    assert not res["ok"] and "without valid authentication" in res["error"], res
    assert res["check"]["dirty"] == []


def test_allowed_peers_limit_both_sides(spawn):
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=8, expose=["a"], allowed=["10.9.0.0/16"])
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=8, source_engine_id="p0")
    sink.send(op="fetch", request_id="a", port=port, **REQ_A)
    res = sink.expect("result")
    assert not res["ok"] and "refused" in res["error"], res
    # A sink whose list lacks the source's address never connects to it.
    fenced, _ = start(spawn, "sink", engine_id="d1", source_seed=8, source_engine_id="p0", allowed=["10.0.0.0/8"])
    fenced.send(op="fetch", request_id="a", port=port, **REQ_A)
    res = fenced.expect("result")
    assert not res["ok"] and "PeerNotAllowed" in res["error"] and "127.0.0.1 is not in allowed_peers" in res["error"]
    src.send(op="quit")
    closed = src.expect("closed")
    assert closed["refused"] == 2 and closed["pending"] == ["a"]  # the fenced sink's Done never left it either
    assert "address not in allowed_peers (10.9.0.0/16)" in src.tail()


def test_sink_asking_for_an_unknown_engine_fails_the_request_without_touching_memory(spawn):
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=3, expose=["a"], abort_timeout_s=30)
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=3, source_engine_id="p0")
    sink.send(op="fetch", request_id="a", port=port, engine_id="p-other", **REQ_A)
    res = sink.expect("result")
    assert not res["ok"] and "unknown engine id 'p-other'" in res["error"]
    assert res["failed_blocks"] == sorted({b for g in REQ_A["local"] for b in g if b})
    assert res["check"]["dirty"] == [], "nothing may be written for a rejected request"
    # The source still holds "a" for its real sink.
    sink.send(op="fetch", request_id="a", port=port, **REQ_A)
    assert sink.expect("result")["ok"]
    assert src.expect("finished")["request_id"] == "a"


def test_stalled_source_times_out_and_both_sides_free(spawn):
    """Source frozen (SIGSTOP) during the read: the sink fails the request within the engine timeout
    (5 s, mooncake's minimum) plus the handshake timeout, and the source, once resumed, frees the
    blocks (on the sink's late failure notice, or else at its abort timeout)."""
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=5, expose=["warm", "x"], abort_timeout_s=8)
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=5, source_engine_id="p0", handshake_timeout_s=1)
    sink.send(op="fetch", request_id="warm", port=port, **REQ_A)  # layout cached, connection open
    assert sink.expect("result")["ok"]
    assert src.expect("finished")["request_id"] == "warm"

    freeze(src.proc.pid)
    try:
        t0 = time.monotonic()
        sink.send(op="fetch", request_id="x", port=port, **REQ_A)
        res = sink.expect("result", timeout=25)
        elapsed = time.monotonic() - t0
    finally:
        src.proc.send_signal(signal.SIGCONT)
    assert not res["ok"] and "rc=" in res["error"], res
    assert 4 <= elapsed < 15, elapsed
    assert res["failed_blocks"] == sorted({b for g in REQ_A["local"] for b in g if b})
    fin = src.expect("finished", timeout=15)
    # Freed either by the sink's failure notice (queued in the socket while the source was frozen and
    # read after it resumed) or, had that been lost, by the abort timeout: never left pinned.
    assert fin["request_id"] == "x" and (fin["failed"] is None or "rc=-1" in fin["failed"]), fin
    sink.send(op="quit")
    closed = sink.expect("closed")
    assert closed == {"event": "closed", "inflight": 0, "open_sockets": 0, "registered": 0, "threads": [], "sources": 1}


def test_source_killed_mid_transfer_fails_the_request_promptly(spawn):
    """Source stalled inside a read, then killed: the read fails at once on the reset connection."""
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=9, expose=["warm", "x"])
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=9, source_engine_id="p0", handshake_timeout_s=1)
    sink.send(op="fetch", request_id="warm", port=port, **REQ_A)
    assert sink.expect("result")["ok"]
    freeze(src.proc.pid)
    t0 = time.monotonic()
    sink.send(op="fetch", request_id="x", port=port, **REQ_A)
    time.sleep(0.5)  # the read is now in flight against a frozen peer
    src.kill()
    res = sink.expect("result", timeout=25)
    assert not res["ok"] and res["failed_blocks"], res
    assert time.monotonic() - t0 < 10
    # The sink keeps working for other sources after losing one.
    port2 = free_port()
    src2, _ = start(spawn, "source", engine_id="p1", port=port2, seed=9, expose=["y"])
    sink.send(op="fetch", request_id="y", port=port2, engine_id="p1", **REQ_A)
    y = sink.expect("result")
    assert y["ok"] and y["check"]["mismatched"] == [], y
    sink.send(op="quit")
    closed = sink.expect("closed")
    assert closed["inflight"] == 0 and closed["open_sockets"] == 0 and closed["registered"] == 0


def test_read_of_blocks_the_source_no_longer_holds_does_not_count(spawn):
    """The source freed the request (here: its hold expired) before the sink's Done: the sink's read
    went through (the memory is still registered), but the source answers Done with "unknown request",
    so the blocks may have been reused under the read and the result is a failure, not silent wrong KV."""
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=4, expose=["late"], abort_timeout_s=0.3)
    assert src.expect("finished", timeout=10)["request_id"] == "late"  # expired and freed at the source
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=4, source_engine_id="p0")
    sink.send(op="fetch", request_id="late", port=port, **REQ_A)
    res = sink.expect("result")
    assert not res["ok"] and "did not confirm" in res["error"] and "unknown request 'late'" in res["error"], res
    assert res["failed_blocks"] == sorted({b for g in REQ_A["local"] for b in g if b})
    sink.send(op="quit")
    assert sink.expect("closed")["inflight"] == 0


def test_a_stalled_source_does_not_delay_reads_from_a_healthy_one(spawn):
    """Each source address has its own workers: with every worker for a frozen source busy (the
    sink runs 2 per source), a read from a healthy source still completes at once."""
    stalled_port, healthy_port = free_port(), free_port()
    stalled, _ = start(
        spawn,
        "source",
        engine_id="p0",
        port=stalled_port,
        seed=5,
        expose=["warm", "s1", "s2", "s3"],
        abort_timeout_s=30,
    )
    healthy, _ = start(spawn, "source", engine_id="p1", port=healthy_port, seed=5, expose=["h"])
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=5, source_engine_id="p0", handshake_timeout_s=1)
    sink.send(op="fetch", request_id="warm", port=stalled_port, **REQ_A)
    assert sink.expect("result")["ok"]
    freeze(stalled.proc.pid)
    try:
        for rid in ("s1", "s2", "s3"):
            sink.send(op="fetch", request_id=rid, port=stalled_port, wait=False, **REQ_A)
        time.sleep(0.3)  # the stalled reads hold their workers now
        t0 = time.monotonic()
        sink.send(op="fetch", request_id="h", port=healthy_port, engine_id="p1", wait=False, **REQ_A)
        h = sink.expect("result", timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    assert h["request_id"] == "h" and h["ok"], h
    assert elapsed < 2.0, f"healthy read took {elapsed:.1f} s behind a stalled source"
    stuck = [sink.expect("result", timeout=30) for _ in range(3)]
    # The stall was shorter than the transfer timeout: each stalled read ends either way, never lost.
    assert sorted(r["request_id"] for r in stuck) == ["s1", "s2", "s3"]
    assert all(r["check"]["mismatched"] == [] for r in stuck if r["ok"]), stuck
    sink.send(op="quit")
    closed = sink.expect("closed")
    assert closed["inflight"] == 0 and closed["threads"] == [], closed


def test_ipv6_side_channel(spawn):
    port = free_port()
    src, ready = start(spawn, "source", engine_id="p0", port=port, seed=12, expose=["a"], host="::1")
    assert ready["port"] == port
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=12, source_engine_id="p0")
    sink.send(op="fetch", request_id="a", port=port, host="::1", **REQ_A)
    res = sink.expect("result")
    assert res["ok"] and res["check"]["mismatched"] == [], res
    assert src.expect("finished")["request_id"] == "a"


def test_tp_mismatch_is_refused_at_the_handshake(spawn):
    """The source (TP 2, configured for decode TP 2) meets a sink at TP 1, and a request naming the
    wrong remote_tp_size: each fails with the mismatch named, before any read."""
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=3, expose=["a", "b"], tp_size=2, decode_tp_size=2)
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=3, source_engine_id="p0", tp_size=1)
    sink.send(op="fetch", request_id="a", port=port, tp_size=2, **REQ_A)
    res = sink.expect("result")
    assert not res["ok"] and "TP mismatch: the sink runs decode tp_size 1" in res["error"], res
    assert res["check"]["dirty"] == []
    sink2, _ = start(spawn, "sink", engine_id="d1", source_seed=3, source_engine_id="p0", tp_size=2)
    sink2.send(op="fetch", request_id="b", port=port, tp_size=4, **REQ_A)
    res = sink2.expect("result")
    assert (
        not res["ok"]
        and "remote_tp_size 4, the prefill at 127.0.0.1" in res["error"]
        and "runs tp_size 2" in res["error"]
    ), res
    assert res["check"]["dirty"] == []


def test_sink_keeps_a_bounded_number_of_sources(spawn):
    """Requests naming many distinct sources (here: ports nobody listens on) leave at most
    MAX_SOURCES idle per-source pools behind, not one per address ever seen."""
    from ds_plugins.kv.mooncake.peers import MAX_SOURCES

    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=1, source_engine_id="p0", handshake_timeout_s=0.2)
    ports = [free_port() for _ in range(MAX_SOURCES + 6)]
    for i, port in enumerate(ports):
        sink.send(op="fetch", request_id=f"r{i}", port=port, wait=False, local=[[1], [1], [1]], remote=[[1], [1], [1]])
    results = [sink.expect("result", timeout=30) for _ in ports]
    assert not any(r["ok"] for r in results) and all("PeerTimeout" in r["error"] for r in results), results[:2]
    sink.send(op="fetch", request_id="last", port=ports[0], local=[[1], [1], [1]], remote=[[1], [1], [1]])
    sink.expect("result", timeout=10)
    sink.send(op="quit")
    closed = sink.expect("closed")
    assert closed["sources"] <= MAX_SOURCES and closed["inflight"] == 0 and closed["threads"] == [], closed


def test_hold_renewed_by_the_decode_side_outlives_the_abort_timeout(spawn):
    """A request waits at D longer than P's abort_timeout_s (0.6 s here): D's HoldRenewer keeps it held,
    so the read that finally comes is confirmed; a request nobody renews expires and its read fails."""
    from ds_plugins.kv.mooncake.handshake import HandshakeClient
    from ds_plugins.kv.mooncake.peers import HoldRenewer

    port = free_port()
    src, _ = start(
        spawn,
        "source",
        engine_id="p0",
        port=port,
        seed=10,
        expose=["kept", "dropped"],
        abort_timeout_s=0.6,
        secret=SECRET,
    )
    renewer = HoldRenewer(HandshakeClient(1, auth=Authenticator(SECRET.encode())), "d0", interval_s=0.15)
    try:
        renewer.watch("d-kept", "p0", [("127.0.0.1", port)], "kept")
        fin = src.expect("finished", timeout=10)
        assert fin["request_id"] == "dropped"  # not renewed: freed at its timeout
        time.sleep(1.0)  # well past the timeout: "kept" is still held
        sink, _ = start(spawn, "sink", engine_id="d0", source_seed=10, source_engine_id="p0", secret=SECRET)
        sink.send(op="fetch", request_id="kept", port=port, **REQ_A)
        res = sink.expect("result")
        assert res["ok"] and res["check"]["mismatched"] == [], res
        sink.send(op="fetch", request_id="dropped", port=port, **REQ_A)
        res = sink.expect("result")
        assert not res["ok"] and "unknown request 'dropped'" in res["error"], res
    finally:
        renewer.close()
    assert src.expect("finished")["request_id"] == "kept"
    assert renewer.watched == 1  # the scheduler forgets a request at allocation; here nobody did


def test_requests_queued_behind_a_stalled_source_fail_at_once(spawn):
    """Six reads queued for a frozen source with two workers: the first two wait out the timeouts (5 s
    read, 1 s Done); the four queued behind them then fail at once, without contacting the source,
    instead of costing 6 s each (18 s in all). Once the source answers again, reads from it work, and
    it frees every request (the skipped ones at its abort timeout)."""
    port = free_port()
    rids = [f"q{i}" for i in range(6)]
    src, _ = start(
        spawn, "source", engine_id="p0", port=port, seed=13, expose=["warm", "after", *rids], abort_timeout_s=14
    )
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=13, source_engine_id="p0", handshake_timeout_s=1)
    sink.send(op="fetch", request_id="warm", port=port, **REQ_A)
    assert sink.expect("result")["ok"]
    assert src.expect("finished")["request_id"] == "warm"
    freeze(src.proc.pid)
    try:
        t0 = time.monotonic()
        for rid in rids:
            sink.send(op="fetch", request_id=rid, port=port, wait=False, **REQ_A)
        results = [sink.expect("result", timeout=30) for _ in rids]
        elapsed = time.monotonic() - t0
    finally:
        src.proc.send_signal(signal.SIGCONT)
    assert sorted(r["request_id"] for r in results) == rids and not any(r["ok"] for r in results), results
    skipped = [r for r in results if "not tried" in r["error"]]
    assert len(skipped) == 4 and all("whose last fetch failed (PeerTimeout" in r["error"] for r in skipped), results
    assert all(r["failed_blocks"] == sorted({b for g in REQ_A["local"] for b in g if b}) for r in skipped), skipped
    assert elapsed < 11, f"queued reads took {elapsed:.1f} s behind a stalled source"
    sink.send(op="fetch", request_id="after", port=port, **REQ_A)
    after = sink.expect("result")
    assert after["ok"] and after["check"]["mismatched"] == [], after
    freed = {src.expect("finished", timeout=30)["request_id"] for _ in range(len(rids) + 1)}
    assert freed == {"after", *rids}
    sink.send(op="quit")
    closed = sink.expect("closed")
    assert closed["inflight"] == 0 and closed["threads"] == [], closed


def test_source_keeps_a_bounded_number_of_failure_reports(spawn):
    """Sinks reporting failed reads (each a real Done over the side channel) leave at most MAX_FAILED_KEPT
    reports at the source, the latest ones, not one per request ever failed."""
    from ds_plugins.kv.mooncake.peers import MAX_FAILED_KEPT

    port = free_port()
    rids = [f"f{i}" for i in range(MAX_FAILED_KEPT + 10)]
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=1, expose=rids)
    peer = RawPeer(port)
    try:
        for rid in rids:
            ack = peer.ask(messages.encode(messages.Done(engine_id="p0", request_id=rid, ok=False, error="x")))
            assert isinstance(ack, messages.Ack), ack
    finally:
        peer.close()
    src.send(op="quit")
    closed = src.expect("closed", timeout=30)
    assert closed["failed_kept"] == MAX_FAILED_KEPT and closed["pending"] == [], closed
