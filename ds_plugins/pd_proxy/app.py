"""The proxy's HTTP application (aiohttp): the OpenAI routes, the two-step flow, the health checks.

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "code", "side", "instance"}}:
503 when a side has no instance that can be reached, 504 when an instance goes quiet for --timeout-s,
502 when an instance answers with a server error or without kv_transfer_params; a 4xx from an instance
(the client's request is bad) is passed through as that instance sent it; 400 for what the proxy
itself refuses (a batch of prompts, n > 1, a body that is not JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web

from . import flow
from .balancer import Instance, Side
from .config import ProxyConfig

log = logging.getLogger("ds_plugins.pd_proxy")
# Long prompts as token ids are large JSON (a 1M-token prompt is ~7 MB); aiohttp's default is 1 MiB.
MAX_REQUEST_BYTES = 64 << 20
# Below uvicorn's keep-alive (vLLM: 5 s), so a pooled connection is never reused as the server closes it.
KEEPALIVE_S = 3
_FORWARDED_HEADERS = ("Authorization", "X-Request-Id")  # vLLM's --api-key, request tracing


class SideError(Exception):
    """One step failed; `response()` is what the client gets."""

    def __init__(self, status: int, side: str, inst: Instance | None, message: str, passthrough: bytes | None = None):
        super().__init__(message)
        self.status, self.side, self.inst, self.passthrough = status, side, inst, passthrough

    def response(self) -> web.Response:
        if self.passthrough is not None:
            return web.Response(status=self.status, body=self.passthrough, content_type="application/json")
        return error_response(self.status, str(self), side=self.side, instance=self.inst.url if self.inst else None)


def error_body(status: int, message: str, **where) -> dict:
    kind = {400: "invalid_request_error", 502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}.get(
        status, "pd_proxy_error"
    )
    return {
        "error": {"message": message, "type": kind, "code": status, **{k: v for k, v in where.items() if v is not None}}
    }


def error_response(status: int, message: str, **where) -> web.Response:
    return web.json_response(error_body(status, message, **where), status=status)


class Proxy:
    def __init__(self, config: ProxyConfig):
        self.config = config
        self.sides = {"prefill": Side("prefill", config.prefill), "decode": Side("decode", config.decode)}
        self.session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._warned_forged = False

    # --- life cycle ---------------------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout_s, sock_read=self.config.timeout_s
            ),
        )
        await self.check_health()  # start with what is known, not with every instance assumed up
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self, _app: web.Application) -> None:
        if self._health_task:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
        if self.session:
            await self.session.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.check_health()

    async def check_health(self) -> None:
        insts = [(side, inst) for side in self.sides.values() for inst in side.instances]
        results = await asyncio.gather(*(self._probe(inst) for _, inst in insts))
        for (side, inst), error in zip(insts, results):
            side.mark(inst, error)

    async def _probe(self, inst: Instance) -> str | None:
        timeout = aiohttp.ClientTimeout(total=min(self.config.health_interval_s, self.config.connect_timeout_s + 5))
        try:
            async with self.session.get(inst.url + "/health", timeout=timeout) as r:  # type: ignore[union-attr]  # start() set it
                await r.read()
                return None if r.status == 200 else f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _why(exc)

    # --- calling a side -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _open(self, side_name: str, method: str, path: str, headers: dict, body: dict | None = None):
        """(instance, response) from the first healthy instance that can be reached, counted in flight
        there from before the request is sent until the response is closed."""
        side = self.sides[side_name]
        tried: list[Instance] = []
        while True:
            inst = side.pick(exclude=tried)
            if inst is None:
                raise SideError(
                    503, side_name, None, f"no {side_name} instance can be reached ({side.why_unavailable()})"
                )
            tried.append(inst)
            with side.using(inst):
                try:
                    # for mypy, below: self.session is set by start(), before the app serves a request
                    resp = await self.session.request(method, inst.url + path, json=body, headers=headers)  # type: ignore[union-attr]
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    side.mark(inst, _why(exc))  # down until its /health answers; the next instance is tried
                    continue
                except asyncio.TimeoutError:
                    raise SideError(
                        504,
                        side_name,
                        inst,
                        f"{side_name} {inst.url} sent nothing for {self.config.timeout_s:g} s (--timeout-s)",
                    ) from None
                except aiohttp.ClientError as exc:
                    side.mark(inst, _why(exc))
                    raise SideError(502, side_name, inst, f"{side_name} {inst.url} failed: {_why(exc)}") from None
                async with resp:
                    yield inst, resp
                return

    async def _read_json(self, side_name: str, inst: Instance, resp: aiohttp.ClientResponse):
        try:
            data = await resp.read()
        except asyncio.TimeoutError:
            raise SideError(
                504,
                side_name,
                inst,
                f"{side_name} {inst.url} sent nothing for {self.config.timeout_s:g} s (--timeout-s)",
            ) from None
        except aiohttp.ClientError as exc:
            raise SideError(502, side_name, inst, f"{side_name} {inst.url} failed: {_why(exc)}") from None
        if 400 <= resp.status < 500:
            raise SideError(resp.status, side_name, inst, "", passthrough=data)
        if resp.status != 200:
            raise SideError(
                502,
                side_name,
                inst,
                f"{side_name} {inst.url} answered {resp.status}: {data.decode(errors='replace')[:1000]}",
            )
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SideError(
                502, side_name, inst, f"{side_name} {inst.url} answered 200 with a body that is not JSON"
            ) from None

    async def _call_json(self, side_name: str, path: str, headers: dict, body: dict):
        async with self._open(side_name, "POST", path, headers, body) as (inst, resp):
            return inst, await self._read_json(side_name, inst, resp)

    # --- routes -------------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the request body is not JSON")
        try:
            body, forged = flow.client_body(raw, path)
        except flow.RequestError as exc:
            return error_response(400, str(exc))
        if forged and not self._warned_forged:
            self._warned_forged = True
            log.warning("a client sent kv_transfer_params: dropped (the proxy sets them; logged once)")
        headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
        try:
            params = await self._prefill(path, body, headers)
            return await self._decode(request, path, body, params, headers)
        except SideError as exc:
            if exc.passthrough is None:
                log.warning("%s %s: %s", request.method, path, exc)
            return exc.response()

    async def _prefill(self, path: str, body: dict, headers: dict) -> dict:
        ids = None
        tokenize = flow.tokenize_request(path, body) if self.config.all_but_last else None
        if tokenize is not None:
            try:
                _, answer = await self._call_json("prefill", "/tokenize", headers, tokenize)
                ids = answer.get("tokens") if isinstance(answer, dict) else None
                if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
                    log.info("prefill /tokenize gave no token ids; prefilling the whole prompt")
                    ids = None
            except SideError as exc:
                if exc.status in (503, 504):
                    raise
                # e.g. a chat /tokenize cannot render: the prefill gets the request whole and says why
                log.info(
                    "prefill /tokenize refused (%s); prefilling the whole prompt",
                    exc.status if exc.passthrough is not None else exc,
                )
        elif self.config.all_but_last and path == flow.COMPLETION and isinstance(body["prompt"], list):
            ids = body["prompt"]
        prefill_path, prefill = flow.prefill_body(path, body, ids)
        inst, answer = await self._call_json("prefill", prefill_path, headers, prefill)
        params = flow.usable_params(answer)
        if params is None:
            raise SideError(
                502,
                "prefill",
                inst,
                f"prefill {inst.url} answered without kv_transfer_params: is it "
                f"started with kv_role kv_producer and the ds-plugins connector?",
            )
        return params

    async def _decode(
        self, request: web.Request, path: str, body: dict, params: dict, headers: dict
    ) -> web.StreamResponse:
        async with self._open("decode", "POST", path, headers, flow.decode_body(body, params)) as (inst, resp):
            if resp.status != 200 or not body.get("stream"):
                return web.json_response(await self._read_json("decode", inst, resp))
            return await self._stream(request, inst, resp)

    async def _stream(self, request: web.Request, inst: Instance, resp: aiohttp.ClientResponse) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": resp.headers.get("Content-Type", "text/event-stream")})
        await out.prepare(request)
        try:
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        except ConnectionResetError:  # the client left: closing D's stream makes vLLM abort the request
            resp.close()
            return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            message = (
                f"decode {inst.url} sent nothing for {self.config.timeout_s:g} s (--timeout-s)"
                if isinstance(exc, asyncio.TimeoutError)
                else f"decode {inst.url} failed: {_why(exc)}"
            )
            log.warning("%s %s: stream broken: %s", request.method, request.path, message)
            code = 504 if isinstance(exc, asyncio.TimeoutError) else 502
            event = json.dumps(error_body(code, message, side="decode", instance=inst.url))
            try:
                await out.write(f"data: {event}\n\n".encode())
            except ConnectionResetError:
                return out
        await out.write_eof()
        return out

    async def models(self, request: web.Request) -> web.Response:
        headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
        try:
            async with self._open("decode", "GET", "/v1/models", headers) as (inst, resp):
                return web.json_response(await self._read_json("decode", inst, resp))
        except SideError as exc:
            return exc.response()

    async def health(self, _request: web.Request) -> web.Response:
        state = {name: side.describe() for name, side in self.sides.items()}
        down = [name for name, side in self.sides.items() if not side.any_healthy()]
        if down:
            detail = "; ".join(f"{name}: {self.sides[name].why_unavailable()}" for name in down)
            body = error_body(
                503, f"no healthy {' and no healthy '.join(down)} instance ({detail})", side=" and ".join(down)
            )
            return web.json_response({**body, **state}, status=503)
        return web.json_response({"status": "ok", **state})


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


PROXY = web.AppKey("proxy", Proxy)


def build(config: ProxyConfig) -> web.Application:
    proxy = Proxy(config)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[PROXY] = proxy
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_post(flow.COMPLETION, proxy.generate)
    app.router.add_post(flow.CHAT, proxy.generate)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    return app
