"""Upstream clients: one pooled keep-alive client per provider.

Network upstreams use ``aiohttp`` (measured here at c=64 against a local upstream: 5,450
calls/s and 0.24 ms per keep-alive call, against httpx's 560 calls/s and 0.85 ms: httpcore's
pool rescans every connection on each request). ``httpx`` transports remain for in-process
upstreams: the bundled scripted model and the fakes tests inject.

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

import aiohttp
import httpx

from tether.gateways.llm.config import LLMSettings, Provider
from tether.gateways.llm.protocol import Api
from tether.gateways.pool import shared_session

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


class UpstreamFailed(Exception):
    """The upstream could not be reached or broke the connection (the library's error is the
    ``__cause__``; its text never reaches the agent)."""


class UpstreamTimeout(UpstreamFailed):
    """Connecting to or reading from the upstream took longer than its timeout."""


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


class _AiohttpResponse:
    __slots__ = ("_body", "_resp", "status_code")

    def __init__(self, resp: aiohttp.ClientResponse, body: bytes | None) -> None:
        self._resp = resp
        self._body = body
        self.status_code = resp.status

    async def aread(self) -> bytes:
        if self._body is None:
            try:
                self._body = await self._resp.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                raise _failed(e) from e
        return self._body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._body is not None:
            yield self._body
            return
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _failed(e) from e

    async def aclose(self) -> None:
        self._resp.release() if self._resp.content.at_eof() else self._resp.close()


def _failed(e: BaseException) -> UpstreamFailed:
    if isinstance(e, TimeoutError):  # aiohttp's timeouts subclass it
        return UpstreamTimeout(type(e).__name__)
    return UpstreamFailed(type(e).__name__)


class _AiohttpClient:
    """A network upstream: one aiohttp session with a keep-alive pool, shared by every agent
    (see :func:`tether.gateways.pool.shared_session`); no redirects followed."""

    def __init__(self, base: str, settings: LLMSettings) -> None:
        self._base = base.rstrip("/")
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Built on first use: a session binds the running event loop.
        s = self._settings
        self._session = shared_session(
            aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=s.connect_timeout, sock_read=s.read_timeout
            ),
        )
        return self._session

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool = False
    ) -> UpstreamResponse:
        session = self._session or self._open()
        try:
            resp = await session.post(
                self._base + path, data=body, headers=dict(headers), allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _failed(e) from e
        if stream:
            return _AiohttpResponse(resp, None)
        try:
            content = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            resp.close()
            raise _failed(e) from e
        resp.release()
        return _AiohttpResponse(resp, content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


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
                self._clients[name] = _AiohttpClient(p.base_url or "", settings)

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
