"""The side channel's sockets on their own (real ZMQ, no TransferEngine): message size limit, IPv6,
closing while a handler is still busy."""

from __future__ import annotations

import logging
import threading

import pytest
import zmq

from ds_plugins.kv.mooncake import handshake
from ds_plugins.kv.mooncake.auth import Authenticator
from ds_plugins.kv.mooncake.handshake import MAX_REQUEST_BYTES, HandshakeClient, HandshakeServer
from ds_plugins.kv.mooncake.messages import GetLayout, Layout, Reject, encode
from tests.kv.conftest import free_port


def layout_handler(msg):
    return Layout(engine_id=msg.engine_id, tp_rank=0, session="127.0.0.1:1", groups=[])


def raw_request(port: int, wire: bytes, wait_s: float) -> bytes | None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        s.send(wire)
        return s.recv() if s.poll(wait_s * 1000) else None
    finally:
        s.close()
        ctx.term()


def test_oversized_message_is_dropped_unread_and_the_server_keeps_serving():
    port = free_port()
    server = HandshakeServer("127.0.0.1", port, layout_handler)
    try:
        big, _ = Authenticator(None).seal_request(encode(GetLayout(engine_id="p0", requester="x" * MAX_REQUEST_BYTES)))
        assert len(big) > MAX_REQUEST_BYTES
        assert raw_request(port, big, wait_s=1.0) is None  # ZMQ disconnected the sender: never read or answered
        small, _ = Authenticator(None).seal_request(encode(GetLayout(engine_id="p0", requester="x" * 1000)))
        assert raw_request(port, small, wait_s=5.0) is not None
        assert server.rejected == 0
        client = HandshakeClient(5)
        try:
            assert isinstance(client.request("127.0.0.1", port, GetLayout(engine_id="p0")), Layout)
        finally:
            client.close()
    finally:
        server.close()


def test_ipv6_loopback_bind_and_connect():
    port = free_port()
    server = HandshakeServer("::1", port, layout_handler)
    client = HandshakeClient(5)
    try:
        assert isinstance(client.request("::1", port, GetLayout(engine_id="p0")), Layout)
    finally:
        client.close()
        server.close()


def test_close_leaves_the_socket_to_a_thread_still_in_a_handler(monkeypatch, caplog):
    """close() must not close a socket its serving thread still uses (undefined in ZMQ): it waits,
    then leaves both, saying so; once the handler returns the thread ends on its own."""
    monkeypatch.setattr(handshake, "CLOSE_WAIT_S", 0.3)
    entered, release = threading.Event(), threading.Event()

    def slow(msg):
        entered.set()
        release.wait(10)
        return Reject(reason="late")

    port = free_port()
    server = HandshakeServer("127.0.0.1", port, slow)
    client = HandshakeClient(5)
    asker = threading.Thread(
        target=lambda: pytest.raises(Exception, client.request, "127.0.0.1", port, GetLayout(engine_id="p0"))
    )
    asker.start()
    try:
        assert entered.wait(5)
        with caplog.at_level(logging.WARNING, logger=handshake.__name__):
            server.close()
        assert "serving thread did not stop; socket left open" in caplog.text
        assert not server._sock.closed
    finally:
        release.set()
        asker.join(10)
        client.close()
    server._thread.join(5)
    assert not server._thread.is_alive()
    server._sock.close(linger=0)  # what close() left, now that nobody uses it
    server._ctx.term()
