"""Scheduler side of the connector against a real vLLM (run in each live vLLM env by test_mooncake_vllm.py).

Real objects throughout: VllmConfig (CPU device config), the connector made by vLLM's own
KVConnectorFactory from kv_connector_module_path, Request, and a real KVCacheManager whose hybrid
coordinator allocates blocks for three KV groups shaped like DeepSeek-V4's (two full-attention groups,
as the compressed KV and the indexer keys are, and one sliding-window group). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import torch
from vllm.config import DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, supports_hma
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm.v1.request import Request, RequestStatus

BS = 16
PROMPT = 100  # 7 blocks of 16, the last one partial


def kv_cache_config(num_blocks: int = 64) -> KVCacheConfig:
    full = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=584, dtype=torch.uint8)
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=1, head_size=584, dtype=torch.uint8, sliding_window=32)
    groups = [
        KVCacheGroupSpec(["layers.0.compressed"], full),
        KVCacheGroupSpec(["layers.0.swa"], swa),
        KVCacheGroupSpec(["layers.0.indexer"], full),
    ]
    # The scheduler never reads kv_cache_tensors (whose fields differ between 0.28 and 0.30): none given.
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def connector(role: str, engine_id: str, extra: dict | None = None, tp: int = 1, kcc: KVCacheConfig | None = None):
    kv = KVTransferConfig(
        kv_connector="MooncakeConnectorV1",
        kv_connector_module_path="ds_plugins.vllm.mooncake.connector",
        kv_role=role,
        engine_id=engine_id,
        kv_port="30000",
        kv_connector_extra_config={
            "host": "10.1.2.3",
            "prefill": {"dp_size": 2, "tp_size": 1},
            "decode": {"dp_size": 4, "tp_size": 1},
            **(extra or {}),
        },
    )
    cfg = VllmConfig(kv_transfer_config=kv, device_config=DeviceConfig(device="cpu"))
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = False
    cfg.parallel_config.data_parallel_rank = 1
    cfg.parallel_config.tensor_parallel_size = tp
    kcc = kcc or kv_cache_config()
    return KVConnectorFactory.create_connector(cfg, KVConnectorRole.SCHEDULER, kcc), kcc


def manager(kcc) -> KVCacheManager:
    return KVCacheManager(kcc, max_model_len=1024, scheduler_block_size=BS, hash_block_size=BS, enable_caching=False)


def request(rid: str, params: dict | None) -> Request:
    sp = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params} if params is not None else None)
    return Request(
        request_id=rid, prompt_token_ids=list(range(1000, 1000 + PROMPT)), sampling_params=sp, pooling_params=None
    )


def main() -> None:
    import vllm

    out: dict = {"vllm_file": vllm.__file__, "vllm_version": vllm.__version__}
    # ---------------- prefill instance
    p, kcc = connector("kv_producer", "p0")
    out["class"] = f"{type(p).__module__}.{type(p).__qualname__}"
    out["hma"] = supports_hma(p)
    mgr = manager(kcc)
    req = request("p-req", {"do_remote_decode": True, "do_remote_prefill": False})
    assert p.get_num_new_matched_tokens(req, 0) == (0, False)
    blocks = mgr.allocate_slots(req, PROMPT)
    p.update_state_after_alloc(req, blocks, 0)
    block_ids = mgr.get_block_ids(req.request_id)
    req.num_computed_tokens = PROMPT  # as after its prefill
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, params = p.request_finished_all_groups(req, block_ids)
    meta = p.build_connector_meta(SchedulerOutput.make_empty())
    out["p"] = {"delay": delay, "params": params, "send": meta.send, "block_ids": [list(g) for g in block_ids]}
    # An aborted prefill hands nothing off and keeps nothing.
    aborted = request("p-aborted", {"do_remote_decode": True})
    mgr.allocate_slots(aborted, PROMPT)
    aborted.status = RequestStatus.FINISHED_ABORTED
    out["p_aborted"] = p.request_finished_all_groups(aborted, mgr.get_block_ids(aborted.request_id))
    out["p_meta_after"] = p.build_connector_meta(SchedulerOutput.make_empty()).send
    # After its prefill, vLLM's sliding-window manager has replaced the blocks before the window with the
    # null block (remove_skipped_blocks, as its scheduler calls it): P sends them as a count, D restores them.
    from ds_plugins.vllm.mooncake.connector import parse_remote

    trim = request("p-trim", {"do_remote_decode": True, "do_remote_prefill": False})
    mgr.allocate_slots(trim, PROMPT)
    trim.num_computed_tokens = PROMPT
    mgr.remove_skipped_blocks(trim.request_id, PROMPT)
    trim.status = RequestStatus.FINISHED_LENGTH_CAPPED
    trim_ids = [list(g) for g in mgr.get_block_ids(trim.request_id)]
    _, trim_params = p.request_finished_all_groups(trim, mgr.get_block_ids(trim.request_id))
    out["p_trim"] = {
        "block_ids": trim_ids,
        "params": trim_params,
        "restored": parse_remote(trim_params, 3, PROMPT, 1)["remote_blocks"],
    }
    p.build_connector_meta(SchedulerOutput.make_empty())

    # ---------------- decode instance, fed P's params as the proxy would
    try:
        d, kcc = connector("kv_consumer", "d0", {"allowed_peers": ["10.1.2.0/24"]})
    except Exception as exc:  # vLLM before failed_recving: a multi-group consumer is refused
        out["d_refused"] = f"{type(exc).__name__}: {exc}"
    else:
        decode(out, d, kcc, params)
    if hasattr(KVCacheConfig, "transfer_group_ids"):  # vLLM 0.30+
        transfer_groups(out)
    checks(out)
    print("RESULT " + json.dumps(out, default=str), flush=True)


def transfer_groups(out: dict) -> None:
    """vLLM 0.30+: a group vLLM marks enable_kv_transfer=False (its host-resident HiSparse groups) is not
    moved: P hands off, D loads and asks for the transfer groups only, as vLLM's own Mooncake connector."""

    def config():
        kcc = kv_cache_config()
        host = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=584, dtype=torch.uint8)
        kcc.kv_cache_groups.insert(1, KVCacheGroupSpec(["layers.0.host"], host, enable_kv_transfer=False))
        return kcc

    res: dict = {}
    kcc = config()
    p, _ = connector("kv_producer", "p0", kcc=kcc)
    mgr = manager(kcc)
    req = request("p-tg", {"do_remote_decode": True, "do_remote_prefill": False})
    mgr.allocate_slots(req, PROMPT)
    block_ids = mgr.get_block_ids(req.request_id)
    req.num_computed_tokens = PROMPT
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    _, params = p.request_finished_all_groups(req, block_ids)
    res["transfer_group_ids"] = list(kcc.transfer_group_ids)
    res["p_groups"] = [list(g) for g in block_ids]
    res["p_remote_block_ids"] = params["remote_block_ids"]
    d, _ = connector("kv_consumer", "d0", {"allowed_peers": ["10.1.2.0/24"]}, kcc=kcc)
    dmgr = manager(kcc)
    dreq = request("d-tg", dict(params))
    n, load_async = d.get_num_new_matched_tokens(dreq, 0)
    dmgr.allocate_slots(dreq, 0, num_external_computed_tokens=n, delay_cache_blocks=load_async)
    d.update_state_after_alloc(dreq, dmgr.get_blocks(dreq.request_id), n)
    spec = d.build_connector_meta(SchedulerOutput.make_empty()).recv["d-tg"]
    res["d_allocated"] = [list(g) for g in dmgr.get_block_ids(dreq.request_id)]
    res["d_local"] = spec.local_blocks
    res["d_error"] = spec.error
    if hasattr(d, "get_loaded_kv_cache_group_ids"):  # vLLM 0.32+
        res["d_loaded_groups"] = list(d.get_loaded_kv_cache_group_ids(dreq))
    d.shutdown()
    out["transfer_groups"] = res


def decode(out: dict, d, kcc, params: dict) -> None:
    dmgr = manager(kcc)
    dreq = request("d-req", dict(params))
    out["d_params_seen"] = dreq.kv_transfer_params == params
    computed, num_computed = dmgr.get_computed_blocks(dreq)[:2]
    n, load_async = d.get_num_new_matched_tokens(dreq, num_computed)
    out["holding_while_waiting"] = d.scheduler_side.holding  # P's hold renewed while D's queue holds it
    dmgr.allocate_slots(
        dreq,
        0,
        num_new_computed_tokens=num_computed,
        new_computed_blocks=computed,
        num_external_computed_tokens=n,
        delay_cache_blocks=load_async,
    )
    d.update_state_after_alloc(dreq, dmgr.get_blocks(dreq.request_id), n)
    d.update_state_after_alloc(dreq, dmgr.get_blocks(dreq.request_id), 0)  # the second, post-load call
    meta = d.build_connector_meta(SchedulerOutput.make_empty())
    spec = meta.recv.get("d-req")
    out["d"] = {
        "matched": [n, load_async],
        "num_computed": num_computed,
        "allocated": [list(g) for g in dmgr.get_block_ids(dreq.request_id)],
        "recv_keys": sorted(meta.recv),
        "spec": spec.__dict__ if spec else None,
        "params_after": dreq.kv_transfer_params,
    }
    out["d_meta_after"] = sorted(d.build_connector_meta(SchedulerOutput.make_empty()).recv)
    out["holding_after_alloc"] = d.scheduler_side.holding
    dreq.status = RequestStatus.FINISHED_STOPPED
    out["d_finished"] = d.request_finished_all_groups(dreq, dmgr.get_block_ids(dreq.request_id))
    dmgr.free(dreq)
    out["d_free_blocks_after"] = dmgr.block_pool.get_num_free_blocks()

    # P prefilled the first 100 tokens of D's 113 (the P/D proxy sends P all but the last): D loads the 100
    # tokens P holds, reads only the blocks P has (7 of its 8 per group), and computes the rest itself.
    longer = Request(
        request_id="d-longer",
        prompt_token_ids=list(range(1000, 1000 + PROMPT + 13)),
        sampling_params=SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": dict(params)}),
        pooling_params=None,
    )
    n, load_async = d.get_num_new_matched_tokens(longer, 0)
    dmgr.allocate_slots(longer, 0, num_external_computed_tokens=n, delay_cache_blocks=load_async)
    d.update_state_after_alloc(longer, dmgr.get_blocks(longer.request_id), n)
    spec = d.build_connector_meta(SchedulerOutput.make_empty()).recv["d-longer"]
    out["d_longer"] = {
        "matched": [n, load_async],
        "allocated": [list(g) for g in dmgr.get_block_ids("d-longer")],
        "local": spec.local_blocks,
    }
    longer.status = RequestStatus.FINISHED_STOPPED
    d.request_finished_all_groups(longer, dmgr.get_block_ids("d-longer"))
    dmgr.free(longer)

    # D request aborted before allocation: P must still be told to free.
    early = request("d-early", dict(params))
    out["d_early"] = d.request_finished_all_groups(early, ((), (), ()))
    m = d.build_connector_meta(SchedulerOutput.make_empty())
    out["d_early_spec"] = m.recv["d-early"].__dict__ if "d-early" in m.recv else None

    # Unusable params from a client (incomplete, wrong types, impossible sizes): never an exception in
    # the scheduler. Where vLLM takes failed requests (failed_recving), the request waits for a "load"
    # that the worker reports failed at once (kv_load_failure_policy decides); before, it prefills locally.
    forged = {
        "incomplete": {"do_remote_prefill": True, "remote_engine_id": "p0"},
        "blocks_int": {**params, "remote_block_ids": 5},
        "blocks_mixed": {**params, "remote_block_ids": [[1], 7, [2]]},
        "blocks_negative": {**params, "remote_block_ids": [[-1], [2], [3]]},
        "blocks_groups": {**params, "remote_block_ids": [[1], [2]]},
        "blocks_too_many": {**params, "remote_block_ids": [list(range(1, PROMPT + 2))] * 3},
        "port_text": {**params, "remote_port": "x"},
        "port_range": {**params, "remote_port": 1000000},
        "tp_text": {**params, "remote_tp_size": "x"},
        "tp_zero": {**params, "remote_tp_size": 0},
        "host_url": {**params, "remote_host": "http://evil/"},
        "host_not_allowed": {**params, "remote_host": "169.254.169.254"},
        "engine_id_obj": {**params, "remote_engine_id": {"a": 1}},
        "num_tokens_past_prompt": {**params, "remote_num_tokens": PROMPT + 5},
        "skip_text": {**params, "remote_block_skip": "x"},
        "skip_past_prompt": {**params, "remote_block_skip": [PROMPT, 0, 0]},
    }
    out["forged"] = {}
    for name, bad in forged.items():
        r = request(f"d-{name}", dict(bad))
        try:
            n, load_async = d.get_num_new_matched_tokens(r, 0)
            if n:
                dmgr.allocate_slots(r, 0, num_external_computed_tokens=n, delay_cache_blocks=load_async)
            d.update_state_after_alloc(r, dmgr.get_blocks(r.request_id), n)
            m = d.build_connector_meta(SchedulerOutput.make_empty())
            spec = m.recv.get(r.request_id)
            r.status = RequestStatus.FINISHED_ABORTED
            fin = d.request_finished_all_groups(r, dmgr.get_block_ids(r.request_id))
            dmgr.free(r)
            out["forged"][name] = {
                "matched": [n, load_async],
                "error": spec.error if spec else None,
                "finished": list(fin),
                "left": len(d.scheduler_side._bad),
            }
        except Exception as exc:  # the engine would die here
            out["forged"][name] = {"raised": f"{type(exc).__name__}: {exc}"}
    out["per_request"] = d.scheduler_side.fail_requests
    out["holding_after_forged"] = d.scheduler_side.holding  # forged params: never a renewal sent for them
    d.shutdown()
    out["renewer_threads_after_shutdown"] = sum(t.name == "mooncake-hold-renewer" for t in threading.enumerate())
    out["d_free_blocks_after_forged"] = dmgr.block_pool.get_num_free_blocks()
    if hasattr(d, "get_loaded_kv_cache_group_ids"):
        out["loaded_groups"] = list(d.get_loaded_kv_cache_group_ids(dreq))
    if hasattr(d, "get_external_cache_hit_sources"):
        out["hit_sources"] = {
            str(getattr(k, "value", k)): v for k, v in d.get_external_cache_hit_sources(dreq, 100).items()
        }


def checks(out: dict) -> None:
    # Config validation surfaces through vLLM's factory with the key named.
    def error_of(*args, **kwargs):
        try:
            connector(*args, **kwargs)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    out["bad_tp"] = error_of(
        "kv_consumer", "d1", {"prefill": {"dp_size": 1, "tp_size": 1}, "decode": {"dp_size": 1, "tp_size": 2}}
    )
    # The instance's own TP against its side of the config: caught when the connector is made, not at
    # the first finished request (where source_ranks could not pick TP ranks that do not exist).
    out["tp_not_configured"] = error_of("kv_producer", "p1", tp=2)
    # The switches: a clear refusal naming the switch, in every process that builds the connector.
    for switch, value in (("DS_PLUGINS_MOONCAKE", "off"), ("DS_PLUGINS_DISABLE", "1")):
        os.environ[switch] = value
        out[f"switch_{switch}"] = error_of("kv_consumer", "d2")
        del os.environ[switch]


if __name__ == "__main__":
    sys.exit(main())
