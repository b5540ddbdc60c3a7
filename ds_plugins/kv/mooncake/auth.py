"""Authentication of the side channel: every message sealed with an HMAC under a shared secret.

On the wire each message is a `Sealed` envelope (msgspec msgpack) around the encoded message:

  request  mac = HMAC-SHA256(secret, "dsp-mooncake-1/request" | time | nonce | body)
  answer   mac = HMAC-SHA256(secret, "dsp-mooncake-1/answer" | request nonce | nonce | body)

A receiver with a secret opens nothing it has not verified (hmac.compare_digest). A request's time
must be within MAX_SKEW_S of the receiver's clock (hosts keep time with NTP) and its nonce unseen in
that window, so a captured message cannot be sent again; an answer is bound to its request's nonce,
so a sink trusts only an answer from a holder of the secret to the request it just sent (a forged
`remote_host` pointing at someone else's server cannot hand it a layout to read from).

Without a secret the envelope carries no mac and every message is accepted (the operator was warned
at start-up); a side with a secret never accepts an unsealed message, in either direction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

MAX_SKEW_S = 60.0  # a request older or newer than this (receiver's clock) is refused
MAX_NONCES = 1 << 18  # nonces remembered per receiver (verified requests only); beyond: refused
NONCE_BYTES = 16
MIN_SECRET_BYTES = 16
_REQUEST = b"dsp-mooncake-1/request\0"
_ANSWER = b"dsp-mooncake-1/answer\0"


class Sealed(msgspec.Struct, array_like=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    time: float
    nonce: bytes
    body: bytes
    mac: bytes = b""


class NotAuthenticated(ValueError):
    """A message whose mac is missing, wrong, stale or replayed; the text says which (never the secret)."""


_envelope = msgspec.msgpack.Encoder()
_sealed = msgspec.msgpack.Decoder(Sealed)


class Authenticator:
    def __init__(self, secret: bytes | None, clock: Callable[[], float] = time.time):
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the shared secret must be at least {MIN_SECRET_BYTES} bytes")
        self._key, self._clock = secret, clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> request time, oldest first
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"".join(parts), hashlib.sha256).digest() if self._key else b""

    # ---------------------------------------------------------------- sender side

    def seal_request(self, body: bytes) -> tuple[bytes, bytes]:
        """(wire bytes, nonce): keep the nonce to open the answer."""
        now, nonce = self._clock(), secrets.token_bytes(NONCE_BYTES)
        mac = self._mac(_REQUEST, struct.pack(">d", now), nonce, body)
        return _envelope.encode(Sealed(now, nonce, body, mac)), nonce

    def open_answer(self, data: bytes, request_nonce: bytes) -> bytes:
        env = _decode(data)
        if self._key is not None:
            want = self._mac(_ANSWER, request_nonce, env.nonce, env.body)
            if not env.mac or not hmac.compare_digest(env.mac, want):
                raise NotAuthenticated(
                    "the answer is not authenticated by the shared secret (the peer has no secret or another one)"
                    if not env.mac
                    else "the answer's authentication does not match (another secret, or not "
                    "the answer to this request)"
                )
        return env.body

    # ---------------------------------------------------------------- receiver side

    def open_request(self, data: bytes) -> tuple[bytes, bytes]:
        """(body, nonce) of a verified, fresh, first-seen request; NotAuthenticated otherwise."""
        env = _decode(data)
        if self._key is None:
            return env.body, env.nonce
        if not env.mac:
            raise NotAuthenticated("unauthenticated message (the peer has no shared secret)")
        want = self._mac(_REQUEST, struct.pack(">d", env.time), env.nonce, env.body)
        if not hmac.compare_digest(env.mac, want):
            raise NotAuthenticated("authentication does not match (another shared secret)")
        now = self._clock()
        if abs(now - env.time) > MAX_SKEW_S:
            raise NotAuthenticated(
                f"request time is {now - env.time:+.0f} s off this host's clock "
                f"(more than {MAX_SKEW_S:g} s: stale, replayed, or clocks not in sync)"
            )
        with self._lock:
            # A nonce must be remembered while its request's time is within the window (until then a
            # copy would pass the time check); arrival order is close to time order, and an entry kept
            # past its window only costs memory, so only the oldest are looked at.
            while self._seen and next(iter(self._seen.values())) < now - MAX_SKEW_S:
                self._seen.popitem(last=False)
            if env.nonce in self._seen:
                raise NotAuthenticated("replayed request (nonce already seen)")
            if len(self._seen) >= MAX_NONCES:  # forgetting a live nonce would let its copy through
                raise NotAuthenticated(f"more than {MAX_NONCES} requests within {MAX_SKEW_S:g} s; refused")
            self._seen[env.nonce] = env.time
        return env.body, env.nonce

    def seal_answer(self, body: bytes, request_nonce: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return _envelope.encode(Sealed(self._clock(), nonce, body, self._mac(_ANSWER, request_nonce, nonce, body)))

    @staticmethod
    def unsealed(body: bytes) -> bytes:
        """An answer without a mac (a refusal to a peer that could not be authenticated)."""
        return _envelope.encode(Sealed(0.0, b"", body))


def _decode(data: bytes) -> Sealed:
    try:
        return _sealed.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NotAuthenticated(f"not a sealed message ({len(data)} bytes): {exc}") from None
