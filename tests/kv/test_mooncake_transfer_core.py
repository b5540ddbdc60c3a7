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
from tests.kv.conftest import HERE, V4_LAYOUT, free_port

SCRIPT = HERE / "peer_script.py"

# Per KV group, the sink's blocks and, position by position, the source's. Group 1 is the sliding-window
# group: its leading positions are null (0) on both sides, as vLLM's hybrid manager leaves them.
REQ_A = {"local": [[3, 4, 5, 9], [0, 0, 6, 7], [1, 2, 3, 4]],
         "remote": [[10, 11, 12, 2], [0, 0, 8, 9], [5, 6, 7, 15]]}


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


def test_malformed_and_unknown_messages_are_rejected_and_source_keeps_serving(spawn):
    port = free_port()
    src, ready = start(spawn, "source", engine_id="p0", port=port, seed=1, expose=["r1"])
    ctx = zmq.Context()
    try:
        def ask(payload: bytes):
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
            s.send(payload)
            assert s.poll(5000), "source did not answer"
            reply = messages.decode_from_source(s.recv())
            s.close()
            return reply

        bad = ask(b"\x93garbage that is not msgpack of a known message")
        assert isinstance(bad, messages.Reject) and "malformed" in bad.reason
        pickled = ask(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")  # a pickle stream: never unpickled
        assert isinstance(pickled, messages.Reject)
        wrong = ask(messages.encode(messages.GetLayout(engine_id="p9", requester="x")))
        assert isinstance(wrong, messages.Reject) and "unknown engine id 'p9'" in wrong.reason
        stray = ask(messages.encode(messages.Done(engine_id="p0", request_id="nope", ok=True)))
        assert isinstance(stray, messages.Reject) and "unknown request 'nope'" in stray.reason
        good = ask(messages.encode(messages.GetLayout(engine_id="p0", requester="x")))
        assert isinstance(good, messages.Layout) and good.session == ready["session"]
        assert [len(g) for g in good.groups] == [2, 2, 2]
        done = ask(messages.encode(messages.Done(engine_id="p0", request_id="r1", ok=True)))
        assert isinstance(done, messages.Ack)
    finally:
        ctx.term()
    assert src.expect("finished")["request_id"] == "r1"
    src.send(op="quit")
    closed = src.expect("closed")
    assert closed["rejected"] == 4 and closed["registered"] == 0 and closed["threads"] == []
    assert src.wait() == 0
    assert "rejected a malformed message" in src.tail()


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

    src.proc.send_signal(signal.SIGSTOP)
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
    assert closed == {"event": "closed", "inflight": 0, "open_sockets": 0, "registered": 0, "threads": []}


def test_source_killed_mid_transfer_fails_the_request_promptly(spawn):
    """Source stalled inside a read, then killed: the read fails at once on the reset connection."""
    port = free_port()
    src, _ = start(spawn, "source", engine_id="p0", port=port, seed=9, expose=["warm", "x"])
    sink, _ = start(spawn, "sink", engine_id="d0", source_seed=9, source_engine_id="p0", handshake_timeout_s=1)
    sink.send(op="fetch", request_id="warm", port=port, **REQ_A)
    assert sink.expect("result")["ok"]
    src.proc.send_signal(signal.SIGSTOP)
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
