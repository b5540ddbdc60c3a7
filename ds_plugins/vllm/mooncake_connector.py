"""Mooncake P/D connector for stock vLLM, configured the vllm-ascend way, for DeepSeek-V4's KV groups.

    --kv-transfer-config '{"kv_connector": "MooncakeConnectorV1",
                           "kv_connector_module_path": "ds_plugins.vllm.mooncake_connector",
                           "kv_role": "kv_producer", "kv_port": "30000", "engine_id": "p0",
                           "kv_connector_extra_config": {"prefill": {"dp_size": 1, "tp_size": 1},
                                                         "decode": {"dp_size": 1, "tp_size": 1}}}'

Names. vLLM's factory, when kv_connector_module_path is set, imports that module and takes
`getattr(module, kv_connector)` without consulting its registry (checked in the factory.py of
vLLM 0.28.0 and 0.30.0). So this module answers to the name users already write,
`MooncakeConnectorV1`, and to its own, `DSV4MooncakeConnector` (the class's real name). Nothing is
put into vLLM's registry: there `MooncakeConnectorV1` belongs to vllm-ascend and `MooncakeConnector`
to vLLM itself, and registering a taken name raises.

The classes are built on first access (module __getattr__), so importing this module, e.g. for
`state()` in `ds-plugins doctor`, imports neither vLLM nor torch.

Flow (pull, like vllm-ascend): the proxy sends the prompt to P with {"do_remote_decode": true};
P prefills, keeps the blocks, and returns kv_transfer_params naming its blocks per KV group and its
handshake address; the proxy passes them to D, whose scheduler allocates blocks and whose worker
reads P's blocks with the TransferEngine and tells P to free them. Failures (peer gone, stall past
the timeout, bad answers) report the affected blocks as load errors, so vLLM recomputes them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ds_plugins.kv.mooncake import log_through
from ds_plugins.kv.mooncake.config import MooncakeConfig, source_ranks

# Under vLLM's logger tree, so vLLM's logging configuration applies (the core's records too, below).
log = logging.getLogger("vllm.ds_plugins.mooncake")

MODULE_PATH = __name__  # what users put in kv_connector_module_path
CLASS_NAME = "DSV4MooncakeConnector"
ALIASES = ("MooncakeConnectorV1", CLASS_NAME)
NULL_BLOCK = 0  # vLLM's BlockPool hands out block 0 as the null (padding) block, never to a request
PARAM_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")


def state() -> str:
    """One line for doctor: can this connector run here. Cheap: no torch, no vLLM, no native library load."""
    try:
        version = importlib.metadata.version("mooncake-transfer-engine")
    except importlib.metadata.PackageNotFoundError:
        return "unavailable: mooncake-transfer-engine is not installed (pip install 'ds-plugins[mooncake]')"
    missing = [m for m in ("msgspec", "zmq") if importlib.util.find_spec(m) is None]
    if missing:
        return f"unavailable: mooncake-transfer-engine {version} installed, but {', '.join(missing)} missing"
    libs = _native_libs_missing()
    if libs:
        return (f"unavailable: mooncake-transfer-engine {version} installed, but its engine.so cannot find "
                f"{', '.join(libs)}")
    hcas = _rdma_devices()
    rdma = f"rdma: {len(hcas)} HCA ({', '.join(hcas[:4])})" if hcas else "rdma: no HCA found, would fall back to tcp"
    return f"available: mooncake-transfer-engine {version} (tcp; {rdma})"


def _native_libs_missing() -> list[str]:
    """The engine's undeclared native dependencies the dynamic loader cannot find.

    Only these small libraries are opened (lazily bound, nothing initialised), never the 100 MB engine.so.
    """
    import ctypes
    out = []
    for lib in ("libcudart.so.12", "libcuda.so.1", "libibverbs.so.1"):
        try:
            ctypes.CDLL(lib, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
            continue
        except OSError:
            pass
        if lib == "libcudart.so.12" and _wheel_cudart():
            continue
        try:
            ctypes.CDLL(lib, mode=os.RTLD_LAZY)
        except OSError:
            out.append(lib)
    return out


def _wheel_cudart() -> bool:
    # nvidia-cuda-runtime-cu12 puts libcudart.so.12 in site-packages/nvidia/cuda_runtime/lib, which
    # torch's CUDA 12 builds preload; its presence is as good as the loader finding it.
    spec = importlib.util.find_spec("nvidia")
    return bool(spec and any(os.path.exists(os.path.join(p, "cuda_runtime", "lib", "libcudart.so.12"))
                             for p in spec.submodule_search_locations or ()))


def _rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


# ---------------------------------------------------------------- configuration


def load_config(vllm_config) -> MooncakeConfig:
    """Our settings from vLLM's KVTransferConfig; the handshake host defaults to this machine's IP."""
    kv = vllm_config.kv_transfer_config
    extra = dict(kv.kv_connector_extra_config or {})
    top = {"kv_role": kv.kv_role, "kv_port": kv.kv_port, "engine_id": kv.engine_id,
           "kv_connector_extra_config": extra}
    # KVTransferConfig.kv_ip defaults to 127.0.0.1, which a peer on another node cannot reach:
    # an explicit extra "host" wins, then a non-default kv_ip, then the IP vLLM itself announces.
    if kv.kv_ip and kv.kv_ip != "127.0.0.1":
        top["kv_ip"] = kv.kv_ip
    default_host = "127.0.0.1"
    if "host" not in extra and "kv_ip" not in top:
        from vllm.utils.network_utils import get_ip
        default_host = get_ip()
    return MooncakeConfig.from_mapping(top, default_host=default_host)


# ---------------------------------------------------------------- scheduler -> worker metadata


@dataclass
class RecvSpec:
    """D: fill `local_blocks` (per KV group; NULL_BLOCK where nothing is to be read) from a P request."""
    local_blocks: list[list[int]]
    remote_blocks: list[list[int]]
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int


@dataclass
class MooncakeConnectorMetadata:
    recv: dict[str, RecvSpec] = field(default_factory=dict)
    send: dict[str, list[int]] = field(default_factory=dict)   # P: request -> TP ranks its sinks read


def _params_complete(params: dict | None) -> bool:
    return bool(params) and all(params.get(k) is not None for k in PARAM_KEYS)


def _as_groups(block_ids) -> list[list[int]]:
    # request_finished gets list[int] (one group), request_finished_all_groups tuple[list[int], ...].
    if block_ids and not isinstance(block_ids[0], (list, tuple)):
        return [list(block_ids)]
    return [list(g) for g in block_ids]


class SchedulerSide:
    """The scheduler-process half; plain Python over vLLM's Request/KVCacheBlocks objects."""

    def __init__(self, vllm_config, config: MooncakeConfig):
        self.config = config
        self.dp_rank = vllm_config.parallel_config.data_parallel_rank or 0
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._recv: dict[str, RecvSpec] = {}
        self._send: dict[str, list[int]] = {}

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            if not _params_complete(params):
                log.warning("mooncake: request %s has do_remote_prefill but lacks %s; prefilling locally",
                            request.request_id, [k for k in PARAM_KEYS if params.get(k) is None])
                return 0, False
            count = len(request.prompt_token_ids or ()) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # once: a second call (after the load) must not read again
        if not _params_complete(params):
            return
        if num_external_tokens > 0:
            # Positions already valid here (local prefix-cache hits, which carry a hash) and padding
            # (null) blocks are not read; every other position is filled from the same position at P.
            local = [[NULL_BLOCK if (b.is_null or b.block_hash is not None) else b.block_id for b in group]
                     for group in blocks.blocks]
        else:
            local = [[] for _ in blocks.blocks]  # nothing to read, but P must still be told to free
        self._recv[request.request_id] = self._spec(params, local)

    def _spec(self, params: dict, local: list[list[int]]) -> RecvSpec:
        return RecvSpec(local_blocks=local, remote_blocks=_as_groups(params["remote_block_ids"]),
                        remote_engine_id=str(params["remote_engine_id"]),
                        remote_request_id=str(params["remote_request_id"]),
                        remote_host=str(params["remote_host"]), remote_port=int(params["remote_port"]),
                        remote_tp_size=int(params.get("remote_tp_size") or self.config.prefill.tp_size))

    def build_connector_meta(self, scheduler_output) -> MooncakeConnectorMetadata:
        meta = MooncakeConnectorMetadata(recv=self._recv, send=self._send)
        self._recv, self._send = {}, {}
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            # D, aborted before its blocks were allocated: no read, but P still holds blocks to free.
            params["do_remote_prefill"] = False
            if _params_complete(params):
                self._recv[request.request_id] = self._spec(params, [[] for _ in _as_groups(params["remote_block_ids"])])
            return False, None
        if not params.get("do_remote_decode") or not self.config.is_producer:
            return False, None
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED:
            return False, None  # aborted or stopped: nobody will read these blocks
        groups = _as_groups(block_ids)
        if not any(groups):
            return False, None
        ranks = source_ranks(request.request_id, self.tp_size, self.config.decode.tp_size)
        self._send[request.request_id] = ranks
        return True, {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": self.config.engine_id, "remote_request_id": request.request_id,
            "remote_host": self.config.host, "remote_port": self.config.side_channel_port(self.dp_rank),
            "remote_block_ids": groups, "remote_tp_size": self.tp_size,
        }


# ---------------------------------------------------------------- worker side


def _tp_rank(vllm_config) -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()
    except (AssertionError, ImportError):
        # No TP group (a single-process worker): the worker's rank within its TP group.
        pc = vllm_config.parallel_config
        return pc.rank % pc.tensor_parallel_size


def regions_of(kv_cache_config, kv_caches: dict) -> list[list]:
    """Per KV group, one Region per cache tensor of each of its layers (layer order of the group).

    A layer's cache is either blocks-first (MLA and DeepSeek-V4: [num_blocks, ...]) or K/V-first
    ([2, num_blocks, ...]): the block stride comes from the tensor's own stride, which covers the
    alignment padding V4's layouts carry, and each block's extent is one stride.
    """
    from ds_plugins.kv.mooncake.messages import Region
    num_blocks = kv_cache_config.num_blocks
    groups = []
    for g, spec in enumerate(kv_cache_config.kv_cache_groups):
        regions = []
        for name in spec.layer_names:
            if name not in kv_caches:
                raise KeyError(f"KV group {g}: layer {name!r} has no registered cache tensor")
            t = kv_caches[name]
            parts = [t] if t.shape[0] == num_blocks else ([t[0], t[1]] if t.shape[0] == 2 and t.shape[1] == num_blocks
                                                           else None)
            if parts is None:
                raise ValueError(f"KV group {g} layer {name!r}: cache shape {tuple(t.shape)} has neither "
                                 f"num_blocks={num_blocks} nor (2, num_blocks) leading")
            for p in parts:
                stride = p.stride(0) * p.element_size()
                regions.append(Region(base=p.data_ptr(), block_len=stride, stride=stride, num_blocks=num_blocks))
        groups.append(regions)
    return groups


class WorkerSide:
    def __init__(self, vllm_config, config: MooncakeConfig, kv_cache_config):
        self.config = config
        self.kv_cache_config = kv_cache_config
        self.tp_rank = _tp_rank(vllm_config)
        self.dp_rank = vllm_config.parallel_config.data_parallel_rank or 0
        self.engine = None
        self.source = None
        self.sink = None
        self._load_errors: set[int] = set()

    def register_kv_caches(self, kv_caches: dict) -> None:
        from ds_plugins.kv.mooncake.engine import Engine
        from ds_plugins.kv.mooncake.peers import KVSink, KVSource
        groups = regions_of(self.kv_cache_config, kv_caches)
        cfg = self.config
        self.engine = Engine(cfg.host, cfg.protocol, cfg.device_name, cfg.transfer_timeout_s)
        try:
            if cfg.is_producer:
                self.source = KVSource(self.engine, cfg.engine_id, self.tp_rank, groups, cfg.host,
                                       cfg.handshake_port(self.dp_rank, self.tp_rank), cfg.abort_timeout_s)
            if cfg.is_consumer:
                # kv_both: the source registered the memory already; one registration serves both.
                self.sink = KVSink(self.engine, cfg.engine_id, groups, cfg.handshake_timeout_s, cfg.num_workers,
                                   NULL_BLOCK, register=self.source is None)
        except BaseException:
            self.shutdown()
            raise
        log.info("mooncake: engine %s tp%d registered %d KV groups (%d regions) at %s%s", cfg.engine_id,
                 self.tp_rank, len(groups), sum(len(g) for g in groups), self.engine.session,
                 f", handshake {self.source.address[0]}:{self.source.address[1]}" if self.source else "")

    def start_load_kv(self, meta: MooncakeConnectorMetadata) -> None:
        from ds_plugins.kv.mooncake.peers import SourceRef
        for rid, ranks in meta.send.items():
            if self.source is None:
                continue
            if self.tp_rank in ranks:
                self.source.expose(rid)
            else:
                self.source.release(rid)
        for rid, spec in meta.recv.items():
            if self.sink is None:
                log.error("mooncake: request %s needs a remote read but this worker is not a consumer", rid)
                continue
            src = source_ranks(spec.remote_request_id, spec.remote_tp_size, self.config.decode.tp_size)
            src_rank = src[self.tp_rank % len(src)]
            ref = SourceRef(spec.remote_host, spec.remote_port + src_rank, spec.remote_engine_id,
                            spec.remote_request_id)
            self.sink.fetch(rid, ref, spec.local_blocks, spec.remote_blocks)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        sending = self.source.poll_finished() if self.source else set()
        recving = set()
        if self.sink:
            for res in self.sink.poll():
                recving.add(res.request_id)
                self._load_errors |= res.failed_blocks
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        for part in (self.sink, self.source):
            if part is not None:
                part.close()
        if self.engine is not None:
            self.engine.close()
        self.sink = self.source = self.engine = None


# ---------------------------------------------------------------- the vLLM class, built on first use

_built: dict[str, type] = {}


def _build() -> type:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole, SupportsHMA

    class DSV4MooncakeConnector(KVConnectorBase_V1, SupportsHMA):
        """KVConnectorBase_V1 + SupportsHMA over ds_plugins.kv.mooncake (see the module docstring)."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            log_through(log)
            self.ds_config = load_config(vllm_config)
            self.scheduler_side = self.worker_side = None
            if role == KVConnectorRole.SCHEDULER:
                self.scheduler_side = SchedulerSide(vllm_config, self.ds_config)
            else:
                self.worker_side = WorkerSide(vllm_config, self.ds_config, kv_cache_config)

        # scheduler side
        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

        def build_connector_meta(self, scheduler_output):
            return self.scheduler_side.build_connector_meta(scheduler_output)

        def request_finished(self, request, block_ids):
            return self.scheduler_side.request_finished(request, block_ids)

        def request_finished_all_groups(self, request, block_ids):
            return self.scheduler_side.request_finished(request, block_ids)

        # worker side
        def register_kv_caches(self, kv_caches):
            self.worker_side.register_kv_caches(kv_caches)

        def start_load_kv(self, forward_context, **kwargs):
            meta = self._get_connector_metadata()
            assert isinstance(meta, MooncakeConnectorMetadata), type(meta)
            self.worker_side.start_load_kv(meta)

        def wait_for_layer_load(self, layer_name):
            return None  # whole requests are loaded between steps (asynchronously), not per layer

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            return None  # pull model: P saves nothing, D reads from P's own cache

        def wait_for_save(self):
            return None

        def get_finished(self, finished_req_ids):
            return self.worker_side.get_finished()

        def get_block_ids_with_load_errors(self):
            return self.worker_side.take_load_errors()

        def shutdown(self):
            if self.worker_side is not None:
                self.worker_side.shutdown()

    DSV4MooncakeConnector.__module__ = __name__
    DSV4MooncakeConnector.__qualname__ = CLASS_NAME
    return DSV4MooncakeConnector


def __getattr__(name: str):
    if name in ALIASES:
        if CLASS_NAME not in _built:
            _built[CLASS_NAME] = _build()
        return _built[CLASS_NAME]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
