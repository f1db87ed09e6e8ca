"""The HTTP gateway: a raw ASGI app serving ``/http/<service>/<path>``.

Per request::

    headers checked (framing, control bytes, size) -> token (cached verify)
      -> target normalised from the raw path (service, path, query) -> method -> body (cap)
      -> the service's rules (a config-level allow-list: no match, 403, nothing decided)
      -> http.request Action (resource "service/path", context method + path, the rule's
         effects) -> DecisionCore (grants, Cedar, group limits, approvals; optional hold)
      -> unsafe request (a method other than GET / HEAD / OPTIONS, or a rule that declares
         an effect): its record durable BEFORE the upstream sees it
      -> upstream, credential injected
      -> safe request, whole response (<= 256 KiB): ONE record, request and response,
         durable before the agent gets a byte; streamed response: the request record durable
         before the first byte
      -> response relayed (small bodies whole; others streamed as they arrive)
      -> the response record of an unsafe or streamed request (in the background, lazily:
         it shares the audit log's next commit) -> group-limit reservation settled

Nothing reaches the upstream before an ``allow``; nothing with a side effect reaches it before
its record is durable; nothing reaches the agent before the request record is durable. A
failure mid-stream ends the connection without completing the response, so the agent sees a
cut body, never one that looks whole.
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
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tether.errors import AuthenticationError, RecordFailed, TetherError
from tether.events import Event, Recorder, submit
from tether.gateways.http.config import METHODS, HTTPSettings, Rule, Service
from tether.gateways.http.errors import HTTPGatewayError, render_error
from tether.gateways.http.headers import Inbound, Scrubber, inbound, outbound, record_headers
from tether.gateways.http.paths import PathError, Target, parse_target
from tether.gateways.http.upstream import (
    Response,
    UpstreamFailed,
    UpstreamProtocolError,
    Upstreams,
    UpstreamTimeout,
    UpstreamUnreachable,
    content_length,
    not_sent,
)
from tether.identity.claims import TokenClaims
from tether.policy.action import Action, Cost, Decision
from tether.policy.core import DecisionCore

__all__ = ["HTTP_PREFIX", "SAFE_METHODS", "WHOLE_BODY_MAX", "HTTPGateway", "with_http_gateway"]

log = logging.getLogger("tether.gateways.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HTTP_PREFIX = "/http/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Responses up to this size (by Content-Length) are read whole before the first byte goes out,
# so an upstream failure while reading them is still a clean JSON error.
WHOLE_BODY_MAX = 256 * 1024
_RAW_PATH_SAFE = "/!$&'()*+,;=:@-._~%"


def with_http_gateway(app: ASGIApp, gateway: HTTPGateway) -> ASGIApp:
    """An ASGI app that sends ``/http/...`` to ``gateway`` and everything else to ``app``."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith(HTTP_PREFIX):
            await gateway(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


class _Out:
    """``send``, remembering whether the response has started (then no error page fits)."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
        await self.send(msg)


@dataclass(slots=True)
class _Seen:
    """What is known about a request so far, for the record of its refusal."""

    claims: TokenClaims | None = None
    target: Target | None = None


@dataclass(slots=True)
class _Call:
    """One forwarded request's state, for its records."""

    rid: str
    service: Service
    target: Target
    method: str
    action: Action
    decision: Decision
    rule: Rule | None
    started: float
    forwarded: bool = False


class _Capture:
    """The first ``limit`` bytes of a body for the record, plus its size and SHA-256."""

    __slots__ = ("hasher", "limit", "parts", "size", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.total = 0
        self.hasher = hashlib.sha256()

    def add(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        self.hasher.update(data)
        room = self.limit - self.size
        if room > 0:
            piece = data[:room]
            self.parts.append(piece)
            self.size += len(piece)

    def data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": self.total}
        if self.total:
            out["sha256"] = self.hasher.hexdigest()
            out["truncated"] = self.total > self.size
        return out

    def body(self) -> bytes:
        return b"".join(self.parts)


class HTTPGateway:
    """The gateway ASGI app. Build one per process; ``await aclose()`` at shutdown."""

    def __init__(
        self,
        settings: HTTPSettings,
        *,
        verify: Callable[[str], TokenClaims],
        core: DecisionCore,
        audit: Recorder,
    ) -> None:
        self.settings = settings
        self.verify = verify
        self.core = core
        self.audit = audit
        self.upstreams = Upstreams(settings)
        self._background: set[asyncio.Future[Any]] = set()
        # Request ids: unique per process start, a counter after that (no urandom per call).
        self._rid_prefix = secrets.token_hex(5)
        self._rid_seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"HTTPGateway(services={sorted(self.settings.services)!r})"

    async def drain(self) -> None:
        """Wait for the response records still being written (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*tuple(self._background), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.upstreams.aclose()

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # not proxied: refuse the handshake
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": 1008})
            return
        rid = f"req_{self._rid_prefix}{next(self._rid_seq):014x}"
        out = _Out(send)
        try:
            await self._handle(scope, receive, out, rid)
        except HTTPGatewayError as e:
            await self._error(out, e, rid)
        except Exception as e:  # never a 500 page, never a crash
            log.exception("HTTP gateway failed on %s", rid)
            await self._error(
                out,
                HTTPGatewayError(502, "gateway_error", f"gateway error ({type(e).__name__})"),
                rid,
            )

    async def _error(self, out: _Out, e: HTTPGatewayError, rid: str) -> None:
        if out.started:
            # Mid-response: returning without completing it makes the server close the
            # connection, so the agent cannot mistake a cut body for a whole one.
            return
        headers, body = render_error(e, rid)
        with contextlib.suppress(Exception):
            await out({"type": "http.response.start", "status": e.status, "headers": headers})
            await out({"type": "http.response.body", "body": body})

    # -- admission ------------------------------------------------------------------------------

    def _admit(self, scope: Scope, seen: _Seen) -> tuple[Service, Target, Inbound, TokenClaims]:
        """Headers, token, target, service, method; raises HTTPGatewayError. ``seen`` gets
        what is known so far, for the refusal's record."""
        raw = scope.get("raw_path")
        if not raw:
            raw = quote(scope["path"], safe=_RAW_PATH_SAFE).encode("ascii")
        target: Target | None = None
        path_error: PathError | None = None
        try:
            target = parse_target(raw, scope.get("query_string") or b"")
        except PathError as e:
            path_error = e
        service = self.settings.services.get(target.service) if target else None
        limits = service.limits if service else self.settings.defaults
        inb = inbound(
            scope["headers"],
            max_bytes=limits.max_header_bytes,
            injected=service.auth.header if service else "",
            forward_cookies=limits.forward_cookies,
        )
        if inb.token is None:
            raise HTTPGatewayError(401, "unauthenticated", inb.auth_error or "no token")
        try:
            claims = self.verify(inb.token)
        except AuthenticationError as e:
            raise HTTPGatewayError(401, "unauthenticated", e.message) from None
        except TetherError as e:
            raise HTTPGatewayError(401, "unauthenticated", f"token refused: {e.message}") from None
        seen.claims = claims
        if path_error is not None:
            raise HTTPGatewayError(path_error.status, path_error.code, path_error.message)
        assert target is not None
        seen.target = target
        if service is None:
            raise HTTPGatewayError(
                404, "unknown_service", f"no HTTP service named {target.service[:100]!r}"
            )
        method = scope["method"]
        if method not in METHODS:
            raise HTTPGatewayError(
                405, "method_not_allowed", f"{method[:20]} is not forwarded by this gateway"
            )
        return service, target, inb, claims

    async def _body(self, scope: Scope, receive: Receive, service: Service) -> bytes:
        limit = service.limits.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and int(value) > limit:
                raise HTTPGatewayError(
                    413, "request_too_large", f"request body is larger than {limit} bytes"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise HTTPGatewayError(400, "client_disconnected", "client went away")
            data = msg.get("body", b"")
            if data:
                size += len(data)
                if size > limit:
                    raise HTTPGatewayError(
                        413, "request_too_large", f"request body is larger than {limit} bytes"
                    )
                chunks.append(data)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _refused(self, rid: str, scope: Scope, seen: _Seen, err: HTTPGatewayError) -> None:
        """Record a request refused before any decision; the refusal stands either way."""
        claims, target = seen.claims, seen.target
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
        data: dict[str, Any] = {
            "request_id": rid,
            "method": str(scope.get("method", ""))[:20],
            "raw_path": raw.decode("latin-1")[:1024],
            "status": err.status,
            "error": err.type,
            "reason": err.message,
        }
        if claims is not None:
            data["token_id"] = claims.token_id
        if target is not None:
            data["service"] = target.service
        ev = Event(
            type="http.refused",
            actor=str(claims.subject) if claims else None,
            subject=target.resource if target else None,
            session=claims.task if claims else None,
            decision="deny",
            data=data,
        )
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.warning("could not record a refused HTTP request: %s", type(e).__name__)

    # -- deciding -------------------------------------------------------------------------------

    async def _handle(self, scope: Scope, receive: Receive, out: _Out, rid: str) -> None:
        seen = _Seen()
        try:
            service, target, inb, claims = self._admit(scope, seen)
            body = await self._body(scope, receive, service)
        except HTTPGatewayError as e:
            if e.type != "client_disconnected":
                await self._refused(rid, scope, seen, e)
            raise
        method: str = scope["method"]
        rule = service.rule_for(method, target.path)
        arguments: dict[str, Any] = {"method": method, "path": target.path}
        if target.query:
            arguments["query"] = target.query
        if body:
            # an approval binds to this exact body: approving one order approves no other
            arguments["body_sha256"] = hashlib.sha256(body).hexdigest()
        action = Action(
            "http.request",
            claims,
            target.resource,
            arguments=arguments,
            context={"method": method, "path": target.path},
            effects=dict(rule.effects) if rule else {},
            cost=Cost(requests=1),
        )
        if service.rules and rule is None:
            decision = Decision(
                "deny",
                action.digest(),
                (f"no rule of service {service.name!r} allows {method} {target.path}",),
                (f"http.rules:{service.name}",),
            )
        else:
            decision = await self.core.adecide(action, service.limits.escalation_hold)
        call = _Call(rid, service, target, method, action, decision, rule, time.perf_counter())
        if not decision.allowed:
            await self._deny(call, inb, body)
        await self._forward(call, scope, inb, body, receive, out)

    async def _deny(self, call: _Call, inb: Inbound, body: bytes) -> None:
        with contextlib.suppress(Exception):
            await self.audit.arecord(
                DecisionCore.event(
                    call.action,
                    call.decision,
                    data=self._request_data(call, inb.forward, body),
                    bodies=self._request_bodies(call, body),
                )
            )
        d = call.decision
        reasons = "; ".join(d.reasons) or "denied by policy"
        what = f"{call.method} {call.action.resource}"
        if d.outcome == "escalate":
            raise HTTPGatewayError(
                403,
                "approval_required",
                f"{what} needs approval {d.approval} ({d.quorum}): {reasons}. "
                "Retry once it is approved.",
                {"approval": d.approval, "quorum": d.quorum},
            )
        if d.policies[:1] == (f"http.rules:{call.service.name}",):
            kind = "rule_denied"
        elif call.action.context.get("granted", call.action.granted):
            kind = "policy_denied"
        else:
            kind = "not_granted"
        raise HTTPGatewayError(403, kind, f"{what} denied: {reasons}", {"reasons": list(d.reasons)})

    # -- records ------------------------------------------------------------------------------

    @staticmethod
    def _request_data(call: _Call, headers: list[tuple[str, str]], body: bytes) -> dict[str, Any]:
        svc = call.service
        data: dict[str, Any] = {
            "request_id": call.rid,
            "service": svc.name,
            "method": call.method,
            "path": call.target.path,
            "headers": record_headers(headers, svc.auth.header),
            "request_bytes": len(body),
        }
        if call.target.query:
            data["query"] = call.target.query
        if call.rule is not None:
            data["rule"] = call.rule.index
        if body:
            data["request_sha256"] = call.action.arguments["body_sha256"]
            data["request_truncated"] = len(body) > svc.limits.record_body_bytes
        return data

    @staticmethod
    def _request_bodies(call: _Call, body: bytes) -> dict[str, bytes]:
        cap = call.service.limits.record_body_bytes
        if not body or not cap:
            return {}
        kept = body[:cap]
        needles = call.service.auth.needles
        return {"request": Scrubber(needles).mask(kept) if needles else kept}

    @staticmethod
    def _response_doc(
        call: _Call,
        status: str,
        upstream_status: int | None,
        headers: list[tuple[bytes, bytes]] | None,
        capture: _Capture | None,
        error: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The ``response`` part of a record, and its body capped."""
        doc: dict[str, Any] = {
            "status": status,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        }
        if upstream_status is not None:
            doc["upstream_status"] = upstream_status
        if headers is not None:
            doc["headers"] = record_headers(headers, call.service.auth.header)
        if error:
            doc["error"] = error
        bodies: dict[str, bytes] = {}
        if capture is not None:
            doc.update(capture.data())
            if capture.size:
                bodies["response"] = capture.body()
        return doc, bodies

    async def _durable(self, call: _Call, record: asyncio.Future[Any]) -> None:
        try:
            await record
        except Exception as e:
            msg = e.message if isinstance(e, RecordFailed) else type(e).__name__
            self.core.settle(call.decision, None)
            raise HTTPGatewayError(
                503, "audit_unavailable", f"audit log unavailable, request refused: {msg}"
            ) from None

    def _settle(self, call: _Call) -> None:
        self.core.settle(call.decision, Cost(requests=1) if call.forwarded else None)

    def _record_response(
        self,
        call: _Call,
        status: str,
        upstream_status: int | None,
        headers: list[tuple[bytes, bytes]] | None,
        capture: _Capture | None,
        error: str | None = None,
    ) -> None:
        """Settle, and record the response of an unsafe or streamed request in the background.
        The agent has the response already (its request record was durable before the upstream
        saw the request, or before the first byte went out), so this must not hold the
        connection. The record is lazy: it shares the audit log's next commit instead of
        taking one that a keep-alive agent's next request would queue behind. Never raises."""
        try:
            self._settle(call)
            doc, bodies = self._response_doc(call, status, upstream_status, headers, capture, error)
            ev = DecisionCore.event(
                call.action,
                call.decision,
                data={"request_id": call.rid, "service": call.service.name, "response": doc},
                bodies=bodies,
            )
            fut = submit(self.audit, dataclasses.replace(ev, type="http.response"), lazy=True)
        except Exception as e:
            log.error("recording an HTTP response failed: %s", type(e).__name__)
            return
        self._background.add(fut)
        fut.add_done_callback(self._recorded)

    def _recorded(self, fut: asyncio.Future[Any]) -> None:
        self._background.discard(fut)
        if not fut.cancelled() and (e := fut.exception()) is not None:
            log.error("recording an HTTP response failed: %s", type(e).__name__)

    def _record_whole(
        self,
        call: _Call,
        request: tuple[dict[str, Any], dict[str, bytes]],
        response: tuple[dict[str, Any], dict[str, bytes]],
    ) -> asyncio.Future[Any]:
        """One record for a safe request and its whole response (queued; await it)."""
        data, bodies = request
        doc, rbodies = response
        return submit(
            self.audit,
            DecisionCore.event(
                call.action,
                call.decision,
                data={**data, "response": doc},
                bodies={**bodies, **rbodies},
            ),
        )

    # -- forwarding -----------------------------------------------------------------------------

    async def _forward(
        self,
        call: _Call,
        scope: Scope,
        inb: Inbound,
        body: bytes,
        receive: Receive,
        out: _Out,
    ) -> None:
        svc, target = call.service, call.target
        extra = [("x-forwarded-proto", str(scope.get("scheme", "http")))]
        client = scope.get("client")
        if client:
            extra.append(("x-forwarded-for", str(client[0])))
        if inb.host:
            extra.append(("x-forwarded-host", inb.host))
        extra += [("x-forwarded-prefix", HTTP_PREFIX + svc.name), ("x-tether-request-id", call.rid)]
        recorded = [*inb.forward, *extra]
        if svc.auth.value is not None:
            recorded.append((svc.auth.header, "[REDACTED]"))
        request = (self._request_data(call, recorded, body), self._request_bodies(call, body))
        safe = call.method in SAFE_METHODS and not call.action.effects
        if not safe:  # a side effect upstream needs its record first
            await self._durable(
                call,
                submit(
                    self.audit,
                    DecisionCore.event(
                        call.action, call.decision, data=request[0], bodies=request[1]
                    ),
                ),
            )
        headers = [*inb.forward, *extra]
        if svc.auth.value is not None:
            headers.append((svc.auth.header, svc.auth.value.reveal()))
        url = svc.base_url + target.encoded + ("?" + target.query if target.query else "")
        call.forwarded = True
        try:
            resp = await self.upstreams.request(svc, call.method, url, headers, body)
        except BaseException as e:
            err = _upstream_error(e, call)
            await self._failed(call, request if safe else None, err, None, None)
            if err is None:
                raise
            raise err from None
        try:
            await self._relay(call, resp, receive, out, request if safe else None)
        finally:
            await resp.aclose()

    async def _failed(
        self,
        call: _Call,
        request: tuple[dict[str, Any], dict[str, bytes]] | None,
        err: HTTPGatewayError | None,
        upstream_status: int | None,
        headers: list[tuple[bytes, bytes]] | None,
    ) -> None:
        """Record an upstream failure: with the request (a safe one, not recorded yet; the
        agent gets the error either way) or as the response of a recorded request."""
        status = err.type if err is not None else "cancelled"
        message = err.message if err is not None else None
        if request is None:
            self._record_response(call, status, upstream_status, headers, None, message)
            return
        self._settle(call)
        fut = self._record_whole(
            call, request, self._response_doc(call, status, upstream_status, headers, None, message)
        )
        with contextlib.suppress(BaseException):
            await fut

    async def _relay(
        self,
        call: _Call,
        resp: Response,
        receive: Receive,
        out: _Out,
        request: tuple[dict[str, Any], dict[str, bytes]] | None,
    ) -> None:
        """Upstream response -> agent. ``request`` is the record of a safe request, not written
        yet: it goes into the log (with the whole response when that is small) before the first
        byte goes to the agent."""
        svc = call.service
        needles = svc.auth.needles
        scrub = Scrubber(needles) if needles else None
        headers = outbound(
            resp.headers,
            forward_cookies=svc.limits.forward_cookies,
            scrub=scrub,
            base_url=svc.base_url,
            prefix=HTTP_PREFIX + svc.name,
        )
        status = resp.status_code
        length = content_length(resp)
        limit = svc.limits.max_response_bytes
        capture = _Capture(svc.limits.record_body_bytes)
        if limit and length is not None and length > limit:
            err = HTTPGatewayError(
                502, "response_too_large", f"the upstream response is larger than {limit} bytes"
            )
            await self._failed(call, request, err, status, headers)
            raise err
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"x-tether-request-id", call.rid.encode())],
        }
        no_body = call.method == "HEAD" or status in (204, 304) or status < 200
        if no_body or (length is not None and length <= WHOLE_BODY_MAX):
            try:
                data = b"" if no_body else await resp.aread()
            except BaseException as e:
                err2 = _upstream_error(e, call)
                await self._failed(call, request, err2, status, headers)
                if err2 is None:
                    raise
                raise err2 from None
            if scrub is not None:
                data = scrub.mask(data)
            capture.add(data)
            if request is not None:  # one record, request and response, durable first
                doc = self._response_doc(call, "ok", status, headers, capture)
                await self._durable(call, self._record_whole(call, request, doc))
                self._settle(call)
                await out(start)
                await out({"type": "http.response.body", "body": data})
                return
            outcome = "client_disconnected"
            try:
                await out(start)
                await out({"type": "http.response.body", "body": data})
                outcome = "ok"
            finally:
                self._record_response(call, outcome, status, headers, capture)
            return
        if request is not None:
            await self._durable(
                call,
                submit(
                    self.audit,
                    DecisionCore.event(
                        call.action, call.decision, data=request[0], bodies=request[1]
                    ),
                ),
            )
        await out(start)
        pump = asyncio.ensure_future(self._pump(resp, scrub, capture, limit, out))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        outcome = "client_disconnected"
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                outcome = await pump
            self._record_response(call, outcome, status, headers, capture)

    async def _pump(
        self,
        resp: Response,
        scrub: Scrubber | None,
        capture: _Capture,
        limit: int,
        out: _Out,
    ) -> str:
        """Upstream body -> agent as it arrives. Returns how it ended; on anything but "ok"
        the response is left incomplete (the server then closes the connection)."""
        total = 0
        try:
            async for chunk in resp.aiter_raw():
                total += len(chunk)
                if limit and total > limit:
                    return "response_too_large"
                if scrub is not None:
                    chunk = scrub.feed(chunk)
                if chunk:
                    capture.add(chunk)
                    await out({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamTimeout:
            return "upstream_timeout"
        except UpstreamFailed:
            return "upstream_cut"
        tail = scrub.end() if scrub is not None else b""
        capture.add(tail)
        await out({"type": "http.response.body", "body": tail, "more_body": False})
        return "ok"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


def _upstream_error(e: BaseException, call: _Call) -> HTTPGatewayError | None:
    """Map an upstream failure (``None`` for a cancellation, which propagates). A request that
    never reached the upstream is marked not forwarded, so its reservation is released."""
    name = call.service.name
    if isinstance(e, UpstreamUnreachable):
        call.forwarded = False
        return HTTPGatewayError(502, "upstream_unreachable", f"service {name!r} is unreachable")
    if isinstance(e, UpstreamTimeout):
        if not_sent(e):
            call.forwarded = False
            return HTTPGatewayError(
                504, "upstream_timeout", f"no connection to {name!r} within the connect timeout"
            )
        return HTTPGatewayError(
            504,
            "upstream_timeout",
            f"service {name!r} did not answer within {call.service.limits.timeout:g}s",
        )
    if isinstance(e, UpstreamProtocolError):
        return HTTPGatewayError(
            502, "upstream_garbage", f"service {name!r} sent a response that is not valid HTTP"
        )
    if isinstance(e, UpstreamFailed):
        return HTTPGatewayError(
            502, "upstream_disconnected", f"service {name!r} closed the connection"
        )
    if isinstance(e, ValueError):  # refused by the client before sending (a header value)
        call.forwarded = False
        return HTTPGatewayError(
            502, "upstream_failed", f"the call to {name!r} failed ({type(e).__name__})"
        )
    if isinstance(e, Exception):
        return HTTPGatewayError(
            502, "upstream_failed", f"the call to {name!r} failed ({type(e).__name__})"
        )
    return None
