"""Group 1: ds-plugins in every process of a real vLLM server (vllm-cpu 0.32.0 on this CPU).

Two servers per model, one after the other, each started once for the whole module: one with ds-plugins
active, one with DS_PLUGINS_DISABLE=1. The same greedy requests go to both, one at a time (so the
batches, and with them the bf16 arithmetic, are the same), and their answers must be identical byte for
byte. Models: the tiny DeepSeek-V4 (tests/e2e/checkpoint.py; needs a CPU vllm-cpu runs V4 on, see
tests/e2e/vllm_cpu.py) and a tiny Llama (any x86 CPU), for the claims that are about ds-plugins being
loaded, not about the model.

Also here: `ds-plugins doctor` (text and --json) run with the vllm-cpu environment's own install, and
what ds-plugins decides on a CPU-only vLLM.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ds_plugins

from . import timings
from .server import Server

PROMPTS = ("Hello world", "The river and the mountain", "1 2 3 4 5", "vllm cpu deepseek model server")
MAX_TOKENS, LOGPROBS = 12, 2
ENGINE_VERSION = "0.32.0"
STARTUP = f"ds-plugins {ds_plugins.__version__} for vLLM {ENGINE_VERSION} on "
DISABLED = "ds-plugins: disabled by DS_PLUGINS_DISABLE"
HARNESS = "ds-plugins e2e harness (test only) for vllm-cpu 0.32.0"
# vLLM prefixes every line of a spawned process with its role and pid; a worker is first
# "VllmWorker-0", then "Worker"; a line logged before vLLM names the process says "MainProcess".
PREFIX = re.compile(
    r"^\((?P<role>MainProcess|APIServer|EngineCore(?:_DP\d+)?|(?:Vllm)?Worker(?:-\d+)?(?:_TP\d+)?) "
    r"pid=(?P<pid>\d+)\)\s(?P<text>.*)$"
)
ROLES = ("APIServer", "EngineCore", "Worker")

MODELS = {"dsv4": ("tiny_v4_dir", "v4_cpu"), "llama": ("tiny_dense_dir", "vllm_cpu_python")}


def role_of(raw: str) -> str:
    if raw.startswith("APIServer"):
        return "APIServer"
    if raw.startswith("EngineCore"):
        return "EngineCore"
    return "Worker"


def lines_by_process(log: str) -> dict[int, tuple[str, list[str]]]:
    """pid -> (role, that process's lines without the prefix)."""
    out: dict[int, tuple[str, list[str]]] = {}
    for line in log.splitlines():
        m = PREFIX.match(line)
        if m:
            pid = int(m["pid"])
            role, lines = out.get(pid, (None, []))
            # a process is named once vLLM sets its name: a line from before (MainProcess) counts for it
            named = m["role"] != "MainProcess"
            out[pid] = (role_of(m["role"]) if named or role is None else role, lines)
            lines.append(m["text"])
    return out


def processes_with(log: str, needle: str) -> dict[str, set[int]]:
    """role -> pids of the processes that logged a line holding `needle`."""
    found: dict[str, set[int]] = {}
    for pid, (role, lines) in lines_by_process(log).items():
        if any(needle in line for line in lines):
            found.setdefault(role, set()).add(pid)
    return found


@dataclass
class Run:
    label: str
    log: str
    completions: list[dict] = field(default_factory=list)
    start_s: float = 0.0
    requests_s: list[float] = field(default_factory=list)


def serve(py: str, model: Path, log: Path, label: str, env: dict[str, str], name: str) -> Run:
    srv = Server(py, model, log, env=env, served_name=name)
    srv.start()
    run = Run(label, "", start_s=srv.start_s)
    try:
        for prompt in PROMPTS:
            t0 = time.monotonic()
            run.completions.append(srv.completion(prompt, max_tokens=MAX_TOKENS, logprobs=LOGPROBS))
            run.requests_s.append(time.monotonic() - t0)
    finally:
        srv.stop()
        run.log = srv.log_text()
    return run


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request, e2e_log_dir) -> dict[str, Run]:
    model_fixture, python_fixture = MODELS[request.param]
    py = request.getfixturevalue(python_fixture)
    model = request.getfixturevalue(model_fixture)
    out = {}
    for label, env in (("plugin", {}), ("disabled", {"DS_PLUGINS_DISABLE": "1"})):
        run = serve(py, model, e2e_log_dir / f"{request.param}-{label}.log", label, env, f"tiny-{request.param}")
        out[label] = run
        timings.record(f"{request.param} server ({label}): start to /health", run.start_s)
        for i, s in enumerate(run.requests_s):
            timings.record(f"{request.param} server ({label}): request {i + 1} ({MAX_TOKENS} tokens)", s)
    return out


# Why an API-server line can be missing while the engine's processes have theirs (the failure says so).
API_SERVER_HINT = (
    "vLLM >= 0.32 configures its logging (vllm.logger.configure_logging) only after the API "
    "server has built its argument parser, which is where it loads general plugins: ds-plugins "
    "holds its start-up line there until then (patch vllm.startup_log.configure_logging); check "
    "that patch's outcome"
)


def _missing(found: dict, log: str) -> str:
    seen = {pid: role for pid, (role, _) in lines_by_process(log).items()}
    hint = f"; {API_SERVER_HINT}" if set(found) == set(ROLES[1:]) else ""
    return f"found in {found}; processes seen: {seen}{hint}"


def test_startup_line_in_every_process(runs):
    log = runs["plugin"].log
    found = processes_with(log, STARTUP)
    assert set(found) == set(ROLES), f"start-up line {STARTUP!r} {_missing(found, log)}"
    pids = [next(iter(found[r])) for r in ROLES]
    assert all(len(found[r]) == 1 for r in ROLES) and len(set(pids)) == 3, found
    assert "vLLM is not installed" not in log
    assert "could not load its vLLM adapter" not in log and "internal error" not in log
    # the harness runs beside it in the engine's processes (where its lifts matter), leaving TRITON_INTERPRET
    # alone; its own INFO line in the API server is dropped (vLLM 0.32 configures logging only after the API
    # server has loaded its plugins, and the harness does not hold its lines as ds-plugins does)
    harness = processes_with(log, HARNESS)
    assert {r: harness.get(r) for r in ROLES[1:]} == {r: found.get(r) for r in ROLES[1:]}, harness
    assert "TRITON_INTERPRET=unset" in log and "TRITON_INTERPRET=1" not in log


def test_disable_switch_reaches_every_process(runs):
    """Disabled means no patch at all, also not the one that holds the start-up line until vLLM 0.32+ has
    configured logging: the API server's "disabled" line is dropped there, the engine's processes show it.
    That the API server is disabled too shows in the absence of any other ds-plugins line."""
    log = runs["disabled"].log
    found = processes_with(log, DISABLED)
    assert set(found) >= set(ROLES[1:]), f"{DISABLED!r} {_missing(found, log)}"
    assert STARTUP not in log and "ds-plugins 0.1.0" not in log


def test_greedy_output_identical_with_and_without_plugin(runs):
    on, off = runs["plugin"].completions, runs["disabled"].completions
    for prompt, a, b in zip(PROMPTS, on, off):
        assert a["usage"]["completion_tokens"] == MAX_TOKENS, a
        assert len(a["choices"][0]["logprobs"]["tokens"]) == MAX_TOKENS
        assert json.dumps(a["choices"], sort_keys=True) == json.dumps(b["choices"], sort_keys=True), (
            f"prompt {prompt!r}:\n with ds-plugins: {a['choices']}\n disabled:        {b['choices']}"
        )
    # the answers depend on the prompt (a server that answers everything alike would pass the above)
    assert len({c["choices"][0]["text"] for c in on}) > 1


def _doctor(py: str, *args: str) -> subprocess.CompletedProcess:
    script = Path(py).parent / "ds-plugins"
    return subprocess.run(
        [str(script), "doctor", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def test_doctor_on_vllm_cpu(vllm_cpu_python):
    t0 = time.monotonic()
    text, js = _doctor(vllm_cpu_python), _doctor(vllm_cpu_python, "--json")
    timings.record("ds-plugins doctor, text and --json", time.monotonic() - t0)
    assert js.returncode == 0, js.stdout + js.stderr
    report = json.loads(js.stdout)
    assert report["probe"]["engines"].get("vllm") == ENGINE_VERSION, report["probe"]["engines"]
    assert report["probe"]["distributions"].get("vllm") == "vllm-cpu", report["probe"].get("distributions")
    vllm = report["engines"]["vllm"]
    assert (vllm["version"], vllm["distribution"], vllm["status"]) == (ENGINE_VERSION, "vllm-cpu", "supported")
    assert report["probe"]["devices"] == []
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"{ENGINE_VERSION} (distribution vllm-cpu)" in text.stdout, text.stdout


def test_cpu_only_decisions(vllm_cpu_python):
    """No GPU: every kernel decision stays upstream, --quantization ascend is ours on the CPU reference
    path, and the Mooncake connector is offered exactly when mooncake is importable in that install."""
    report = json.loads(_doctor(vllm_cpu_python, "--json").stdout)
    decisions = {d["id"]: d for d in report["engines"]["vllm"]["decisions"]}
    for kid in ("deepgemm", "sparse_mla", "indexer", "cudagraph", "dsv4_model"):
        assert decisions[kid]["value"] == "upstream", decisions[kid]
    assert decisions["ascend_quant"]["value"] == "ds_plugins", decisions["ascend_quant"]
    assert "CPU reference path" in decisions["ascend_quant"]["reason"]
    has_mooncake = (
        subprocess.run(
            [vllm_cpu_python, "-c", "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mooncake') else 1)"]
        ).returncode
        == 0
    )
    assert decisions["mooncake_connector"]["value"] == ("ds_plugins" if has_mooncake else "unavailable"), decisions[
        "mooncake_connector"
    ]
