"""The JSON API (``/v1``), health endpoints and OpenAPI schema, as one ASGI app.

Errors always come back as ``{"error": CODE, "error_description": TEXT}`` (the OAuth 2.0
shape, RFC 6749 §5.2), with a 4xx status for anything the caller got wrong; 401s carry
``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750). No error echoes a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tether
from tether.config import parse_duration
from tether.errors import AuthenticationError, BadRequest, ConfigError, TetherError
from tether.identity.claims import TokenClaims
from tether.identity.exchange import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
    TOKEN_TYPE_USER_CREDENTIAL,
)
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action
from tether.server import routes_audit
from tether.server.deps import authenticated, get_services
from tether.server.routes_approvals import approvals_router
from tether.server.routes_beams import beams_router
from tether.server.services import Services

__all__ = ["create_app"]

log = logging.getLogger("tether.server")


def error_response(status: int, code: str, description: str) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{code}"'
    return JSONResponse({"error": code, "error_description": description}, status, headers=headers)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, before the app reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BadRequest(f"request body is larger than {self.limit} bytes")
            return msg

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = error_response(
            413, "invalid_request", f"request body is larger than {self.limit} bytes"
        )
        await resp(scope, receive, send)


Svc = Annotated[Services, Depends(get_services)]
Caller = Annotated[TokenClaims, Depends(authenticated)]


# request models --------------------------------------------------------------------------
class RevokeRequest(BaseModel):
    kind: Literal["token", "agent", "subtree"]
    value: str = Field(min_length=1, max_length=512)
    reason: str = Field(default="", max_length=1024)


class UserRequest(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=128)
    grants: list[str] = Field(default_factory=list, max_length=64)


class X509Request(BaseModel):
    csr: str = Field(min_length=1, max_length=16384, description="PEM PKCS#10 request")


TOKEN_REQUEST_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "subject_token", "subject_token_type"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": [GRANT_TYPE_TOKEN_EXCHANGE]},
                        "subject_token": {"type": "string"},
                        "subject_token_type": {
                            "type": "string",
                            "enum": [TOKEN_TYPE_JWT, TOKEN_TYPE_USER_CREDENTIAL],
                        },
                        "agent": {"type": "string", "description": "name of the agent"},
                        "scope": {"type": "string", "description": "space-separated grants"},
                        "grant": {"type": "array", "items": {"type": "string"}},
                        "ttl": {"type": "string", "description": "e.g. 30m"},
                        "task": {"type": "string"},
                        "objective": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


async def _read_params(request: Request) -> dict[str, list[str]]:
    """Token request parameters from a form (RFC 8693) or a JSON object."""
    body = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, list[str]] = {}
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest("request body is not valid JSON") from e
        if not isinstance(doc, dict):
            raise BadRequest("request body must be a JSON object")
        for k, v in doc.items():
            vals = v if isinstance(v, list) else [v]
            if not all(isinstance(x, str | int | float) and not isinstance(x, bool) for x in vals):
                raise BadRequest(f"parameter {str(k)[:40]!r} must be a string or list of strings")
            params[str(k)] = [str(x) for x in vals]
    elif ctype == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest("malformed form body") from e
        for k, v in pairs:
            params.setdefault(k, []).append(v)
    else:
        raise BadRequest(
            "token requests must be application/x-www-form-urlencoded (RFC 8693) or JSON"
        )
    return params


def _one(params: dict[str, list[str]], name: str, required: bool = False) -> str | None:
    vals = params.get(name)
    if not vals:
        if required:
            raise BadRequest(f"missing parameter {name!r}")
        return None
    if len(vals) > 1:
        raise BadRequest(f"parameter {name!r} given more than once")
    return vals[0]


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="Tether",
        version=tether.__version__,
        description="Trust plane for AI agents: delegated identity and tamper-evident audit.",
    )
    app.state.tether = services
    app.state.approvals = services.approvals
    app.state.jit = services.jit

    @app.exception_handler(TetherError)
    async def _tether_error(_: Request, exc: TetherError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s in request handler", type(exc).__name__)
        return error_response(500, "server_error", "internal error; see the server log")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(svc: Svc) -> JSONResponse:
        try:
            return JSONResponse(svc.ready())
        except TetherError as e:
            return error_response(503, "not_ready", e.message)

    @app.get("/v1/bundle", tags=["identity"])
    async def bundle(svc: Svc) -> JSONResponse:
        """The SPIFFE trust bundle (JWKS): verify Tether JWT-SVIDs and X.509-SVIDs offline."""
        return JSONResponse(svc.bundle_doc, headers={"Cache-Control": "max-age=60"})

    @app.post("/v1/token", tags=["identity"], openapi_extra=TOKEN_REQUEST_SCHEMA)
    async def token(request: Request, svc: Svc) -> JSONResponse:
        """RFC 8693 token exchange: a user credential for the user's token, or a grantor's
        token for a delegated agent token with narrower grants."""
        params = await _read_params(request)
        grant_type = _one(params, "grant_type", required=True)
        if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
            return error_response(
                400, "unsupported_grant_type", f"grant_type must be {GRANT_TYPE_TOKEN_EXCHANGE}"
            )
        subject_token = _one(params, "subject_token", required=True) or ""
        token_type = _one(params, "subject_token_type", required=True)
        ttl_text = _one(params, "ttl")
        ttl = _parse_ttl(ttl_text) if ttl_text else None
        if token_type == TOKEN_TYPE_USER_CREDENTIAL:
            try:
                # login reads the store: keep it off the event loop
                issued = await asyncio.to_thread(svc.authority.login, subject_token, ttl)
            except AuthenticationError as e:
                return error_response(400, "invalid_grant", e.message)
            return JSONResponse(issued.response(), headers={"Cache-Control": "no-store"})
        if token_type != TOKEN_TYPE_JWT:
            raise BadRequest(f"unsupported subject_token_type (use {TOKEN_TYPE_JWT})")
        try:
            grantor = svc.verifier.verify(subject_token)
        except AuthenticationError as e:
            # RFC 8693 §2.2.2: an invalid subject_token is an invalid_request.
            return error_response(400, "invalid_request", f"subject_token: {e.message}")
        agent = _one(params, "agent", required=True) or ""
        grants = list(params.get("grant", []))
        for scope in params.get("scope", []):
            grants += scope.split()
        labels = list(params.get("label", []))
        task = _one(params, "task")
        refused = await _decide_delegation(svc, grantor, agent, grants, labels, task, ttl_text)
        if refused is not None:
            return refused
        issued = await svc.authority.adelegate(
            grantor,
            agent,
            grants,
            ttl=ttl,
            task=task,
            objective=_one(params, "objective"),
            labels=labels,
        )
        return JSONResponse(issued.response(), headers={"Cache-Control": "no-store"})

    @app.get("/v1/whoami", tags=["identity"])
    async def whoami(caller: Caller) -> dict[str, Any]:
        """The presented token's identity and its whole delegation chain."""
        return caller.summary()

    @app.get("/v1/identities", tags=["identity"])
    def identities(svc: Svc, _caller: Caller, kind: str | None = None) -> dict[str, Any]:
        rows = svc.store.list_identities(kind)
        return {
            "identities": [
                {
                    "spiffe_id": r.spiffe_id,
                    "kind": r.kind,
                    "name": r.name,
                    "created_ms": r.created_ms,
                    "created_by": r.created_by,
                }
                for r in rows
            ]
        }

    # Rare endpoints that touch the store or wait for a durable record are plain functions:
    # FastAPI runs them in its thread pool, so they never stall the event loop.
    @app.post("/v1/users", tags=["identity"])
    def add_user(body: UserRequest, svc: Svc, caller: Caller) -> JSONResponse:
        """Add a user (a human who can approve, delegate and log in). Admin only. The
        credential is in this response and nowhere else."""
        credential = svc.authority.add_user(caller, body.name, body.grants)
        spiffe_id = f"spiffe://{svc.config.trust_domain}/user/{body.name}"
        return JSONResponse(
            {"name": body.name, "spiffe_id": spiffe_id, "credential": credential},
            headers={"Cache-Control": "no-store"},
        )

    @app.post("/v1/revoke", tags=["identity"])
    def revoke(body: RevokeRequest, svc: Svc, caller: Caller) -> dict[str, Any]:
        rev = svc.authority.revoke(caller, body.kind, body.value, body.reason)
        return {"kind": rev.kind, "value": rev.value, "at_ms": rev.at_ms, "seq": rev.seq}

    @app.post("/v1/svid/x509", tags=["identity"])
    def x509_svid(body: X509Request, svc: Svc, caller: Caller) -> dict[str, Any]:
        """Sign an X.509-SVID for the caller's own SPIFFE ID from a PEM CSR."""
        chain, expires = svc.authority.issue_x509(caller, body.csr.encode())
        return {
            "spiffe_id": str(caller.subject),
            "chain_pem": chain.decode(),
            "expires_at": expires,
        }

    app.include_router(routes_audit.router)
    app.include_router(approvals_router())
    app.include_router(beams_router())  # needs app.state.beams (tether serve sets it)
    app.add_middleware(BodyLimit, limit=services.config.max_body_bytes)
    return app


async def _decide_delegation(
    svc: Services,
    grantor: TokenClaims,
    agent: str,
    grants: list[str],
    labels: list[str],
    task: str | None,
    ttl: str | None,
) -> JSONResponse | None:
    """Delegation is an ``identity.delegate`` Action: policy may forbid or escalate it before
    the authority checks attenuation. A refusal is recorded (fail closed) and answered 403."""
    target = str(SpiffeId(svc.config.trust_domain, "agent", agent))  # 400 if malformed
    action = Action(
        "identity.delegate",
        grantor,
        target,
        arguments={"grants": grants, "labels": labels, "task": task, "ttl": ttl},
        context={"depth": grantor.depth + 1},
    )
    decision = svc.core.decide(action)
    if decision.allowed:
        return None
    await svc.audit.arecord(svc.core.event(action, decision))
    detail = "; ".join(decision.reasons)
    if decision.outcome == "escalate":
        detail = f"delegation needs approval {decision.approval} ({decision.quorum}): {detail}"
    return error_response(403, "permission_denied", detail)


def _parse_ttl(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise BadRequest(f"invalid ttl: {e.message}") from e
