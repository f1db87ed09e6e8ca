"""Upstream clients: one pooled keep-alive client per provider.

Network upstreams use :mod:`tether.gateways.h1`, a lean HTTP/1.1 client on asyncio +
httptools (aiohttp's client path took ~27% of the gateway's event loop at c=64; httpx's pool
collapsed at 64 connections). It never sends a request twice: an LLM call costs money, so a
connection that fails once the request went out is an error, not a retry (see ``h1``).
``httpx`` transports remain for in-process upstreams: the bundled scripted model and the fakes
tests inject.

Keys are injected here, after the decision, from :class:`~tether.gateways.llm.config.Secret`;
nothing the agent sent in a header is forwarded except the Anthropic version / beta headers.
The ``scripted`` provider runs the bundled scripted model in-process through
:func:`streaming_asgi_transport`, which (unlike ``httpx.ASGITransport``) streams the body as the
app produces it and tells the app when the gateway stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import httpx

from tether.gateways.h1 import HttpClient, UpstreamFailed, UpstreamTimeout
from tether.gateways.llm.config import LLMSettings, Provider
from tether.gateways.llm.protocol import Api

__all__ = [
    "UpstreamClient",
    "UpstreamFailed",
    "UpstreamResponse",
    "UpstreamTimeout",
    "Upstreams",
    "streaming_asgi_transport",
]

ASGIApp = Callable[..., Any]
_PATH = {"chat": "/chat/completions", "responses": "/responses", "messages": "/v1/messages"}
ANTHROPIC_VERSION = "2023-06-01"
CLOSE_GRACE = 2.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a whole (non-streamed) upstream answer
IDLE_TIMEOUT = 30.0  # a pooled upstream connection idle longer than this is not reused


def streaming_asgi_transport(app: ASGIApp, http: Any = httpx) -> httpx.AsyncBaseTransport:
    """An httpx transport that calls the ASGI ``app`` in-process and streams its response body
    as the app produces it; closing the response tells the app the client went away. ``http``
    is the httpx module to build it for (the anthropic SDK ships a fork, ``httpx2``)."""

    class _Body(http.AsyncByteStream):  # type: ignore[misc]
        def __init__(
            self,
            queue: asyncio.Queue[bytes | None],
            task: asyncio.Task[None],
            closed: asyncio.Event,
        ) -> None:
            self._queue = queue
            self._task = task
            self._closed = closed

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                chunk = await self._queue.get()
                if chunk is None:
                    if self._task.done() and not self._task.cancelled():
                        exc = self._task.exception()
                        if exc is not None:
                            raise http.ReadError(f"upstream app failed: {type(exc).__name__}")
                    return
                yield chunk

        async def aclose(self) -> None:
            self._closed.set()  # the app's receive() now says http.disconnect
            if not self._task.done():
                # Like a server: give the app a moment to notice and finish, then cancel it.
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(self._task), CLOSE_GRACE)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task

    class _Transport(http.AsyncBaseTransport):  # type: ignore[misc]
        async def handle_async_request(self, request: Any) -> Any:
            body = await request.aread()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": request.method,
                "scheme": request.url.scheme,
                "path": request.url.path,
                "raw_path": request.url.raw_path.split(b"?")[0],
                "query_string": request.url.query,
                "headers": [(k.lower(), v) for k, v in request.headers.raw],
                "client": ("127.0.0.1", 0),
                "server": (request.url.host, request.url.port or 80),
            }
            queue: asyncio.Queue[bytes | None] = asyncio.Queue()
            closed = asyncio.Event()
            loop = asyncio.get_running_loop()
            started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = loop.create_future()
            sent_body = False

            async def receive() -> dict[str, Any]:
                nonlocal sent_body
                if not sent_body:
                    sent_body = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await closed.wait()
                return {"type": "http.disconnect"}

            async def send(msg: dict[str, Any]) -> None:
                if msg["type"] == "http.response.start":
                    if not started.done():
                        started.set_result((msg["status"], list(msg.get("headers", []))))
                elif msg["type"] == "http.response.body":
                    if closed.is_set():
                        raise OSError("client went away")
                    data = msg.get("body", b"")
                    if data:
                        queue.put_nowait(data)
                    if not msg.get("more_body", False):
                        queue.put_nowait(None)

            async def run() -> None:
                try:
                    await app(scope, receive, send)
                except BaseException as e:
                    if not started.done():
                        started.set_exception(http.ConnectError(f"upstream app failed: {e!r}"))
                    raise
                finally:
                    queue.put_nowait(None)

            task = asyncio.create_task(run())
            try:
                status, headers = await started
            except BaseException:
                task.cancel()
                raise
            return http.Response(status, headers=headers, stream=_Body(queue, task, closed))

    transport: httpx.AsyncBaseTransport = _Transport()
    return transport


class UpstreamResponse(Protocol):
    status_code: int

    async def aread(self) -> bytes: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool = False
    ) -> UpstreamResponse:
        """POST ``body``; with ``stream`` the body is read later (``aiter_raw``), otherwise it
        is read now. Raises :class:`UpstreamFailed` / :class:`UpstreamTimeout`."""
        ...

    async def aclose(self) -> None: ...


class _H1Client:
    """A network upstream: one :class:`~tether.gateways.h1.HttpClient` pool per provider,
    shared by every agent (no cookies, nothing from the environment, no redirects)."""

    def __init__(self, base: str, settings: LLMSettings) -> None:
        self._base = base.rstrip("/")
        self._client = HttpClient(
            max_connections=settings.max_connections,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            idle_timeout=IDLE_TIMEOUT,
            max_response_bytes=MAX_RESPONSE_BYTES,
        )

    def __repr__(self) -> str:
        return f"_H1Client({self._base!r})"

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool = False
    ) -> UpstreamResponse:
        resp = await self._client.request("POST", self._base + path, headers=headers, body=body)
        if not stream:
            try:
                await resp.aread()
            except BaseException:
                await resp.aclose()
                raise
        return resp

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxResponse:
    __slots__ = ("_resp", "status_code")

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status_code = resp.status_code

    async def aread(self) -> bytes:
        try:
            return await self._resp.aread()
        except httpx.HTTPError as e:
            raise _httpx_failed(e) from e

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            raise _httpx_failed(e) from e

    async def aclose(self) -> None:
        await self._resp.aclose()


def _httpx_failed(e: httpx.HTTPError) -> UpstreamFailed:
    if isinstance(e, httpx.TimeoutException):
        return UpstreamTimeout(type(e).__name__)
    return UpstreamFailed(type(e).__name__)


class _HttpxClient:
    """An in-process upstream (the scripted model, or a fake a test injects) over an httpx
    transport."""

    def __init__(self, transport: httpx.AsyncBaseTransport, settings: LLMSettings) -> None:
        self._client = httpx.AsyncClient(
            base_url="http://upstream.invalid",
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool = False
    ) -> UpstreamResponse:
        request = self._client.build_request("POST", path, content=body, headers=dict(headers))
        try:
            resp = await self._client.send(request, stream=stream)
        except httpx.HTTPError as e:
            raise _httpx_failed(e) from e
        return _HttpxResponse(resp)

    async def aclose(self) -> None:
        await self._client.aclose()


class Upstreams:
    """The pooled clients, built once; ``transports`` overrides a provider's (tests)."""

    def __init__(
        self,
        settings: LLMSettings,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        scripted_app: ASGIApp | None = None,
    ) -> None:
        self.settings = settings
        self._clients: dict[str, UpstreamClient] = {}
        self.scripted_app = scripted_app
        for name, p in settings.providers.items():
            transport = (transports or {}).get(name)
            if transport is None and p.kind == "scripted":
                transport = streaming_asgi_transport(self._scripted())
            if transport is not None:
                self._clients[name] = _HttpxClient(transport, settings)
            else:
                self._clients[name] = _H1Client(p.base_url or "", settings)

    def _scripted(self) -> ASGIApp:
        if self.scripted_app is None:
            from tether.gateways.llm.scripted import ScriptedModel

            self.scripted_app = ScriptedModel()
        return self.scripted_app

    def client(self, provider: str) -> UpstreamClient:
        return self._clients[provider]

    @staticmethod
    def path(provider: Provider, api: Api) -> str:
        if provider.kind == "scripted":
            return "/v1" + _PATH[api] if api != "messages" else _PATH[api]
        if provider.kind == "openai-compatible" and api == "messages":
            return "/messages"  # its base_url already ends in /v1
        return _PATH[api]

    @staticmethod
    def headers(provider: Provider, api: Api, inbound: Mapping[bytes, bytes]) -> dict[str, str]:
        h = {"content-type": "application/json", "accept": "application/json"}
        key = provider.api_key.reveal() if provider.api_key else None
        if api == "messages":
            h["anthropic-version"] = (
                inbound.get(b"anthropic-version", b"").decode("latin-1") or ANTHROPIC_VERSION
            )
            beta = inbound.get(b"anthropic-beta")
            if beta:
                h["anthropic-beta"] = beta.decode("latin-1")
            if key:
                h["x-api-key"] = key
        elif key:
            h["authorization"] = "Bearer " + key
        return h

    async def aclose(self) -> None:
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
