"""The MCP gateway: a raw ASGI app serving each configured MCP server at ``/mcp/<server>``
over streamable HTTP, with every tool call decided, recorded and then forwarded.

Per ``tools/call`` (no store access on the way when the session and tool list are warm)::

    token (cached verify) -> body (size limit, JSON-RPC checks) -> session (cached, shared store)
      -> tool known, name acceptable, definition = pinned one? -> tool.call Action
      -> DecisionCore (grants, Cedar, group limits, approvals; an escalation may be held)
      -> inspectors (none: skipped) -> request record durable (record_first) -> upstream call
      -> result checked and inspected -> response to the agent -> result recorded, settled

What agents see (JSON-RPC errors; codes in :mod:`.jsonrpc`): a denied call ``-32050`` with
the policy's reasons; an escalated call that was not approved within the hold ``-32051``
naming the approval id (approve it, then retry the same call); a tool whose definition changed
``-32052``; a refused audit record ``-32053``; upstream trouble ``-32054`` / ``-32055``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

import orjson

import tether
from tether.audit.canonical import canonical_json
from tether.clock import Clock, SystemClock
from tether.errors import AuthenticationError, TetherError
from tether.events import Event, Recorder, submit
from tether.gateways.mcp import jsonrpc as rpc
from tether.gateways.mcp.config import MCPSettings, ServerConfig
from tether.gateways.mcp.inspect import Finding, ToolContext, ToolInspector
from tether.gateways.mcp.jsonrpc import Message, RpcError
from tether.gateways.mcp.pins import Catalog, CatalogTool, PinBook
from tether.gateways.mcp.sessions import Sessions
from tether.gateways.mcp.upstream import (
    HANDSHAKE_VERSIONS,
    OFFERED_VERSION,
    Answer,
    SessionLost,
    Upstream,
    UpstreamError,
    UpstreamSession,
    UpstreamTimeout,
    build_upstream,
)
from tether.identity.claims import TokenClaims
from tether.policy.action import Action, Decision
from tether.policy.core import DecisionCore
from tether.store.mcp import MCPStore, SessionRecord

__all__ = ["MCP_PREFIX", "MCPGateway", "with_mcp_gateway"]

log = logging.getLogger("tether.gateways.mcp")

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MCP_PREFIX = "/mcp/"
MAX_PAGES = 50  # upstream tools/list pages followed
KEEPALIVE = 10.0  # seconds between SSE comments while a call waits for its approval
MAX_UPSTREAM_ERROR_DATA = 8192
_JSON = (b"content-type", b"application/json")
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def with_mcp_gateway(app: ASGIApp, gateway: MCPGateway) -> ASGIApp:
    """An ASGI app that sends ``/mcp/...`` to ``gateway`` and everything else to ``app``."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(MCP_PREFIX):
            await gateway(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def _cap(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    digest = hashlib.sha256(data).hexdigest()
    return data[:limit] + (f"\n[cut by tether: {len(data)} bytes in all, sha256 {digest}]".encode())


class _Reply:
    """Answers one POST: a JSON body, or (when a call is held for its approval) an SSE stream
    that carries keep-alive comments and then the one response event."""

    __slots__ = ("headers", "send", "sent", "sse")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.sse = False
        self.sent = False
        self.headers: list[tuple[bytes, bytes]] = []

    async def start_sse(self) -> None:
        self.sse = True
        await self.send(
            {"type": "http.response.start", "status": 200, "headers": [*_SSE, *self.headers]}
        )

    async def comment(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(
                {
                    "type": "http.response.body",
                    "body": f": {text}\n\n".encode(),
                    "more_body": True,
                }
            )

    async def finish(
        self, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        if self.sent:
            return
        self.sent = True
        with contextlib.suppress(Exception):
            if self.sse:
                await self.send(
                    {
                        "type": "http.response.body",
                        "body": b"event: message\ndata: " + body + b"\n\n",
                        "more_body": False,
                    }
                )
                return
            await self.send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        _JSON,
                        (b"content-length", str(len(body)).encode()),
                        *self.headers,
                        *extra,
                    ],
                }
            )
            await self.send({"type": "http.response.body", "body": body})

    async def empty(self, status: int, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        if self.sent:
            return
        self.sent = True
        with contextlib.suppress(Exception):
            await self.send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-length", b"0"), *self.headers, *extra],
                }
            )
            await self.send({"type": "http.response.body", "body": b""})


@dataclasses.dataclass(slots=True)
class _Req:
    """One POST's state, for the records."""

    server: ServerConfig
    headers: Mapping[bytes, bytes]
    reply: _Reply
    claims: TokenClaims | None = None
    body: bytes = b""
    msg: Message | None = None
    session: SessionRecord | None = None


class MCPGateway:
    """The gateway ASGI app. Build one per process (see :func:`.mount.build_mcp_gateway`);
    ``await aclose()`` at shutdown stops the stdio servers and closes upstream pools."""

    def __init__(
        self,
        settings: MCPSettings,
        *,
        verify: Callable[[str], TokenClaims],
        core: DecisionCore,
        audit: Recorder,
        store: MCPStore,
        inspectors: Sequence[ToolInspector] = (),
        clock: Clock | None = None,
        owns_store: bool = False,
    ) -> None:
        self.settings = settings
        self.verify = verify
        self.core = core
        self.audit = audit
        self.store = store
        self.inspectors = tuple(inspectors)
        self.clock = clock or SystemClock()
        self._owns_store = owns_store
        self.sessions = Sessions(store, recheck=settings.session_recheck, now_ms=self._now_ms)
        self.pins = PinBook(store, audit, self._now_ms)
        self.upstreams: dict[str, Upstream] = {
            name: build_upstream(cfg, settings.max_response_bytes, self._stale_callback(name))
            for name, cfg in settings.servers.items()
        }
        self.catalogs: dict[str, Catalog] = {}
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self._up_sessions: dict[str, UpstreamSession] = {}
        self._up_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Records nobody waits on (results, passthrough, listings ...), by their event type.
        self._background: dict[asyncio.Future[Any], str] = {}
        self._rid_prefix = "mcp_" + secrets.token_hex(4)
        self._rids = itertools.count(1)

    def __repr__(self) -> str:
        return f"MCPGateway(servers={sorted(self.settings.servers)!r})"

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def _stale_callback(self, name: str) -> Callable[[], None]:
        def stale() -> None:
            cat = self.catalogs.get(name)
            if cat is not None:
                cat.stale = True

        return stale

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for records still being written in the background (tests, shutdown)."""
        while self._background or self._tasks:
            await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)

    # -- records --------------------------------------------------------------------------

    def _record_later(self, ev: Event) -> None:
        """Record ``ev`` without holding anyone: the agent has its answer already, and for a
        tool call the call's own record was durable before the upstream saw it. Lazy, so at
        concurrency 1 the next call's must-wait record does not queue behind its commit."""
        fut = submit(self.audit, ev, lazy=True)
        self._background[fut] = ev.type
        fut.add_done_callback(self._recorded)

    def _recorded(self, fut: asyncio.Future[Any]) -> None:
        kind = self._background.pop(fut, "an event")
        if not fut.cancelled() and (e := fut.exception()) is not None:
            log.error("recording %s failed: %s", kind, type(e).__name__)

    async def aclose(self) -> None:
        await self.drain()
        for up in self.upstreams.values():
            with contextlib.suppress(Exception):
                await up.aclose()
        if self._owns_store:
            self.store.close()

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reply = _Reply(send)
        path: str = scope["path"]
        name = path[len(MCP_PREFIX) :].rstrip("/")
        server = self.settings.servers.get(name)
        if server is None:
            await self._unknown_server(name, dict(scope["headers"]), reply)
            return
        req = _Req(server, dict(scope["headers"]), reply)
        try:
            self._check_origin(req.headers)
            method = scope["method"]
            if method == "POST":
                await self._post(req, receive)
            elif method == "DELETE":
                await self._delete(req)
            else:
                raise RpcError(
                    rpc.INVALID_REQUEST,
                    f"{method} is not supported here: POST JSON-RPC messages, DELETE to end "
                    "the session (this gateway opens no server-to-client stream)",
                    "method_not_allowed",
                    405,
                    # Clients open the optional GET stream on every connect (the spec allows
                    # the 405): no record. Anything else is recorded.
                    recorded=method == "GET",
                )
        except RpcError as e:
            await self._refused(req, e)
            extra = [(b"allow", b"POST, DELETE")] if e.status == 405 else []
            if e.status == 401:
                extra.append((b"www-authenticate", b'Bearer error="invalid_token"'))
            rid = req.msg.id if req.msg is not None else None
            await reply.finish(e.status, rpc.error_bytes(rid, e), extra)
        except Exception as e:  # never a 500 page, never a crash
            log.exception("MCP gateway failed on %s", path)
            err = RpcError(
                rpc.INTERNAL_ERROR, f"gateway error ({type(e).__name__})", "gateway_error", 502
            )
            rid = req.msg.id if req.msg is not None else None
            await reply.finish(502, rpc.error_bytes(rid, err))

    async def _unknown_server(
        self, name: str, headers: Mapping[bytes, bytes], reply: _Reply
    ) -> None:
        err = RpcError(
            rpc.INVALID_REQUEST,
            f"no MCP server named {name[:100]!r} behind this gateway",
            "unknown_server",
            404,
        )
        claims: TokenClaims | None = None
        with contextlib.suppress(RpcError):
            claims = self._claims(headers)
        await self._record_quietly(
            Event(
                type="mcp.refused",
                actor=str(claims.subject) if claims else None,
                subject=name[:100],
                session=claims.task if claims else None,
                decision="deny",
                data={
                    "server": name[:100],
                    "code": err.code,
                    "reason": err.reason,
                    "message": err.message,
                    "status": err.status,
                },
            )
        )
        await reply.finish(404, rpc.error_bytes(None, err))

    def _check_origin(self, headers: Mapping[bytes, bytes]) -> None:
        origin = headers.get(b"origin")
        if origin is None:
            return
        o = origin.decode("latin-1").rstrip("/")
        if o not in self.settings.allowed_origins:
            raise RpcError(
                rpc.INVALID_REQUEST,
                f"Origin {o[:100]!r} is not allowed (DNS-rebinding protection; see "
                "[mcp] allowed_origins)",
                "origin_refused",
                403,
            )

    async def _refused(self, req: _Req, err: RpcError) -> None:
        """Record a refused attempt (bad input, no token, unknown method ...). Tool-call
        refusals are recorded as tool.call decisions instead; the refusal stands anyway."""
        if err.recorded or err.reason == "client_disconnected":
            return
        claims = req.claims
        msg = req.msg
        ev = Event(
            type="mcp.refused",
            actor=str(claims.subject) if claims else None,
            subject=req.server.name,
            session=claims.task if claims else None,
            decision="deny",
            data={
                "server": req.server.name,
                "code": err.code,
                "reason": err.reason,
                "message": err.message,
                "status": err.status,
                **({"note": err.note} if err.note else {}),
                **({"method": msg.method} if msg is not None else {}),
                **({"mcp_session": req.session.id} if req.session is not None else {}),
                **({"token_id": claims.token_id} if claims else {}),
            },
            bodies={"request": _cap(req.body, self.settings.max_recorded_body)} if req.body else {},
        )
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.warning("could not record a refused MCP request: %s", type(e).__name__)

    # -- input ----------------------------------------------------------------------------

    def _claims(self, headers: Mapping[bytes, bytes]) -> TokenClaims:
        raw = headers.get(b"authorization")
        if raw is None:
            raise RpcError(
                rpc.UNAUTHENTICATED,
                "no credential: send your Tether token as 'Authorization: Bearer <token>'",
                "unauthenticated",
                401,
            )
        scheme, _, value = raw.decode("latin-1").partition(" ")
        token = value.strip()
        if scheme.lower() != "bearer" or not token:
            raise RpcError(
                rpc.UNAUTHENTICATED,
                "Authorization header must be 'Bearer <token>'",
                "unauthenticated",
                401,
            )
        try:
            return self.verify(token)
        except AuthenticationError as e:
            raise RpcError(rpc.UNAUTHENTICATED, e.message, e.code, 401) from None
        except TetherError as e:
            raise RpcError(
                rpc.UNAUTHENTICATED, f"token refused: {e.message}", "invalid_token", 401
            ) from None

    async def _body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        limit = self.settings.max_message_bytes
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise RpcError(
                    rpc.INVALID_REQUEST, "invalid Content-Length", "invalid_request", 400
                ) from None
            if n > limit:
                raise _too_big(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                raise RpcError(rpc.INVALID_REQUEST, "client went away", "client_disconnected", 400)
            data = m.get("body", b"")
            if data:
                size += len(data)
                if size > limit:
                    raise _too_big(limit)
                chunks.append(data)
            if not m.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _session(self, req: _Req) -> SessionRecord:
        raw = req.headers.get(b"mcp-session-id")
        if raw is None:
            raise RpcError(
                rpc.INVALID_REQUEST,
                "missing Mcp-Session-Id header: send initialize first",
                "session_required",
                400,
            )
        sid = raw.decode("latin-1")
        rec = await self.sessions.get(sid) if 0 < len(sid) <= 64 else None
        claims = req.claims
        assert claims is not None
        if rec is None or rec.server != req.server.name or rec.subject != str(claims.subject):
            # The caller learns only that it has no such session; the record says why.
            note = "unknown, ended or expired"
            if rec is not None:
                note = (
                    f"opened by {rec.subject}"
                    if rec.server == req.server.name
                    else f"opened for server {rec.server!r}"
                )
            raise RpcError(
                rpc.INVALID_REQUEST,
                "session not found: initialize a new one",
                "session_not_found",
                404,
                note=note,
            )
        version = req.headers.get(b"mcp-protocol-version")
        if version is not None and version.decode("latin-1") not in HANDSHAKE_VERSIONS:
            raise RpcError(
                rpc.INVALID_REQUEST,
                f"unsupported MCP-Protocol-Version {version.decode('latin-1')[:40]!r} (this "
                f"gateway speaks {', '.join(HANDSHAKE_VERSIONS)})",
                "unsupported_protocol_version",
                400,
            )
        req.session = rec
        return rec

    # -- POST -----------------------------------------------------------------------------

    async def _post(self, req: _Req, receive: Receive) -> None:
        req.claims = self._claims(req.headers)
        req.body = await self._body(req.headers, receive)
        msg = req.msg = rpc.parse_message(req.body)
        method = msg.method
        if not msg.is_request:
            # notifications/initialized, cancelled, roots/list_changed ...: nothing to forward
            # (the gateway owns its upstream handshake; it holds no roots or requests to cancel).
            if method != "notifications/initialized" or b"mcp-session-id" in req.headers:
                await self._session(req)
            await req.reply.empty(202)
            return
        if method == "initialize":
            await self._initialize(req, msg)
            return
        if method == "server/discover":
            # The SDK's era probe on every connect: a negotiation, not an attempt on anything,
            # so it is answered (the client falls back to initialize) without a record.
            raise RpcError(
                rpc.METHOD_NOT_FOUND,
                "server/discover is not supported: this gateway speaks the initialize "
                f"handshake ({', '.join(HANDSHAKE_VERSIONS)})",
                "method_not_found",
                recorded=True,
            )
        sess = await self._session(req)
        if method == "tools/call":
            await self._call_tool(req, msg, sess, receive)
        elif method == "tools/list":
            await self._list_tools(req, msg, sess)
        elif method in ("ping", "logging/setLevel"):
            await req.reply.finish(200, rpc.result_bytes(msg.id, {}))
        elif method in req.server.passthrough:
            await self._passthrough(req, msg, sess)
        else:
            raise RpcError(
                rpc.METHOD_NOT_FOUND,
                f"method {method[:100]!r} is not served through the Tether gateway"
                + (
                    f" (server {req.server.name!r} does not pass it through)"
                    if method.startswith(("prompts/", "resources/", "completion/"))
                    else ""
                ),
                "method_not_found",
            )

    async def _initialize(self, req: _Req, msg: Message) -> None:
        p = msg.params
        version = p.get("protocolVersion")
        client = p.get("clientInfo", {})
        caps = p.get("capabilities", {})
        if not isinstance(version, str) or not isinstance(caps, dict):
            raise RpcError(
                rpc.INVALID_PARAMS,
                "initialize needs params.protocolVersion (string) and params.capabilities (object)",
                "invalid_params",
            )
        if not isinstance(client, dict) or not isinstance(client.get("name", ""), str):
            raise RpcError(
                rpc.INVALID_PARAMS, "params.clientInfo must be an object", "invalid_params"
            )
        claims = req.claims
        assert claims is not None
        agreed = version if version in HANDSHAKE_VERSIONS else OFFERED_VERSION
        now = self._now_ms()
        info = {
            "name": str(client.get("name", ""))[:200],
            "version": str(client.get("version", ""))[:100],
        }
        rec = SessionRecord(
            id=secrets.token_hex(16),
            server=req.server.name,
            subject=str(claims.subject),
            token_id=claims.token_id,
            task=claims.task,
            protocol_version=agreed,
            client_info=info,
            upstream_session=None,
            created_ms=now,
            expires_ms=now + int(self.settings.session_ttl * 1000),
        )
        try:
            await self.audit.arecord(
                Event(
                    type="mcp.session.started",
                    actor=str(claims.subject),
                    subject=req.server.name,
                    session=claims.task,
                    data={
                        "server": req.server.name,
                        "mcp_session": rec.id,
                        "token_id": claims.token_id,
                        "protocol_version": agreed,
                        "client_info": info,
                    },
                )
            )
        except Exception as e:
            raise RpcError(
                rpc.AUDIT_UNAVAILABLE,
                f"audit log unavailable, session refused ({type(e).__name__})",
                "audit_unavailable",
                503,
            ) from None
        try:
            await self.sessions.create(rec)
        except TetherError as e:
            raise RpcError(
                rpc.UPSTREAM_FAILED, f"session store unavailable: {e.message}", "store_error", 503
            ) from None
        capabilities: dict[str, Any] = {"tools": {"listChanged": False}}
        if any(m.startswith("prompts/") for m in req.server.passthrough):
            capabilities["prompts"] = {"listChanged": False}
        if any(m.startswith("resources/") for m in req.server.passthrough):
            capabilities["resources"] = {"listChanged": False, "subscribe": False}
        if "completion/complete" in req.server.passthrough:
            capabilities["completions"] = {}
        result = {
            "protocolVersion": agreed,
            "capabilities": capabilities,
            "serverInfo": {"name": f"tether-mcp/{req.server.name}", "version": tether.__version__},
            "instructions": (
                f"Tools of the MCP server {req.server.name!r} behind the Tether gateway: every "
                "call is decided by policy and recorded."
            ),
        }
        await req.reply.finish(
            200, rpc.result_bytes(msg.id, result), [(b"mcp-session-id", rec.id.encode())]
        )

    # -- DELETE ---------------------------------------------------------------------------

    async def _delete(self, req: _Req) -> None:
        req.claims = self._claims(req.headers)
        sess = await self._session(req)
        await self.sessions.end(sess)
        us = self._up_sessions.pop(sess.id, None) or UpstreamSession.decode(sess.upstream_session)
        self._up_locks.pop(sess.id, None)
        if us is not None:
            self._spawn(self.upstreams[req.server.name].end(us))
        self._record_later(
            Event(
                type="mcp.session.ended",
                actor=str(req.claims.subject),
                subject=req.server.name,
                session=req.claims.task,
                data={"server": req.server.name, "mcp_session": sess.id},
            )
        )
        await req.reply.empty(204)

    async def _record_quietly(self, ev: Event) -> None:
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.error("recording %s failed: %s", ev.type, type(e).__name__)

    # -- upstream -------------------------------------------------------------------------

    async def _upstream_session(
        self, server: ServerConfig, sess: SessionRecord, lost: UpstreamSession | None = None
    ) -> UpstreamSession:
        have = self._up_sessions.get(sess.id)
        if have is not None and have != lost:
            return have
        lock = self._up_locks.get(sess.id)
        if lock is None:
            if len(self._up_locks) > 10_000:
                self._up_locks = {k: v for k, v in self._up_locks.items() if v.locked()}
            lock = self._up_locks[sess.id] = asyncio.Lock()
        async with lock:
            have = self._up_sessions.get(sess.id)
            if have is not None and have != lost:
                return have
            rec = sess if lost is None else (await self.sessions.fresh(sess.id) or sess)
            stored = UpstreamSession.decode(rec.upstream_session)
            if stored is not None and stored != lost:
                return self._keep_up(sess.id, stored)
            up = self.upstreams[server.name]
            new = await up.open()
            text = await self.sessions.set_upstream(rec, rec.upstream_session, new.encode())
            won = UpstreamSession.decode(text)
            if won is None:
                return self._keep_up(sess.id, new)
            if won != new:  # another process opened one first: use theirs, end ours
                self._spawn(up.end(new))
            return self._keep_up(sess.id, won)

    def _keep_up(self, sid: str, us: UpstreamSession) -> UpstreamSession:
        if len(self._up_sessions) > 100_000:
            self._up_sessions.clear()
        self._up_sessions[sid] = us
        return us

    async def _upcall(
        self,
        server: ServerConfig,
        sess: SessionRecord,
        method: str,
        params: Mapping[str, Any] | None,
    ) -> Answer:
        up = self.upstreams[server.name]
        if not up.stateful:
            return await up.call(None, method, params)
        us = await self._upstream_session(server, sess)
        try:
            answer = await up.call(us, method, params)
        except SessionLost:
            us = await self._upstream_session(server, sess, lost=us)
            answer = await up.call(us, method, params)
        if answer.others and answer.list_changed():
            self._stale_callback(server.name)()
        return answer

    @staticmethod
    def _upstream_rpc_error(e: UpstreamError) -> RpcError:
        if isinstance(e, UpstreamTimeout):
            return RpcError(rpc.UPSTREAM_TIMEOUT, str(e), "upstream_timeout")
        return RpcError(rpc.UPSTREAM_FAILED, str(e), "upstream_failed")

    # -- tools/list -----------------------------------------------------------------------

    async def _catalog(
        self,
        server: ServerConfig,
        sess: SessionRecord,
        claims: TokenClaims,
        *,
        force: bool = False,
    ) -> Catalog:
        cat = self.catalogs.get(server.name)
        loop = asyncio.get_running_loop()
        if (
            cat is not None
            and not force
            and not cat.stale
            and loop.time() - cat.fetched < server.catalog_ttl
        ):
            return cat
        lock = self._catalog_locks.setdefault(server.name, asyncio.Lock())
        started = loop.time()
        async with lock:
            cat = self.catalogs.get(server.name)
            if cat is not None and cat.fetched >= started and not cat.stale:
                return cat  # fetched by someone else while we waited
            tools: list[Any] = []
            cursor: str | None = None
            try:
                for _ in range(MAX_PAGES):
                    answer = await self._upcall(
                        server, sess, "tools/list", {"cursor": cursor} if cursor else None
                    )
                    if answer.error is not None:
                        raise RpcError(
                            rpc.UPSTREAM_FAILED,
                            "upstream refused tools/list: "
                            + str(answer.error.get("message", ""))[:300],
                            "upstream_failed",
                        )
                    result = answer.message.get("result")
                    page = result.get("tools") if isinstance(result, dict) else None
                    if not isinstance(page, list):
                        raise RpcError(
                            rpc.UPSTREAM_FAILED,
                            "upstream answered tools/list without a list of tools",
                            "upstream_garbage",
                        )
                    tools.extend(page)
                    nxt = result.get("nextCursor") if isinstance(result, dict) else None
                    if not isinstance(nxt, str) or not nxt or nxt == cursor:
                        break
                    cursor = nxt
            except UpstreamError as e:
                raise self._upstream_rpc_error(e) from None
            cat = await self.pins.observe(
                server,
                tools,
                {"mcp_session": sess.id, "agent": str(claims.subject)},
            )
            cat.fetched = loop.time()
            self.catalogs[server.name] = cat
            return cat

    def _listable(self, claims: TokenClaims, server: ServerConfig, tool: str) -> bool:
        """May this identity call the tool at all (policy without arguments, no side effect:
        no approval is opened, no limit reserved)? Escalated tools are listed."""
        action = Action(
            "tool.call",
            claims,
            f"{server.name}.{tool}",
            context={"server": server.name, "tool": tool},
            effects=server.effects_of(tool),
        )
        return self.core.authorize(action).outcome != "deny"  # a failing check is a deny

    async def _list_tools(self, req: _Req, msg: Message, sess: SessionRecord) -> None:
        claims = req.claims
        assert claims is not None
        cat = await self._catalog(req.server, sess, claims, force=True)
        shown: list[dict[str, Any]] = []
        hidden: dict[str, str] = {}
        for name, t in cat.tools.items():
            if not t.usable:
                hidden[name] = f"blocked: {t.state}"
            elif self._listable(claims, req.server, name):
                shown.append(t.definition)
            else:
                hidden[name] = "not permitted"
        for name, why in cat.refused.items():
            hidden[name[:200]] = f"refused: {why}"
        await req.reply.finish(200, rpc.result_bytes(msg.id, {"tools": shown}))
        self._record_later(
            Event(
                type="mcp.tools.listed",
                actor=str(claims.subject),
                subject=req.server.name,
                session=claims.task,
                data={
                    "server": req.server.name,
                    "mcp_session": sess.id,
                    "shown": [t["name"] for t in shown],
                    "hidden": hidden,
                },
            )
        )

    # -- tools/call -----------------------------------------------------------------------

    async def _deny_call(
        self,
        action: Action,
        reasons: tuple[str, ...],
        policy: str,
        err: RpcError,
        data: Mapping[str, Any],
        body: bytes,
    ) -> RpcError:
        """Record a tool.call refused before policy was asked (unknown or blocked tool)."""
        try:
            version = self.core.authorizer.version
        except Exception:
            version = ""
        decision = Decision("deny", action.digest(), reasons, (policy,), version)
        await self._record_decision(action, decision, data, body)
        return dataclasses.replace(err, recorded=True)

    async def _record_decision(
        self, action: Action, decision: Decision, data: Mapping[str, Any], body: bytes
    ) -> None:
        with contextlib.suppress(Exception):
            await self.audit.arecord(
                DecisionCore.event(
                    action,
                    decision,
                    data=data,
                    bodies={"request": _cap(body, self.settings.max_recorded_body)},
                )
            )

    async def _tool(
        self,
        req: _Req,
        sess: SessionRecord,
        claims: TokenClaims,
        name: str,
        action: Action,
        data: Mapping[str, Any],
    ) -> CatalogTool:
        server = req.server
        try:
            cat = await self._catalog(server, sess, claims)
        except RpcError as e:
            raise await self._deny_call(
                action, (e.message,), "tether:mcp-catalog", e, data, req.body
            ) from None
        tool = cat.tools.get(name)
        loop_time = asyncio.get_running_loop().time()
        if tool is None and name not in cat.refused and loop_time - cat.fetched > 1.0:
            # Maybe new since the list was read: look once more before calling it unknown
            # (at most once a second, so unknown names cannot hammer the upstream).
            try:
                cat = await self._catalog(server, sess, claims, force=True)
            except RpcError as e:
                raise await self._deny_call(
                    action, (e.message,), "tether:mcp-catalog", e, data, req.body
                ) from None
            tool = cat.tools.get(name)
        if tool is None:
            if name in cat.refused:
                why = cat.refused[name]
                err = RpcError(
                    rpc.TOOL_REFUSED,
                    f"tool {name[:100]!r} of server {server.name!r} is refused: {why}",
                    "tool_refused",
                )
            else:
                like = cat.lookalike(name)
                hint = f" (did you mean {like!r}? names must match exactly)" if like else ""
                err = RpcError(
                    rpc.INVALID_PARAMS,
                    f"unknown tool {name[:100]!r} on server {server.name!r}{hint}",
                    "unknown_tool",
                )
            raise await self._deny_call(
                action, (err.message,), "tether:mcp-catalog", err, data, req.body
            )
        if not tool.usable:
            tool = await self.pins.recheck(server, tool)
            if tool.usable:
                cat.tools[name] = tool
        if not tool.usable:
            if tool.state == "changed":
                text = (
                    f"tool {name!r} of server {server.name!r} changed since it was approved "
                    f"(sha256 {(tool.approved_sha256 or '')[:12]} -> {tool.sha256[:12]}); it is "
                    f"blocked until re-approved: tether tools approve {server.name} {name}"
                )
            else:
                text = (
                    f"tool {name!r} of server {server.name!r} is not approved yet: "
                    f"tether tools approve {server.name} {name}"
                )
            err = RpcError(
                rpc.TOOL_BLOCKED,
                text,
                "tool_blocked",
                data={"sha256": tool.sha256, "approved_sha256": tool.approved_sha256},
            )
            raise await self._deny_call(action, (text,), "tether:mcp-pin", err, data, req.body)
        return tool

    async def _call_tool(
        self, req: _Req, msg: Message, sess: SessionRecord, receive: Receive
    ) -> None:
        claims = req.claims
        assert claims is not None
        server = req.server
        name = msg.params.get("name")
        args = msg.params.get("arguments")
        if args is None:
            args = {}
        if not isinstance(name, str) or not name:
            raise RpcError(
                rpc.INVALID_PARAMS,
                "params.name must be the tool's name (a string)",
                "invalid_params",
            )
        if not isinstance(args, dict):
            raise RpcError(
                rpc.INVALID_PARAMS, "params.arguments must be an object", "invalid_params"
            )
        try:
            args_digest = hashlib.sha256(canonical_json(args)).hexdigest()
        except (TetherError, TypeError, ValueError):
            raise RpcError(
                rpc.INVALID_PARAMS,
                "params.arguments must be plain JSON (integers within +-2^53)",
                "invalid_params",
            ) from None
        rid = f"{self._rid_prefix}{next(self._rids):x}"
        action = Action(
            "tool.call",
            claims,
            f"{server.name}.{name[:200]}",
            arguments=args,
            context={
                "server": server.name,
                "tool": name[:200],
                "mcp_session": sess.id,
                "arguments_digest": args_digest,
            },
            effects=server.effects_of(name),
        )
        data: dict[str, Any] = {"request_id": rid, "mcp_session": sess.id}
        tool = await self._tool(req, sess, claims, name, action, data)
        data["tool_sha256"] = tool.sha256
        decision = await self.core.adecide(action, 0.0)
        if decision.outcome == "escalate" and server.escalation_hold > 0:
            decision = await self._hold(req, action, decision, receive)
        if not decision.allowed:
            await self._record_decision(action, decision, data, req.body)
            raise self._refusal(action, decision)
        started = time.perf_counter()
        try:
            if self.inspectors:
                await self._inspect_call(server, name, claims, rid, args)
            event = DecisionCore.event(
                action,
                decision,
                data={**data, "upstream": server.kind},
                bodies={"request": _cap(req.body, self.settings.max_recorded_body)},
            )
            # Forward exactly what was decided (plus _meta, e.g. a progress token): no other
            # parameter rides along to the upstream.
            params: dict[str, Any] = {"name": name, "arguments": args}
            meta = msg.params.get("_meta")
            if isinstance(meta, dict):
                params["_meta"] = meta
            if server.record_first:
                await self._durable(submit(self.audit, event))
                answer = await self._upcall(server, sess, "tools/call", params)
            else:
                record = submit(self.audit, event)
                try:
                    answer = await self._upcall(server, sess, "tools/call", params)
                finally:
                    await self._durable(record)
        except RpcError as e:
            self.core.settle(decision, None)
            if e.reason in ("inspection_blocked", "audit_unavailable"):
                self._result_record(action, decision, data, e.reason, started, error=e.message)
            raise dataclasses.replace(e, recorded=True) from None
        except UpstreamError as e:
            self.core.settle(decision, action.cost)  # it may have run: count it
            err = self._upstream_rpc_error(e)
            self._result_record(action, decision, data, err.reason, started, error=str(e))
            raise dataclasses.replace(err, recorded=True) from None
        except BaseException:
            self.core.settle(decision, action.cost)
            raise
        self.core.settle(decision, action.cost)
        await self._deliver(req, msg, action, decision, data, answer, started, claims)

    async def _durable(self, record: Awaitable[Any]) -> None:
        try:
            await record
        except Exception as e:
            raise RpcError(
                rpc.AUDIT_UNAVAILABLE,
                f"audit log unavailable, call refused ({type(e).__name__})",
                "audit_unavailable",
            ) from None

    async def _deliver(
        self,
        req: _Req,
        msg: Message,
        action: Action,
        decision: Decision,
        data: dict[str, Any],
        answer: Answer,
        started: float,
        claims: TokenClaims,
    ) -> None:
        server = req.server
        err = answer.error
        if err is not None:
            code = err.get("code")
            if not isinstance(code, int) or -32059 <= code <= -32050:
                code = rpc.UPSTREAM_FAILED  # an upstream may not speak with Tether's codes
            payload: dict[str, Any] = {"code": code, "message": str(err.get("message", ""))[:2000]}
            if "data" in err and len(orjson.dumps(err["data"])) <= MAX_UPSTREAM_ERROR_DATA:
                payload["data"] = err["data"]
            out = orjson.dumps({"jsonrpc": "2.0", "id": msg.id, "error": payload})
            await req.reply.finish(200, out)
            self._result_record(action, decision, data, "upstream_error", started, out)
            return
        result = answer.message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("content", []), list):
            e = RpcError(
                rpc.UPSTREAM_FAILED,
                "upstream returned a tools/call result that is not an MCP result",
                "upstream_garbage",
                recorded=True,
            )
            self._result_record(
                action, decision, data, "upstream_garbage", started, _cap(answer.raw, 4096)
            )
            raise e
        if self.inspectors:
            ctx = ToolContext(server.name, str(action.context["tool"]), claims, data["request_id"])
            for ins in self.inspectors:
                f = await _inspected(ins.result(ctx, result), ins)
                if f is not None and f.action == "block":
                    text = f"tool result blocked by {f.detector}: {f.reason}"
                    self._result_record(action, decision, data, "blocked", started, error=text)
                    raise RpcError(
                        rpc.INSPECTION_BLOCKED, text, "inspection_blocked", recorded=True
                    )
                if f is not None:
                    data.setdefault("findings", []).append(
                        {"detector": f.detector, "action": f.action, "reason": f.reason}
                    )
        out = rpc.result_bytes(msg.id, result)
        await req.reply.finish(200, out)
        status = "tool_error" if result.get("isError") is True else "ok"
        self._result_record(action, decision, data, status, started, out)

    def _result_record(
        self,
        action: Action,
        decision: Decision,
        data: Mapping[str, Any],
        status: str,
        started: float,
        body: bytes | None = None,
        error: str | None = None,
    ) -> None:
        """Record the result without holding the agent's connection (the call's record was
        durable before the upstream saw it): lazy, to share the next commit. The action and
        its decision are in the call's record (same ``request_id``); this one stays small."""
        extra: dict[str, Any] = {
            **data,
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "action_digest": decision.action_digest,
        }
        if error:
            extra["error"] = error
        claims = action.principal
        self._record_later(
            Event(
                type="tool.result",
                actor=str(claims.subject),
                subject=action.resource,
                session=claims.task,
                data=extra,
                bodies={"response": _cap(body, self.settings.max_recorded_body)} if body else {},
            )
        )

    async def _inspect_call(
        self,
        server: ServerConfig,
        name: str,
        claims: TokenClaims,
        rid: str,
        args: Mapping[str, Any],
    ) -> None:
        ctx = ToolContext(server.name, name, claims, rid)
        for ins in self.inspectors:
            f = await _inspected(ins.call(ctx, args), ins)
            if f is not None and f.action == "block":
                raise RpcError(
                    rpc.INSPECTION_BLOCKED,
                    f"tool call blocked by {f.detector}: {f.reason}",
                    "inspection_blocked",
                )

    def _refusal(self, action: Action, decision: Decision) -> RpcError:
        reasons = "; ".join(decision.reasons) or "denied by policy"
        if decision.outcome == "escalate":
            return RpcError(
                rpc.APPROVAL_PENDING,
                f"tools/call {action.resource} needs approval {decision.approval} "
                f"({decision.quorum}); retry the same call once it is approved: {reasons}",
                "approval_pending",
                data={"approval": decision.approval, "quorum": decision.quorum},
                recorded=True,
            )
        return RpcError(
            rpc.POLICY_DENIED,
            f"tools/call {action.resource} denied: {reasons}",
            "policy_denied",
            data={"reasons": list(decision.reasons), "policies": list(decision.policies)},
            recorded=True,
        )

    async def _hold(
        self, req: _Req, action: Action, decision: Decision, receive: Receive
    ) -> Decision:
        """Wait up to the server's ``escalation_hold`` for the approval. A client that accepts
        SSE gets keep-alive comments meanwhile, so no proxy cuts the idle connection."""
        hold = req.server.escalation_hold
        accept = req.headers.get(b"accept", b"")
        keepalive: asyncio.Task[None] | None = None
        if b"text/event-stream" in accept:
            await req.reply.start_sse()

            async def beat() -> None:
                while True:
                    await req.reply.comment(f"waiting for approval {decision.approval}")
                    await asyncio.sleep(KEEPALIVE)

            keepalive = asyncio.ensure_future(beat())
        wait = asyncio.ensure_future(self.core.adecide(action, hold))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((wait, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if keepalive is not None:
                keepalive.cancel()
        if not wait.done():
            wait.cancel()
            with contextlib.suppress(BaseException):
                await wait
            return dataclasses.replace(
                decision,
                reasons=(*decision.reasons, "the client left while waiting for the approval"),
            )
        return wait.result()

    # -- passthrough ----------------------------------------------------------------------

    async def _passthrough(self, req: _Req, msg: Message, sess: SessionRecord) -> None:
        claims = req.claims
        assert claims is not None
        started = time.perf_counter()
        try:
            answer = await self._upcall(req.server, sess, msg.method, msg.params or None)
        except UpstreamError as e:
            raise self._upstream_rpc_error(e) from None
        body = answer.message
        out = orjson.dumps(
            {
                "jsonrpc": "2.0",
                "id": msg.id,
                **({"error": body["error"]} if "error" in body else {"result": body.get("result")}),
            }
        )
        await req.reply.finish(200, out)
        self._record_later(
            Event(
                type="mcp.passthrough",
                actor=str(claims.subject),
                subject=req.server.name,
                session=claims.task,
                data={
                    "server": req.server.name,
                    "method": msg.method,
                    "mcp_session": sess.id,
                    "status": "upstream_error" if "error" in body else "ok",
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                },
                bodies={
                    "request": _cap(req.body, self.settings.max_recorded_body),
                    "response": _cap(out, self.settings.max_recorded_body),
                },
            )
        )


def _too_big(limit: int) -> RpcError:
    return RpcError(
        rpc.INVALID_REQUEST,
        f"message larger than {limit} bytes",
        "message_too_large",
        413,
        {"limit": limit},
    )


async def _inspected(check: Awaitable[Finding | None], ins: object) -> Finding | None:
    """An inspector's finding; one that raises blocks (fail closed), naming the failure."""
    try:
        return await check
    except Exception as e:
        name = type(ins).__name__
        log.warning("inspector %s failed: %s", name, type(e).__name__)
        return Finding(name, "block", f"the inspector failed ({type(e).__name__}); fail closed")


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return
