"""The ZMQ side channel: a source serves its layout and takes release notices; a sink asks.

Server: one ROUTER socket on tcp://host:port, served by one daemon thread that polls with a short
tick so close() returns promptly. Every message is answered, including the bad ones (Reject with the
reason), so a client never waits on a message the server dropped; bad messages are logged.
Client: one REQ socket per peer address, reused; a timeout or error discards the socket (a REQ socket
that missed its reply cannot send again) and raises, so one dead peer costs one timeout per request.
Each object owns its zmq.Context and terminates it on close: a socket left open would block that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from .messages import FromSource, MalformedMessage, Reject, ToSource, decode_from_source, decode_to_source, encode

log = logging.getLogger(__name__)

TICK_MS = 50


class PeerTimeout(TimeoutError):
    """The peer did not answer within the handshake timeout."""


class PeerRejected(RuntimeError):
    """The peer answered with Reject."""


def zmq_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class HandshakeServer:
    def __init__(self, host: str, port: int, handler: Callable[[ToSource], FromSource], name: str = "source"):
        self._handler = handler
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(zmq_address(host, port))
        except zmq.ZMQError as exc:
            self._sock.close()
            self._ctx.term()
            raise OSError(f"mooncake handshake cannot bind {host}:{port} ({exc}); set kv_port/kv_ip "
                          "(or kv_connector_extra_config.host) to a free address") from exc
        self.address = (host, port)
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"mooncake-handshake-{name}-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(TICK_MS):
                continue
            frames = self._sock.recv_multipart()
            envelope, payload = frames[:-1], frames[-1]
            self._sock.send_multipart([*envelope, encode(self._answer(payload))])

    def _answer(self, payload: bytes) -> FromSource:
        try:
            msg = decode_to_source(payload)
        except MalformedMessage as exc:
            self.rejected += 1
            log.warning("mooncake handshake on %s:%d: rejected a malformed message: %s", *self.address, exc)
            return Reject(reason=f"malformed message: {exc}")
        try:
            reply = self._handler(msg)
        except Exception as exc:  # the handler's bug must not kill the thread that frees blocks
            log.exception("mooncake handshake on %s:%d: handler failed on %r", *self.address, msg)
            reply = Reject(reason=f"source error: {type(exc).__name__}: {exc}")
        if isinstance(reply, Reject):
            self.rejected += 1
            log.warning("mooncake handshake on %s:%d: rejected %s: %s", *self.address, type(msg).__name__, reply.reason)
        return reply

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()


class HandshakeClient:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._closed = False

    def request(self, host: str, port: int, msg: msgspec.Struct, timeout_s: float | None = None) -> FromSource:
        """Send one message and wait for its answer; Reject is raised as PeerRejected."""
        addr = zmq_address(host, port)
        with self._guard:
            if self._closed:
                raise RuntimeError("HandshakeClient is closed")
            lock = self._locks.setdefault(addr, threading.Lock())
        with lock:
            sock = self._socket(addr)
            deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
            try:
                sock.send(encode(msg))
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PeerTimeout(f"no answer from {host}:{port} to {type(msg).__name__} "
                                          f"within {self.timeout_s:g} s")
                    if sock.poll(min(left, 0.5) * 1000, zmq.POLLIN):
                        reply = decode_from_source(sock.recv())
                        break
            except BaseException:
                self._drop(addr)
                raise
        if isinstance(reply, Reject):
            raise PeerRejected(f"{host}:{port} rejected {type(msg).__name__}: {reply.reason}")
        return reply

    def _socket(self, addr: str) -> zmq.Socket:
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            self._socks[addr] = sock
        return sock

    def _drop(self, addr: str) -> None:
        sock = self._socks.pop(addr, None)
        if sock is not None:
            sock.close(linger=0)

    @property
    def open_sockets(self) -> int:
        return len(self._socks)

    def close(self) -> None:
        with self._guard:
            self._closed = True
            locks = list(self._locks.values())
        for lock in locks:  # wait for requests in flight (each bounded by its timeout)
            with lock:
                pass
        for addr in list(self._socks):
            self._drop(addr)
        self._ctx.term()
