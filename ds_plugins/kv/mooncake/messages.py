"""The handshake messages, typed: msgspec msgpack with a tag per message, never pickle.

A source (prefill worker) answers two requests:
  GetLayout(engine_id, decode_tp_size)      -> Layout | Reject   the memory the sink will read from
  Done(engine_id, request_id, ok, error)    -> Ack | Reject      the sink is finished: release the blocks
  Hold(engine_id, request_ids)              -> Ack | Reject      renew the hold of requests still queued at D
`engine_id` names the source the sender means to talk to: a source rejects any other, so a request
that reached the wrong instance (stale routing, reused port) cannot release someone else's blocks.
On the wire each message travels sealed (auth.py): authenticated when a shared secret is configured.
"""

from __future__ import annotations

import msgspec


class Region(msgspec.Struct, frozen=True, array_like=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    """One cache tensor of one layer: `num_blocks` blocks of `block_len` bytes, `stride` bytes apart."""

    base: int
    block_len: int
    stride: int
    num_blocks: int


class GetLayout(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    engine_id: str
    requester: str = ""
    decode_tp_size: int = 0  # the sink's TP size (0: not said); a source configured otherwise refuses


class Done(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    engine_id: str
    request_id: str
    ok: bool
    error: str = ""
    requester: str = ""


class Hold(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    """The decode side still means to read these requests (they wait in its queue): keep them longer."""

    engine_id: str
    request_ids: list[str]
    requester: str = ""


class Layout(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    engine_id: str
    tp_rank: int
    session: str  # "host:rpc_port" of the source's TransferEngine
    groups: list[list[Region]]  # per KV cache group, the regions of its layers, in layer order
    tp_size: int = 0  # the source's TP size, checked by the sink against the request's


class Ack(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    pass


class Reject(msgspec.Struct, tag=True):  # type: ignore[call-arg]  # msgspec unseen by mypy
    reason: str


ToSource = GetLayout | Done | Hold
FromSource = Layout | Ack | Reject

_encoder = msgspec.msgpack.Encoder()
_to_source = msgspec.msgpack.Decoder(ToSource)
_from_source = msgspec.msgpack.Decoder(FromSource)


class MalformedMessage(ValueError):
    """Bytes that are not one of the messages above."""


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_source(data: bytes) -> GetLayout | Done | Hold:
    try:
        return _to_source.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a GetLayout/Done/Hold message ({len(data)} bytes): {exc}") from None


def decode_from_source(data: bytes) -> Layout | Ack | Reject:
    try:
        return _from_source.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a Layout/Ack/Reject message ({len(data)} bytes): {exc}") from None
