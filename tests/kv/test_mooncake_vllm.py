"""The vLLM connector: scheduler side in every live vLLM, worker side over real mooncake TCP."""

from __future__ import annotations

import json

from tests.engines.conftest import pytest_generate_tests, vllm_env  # noqa: F401  (the live-vLLM fixture)
from tests.kv.conftest import HERE, free_port


def test_scheduler_side_request_lifecycle_in_real_vllm(vllm_env):
    res = vllm_env.run(script=HERE / "vllm_scheduler_script.py", state=False, timeout=50).ok()
    out = json.loads(next(line[7:] for line in res.proc.stdout.splitlines() if line.startswith("RESULT ")))
    # vLLM's factory found our class under the name vllm-ascend users write, and HMA is accepted.
    assert out["class"] == "ds_plugins.vllm.mooncake_connector.DSV4MooncakeConnector" and out["hma"]

    # P: a length-capped prefill keeps its blocks and hands off every group's block ids.
    p = out["p"]
    assert p["delay"] is True
    assert p["params"]["remote_block_ids"] == p["block_ids"] and len(p["block_ids"]) == 3
    assert all(len(g) == 7 for g in p["block_ids"])  # 100 tokens / 16 per block
    assert p["params"]["remote_port"] == 30000 + 1  # kv_port + dp_rank(1) * tp_size(1)
    assert p["params"]["remote_host"] == "10.1.2.3" and p["params"]["remote_engine_id"] == "p0"
    assert p["params"]["do_remote_prefill"] is True and p["params"]["do_remote_decode"] is False
    assert p["send"] == {"p-req": [0]}
    assert out["p_aborted"] == [False, None] and out["p_meta_after"] == {}

    # D: all prompt tokens come from P, asynchronously; the blocks vLLM allocated (per group, null
    # where the sliding window drops positions) are what the worker is told to fill, once.
    d = out["d"]
    assert out["d_params_seen"] and d["matched"] == [100, True] and d["num_computed"] == 0
    assert d["recv_keys"] == ["d-req"] and d["spec"]["local_blocks"] == d["allocated"]
    assert d["allocated"][1][:4] == [0, 0, 0, 0] and 0 not in d["allocated"][1][4:]
    assert d["spec"]["remote_blocks"] == p["block_ids"] and d["spec"]["remote_port"] == 30001
    assert d["params_after"]["do_remote_prefill"] is False and out["d_meta_after"] == []
    assert out["d_finished"] == [False, None] and out["d_free_blocks_after"] == 63  # all but the null block

    assert p["params"]["remote_num_tokens"] == 100
    # A 113-token prompt at D whose first 100 tokens P holds: 100 loaded, D's 8 blocks cut to P's 7.
    longer = out["d_longer"]
    assert longer["matched"] == [100, True], longer
    assert [len(g) for g in longer["local"]] == [7, 7, 7] and all(
        loc == alloc[:7] for loc, alloc in zip(longer["local"], longer["allocated"])), longer

    # D aborted before allocation: a release-only notice for P, so P's blocks do not wait for the timeout.
    assert out["d_early"] == [False, None]
    assert out["d_early_spec"]["local_blocks"] == [[], [], []]
    # Forged kv_transfer_params never raise in the scheduler (that would end EngineCore); each request
    # fails alone: reported as a failed load where vLLM takes per-request failures, else prefilled locally.
    forged = out["forged"]
    assert not [k for k, v in forged.items() if "raised" in v], forged
    assert len(forged) == 13 and all(v["left"] == 0 and v["finished"] == [False, None] for v in forged.values())
    if out["per_request"]:
        assert all(v["matched"] == [100, True] and v["error"] for v in forged.values()), forged
        assert "missing" in forged["incomplete"]["error"] and "remote_port" in forged["port_text"]["error"]
        assert "2 KV groups, this instance has 3" in forged["blocks_groups"]["error"]
        # vLLM 0.32+ asks which groups a load restores: all of them, as P/D moves every group.
        assert out.get("loaded_groups", [0, 1, 2]) == [0, 1, 2]
        # ... and counts the loaded tokens as peer-to-peer hits in its metrics.
        assert out.get("hit_sources", {"p2p": 100}) == {"p2p": 100}
    else:
        assert all(v["matched"] == [0, False] and v["error"] is None for v in forged.values()), forged
    assert out["d_free_blocks_after_forged"] == 63
    assert out["bad_tp"].startswith("ConfigError: kv_connector_extra_config.prefill.tp_size (1) must be >=")


def test_worker_side_moves_v4_groups_between_two_vllm_workers(spawn):
    port = free_port()
    prod = spawn(HERE / "vllm_worker_script.py", "producer", str(port))
    prod.expect("ready", timeout=45)
    spec = {"local_blocks": [[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 12, 13, 14], [15, 16, 17, 18, 19, 20, 1]],
            "remote_blocks": [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]],
            "remote_engine_id": "p0", "remote_request_id": "p-req", "remote_host": "127.0.0.1",
            "remote_port": port, "remote_tp_size": 1}
    cons = spawn(HERE / "vllm_worker_script.py", "consumer", str(port), json.dumps(spec))
    got = cons.expect("result", timeout=50)
    assert got["done"] == ["d-bad", "d-refused", "d-req"], got
    if got["per_request"]:  # vLLM 0.30+: failed requests, never block ids (0.32+ ends the engine on those)
        assert got["failed"] == ["d-bad", "d-refused"] and got["load_errors"] == [], got
    else:
        assert got["load_errors"] and got["failed"] == [], got
    assert got["mismatched"] == [] and got["filled"] == (7 + 3 + 7) * 2 and got["untouched_clean"], got
    assert got["registered_after"] == 0 and got["shut"]
    sent = prod.expect("result", timeout=20)
    # p-req freed on the consumer's notice; p-other-rank (read from TP rank 1) released at once.
    assert sent["done"] == ["p-other-rank", "p-req"] and sent["registered_after"] == 0
    assert cons.wait() == 0 and prod.wait() == 0
