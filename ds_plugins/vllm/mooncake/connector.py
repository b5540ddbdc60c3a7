"""Mooncake P/D connector for stock vLLM, configured the vllm-ascend way, for DeepSeek-V4's KV groups.

    --kv-transfer-config '{"kv_connector": "MooncakeConnectorV1",
                           "kv_connector_module_path": "ds_plugins.vllm.mooncake.connector",
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
reads P's blocks with the TransferEngine and tells P to free them. A read counts only once P confirms
it still held the blocks (its answer to "done"). Failures (peer gone, stall past the timeout, bad
answers, unusable kv_transfer_params from the client) are reported per request where vLLM takes that
(KVConnectorTransferResults.failed_recving, 0.30+), so vLLM fails or recomputes that request alone
per kv_load_failure_policy; older vLLM takes only block ids, and only for one KV group, so there a
decode instance of a model with several KV groups (DeepSeek-V4) refuses to start, saying so.

The side channel is authenticated with a shared secret (kv_connector_extra_config.auth_secret_file
or DS_PLUGINS_MOONCAKE_SECRET; see ds_plugins.kv.mooncake.auth) and limited to allowed_peers; without
a secret it runs unauthenticated and says so at start-up. DS_PLUGINS_DISABLE=1 or
DS_PLUGINS_MOONCAKE=off make building the connector fail with an error naming the switch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ds_plugins.kv.mooncake import log_through
from ds_plugins.kv.mooncake.config import MooncakeConfig, source_ranks

if TYPE_CHECKING:  # the transfer classes import msgspec/zmq/mooncake: only when a connector is built
    from ds_plugins.kv.mooncake.engine import Engine
    from ds_plugins.kv.mooncake.peers import HoldRenewer, KVSink, KVSource

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
        return (
            f"unavailable: mooncake-transfer-engine {version} installed, but its engine.so cannot find "
            f"{', '.join(libs)}"
        )
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
    return bool(
        spec
        and any(
            os.path.exists(os.path.join(p, "cuda_runtime", "lib", "libcudart.so.12"))
            for p in spec.submodule_search_locations or ()
        )
    )


def _rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


# ---------------------------------------------------------------- configuration


def check_switches() -> None:
    """DS_PLUGINS_DISABLE=1 / DS_PLUGINS_MOONCAKE=off: refuse to build the connector, naming the switch.

    vLLM loads this module because the user's --kv-transfer-config names it, so "off" cannot mean
    "fall back": vLLM would otherwise run a P/D setup without its connector. A clear error it is.
    """
    from ds_plugins import settings

    if settings.disabled():
        switch = "DS_PLUGINS_DISABLE=1"
    elif settings.value("DS_PLUGINS_MOONCAKE") == "off":
        switch = "DS_PLUGINS_MOONCAKE=off"
    else:
        return
    raise RuntimeError(
        f"ds-plugins' Mooncake connector is switched off ({switch}) but --kv-transfer-config "
        f"names it ({MODULE_PATH}); unset {switch.split('=')[0]} or use another kv_connector"
    )


def load_config(vllm_config) -> MooncakeConfig:
    """Our settings from vLLM's KVTransferConfig; the handshake host defaults to this machine's IP."""
    kv = vllm_config.kv_transfer_config
    extra = dict(kv.kv_connector_extra_config or {})
    top = {"kv_role": kv.kv_role, "kv_port": kv.kv_port, "engine_id": kv.engine_id, "kv_connector_extra_config": extra}
    # KVTransferConfig.kv_ip defaults to 127.0.0.1, which a peer on another node cannot reach:
    # an explicit extra "host" wins, then a non-default kv_ip, then the IP vLLM itself announces.
    # vLLM 0.32 dropped the field (its config forbids unknown keys, so `kv_ip` cannot be passed there).
    kv_ip = getattr(kv, "kv_ip", None)
    if kv_ip and kv_ip != "127.0.0.1":
        top["kv_ip"] = kv_ip
    default_host = "127.0.0.1"
    if "host" not in extra and "kv_ip" not in top:
        from vllm.utils.network_utils import get_ip

        default_host = get_ip()
    return MooncakeConfig.from_mapping(top, default_host=default_host)


# ---------------------------------------------------------------- scheduler -> worker metadata


@dataclass
class RecvSpec:
    """D: fill `local_blocks` (per KV group; NULL_BLOCK where nothing is to be read) from a P request.

    `error` set: the request's kv_transfer_params were unusable; nothing is read and the worker reports
    the load as failed, so vLLM fails or recomputes the request per kv_load_failure_policy.
    """

    local_blocks: list[list[int]]
    remote_blocks: list[list[int]]
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    remote_tp_size: int
    error: str = ""


@dataclass
class MooncakeConnectorMetadata:
    recv: dict[str, RecvSpec] = field(default_factory=dict)
    send: dict[str, list[int]] = field(default_factory=dict)  # P: request -> TP ranks its sinks read


def _as_groups(block_ids) -> list[list[int]]:
    # request_finished gets list[int] (one group), request_finished_all_groups tuple[list[int], ...].
    if block_ids and not isinstance(block_ids[0], (list, tuple)):
        return [list(block_ids)]
    return [list(g) for g in block_ids]


class BadParams(ValueError):
    """kv_transfer_params from the request (any HTTP client can send them) that cannot be used."""


MAX_ID_LEN = 512
MAX_BLOCK_ID = 2**31 - 1


def _int_in(params: dict, key: str, low: int, high: int) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadParams(f"{key} must be an integer in [{low}, {high}], got {value!r}"[:300])
    return value


def _text(params: dict, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LEN:
        raise BadParams(f"{key} must be a non-empty string of at most {MAX_ID_LEN} characters, got {value!r}"[:300])
    return value


def parse_remote(params: dict, num_groups: int | None, num_prompt_tokens: int, decode_tp: int, allowed=None) -> dict:
    """The remote fields of a decode request's kv_transfer_params, checked: types, ranges, sizes, peer.

    Raises BadParams naming the key. `num_groups` is the local KV group count (None: not known);
    each group's block list may not be longer than the prompt (a block holds at least one token);
    `allowed` (an AllowList) bounds remote_host.
    """
    missing = [k for k in PARAM_KEYS if params.get(k) is None]
    if missing:
        raise BadParams(f"do_remote_prefill is set but {missing} are missing")
    blocks = params["remote_block_ids"]
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise BadParams(f"remote_block_ids must be a non-empty list of block id lists, got {type(blocks).__name__}")
    groups = [blocks] if not isinstance(blocks[0], (list, tuple)) else blocks
    if num_groups is not None and len(groups) != num_groups:
        raise BadParams(f"remote_block_ids has {len(groups)} KV groups, this instance has {num_groups}")
    limit = max(num_prompt_tokens, 1)
    skips = params.get("remote_block_skip", [0] * len(groups))
    if (
        not isinstance(skips, (list, tuple))
        or len(skips) != len(groups)
        or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= limit for k in skips)
    ):
        raise BadParams(
            f"remote_block_skip must be one count in [0, {limit}] per KV group of remote_block_ids, got {skips!r}"[:300]
        )
    for g, ids in enumerate(groups):
        if not isinstance(ids, (list, tuple)):
            raise BadParams(f"remote_block_ids[{g}] must be a list of block ids, got {type(ids).__name__}")
        if skips[g] + len(ids) > limit:
            raise BadParams(
                f"remote_block_ids[{g}] covers {skips[g] + len(ids)} blocks, more than the {limit} prompt tokens"
            )
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_BLOCK_ID:
                raise BadParams(f"remote_block_ids[{g}] holds {b!r}, not a block id"[:300])
    tp = params.get("remote_tp_size")
    tp = decode_tp if tp is None else _int_in(params, "remote_tp_size", 1, 1 << 16)
    if tp < decode_tp or tp % decode_tp:
        raise BadParams(f"remote_tp_size {tp} cannot serve decode tp_size {decode_tp} (it must be a multiple)")
    covered = params.get("remote_num_tokens")
    if covered is not None:
        _int_in(params, "remote_num_tokens", 1, max(num_prompt_tokens, 1))
    host = _text(params, "remote_host")
    if len(host) > 255 or any(c.isspace() or c in "/@?#" for c in host):
        raise BadParams(f"remote_host {host!r} is not a host name or address"[:300])
    if allowed is not None and not allowed.allows(host):
        raise BadParams(f"remote_host {host!r} is not in kv_connector_extra_config.allowed_peers ({allowed!r})"[:300])
    return {
        "remote_blocks": [[NULL_BLOCK] * k + list(ids) for k, ids in zip(skips, groups)],
        "remote_engine_id": _text(params, "remote_engine_id"),
        "remote_request_id": _text(params, "remote_request_id"),
        "remote_host": host,
        "remote_port": _int_in(params, "remote_port", 1, 65535),
        "remote_tp_size": tp,
    }


def transfer_group_ids(kv_cache_config) -> tuple[int, ...] | None:
    """The KV cache groups P/D moves: vLLM's own `transfer_group_ids` where it has them (0.30+: not the
    groups it marks `enable_kv_transfer=False`, such as 0.33's host-resident HiSparse groups), else every
    group; None when the config has no groups to say (a scheduler built without one)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if not groups:
        return None
    ids = getattr(kv_cache_config, "transfer_group_ids", None)
    return tuple(ids) if ids is not None else tuple(range(len(groups)))


class SchedulerSide:
    """The scheduler-process half; plain Python over vLLM's Request/KVCacheBlocks objects."""

    def __init__(self, vllm_config, config: MooncakeConfig, kv_cache_config=None, fail_requests: bool = True):
        from ds_plugins.kv.mooncake.allow import AllowList

        self.config = config
        self.dp_rank = vllm_config.parallel_config.data_parallel_rank or 0
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        check_tp(config, self.tp_size)
        self.allowed = AllowList(config.allowed_peers) if config.allowed_peers is not None else None
        self._kv_cache_config = kv_cache_config
        transfer = transfer_group_ids(kv_cache_config)
        self.num_groups = len(transfer) if transfer else None
        # vLLM with KVConnectorTransferResults.failed_recving (0.30+) can fail or recompute one request;
        # older ones only take block ids, so unusable params are prefilled locally there instead.
        self.fail_requests = fail_requests
        if config.is_consumer and not fail_requests and (self.num_groups or 1) > 1:
            # Before failed_recving, vLLM's scheduler maps reported block ids back to requests through one
            # KV group only (`(block_ids,) = get_block_ids(...)`): with several groups the first failed
            # transfer would end the engine. Refused here, where it can be said plainly.
            from ds_plugins.kv.mooncake.config import ConfigError

            raise ConfigError(
                f"this vLLM cannot be told that a KV load failed for a model with {self.num_groups} KV cache "
                "groups (its scheduler takes failed block ids for one group only; failed requests through "
                "KVConnectorTransferResults.failed_recving arrived in vLLM 0.30), so the decode instance would "
                "die at the first transfer fault: use vLLM 0.30 or later for P/D of this model"
            )
        self._recv: dict[str, RecvSpec] = {}
        self._send: dict[str, list[int]] = {}
        self._bad: dict[str, str] = {}  # request id -> why its params were refused (until allocation)
        self._renewer: HoldRenewer | None = None  # made on the first remote prefill seen

    def _check(self, request, finished: bool = False) -> str:
        """'' when the request's remote fields are usable, else the reason (logged once).

        `finished`: from request_finished, where the prompt may no longer be there to bound block counts.
        """
        rid = request.request_id
        if rid in self._bad:
            return self._bad[rid]
        try:
            prompt = (1 << 30) if finished else len(request.prompt_token_ids or ())
            parse_remote(request.kv_transfer_params, self.num_groups, prompt, self.config.decode.tp_size, self.allowed)
            return ""
        except BadParams as exc:
            why = str(exc)
        log.warning(
            "mooncake: request %s: unusable kv_transfer_params (%s); %s",
            rid,
            why,
            "reporting its KV load as failed (kv_load_failure_policy decides)"
            if self.fail_requests
            else "prefilling it locally",
        )
        self._bad[rid] = why
        return why

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if isinstance(params, dict) and params.get("do_remote_prefill"):
            if self._check(request) and not self.fail_requests:
                params["do_remote_prefill"] = False
                self._bad.pop(request.request_id, None)
                return 0, False
            count = self._remote_tokens(request) - num_computed_tokens
            if count > 0:
                if not self._check(request):
                    self._hold(request)
                return count, True
        return 0, False

    def _hold(self, request) -> None:
        """Keep P's blocks held while this request waits here for its blocks (renewed until allocation)."""
        from ds_plugins.kv.mooncake.allow import AllowList
        from ds_plugins.kv.mooncake.auth import Authenticator
        from ds_plugins.kv.mooncake.handshake import HandshakeClient
        from ds_plugins.kv.mooncake.peers import HoldRenewer

        if self._renewer is None:
            cfg = self.config
            client = HandshakeClient(
                cfg.handshake_timeout_s, auth=Authenticator(cfg.secret), allowed=AllowList(cfg.allowed_peers)
            )
            self._renewer = HoldRenewer(client, cfg.engine_id, cfg.abort_timeout_s / 3)
        r = parse_remote(request.kv_transfer_params, self.num_groups, 1 << 30, self.config.decode.tp_size, self.allowed)
        ranks = set(source_ranks(r["remote_request_id"], r["remote_tp_size"], self.config.decode.tp_size))
        self._renewer.watch(
            request.request_id,
            r["remote_engine_id"],
            [(r["remote_host"], r["remote_port"] + k) for k in sorted(ranks)],
            r["remote_request_id"],
        )

    def _unhold(self, request_id: str) -> None:
        if self._renewer is not None:
            self._renewer.forget(request_id)

    @property
    def holding(self) -> int:
        """Requests whose hold at P this side renews (seen, not yet allocated or finished)."""
        return self._renewer.watched if self._renewer is not None else 0

    def shutdown(self) -> None:
        if self._renewer is not None:
            self._renewer.close()
            self._renewer = None

    @staticmethod
    def _remote_tokens(request) -> int:
        """Prompt tokens P's blocks cover: all of them, or fewer when P prefilled a shorter prompt.

        A P that prefilled all but the last prompt token (as vllm-ascend does for models with
        sliding-window or compressed KV) leaves D to compute that token as an ordinary prefill step,
        with its whole attention window in place. Where P covered the whole prompt, vLLM recomputes the
        last token after the load, with its sliding-window blocks allocated for the token after it,
        which at prompt lengths L with (L - window + 1) % block_size == 0 lacks the window's oldest token.
        """
        total = len(request.prompt_token_ids or ())
        covered = request.kv_transfer_params.get("remote_num_tokens")
        if isinstance(covered, int) and not isinstance(covered, bool) and 0 < covered < total:
            return covered
        return total

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # once: a second call (after the load) must not read again
        self._unhold(request.request_id)  # allocated: the read starts now, within P's current hold
        error = self._check(request)
        self._bad.pop(request.request_id, None)
        if error:
            if num_external_tokens > 0:
                self._recv[request.request_id] = _failed_spec(error)
            return
        if num_external_tokens > 0:
            # Positions already valid here (local prefix-cache hits, which carry a hash) and padding
            # (null) blocks are not read; every other position is filled from the same position at P.
            local = [
                [NULL_BLOCK if (b.is_null or b.block_hash is not None) else b.block_id for b in group]
                for group in self._transfer_part(blocks.blocks)
            ]
            if self._remote_tokens(request) < len(request.prompt_token_ids or ()):
                # P covered a shorter prompt: D's blocks past P's (the last token's, which D computes
                # itself) have nothing at P to read. P's lists are as long as the tokens it covered.
                remote = parse_remote(params, self.num_groups, 1 << 30, self.config.decode.tp_size, self.allowed)[
                    "remote_blocks"
                ]
                local = [ids[: len(r)] for ids, r in zip(local, remote)]
        else:
            local = [[] for _ in range(self.num_groups or len(blocks.blocks))]  # nothing to read; P must free
        self._recv[request.request_id] = self._spec(params, local)

    def _transfer_part(self, per_group) -> list:
        """The transfer groups' entries of a list vLLM gives per KV group (its own
        select_transfer_block_ids, 0.30+); a list not one per group is left as it is (vLLM's raises)."""
        per_group = list(per_group)
        select = getattr(self._kv_cache_config, "select_transfer_block_ids", None)
        groups = getattr(self._kv_cache_config, "kv_cache_groups", None) or ()
        if select is None or len(per_group) != len(groups):
            return per_group
        return list(select(per_group))

    def _spec(self, params: dict, local: list[list[int]]) -> RecvSpec:
        remote = parse_remote(params, self.num_groups, 1 << 30, self.config.decode.tp_size, self.allowed)
        return RecvSpec(local_blocks=local, **remote)

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
            self._unhold(request.request_id)
            if not self._check(request, finished=True):
                spec = self._spec(params, [])
                spec.local_blocks = [[] for _ in spec.remote_blocks]
                self._recv[request.request_id] = spec
            self._bad.pop(request.request_id, None)
            return False, None
        if not params.get("do_remote_decode") or not self.config.is_producer:
            return False, None
        if request.status != RequestStatus.FINISHED_LENGTH_CAPPED:
            return False, None  # aborted or stopped: nobody will read these blocks
        groups = self._transfer_part(_as_groups(block_ids))
        if not any(groups):
            return False, None
        ranks = source_ranks(request.request_id, self.tp_size, self.config.decode.tp_size)
        self._send[request.request_id] = ranks
        skip = [next((i for i, b in enumerate(ids) if b != NULL_BLOCK), len(ids)) for ids in groups]
        out = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.config.engine_id,
            "remote_request_id": request.request_id,
            "remote_host": self.config.host,
            "remote_port": self.config.side_channel_port(self.dp_rank),
            "remote_block_ids": [ids[k:] for ids, k in zip(groups, skip)],
            "remote_tp_size": self.tp_size,
        }
        if any(skip):
            # Sliding-window groups (V4: the SWA KV and the compressor states) hold null blocks for every
            # position before the window: sent as a count, as vLLM's own connector clips these lists, so
            # the parameters stay small however long the prompt (V4's ratio-4 state group: a block per 4 tokens).
            out["remote_block_skip"] = skip
        if request.num_computed_tokens > 0:
            out["remote_num_tokens"] = request.num_computed_tokens  # the tokens these blocks hold
        return True, out


def check_tp(config: MooncakeConfig, tp_size: int) -> None:
    """This instance's --tensor-parallel-size against the side of the config it plays (ConfigError)."""
    from ds_plugins.kv.mooncake.config import EXTRA, ConfigError

    sides = ([("prefill", config.prefill)] if config.is_producer else []) + (
        [("decode", config.decode)] if config.is_consumer else []
    )
    for name, sizes in sides:
        if sizes.tp_size != tp_size:
            raise ConfigError(
                f"{EXTRA}.{name}.tp_size is {sizes.tp_size} but this {name} instance runs "
                f"--tensor-parallel-size {tp_size}; they must match (and be the same on every instance)"
            )


def _failed_spec(error: str) -> RecvSpec:
    return RecvSpec(
        local_blocks=[],
        remote_blocks=[],
        remote_engine_id="",
        remote_request_id="",
        remote_host="",
        remote_port=0,
        remote_tp_size=0,
        error=error,
    )


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
    """Per KV group P/D moves (transfer_group_ids), the Regions of its layers' cache tensors (layer order).

    A layer's cache is either blocks-first (MLA and DeepSeek-V4: [num_blocks, ...]) or K/V-first
    ([2, num_blocks, ...]). Block b of a region starts `stride` bytes after block b-1 (the tensor's own
    block stride) and is `block_len` bytes long: only this layer's bytes of the block. The two differ
    wherever vLLM packs several layers' pages into one block (its block-outermost layouts, which V4's
    mixed page sizes get: `KVCacheTensor.block_stride` > `layer_stride`): a block then holds the pages of
    every layer of the tensor side by side, so a read one stride long from layer l's page would also
    overwrite the next block's pages of the layers before l in the sink, with bytes from whatever block
    follows at the source.
    """
    from ds_plugins.kv.mooncake.messages import Region

    num_blocks = kv_cache_config.num_blocks
    groups = []
    for g in transfer_group_ids(kv_cache_config) or ():
        spec = kv_cache_config.kv_cache_groups[g]
        regions: list[Region] = []
        for name in spec.layer_names:
            if name not in kv_caches:
                raise KeyError(f"KV group {g}: layer {name!r} has no registered cache tensor")
            t = kv_caches[name]
            parts = (
                [t]
                if t.shape[0] == num_blocks
                else ([t[0], t[1]] if t.shape[0] == 2 and t.shape[1] == num_blocks else None)
            )
            if parts is None:
                raise ValueError(
                    f"KV group {g} layer {name!r}: cache shape {tuple(t.shape)} has neither "
                    f"num_blocks={num_blocks} nor (2, num_blocks) leading"
                )
            for p in parts:
                pieces = _block_pieces(p, f"KV group {g} layer {name!r}")
                regions.extend(
                    Region(base=b.data_ptr(), block_len=n, stride=b.stride(0) * b.element_size(), num_blocks=num_blocks)
                    for b, n in pieces
                )
        groups.append(regions)
    return groups


def _block_pieces(t, what: str) -> list:
    """(tensor, bytes per block) pieces of a blocks-first tensor, each piece's block one contiguous extent.

    A dimension whose stride is not inside one block (e.g. heads outside blocks in an H-before-B layout)
    splits the tensor into one piece per index of it; what is left of a block spans
    sum((size - 1) * stride) + 1 elements of the inner dimensions, which must fit in one block stride.
    """
    block_stride = t.stride(0)
    for d in range(1, t.dim()):
        if t.size(d) > 1 and t.stride(d) >= block_stride:
            return [piece for i in range(t.size(d)) for piece in _block_pieces(t.select(d, i), what)]
    extent = sum((t.size(d) - 1) * t.stride(d) for d in range(1, t.dim()) if t.size(d) > 0) + 1
    if any(t.stride(d) < 0 for d in range(t.dim())) or extent > block_stride:
        raise ValueError(
            f"{what}: cache strides {tuple(t.stride())} (shape {tuple(t.shape)}) do not keep a "
            "block's bytes inside one block stride; this KV cache layout is not supported"
        )
    return [(t, extent * t.element_size())]


class WorkerSide:
    def __init__(self, vllm_config, config: MooncakeConfig, kv_cache_config):
        self.config = config
        self.kv_cache_config = kv_cache_config
        self.tp_rank = _tp_rank(vllm_config)
        self.dp_rank = vllm_config.parallel_config.data_parallel_rank or 0
        self.engine: Engine | None = None
        self.source: KVSource | None = None
        self.sink: KVSink | None = None
        self._load_errors: set[int] = set()
        self._refused: set[str] = set()  # requests refused before any read (unusable params)
        # Release-only notices (D read nothing: an abort before allocation, vLLM's pre-aborted stand-in
        # for a rejected request, or everything cached here): P is told to free, vLLM is told nothing.
        # Its scheduler has no such request waiting for KV (or none at all) and ends the engine on a
        # finished_recving for it (0.32: `assert req_id in self.requests`).
        self._release_only: set[str] = set()
        self._suspended: list[tuple[int, int]] = []  # spans unregistered for sleep mode

    def register_kv_caches(self, kv_caches: dict) -> None:
        from ds_plugins.kv.mooncake.allow import AllowList
        from ds_plugins.kv.mooncake.auth import Authenticator
        from ds_plugins.kv.mooncake.engine import Engine
        from ds_plugins.kv.mooncake.peers import KVSink, KVSource

        groups = regions_of(self.kv_cache_config, kv_caches)
        cfg = self.config
        if cfg.is_consumer:
            from ds_plugins.kv.amx import allow_amx_tiles

            # A decode instance's first forward can be a decode over loaded KV (see ds_plugins.kv.amx).
            if allow_amx_tiles(kv_caches.values()):
                log.info(
                    "mooncake: asked Linux for AMX tiles for this CPU worker (vLLM's CPU attention uses "
                    "them without asking; a first forward over loaded KV would otherwise end with SIGILL)"
                )
        auth, allowed = Authenticator(cfg.secret), AllowList(cfg.allowed_peers)
        self.engine = Engine(cfg.host, cfg.protocol, cfg.device_name, cfg.transfer_timeout_s)
        try:
            if cfg.is_producer:
                self.source = KVSource(
                    self.engine,
                    cfg.engine_id,
                    self.tp_rank,
                    groups,
                    cfg.host,
                    cfg.handshake_port(self.dp_rank, self.tp_rank),
                    cfg.abort_timeout_s,
                    auth=auth,
                    allowed=allowed,
                    tp_size=cfg.prefill.tp_size,
                    decode_tp_size=cfg.decode.tp_size,
                )
            if cfg.is_consumer:
                # kv_both: the source registered the memory already; one registration serves both.
                self.sink = KVSink(
                    self.engine,
                    cfg.engine_id,
                    groups,
                    cfg.handshake_timeout_s,
                    cfg.num_workers,
                    NULL_BLOCK,
                    register=self.source is None,
                    auth=auth,
                    allowed=allowed,
                    tp_size=cfg.decode.tp_size,
                )
        except BaseException:
            self.shutdown()
            raise
        log.info(
            "mooncake: engine %s tp%d registered %d KV groups (%d regions) at %s%s; side channel %s, peers: %r",
            cfg.engine_id,
            self.tp_rank,
            len(groups),
            sum(len(g) for g in groups),
            self.engine.session,
            f", handshake {self.source.address[0]}:{self.source.address[1]}" if self.source else "",
            f"authenticated (secret from {cfg.secret_from})" if cfg.secret else "UNAUTHENTICATED",
            allowed,
        )
        if cfg.secret is None:
            log.warning(
                "mooncake: no shared secret is configured (kv_connector_extra_config.auth_secret_file "
                "or DS_PLUGINS_MOONCAKE_SECRET): the side channel is unauthenticated, so anyone who "
                "reaches %s can read this instance's KV layout and release its transfers%s",
                f"{self.source.address[0]}:{self.source.address[1]}" if self.source else "its peers",
                "" if allowed.restricted else ", and no allowed_peers limits who that is",
            )

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
            if spec.error or self.sink is None:
                if self.sink is None:
                    log.error("mooncake: request %s needs a remote read but this worker is not a consumer", rid)
                self._refused.add(rid)
                continue
            src = source_ranks(spec.remote_request_id, spec.remote_tp_size, self.config.decode.tp_size)
            src_rank = src[self.tp_rank % len(src)]
            ref = SourceRef(
                spec.remote_host,
                spec.remote_port + src_rank,
                spec.remote_engine_id,
                spec.remote_request_id,
                tp_size=spec.remote_tp_size,
            )
            if not any(b != NULL_BLOCK for g in spec.local_blocks for b in g):
                self._release_only.add(rid)
            self.sink.fetch(rid, ref, spec.local_blocks, spec.remote_blocks)

    def poll(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving); a failed one is also in the second."""
        sending: set[str] = self.source.poll_finished() if self.source else set()
        recving, self._refused = set(self._refused), set()
        failed = set(recving)
        if self.sink:
            for res in self.sink.poll():
                if res.request_id in self._release_only:
                    self._release_only.discard(res.request_id)
                    continue
                recving.add(res.request_id)
                if not res.ok or res.failed_blocks:
                    failed.add(res.request_id)
                    self._load_errors |= res.failed_blocks
        return sending, recving, failed

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """vLLM before failed_recving: failures reach the scheduler as block ids only."""
        sending, recving, _ = self.poll()
        return sending or None, recving or None

    def suspend(self) -> None:
        """Drop the memory registration (sleep); idempotent."""
        if self.engine is not None and self.engine.registered:
            self._suspended = list(self.engine.registered)
            self.engine.unregister_all()

    def resume(self) -> None:
        """Register again what suspend() dropped (wake-up); idempotent."""
        if self.engine is not None and self._suspended:
            self.engine.register(self._suspended)
            self._suspended = []

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
    from vllm.distributed.kv_transfer.kv_connector.v1 import base
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole, SupportsHMA

    # Feature detection: vLLM 0.30+ takes failed requests (KVConnectorTransferResults.failed_recving) and
    # fails or recomputes each per kv_load_failure_policy; 0.32+ refuses block ids (invalid_block_ids)
    # when there are several KV groups, as DeepSeek-V4 has, and ends the engine. Older ones take block ids
    # of one group only (SchedulerSide refuses a multi-group consumer there). The scheduler facts this
    # relies on are checked in every matrix wheel's source by tests/kv/test_mooncake_vllm_contract.py.
    results_cls = getattr(base, "KVConnectorTransferResults", None)
    per_request = results_cls is not None and hasattr(KVConnectorBase_V1, "get_transfer_results")

    class DSV4MooncakeConnector(KVConnectorBase_V1, SupportsHMA):
        """KVConnectorBase_V1 + SupportsHMA over ds_plugins.kv.mooncake (see the module docstring)."""

        def __init__(self, vllm_config, role, kv_cache_config=None):
            check_switches()
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            log_through(log)
            self.ds_config = load_config(vllm_config)
            self.scheduler_side = self.worker_side = None
            if role == KVConnectorRole.SCHEDULER:
                self.scheduler_side = SchedulerSide(
                    vllm_config, self.ds_config, kv_cache_config, fail_requests=per_request
                )
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
            errors = self.worker_side.take_load_errors()
            return set() if per_request else errors

        if per_request:

            def get_transfer_results(self, finished_req_ids):
                sending, recving, failed = self.worker_side.poll()
                return results_cls(finished_sending=sending, finished_recving=recving, failed_recving=failed)

        if hasattr(KVConnectorBase_V1, "get_loaded_kv_cache_group_ids"):

            def get_loaded_kv_cache_group_ids(self, request):
                # A P/D load restores the request's own blocks in every group it moves (regions_of: vLLM's
                # transfer groups), not only the prefix-cacheable ones (vLLM's default).
                return transfer_group_ids(self._kv_cache_config) or ()

        # Sleep mode (vLLM 0.33+): transfers are drained before; the cache keeps its virtual addresses.
        def unregister_kv_caches(self):
            self.worker_side.suspend()

        def restore_kv_caches(self):
            self.worker_side.resume()

        def shutdown(self):
            if self.worker_side is not None:
                self.worker_side.shutdown()
            if self.scheduler_side is not None:
                self.scheduler_side.shutdown()

    try:  # vLLM 0.32+ labels external prefix-cache hits by where they came from (metrics only)
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        DSV4MooncakeConnector._cache_hit_source = CacheHitSource.P2P
    except ImportError:
        pass
    DSV4MooncakeConnector.__module__ = __name__
    DSV4MooncakeConnector.__qualname__ = CLASS_NAME
    return DSV4MooncakeConnector


def __getattr__(name: str):
    if name in ALIASES:
        if CLASS_NAME not in _built:
            _built[CLASS_NAME] = _build()
        return _built[CLASS_NAME]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
