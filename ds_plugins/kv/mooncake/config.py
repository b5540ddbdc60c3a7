"""Connector settings in the shape vllm-ascend users already write, validated with errors that name the key.

    {"kv_role": "kv_producer"|"kv_consumer"|"kv_both", "kv_port": "30000", "kv_ip": "10.0.0.5",
     "engine_id": "0",
     "kv_connector_extra_config": {"prefill": {"dp_size": 16, "tp_size": 1},
                                   "decode": {"dp_size": 32, "tp_size": 1},
                                   "mooncake_protocol": "rdma", "device_name": "",
                                   "handshake_timeout_s": 5, "transfer_timeout_s": 30,
                                   "abort_timeout_s": 480, "num_workers": 4,
                                   "auth_secret_file": "/etc/ds-plugins/mooncake.key",
                                   "allowed_peers": ["10.0.0.0/24"]}}

Ports follow vllm-ascend: each data-parallel rank owns `tp_size` consecutive handshake ports starting
at `kv_port + dp_rank * tp_size`; TP rank t of it listens on that base + t.

The side channel's shared secret comes from the file `auth_secret_file` names, else from the
environment variable DS_PLUGINS_MOONCAKE_SECRET; never from the JSON itself, which vLLM logs at
start-up. Without either the channel runs unauthenticated and the connector warns at start-up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ds_plugins import settings

from .auth import MIN_SECRET_BYTES

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
    role: str  # producer | consumer | both
    host: str  # address the handshake binds and the TransferEngine announces
    port: int  # kv_port: first handshake port of data-parallel rank 0
    prefill: Sizes
    decode: Sizes
    protocol: str = "rdma"
    device_name: str = ""
    handshake_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0
    abort_timeout_s: float = 480.0
    num_workers: int = 4
    secret: bytes | None = field(default=None, repr=False)  # None: unauthenticated side channel
    secret_from: str = ""  # where it came from, for the start-up line
    allowed_peers: tuple[str, ...] | None = None  # None: any address

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
    def from_mapping(
        cls, top: Mapping[str, Any], default_host: str = "127.0.0.1", env: Mapping[str, str] | None = None
    ) -> MooncakeConfig:
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
            raise ConfigError(
                f"{EXTRA}.prefill.tp_size ({prefill.tp_size}) must be >= "
                f"{EXTRA}.decode.tp_size ({decode.tp_size}): each decode rank reads one prefill rank"
            )
        if prefill.tp_size % decode.tp_size:
            raise ConfigError(
                f"{EXTRA}.prefill.tp_size ({prefill.tp_size}) must be a multiple of "
                f"{EXTRA}.decode.tp_size ({decode.tp_size})"
            )
        if "auth_secret" in extra:
            raise ConfigError(
                f"{EXTRA}.auth_secret is not accepted (vLLM logs this JSON at start-up): put the "
                f"secret in a file and name it in {EXTRA}.auth_secret_file, or set {SECRET_ENV}"
            )
        secret, secret_from = _secret(extra, env)
        return cls(
            engine_id=str(engine_id),
            role=role,
            host=str(extra.get("host") or top.get("kv_ip") or default_host),
            port=_int(top.get("kv_port", 30000), "kv_port", low=1, high=65535),
            prefill=prefill,
            decode=decode,
            protocol=protocol,
            device_name=str(extra.get("device_name", "")),
            handshake_timeout_s=_float(extra, "handshake_timeout_s", 5.0),
            transfer_timeout_s=_float(extra, "transfer_timeout_s", 30.0),
            abort_timeout_s=_float(extra, "abort_timeout_s", 480.0),
            num_workers=_int(extra.get("num_workers", 4), f"{EXTRA}.num_workers", low=1, high=256),
            secret=secret,
            secret_from=secret_from,
            allowed_peers=_allowed(extra.get("allowed_peers")),
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


SECRET_ENV = "DS_PLUGINS_MOONCAKE_SECRET"


def _secret(extra: Mapping[str, Any], env: Mapping[str, str] | None) -> tuple[bytes | None, str]:
    path = extra.get("auth_secret_file")
    if path not in (None, ""):
        key = f"{EXTRA}.auth_secret_file"
        try:
            with open(str(path), "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path!r} ({exc.strerror or exc})") from None
        where = f"{key} {path}"
    else:
        secret = settings.value(SECRET_ENV, env).encode()
        if not secret:
            return None, ""
        where = SECRET_ENV
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where}: the shared secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)} "
            "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret, where


def _allowed(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    key = f"{EXTRA}.allowed_peers"
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{key} must be a list of addresses, networks or host names, got {raw!r}")
    out = []
    for entry in raw:
        if not isinstance(entry, str) or not entry.strip() or any(c.isspace() for c in entry.strip()):
            raise ConfigError(f"{key} holds {entry!r}, not an address, network or host name")
        entry = entry.strip()
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(f"{key} holds {entry!r}, not a network (e.g. 10.0.0.0/24)") from None
        out.append(entry)
    return tuple(out)


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
    return Sizes(
        dp_size=_int(raw.get("dp_size", 1), f"{EXTRA}.{side}.dp_size", low=1),
        tp_size=_int(raw.get("tp_size", 1), f"{EXTRA}.{side}.tp_size", low=1),
    )


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
