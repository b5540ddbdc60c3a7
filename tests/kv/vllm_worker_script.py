"""Worker side of the connector, one vLLM worker per process (run by test_mooncake_vllm.py).

    python vllm_worker_script.py producer|consumer <handshake port> [<json recv spec>]

The connector is made by vLLM's own KVConnectorFactory (WORKER role) from a real VllmConfig; its KV
caches are CPU torch tensors laid out as vLLM allocates them ([num_blocks, block_size, 584] per
layer), three V4-shaped groups. The producer fills its caches from a seed; the consumer reads the
blocks named in the scheduler metadata and checks them byte for byte against the same seed.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from vllm.config import DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

from ds_plugins.vllm.mooncake_connector import MooncakeConnectorMetadata, RecvSpec, _failed_spec

NUM_BLOCKS, BS = 24, 16
LAYERS = [["l0.compressed", "l1.compressed"], ["l0.swa", "l1.swa"], ["l0.indexer", "l1.indexer"]]


def caches(seed: int | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed or 0)
    out = {}
    for group in LAYERS:
        for name in group:
            t = torch.zeros(NUM_BLOCKS, BS, 584, dtype=torch.uint8)
            if seed is not None:
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
            out[name] = t
    return out


def main() -> None:
    role, port = sys.argv[1], int(sys.argv[2])
    kv = KVTransferConfig(kv_connector="MooncakeConnectorV1", kv_connector_module_path="ds_plugins.vllm.mooncake_connector",
                          kv_role=f"kv_{role}", engine_id="p0" if role == "producer" else "d0", kv_port=port,
                          kv_connector_extra_config={"host": "127.0.0.1", "mooncake_protocol": "tcp",
                                                     "handshake_timeout_s": 2, "transfer_timeout_s": 5})
    cfg = VllmConfig(kv_transfer_config=kv, device_config=DeviceConfig(device="cpu"))
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = False
    full = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=584, dtype=torch.uint8)
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=1, head_size=584, dtype=torch.uint8, sliding_window=32)
    kcc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(LAYERS[0], full), KVCacheGroupSpec(LAYERS[1], swa),
                                         KVCacheGroupSpec(LAYERS[2], full)])
    conn = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kcc)
    kvs = caches(11 if role == "producer" else None)
    conn.register_kv_caches(kvs)
    if role == "producer":
        meta = MooncakeConnectorMetadata(send={"p-req": [0], "p-other-rank": [1]})
    else:
        spec = RecvSpec(**json.loads(sys.argv[3]))
        # Beside the good read: one request refused by the scheduler (unusable params), one naming a
        # block the source does not have. Their local blocks are ones "d-req" leaves untouched.
        spare = sorted(set(range(1, NUM_BLOCKS)) - {b for g in spec.local_blocks for b in g})
        refused = _failed_spec("remote_port must be an integer in [1, 65535], got 'x'")
        bad = RecvSpec(**{**spec.__dict__, "local_blocks": [[spare[0]], [spare[1]], [spare[2]]],
                          "remote_blocks": [[NUM_BLOCKS + 5], [1], [1]], "remote_request_id": "p-bad"})
        # And a release-only notice (D reads nothing, P is told to free): never reported to vLLM, whose
        # scheduler has no such request waiting (0.32 ends the engine on an unknown finished_recving).
        release = RecvSpec(**{**spec.__dict__, "local_blocks": [[], [], []], "remote_request_id": "p-release"})
        meta = MooncakeConnectorMetadata(recv={"d-req": spec, "d-refused": refused, "d-bad": bad, "d-release": release})
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    conn.clear_connector_metadata()
    print(json.dumps({"event": "ready"}), flush=True)
    done: set[str] = set()
    errors: set[int] = set()
    failed: set[str] = set()
    want = {"p-req", "p-other-rank"} if role == "producer" else {"d-req", "d-refused", "d-bad"}
    per_request = hasattr(conn, "get_transfer_results")
    deadline = time.monotonic() + 40
    settle_until = float("inf")
    while time.monotonic() < min(deadline, settle_until):
        if done == want and settle_until == float("inf"):
            settle_until = time.monotonic() + 1.5  # time for the release-only notice to come back too
        if per_request:  # vLLM 0.30+: what its model runner calls
            res = conn.get_transfer_results(set())
            sending, recving = res.finished_sending, res.finished_recving
            failed |= res.failed_recving
        else:
            sending, recving = conn.get_finished(set())
        done |= (sending or set()) if role == "producer" else (recving or set())
        errors |= conn.get_block_ids_with_load_errors()
        time.sleep(0.01)
    result = {"event": "result", "done": sorted(done), "load_errors": sorted(errors), "failed": sorted(failed),
              "per_request": per_request}
    if role == "consumer":
        ref = caches(11)
        bad, filled = [], 0
        for g, group in enumerate(LAYERS):
            for name in group:
                for i, lid in enumerate(spec.local_blocks[g]):
                    if lid == 0:
                        continue
                    filled += 1
                    if not torch.equal(kvs[name][lid], ref[name][spec.remote_blocks[g][i]]):
                        bad.append([name, lid])
        untouched = set(range(NUM_BLOCKS)) - {b for g in spec.local_blocks for b in g}
        result.update(mismatched=bad, filled=filled,
                      untouched_clean=all(not kvs[n][b].any() for grp in LAYERS for n in grp for b in untouched))
    ws = conn.worker_side
    engine = ws.engine
    # Sleep mode (vLLM 0.33 calls these around sleep/wake-up): registration dropped, then restored; twice
    # in a row is harmless.
    before = list(engine.registered)
    conn.unregister_kv_caches()
    conn.unregister_kv_caches()
    asleep = len(engine.registered)
    conn.restore_kv_caches()
    conn.restore_kv_caches()
    result.update(sleep={"asleep": asleep, "restored": engine.registered == before and bool(before)})
    conn.shutdown()
    result.update(registered_after=len(engine.registered), shut=ws.engine is None)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
