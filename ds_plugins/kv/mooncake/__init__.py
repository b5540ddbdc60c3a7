"""Transfer core over Mooncake's TransferEngine (PyPI `mooncake-transfer-engine`).

Pull model, as vllm-ascend's MooncakeConnectorV1 does it: the prefill side (the *source*) keeps a
finished prompt's blocks and serves its memory layout over a ZMQ handshake; the decode side (the
*sink*) reads the blocks it needs with the TransferEngine and then tells the source to release them.

  config     the vllm-ascend-shaped settings, validated (kv_port, prefill/decode dp and tp, protocol, timeouts)
  messages   the typed handshake messages (msgspec msgpack; never pickle)
  layout     memory regions per KV group and the block-level transfer plan between two layouts
  engine     the TransferEngine: P2PHANDSHAKE setup, memory registration, batch reads and writes
  handshake  the ZMQ server (source) and client (sink) carrying the messages, with timeouts
  peers      KVSource / KVSink: the request lifecycle on each side (expose, fetch, done, expiry)
"""

import logging

# The core logs under this name (its modules use getLogger(__name__)); an engine adapter sends those
# records on to its engine's logger with `log_through`, so they get the engine's format and handlers.
LOGGER_NAME = __name__


class _Forward(logging.Handler):
    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def log_through(target: logging.Logger) -> None:
    """Send the core's log records to `target` (idempotent; the last target wins)."""
    core = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in core.handlers if isinstance(h, _Forward)]:
        core.removeHandler(handler)
    core.addHandler(_Forward(target))
    core.propagate = False
