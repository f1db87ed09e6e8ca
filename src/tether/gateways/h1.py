"""A lean HTTP/1.1 client for the gateways' upstream calls, on asyncio + httptools.

Why not aiohttp: at 64 concurrent calls its client path (session, request object, stream
writer, response handler) took ~27% of the LLM gateway's event loop. A gateway needs far less:
keep-alive connections per origin, one request at a time on each, the response parsed by
httptools (llhttp, Node.js's parser) straight from ``data_received``, the body handed over as
it arrives. The MCP gateway's ``mcp/_http.py`` does the same for JSON-RPC; this one is generic.

What it does: pooled keep-alive connections per origin (bounded; a caller over the bound waits
for a free one within the connect timeout), connect / read / idle timeouts, http and https
(``ssl.create_default_context``: certificate and host name verified, SNI, an optional CA file),
bodies framed by Content-Length, chunked transfer coding or the end of the connection, reading
paused while a streamed body is not being consumed. A connection goes back to the pool the
moment its response has been read in full; one abandoned half-read is closed.

What it never does: cookies, proxies or anything else from the environment, redirects,
compression, retries after sending. It adds exactly two headers, Host and Content-Length.
Exception messages and reprs never contain a header value, so an upstream credential in
``authorization`` / ``x-api-key`` cannot leak through them.

The retry rule (a POST to a model costs money): a request is written to a socket at most once.
A pooled connection found closed before the request is written to it is dropped and the
request goes to another connection, a fresh one if need be: closed means the loop saw the
peer's FIN or RST, the transport is closing, the idle timeout (or the upstream's own
``Keep-Alive: timeout``) passed, or, for a connection idle a second or more, a zero-timeout
poll finds its socket readable (a FIN, a reset or stray bytes the loop has not seen yet).
Once a byte of the request has been handed to the socket, any failure is reported and never
retried, even when no byte of the response came back: the upstream (or a load balancer in
front of it) may have read the request and started work, and TCP cannot tell us otherwise (a
reset proves nothing about a balancer that already forwarded it). Idempotent methods get no
exception to this: the caller decides.

Errors::

    UpstreamFailed              could not complete the exchange (the message says how)
    ├── UpstreamTimeout         connect (or the wait for a pooled connection), or no bytes
    │                           from the upstream for read_timeout
    ├── UpstreamUnreachable     the connection could not be made (refused, DNS, TLS)
    └── UpstreamProtocolError   not HTTP/1.1, or a head or body over its limit
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_READ_TIMEOUT",
    "HttpClient",
    "Response",
    "UpstreamFailed",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]

DEFAULT_CONNECT_TIMEOUT = 5.0  # TCP connect + TLS handshake, or the wait for a pooled connection
DEFAULT_READ_TIMEOUT = 60.0  # the longest the upstream may stay silent once a request is sent
DEFAULT_IDLE_TIMEOUT = 30.0  # an idle pooled connection older than this is not reused
DEFAULT_MAX_CONNECTIONS = 100  # per origin, busy and idle together
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # what aread() accepts unless told otherwise
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # status line and headers of one response
HIGH_WATER = 512 * 1024  # unconsumed body bytes at which reading from the socket pauses
KEEP_ALIVE_MARGIN = 1.0  # seconds before the upstream's announced idle close we stop reusing
# Idle at least this long before reuse, a connection's socket is polled for a close the loop has
# not seen yet. Not sooner: servers close idle connections after seconds, and the poll releases
# the GIL, which under load hands it to the audit writer thread at every request.
POLL_IDLE_AFTER = 1.0

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})
_ROUTE_CACHE = 1024


class UpstreamFailed(Exception):
    """The exchange with the upstream failed; the message says how and never holds a header
    value (the library's own error, if any, is the ``__cause__``)."""


class UpstreamTimeout(UpstreamFailed):
    """Connecting, waiting for a pooled connection, or waiting for upstream bytes took longer
    than its timeout."""


class UpstreamUnreachable(UpstreamFailed):
    """No connection could be made: refused, unresolvable, or the TLS handshake failed."""


class UpstreamProtocolError(UpstreamFailed):
    """The upstream did not speak HTTP/1.1, or its response head or body was over the limit."""


class Response:
    """One response: status and headers now, the body as it arrives.

    Read it with :meth:`aread` (whole, bounded) or :meth:`aiter_raw` (chunks as they come);
    :meth:`aclose` when done. The connection returns to the pool as soon as the upstream has
    sent the whole body, whether or not it has been read yet; closing a response whose body
    has not all arrived closes its connection."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_content",
        "_done",
        "_error",
        "_limit",
        "_waiter",
        "framed",
        "head_done",
        "head_only",
        "header_bytes",
        "headers",
        "interim",
        "status_code",
    )

    status_code: int
    headers: list[tuple[bytes, bytes]]  # as received, names lower-cased

    def __init__(self, conn: _Conn, limit: int, head_only: bool) -> None:
        self._conn: _Conn | None = conn
        self._limit = limit
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._content: bytes | None = None
        self._done = False
        self._error: UpstreamFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.status_code = 0
        self.headers = []
        self.head_done = False
        self.head_only = head_only
        self.header_bytes = 0
        self.framed = False  # Content-Length or chunked: the body does not end with the socket
        self.interim = False  # inside a 1xx response

    def __repr__(self) -> str:
        return f"<Response {self.status_code}>"

    def header(self, name: str) -> str | None:
        """The header's value (several joined by ", "), or None."""
        key = name.lower().encode("latin-1")
        values = [v for k, v in self.headers if k == key]
        return b", ".join(values).decode("latin-1") if values else None

    # -- reading ----------------------------------------------------------------------------

    async def aread(self, max_bytes: int | None = None) -> bytes:
        """The whole body (the rest of it, after :meth:`aiter_raw`); the same bytes again on
        later calls. More than ``max_bytes`` (default: the client's ``max_response_bytes``)
        closes the connection and raises :class:`UpstreamProtocolError`."""
        if self._content is not None:
            return self._content
        limit = self._limit if max_bytes is None else max_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            if self._chunks:
                data = self._take()
                size += len(data)
                if size > limit:
                    await self.aclose()
                    raise UpstreamProtocolError(
                        f"the upstream's response is larger than {limit} bytes"
                    )
                parts.append(data)
            elif self._done:
                break
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()
        self._content = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._content

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (whatever has come in since the last chunk, joined),
        without transfer coding; then the error, if the exchange failed part way."""
        if self._content is not None:
            if self._content:
                yield self._content
            return
        while True:
            if self._chunks:
                yield self._take()
            elif self._done:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    async def aclose(self) -> None:
        """Done with the body: a connection still receiving it is closed (never reused)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abandon(self)
        self._chunks.clear()

    # -- fed by the connection --------------------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes, conn: _Conn) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not conn.paused:
            conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, e: UpstreamFailed) -> None:
        if not self._done and self._error is None:
            self._error = e
            self._conn = None
            self._wake()


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    __slots__ = (
        "closed",
        "counted",
        "expires",
        "head_bytes",
        "idle",
        "idle_since",
        "keep",
        "last_rx",
        "loop",
        "parser",
        "paused",
        "poller",
        "pool",
        "resp",
        "reusable",
        "timer",
        "transport",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.closed = False
        self.counted = True  # holds one of the pool's slots until it is gone
        self.idle = False  # in the pool's idle deque
        self.reusable = True
        self.paused = False
        self.keep = pool.idle_timeout
        self.expires = 0.0
        self.idle_since = 0.0
        self.last_rx = 0.0
        self.head_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.poller: select.poll | None = None

    def __repr__(self) -> str:
        return f"<_Conn {self.pool.origin} closed={self.closed}>"

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                p = select.poll()
                p.register(sock.fileno(), select.POLLIN)
                self.poller = p

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self.last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__  # a callback's own error (a limit) arrives as the context
            self.fail(
                cause
                if isinstance(cause, UpstreamFailed)
                else UpstreamProtocolError("the upstream's response is not valid HTTP/1.1")
            )
            return
        if not resp.head_done and self.resp is resp:
            self.head_bytes += len(data)
            if self.head_bytes > self.pool.max_header_bytes:
                self.fail(self._head_too_large())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._gone()
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if exc is None and resp.head_done and not resp.framed and not resp.interim:
            resp._finish()  # a body delimited by the end of the connection
        elif resp.head_done:
            resp._fail(UpstreamFailed("the upstream closed the connection mid-response"))
        else:
            resp._fail(UpstreamFailed("the upstream closed the connection before answering"))

    def pause_writing(self) -> None:  # a request body larger than the socket buffers
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ----------------------------------------------------------------

    # Each may find no exchange: bytes after a finished (or HEAD) response in the same read.

    def on_message_begin(self) -> None:
        if self.resp is None:
            raise UpstreamProtocolError("the upstream sent a response nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        resp.header_bytes += len(name) + len(value)
        if resp.header_bytes > self.pool.max_header_bytes:
            raise self._head_too_large()
        name = name.lower()
        resp.headers.append((name, value))
        if name == b"content-length":
            resp.framed = True
        elif name == b"transfer-encoding":
            resp.framed = value.rstrip().lower().endswith(b"chunked")
        elif name == b"keep-alive":
            self._keep_alive(value)

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("the upstream switched protocols unasked")
            resp.interim = True  # 100 / 103: the real response follows
            resp.headers = []
            resp.header_bytes = 0
            resp.framed = False
            return
        resp.status_code = status
        resp.head_done = True
        if resp.head_only:  # HEAD: no body follows, whatever the headers say
            self.reusable = False
            self.resp = None
            resp._finish()
            self.close()
            return
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None:
            resp._feed(body, self)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        if resp.interim:
            resp.interim = False
            return
        self.resp = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        assert transport is not None
        if self.paused:
            self.paused = False
            transport.resume_reading()
        # Not reused if the upstream answered before taking the whole request body.
        self.reusable = self.parser.should_keep_alive() and not transport.get_write_buffer_size()
        resp._finish()
        self.pool.release(self)

    # -- the exchange -----------------------------------------------------------------------

    async def exchange(self, data: bytes, head_only: bool) -> Response:
        transport = self.transport
        assert transport is not None
        resp = Response(self, self.pool.max_response_bytes, head_only)
        self.resp = resp
        self.head_bytes = 0
        transport.write(data)
        self.last_rx = now = self.loop.time()
        self.timer = self.loop.call_at(now + self.pool.read_timeout, self._on_timer)
        try:
            while not resp.head_done:
                if resp._error is not None:
                    raise resp._error
                await resp._wait()
        except BaseException:
            if self.resp is resp:  # cancelled: the upstream may be working on it; stop it
                self.resp = None
                self.close()
            raise
        return resp

    def alive(self, now: float) -> bool:
        """Still fit to carry a request? (Called only on idle connections.)"""
        if self.closed or self.expires <= now:
            return False
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        p = self.poller
        if p is None or now - self.idle_since < POLL_IDLE_AFTER:
            return True
        # Anything readable on an idle connection (a FIN, a reset, stray bytes) that the loop
        # has not processed yet means it must not carry a request.
        return not p.poll(0)

    def fail(self, e: UpstreamFailed) -> None:
        resp, self.resp = self.resp, None
        if resp is not None:
            resp._fail(e)
        self.close()

    def abandon(self, resp: Response) -> None:
        if self.resp is resp:
            self.resp = None
            self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.closed:
            self.closed = True
            self._gone()
            if self.transport is not None:
                self.transport.close()

    def pause(self) -> None:
        self.paused = True
        assert self.transport is not None
        self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.last_rx = self.loop.time()

    def _on_timer(self) -> None:
        self.timer = None
        if self.resp is None or self.closed:
            return
        now = self.loop.time()
        timeout = self.pool.read_timeout
        if self.paused:  # the reader is behind, not the upstream
            self.last_rx = now
        due = self.last_rx + timeout
        if now >= due - 0.001:
            self.fail(UpstreamTimeout(f"the upstream sent nothing for {timeout:g}s"))
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    def _keep_alive(self, value: bytes) -> None:
        for part in value.split(b","):
            k, _, v = part.strip().partition(b"=")
            if k.strip().lower() == b"timeout":
                with contextlib.suppress(ValueError):
                    self.keep = min(self.keep, max(0.0, float(v) - KEEP_ALIVE_MARGIN))

    def _head_too_large(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(
            f"the upstream's response head is larger than {self.pool.max_header_bytes} bytes"
        )

    def _gone(self) -> None:
        if self.counted:
            self.counted = False
            self.pool.gone(self)


class _Pool:
    """The connections to one origin (scheme, host, port)."""

    def __init__(self, client: HttpClient, scheme: str, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.tls = scheme == "https"
        default = port == (443 if self.tls else 80)
        bracketed = f"[{host}]" if ":" in host else host
        self.host_header = bracketed if default else f"{bracketed}:{port}"
        self.origin = f"{scheme}://{bracketed}:{port}"
        self.ssl = client._ssl_context() if self.tls else None
        self.limit = client.max_connections
        self.connect_timeout = client.connect_timeout
        self.read_timeout = client.read_timeout
        self.idle_timeout = client.idle_timeout
        self.max_response_bytes = client.max_response_bytes
        self.max_header_bytes = client.max_header_bytes
        self.idle: deque[_Conn] = deque()  # most recently used on the right
        self.conns: set[_Conn] = set()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.count = 0  # connections open or being opened
        self.closed = False

    async def acquire(self) -> _Conn:
        conn = self._take()
        if conn is not None:
            return conn
        if self.count < self.limit:
            return await self._connect()
        return await self._wait()

    def _take(self) -> _Conn | None:
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            conn.idle = False
            if conn.alive(now):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        self.count += 1
        conn = _Conn(self)
        self.conns.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except BaseException as e:
            conn.close()
            if isinstance(e, TimeoutError):
                raise UpstreamTimeout(
                    f"connecting to the upstream took longer than {self.connect_timeout:g}s"
                ) from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise UpstreamUnreachable(
                    f"the upstream's TLS certificate failed verification ({e.verify_message})"
                ) from e
            if isinstance(e, ssl.SSLError):
                raise UpstreamUnreachable(
                    f"the TLS handshake with the upstream failed ({e.reason or 'unknown'})"
                ) from e
            if isinstance(e, OSError):
                raise UpstreamUnreachable(
                    f"cannot connect to the upstream ({e.strerror or type(e).__name__})"
                ) from e
            raise
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            # Gone before a byte of the request was written to it: nothing reached it.
            conn.close()
            raise UpstreamUnreachable("the upstream closed the connection as soon as it opened")
        return conn

    async def _wait(self) -> _Conn:
        """All connections busy: wait (within the connect timeout) for one to come back."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                while True:
                    fut = self.loop.create_future()
                    self.waiters.append(fut)
                    try:
                        await fut
                    except BaseException:
                        if fut.done() and not fut.cancelled():
                            self._wake()  # we were handed a slot we will not use
                        else:
                            with contextlib.suppress(ValueError):
                                self.waiters.remove(fut)
                        raise
                    conn = self._take()
                    if conn is not None:
                        return conn
                    if self.count < self.limit:
                        return await self._connect()
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection to the upstream came free within {self.connect_timeout:g}s "
                f"({self.limit} in use)"
            ) from None

    def release(self, conn: _Conn) -> None:
        """An exchange finished cleanly on ``conn``: keep it for the next, or close it."""
        if conn.closed:
            return
        if not conn.reusable or self.closed or conn.keep <= 0:
            conn.close()
            return
        now = self.loop.time()
        conn.idle_since = now
        conn.expires = now + conn.keep
        idle = self.idle
        while idle and idle[0].expires <= now:  # the oldest idle ones may have expired
            old = idle.popleft()
            old.idle = False
            old.close()
        conn.idle = True
        idle.append(conn)
        self._wake()

    def gone(self, conn: _Conn) -> None:
        """``conn`` closed (either side): free its slot for a waiter."""
        self.count -= 1
        self.conns.discard(conn)
        if conn.idle:
            conn.idle = False
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for conn in list(self.conns):
            if conn.resp is not None:
                conn.fail(UpstreamFailed("the client was closed"))
            else:
                conn.close()
        self.idle.clear()


class HttpClient:
    """Pooled HTTP/1.1 client; build it anywhere, use it from one event loop."""

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        cafile: str | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_response_bytes = max_response_bytes
        self.max_header_bytes = max_header_bytes
        self._cafile = cafile
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._routes: dict[str, tuple[_Pool, str]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"HttpClient({sorted(p.origin for p in self._pools.values())})"

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        """Send one request; returns once the response's status and headers are in (read the
        body from the :class:`Response`). ``headers`` go out as given, after Host (which a
        ``host`` entry replaces) and Content-Length (which the client alone sets)."""
        if self._closed:
            raise UpstreamFailed("the client is closed")
        route = self._routes.get(url)
        if route is None:
            route = self._route(url)
        pool, target = route
        data = _head(method, target, pool.host_header, headers, len(body))
        if body:
            data += body
        conn = await pool.acquire()
        return await conn.exchange(data, method == "HEAD")

    def _route(self, url: str) -> tuple[_Pool, str]:
        try:
            u = urlsplit(url)
            port = u.port
        except ValueError:
            raise ValueError("not a valid http(s) URL") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("not an http(s) URL")
        if u.username is not None or u.password is not None:
            raise ValueError("credentials in a URL are not supported")  # nor echoed
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if _BAD_TARGET.search(target):
            raise ValueError("the URL's path or query holds a space or control character")
        key = (u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80))
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self, *key)
        if len(self._routes) >= _ROUTE_CACHE:
            self._routes.clear()
        route = self._routes[url] = (pool, target)
        return route

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=self._cafile)
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    async def aclose(self) -> None:
        """Close every connection; responses still streaming fail with UpstreamFailed."""
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._routes.clear()


def _head(
    method: str, target: str, host: str, headers: Mapping[str, str] | None, length: int
) -> bytes:
    if not _TOKEN.fullmatch(method) or method == "CONNECT":
        raise ValueError("not a method this client sends")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    own_host = False
    if headers:
        for k, v in headers.items():
            if not _TOKEN.fullmatch(k) or _BAD_VALUE.search(v):
                # Name the header only if it is a well-formed name; never the value.
                raise ValueError(
                    f"invalid header value for {k!r}" if _TOKEN.fullmatch(k) else "invalid header"
                )
            lk = k.lower()
            if lk in _FRAMING:
                raise ValueError(f"{k} is set by the client from the body")
            if lk == "host":
                own_host = True
            lines.append(f"{k}: {v}\r\n")
    if not own_host:
        lines.insert(1, f"host: {host}\r\n")
    if length or method not in _BODYLESS:
        lines.append(f"content-length: {length}\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header holds a character outside latin-1") from None
