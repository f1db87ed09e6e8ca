"""``GET /v1/usage``: token usage and cost grouped by identity, task, delegation root or model.

A user's own token sees everything; any other token sees only its own identity's usage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from tether.identity.claims import TokenClaims
from tether.server.deps import authenticated
from tether.store.usage import UsageLedger

__all__ = ["usage_router"]

Caller = Annotated[TokenClaims, Depends(authenticated)]


def usage_router(ledger: UsageLedger | Callable[[], UsageLedger]) -> APIRouter:
    """A router serving ``/v1/usage`` from ``ledger`` (or a function returning it)."""
    router = APIRouter(prefix="/v1", tags=["usage"])

    def _ledger() -> UsageLedger:
        return ledger if isinstance(ledger, UsageLedger) else ledger()

    @router.get("/usage")
    def usage(
        caller: Caller,
        by: Annotated[str, Query(pattern="^(identity|task|root|model)$")] = "identity",
        identity: str | None = None,
        root: str | None = None,
        since_ms: Annotated[int | None, Query(ge=0)] = None,
    ) -> dict[str, Any]:
        if caller.depth != 0 or caller.subject.kind != "user":
            identity = str(caller.subject)  # agents see their own usage only
        rows = _ledger().report(by, identity=identity, root=root, since_ms=since_ms)
        return {"by": by, "usage": rows}

    return router
