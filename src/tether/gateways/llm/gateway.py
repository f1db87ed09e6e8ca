"""The LLM gateway: a raw ASGI app on the server's port for the four inference paths.

Per call (every step before the first upstream byte)::

    token (cached verify) -> body (size limit, JSON, field types) -> llm.invoke Action
      -> DecisionCore (grants, Cedar, limits, approvals) -> budget reservation (usage ledger)
      -> inbound inspectors -> request record queued -> upstream call (key injected)
      -> request record durable? (else refuse; the response is withheld until it is)
      -> tool calls decided (tool.call Actions) -> response to the agent
      -> response record (assembled stream, usage) -> usage settled

The request record is queued to the audit log at the moment the upstream call starts and
awaited before the first response byte goes to the agent, so its group commit overlaps the
upstream's work instead of adding to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import orjson

from tether.errors import AuthenticationError, RecordFailed, TetherError
from tether.events import Event, Recorder, submit
from tether.gateways.h1 import UpstreamProtocolError
from tether.gateways.llm.config import LLMSettings, Provider, Route
from tether.gateways.llm.errors import GatewayError, render_error
from tether.gateways.llm.inspect import Finding, InspectContext, Inspector
from tether.gateways.llm.protocol import Api, Req, parse_request, usage_of
from tether.gateways.llm.relay import CallGuard, Downstream, relay
from tether.gateways.llm.toolgate import ToolVerdict, gate_for, gate_response
from tether.gateways.llm.upstream import (
    UpstreamFailed,
    Upstreams,
    UpstreamTimeout,
)
from tether.identity.claims import TokenClaims
from tether.policy.action import Action, Cost, Decision
from tether.policy.core import DecisionCore
from tether.store.usage import BudgetExceeded, Reservation, UsageLedger

__all__ = ["LLM_PATHS", "LLMGateway", "with_llm_gateway"]

log = logging.getLogger("tether.gateways.llm")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_API_OF: dict[str, Api] = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
LLM_PATHS = frozenset({*_API_OF, "/v1/models"})
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
CHARS_PER_TOKEN = 4


def _is_llm_path(path: str) -> bool:
    return path in LLM_PATHS or path.startswith("/v1/models/")


def with_llm_gateway(app: ASGIApp, gateway: LLMGateway) -> ASGIApp:
    """An ASGI app that sends the LLM paths to ``gateway`` and everything else to ``app``."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_llm_path(scope["path"]):
            await gateway(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


@dataclass(slots=True)
class _Call:
    """One call's state, for the records."""

    request_id: str
    api: Api
    claims: TokenClaims
    req: Req
    route: Route
    provider: Provider
    action: Action
    decision: Decision
    reservation: Reservation
    sent: bytes
    started: float


class LLMGateway:
    """The gateway ASGI app. Build one per process; ``aclose`` at shutdown."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        verify: Callable[[str], TokenClaims],
        core: DecisionCore,
        audit: Recorder,
        ledger: UsageLedger,
        inspectors: Sequence[Inspector] = (),
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        scripted_app: Any = None,
        owns_ledger: bool = False,
    ) -> None:
        self.settings = settings
        self.verify = verify
        self.core = core
        self.audit = audit
        self.ledger = ledger
        self.inspectors = tuple(inspectors)
        self.upstreams = Upstreams(settings, transports, scripted_app)
        self._background: set[asyncio.Future[Any]] = set()
        # Request ids: a random per-process prefix and a counter (no urandom call per request).
        self._rid_prefix = secrets.token_hex(5)
        self._rid_seq = itertools.count(1)
        self._owns_ledger = owns_ledger

    def __repr__(self) -> str:
        return f"LLMGateway(providers={sorted(self.settings.providers)!r})"

    async def drain(self) -> None:
        """Wait for the response records still being written (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*tuple(self._background), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        await self.upstreams.aclose()
        if self._owns_ledger:
            self.ledger.close()

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        api = _API_OF.get(path)
        headers = dict(scope["headers"])
        shape = "anthropic" if api == "messages" else "openai"
        if api is None and (
            b"anthropic-version" in headers
            or (b"x-api-key" in headers and b"authorization" not in headers)
        ):
            shape = "anthropic"
        try:
            if api is None:
                if scope["method"] != "GET":
                    raise GatewayError(405, f"{scope['method']} is not allowed here", "method")
                await self._models(path, headers, shape, send)
                return
            if scope["method"] != "POST":
                raise GatewayError(
                    405, f"{scope['method']} is not allowed here; use POST", "method"
                )
            await self._invoke(api, scope, headers, receive, send)
        except GatewayError as e:
            await self._error(send, shape, e)
        except Exception as e:  # never a 500 page, never a crash
            log.exception("LLM gateway failed on %s", path)
            await self._error(
                send,
                shape,
                GatewayError(502, f"gateway error ({type(e).__name__})", "gateway_error"),
            )

    async def _error(self, send: Send, shape: str, e: GatewayError) -> None:
        status, headers, body = render_error(shape, e)
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _json(send: Send, body: bytes, rid: str, status: int = 200) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", rid.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -- authentication and input ---------------------------------------------------------------

    def _claims(self, headers: Mapping[bytes, bytes]) -> TokenClaims:
        raw = headers.get(b"authorization")
        if raw is not None:
            scheme, _, value = raw.decode("latin-1").partition(" ")
            token = value.strip()
            if scheme.lower() != "bearer" or not token:
                raise GatewayError(
                    401, "Authorization header must be 'Bearer <token>'", "invalid_api_key"
                )
        else:
            key = headers.get(b"x-api-key")
            if key is None:
                raise GatewayError(
                    401, "no credential: send your Tether token as the API key", "invalid_api_key"
                )
            token = key.decode("latin-1").strip()
        try:
            return self.verify(token)
        except AuthenticationError as e:
            raise GatewayError(401, e.message, e.code) from None
        except TetherError as e:
            raise GatewayError(401, f"token refused: {e.message}", "invalid_api_key") from None

    async def _body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                too_big = int(cl) > limit
            except ValueError:
                raise GatewayError(400, "invalid Content-Length", "invalid_request") from None
            if too_big:
                raise GatewayError(
                    413, f"request body is larger than {limit} bytes", "request_too_large"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise GatewayError(400, "client went away", "client_disconnected")
            data = msg.get("body", b"")
            if data:
                size += len(data)
                if size > limit:
                    raise GatewayError(
                        413, f"request body is larger than {limit} bytes", "request_too_large"
                    )
                chunks.append(data)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- /v1/models ---------------------------------------------------------------------------

    def _allowed_models(self, claims: TokenClaims) -> list[tuple[str, str]]:
        names: dict[str, str] = {}
        for r in self.settings.routes:
            if "*" not in r.pattern and "?" not in r.pattern:
                names.setdefault(r.pattern, r.provider)
        for g in claims.grants.of_kind("model"):
            if "*" not in g.pattern:
                r2 = self.settings.route(g.pattern)
                if r2 is not None:
                    names.setdefault(g.pattern, r2.provider)
        return [(m, p) for m, p in sorted(names.items()) if claims.grants.allows("model", m)]

    async def _models(
        self, path: str, headers: Mapping[bytes, bytes], shape: str, send: Send
    ) -> None:
        claims = self._claims(headers)
        models = self._allowed_models(claims)
        rid = self._rid()
        if path.startswith("/v1/models/"):
            want = path[len("/v1/models/") :]
            if not claims.grants.allows("model", want) or self.settings.route(want) is None:
                raise GatewayError(404, f"model {want[:200]!r} not found", "model_not_found")
            models = [(want, self.settings.route(want).provider)]  # type: ignore[union-attr]
            doc: dict[str, Any] = self._model_doc(models[0], shape)
        elif shape == "anthropic":
            data = [self._model_doc(m, shape) for m in models]
            doc = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        else:
            doc = {"object": "list", "data": [self._model_doc(m, shape) for m in models]}
        await self._json(send, orjson.dumps(doc), rid)

    @staticmethod
    def _model_doc(m: tuple[str, str], shape: str) -> dict[str, Any]:
        if shape == "anthropic":
            return {
                "type": "model",
                "id": m[0],
                "display_name": m[0],
                "created_at": "1970-01-01T00:00:00Z",
            }
        return {"id": m[0], "object": "model", "created": 0, "owned_by": m[1]}

    # -- the call ---------------------------------------------------------------------------------

    async def _refused(
        self,
        claims: TokenClaims | None,
        api: Api,
        err: GatewayError,
        body: bytes | None = None,
        model: str | None = None,
    ) -> None:
        """Record a refused attempt (bad input, unknown model ...); the refusal stands anyway."""
        ev = Event(
            type="llm.refused",
            actor=str(claims.subject) if claims else None,
            subject=model,
            session=claims.task if claims else None,
            decision="deny",
            data={
                "api": api,
                "status": err.status,
                "code": err.code,
                "reason": err.message,
                **({"token_id": claims.token_id} if claims else {}),
            },
            bodies={"request": body} if body else {},
        )
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.warning("could not record a refused LLM call: %s", type(e).__name__)

    def _estimate(self, req: Req, body_len: int, route: Route) -> tuple[int, Decimal | None]:
        inp = body_len // CHARS_PER_TOKEN
        out = req.max_tokens if req.max_tokens is not None else self.settings.default_max_tokens
        usd = _price(route, inp, out)
        return inp + out, usd

    async def _invoke(
        self,
        api: Api,
        scope: Scope,
        headers: Mapping[bytes, bytes],
        receive: Receive,
        send: Send,
    ) -> None:
        claims: TokenClaims | None = None
        body: bytes | None = None
        model: str | None = None
        try:
            claims = self._claims(headers)
            body = await self._body(headers, receive)
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise GatewayError(400, "request body is not valid JSON", "invalid_json") from None
            req = parse_request(api, doc)
            model = req.model
        except GatewayError as e:
            if e.code != "client_disconnected":
                await self._refused(claims, api, e, body, model)
            raise
        rid = self._rid()
        route = self.settings.route(req.model)
        provider = self.settings.providers[route.provider] if route else None
        estimate, usd_est = (
            self._estimate(req, len(body), route) if route else (len(body) // CHARS_PER_TOKEN, None)
        )
        max_tokens = (
            req.max_tokens if req.max_tokens is not None else self.settings.default_max_tokens
        )
        # Only keys the Cedar schema's Context declares (the engine adds granted and hour);
        # max_tokens is the effective cap, so omitting it cannot slip past a policy.
        action = Action(
            "llm.invoke",
            claims,
            req.model,
            arguments={"model": req.model, "tools": list(req.tools)},
            context={
                "max_tokens": max_tokens,
                "stream": req.stream,
                "tools": list(req.tools),
                "estimated_tokens": estimate,
            },
            cost=Cost(tokens=estimate, usd=usd_est or Decimal(0)),
        )
        hold = self.settings.escalation_hold
        decision = await self.core.adecide(action, hold)
        if not decision.allowed:
            await self._deny(action, decision, rid, body, api)
        if route is None or provider is None:
            self.core.settle(decision, None)
            err = GatewayError(
                404, f"no upstream serves model {req.model!r}", "model_not_found", "model"
            )
            await self._refused(claims, api, err, body, req.model)
            raise err
        if provider.protocol not in ("both", "openai" if api != "messages" else "anthropic"):
            self.core.settle(decision, None)
            err = GatewayError(
                400,
                f"model {req.model!r} is served by a {provider.kind} upstream; this gateway "
                f"does not translate {'Anthropic Messages' if api == 'messages' else 'OpenAI'} "
                "requests to it",
                "protocol_mismatch",
                "model",
            )
            await self._refused(claims, api, err, body, req.model)
            raise err
        try:
            reservation = self.ledger.reserve(claims, estimate, usd_est)
        except BudgetExceeded as e:
            self.core.settle(decision, None)
            err = GatewayError(429, f"budget exhausted: {e}", "budget_exceeded")
            await self._refused(claims, api, err, body, req.model)
            raise err from None
        try:
            if self.inspectors:
                await self._inspect_inbound(api, req, claims, rid)
            up_doc = req.doc
            up_doc["model"] = route.upstream_name(req.model)
            if req.stream and api == "chat" and not req.wants_usage:
                opts = dict(up_doc.get("stream_options") or {})
                opts["include_usage"] = True
                up_doc["stream_options"] = opts
            sent = orjson.dumps(up_doc)
        except BaseException:
            self.ledger.release(reservation)
            self.core.settle(decision, None)
            raise
        call = _Call(
            rid,
            api,
            claims,
            req,
            route,
            provider,
            action,
            decision,
            reservation,
            sent,
            time.perf_counter(),
        )
        record = submit(
            self.audit,
            DecisionCore.event(
                action,
                decision,
                data={
                    "request_id": rid,
                    "api": api,
                    "provider": provider.name,
                    "upstream_model": up_doc["model"],
                    "stream": req.stream,
                },
                bodies={"request": sent},
            ),
        )
        if req.stream:
            await self._stream(call, headers, record, receive, send)
        else:
            await self._whole(call, headers, record, receive, send)

    async def _deny(
        self, action: Action, decision: Decision, rid: str, body: bytes, api: Api
    ) -> None:
        with contextlib.suppress(Exception):
            await self.audit.arecord(
                DecisionCore.event(
                    action, decision, data={"request_id": rid, "api": api}, bodies={"request": body}
                )
            )
        reasons = "; ".join(decision.reasons) or "denied by policy"
        if decision.outcome == "escalate":
            raise GatewayError(
                403,
                f"pending approval {decision.approval} ({decision.quorum}): {reasons}. "
                "Retry once it is approved.",
                "approval_pending",
            )
        granted = action.context.get("granted", action.granted)
        code = "policy_denied" if granted else "model_not_granted"
        raise GatewayError(
            403, f"llm.invoke on {action.resource!r} denied: {reasons}", code, "model"
        )

    async def _inspect_inbound(self, api: Api, req: Req, claims: TokenClaims, rid: str) -> None:
        ctx = InspectContext(api, req.model, claims, rid)
        for ins in self.inspectors:
            f = await ins.inbound(ctx, req.doc)
            if f is not None and f.action == "block":
                raise GatewayError(
                    403, f"request blocked by {f.detector}: {f.reason}", "inspection_blocked"
                )
            if f is not None:
                self._flagged(ctx, "inbound", f)

    async def _durable(self, record: asyncio.Future[Any]) -> None:
        try:
            await record
        except RecordFailed as e:
            raise GatewayError(
                503, f"audit log unavailable, call refused: {e.message}", "audit_unavailable"
            ) from None
        except Exception as e:
            raise GatewayError(
                503,
                f"audit log unavailable, call refused ({type(e).__name__})",
                "audit_unavailable",
            ) from None

    def _tool_decider(self, call: _Call) -> Callable[[str, str, str], Awaitable[ToolVerdict]]:
        ctx = InspectContext(call.api, call.req.model, call.claims, call.request_id)

        async def decide(name: str, args: str, call_id: str) -> ToolVerdict:
            try:
                parsed = orjson.loads(args) if args else {}
            except orjson.JSONDecodeError:
                parsed = None
            arguments = parsed if isinstance(parsed, dict) else {"_raw": args}
            action = Action(
                "tool.call",
                call.claims,
                name,
                arguments=arguments,
            )
            hold = self.settings.escalation_hold
            decision = await self.core.adecide(action, hold)
            reasons = "; ".join(decision.reasons)
            if decision.allowed and self.inspectors:
                for ins in self.inspectors:
                    f = await ins.outbound_tool(ctx, name, arguments)
                    if f is not None and f.action != "block":
                        self._flagged(ctx, f"tool {name}", f)
                    elif f is not None:
                        decision = dataclasses.replace(
                            decision,
                            outcome="deny",
                            reasons=(*decision.reasons, f"blocked by {f.detector}: {f.reason}"),
                        )
                        reasons = "; ".join(decision.reasons)
            try:
                await self.audit.arecord(
                    DecisionCore.event(
                        action, decision, data={"request_id": call.request_id, "call_id": call_id}
                    )
                )
            except Exception as e:
                self.core.settle(decision, None)
                return ToolVerdict(
                    False,
                    f"[tether] tool call {name} denied: the audit record failed "
                    f"({type(e).__name__}); fail closed",
                )
            self.core.settle(decision, action.cost if decision.allowed else None)
            if decision.allowed:
                return ToolVerdict(True)
            if decision.outcome == "escalate":
                return ToolVerdict(
                    False,
                    f"[tether] tool call {name} needs approval {decision.approval} "
                    f"({decision.quorum}); retry once it is approved: {reasons}",
                )
            return ToolVerdict(False, f"[tether] tool call {name} denied: {reasons}")

        return decide

    def _flagged(self, ctx: InspectContext, where: str, f: Finding) -> None:
        """A ``flag`` finding changes nothing for the agent; it is recorded (not awaited: the
        call goes on, and a failed record is logged)."""
        ev = Event(
            type="llm.finding",
            actor=str(ctx.principal.subject),
            subject=ctx.model,
            session=ctx.principal.task,
            decision=None,
            data={
                "request_id": ctx.request_id,
                "api": ctx.api,
                "where": where,
                "detector": f.detector,
                "finding": f.action,
                "reason": f.reason,
            },
        )
        fut = submit(self.audit, ev, lazy=True)
        self._background.add(fut)
        fut.add_done_callback(self._recorded)

    def _text_hook(self, call: _Call) -> Callable[[str], Awaitable[str | None]] | None:
        if not self.inspectors:
            return None
        ctx = InspectContext(call.api, call.req.model, call.claims, call.request_id)

        async def hook(text: str) -> str | None:
            for ins in self.inspectors:
                f = await ins.outbound_text(ctx, text)
                if f is not None and f.action != "block":
                    self._flagged(ctx, "outbound text", f)
                elif f is not None:
                    return f"{f.detector}: {f.reason}"
            return None

        return hook

    @staticmethod
    def _upstream_error(status: int, content: bytes) -> GatewayError:
        msg = ""
        with contextlib.suppress(Exception):
            doc = orjson.loads(content)
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict):
                msg = str(err.get("message", ""))[:500]
            elif isinstance(err, str):
                msg = err[:500]
        text = f"upstream returned HTTP {status}" + (f": {msg}" if msg else "")
        if status in (400, 404, 413, 422):
            return GatewayError(400 if status == 422 else status, text, "upstream_rejected")
        if status == 429:
            return GatewayError(429, text, "upstream_rate_limited", retry=True)
        return GatewayError(502, text, "upstream_error", retry=status >= 500)

    async def _upstream_failed(
        self, call: _Call, record: asyncio.Future[Any], e: BaseException
    ) -> None:
        """The upstream call failed or the client left before a response: record it, then
        raise the error in the API's shape (or let the disconnect propagate)."""
        await _settle_record(record)
        err = _transport_error(e)
        await self._finish(
            call,
            err.code if err else "client_disconnected",
            None,
            None,
            {"error": err.message if err else "client went away"},
        )
        if err is not None:
            raise err from None

    async def _finish(
        self,
        call: _Call,
        status: str,
        response: bytes | None,
        usage: tuple[int, int] | None,
        extra: dict[str, Any],
        stream_raw: bytes | None = None,
    ) -> None:
        """Settle usage and record the response. Never raises."""
        try:
            i, o = usage if usage is not None else (None, None)
            usd = _price(call.route, i or 0, o or 0) if usage is not None else None
            self.ledger.settle(
                call.reservation,
                call.claims,
                model=call.req.model,
                provider=call.provider.name,
                api=call.api,
                status=status,
                input_tokens=i,
                output_tokens=o,
                usd=usd,
            )
            tokens = (i or 0) + (o or 0) if usage is not None else call.reservation.tokens
            self.core.settle(call.decision, Cost(tokens=tokens, usd=usd or Decimal(0)))
            data: dict[str, Any] = {
                "request_id": call.request_id,
                "api": call.api,
                "provider": call.provider.name,
                "status": status,
                "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
                **extra,
            }
            if usage is not None:
                data["usage"] = {"input_tokens": usage[0], "output_tokens": usage[1]}
                if usd is not None:
                    data["usage"]["usd"] = str(usd)
            bodies: dict[str, bytes] = {}
            if response is not None:
                bodies["response"] = response
            if stream_raw is not None:
                bodies["response_stream"] = stream_raw
            ev = DecisionCore.event(call.action, call.decision, data=data, bodies=bodies)
        except Exception as e:
            log.error("recording an LLM response failed: %s", type(e).__name__)
            return
        # The agent already has the response (fail-closed applied to the request record,
        # which was durable before the first byte went out). Recording the response must not
        # hold the connection: a keep-alive client's next request would queue behind it.
        fut = submit(self.audit, dataclasses.replace(ev, type="llm.response"), lazy=True)
        self._background.add(fut)
        fut.add_done_callback(self._recorded)

    def _recorded(self, fut: asyncio.Future[Any]) -> None:
        """A background record (a response, a finding) settled: log it if it failed."""
        self._background.discard(fut)
        e = None if fut.cancelled() else fut.exception()
        if e is not None:
            log.error("recording an LLM event in the background failed: %s", type(e).__name__)

    def _rid(self) -> str:
        return f"req_{self._rid_prefix}{next(self._rid_seq):014x}"

    # -- whole responses ----------------------------------------------------------------------

    async def _whole(
        self,
        call: _Call,
        headers: Mapping[bytes, bytes],
        record: asyncio.Future[Any],
        receive: Receive,
        send: Send,
    ) -> None:
        client = self.upstreams.client(call.provider.name)
        up_headers = self.upstreams.headers(call.provider, call.api, headers)
        guard = CallGuard(receive, 0.0)  # a client that leaves cancels the upstream call
        try:
            resp = await client.post(
                self.upstreams.path(call.provider, call.api), call.sent, up_headers
            )
        except BaseException as e:
            guard.close()
            await self._upstream_failed(call, record, e)
            raise
        guard.close()
        await self._durable(record) if not record.done() or record.exception() else None
        content = await resp.aread()
        if resp.status_code != 200:
            err = self._upstream_error(resp.status_code, content)
            await self._finish(
                call, "upstream_error", content, None, {"upstream_status": resp.status_code}
            )
            raise err
        try:
            doc = orjson.loads(content)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            await self._finish(call, "upstream_garbage", content, None, {"upstream_status": 200})
            raise GatewayError(
                502, "upstream returned a response that is not JSON", "upstream_garbage"
            ) from None
        usage = usage_of(call.api, doc.get("usage"))
        modified, tools = await gate_response(call.api, doc, self._tool_decider(call))
        out = orjson.dumps(doc) if modified else content
        if self.inspectors:
            blocked = await self._inspect_whole_text(call, doc)
            if blocked:
                await self._finish(call, "blocked", content, usage, {"blocked": blocked})
                raise GatewayError(403, f"response blocked by {blocked}", "inspection_blocked")
        await self._json(send, out, call.request_id)
        extra: dict[str, Any] = {"upstream_status": 200}
        if tools:
            extra["tool_calls"] = tools
        if modified:
            extra["delivered_sha256_differs"] = True
        await self._finish(call, "ok", content if not modified else out, usage, extra)

    async def _inspect_whole_text(self, call: _Call, doc: dict[str, Any]) -> str | None:
        hook = self._text_hook(call)
        if hook is None:
            return None
        return await hook(_text_of(call.api, doc))

    # -- streams --------------------------------------------------------------------------------

    async def _stream(
        self,
        call: _Call,
        headers: Mapping[bytes, bytes],
        record: asyncio.Future[Any],
        receive: Receive,
        send: Send,
    ) -> None:
        """A streamed call, in this task: one disconnect watcher for the upstream call and the
        relay, one idle timer for the relay (see relay.py)."""
        client = self.upstreams.client(call.provider.name)
        up_headers = {
            **self.upstreams.headers(call.provider, call.api, headers),
            "accept": "text/event-stream",
        }
        guard = CallGuard(receive, self.settings.stream_idle_timeout)
        try:
            resp = await client.post(
                self.upstreams.path(call.provider, call.api), call.sent, up_headers, stream=True
            )
        except BaseException as e:
            guard.close()
            await self._upstream_failed(call, record, e)
            raise
        # Until the request record is durable, nothing is cancelled (its future is awaited):
        # a disconnect meanwhile is only noted.
        guard.armed = False
        gate = gate_for(
            call.api, self._tool_decider(call), self._text_hook(call), call.req.wants_usage
        )
        raw: list[bytes] = []
        status = "ok"
        err_note: str | None = None
        finished = False
        try:
            if resp.status_code != 200:
                guard.close()
                content = await resp.aread()
                await self._durable(record)
                err = self._upstream_error(resp.status_code, content)
                status, err_note = "upstream_error", err.message
                raw.append(content)
                raise err
            await self._durable(record)
            down = Downstream(send)
            last: bytes | None = None
            if guard.gone:  # gone while the record was made durable: nothing goes out
                status = "client_disconnected"
            else:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [*_SSE_HEADERS, (b"x-request-id", call.request_id.encode())],
                    }
                )
                guard.time_reads()
                try:
                    status, err_note, last = await relay(
                        call.api, resp, gate, raw, down, guard, self.settings.read_timeout
                    )
                except asyncio.CancelledError:
                    if not guard.took_back("disconnect"):
                        raise
                    status = "client_disconnected"
            guard.close()
            if last is not None:
                await down.end(last)
            finished = True
        finally:
            guard.close()
            with contextlib.suppress(Exception):
                await resp.aclose()
            if not finished and status == "ok":
                status = "interrupted"
            if not record.done():
                await _settle_record(record)
            await self._finish(
                call,
                status,
                orjson.dumps(gate.assembled()),
                gate.usage,
                {
                    "upstream_status": resp.status_code,
                    **({"error": err_note} if err_note else {}),
                    **({"tool_calls": gate.tools} if gate.tools else {}),
                },
                stream_raw=b"".join(raw),
            )


async def _settle_record(record: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        await record


def _transport_error(e: BaseException) -> GatewayError | None:
    if isinstance(e, UpstreamTimeout):
        return GatewayError(504, f"upstream timed out ({e})", "upstream_timeout", retry=True)
    if isinstance(e, UpstreamProtocolError):  # it answered, but not with valid HTTP/1.1
        return GatewayError(502, f"upstream sent an invalid response ({e})", "upstream_garbage")
    if isinstance(e, UpstreamFailed):
        return GatewayError(502, f"upstream unreachable ({e})", "upstream_unreachable", retry=True)
    if isinstance(e, asyncio.CancelledError):
        return None
    if isinstance(e, Exception):
        return GatewayError(502, f"upstream call failed ({type(e).__name__})", "upstream_failed")
    return None


def _price(route: Route, inp: int, out: int) -> Decimal | None:
    if route.usd_per_mtok_in is None and route.usd_per_mtok_out is None:
        return None
    pin = route.usd_per_mtok_in or Decimal(0)
    pout = route.usd_per_mtok_out or Decimal(0)
    return (pin * inp + pout * out) / Decimal(1_000_000)


def _text_of(api: Api, doc: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if api == "chat":
        for ch in doc.get("choices") or []:
            c = (ch.get("message") or {}).get("content") if isinstance(ch, dict) else None
            if isinstance(c, str):
                parts.append(c)
    elif api == "messages":
        for b in doc.get("content") or []:
            if isinstance(b, dict) and b.get("type") == "text":
                parts.append(str(b.get("text", "")))
    else:
        for item in doc.get("output") or []:
            if isinstance(item, dict) and item.get("type") == "message":
                for c in item.get("content") or []:
                    if isinstance(c, dict) and c.get("type") == "output_text":
                        parts.append(str(c.get("text", "")))
    return "\n".join(parts)
