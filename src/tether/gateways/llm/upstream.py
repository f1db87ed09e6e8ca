"""Upstream clients: one pooled keep-alive ``httpx.AsyncClient`` per provider.

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
from typing import Any

import httpx

from tether.gateways.llm.config import LLMSettings, Provider
from tether.gateways.llm.protocol import Api

__all__ = ["Upstreams", "streaming_asgi_transport"]

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


class Upstreams:
    """The pooled clients, built once; ``transports`` overrides a provider's (tests)."""

    def __init__(
        self,
        settings: LLMSettings,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        scripted_app: ASGIApp | None = None,
    ) -> None:
        self.settings = settings
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.scripted_app = scripted_app
        timeout = httpx.Timeout(
            settings.read_timeout,
            connect=settings.connect_timeout,
            pool=settings.connect_timeout,
        )
        limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
            keepalive_expiry=30.0,
        )
        for name, p in settings.providers.items():
            transport = (transports or {}).get(name)
            if transport is None and p.kind == "scripted":
                transport = streaming_asgi_transport(self._scripted())
            base = p.base_url or "http://scripted.invalid"
            self._clients[name] = httpx.AsyncClient(
                base_url=base,
                timeout=timeout,
                limits=limits,
                transport=transport,
                follow_redirects=False,
                trust_env=False,
            )

    def _scripted(self) -> ASGIApp:
        if self.scripted_app is None:
            from tether.gateways.llm.scripted import ScriptedModel

            self.scripted_app = ScriptedModel()
        return self.scripted_app

    def client(self, provider: str) -> httpx.AsyncClient:
        return self._clients[provider]

    @staticmethod
    def path(provider: Provider, api: Api) -> str:
        if provider.kind == "scripted":
            return "/v1" + _PATH[api] if api != "messages" else _PATH[api]
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
