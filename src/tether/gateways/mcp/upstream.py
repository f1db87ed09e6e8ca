"""The gateway as an MCP client of its upstreams: streamable HTTP, and stdio servers it runs.

Both speak the initialize handshake (protocol 2025-11-25 offered; 2025-03-26 and 2025-06-18
accepted back) with no client capabilities: the gateway never offers sampling, roots or
elicitation to an upstream, so a compliant server never sends it a request. A stdio server
that does gets a JSON-RPC error back at once instead of hanging.

* :class:`HttpUpstream` posts JSON-RPC through the lean client in :mod:`._http`; the upstream's
  ``Mcp-Session-Id`` and negotiated version travel in an :class:`UpstreamSession` the gateway
  stores with the agent's session (so another gateway process continues the same upstream
  session). A 404 for a known session raises :class:`SessionLost`: re-initialize and retry.
* :class:`StdioUpstream` launches ``command`` with a minimal environment (``PATH``, ``HOME``,
  ``LANG``, ``TMPDIR`` and what the config names; never the gateway's own secrets), talks
  newline-delimited JSON-RPC on its stdin/stdout, and restarts it with back-off when it exits.
  One child per server per gateway process, shared by the agent sessions of that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

import tether
from tether.gateways.mcp._http import (
    HttpTarget,
    UpstreamError,
    UpstreamGarbage,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tether.gateways.mcp.config import ServerConfig

__all__ = [
    "CLIENT_INFO",
    "HANDSHAKE_VERSIONS",
    "OFFERED_VERSION",
    "Answer",
    "HttpUpstream",
    "SessionLost",
    "StdioUpstream",
    "Upstream",
    "UpstreamError",
    "UpstreamGarbage",
    "UpstreamSession",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "build_upstream",
]

log = logging.getLogger("tether.gateways.mcp")

HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
OFFERED_VERSION = "2025-11-25"
CLIENT_INFO = {"name": "tether-mcp-gateway", "version": tether.__version__}
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
_STDERR_LOG_CAP = 8192  # bytes of a stdio server's stderr logged per restart
RESTART_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class SessionLost(UpstreamError):
    """The upstream no longer knows the session (HTTP 404): initialize again."""


@dataclass(frozen=True, slots=True)
class UpstreamSession:
    """What continues an upstream session: its id (``None``: the server keeps none) and the
    protocol version it negotiated. Stored as text with the agent's session."""

    version: str
    id: str | None

    def encode(self) -> str:
        return f"{self.version} {self.id or ''}"

    @classmethod
    def decode(cls, text: str | None) -> UpstreamSession | None:
        if not text:
            return None
        version, _, sid = text.partition(" ")
        return cls(version, sid or None)


@dataclass(slots=True)
class Answer:
    """The upstream's JSON-RPC response (``result`` or ``error``) and anything else it sent
    while answering (notifications such as ``notifications/tools/list_changed``)."""

    message: dict[str, Any]
    others: list[Any] = field(default_factory=list)
    raw: bytes = b""

    @property
    def error(self) -> dict[str, Any] | None:
        err = self.message.get("error")
        return err if isinstance(err, dict) else ({"message": "?"} if err is not None else None)

    def list_changed(self) -> bool:
        return any(
            isinstance(m, dict) and m.get("method") == "notifications/tools/list_changed"
            for m in self.others
        )


def _check_response(msg: Any, rid: int) -> dict[str, Any]:
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or msg.get("id") != rid:
        raise UpstreamGarbage("upstream answered with something that is not our JSON-RPC response")
    if "result" in msg:
        return msg
    err = msg.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), int):
        raise UpstreamGarbage("upstream answered with a malformed JSON-RPC error")
    return msg


def _initialize_params() -> dict[str, Any]:
    return {"protocolVersion": OFFERED_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}


def _negotiated(result: Any) -> str:
    if not isinstance(result, dict):
        raise UpstreamGarbage("upstream's initialize result is not an object")
    version = result.get("protocolVersion")
    if version not in HANDSHAKE_VERSIONS:
        raise UpstreamGarbage(f"upstream speaks MCP {str(version)[:40]!r}, which Tether does not")
    return str(version)


class Upstream:
    """What the gateway needs from an upstream."""

    config: ServerConfig
    stateful: bool  # does each agent session get its own upstream session?

    async def open(self) -> UpstreamSession:
        raise NotImplementedError

    async def call(
        self, session: UpstreamSession | None, method: str, params: Mapping[str, Any] | None
    ) -> Answer:
        raise NotImplementedError

    async def end(self, session: UpstreamSession) -> None:
        return None

    async def aclose(self) -> None:
        return None


class HttpUpstream(Upstream):
    stateful = True

    def __init__(self, config: ServerConfig, max_response_bytes: int) -> None:
        assert config.url is not None
        self.config = config
        self.target = HttpTarget(
            config.url,
            max_response_bytes=max_response_bytes,
            connect_timeout=config.connect_timeout,
        )
        self._ids = itertools.count(1)
        self._base = [
            (b"content-type", b"application/json"),
            (b"accept", b"application/json, text/event-stream"),
            *config.upstream_headers(),
        ]

    def __repr__(self) -> str:
        return f"HttpUpstream({self.config.name!r}, {self.target!r})"

    def _headers(self, session: UpstreamSession | None) -> list[tuple[bytes, bytes]]:
        if session is None:
            return self._base
        h = [*self._base, (b"mcp-protocol-version", session.version.encode())]
        if session.id:
            h.append((b"mcp-session-id", session.id.encode("latin-1")))
        return h

    async def _post(
        self, session: UpstreamSession | None, doc: dict[str, Any], rid: int | None
    ) -> Any:
        reply = await self.target.request(
            b"POST",
            self._headers(session),
            orjson.dumps(doc),
            want=rid,
            timeout=self.config.timeout,
        )
        if reply.status == 404 and session is not None and session.id:
            raise SessionLost("the upstream no longer knows this session")
        if rid is None:
            if reply.status >= 300:
                raise UpstreamGarbage(f"upstream refused a notification (HTTP {reply.status})")
            return None
        if reply.status in (401, 403):
            raise UpstreamUnreachable(
                f"upstream refused the gateway's credentials (HTTP {reply.status})"
            )
        if reply.message is None:
            raise UpstreamGarbage(
                f"upstream answered HTTP {reply.status} without a JSON-RPC response"
                + (f" ({reply.headers.get(b'content-type', b'').decode('latin-1')[:60]})")
            )
        return Answer(_check_response(reply.message, rid), reply.others, reply.raw), reply

    async def open(self) -> UpstreamSession:
        rid = next(self._ids)
        doc = {"jsonrpc": "2.0", "id": rid, "method": "initialize", "params": _initialize_params()}
        answer, reply = await self._post(None, doc, rid)
        if answer.error is not None:
            raise UpstreamGarbage(
                f"upstream refused initialize: {str(answer.error.get('message'))[:200]}"
            )
        session = UpstreamSession(_negotiated(answer.message.get("result")), reply.session_id)
        await self._post(session, {"jsonrpc": "2.0", "method": "notifications/initialized"}, None)
        return session

    async def call(
        self, session: UpstreamSession | None, method: str, params: Mapping[str, Any] | None
    ) -> Answer:
        rid = next(self._ids)
        doc: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            doc["params"] = params
        answer, _ = await self._post(session, doc, rid)
        assert isinstance(answer, Answer)
        return answer

    async def end(self, session: UpstreamSession) -> None:
        if not session.id:
            return
        with contextlib.suppress(UpstreamError):
            await self.target.request(
                b"DELETE", self._headers(session), b"", want=None, timeout=self.config.timeout
            )

    async def aclose(self) -> None:
        await self.target.aclose()


class StdioUpstream(Upstream):
    """A stdio MCP server the gateway runs and keeps running."""

    stateful = False

    def __init__(
        self,
        config: ServerConfig,
        max_response_bytes: int,
        on_list_changed: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.max_response_bytes = max_response_bytes
        self.on_list_changed = on_list_changed
        self._proc: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[UpstreamSession] | None = None
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._others: list[Any] = []
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures = 0
        self._next_start = 0.0
        self._closed = False
        self._lock = asyncio.Lock()
        self.starts = 0  # how many times the process was launched (tests, diagnostics)

    def __repr__(self) -> str:
        return f"StdioUpstream({self.config.name!r}, {self.config.command[0]!r})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def _env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env.update(self.config.env)
        env.update({k: v.reveal() for k, v in self.config.secret_env.items()})
        return env

    async def open(self) -> UpstreamSession:
        ready = self._ready
        if ready is not None and (not ready.done() or ready.exception() is None):
            return await asyncio.shield(ready)
        async with self._lock:
            ready = self._ready
            if ready is None or (ready.done() and ready.exception() is not None):
                ready = self._ready = asyncio.get_running_loop().create_future()
                self._spawn(self._start(ready))
        return await asyncio.shield(ready)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, ready: asyncio.Future[UpstreamSession]) -> None:
        try:
            if self._closed:
                raise UpstreamUnreachable("the gateway is shutting down")
            wait = self._next_start - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.config.command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self._env(),
                    cwd=self.config.cwd,
                    limit=self.max_response_bytes,
                    start_new_session=True,
                )
            except OSError as e:
                raise UpstreamUnreachable(
                    f"cannot start stdio server {self.config.name!r}: "
                    f"{e.strerror or type(e).__name__}"
                ) from None
            self.starts += 1
            self._proc = proc
            self._spawn(self._read(proc))
            self._spawn(self._drain_stderr(proc))
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    answer = await self._request(proc, "initialize", _initialize_params())
            except TimeoutError:
                await self._kill(proc)
                raise UpstreamTimeout(
                    f"stdio server {self.config.name!r} did not answer initialize within "
                    f"{self.config.connect_timeout:g}s"
                ) from None
            if answer.error is not None:
                await self._kill(proc)
                raise UpstreamGarbage(
                    f"stdio server refused initialize: {str(answer.error.get('message'))[:200]}"
                )
            try:
                version = _negotiated(answer.message.get("result"))
            except UpstreamGarbage:
                await self._kill(proc)
                raise
            self._write(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            self._failures = 0
            ready.set_result(UpstreamSession(version, None))
        except BaseException as e:
            self._failures += 1
            delay = RESTART_BACKOFF[min(self._failures, len(RESTART_BACKOFF)) - 1]
            self._next_start = time.monotonic() + delay
            if not ready.done():
                ready.set_exception(
                    e if isinstance(e, UpstreamError) else UpstreamUnreachable(type(e).__name__)
                )
            ready.exception()  # retrieved: a failed start is reported to whoever waits

    def _write(self, proc: asyncio.subprocess.Process, doc: dict[str, Any]) -> None:
        if proc.stdin is None or proc.stdin.is_closing():
            raise UpstreamUnreachable(f"stdio server {self.config.name!r} is not running")
        proc.stdin.write(orjson.dumps(doc) + b"\n")

    async def _request(
        self, proc: asyncio.subprocess.Process, method: str, params: Mapping[str, Any] | None
    ) -> Answer:
        rid = next(self._ids)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        doc: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            doc["params"] = params
        try:
            self._write(proc, doc)
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        reason = "exited"
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # a line longer than the limit
                    reason = f"sent a message larger than {self.max_response_bytes} bytes"
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                self._on_line(proc, line)
        finally:
            await self._kill(proc)
            code = proc.returncode
            err = UpstreamUnreachable(
                f"stdio server {self.config.name!r} {reason} (exit code {code})"
            )
            for fut in list(self._pending.values()):
                if not fut.done():
                    fut.set_exception(err)
            if self._proc is proc:
                self._proc = None
                self._ready = None
                if not self._closed:
                    log.warning("stdio MCP server %s %s; restarting", self.config.name, reason)
                    self._failures += 1
                    delay = RESTART_BACKOFF[min(self._failures, len(RESTART_BACKOFF)) - 1]
                    self._next_start = time.monotonic() + delay
                    self._spawn(self._restart())

    async def _restart(self) -> None:
        with contextlib.suppress(Exception):
            await self.open()

    def _on_line(self, proc: asyncio.subprocess.Process, line: bytes) -> None:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("stdio MCP server %s wrote a line that is not JSON", self.config.name)
            return
        if not isinstance(msg, dict):
            return
        if "method" in msg:
            if "id" in msg:  # a request to us: we offered no capability, so refuse at once
                with contextlib.suppress(UpstreamError):
                    self._write(
                        proc,
                        {
                            "jsonrpc": "2.0",
                            "id": msg["id"],
                            "error": {
                                "code": -32601,
                                "message": "the Tether gateway does not serve client requests",
                            },
                        },
                    )
            elif msg.get("method") == "notifications/tools/list_changed" and self.on_list_changed:
                self.on_list_changed()
            return
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return
        fut = self._pending.get(rid)
        if fut is None or fut.done():
            return
        try:
            fut.set_result(Answer(_check_response(msg, rid), [], line[:65536]))
        except UpstreamGarbage as e:
            fut.set_exception(e)

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        logged = 0
        with contextlib.suppress(Exception):
            while True:
                chunk = await proc.stderr.read(4096)
                if not chunk:
                    return
                if logged < _STDERR_LOG_CAP:
                    log.debug(
                        "stdio MCP server %s stderr: %s",
                        self.config.name,
                        chunk[: _STDERR_LOG_CAP - logged].decode("utf-8", "replace"),
                    )
                    logged += len(chunk)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(2.0):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()

    async def call(
        self, session: UpstreamSession | None, method: str, params: Mapping[str, Any] | None
    ) -> Answer:
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                await self.open()
                proc = self._proc
                if proc is None:
                    raise UpstreamUnreachable(f"stdio server {self.config.name!r} is not running")
                return await self._request(proc, method, params)
        except TimeoutError:
            raise UpstreamTimeout(f"the upstream did not answer within {timeout:g}s") from None

    async def aclose(self) -> None:
        self._closed = True
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            await self._kill(proc)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


def build_upstream(
    config: ServerConfig,
    max_response_bytes: int,
    on_list_changed: Callable[[], None] | None = None,
) -> Upstream:
    if config.kind == "http":
        return HttpUpstream(config, max_response_bytes)
    return StdioUpstream(config, max_response_bytes, on_list_changed)
