"""What the connector's feature detection relies on, read (AST) in every vLLM wheel of ci/versions.toml.

The connector reports failed KV loads per request (get_transfer_results -> failed_recving) exactly where
vLLM's base class has KVConnectorTransferResults and get_transfer_results, and block ids otherwise. That
is right only if, in each wheel's own scheduler source:
  - where the base class has both, the scheduler consumes `kv_connector_output.failed_recving`
    (a `_handle_failed_recving` that fails or recomputes those requests);
  - where it has not, the scheduler's block-id path unpacks exactly one KV group
    (`(req_block_ids,) = self.kv_cache_manager.get_block_ids(...)`), which is why a multi-group
    consumer is refused there.
And for the newest wheels: the hooks their base class declares that matter to P/D
(get_loaded_kv_cache_group_ids, unregister_kv_caches / restore_kv_caches) are defined by our class,
and a KVTransferConfig without `kv_ip` is read with getattr only. These wheels are read, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ci import upstream

MATRIX = upstream.versions()["vllm"]["matrix"]
BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
SCHEDULER = "vllm/v1/core/sched/scheduler.py"
CONFIG = "vllm/config/kv_transfer.py"
OURS = Path(__file__).resolve().parents[2] / "ds_plugins" / "vllm" / "mooncake" / "connector.py"
HOOKS = ("get_loaded_kv_cache_group_ids", "unregister_kv_caches", "restore_kv_caches")


def parse(version: str, rel: str) -> ast.Module:
    path = upstream.source("vllm", version) / rel
    assert path.exists(), f"vllm {version}: {rel} is missing"
    return ast.parse(path.read_text(), str(path))


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def detects_per_request(base: ast.Module) -> bool:
    """The connector's own test (connector._build), applied to the source."""
    cls = classes(base)
    return "KVConnectorTransferResults" in cls and "get_transfer_results" in methods(cls["KVConnectorBase_V1"])


def consumes_failed_recving(sched: ast.Module) -> bool:
    scheduler = methods(classes(sched)["Scheduler"])
    if "_handle_failed_recving" not in scheduler:
        return False
    calls = [
        n
        for f in scheduler.values()
        for n in ast.walk(f)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "_handle_failed_recving"
    ]
    return any(isinstance(a, ast.Attribute) and a.attr == "failed_recving" for c in calls for a in c.args)


def block_path_takes_one_group(sched: ast.Module) -> bool:
    fn = methods(classes(sched)["Scheduler"])["_update_requests_with_invalid_blocks"]
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Tuple)
            and len(node.targets[0].elts) == 1
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "get_block_ids"
        ):
            return True
    return False


@pytest.mark.parametrize("version", MATRIX)
def test_failure_route_detected_is_the_one_the_scheduler_takes(version):
    base, sched = parse(version, BASE), parse(version, SCHEDULER)
    if detects_per_request(base):
        assert consumes_failed_recving(sched), f"vllm {version}: failed_recving reported but not consumed"
    else:
        assert not consumes_failed_recving(sched)
        assert block_path_takes_one_group(sched), (
            f"vllm {version}: the block-id path no longer unpacks one group; multi-group consumers may work "
            "there now (revisit SchedulerSide's refusal)"
        )


@pytest.mark.parametrize("version", MATRIX)
def test_our_class_defines_the_p_d_hooks_vllm_declares(version):
    declared = methods(classes(parse(version, BASE))["KVConnectorBase_V1"])
    ours = {n.name for n in ast.walk(ast.parse(OURS.read_text())) if isinstance(n, ast.FunctionDef)}
    missing = [h for h in HOOKS if h in declared and h not in ours]
    assert not missing, f"vllm {version} declares {missing}, the connector does not define them"


def test_kv_ip_is_optional_and_read_with_getattr():
    newest = MATRIX[-1]
    fields = {
        n.target.id
        for n in ast.walk(parse(newest, CONFIG))
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    assert "kv_ip" not in fields and "kv_port" in fields, f"vllm {newest}: KVTransferConfig fields changed"
    src = ast.parse(OURS.read_text())
    direct = [n.lineno for n in ast.walk(src) if isinstance(n, ast.Attribute) and n.attr == "kv_ip"]
    assert not direct, f"mooncake/connector.py reads .kv_ip directly at lines {direct}"
