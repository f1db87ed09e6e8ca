"""The egress gateway: an HTTP/1.1 proxy that lets an agent reach only the destinations its
grants and the policy allow, one ``egress.connect`` Action per connection.

Per connection::

    head (<= max_header_bytes, <= max_headers lines, within header_timeout)
      -> identity: bound to the listener (a beam's own socket) or Proxy-Authorization
      -> egress.connect Action on host:port -> DecisionCore (grants, Cedar, limits, approvals)
                                                   -- deny / escalate: 403, recorded
      -> resolve on the host side -> address policy (no internal address unless allowed)
                                                   -- refused: 403, recorded as a deny
      -> egress.connect record queued  ||  TCP connect to the exact address checked
      -> record durable? (else 503: nothing flows)
      -> CONNECT: 200, then bytes both ways | plain HTTP: the one request, its response
      -> egress.closed record: bytes each way, duration, how it ended

Every refusal before a decision (bad input, no credential, a slow head) is an
``egress.refused`` record. Tokens never reach a record or a log line: records carry the token
id, and the credential header is dropped before anything is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.errors import ConfigError, InvalidToken, TetherError, TokenExpired, TokenRevoked
from tether.events import Event, Recorder
from tether.gateways.egress.addresses import (
    AddressPolicy,
    ResolveError,
    Resolver,
    SystemResolver,
)
from tether.gateways.egress.config import EgressSettings
from tether.gateways.egress.http1 import ClientGone, copy_chunked, copy_exact, read_head
from tether.gateways.egress.protocol import (
    ESTABLISHED,
    IPAddress,
    ProxyError,
    ProxyRequest,
    Target,
    content_length,
    forward_head,
    parse_head,
    proxy_token,
    render_error,
    rewrite_response_head,
)
from tether.gateways.egress.relay import CHUNK, RelayResult, relay
from tether.identity.claims import TokenClaims
from tether.identity.grants import Grant, Grants
from tether.identity.verifier import Verifier
from tether.policy.action import Action, Decision
from tether.policy.core import DecisionCore

__all__ = [
    "ADDRESS_POLICY_ID",
    "EgressGateway",
    "EgressListener",
    "egress_grant",
    "recheck_with",
]

log = logging.getLogger("tether.gateways.egress")

ADDRESS_POLICY_ID = "tether:egress-address"
CLIENT_LIMIT = 64 * 1024  # stream buffer per client: bounds a header line in memory
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_LINES = 256
LINGER = 1.0  # seconds to drain a refused client's unread bytes before closing
LINGER_BYTES = 256 * 1024
_CHALLENGE = (
    ("Proxy-Authenticate", 'Basic realm="tether", charset="UTF-8"'),
    ("Proxy-Authenticate", 'Bearer realm="tether"'),
)

Recheck = Callable[[TokenClaims], None]


def recheck_with(verifier: Verifier) -> Recheck:
    """The checks that change with time, for claims bound to a listener: validity window and
    revocation (the same ones the verifier repeats on a cache hit). Raises InvalidToken."""

    def check(claims: TokenClaims) -> None:
        now = verifier.clock.now()
        if claims.not_before > now + verifier.leeway:
            raise InvalidToken(f"token {claims.token_id[:64]} is not yet valid")
        if now >= claims.expires_at + verifier.leeway:
            raise TokenExpired(f"token {claims.token_id[:64]} has expired")
        reason = verifier.revocations.reason(claims)
        if reason is not None:
            raise TokenRevoked(f"token revoked: {reason}")

    return check


def egress_grant(grants: Grants, target: Target) -> Grant | None:
    """The first egress grant covering ``target``. A pattern with a port (``api.x.com:443``)
    matches ``host:port``; one without (``api.x.com``, ``*.x.com``) matches the host on any
    port. IP literals match as written (``egress:203.0.113.7``)."""
    for g in grants.of_kind("egress"):
        if g.matches(target.resource) or g.matches(target.host):
            return g
    return None


@dataclass(slots=True)
class _Conn:
    """One client connection's state, for its records."""

    id: str
    started: float
    claims: TokenClaims | None
    listener: str
    req: ProxyRequest | None = None
    action: Action | None = None
    decision: Decision | None = None
    grant: str | None = None
    addresses: list[str] = field(default_factory=list)
    address: str | None = None
    status: int | None = None
    answered: bool = False  # bytes of an answer went to the client: no error page now


class EgressListener:
    """One listening socket. ``aclose`` stops accepting and cuts its open connections (each
    recorded as ended by ``gateway_closed``)."""

    def __init__(self, gateway: EgressGateway, name: str, claims: TokenClaims | None) -> None:
        self.gateway = gateway
        self.name = name
        self.claims = claims
        self.server: asyncio.AbstractServer | None = None
        self.path: Path | None = None
        self.address: tuple[str, int] | None = None
        self.connections: set[asyncio.Task[Any]] = set()
        self.closed = False

    def __repr__(self) -> str:
        who = str(self.claims.subject) if self.claims else "token"
        return f"EgressListener({self.name!r}, identity={who!r})"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            await self.gateway._handle_from(self.name, reader, writer, self.claims)
        except asyncio.CancelledError:
            # Only ``aclose`` cancels these; ending normally keeps asyncio's stream callback
            # (which calls ``task.exception()``) from logging the cancellation as an error.
            pass
        finally:
            if task is not None:
                self.connections.discard(task)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.server is not None:
            self.server.close()
        tasks = tuple(self.connections)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.gateway._listeners.discard(self)


class EgressGateway:
    """The gateway. Build one per process (``build_egress_gateway``); ``aclose`` at shutdown."""

    def __init__(
        self,
        settings: EgressSettings,
        *,
        verify: Callable[[str], TokenClaims],
        core: DecisionCore,
        audit: Recorder,
        recheck: Recheck | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.verify = verify
        self.core = core
        self.audit = audit
        self.recheck = recheck
        self.resolver: Resolver = resolver or SystemResolver()
        self.addresses = AddressPolicy(settings.allow_private)
        self._listeners: set[EgressListener] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._open = 0

    def __repr__(self) -> str:
        return f"EgressGateway(listeners={len(self._listeners)}, open={self._open})"

    @property
    def open_connections(self) -> int:
        return self._open

    # -- listeners ------------------------------------------------------------------------

    async def serve_unix(
        self, path: str | os.PathLike[str], claims: TokenClaims | None = None, mode: int = 0o600
    ) -> EgressListener:
        """Listen on a unix socket. With ``claims`` every connection on it acts as that
        identity (a beam's own socket: no token needed inside the beam); without, each
        connection must present a token. Put the socket in a directory only its user can
        enter; the socket itself is made ``mode`` (owner only by default)."""
        p = Path(path)
        _remove_stale_socket(p)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(p))
            os.chmod(p, mode)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        listener = EgressListener(self, f"unix:{p}", claims)
        listener.path = p
        listener.server = await asyncio.start_unix_server(
            listener._accept, sock=sock, limit=CLIENT_LIMIT, backlog=1024
        )
        self._listeners.add(listener)
        return listener

    async def serve_tcp(
        self, host: str = "127.0.0.1", port: int = 0, claims: TokenClaims | None = None
    ) -> EgressListener:
        """Listen on TCP (``port=0``: a free port, see ``listener.address``). Raises
        ConfigError if the address cannot be bound."""
        listener = EgressListener(self, "", claims)
        try:
            server = await asyncio.start_server(
                listener._accept, host, port, limit=CLIENT_LIMIT, backlog=1024, reuse_address=True
            )
        except OSError as e:
            raise ConfigError(
                f"egress gateway cannot listen on {host}:{port}: {e.strerror or e}"
            ) from e
        sockname = server.sockets[0].getsockname()
        listener.address = (str(sockname[0]), int(sockname[1]))
        listener.name = f"tcp:{listener.address[0]}:{listener.address[1]}"
        listener.server = server
        self._listeners.add(listener)
        return listener

    async def drain(self) -> None:
        """Wait for the end-of-connection records still being written (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*tuple(self._background), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop every listener and cut every open connection (also those served through
        ``handle``), then wait for their end records."""
        for listener in tuple(self._listeners):
            await listener.aclose()
        tasks = tuple(self._connections)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.drain()

    # -- one connection ---------------------------------------------------------------------

    async def handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        claims: TokenClaims | None = None,
    ) -> None:
        """Serve one client connection (one tunnel or one plain-HTTP request) on streams the
        caller accepted. With ``claims``, the connection acts as that identity."""
        await self._handle_from("streams", reader, writer, claims)

    async def _handle_from(
        self,
        listener: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        claims: TokenClaims | None,
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            if self._open >= self.settings.max_connections:
                log.warning("egress gateway at capacity (%d connections)", self._open)
                err = ProxyError(503, "too many open connections; retry later", "over_capacity")
                await _answer(reader, writer, err)
                return
            self._open += 1
            try:
                conn = _Conn("egc_" + secrets.token_hex(10), time.perf_counter(), claims, listener)
                await self._connection(conn, reader, writer)
            finally:
                self._open -= 1
        finally:
            _abort(writer)
            if task is not None:
                self._connections.discard(task)

    async def _connection(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        s = self.settings
        try:
            try:
                async with asyncio.timeout(s.header_timeout):
                    head = await read_head(reader, s.max_header_bytes, s.max_headers)
            except TimeoutError:
                raise ProxyError(
                    408,
                    f"the request head did not arrive within {s.header_timeout:g}s; closing",
                    "header_timeout",
                ) from None
            conn.req = parse_head(head, s.max_headers)
            conn.claims = self._identify(conn.req, conn.claims)
            await self._serve(conn, reader, writer)
        except ClientGone as e:
            if e.partial:
                await self._record_refusal(
                    conn,
                    ProxyError(400, "the client closed mid-request-head", "incomplete_head"),
                )
        except ProxyError as e:
            if not e.recorded:
                await self._record_refusal(conn, e)
            if not conn.answered:
                await _answer(reader, writer, e)
        except Exception as e:  # never a crash, never a traceback to the client
            log.error("egress gateway failed: %s", type(e).__name__, exc_info=True)
            err = ProxyError(502, f"gateway error ({type(e).__name__})", "gateway_error")
            await self._record_refusal(conn, err)
            if not conn.answered:
                await _answer(reader, writer, err)

    def _identify(self, req: ProxyRequest, bound: TokenClaims | None) -> TokenClaims:
        if bound is not None:
            if self.recheck is not None:
                try:
                    self.recheck(bound)
                except TetherError as e:
                    raise ProxyError(
                        407,
                        f"this listener's identity is no longer valid: {e.message}",
                        "identity_invalid",
                        _CHALLENGE,
                    ) from None
            return bound
        if req.header_count("proxy-authorization") > 1:
            raise ProxyError(400, "more than one Proxy-Authorization header", "bad_header")
        token = proxy_token(req.header("proxy-authorization"))
        try:
            return self.verify(token)
        except TetherError as e:
            raise ProxyError(
                407, f"token refused: {e.message}", "invalid_token", _CHALLENGE
            ) from None

    # -- the decision -------------------------------------------------------------------------

    def _action(self, conn: _Conn, req: ProxyRequest, claims: TokenClaims) -> Action:
        target = req.target
        ctx: dict[str, Any] = {"port": target.port, "method": req.method}
        if req.mode == "http":
            ctx["path"] = req.path.partition("?")[0]  # the query may carry secrets
        grant = egress_grant(claims.grants, target)
        if grant is None:
            grant = self._jit_grant(claims, target)
            if grant is not None:
                ctx["granted_by"] = "jit"
        ctx["granted"] = grant is not None
        conn.grant = str(grant) if grant is not None else None
        return Action("egress.connect", claims, target.resource, context=ctx)

    def _jit_grant(self, claims: TokenClaims, target: Target) -> Grant | None:
        """A just-in-time egress grant in force, matched with the same host/port rules.
        Any failure counts as no grant (the default policy then denies: fail closed)."""
        extra = self.core.extra_grants
        if extra is None:
            return None
        try:
            return egress_grant(extra(claims), target)
        except Exception as e:
            log.warning("just-in-time grant lookup failed: %s", type(e).__name__)
            return None

    async def _serve(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        req, claims = conn.req, conn.claims
        assert req is not None and claims is not None
        s = self.settings
        target = req.target
        action = conn.action = self._action(conn, req, claims)
        decision = await self.core.adecide(action, s.escalation_hold)
        conn.decision = decision
        if not decision.allowed:
            await self._record_decision(conn, decision)
            raise _recorded(_denial(action, decision))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.connect_timeout
        try:
            if target.ip is not None:
                candidates: list[IPAddress] = [target.ip]
            else:
                async with asyncio.timeout(s.connect_timeout):
                    candidates = await self.resolver.resolve(target.host, target.port)
        except (ResolveError, TimeoutError, OSError) as e:
            text = str(e) or f"resolving {target.host!r} timed out"
            await self._record_decision(conn, decision, {"error": text})
            self.core.settle(decision, None)
            self._record_end(conn, RelayResult(ended="resolve_failed", error=text))
            raise _recorded(ProxyError(502, text, "resolve_failed")) from None

        permitted = [ip for ip in candidates if self.addresses.refusal(ip) is None]
        conn.addresses = [str(ip) for ip in candidates]
        if not permitted:
            why = self.addresses.refusal(candidates[0]) or "address refused"
            decision = conn.decision = dataclasses.replace(
                decision,
                outcome="deny",
                reasons=(*decision.reasons, why),
                policies=(*decision.policies, ADDRESS_POLICY_ID),
            )
            self.core.settle(decision, None)
            await self._record_decision(conn, decision)
            raise _recorded(
                ProxyError(403, f"egress to {target.resource} refused: {why}", "address_refused")
            )

        record = asyncio.ensure_future(self.audit.arecord(self._decision_event(conn, decision)))
        try:
            up_r, up_w, ip = await self._dial(target, permitted, deadline)
        except ProxyError as e:
            await _settled(record)
            self.core.settle(decision, None)
            self._record_end(conn, RelayResult(ended=e.code, error=e.message))
            raise _recorded(e) from None
        except BaseException:
            await _settled(record)
            self.core.settle(decision, None)
            raise
        conn.address = str(ip)
        try:
            await record
        except Exception as e:
            _abort(up_w)
            self.core.settle(decision, None)
            detail = e.message if isinstance(e, TetherError) else type(e).__name__
            raise ProxyError(
                503, f"audit log unavailable, connection refused ({detail})", "audit_unavailable"
            ) from None

        result = RelayResult()
        try:
            if req.mode == "connect":
                conn.answered = True
                writer.write(ESTABLISHED)
                await relay(reader, writer, up_r, up_w, s.idle_timeout, result)
            else:
                await self._forward_http(conn, req, reader, writer, up_r, up_w, result)
        except asyncio.CancelledError:
            result.ended = result.ended or "gateway_closed"
            raise
        except ProxyError as e:
            result.ended = result.ended or e.code
            result.error = e.message
            raise _recorded(e) from None  # the end record below covers it
        finally:
            _abort(up_w)
            self.core.settle(decision, action.cost)
            self._record_end(conn, result)

    async def _dial(
        self, target: Target, addresses: list[IPAddress], deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IPAddress]:
        """Connect to the first of ``addresses`` that answers, by address (never by name
        again), before ``deadline``."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for ip in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    # by address, numerically: this can never become a second DNS lookup
                    r, w = await asyncio.open_connection(
                        str(ip),
                        target.port,
                        limit=CHUNK,
                        family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                        proto=socket.IPPROTO_TCP,
                        flags=socket.AI_NUMERICHOST,
                    )
                return r, w, ip
            except TimeoutError:
                break
            except OSError as e:
                why = os.strerror(e.errno) if e.errno else type(e).__name__
                errors.append(f"{ip}: {why}")
        if len(errors) < len(addresses):
            raise ProxyError(
                504,
                f"connecting to {target.resource} timed out after "
                f"{self.settings.connect_timeout:g}s",
                "connect_timeout",
            )
        raise ProxyError(
            502, f"cannot connect to {target.resource}: {'; '.join(errors)}", "connect_failed"
        )

    # -- plain HTTP -----------------------------------------------------------------------

    async def _forward_http(
        self,
        conn: _Conn,
        req: ProxyRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
        result: RelayResult,
    ) -> None:
        """The one request (its body copied by its framing) and its response, then close."""
        head = forward_head(req)
        up_w.write(head)
        result.bytes_up += len(head)
        body = asyncio.ensure_future(self._request_body(req, reader, up_w, result))
        response = asyncio.ensure_future(self._response(conn, up_r, writer, result))
        try:
            await asyncio.wait({body, response}, return_when=asyncio.FIRST_COMPLETED)
            if not response.done():
                body.result()  # a failed request body ends the exchange (raises)
                await response
            response.result()
        except ClientGone:
            result.ended = result.ended or "client_closed"
        except (ConnectionError, OSError) as e:
            result.ended = result.ended or "connection_reset"
            result.error = type(e).__name__
        finally:
            for t in (body, response):
                t.cancel()
            await asyncio.gather(body, response, return_exceptions=True)

    async def _request_body(
        self,
        req: ProxyRequest,
        reader: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
        result: RelayResult,
    ) -> None:
        if req.header("transfer-encoding") is not None:
            result.bytes_up += await copy_chunked(reader, up_w)
            return
        n = content_length(req)
        if n:
            result.bytes_up += await copy_exact(reader, up_w, n)

    async def _response(
        self,
        conn: _Conn,
        up_r: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        result: RelayResult,
    ) -> None:
        idle = self.settings.idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle):
                    head = await read_head(up_r, MAX_RESPONSE_HEAD, MAX_RESPONSE_LINES)
            except TimeoutError:
                raise ProxyError(
                    504, f"the destination sent no response within {idle:g}s", "idle_timeout"
                ) from None
            except ClientGone:
                raise ProxyError(
                    502, "the destination closed without a response", "upstream_closed"
                ) from None
            except ProxyError:
                raise ProxyError(
                    502, "the destination sent a malformed response head", "bad_upstream"
                ) from None
            status, rewritten = rewrite_response_head(head)
            if 100 <= status < 200 and status != 101:
                writer.write(head)  # interim (100 Continue): passed on as sent
                result.bytes_down += len(head)
                await writer.drain()
                continue
            conn.status = status
            conn.answered = True
            writer.write(rewritten)
            result.bytes_down += len(rewritten)
            break
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await up_r.read(CHUNK)
            except TimeoutError:
                result.ended = "idle_timeout"
                return
            except (ConnectionError, OSError) as e:
                result.ended, result.error = "upstream_reset", type(e).__name__
                return
            if not data:
                result.ended = "upstream_closed"
                await writer.drain()
                return
            writer.write(data)
            result.bytes_down += len(data)
            await writer.drain()

    # -- records ----------------------------------------------------------------------------

    def _base_data(self, conn: _Conn) -> dict[str, Any]:
        data: dict[str, Any] = {"connection_id": conn.id, "listener": conn.listener}
        if conn.req is not None:
            data["mode"] = conn.req.mode
            if conn.req.mode == "http":
                data["method"] = conn.req.method
                data["path"] = conn.req.path.partition("?")[0]
        if conn.grant is not None:
            data["grant"] = conn.grant
        if conn.addresses:
            data["addresses"] = list(conn.addresses)
        return data

    def _decision_event(
        self, conn: _Conn, decision: Decision, extra: dict[str, Any] | None = None
    ) -> Event:
        assert conn.action is not None
        data = self._base_data(conn)
        if extra:
            data.update(extra)
        return DecisionCore.event(conn.action, decision, data=data)

    async def _record_decision(
        self, conn: _Conn, decision: Decision, extra: dict[str, Any] | None = None
    ) -> None:
        """Record a decision that refuses (the refusal stands whether or not this works)."""
        try:
            await self.audit.arecord(self._decision_event(conn, decision, extra))
        except Exception as e:
            log.error("recording an egress decision failed: %s", type(e).__name__)

    def _record_end(self, conn: _Conn, result: RelayResult) -> None:
        """Record how an allowed connection ended, without holding anything up."""
        try:
            assert conn.action is not None and conn.decision is not None
            data = self._base_data(conn)
            data.update(
                {
                    "ended": result.ended or "unknown",
                    "bytes_up": result.bytes_up,
                    "bytes_down": result.bytes_down,
                    "duration_us": int((time.perf_counter() - conn.started) * 1e6),
                }
            )
            if conn.address is not None:
                data["address"] = conn.address
            if conn.status is not None:
                data["status"] = conn.status
            if result.error:
                data["error"] = result.error
            ev = DecisionCore.event(conn.action, conn.decision, data=data)
            ev = dataclasses.replace(ev, type="egress.closed")
        except Exception as e:
            log.error("building an egress end record failed: %s", type(e).__name__)
            return
        task = asyncio.get_running_loop().create_task(self._write(ev))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write(self, ev: Event) -> None:
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.error("recording the end of an egress connection failed: %s", type(e).__name__)

    async def _record_refusal(self, conn: _Conn, err: ProxyError) -> None:
        """An attempt refused before any decision: bad input, no or bad credential, too slow."""
        claims = conn.claims
        data = self._base_data(conn)
        data.update({"status": err.status, "code": err.code, "reason": err.message})
        if claims is not None:
            data["token_id"] = claims.token_id
        ev = Event(
            type="egress.refused",
            actor=str(claims.subject) if claims else None,
            subject=conn.req.target.resource if conn.req else None,
            session=claims.task if claims else None,
            decision="deny",
            data=data,
        )
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.error("recording a refused egress attempt failed: %s", type(e).__name__)


def _recorded(err: ProxyError) -> ProxyError:
    err.recorded = True
    return err


def _denial(action: Action, decision: Decision) -> ProxyError:
    reasons = "; ".join(decision.reasons) or "denied by policy"
    if decision.outcome == "escalate":
        return ProxyError(
            403,
            f"egress to {action.resource} needs approval {decision.approval} "
            f"({decision.quorum}): {reasons}. Retry once it is approved.",
            "approval_pending",
            (("X-Tether-Approval", str(decision.approval)),),
        )
    code = "policy_denied" if action.context.get("granted") else "not_granted"
    return ProxyError(403, f"egress to {action.resource} denied: {reasons}", code)


async def _settled(fut: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        await fut


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, err: ProxyError
) -> None:
    """Send the refusal and our FIN, then read and discard what the client is still sending
    for a moment (at most LINGER seconds, LINGER_BYTES bytes): closing a socket with unread
    input sends a reset, which can destroy the answer before the client reads it."""
    try:
        writer.write(render_error(err))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            seen = 0
            while seen < LINGER_BYTES:
                data = await reader.read(65536)
                if not data:
                    break
                seen += len(data)
    except (Exception, TimeoutError):
        return


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left at ``path`` by a listener that died; refuse to touch anything
    else, or a socket something still answers on."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise FileExistsError(f"something is already listening on {path}")
    finally:
        probe.close()
