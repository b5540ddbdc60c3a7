"""Mooncake's TransferEngine, set up the way P/D needs it, with errors that say what failed.

One engine per process (worker): `initialize(host, "P2PHANDSHAKE", protocol, device_name)` needs no
metadata server (peers exchange segment descriptors directly over the engine's RPC port), its
session id is "host:rpc_port", and memory is registered once, up front, for the whole KV cache.

The synchronous batch calls release the GIL and poll until done; the engine bounds them itself with
MC_TRANSFER_TIMEOUT seconds (mooncake enforces at least 5) plus one second per GiB, read once when the
engine object is constructed, so the configured transfer timeout is applied there.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

MIN_TIMEOUT_S = 5  # mooncake clamps MC_TRANSFER_TIMEOUT to at least this


class MooncakeUnavailable(RuntimeError):
    """mooncake-transfer-engine is missing or its native library cannot load."""


class TransferError(RuntimeError):
    """A TransferEngine call returned an error code."""


def load_transfer_engine():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise MooncakeUnavailable(
            f"mooncake-transfer-engine cannot be imported ({exc}); install ds-plugins[mooncake] "
            "(its engine.so also needs libcudart.so.12, libibverbs.so.1 and libcuda.so.1)"
        ) from exc
    return TransferEngine


class Engine:
    def __init__(self, host: str, protocol: str, device_name: str = "", transfer_timeout_s: float = 30.0):
        cls = load_transfer_engine()
        timeout = max(MIN_TIMEOUT_S, math.ceil(transfer_timeout_s))
        with _env_lock:
            old = os.environ.get("MC_TRANSFER_TIMEOUT")
            os.environ["MC_TRANSFER_TIMEOUT"] = str(timeout)
            try:
                self._te = cls()
            finally:
                if old is None:
                    os.environ.pop("MC_TRANSFER_TIMEOUT", None)
                else:
                    os.environ["MC_TRANSFER_TIMEOUT"] = old
        rc = self._te.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransferError(
                f"TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', {protocol!r}, {device_name!r}) returned {rc}"
            )
        self.host, self.protocol, self.timeout_s = host, protocol, timeout
        self.rpc_port = self._te.get_rpc_port()
        self.session = f"{host}:{self.rpc_port}"
        self.registered: list[tuple[int, int]] = []
        self._closed = False

    def register(self, spans: Sequence[tuple[int, int]]) -> None:
        """Register (address, length) spans; they must not overlap (layout.spans() merges them)."""
        if not spans:
            return
        addrs, lens = [a for a, _ in spans], [n for _, n in spans]
        rc = self._te.batch_register_memory(addrs, lens)
        if rc != 0:
            raise TransferError(f"batch_register_memory of {len(spans)} spans ({sum(lens)} B) returned {rc}")
        self.registered.extend(spans)

    def unregister_all(self) -> None:
        if self.registered:
            rc = self._te.batch_unregister_memory([a for a, _ in self.registered])
            if rc != 0:
                log.warning("mooncake: batch_unregister_memory returned %d", rc)
            self.registered.clear()

    def read(self, session: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> None:
        """Copy remote -> local; returns when done or raises (peer gone, timeout, bad address)."""
        if lengths:
            rc = self._te.batch_transfer_sync_read(session, list(local), list(remote), list(lengths))
            if rc != 0:
                raise TransferError(
                    f"read of {len(lengths)} segments ({sum(lengths)} B) from {session} "
                    f"failed (rc={rc}): peer unreachable, stalled past {self.timeout_s} s, "
                    "or addresses not registered there"
                )

    def write(self, session: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> None:
        if lengths:
            rc = self._te.batch_transfer_sync_write(session, list(local), list(remote), list(lengths))
            if rc != 0:
                raise TransferError(
                    f"write of {len(lengths)} segments ({sum(lengths)} B) to {session} failed (rc={rc})"
                )

    @property
    def raw(self):
        """The underlying mooncake.engine.TransferEngine (benchmarks compare against it)."""
        return self._te

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.unregister_all()
        self._te = None


_env_lock = threading.Lock()
