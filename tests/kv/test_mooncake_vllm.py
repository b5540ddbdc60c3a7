"""The vLLM connector: scheduler side in every live vLLM and on the wheel sources of vLLM 0.25 and 0.33
(their own scheduler code, not installed), worker side over real mooncake TCP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.engines.conftest import pytest_generate_tests, vllm_env  # noqa: F401  (the live-vLLM fixture)
from tests.kv.conftest import HERE, ROOT, free_port

TIMEOUT_S = 150  # each test starts vLLM in one or two child processes


def result_of(stdout: str) -> dict:
    return json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))


def test_scheduler_side_request_lifecycle_in_real_vllm(vllm_env):  # noqa: F811  (the pytest fixture imported above)
    res = vllm_env.run(script=HERE / "vllm_scheduler_script.py", state=False, timeout=100).ok()
    out = result_of(res.proc.stdout)
    assert out["vllm_version"] == vllm_env.version
    check_scheduler_side(out)


# vLLM versions of ci/versions.toml that are not installed here but whose own scheduler, KV cache manager,
# config and connector factory import from the unpacked wheel over the main test environment's packages
# (0.22.1 cannot: it needs gguf). 0.25 takes block ids only (the multi-group consumer is refused), 0.33
# has no kv_ip and takes failed requests.
WHEEL_SOURCES = ("0.25.0", "0.33.0")


@pytest.mark.parametrize("version", WHEEL_SOURCES)
def test_scheduler_side_on_the_wheel_source_of_versions_not_installed(version):
    from ci import upstream

    source = upstream.source("vllm", version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(source)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_scheduler_script.py")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = result_of(proc.stdout)
    assert out["vllm_version"] == version and out["vllm_file"].startswith(str(source)), out["vllm_file"]
    # Before failed_recving (0.30) the multi-group consumer is refused; from it, the decode side runs.
    assert ("d_refused" in out) == (version < "0.30"), out.get("d_refused")
    check_scheduler_side(out)
    assert ("transfer_groups" in out) == (version >= "0.30"), version


def check_transfer_groups(out: dict) -> None:
    """vLLM 0.30+ (KVCacheConfig.transfer_group_ids): a group vLLM does not transfer (enable_kv_transfer
    False, HiSparse's host-resident ones) is neither handed off by P nor read or reported loaded by D."""
    tg = out["transfer_groups"]
    assert tg["transfer_group_ids"] == [0, 2, 3] and len(tg["p_groups"]) == 4, tg
    assert tg["p_remote_block_ids"] == [tg["p_groups"][i] for i in (0, 2, 3)], tg
    assert tg["d_error"] in (None, "") and len(tg["d_local"]) == 3, tg
    assert tg["d_local"][0] == tg["d_allocated"][0] and tg["d_local"][2] == tg["d_allocated"][3], tg
    assert tg.get("d_loaded_groups", [0, 2, 3]) == [0, 2, 3], tg


def check_scheduler_side(out: dict) -> None:
    if "transfer_groups" in out:
        check_transfer_groups(out)
    # vLLM's factory found our class under the name vllm-ascend users write, and HMA is accepted.
    assert out["class"] == "ds_plugins.vllm.mooncake.connector.DSV4MooncakeConnector" and out["hma"]

    # P: a length-capped prefill keeps its blocks and hands off every group's block ids.
    p = out["p"]
    assert p["delay"] is True
    assert p["params"]["remote_block_ids"] == p["block_ids"] and len(p["block_ids"]) == 3
    assert "remote_block_skip" not in p["params"]  # no null block leads any list: nothing to count
    # The sliding-window group's blocks before its 32-token window are null after the prefill: P sends the
    # rest and their count (the lists stay as short as the window, however long the prompt), D puts the
    # nulls back where they were, so block i still covers the same tokens on both sides.
    t = out["p_trim"]
    skip = t["params"]["remote_block_skip"]
    assert skip[0] == skip[2] == 0 and skip[1] > 0 and t["block_ids"][1][: skip[1]] == [0] * skip[1], t
    assert t["params"]["remote_block_ids"] == [g[k:] for g, k in zip(t["block_ids"], skip)], t
    assert t["restored"] == t["block_ids"], t
    assert all(len(g) == 7 for g in p["block_ids"])  # 100 tokens / 16 per block
    assert p["params"]["remote_port"] == 30000 + 1  # kv_port + dp_rank(1) * tp_size(1)
    assert p["params"]["remote_host"] == "10.1.2.3" and p["params"]["remote_engine_id"] == "p0"
    assert p["params"]["do_remote_prefill"] is True and p["params"]["do_remote_decode"] is False
    assert p["send"] == {"p-req": [0]}
    assert out["p_aborted"] == [False, None] and out["p_meta_after"] == {}

    common_checks(out)
    if "d_refused" in out:
        # vLLM before failed_recving takes failed block ids of one KV group only: a decode instance of
        # a three-group model would die at the first transfer fault, so it refuses to start instead.
        assert out["d_refused"].startswith(
            "ConfigError: this vLLM cannot be told that a KV load failed for a model with 3 KV cache groups"
        ), out["d_refused"]
        return

    # D: all prompt tokens come from P, asynchronously; the blocks vLLM allocated (per group, null
    # where the sliding window drops positions) are what the worker is told to fill, once.
    d = out["d"]
    assert out["d_params_seen"] and d["matched"] == [100, True] and d["num_computed"] == 0
    assert d["recv_keys"] == ["d-req"] and d["spec"]["local_blocks"] == d["allocated"]
    assert d["allocated"][1][:4] == [0, 0, 0, 0] and 0 not in d["allocated"][1][4:]
    assert d["spec"]["remote_blocks"] == p["block_ids"] and d["spec"]["remote_port"] == 30001
    assert d["params_after"]["do_remote_prefill"] is False and out["d_meta_after"] == []
    # While D's request waits for its blocks, D renews P's hold on them; allocated, it stops.
    assert out["holding_while_waiting"] == 1 and out["holding_after_alloc"] == 0
    assert out["holding_after_forged"] == 0 and out["renewer_threads_after_shutdown"] == 0
    assert out["d_finished"] == [False, None] and out["d_free_blocks_after"] == 63  # all but the null block

    assert p["params"]["remote_num_tokens"] == 100
    # A 113-token prompt at D whose first 100 tokens P holds: 100 loaded, D's 8 blocks cut to P's 7.
    longer = out["d_longer"]
    assert longer["matched"] == [100, True], longer
    assert [len(g) for g in longer["local"]] == [7, 7, 7] and all(
        loc == alloc[:7] for loc, alloc in zip(longer["local"], longer["allocated"])
    ), longer

    # D aborted before allocation: a release-only notice for P, so P's blocks do not wait for the timeout.
    assert out["d_early"] == [False, None]
    assert out["d_early_spec"]["local_blocks"] == [[], [], []]
    # Forged kv_transfer_params never raise in the scheduler (that would end EngineCore); each request
    # fails alone: reported as a failed load where vLLM takes per-request failures, else prefilled locally.
    forged = out["forged"]
    assert not [k for k, v in forged.items() if "raised" in v], forged
    assert len(forged) == 16 and all(v["left"] == 0 and v["finished"] == [False, None] for v in forged.values())
    assert out["per_request"]  # only vLLM with failed_recving gets here (see d_refused above)
    assert all(v["matched"] == [100, True] and v["error"] for v in forged.values()), forged
    assert "missing" in forged["incomplete"]["error"] and "remote_port" in forged["port_text"]["error"]
    assert "2 KV groups, this instance has 3" in forged["blocks_groups"]["error"]
    assert (
        "'169.254.169.254' is not in kv_connector_extra_config.allowed_peers (10.1.2.0/24)"
        in forged["host_not_allowed"]["error"]
    )
    # vLLM 0.32+ asks which groups a load restores: all of them, as P/D moves every group.
    assert out.get("loaded_groups", [0, 1, 2]) == [0, 1, 2]
    # ... and counts the loaded tokens as peer-to-peer hits in its metrics.
    assert out.get("hit_sources", {"p2p": 100}) == {"p2p": 100}
    assert out["d_free_blocks_after_forged"] == 63


def common_checks(out: dict) -> None:
    assert out["bad_tp"].startswith("ConfigError: kv_connector_extra_config.prefill.tp_size (1) must be >=")
    assert out["tp_not_configured"] == (
        "ConfigError: kv_connector_extra_config.prefill.tp_size is 1 but this prefill instance runs "
        "--tensor-parallel-size 2; they must match (and be the same on every instance)"
    )
    assert out["switch_DS_PLUGINS_MOONCAKE"].startswith(
        "RuntimeError: ds-plugins' Mooncake connector is switched off (DS_PLUGINS_MOONCAKE=off)"
    )
    assert out["switch_DS_PLUGINS_DISABLE"].startswith(
        "RuntimeError: ds-plugins' Mooncake connector is switched off (DS_PLUGINS_DISABLE=1)"
    )


def test_worker_side_moves_v4_groups_between_two_vllm_workers(spawn):
    """Caches as vLLM plans and allocates V4's (block-outermost packing, see vllm_worker_script.py).

    The block lists interleave groups and leave gaps (15, 19, 21 untouched between read blocks), so a read
    that spilt past a layer's page into the next block (the 0.1 connector read one whole packed block from
    each layer's page onward) shows as a dirty untouched block or a mismatched page.
    """
    port = free_port()
    prod = spawn(HERE / "vllm_worker_script.py", "producer", str(port))
    prod.expect("ready", timeout=80)
    spec = {
        "local_blocks": [[5, 6, 7], [0, 0, 9], [12, 13, 20], [14, 16, 18, 1]],
        "remote_blocks": [[1, 2, 3], [4, 8, 10], [22, 11, 30], [31, 33, 32, 35]],
        "remote_engine_id": "p0",
        "remote_request_id": "p-req",
        "remote_host": "127.0.0.1",
        "remote_port": port,
        "remote_tp_size": 1,
    }
    cons = spawn(HERE / "vllm_worker_script.py", "consumer", str(port), json.dumps(spec))
    got = cons.expect("result", timeout=90)
    # vLLM's own grouping of V4's specs: two sliding-window KV groups, compressed KV with the indexer keys,
    # and the compressor states (main and indexer) -- the groups the served tiny V4 has.
    assert got["groups"] == [
        ["l0.swa"],
        ["l1.swa"],
        ["l1.compressed", "l1.indexer"],
        ["l1.state", "l1.indexer_state"],
    ], got
    assert got["done"] == ["d-bad", "d-refused", "d-req"], got
    if got["per_request"]:  # vLLM 0.30+: failed requests, never block ids (0.32+ ends the engine on those)
        assert got["failed"] == ["d-bad", "d-refused"] and got["load_errors"] == [], got
    else:
        assert got["load_errors"] and got["failed"] == [], got
    assert got["mismatched"] == [] and got["dirty"] == [], got
    assert got["filled"] == 3 * 1 + 1 * 1 + 3 * 2 + 4 * 2, got
    assert got["registered_after"] == 0 and got["shut"]
    assert got["sleep"] == {"asleep": 0, "restored": True}, got
    sent = prod.expect("result", timeout=20)
    # p-req freed on the consumer's notice; p-other-rank (read from TP rank 1) released at once.
    assert sent["done"] == ["p-other-rank", "p-req"] and sent["registered_after"] == 0
    assert cons.wait() == 0 and prod.wait() == 0
