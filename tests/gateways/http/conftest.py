"""Fixtures for the HTTP gateway: real services (audit log, verifier, Cedar core), a real
upstream (raw ASGI on uvicorn, on a free port, in the test's event loop) that records what it
received, and a helper that drives the gateway with a hand-built ASGI scope (so a test can
send what no HTTP client would: ``..`` segments, CR/LF in a header value)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from tether.gateways.http.config import parse_http_config
from tether.gateways.http.gateway import HTTPGateway
from tether.server.services import Services

SECRET = "crm-upstream-secret-0123456789abcdef"
BASIC_PASSWORD = "basic-pw-9876543210-zyxw"
HEADER_KEY = "hdr-key-5555-aaaa-bbbb-cccc"
ENV = {"CRM_TOKEN": SECRET, "BILLING_PW": BASIC_PASSWORD, "MAPS_KEY": HEADER_KEY}
DEFAULT_GRANTS = ["http:crm/*", "http:billing/*", "http:maps/*", "http:open/*"]


@dataclass
class Seen:
    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v.decode("latin-1") for n, v in self.headers if n == name.encode()]


@dataclass
class Upstream:
    """A real upstream. Echoes what it got as JSON; special paths under the base path:
    ``/stream`` (chunks, the second only after ``release`` is set), ``/hang``, ``/hang-mid``,
    ``/big/N``, ``/cookie``, ``/redirect``, ``/status/N``."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    never: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        seen = Seen(
            scope["method"],
            scope["path"],
            scope.get("raw_path", b""),
            scope["query_string"],
            list(scope["headers"]),
            body,
        )
        self.seen.append(seen)
        path = scope["path"].removeprefix("/api")
        if path == "/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/hang":
            await self.never.wait()
            return
        if path == "/hang-mid":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            await self.never.wait()
            return
        if path.startswith("/big/"):
            n = int(path.rsplit("/", 1)[1])
            await self._reply(send, 200, b"x" * n, b"application/octet-stream")
            return
        if path == "/chunked-big":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(8):
                await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        extra: list[tuple[bytes, bytes]] = []
        status = 200
        if path == "/cookie":
            extra.append((b"set-cookie", b"session=upstream-session-abc; HttpOnly"))
        if path == "/redirect":
            status = 302
            extra.append((b"location", (self.base + "/api/customers/1").encode()))
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        doc = {
            "method": seen.method,
            "path": seen.path,
            "query": seen.query.decode(),
            "headers": {n.decode(): v.decode("latin-1") for n, v in seen.headers},
            "body": body.decode("latin-1"),
        }
        await self._reply(send, status, json.dumps(doc).encode(), b"application/json", extra)

    @staticmethod
    async def _reply(
        send: Any, status: int, body: bytes, ctype: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Run ``app`` on uvicorn on a free port in this event loop; yields its base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="critical", access_log=False)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the test runner owns signals
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(10):
                await task
        sock.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    async with serve_app(up) as base:
        up.base = base
        yield up
        up.never.set()
        up.release.set()


def table_for(base: str, **over: Any) -> dict[str, Any]:
    crm: dict[str, Any] = {
        "base_url": base + "/api",
        "auth": {"type": "bearer", "secret_env": "CRM_TOKEN"},
        "timeout": "2s",
        "rules": [
            {
                "methods": ["GET", "HEAD"],
                "paths": [
                    "/customers",
                    "/customers/*",
                    "/stream",
                    "/hang",
                    "/hang-mid",
                    "/big/*",
                    "/chunked-big",
                    "/cookie",
                    "/redirect",
                    "/status/*",
                ],
            },
            {"methods": ["POST"], "paths": ["/orders"], "effects": ["crm.write"]},
            {"methods": ["POST"], "paths": ["/notes"]},
        ],
    }
    crm.update(over.pop("crm", {}))
    return {
        "record_body_bytes": 4096,
        "services": {
            "crm": crm,
            "billing": {
                "base_url": base + "/api",
                "auth": {"type": "basic", "user": "svc", "secret_env": "BILLING_PW"},
            },
            "maps": {
                "base_url": base + "/api",
                "auth": {"type": "header", "name": "X-Api-Key", "secret_env": "MAPS_KEY"},
            },
            "open": {"base_url": base + "/api"},
            **over.pop("services", {}),
        },
        **over,
    }


@pytest.fixture
def http_table(upstream: Upstream) -> dict[str, Any]:
    return table_for(upstream.base)


@pytest.fixture
async def gateway(services: Services, http_table: dict[str, Any]) -> AsyncIterator[HTTPGateway]:
    gw = HTTPGateway(
        parse_http_config(http_table, env=ENV),
        verify=services.verifier.verify,
        core=services.core,
        audit=services.audit,
    )
    yield gw
    await gw.aclose()


@pytest.fixture
def mint(services: Services, admin_token: str) -> Callable[..., str]:
    admin = services.verifier.verify(admin_token)

    def mint(grants: list[str] | None = None, name: str = "bot", labels: Sequence[str] = ()) -> str:
        return services.authority.delegate(
            admin,
            name,
            DEFAULT_GRANTS if grants is None else grants,
            task="task-1",
            labels=list(labels),
        ).token

    return mint


@pytest.fixture
def token(mint: Callable[..., str]) -> str:
    return mint()


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # the response ended with more_body False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name.encode():
                return v.decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_call(
    app: Any,
    method: str,
    raw_path: bytes | str,
    *,
    token: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    query: bytes = b"",
    chunks: Sequence[bytes] | None = None,
    on_body: Callable[[bytes], Any] | None = None,
    gone: asyncio.Event | None = None,
) -> Reply:
    """Drive ``app`` with a hand-built scope, as a server would after parsing the request."""
    raw = raw_path.encode() if isinstance(raw_path, str) else raw_path
    hs = [(b"host", b"tether.test")]
    if token is not None:
        hs.append((b"authorization", b"Bearer " + token.encode()))
    hs += list(headers)
    if body and chunks is None and not any(n == b"content-length" for n, _ in hs):
        hs.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw.decode("latin-1"),
        "raw_path": raw,
        "query_string": query,
        "headers": hs,
        "client": ("10.1.2.3", 5555),
        "server": ("tether.test", 80),
    }
    parts = list(chunks) if chunks is not None else [body]
    gone = gone or asyncio.Event()  # set it to make the client go away

    async def receive() -> dict[str, Any]:
        if parts:
            data = parts.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(parts)}
        await gone.wait()
        return {"type": "http.disconnect"}

    status = 0
    out_headers: list[tuple[bytes, bytes]] = []
    got: list[bytes] = []
    complete = False

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status, out_headers, complete
        if msg["type"] == "http.response.start":
            status = msg["status"]
            out_headers = list(msg.get("headers", []))
        elif msg["type"] == "http.response.body":
            data = msg.get("body", b"")
            got.append(data)
            if on_body is not None and data:
                r = on_body(data)
                if asyncio.iscoroutine(r):
                    await r
            if not msg.get("more_body", False):
                complete = True

    try:
        await app(scope, receive, send)
    finally:
        gone.set()
    return Reply(status, out_headers, b"".join(got), complete)
