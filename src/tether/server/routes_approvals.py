"""``/v1/approvals`` and ``/v1/grants/requests``: decide escalations and just-in-time grants.

The app must hold the desk and the JIT service on its state (see :func:`approvals_router`)::

    app.state.approvals = Approvals(ApprovalStore(data_dir.db_path), services.audit, ...)
    app.state.jit = JitGrants(app.state.approvals, quorum=config_jit_quorum)

Who sees a request: the requester itself, any identity the request's quorum admits (reviewer
agents included), and people (a user's own, undelegated token). Everyone else gets 404, as if
the request did not exist. Votes need an identity in the quorum that is neither the requester
nor in its chain (403 otherwise); a request already decided or expired is 409.

Errors come back in the app's OAuth shape ``{"error": CODE, "error_description": TEXT}``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from tether.errors import ConfigError, NotFound
from tether.identity.claims import TokenClaims
from tether.identity.spiffe import SpiffeId
from tether.policy.approvals import MAX_TEXT, MAX_USES, Approvals
from tether.policy.jit import JitGrants
from tether.policy.quorum import Approver, parse_quorum
from tether.server.deps import authenticated
from tether.store.approvals import ApprovalRecord

__all__ = ["approvals_router", "get_approvals", "get_jit"]

_ID = re.compile(r"^(apr|jit)_[0-9a-f]{1,40}$")


def get_approvals(request: Request) -> Approvals:
    desk: Approvals | None = getattr(request.app.state, "approvals", None)
    if desk is None:
        raise ConfigError("approvals are not configured on this server (app.state.approvals)")
    return desk


def get_jit(request: Request) -> JitGrants:
    jit: JitGrants | None = getattr(request.app.state, "jit", None)
    if jit is None:
        raise ConfigError("just-in-time grants are not configured on this server (app.state.jit)")
    return jit


Caller = Annotated[TokenClaims, Depends(authenticated)]
Desk = Annotated[Approvals, Depends(get_approvals)]
Jit = Annotated[JitGrants, Depends(get_jit)]


class ApproveBody(BaseModel):
    uses: int | None = Field(default=None, ge=1, le=MAX_USES, description="uses to grant")
    comment: str = Field(default="", max_length=MAX_TEXT)


class DenyBody(BaseModel):
    reason: str = Field(min_length=1, max_length=MAX_TEXT)


class GrantRequestBody(BaseModel):
    grants: list[str] = Field(min_length=1, max_length=64, description="KIND:PATTERN grants")
    reason: str = Field(min_length=1, max_length=MAX_TEXT)
    ttl: str | float = Field(description="lifetime once approved, e.g. 30m")
    task: str | None = Field(default=None, max_length=128)


def _view(desk: Approvals, rec: ApprovalRecord) -> dict[str, Any]:
    out = rec.to_dict()
    if rec.state == "pending":
        approvers = [
            Approver(SpiffeId.parse(v.approver), frozenset(v.groups))
            for v in rec.votes
            if v.vote == "approve"
        ]
        out["missing"] = parse_quorum(rec.quorum).missing(approvers)
    return out


def _visible(desk: Approvals, rec: ApprovalRecord, caller: TokenClaims) -> bool:
    if caller.depth == 0 and caller.subject.kind == "user":
        return True
    if str(caller.subject) == rec.requester:
        return True
    return parse_quorum(rec.quorum).eligible(Approver.of(caller, desk.groups_of))


def _id(request_id: str) -> str:
    if not _ID.match(request_id):
        raise NotFound(f"no approval request {request_id[:64]!r}")
    return request_id


def approvals_router() -> APIRouter:
    router = APIRouter(tags=["approvals"])

    # Every route touches the store and waits for a durable record: plain functions, so
    # FastAPI runs them in its thread pool and the event loop never stalls.
    @router.get("/v1/approvals")
    def list_approvals(
        desk: Desk,
        caller: Caller,
        state: str | None = None,
        kind: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Approval requests (escalated actions and JIT grant requests), newest first."""
        recs = desk.list_requests(state=state, kind=kind, limit=limit)
        shown = [_view(desk, r) for r in recs if _visible(desk, r, caller)]
        return {"approvals": shown, "count": len(shown)}

    @router.get("/v1/approvals/{request_id}")
    def show_approval(desk: Desk, caller: Caller, request_id: str) -> dict[str, Any]:
        """One request with its votes and, while pending, what the quorum still needs."""
        rec = desk.get(_id(request_id))
        if not _visible(desk, rec, caller):
            raise NotFound(f"no approval request {request_id[:64]!r}")
        return _view(desk, rec)

    @router.post("/v1/approvals/{request_id}/approve")
    def approve(
        desk: Desk, caller: Caller, request_id: str, body: ApproveBody | None = None
    ) -> dict[str, Any]:
        """Vote to approve; the request is approved once the quorum is met."""
        b = body or ApproveBody()
        rec = desk.approve(_id(request_id), caller, uses=b.uses, comment=b.comment)
        return _view(desk, rec)

    @router.post("/v1/approvals/{request_id}/deny")
    def deny(desk: Desk, caller: Caller, request_id: str, body: DenyBody) -> dict[str, Any]:
        """Deny: one eligible approver's deny decides the request."""
        return _view(desk, desk.deny(_id(request_id), caller, body.reason))

    @router.post("/v1/grants/requests")
    def request_grants(jit: Jit, caller: Caller, body: GrantRequestBody) -> dict[str, Any]:
        """Ask for extra grants for the caller's token (and task). Returns the new pending
        request, the pending one for the same grants, or an approved one already covering
        them."""
        rec = jit.request_grants(caller, body.grants, body.reason, body.ttl, task=body.task)
        return _view(jit.desk, rec)

    @router.get("/v1/grants/requests")
    def my_grant_requests(jit: Jit, caller: Caller, state: str | None = None) -> dict[str, Any]:
        """The caller's own JIT grant requests, and the extra grants in force for its token."""
        recs = jit.requests_of(caller, state)
        return {
            "requests": [_view(jit.desk, r) for r in recs],
            "count": len(recs),
            "active_grants": jit.active_grants(caller).to_list(),
        }

    return router
