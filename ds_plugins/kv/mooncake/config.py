"""Connector settings in the shape vllm-ascend users already write, validated with errors that name the key.

    {"kv_role": "kv_producer"|"kv_consumer"|"kv_both", "kv_port": "30000", "kv_ip": "10.0.0.5",
     "engine_id": "0",
     "kv_connector_extra_config": {"prefill": {"dp_size": 16, "tp_size": 1},
                                   "decode": {"dp_size": 32, "tp_size": 1},
                                   "mooncake_protocol": "rdma", "device_name": "",
                                   "handshake_timeout_s": 5, "transfer_timeout_s": 30,
                                   "abort_timeout_s": 480, "num_workers": 4}}

Ports follow vllm-ascend: each data-parallel rank owns `tp_size` consecutive handshake ports starting
at `kv_port + dp_rank * tp_size`; TP rank t of it listens on that base + t.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("rdma", "tcp", "ascend")
ROLES = {"kv_producer": "producer", "kv_consumer": "consumer", "kv_both": "both"}
EXTRA = "kv_connector_extra_config"


class ConfigError(ValueError):
    """A connector setting is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class Sizes:
    dp_size: int
    tp_size: int


@dataclass(frozen=True)
class MooncakeConfig:
    engine_id: str
    role: str                   # producer | consumer | both
    host: str                   # address the handshake binds and the TransferEngine announces
    port: int                   # kv_port: first handshake port of data-parallel rank 0
    prefill: Sizes
    decode: Sizes
    protocol: str = "rdma"
    device_name: str = ""
    handshake_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0
    abort_timeout_s: float = 480.0
    num_workers: int = 4

    @property
    def is_producer(self) -> bool:
        return self.role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("consumer", "both")

    def side_channel_port(self, dp_rank: int) -> int:
        """First handshake port of a data-parallel rank of this instance (what goes into kv_transfer_params)."""
        return self.port + dp_rank * self.own_sizes.tp_size

    def handshake_port(self, dp_rank: int, tp_rank: int) -> int:
        return self.side_channel_port(dp_rank) + tp_rank

    @property
    def own_sizes(self) -> Sizes:
        return self.decode if self.role == "consumer" else self.prefill

    @classmethod
    def from_mapping(cls, top: Mapping[str, Any], default_host: str = "127.0.0.1") -> MooncakeConfig:
        extra = top.get(EXTRA) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"{EXTRA} must be a mapping, got {type(extra).__name__}")
        role = ROLES.get(str(top.get("kv_role")))
        if role is None:
            raise ConfigError(f"kv_role must be one of {sorted(ROLES)}, got {top.get('kv_role')!r}")
        engine_id = top.get("engine_id")
        if engine_id in (None, ""):
            raise ConfigError("engine_id must be set (each prefill and decode instance needs its own)")
        protocol = str(extra.get("mooncake_protocol", extra.get("protocol", "rdma")))
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{EXTRA}.mooncake_protocol must be one of {PROTOCOLS}, got {protocol!r}")
        prefill = _sizes(extra, "prefill")
        decode = _sizes(extra, "decode")
        if prefill.tp_size < decode.tp_size:
            raise ConfigError(f"{EXTRA}.prefill.tp_size ({prefill.tp_size}) must be >= "
                              f"{EXTRA}.decode.tp_size ({decode.tp_size}): each decode rank reads one prefill rank")
        if prefill.tp_size % decode.tp_size:
            raise ConfigError(f"{EXTRA}.prefill.tp_size ({prefill.tp_size}) must be a multiple of "
                              f"{EXTRA}.decode.tp_size ({decode.tp_size})")
        return cls(
            engine_id=str(engine_id), role=role,
            host=str(extra.get("host") or top.get("kv_ip") or default_host),
            port=_int(top.get("kv_port", 30000), "kv_port", low=1, high=65535),
            prefill=prefill, decode=decode, protocol=protocol,
            device_name=str(extra.get("device_name", "")),
            handshake_timeout_s=_float(extra, "handshake_timeout_s", 5.0),
            transfer_timeout_s=_float(extra, "transfer_timeout_s", 30.0),
            abort_timeout_s=_float(extra, "abort_timeout_s", 480.0),
            num_workers=_int(extra.get("num_workers", 4), f"{EXTRA}.num_workers", low=1, high=256),
        )


def source_ranks(request_id: str, prefill_tp: int, decode_tp: int) -> list[int]:
    """Prefill TP rank read by each decode TP rank, for MLA-style caches (every rank holds the whole latent).

    Equal sizes map rank to rank. Otherwise the ranks are spread over requests by a hash of the request
    id that both sides compute alike (Python's hash() is salted per process, so it cannot be used here);
    prefill ranks not in the list release their blocks at once.
    """
    if prefill_tp == decode_tp:
        return list(range(decode_tp))
    seed = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")
    return random.Random(seed).sample(range(prefill_tp), decode_tp)


def _sizes(extra: Mapping[str, Any], side: str) -> Sizes:
    raw = extra.get(side)
    if raw is None:
        return Sizes(dp_size=1, tp_size=1)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{EXTRA}.{side} must be a mapping with dp_size and tp_size, got {raw!r}")
    unknown = set(raw) - {"dp_size", "tp_size", "pp_size"}
    if unknown:
        raise ConfigError(f"{EXTRA}.{side} has unknown keys {sorted(unknown)}")
    if int(raw.get("pp_size", 1)) != 1:
        raise ConfigError(f"{EXTRA}.{side}.pp_size must be 1 (pipeline-parallel transfer is not implemented)")
    return Sizes(dp_size=_int(raw.get("dp_size", 1), f"{EXTRA}.{side}.dp_size", low=1),
                 tp_size=_int(raw.get("tp_size", 1), f"{EXTRA}.{side}.tp_size", low=1))


def _int(value: Any, key: str, low: int | None = None, high: int | None = None) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if (low is not None and out < low) or (high is not None and out > high):
        raise ConfigError(f"{key} must be in [{low}, {high}], got {out}")
    return out


def _float(extra: Mapping[str, Any], name: str, default: float) -> float:
    value = extra.get(name, default)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{EXTRA}.{name} must be a number of seconds, got {value!r}") from None
    if out <= 0:
        raise ConfigError(f"{EXTRA}.{name} must be > 0, got {out}")
    return out
