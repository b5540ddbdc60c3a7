"""The ZMQ side channel: a source serves its layout and takes release notices; a sink asks.

Server: one ROUTER socket on tcp://host:port (IPv6 too), served by one daemon thread that polls with
a short tick so close() returns promptly. A message from an address outside `allowed_peers`, or one
that is not authenticated (auth.py), is refused with a bare Reject that tells nothing (no layout, no
engine id) and logged once per address; every other message is answered, including the bad ones
(Reject with the reason), so a client never waits on a message the server dropped. Messages over
MAX_REQUEST_BYTES are dropped by ZMQ (it disconnects the sender) before they are read.
Client: one REQ socket per peer address, reused, at most MAX_PEERS of them (the least recently used
idle one is closed); a timeout or error discards the socket (a REQ socket that missed its reply cannot
send again) and raises, so one dead peer costs one timeout per request.
Each object owns its zmq.Context and terminates it on close: a socket left open would block that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

import msgspec
import zmq

from .allow import AllowList, parse_ip
from .auth import Authenticator, NotAuthenticated
from .messages import FromSource, MalformedMessage, Reject, ToSource, decode_from_source, decode_to_source, encode

log = logging.getLogger(__name__)

TICK_MS = 50
MAX_REQUEST_BYTES = 64 << 10  # GetLayout and Done are a few hundred bytes
MAX_ANSWER_BYTES = 16 << 20  # a Layout: a few regions per layer, 61 layers for V4
MAX_PEERS = 256  # client sockets kept open; more distinct peers reuse the oldest idle slot
MAX_LOGGED_ADDRESSES = 1024  # addresses whose refusals were logged (then: counted only)
CLOSE_WAIT_S = 5.0  # close(): how long to wait for the serving thread (a handler may be slow)
REFUSAL = "refused: not an allowed, authenticated peer"  # all a refused peer learns
HINT = "check that both sides have the same shared secret and allow each other's address"


class PeerTimeout(TimeoutError):
    """The peer did not answer within the handshake timeout."""


class PeerRejected(RuntimeError):
    """The peer answered with Reject."""


class PeerNotAllowed(PermissionError):
    """The address is not in allowed_peers."""


def zmq_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _socket_options(sock: zmq.Socket, host: str, max_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if ":" in host:  # an IPv6 literal: ZMQ sockets are IPv4-only unless told
        sock.setsockopt(zmq.IPV6, 1)


class HandshakeServer:
    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[ToSource], FromSource],
        name: str = "source",
        auth: Authenticator | None = None,
        allowed: AllowList | None = None,
    ):
        self._handler = handler
        self._auth = auth or Authenticator(None)
        self._allowed = allowed or AllowList(None)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        _socket_options(self._sock, host, MAX_REQUEST_BYTES)
        try:
            self._sock.bind(zmq_address(host, port))
        except zmq.ZMQError as exc:
            self._sock.close()
            self._ctx.term()
            raise OSError(
                f"mooncake handshake cannot bind {host}:{port} ({exc}); set "
                "kv_connector_extra_config.host (or kv_ip where vLLM has it) and kv_port to a free "
                "address"
            ) from exc
        self.address = (host, port)
        self.rejected = 0
        self.refused = 0  # of those: not allowed or not authenticated (answered with nothing but the refusal)
        self._logged: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"mooncake-handshake-{name}-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(TICK_MS):
                continue
            frames = self._sock.recv_multipart(copy=False)
            envelope, payload = frames[:-1], frames[-1]
            try:
                peer = cast(str, payload.get("Peer-Address"))  # a str property (zmq types every get as int | str)
            except zmq.ZMQError:
                peer = ""
            self._sock.send_multipart([*envelope, self._answer(payload.bytes, peer)])

    def _refuse(self, peer: str, why: str) -> bytes:
        self.rejected += 1
        self.refused += 1
        if peer not in self._logged and len(self._logged) < MAX_LOGGED_ADDRESSES:
            self._logged.add(peer)
            log.warning(
                "mooncake handshake on %s:%d: refused %s: %s (logged once per address; %d refused so far)",
                *self.address,
                peer or "a peer",
                why,
                self.refused,
            )
        return Authenticator.unsealed(encode(Reject(reason=REFUSAL)))

    def _answer(self, data: bytes, peer: str) -> bytes:
        ip = parse_ip(peer) if peer else None
        if not self._allowed.allows(str(ip) if ip else peer):
            return self._refuse(peer, f"address not in allowed_peers ({self._allowed!r})")
        try:
            payload, nonce = self._auth.open_request(data)
        except NotAuthenticated as exc:
            return self._refuse(peer, str(exc))
        return self._auth.seal_answer(encode(self._reply(payload)), nonce)

    def _reply(self, payload: bytes) -> FromSource:
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
        self._thread.join(timeout=CLOSE_WAIT_S)
        if self._thread.is_alive():
            # Closing a socket another thread is using is undefined in ZMQ: leave both to the process.
            log.warning("mooncake handshake on %s:%d: serving thread did not stop; socket left open", *self.address)
            return
        self._sock.close(linger=0)
        self._ctx.term()


class HandshakeClient:
    def __init__(self, timeout_s: float, auth: Authenticator | None = None, allowed: AllowList | None = None):
        self.timeout_s = timeout_s
        self._auth = auth or Authenticator(None)
        self._allowed = allowed or AllowList(None)
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}
        # Per address: its lock and how many requests hold or wait for it; least recently used first.
        self._peers: OrderedDict[str, list] = OrderedDict()
        self._guard = threading.Lock()
        self._closed = False

    def _acquire(self, addr: str) -> threading.Lock:
        with self._guard:
            if self._closed:
                raise RuntimeError("HandshakeClient is closed")
            entry = self._peers.get(addr)
            if entry is None:
                entry = self._peers[addr] = [threading.Lock(), 0]
            self._peers.move_to_end(addr)
            entry[1] += 1
            if len(self._peers) > MAX_PEERS:
                self._evict_idle()  # after counting this request, so its own entry is not idle
            return entry[0]

    def _evict_idle(self) -> None:
        for old, (lock, users) in list(self._peers.items()):
            if users == 0 and len(self._peers) > MAX_PEERS:
                del self._peers[old]
                self._drop(old)

    def _release(self, addr: str) -> None:
        with self._guard:
            self._peers[addr][1] -= 1

    def request(self, host: str, port: int, msg: msgspec.Struct, timeout_s: float | None = None) -> FromSource:
        """Send one message and wait for its answer; Reject is raised as PeerRejected."""
        if not self._allowed.allows(host):
            raise PeerNotAllowed(f"{host} is not in allowed_peers ({self._allowed!r})")
        addr = zmq_address(host, port)
        lock = self._acquire(addr)
        try:
            with lock:
                sock = self._socket(addr, host)
                deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
                try:
                    wire, nonce = self._auth.seal_request(encode(msg))
                    sock.send(wire)
                    while True:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise PeerTimeout(
                                f"no answer from {host}:{port} to {type(msg).__name__} within {self.timeout_s:g} s"
                            )
                        # pyzmq takes float milliseconds; its stubs say int
                        if sock.poll(min(left, 0.5) * 1000, zmq.POLLIN):
                            data = sock.recv()
                            break
                except BaseException:
                    self._drop(addr)
                    raise
        finally:
            self._release(addr)
        try:
            reply = decode_from_source(self._auth.open_answer(data, nonce))
        except NotAuthenticated as exc:
            # An unauthenticated refusal can only make this request fail, so its reason is shown.
            refusal = _bare_refusal(data)
            raise PeerRejected(
                f"{host}:{port} rejected {type(msg).__name__}: {refusal}; {HINT}"
                if refusal
                else f"{host}:{port} answered {type(msg).__name__} without valid authentication: {exc}"
            ) from None
        if isinstance(reply, Reject):
            hint = f"; {HINT}" if reply.reason == REFUSAL else ""
            raise PeerRejected(f"{host}:{port} rejected {type(msg).__name__}: {reply.reason}{hint}")
        return reply

    def _socket(self, addr: str, host: str) -> zmq.Socket:
        sock = self._socks.get(addr)
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            _socket_options(sock, host, MAX_ANSWER_BYTES)
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

    @property
    def known_peers(self) -> int:
        return len(self._peers)

    def close(self) -> None:
        with self._guard:
            self._closed = True
            locks = [lock for lock, _ in self._peers.values()]
        for lock in locks:  # wait for requests in flight (each bounded by its timeout)
            with lock:
                pass
        for addr in list(self._socks):
            self._drop(addr)
        self._ctx.term()


def _bare_refusal(data: bytes) -> str:
    """The reason of an unsealed Reject (what a source answers a peer it cannot authenticate), else ''."""
    try:
        reply = decode_from_source(Authenticator(None).open_answer(data, b""))
    except (NotAuthenticated, MalformedMessage):
        return ""
    return reply.reason if isinstance(reply, Reject) else ""
