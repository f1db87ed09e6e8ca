"""``/v1/audit``: checkpoints, proofs, entries, search and session timelines over HTTP.

Every route needs an authenticated caller. Checkpoints, the verifier key and proofs carry only
hashes, so any identity may fetch them (an agent can check its own receipts). Entries, bodies,
search and sessions carry what agents were told and did, so they are for people: a user's own
token (``spiffe://<td>/user/<name>``, not delegated); a delegated or agent token gets 403.

Errors are JSON ``{"error": code, "error_description": message}`` (the app maps every
:class:`~tether.errors.TetherError`); hashes travel as lowercase hex.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, Response

from tether.audit.log import MAX_SEARCH_LIMIT, AuditLog
from tether.audit.merkle import leaf_hash
from tether.errors import PermissionDenied
from tether.identity.claims import TokenClaims
from tether.server.deps import authenticated

__all__ = ["router"]

router = APIRouter(prefix="/v1/audit", tags=["audit"])

Caller = Annotated[TokenClaims, Depends(authenticated)]
NOTE_MEDIA_TYPE = "text/plain; charset=utf-8"


def _log(request: Request) -> AuditLog:
    audit: AuditLog = request.app.state.tether.audit
    return audit


def _reader(caller: TokenClaims) -> None:
    """Entry contents are for people: a user's own, undelegated token."""
    if caller.depth != 0 or caller.subject.kind != "user":
        raise PermissionDenied(
            "reading audit entries needs a user's own token, not a delegated or agent token",
            hint="checkpoints, the verifier key and proofs are open to every identity",
        )


@router.get("/checkpoint", response_class=PlainTextResponse)
def checkpoint(request: Request, _caller: Caller) -> Response:
    """The newest signed checkpoint (C2SP tlog-checkpoint signed note)."""
    return PlainTextResponse(
        _log(request).latest_checkpoint(),
        media_type=NOTE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/vkey", response_class=PlainTextResponse)
def vkey(request: Request, _caller: Caller) -> Response:
    """The note verifier key that signs checkpoints (``<name>+<hex8>+<base64>``)."""
    return PlainTextResponse(_log(request).verifier_key + "\n", media_type=NOTE_MEDIA_TYPE)


@router.get("/proof/inclusion")
def inclusion(
    request: Request,
    _caller: Caller,
    index: Annotated[int, Query(ge=0)],
    size: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """RFC 9162 inclusion proof of entry ``index`` in the tree of ``size`` (default: current)."""
    audit = _log(request)
    n = size if size is not None else audit.size()
    proof = audit.inclusion_proof(index, n)
    return {
        "index": index,
        "size": n,
        "leaf_hash": leaf_hash(audit.entry_data(index)).hex(),
        "root": audit.root(n).hex(),
        "hashes": [h.hex() for h in proof],
    }


@router.get("/proof/consistency")
def consistency(
    request: Request,
    _caller: Caller,
    old: Annotated[int, Query(ge=0)],
    new: Annotated[int | None, Query(ge=0)] = None,
) -> dict[str, Any]:
    """RFC 9162 consistency proof from tree size ``old`` to ``new`` (default: current)."""
    audit = _log(request)
    n = new if new is not None else audit.size()
    proof = audit.consistency_proof(old, n)
    return {
        "old": old,
        "new": n,
        "old_root": audit.root(old).hex(),
        "new_root": audit.root(n).hex(),
        "hashes": [h.hex() for h in proof],
    }


@router.get("/entries/{index}")
def entry(
    request: Request,
    caller: Caller,
    index: int,
    proof: bool = False,
    size: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    """Entry ``index``: the parsed entry, its exact canonical bytes (``data``) and leaf hash;
    with ``proof=true`` also its inclusion proof in the tree of ``size`` (default: current)."""
    _reader(caller)
    audit = _log(request)
    data = audit.entry_data(index)
    out: dict[str, Any] = {
        "index": index,
        "entry": audit.entry(index),
        "data": data.decode(),
        "leaf_hash": leaf_hash(data).hex(),
    }
    if proof:
        n = size if size is not None else audit.size()
        out["proof"] = {
            "size": n,
            "root": audit.root(n).hex(),
            "hashes": [h.hex() for h in audit.inclusion_proof(index, n)],
        }
    return out


@router.get("/bodies/{sha256}")
def body(request: Request, caller: Caller, sha256: str) -> Response:
    """A stored body (prompt, response, tool result) by the SHA-256 its entry names."""
    _reader(caller)
    return Response(_log(request).body(sha256), media_type="application/octet-stream")


@router.get("/search")
def search(
    request: Request,
    caller: Caller,
    identity: str | None = None,
    session: str | None = None,
    type: str | None = None,
    decision: str | None = None,
    since_ms: Annotated[int | None, Query(ge=0)] = None,
    until_ms: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT)] = 100,
    descending: bool = False,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> dict[str, Any]:
    """Entries matching every filter (``identity`` is actor or subject; ``type`` may end in
    ``*``); page with ``after`` = the last index seen."""
    _reader(caller)
    entries = _log(request).search(
        identity=identity,
        session=session,
        type=type,
        decision=decision,
        since_ms=since_ms,
        until_ms=until_ms,
        limit=limit,
        descending=descending,
        after=after,
    )
    return {"entries": entries, "count": len(entries)}


@router.get("/sessions/{session_id}")
def session(request: Request, caller: Caller, session_id: str) -> dict[str, Any]:
    """Every entry of one session, in order: its timeline."""
    _reader(caller)
    entries = _log(request).session(session_id)
    return {"session": session_id, "entries": entries, "count": len(entries)}
