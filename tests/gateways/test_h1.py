"""The gateways' HTTP/1.1 client (``tether.gateways.h1``) against real servers: uvicorn on a
free port, raw asyncio servers that misbehave on purpose (garbage, huge heads, cut streams,
hangs, idle closes), a blocking-socket server for the one race that needs the loop held, and a
TLS server with a certificate made here. Every test runs on asyncio's loop and on uvloop (the
loop ``tether serve`` uses): their transports differ in the details this client relies on."""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import ipaddress
import json
import re
import socket
import ssl
import struct
import termios
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.gateways import h1
from tether.gateways.h1 import (
    HIGH_WATER,
    HttpClient,
    Response,
    UpstreamFailed,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

KEY = "sk-h1-test-secret-0123456789abcdef"
SECRET_HEADERS = {"authorization": f"Bearer {KEY}", "x-api-key": KEY}
BACKSTOP = 30.0  # a test that hangs fails after this; never a timing assertion

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(BACKSTOP):
                return await coro

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


async def eventually(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` (each loop turn) until it holds; fail after a generous deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.001)


# ---------------------------------------------------------------------------------------------
# servers

Script = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Raw:
    """A raw asyncio server running ``script`` on each connection; it counts connections,
    keeps every request it read (head + body) and notes connections the client closed."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Raw:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(self, r, w, self.connections)
        except ConnectionError:
            self.client_closed += 1
        except asyncio.IncompleteReadError:
            pass
        finally:
            self._tasks.discard(task)
            w.close()

    async def read_request(self, r: asyncio.StreamReader) -> bytes | None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_closed += 1
            return None
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await r.readexactly(int(m.group(1))) if m else b""
        self.requests.append(head + body)
        return head + body

    async def until_client_closes(self, r: asyncio.StreamReader) -> None:
        while await r.read(65536):
            pass
        self.client_closed += 1


def replies(*responses: bytes, close: bool = False) -> Script:
    """Answer the n-th request the server reads with ``responses[n]`` (the last one again
    after that); ``close`` closes each connection after its first answer."""

    async def script(srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while await srv.read_request(r) is not None:
            w.write(responses[min(len(srv.requests), len(responses)) - 1])
            await w.drain()
            if close:
                return

    return script


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A small real upstream: /echo answers with what it received (and sets a cookie); /sse
    sends one event, then the next only once the test opens ``GATES[id]``."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/echo":
        out = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query": scope["query_string"].decode(),
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "body": body.decode(),
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"set-cookie", b"sid=abc; Path=/")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        return
    gate = GATES[scope["query_string"].decode()]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", SSE)]})
    await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
    await gate.wait()
    await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


SSE = b"text/event-stream"
GATES: dict[str, asyncio.Event] = {}


@asynccontextmanager
async def uvicorn_server() -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or task.done(), "uvicorn started")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# ---------------------------------------------------------------------------------------------
# a real server: requests, headers, streams, keep-alive


def test_sends_exactly_what_it_is_given_plus_host_and_length(run: Run) -> None:
    async def main() -> None:
        async with uvicorn_server() as url:
            c = HttpClient()
            r = await c.request(
                "POST", url + "/echo?x=1", headers={"x-custom": "yes"}, body=b'{"a":1}'
            )
            assert r.status_code == 200
            assert r.header("Content-Type") == "application/json"
            doc = json.loads(await r.aread())
            assert (doc["method"], doc["query"], doc["body"]) == ("POST", "x=1", '{"a":1}')
            names = sorted(k for k, _ in doc["headers"])
            assert names == ["content-length", "host", "x-custom"]
            assert dict(doc["headers"])["host"] == url.removeprefix("http://")
            await c.aclose()

    run(main())


def test_no_cookie_is_carried_from_one_request_to_the_next(run: Run) -> None:
    async def main() -> None:
        async with uvicorn_server() as url:
            c = HttpClient()
            for _ in range(2):
                r = await c.request("GET", url + "/echo")
                assert r.header("set-cookie") == "sid=abc; Path=/"
                doc = json.loads(await r.aread())
                assert "cookie" not in dict(doc["headers"])
            await c.aclose()

    run(main())


def test_proxies_in_the_environment_are_ignored(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def main() -> None:
        async with uvicorn_server() as url:
            c = HttpClient()
            r = await c.request("GET", url + "/echo")
            assert r.status_code == 200
            await c.aclose()

    run(main())


def test_an_sse_stream_is_handed_over_event_by_event(run: Run) -> None:
    """The second event is only sent once the test has seen the first through the client: a
    client that buffered the whole body would never hand over the first and the test would hang
    (and fail at its backstop)."""

    async def main() -> None:
        async with uvicorn_server() as url:
            key = uuid.uuid4().hex
            gate = GATES[key] = asyncio.Event()
            c = HttpClient()
            r = await c.request("GET", f"{url}/sse?{key}")
            assert r.header("content-type") == "text/event-stream"
            got: list[bytes] = []
            async for chunk in r.aiter_raw():
                got.append(chunk)
                if chunk == b"data: one\n\n":
                    gate.set()
            assert b"".join(got) == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
            assert got[0] == b"data: one\n\n"
            await r.aclose()
            await c.aclose()

    run(main())


def test_keep_alive_connections_are_reused(run: Run) -> None:
    async def main() -> None:
        async with Raw(replies(ok(b"first"), ok(b"second"), ok(b"third"))) as srv:
            c = HttpClient()
            bodies = []
            for _ in range(3):
                r = await c.request("POST", srv.url + "/v1/x", body=b"{}")
                bodies.append(await r.aread())
            assert bodies == [b"first", b"second", b"third"]
            assert srv.connections == 1 and len(srv.requests) == 3
            await c.aclose()

    run(main())


def test_concurrent_requests_each_get_their_own_connection_and_answer(run: Run) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            while (req := await srv.read_request(r)) is not None:
                w.write(ok(req.split(b"\r\n\r\n", 1)[1]))  # echo the body

        async with Raw(script) as srv:
            c = HttpClient(max_connections=8)

            async def one(i: int) -> bytes:
                r = await c.request("POST", srv.url + "/", body=b"n=%d" % i)
                return await r.aread()

            out = await asyncio.gather(*(one(i) for i in range(40)))
            assert out == [b"n=%d" % i for i in range(40)]
            assert srv.connections <= 8
            await c.aclose()

    run(main())


# ---------------------------------------------------------------------------------------------
# bodies: framing, chunked extensions, trailers, interim responses, HEAD, limits


GOOD_RESPONSES: dict[str, tuple[bytes, int, bytes, bool]] = {
    # name: (bytes the server sends, status, body the client must see, connection reusable)
    "content_length": (ok(b"hello"), 200, b"hello", True),
    "chunked_with_extensions_and_trailers": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
        200,
        b"hello world",
        True,
    ),
    "body_until_close": (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of this until the end",
        200,
        b"all of this until the end",
        False,
    ),
    "connection_close_with_length": (ok(b"bye", b"connection: close\r\n"), 200, b"bye", False),
    "interim_103_then_200": (
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + ok(b"final"),
        200,
        b"final",
        True,
    ),
    "no_content_204": (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    "error_status_with_body": (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}",
        429,
        b"{}",
        True,
    ),
}


@pytest.mark.parametrize("case", list(GOOD_RESPONSES), ids=list(GOOD_RESPONSES))
def test_response_framings(run: Run, case: str) -> None:
    raw, status, body, reusable = GOOD_RESPONSES[case]

    async def main() -> None:
        async with Raw(replies(raw, ok(b"next"), close=not reusable)) as srv:
            c = HttpClient()
            r = await c.request("POST", srv.url + "/", body=b"{}")
            assert r.status_code == status
            assert r.header("link") is None  # the interim response's headers are not kept
            assert await r.aread() == body
            assert await r.aread() == body  # the same bytes again
            assert [x async for x in r.aiter_raw()] == ([body] if body else [])
            r2 = await c.request("POST", srv.url + "/", body=b"{}")
            assert await r2.aread() == b"next"
            assert srv.connections == (1 if reusable else 2)
            await c.aclose()

    run(main())


def test_head_returns_at_the_headers(run: Run) -> None:
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
        async with Raw(replies(head)) as srv:
            c = HttpClient()
            r = await c.request("HEAD", srv.url + "/")
            assert r.status_code == 200 and r.header("content-length") == "1000"
            assert await r.aread() == b""
            await c.aclose()

    run(main())


def test_aread_refuses_a_body_over_its_limit_and_drops_the_connection(run: Run) -> None:
    async def main() -> None:
        async with Raw(replies(ok(b"x" * 5000), ok(b"small"))) as srv:
            c = HttpClient(max_response_bytes=4096)
            r = await c.request("GET", srv.url + "/")
            with pytest.raises(UpstreamProtocolError, match="larger than 4096 bytes"):
                await r.aread()
            r = await c.request("GET", srv.url + "/")
            assert await r.aread(max_bytes=10) == b"small"
            await c.aclose()

    run(main())


def test_a_slow_reader_holds_the_upstream_back_instead_of_buffering(run: Run) -> None:
    """Reading pauses once HIGH_WATER bytes wait unconsumed: the rest stays in the kernel
    (visible as the socket's unread queue) until the reader catches up."""
    total = 16 * 1024 * 1024

    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
            piece = b"z" * 65536
            for _ in range(total // len(piece)):
                w.write(piece)
                await w.drain()

        async with Raw(script) as srv:
            c = HttpClient()
            r = await c.request("GET", srv.url + "/")
            conn = r._conn
            assert conn is not None and conn.transport is not None
            fd = conn.transport.get_extra_info("socket").fileno()

            def unread() -> int:
                buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
                return int(struct.unpack("i", buf)[0])

            await eventually(lambda: r._buffered > HIGH_WATER, "the client buffered HIGH_WATER")
            for _ in range(200):  # loop turns in which an eager client would read on
                await asyncio.sleep(0)
            assert r._buffered <= HIGH_WATER + 256 * 1024  # at most one read past the mark
            assert unread() > 0  # the rest waits in the kernel, not in our memory
            got = 0
            async for chunk in r.aiter_raw():
                got += len(chunk)
            assert got == total
            await c.aclose()

    run(main())


# ---------------------------------------------------------------------------------------------
# misbehaving upstreams


BAD_RESPONSES: dict[str, bytes] = {
    "not_http": b"HELLO WORLD\r\n\r\n",
    "binary_noise": bytes(range(256)) * 4,
    "bad_status_code": b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n",
    "bad_chunk_size": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "two_content_lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
    "length_and_chunked": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "header_without_colon": b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 0\r\n\r\n",
    "huge_header_value": b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\nok",
    "many_headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 100) for i in range(1000))
    + b"content-length: 0\r\n\r\n",
    "endless_head": b"HTTP/1.1 200 OK\r\n" + b"x-more: yes\r\n" * 20_000,
    "endless_header_value": b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 300_000,
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_RESPONSES), ids=list(BAD_RESPONSES))
def test_a_response_that_is_not_http_is_a_protocol_error(run: Run, case: str) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write(BAD_RESPONSES[case])
            await w.drain()
            await srv.until_client_closes(r)  # the client, not the server, ends it

        async with Raw(script) as srv:
            c = HttpClient(max_header_bytes=64 * 1024)
            with pytest.raises(UpstreamProtocolError) as e:
                r = await c.request("POST", srv.url + "/", headers=SECRET_HEADERS, body=b"{}")
                await r.aread()
            assert KEY not in str(e.value) and KEY not in repr(e.value)
            await eventually(lambda: srv.client_closed == 1, "the client dropped the connection")
            await c.aclose()

    run(main())


async def _cut_after(
    srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, sent: bytes
) -> None:
    await srv.read_request(r)
    w.write(sent)
    await w.drain()


BROKEN: dict[str, tuple[bytes, str]] = {
    # name: (what the server sends before closing, the failure's text)
    "closed_before_answering": (b"", "before answering"),
    "closed_mid_head": (b"HTTP/1.1 200 OK\r\ncontent-le", "before answering"),
    "closed_mid_body": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"h" * 50,
        "mid-response",
    ),
    "chunked_stream_cut": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n8\r\ndata: t",
        "mid-response",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_connection_cut_short_is_a_failure_never_a_short_body(run: Run, case: str) -> None:
    sent, text = BROKEN[case]

    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await _cut_after(srv, r, w, sent)

        async with Raw(script) as srv:
            c = HttpClient()
            got: list[bytes] = []
            with pytest.raises(UpstreamFailed, match=text) as e:
                r = await c.request("POST", srv.url + "/", headers=SECRET_HEADERS, body=b"{}")
                async for chunk in r.aiter_raw():
                    got.append(chunk)
            assert not isinstance(e.value, (UpstreamTimeout, UpstreamProtocolError))
            if case == "chunked_stream_cut":  # what did arrive was handed over first
                assert b"".join(got) == b"data: one\n\ndata: t"
            assert len(srv.requests) == 1  # and it was not sent again
            await c.aclose()

    run(main())


def test_a_silent_upstream_times_out_and_so_does_a_stalled_body(run: Run) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            if n == 2:  # the second connection stalls after part of a body
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            await srv.until_client_closes(r)

        async with Raw(script) as srv:
            c = HttpClient(read_timeout=0.2)
            with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0\.2s"):
                await c.request("POST", srv.url + "/", body=b"{}")
            r = await c.request("POST", srv.url + "/", body=b"{}")
            got = []
            with pytest.raises(UpstreamTimeout):
                async for chunk in r.aiter_raw():
                    got.append(chunk)
            assert got == [b"abc"]
            await eventually(lambda: srv.client_closed == 2, "both connections closed")
            await c.aclose()

    run(main())


def test_a_connection_refused_is_unreachable(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> None:
        c = HttpClient()
        with pytest.raises(UpstreamUnreachable, match="cannot connect"):
            await c.request("POST", f"http://127.0.0.1:{port}/", headers=SECRET_HEADERS)
        await c.aclose()

    run(main())


def test_a_connect_that_hangs_times_out(run: Run) -> None:
    async def main() -> None:
        with socket.socket() as s:  # a full backlog: the kernel drops further SYNs
            s.bind(("127.0.0.1", 0))
            s.listen(0)
            port = s.getsockname()[1]
            filler = socket.create_connection(("127.0.0.1", port))
            try:
                c = HttpClient(connect_timeout=0.2)
                with pytest.raises(UpstreamTimeout, match="connecting"):
                    await c.request("GET", f"http://127.0.0.1:{port}/")
                await c.aclose()
            finally:
                filler.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# the pool: bound, abandoned responses, cancellation, idle closes and the retry rule


def test_the_pool_is_bounded_and_a_waiter_gets_the_freed_connection(run: Run) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            while await srv.read_request(r) is not None:
                if len(srv.requests) == 1:  # the first answer is held until the test says
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                    await release.wait()
                    w.write(b"cd")
                else:
                    w.write(ok())

        async with Raw(script) as srv:
            c = HttpClient(max_connections=1, connect_timeout=0.3)
            first = await c.request("GET", srv.url + "/")
            with pytest.raises(UpstreamTimeout, match="no connection to the upstream came free"):
                await c.request("GET", srv.url + "/")
            waiting = asyncio.ensure_future(c.request("GET", srv.url + "/"))
            release.set()
            assert await first.aread() == b"abcd"
            assert await (await waiting).aread() == b"ok"
            assert srv.connections == 1
            await c.aclose()

    run(main())


def test_closing_a_half_read_response_closes_its_connection(run: Run) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            while await srv.read_request(r) is not None:
                if n == 1:
                    w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
                    await srv.until_client_closes(r)
                    return
                w.write(ok(b"fresh"))

        async with Raw(script) as srv:
            c = HttpClient()
            r = await c.request("GET", srv.url + "/")
            async for chunk in r.aiter_raw():
                assert chunk == b"abc"
                break
            await r.aclose()
            await eventually(lambda: srv.client_closed == 1, "the server saw the close")
            r2 = await c.request("GET", srv.url + "/")
            assert await r2.aread() == b"fresh"
            assert srv.connections == 2
            await c.aclose()

    run(main())


def test_a_cancelled_request_closes_its_connection_and_frees_its_slot(run: Run) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            if n == 1:
                await srv.until_client_closes(r)  # never answers the first
            else:
                w.write(ok())

        async with Raw(script) as srv:
            c = HttpClient(max_connections=1, connect_timeout=5)
            task = asyncio.ensure_future(c.request("POST", srv.url + "/", body=b"{}"))
            await eventually(lambda: len(srv.requests) == 1, "the upstream got the request")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eventually(lambda: srv.client_closed == 1, "the upstream saw the client go")
            r = await c.request("POST", srv.url + "/", body=b"{}")  # the one slot is free
            assert await r.aread() == b"ok"
            await c.aclose()

    run(main())


def test_stray_bytes_after_a_response_retire_the_connection(run: Run) -> None:
    async def main() -> None:
        async with Raw(replies(ok(b"one") + b"EXTRA BYTES", ok(b"two"))) as srv:
            c = HttpClient()
            r = await c.request("GET", srv.url + "/")
            assert await r.aread() == b"one"
            r = await c.request("GET", srv.url + "/")
            assert await r.aread() == b"two"
            assert srv.connections == 2 and len(srv.requests) == 2
            await c.aclose()

    run(main())


def test_keep_alive_timeout_announced_by_the_upstream_is_respected(run: Run) -> None:
    async def main() -> None:
        short = ok(b"x", b"keep-alive: timeout=1, max=100\r\n")
        async with Raw(replies(short)) as srv:
            c = HttpClient()
            for _ in range(2):
                await (await c.request("GET", srv.url + "/")).aread()
            # 1s minus our margin leaves nothing: never reused
            assert srv.connections == 2
            await c.aclose()

    run(main())


def test_idle_timeout_zero_means_no_reuse(run: Run) -> None:
    async def main() -> None:
        async with Raw(replies(ok())) as srv:
            c = HttpClient(idle_timeout=0)
            for _ in range(3):
                await (await c.request("GET", srv.url + "/")).aread()
            assert srv.connections == 3
            await c.aclose()

    run(main())


def test_an_idle_connection_the_upstream_closed_is_not_used(run: Run) -> None:
    """The upstream closes each connection some time after answering (an idle timeout), with
    no ``Connection: close``: the next request goes out on a new connection, once."""

    async def main() -> None:
        closed = asyncio.Event()

        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write(ok(b"%d" % n))
            await w.drain()
            w.close()
            await w.wait_closed()
            closed.set()

        async with Raw(script) as srv:
            c = HttpClient()
            assert await (await c.request("POST", srv.url + "/", body=b"{}")).aread() == b"1"
            await closed.wait()
            await eventually(
                lambda: not any(p.idle for p in c._pools.values()), "the pool saw the close"
            )
            assert await (await c.request("POST", srv.url + "/", body=b"{}")).aread() == b"2"
            assert srv.connections == 2 and len(srv.requests) == 2
            await c.aclose()

    run(main())


def test_a_close_the_loop_has_not_seen_yet_is_caught_before_writing(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's FIN is in the socket but the loop has not run since (the test holds it):
    the pool's zero-timeout poll sees it, so the request goes to a new connection instead of
    into a dead one. A blocking-socket server in a thread, so the loop can stay held. (The
    pool polls only connections idle for ``POLL_IDLE_AFTER``; here at once.)"""
    monkeypatch.setattr(h1, "POLL_IDLE_AFTER", 0.0)
    requests: list[tuple[int, bytes]] = []
    first_closed = threading.Event()

    def serve(listener: socket.socket) -> None:
        for n in (1, 2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                requests.append((n, data))
                conn.sendall(ok(b"%d" % n))
                if n == 1:
                    conn.shutdown(socket.SHUT_RDWR)
                    first_closed.set()
                else:
                    while conn.recv(65536):
                        pass

    async def main(port: int) -> None:
        c = HttpClient()
        url = f"http://127.0.0.1:{port}/"
        assert await (await c.request("POST", url, body=b"")).aread() == b"1"
        # Block the loop (deliberately) until the server has closed: the FIN is now waiting
        # in our socket, unseen by the loop.
        assert first_closed.wait(10)
        assert await (await c.request("POST", url, body=b"")).aread() == b"2"
        await c.aclose()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        t = threading.Thread(target=serve, args=(listener,), daemon=True)
        t.start()
        run(main(listener.getsockname()[1]))
        t.join(10)
    assert [n for n, _ in requests] == [1, 2]


def test_a_request_that_went_out_is_never_sent_again(run: Run) -> None:
    """The rule for money-costing POSTs: the upstream read the request on a reused connection
    and closed it without a byte of answer. That is reported, not retried: the upstream may
    have done the work."""

    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write(ok(b"first"))
            await srv.read_request(r)  # read the second in full ... and hang up

        async with Raw(script) as srv:
            c = HttpClient()
            assert await (await c.request("POST", srv.url + "/", body=b"{}")).aread() == b"first"
            with pytest.raises(UpstreamFailed, match="closed the connection before answering"):
                await c.request("POST", srv.url + "/", headers=SECRET_HEADERS, body=b'{"n":2}')
            assert srv.connections == 1 and len(srv.requests) == 2
            await c.aclose()

    run(main())


# ---------------------------------------------------------------------------------------------
# TLS


def self_signed(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``names`` and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@asynccontextmanager
async def tls_server(cert: Path, key: Path, sni: list[str | None]) -> AsyncIterator[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, c: sni.append(name)  # type: ignore[assignment,func-returns-value]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await r.readexactly(int(m.group(1))) if m else b""
                w.write(ok(b"tls:" + body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def test_https_verifies_the_certificate_and_sends_sni(run: Run, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])

    async def main() -> None:
        sni: list[str | None] = []
        async with tls_server(cert, key, sni) as port:
            trusting = HttpClient(cafile=str(cert))
            for _ in range(2):
                r = await trusting.request("POST", f"https://localhost:{port}/v1", body=b"hi")
                assert await r.aread() == b"tls:hi"
            assert sni == ["localhost"]  # one handshake: the second request reused it
            await trusting.aclose()

            default = HttpClient()  # the system's CAs: a self-signed certificate is refused
            with pytest.raises(UpstreamUnreachable, match="certificate") as e:
                await default.request(
                    "POST", f"https://localhost:{port}/v1", headers=SECRET_HEADERS
                )
            assert KEY not in str(e.value)
            await default.aclose()

    run(main())


def test_https_refuses_a_certificate_for_another_name(run: Run, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ["upstream.example"])

    async def main() -> None:
        async with tls_server(cert, key, []) as port:
            c = HttpClient(cafile=str(cert))
            with pytest.raises(UpstreamUnreachable, match="certificate"):
                await c.request("GET", f"https://127.0.0.1:{port}/")
            await c.aclose()

    run(main())


# ---------------------------------------------------------------------------------------------
# bad input from the caller, and secrets


BAD_HEADERS: dict[str, dict[str, str]] = {
    "crlf_in_value": {"authorization": f"Bearer {KEY}\r\nx-injected: 1"},
    "lf_in_value": {"x-api-key": f"{KEY}\nx-injected: 1"},
    "nul_in_value": {"x-api-key": f"{KEY}\x00"},
    "space_in_name": {"bad name": KEY},
    "colon_in_name": {"x:y": KEY},
    "empty_name": {"": KEY},
    "content_length_given": {"content-length": "5"},
    "transfer_encoding_given": {"Transfer-Encoding": "chunked"},
    "not_latin1": {"x-api-key": KEY + "\u2603"},
}


@pytest.mark.parametrize("case", list(BAD_HEADERS), ids=list(BAD_HEADERS))
def test_bad_headers_are_refused_before_anything_is_sent(run: Run, case: str) -> None:
    async def main() -> None:
        async with Raw(replies(ok())) as srv:
            c = HttpClient()
            with pytest.raises(ValueError) as e:
                await c.request("POST", srv.url + "/", headers=BAD_HEADERS[case], body=b"hello")
            assert KEY not in str(e.value)
            assert srv.connections == 0
            await c.aclose()

    run(main())


BAD_URLS: dict[str, str] = {
    "not_http": "ftp://127.0.0.1/x",
    "no_host": "http:///x",
    "credentials_in_url": f"http://user:{KEY}@127.0.0.1/x",
    "space_in_path": "http://127.0.0.1/a b",
    "crlf_in_path": "http://127.0.0.1/a\r\nx-injected: 1",
    "bad_port": "http://127.0.0.1:99999/",
}


@pytest.mark.parametrize("case", list(BAD_URLS), ids=list(BAD_URLS))
def test_bad_urls_are_refused(run: Run, case: str) -> None:
    async def main() -> None:
        c = HttpClient()
        with pytest.raises(ValueError) as e:
            await c.request("GET", BAD_URLS[case])
        assert KEY not in str(e.value)
        await c.aclose()

    run(main())


def test_no_credential_in_any_error_or_repr(run: Run) -> None:
    """Every failure path the gateway can meet, with the key in two headers: no message, repr
    or chained cause mentions it."""

    async def main() -> None:
        texts: list[str] = []

        def seen(e: BaseException | None) -> None:
            while e is not None:
                texts.extend((str(e), repr(e)))
                e = e.__cause__ or e.__context__

        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write([b"", b"NOT HTTP\r\n\r\n", ok(b"x" * 100)][n % 3])
            await w.drain()

        async with Raw(script) as srv:
            c = HttpClient(max_response_bytes=10)
            for _ in range(3):
                try:
                    r = await c.request("POST", srv.url + "/", headers=SECRET_HEADERS, body=b"{}")
                    texts.append(repr(r))
                    await r.aread()
                except UpstreamFailed as e:
                    seen(e)
            texts.append(repr(c))
            texts += [repr(p) for p in c._pools.values()] + [
                repr(conn) for p in c._pools.values() for conn in p.conns
            ]
            await c.aclose()
        assert len(texts) >= 6
        assert not [t for t in texts if KEY in t]

    run(main())


def test_a_closed_client_refuses_requests_and_fails_open_streams(run: Run) -> None:
    async def main() -> None:
        async def script(
            srv: Raw, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
        ) -> None:
            await srv.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            await srv.until_client_closes(r)

        async with Raw(script) as srv:
            c = HttpClient()
            r: Response = await c.request("GET", srv.url + "/")
            await c.aclose()
            with pytest.raises(UpstreamFailed, match="closed"):
                await r.aread()
            with pytest.raises(UpstreamFailed, match="closed"):
                await c.request("GET", srv.url + "/")

    run(main())
