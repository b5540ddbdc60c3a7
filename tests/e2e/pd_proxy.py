"""A small P/D proxy for the end-to-end tests (test-side; ds-plugins has no product proxy yet).

    python pd_proxy.py --port 8000 --prefill http://127.0.0.1:P --decode http://127.0.0.1:D

OpenAI-compatible front for POST /v1/completions and /v1/chat/completions, the two-step flow of
vllm-ascend's example proxy: the request goes to a prefill server with max_tokens 1 and
`kv_transfer_params: {"do_remote_decode": true}`; the prefill's answer carries the
kv_transfer_params that name its KV blocks; the original request goes to a decode server with those
params, and the decode server's answer (streamed through when `stream` is set) is the reply.
For a completion the prefill gets all but the last prompt token (tokenized by the prefill
server's /tokenize when the prompt is text), as vllm-ascend's prefill does by itself for models with
sliding-window or compressed KV: the decode server then computes that token as a normal prefill step
with its whole window (--full-prompt-prefill sends the whole prompt, as vLLM's example proxies do).
Several --prefill/--decode URLs are used round robin. A side that cannot be reached, or answers
with an error, gives a 502 whose message names the side and the URL. GET /health is 200 once the
proxy listens. Built on aiohttp, which vLLM itself depends on.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import aiohttp
from aiohttp import web

PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict, prompt_ids: list[int] | None = None) -> dict:
    """The prefill's request; `prompt_ids`: the prompt the prefill gets instead (all but its last token)."""
    out = copy.deepcopy(body)
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_PARAMS))
    for key in ("max_completion_tokens", "min_tokens", "stream_options"):
        out.pop(key, None)
    if prompt_ids is not None:
        out["prompt"] = prompt_ids
    return out


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(t, int) for t in prompt)


class Proxy:
    def __init__(self, prefill: list[str], decode: list[str], timeout_s: float, all_but_last: bool = True):
        self._prefill, self._decode = itertools.cycle(prefill), itertools.cycle(decode)
        self._all_but_last = all_but_last
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def stop(self, app: web.Application) -> None:
        await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        path = request.path
        prefill = next(self._prefill)
        try:
            ids = await self._prefill_prompt(prefill, path, body)
            async with self._session.post(prefill + path, json=prefill_body(body, ids)) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    return _error(502, f"prefill {prefill} answered {r.status}: {json.dumps(answer)[:1000]}")
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            return _error(502, f"prefill {prefill} unreachable or broken: {type(exc).__name__}: {exc}")
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            return _error(502, f"prefill {prefill} returned no kv_transfer_params (is it a kv_producer?)")
        decode = next(self._decode)
        try:
            resp = await self._session.post(decode + path, json={**body, "kv_transfer_params": params})
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _error(502, f"decode {decode} unreachable: {type(exc).__name__}: {exc}")
        async with resp:
            if resp.status != 200 or not body.get("stream"):
                data = await resp.read()
                return web.Response(
                    status=resp.status if resp.status == 200 else 502,
                    body=data
                    if resp.status == 200
                    else _message(f"decode {decode} answered {resp.status}: {data.decode(errors='replace')[:1000]}"),
                    content_type="application/json",
                )
            out = web.StreamResponse(headers={"Content-Type": resp.headers.get("Content-Type", "text/event-stream")})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def _prefill_prompt(self, prefill: str, path: str, body: dict) -> list[int] | None:
        """All but the last prompt token, for a single-prompt completion (D computes that token itself,
        with its whole attention window; see SchedulerSide._remote_tokens). Text is tokenized by the
        prefill server itself (/tokenize), as its completion endpoint would. Chat goes whole."""
        if not self._all_but_last or path != "/v1/completions":
            return None
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            async with self._session.post(
                prefill + "/tokenize", json={"model": body.get("model"), "prompt": prompt}
            ) as r:
                if r.status != 200:
                    return None
                prompt = (await r.json()).get("tokens")
        return prompt[:-1] if _is_ids(prompt) else None


def _message(text: str) -> bytes:
    return json.dumps({"error": {"message": text, "type": "pd_proxy_error"}}).encode()


def _error(status: int, text: str) -> web.Response:
    return web.Response(status=status, body=_message(text), content_type="application/json")


def app(prefill: list[str], decode: list[str], timeout_s: float = 600, all_but_last: bool = True) -> web.Application:
    proxy = Proxy(prefill, decode, timeout_s, all_but_last)
    application = web.Application()
    application.on_startup.append(proxy.start)
    application.on_cleanup.append(proxy.stop)
    application.router.add_post("/v1/completions", proxy.handle)
    application.router.add_post("/v1/chat/completions", proxy.handle)
    application.router.add_get("/health", lambda request: web.Response(text="ok"))
    return application


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefill", nargs="+", required=True)
    ap.add_argument("--decode", nargs="+", required=True)
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument(
        "--full-prompt-prefill",
        action="store_true",
        help="send the prefill the whole prompt (as vLLM's example proxies do), not all but its last token",
    )
    args = ap.parse_args()
    web.run_app(
        app(args.prefill, args.decode, args.timeout_s, not args.full_prompt_prefill),
        host=args.host,
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
