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

    # D aborted before allocation: a release-only notice for P, so P's blocks do not wait for the timeout.
    assert out["d_early"] == [False, None]
    assert out["d_early_spec"]["local_blocks"] == [[], [], []]
    assert out["d_broken"] == [0, False]
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
    assert got["done"] == ["d-req"] and got["load_errors"] == [], got
    assert got["mismatched"] == [] and got["filled"] == (7 + 3 + 7) * 2 and got["untouched_clean"], got
    assert got["registered_after"] == 0 and got["shut"]
    sent = prod.expect("result", timeout=20)
    # p-req freed on the consumer's notice; p-other-rank (read from TP rank 1) released at once.
    assert sent["done"] == ["p-other-rank", "p-req"] and sent["registered_after"] == 0
    assert cons.wait() == 0 and prod.wait() == 0
