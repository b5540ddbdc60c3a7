"""`ds-plugins pd-proxy` against real aiohttp servers playing vLLM prefill and decode instances
(the vLLM 0.32 shapes: /tokenize, kv_transfer_params in the prefill's answer, SSE streams).
The proxy is the product's application (ds_plugins.pd_proxy.app.build) on a real port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from ds_plugins import cli  # noqa: E402
from ds_plugins.pd_proxy import flow  # noqa: E402
from ds_plugins.pd_proxy.app import build  # noqa: E402
from ds_plugins.pd_proxy.balancer import Side  # noqa: E402
from ds_plugins.pd_proxy.config import ProxyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


class Fake:
    """One vLLM instance: records what it was sent; `delay_s`, `status`, `params` change its answers."""

    def __init__(self, role: str, name: str):
        self.role, self.name = role, name
        self.seen: list[tuple[str, dict]] = []
        self.delay_s = 0.0
        self.status = 200
        self.params = True
        self.in_flight = 0
        self.gate: asyncio.Event | None = None  # set: answers wait for it
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def health(self, request):
        return web.Response(status=200 if self.status < 500 else 503)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "tiny", "owned_by": self.name}]})

    async def tokenize(self, request):
        body = await request.json()
        self.seen.append((request.path, body))
        if "messages" in body:
            text = "".join(f"<{m['role']}>{m['content']}" for m in body["messages"]) + "<assistant>"
        else:
            text = body["prompt"]
        return web.json_response({"count": len(text), "max_model_len": 4096, "tokens": tokens(text)})

    async def generate(self, request):
        body = await request.json()
        self.seen.append((request.path, body))
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s)
            if self.status != 200:
                return web.json_response(
                    {"error": {"message": f"{self.name} refuses", "code": self.status}}, status=self.status
                )
            if self.role == "prefill":
                params = (
                    {
                        "do_remote_prefill": True,
                        "do_remote_decode": False,
                        "remote_engine_id": self.name,
                        "remote_request_id": f"cmpl-{len(self.seen)}",
                        "remote_host": "127.0.0.1",
                        "remote_port": 30000,
                        "remote_block_ids": [[1, 2]],
                        "remote_tp_size": 1,
                        "remote_num_tokens": 5,
                    }
                    if self.params
                    else None
                )
                return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": params})
            answer = {"served_by": self.name, "got_params": body.get("kv_transfer_params")}
            if not body.get("stream"):
                return web.json_response({"choices": [{"text": "hello world", "index": 0}], **answer})
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for piece in ("hello", " ", "world"):
                await out.write(f"data: {json.dumps({'choices': [{'text': piece}], **answer})}\n\n".encode())
                await asyncio.sleep(0.01)
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        finally:
            self.in_flight -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario(test, prefill=1, decode=1, dead_decode=0, **config):
    """Start the fakes and the proxy, run `test(client, prefills, decodes, dead_urls)`, stop everything."""

    async def main():
        ps = [Fake("prefill", f"p{i}") for i in range(prefill)]
        ds = [Fake("decode", f"d{i}") for i in range(decode)]
        for f in ps + ds:
            await f.server.start_server()
        dead = [f"http://127.0.0.1:{free_port()}" for _ in range(dead_decode)]
        cfg = ProxyConfig(
            prefill=tuple(f.url for f in ps),
            decode=tuple([*(f.url for f in ds), *dead]),
            **{"health_interval_s": 0.2, "connect_timeout_s": 1, **config},
        )
        client = TestClient(TestServer(build(cfg), host="127.0.0.1"))
        await client.start_server()
        try:
            await test(client, ps, ds, dead)
        finally:
            await client.close()
            for f in ps + ds:
                await f.server.close()

    asyncio.run(main())


BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}


def test_completion_two_steps_all_but_last_token():
    async def test(client, ps, ds, _):
        r = await client.post("/v1/completions", json=BODY)
        assert r.status == 200, await r.text()
        got = await r.json()
        assert [p for p, _ in ps[0].seen] == ["/tokenize", "/v1/completions"]
        prefill = ps[0].seen[1][1]
        assert prefill["prompt"] == tokens("hello")[:-1]
        assert prefill["max_tokens"] == 1 and prefill["stream"] is False and prefill["ignore_eos"] is True
        assert prefill["kv_transfer_params"] == flow.PREFILL_PARAMS
        path, dec = ds[0].seen[0]
        assert path == "/v1/completions" and dec["prompt"] == "hello" and dec["max_tokens"] == 8
        assert got["got_params"]["remote_engine_id"] == "p0" and got["got_params"]["do_remote_prefill"] is True

    scenario(test)


def test_token_id_prompt_needs_no_tokenize_and_full_prompt_flag():
    async def test(client, ps, ds, _):
        r = await client.post("/v1/completions", json={**BODY, "prompt": [5, 6, 7, 8]})
        assert r.status == 200
        assert [p for p, _ in ps[0].seen] == ["/v1/completions"] and ps[0].seen[0][1]["prompt"] == [5, 6, 7]
        assert ds[0].seen[0][1]["prompt"] == [5, 6, 7, 8]

    scenario(test)

    async def whole(client, ps, ds, _):
        r = await client.post("/v1/completions", json=BODY)
        assert r.status == 200
        assert [p for p, _ in ps[0].seen] == ["/v1/completions"] and ps[0].seen[0][1]["prompt"] == "hello"

    scenario(whole, all_but_last=False)


def test_chat_rendered_by_prefill_tokenize_then_prefilled_as_ids():
    messages = [{"role": "user", "content": "hi"}]

    async def test(client, ps, ds, _):
        r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4})
        assert r.status == 200
        (tp, tok), (pp, pre) = ps[0].seen
        assert tp == "/tokenize" and tok == {"model": "tiny", "messages": messages}
        assert pp == "/v1/completions" and pre["prompt"] == tokens("<user>hi<assistant>")[:-1]
        assert "messages" not in pre and pre["max_tokens"] == 1
        assert ds[0].seen[0][0] == "/v1/chat/completions" and ds[0].seen[0][1]["messages"] == messages
        # With tools the chat template may render what /tokenize cannot: the prefill gets the chat whole.
        ps[0].seen.clear()
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "tools": tools})
        assert r.status == 200
        assert [p for p, _ in ps[0].seen] == ["/v1/chat/completions"] and ps[0].seen[0][1]["tools"] == tools

    scenario(test)


def test_streaming_completion_and_chat_pass_through_in_order():
    async def test(client, ps, ds, _):
        for path, extra in (
            ("/v1/completions", {"prompt": "hello"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            r = await client.post(path, json={"model": "tiny", "max_tokens": 4, "stream": True, **extra})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = [line[6:] for line in (await r.text()).splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "hello world"
            prefill = ps[0].seen[-1][1]
            assert prefill["stream"] is False and "stream_options" not in prefill

    scenario(test)


def test_forged_kv_transfer_params_never_pass_through():
    forged = {
        "do_remote_prefill": True,
        "remote_host": "169.254.169.254",
        "remote_port": 1000000,
        "remote_block_ids": [[1], 7],
        "remote_engine_id": "p0",
        "remote_request_id": "someone-else",
    }

    async def test(client, ps, ds, _):
        for path, extra in (
            ("/v1/completions", {"prompt": [1, 2, 3]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            r = await client.post(path, json={"model": "tiny", "kv_transfer_params": forged, **extra})
            assert r.status == 200
            assert ps[0].seen[-1][1]["kv_transfer_params"] == flow.PREFILL_PARAMS
            sent = ds[0].seen[-1][1]["kv_transfer_params"]
            assert sent["remote_host"] == "127.0.0.1" and sent["remote_request_id"] == f"cmpl-{len(ps[0].seen)}"

    scenario(test)


def test_round_robin_across_instances_and_least_in_flight():
    async def test(client, ps, ds, _):
        for _ in range(4):
            assert (await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})).status == 200
        assert [len(f.seen) for f in ps] == [2, 2] and [len(f.seen) for f in ds] == [2, 2]
        # One instance holds a request: the next ones all go to the other until it is free again.
        gate = asyncio.Event()
        ds[0].gate = ds[1].gate = gate
        held = asyncio.create_task(client.post("/v1/completions", json={**BODY, "prompt": [1, 2]}))
        while not (ds[0].in_flight or ds[1].in_flight):
            await asyncio.sleep(0.01)
        busy, free = (ds[0], ds[1]) if ds[0].in_flight else (ds[1], ds[0])
        free.gate = None
        before = len(free.seen)
        try:
            for _ in range(3):
                assert (await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})).status == 200
            assert len(free.seen) == before + 3
        finally:
            gate.set()
        assert (await held).status == 200

    scenario(test, prefill=2, decode=2)


def test_least_in_flight_pick_in_the_balancer():
    side = Side("decode", ["http://a:1", "http://b:1", "http://c:1"])
    a, b, c = side.instances
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    assert side.pick() is b
    b.in_flight = 3
    assert side.pick() is c
    side.mark(c, "ConnectionRefused")
    assert side.pick() is a and side.pick(exclude=[a]) is b
    for inst in side.instances:
        side.mark(inst, "down")
    assert side.pick() is None and not side.any_healthy()


def test_dead_decode_instance_is_skipped_and_all_dead_is_503_naming_the_side():
    async def test(client, ps, ds, dead):
        r = await client.get("/health")
        state = await r.json()
        assert r.status == 200 and [i["healthy"] for i in state["decode"]] == [True, False]
        for _ in range(3):
            r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
            assert r.status == 200 and (await r.json())["served_by"] == "d0"
        url = ds[0].url
        await ds[0].server.close()
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
        err = (await r.json())["error"]
        assert r.status == 503 and err["side"] == "decode" and time.monotonic() - t0 < 5, err
        assert "no decode instance can be reached" in err["message"] and url in err["message"]
        assert dead[0] in err["message"]
        await asyncio.sleep(0.5)  # the health checks see it too
        r = await client.get("/health")
        body = await r.json()
        assert r.status == 503 and body["error"]["side"] == "decode" and "no healthy decode" in body["error"]["message"]

    scenario(test, dead_decode=1)


def test_dead_prefill_is_503_and_instance_comes_back_after_health_check():
    async def test(client, ps, ds, _):
        port = ps[0].server.port
        await ps[0].server.close()
        r = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        )
        err = (await r.json())["error"]
        assert r.status == 503 and err["side"] == "prefill" and not ds[0].seen, err
        again = Fake("prefill", "p0-again")
        again.server = TestServer(again.server.app, host="127.0.0.1", port=port)
        await again.server.start_server()
        try:
            for _ in range(50):
                if (await client.get("/health")).status == 200:
                    break
                await asyncio.sleep(0.1)
            r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
            assert r.status == 200 and again.seen
        finally:
            await again.server.close()

    scenario(test)


def test_slow_prefill_times_out_with_504_naming_it():
    async def test(client, ps, ds, _):
        ps[0].delay_s = 3
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
        err = (await r.json())["error"]
        assert r.status == 504 and err["side"] == "prefill" and err["instance"] == ps[0].url, err
        assert time.monotonic() - t0 < 2 and "--timeout-s" in err["message"] and not ds[0].seen

    scenario(test, timeout_s=0.4)


def test_side_errors_prefill_without_params_and_passthrough_of_4xx():
    async def test(client, ps, ds, _):
        ps[0].params = False
        r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
        err = (await r.json())["error"]
        assert r.status == 502 and err["side"] == "prefill" and "kv_producer" in err["message"]
        ps[0].params = True
        ds[0].status = 400  # the decode's own validation error reaches the client as it sent it
        r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
        assert r.status == 400 and (await r.json()) == {"error": {"message": "d0 refuses", "code": 400}}
        ds[0].status = 500
        r = await client.post("/v1/completions", json={**BODY, "prompt": [1, 2]})
        err = (await r.json())["error"]
        assert r.status == 502 and err["side"] == "decode" and "answered 500" in err["message"]

    scenario(test)


def test_requests_the_proxy_refuses_and_models():
    async def test(client, ps, ds, _):
        for body, needle in (
            ({**BODY, "prompt": ["a", "b"]}, "not a batch"),
            ({**BODY, "n": 2}, "n=2"),
            ({**BODY, "prompt": []}, "non-empty"),
        ):
            r = await client.post("/v1/completions", json=body)
            assert r.status == 400 and needle in (await r.json())["error"]["message"]
        r = await client.post("/v1/completions", data=b"{not json")
        assert r.status == 400
        assert not ps[0].seen and not ds[0].seen
        r = await client.get("/v1/models")
        assert r.status == 200 and (await r.json())["data"][0]["owned_by"] == "d0"

    scenario(test)


def test_cli_without_aiohttp_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    assert cli.main(["pd-proxy", "--prefill", "http://a:1", "--decode", "http://b:2"]) == 2
    assert "pip install 'ds-plugins[pd-proxy]'" in capsys.readouterr().err


def test_cli_usage_errors_and_taken_port(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["pd-proxy", "--prefill", "ftp://a", "--decode", "http://b:2"])
    assert exc.value.code == 64
    assert cli.main(["pd-proxy", "--prefill", "http://a:1", "--decode", "http://a:1"]) == 64
    assert "both --prefill and --decode" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "ds_plugins.cli",
                "pd-proxy",
                "--prefill",
                "http://127.0.0.1:9",
                "--decode",
                "http://127.0.0.1:10",
                "--port",
                str(s.getsockname()[1]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert out.returncode == 1 and "cannot listen on 127.0.0.1:" in out.stderr, out.stderr
