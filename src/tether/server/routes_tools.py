"""``/v1/tools``: the MCP gateway's tool pins, and re-approval of a changed (or new) tool.

* ``GET /v1/tools[?server=S]``: every tool the gateway has seen, with its state (``approved``;
  ``changed``: blocked since its definition differs from the approved one; ``new``: blocked
  until first approved) and hashes. Any authenticated identity may read it.
* ``GET /v1/tools/{server}/{tool}``: one pin with both definitions and a unified diff.
* ``POST /v1/tools/{server}/{tool}/approve`` (optional JSON ``{"sha256": "<prefix>"}``: approve
  only that definition, so a server that changes it again in between is not approved by
  accident): makes the waiting definition the approved one. People only: a user's own,
  undelegated token. Recorded (``tool.approved``) before it takes effect; if the record
  fails nothing changes.

Errors come back in the app's OAuth shape ``{"error": CODE, "error_description": TEXT}``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from tether.errors import NotFound, PermissionDenied
from tether.events import Event
from tether.gateways.mcp.pins import definition_diff
from tether.identity.claims import TokenClaims
from tether.server.deps import authenticated, get_services
from tether.store.mcp import MCPStore, PinRecord

__all__ = ["tools_router"]

Caller = Annotated[TokenClaims, Depends(authenticated)]
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_lock = threading.Lock()


class ApproveBody(BaseModel):
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{8,64}$",
        description="approve only a waiting definition whose sha256 starts with this",
    )


def _summary(pin: PinRecord) -> dict[str, Any]:
    doc = pin.to_dict()
    doc.pop("approved_definition")
    doc.pop("pending_definition")
    return doc


def tools_router(store: MCPStore | Callable[[], MCPStore] | None = None) -> APIRouter:
    """A router over the tool pins in ``store`` (or a function returning it). Without one,
    the app's own data directory's store is opened on first use and kept on ``app.state``."""
    router = APIRouter(prefix="/v1/tools", tags=["tools"])

    def _store(request: Request) -> MCPStore:
        if isinstance(store, MCPStore):
            return store
        if store is not None:
            return store()
        with _lock:
            found: MCPStore | None = getattr(request.app.state, "mcp_store", None)
            if found is None:
                found = MCPStore(get_services(request).data_dir.db_path)
                request.app.state.mcp_store = found
            return found

    # (a Depends default, not an Annotated alias: the alias would be local to this function,
    # and FastAPI resolves the postponed annotations in the module's namespace)
    use_store = Depends(_store)

    def _names(server: str, tool: str) -> None:
        if not _NAME.match(server) or not _NAME.match(tool):
            raise NotFound(f"no tool {tool[:64]!r} on MCP server {server[:64]!r}")

    # Store reads and durable records block: plain functions run in FastAPI's thread pool.
    @router.get("")
    def list_tools(
        _caller: Caller, server: str | None = None, st: MCPStore = use_store
    ) -> dict[str, Any]:
        pins = st.list_pins(server)
        return {"tools": [_summary(p) for p in pins], "count": len(pins)}

    @router.get("/{server}/{tool}")
    def show_tool(
        _caller: Caller, server: str, tool: str, st: MCPStore = use_store
    ) -> dict[str, Any]:
        _names(server, tool)
        pin = st.get_pin(server, tool)
        if pin is None:
            raise NotFound(f"no tool {tool!r} seen on MCP server {server!r}")
        doc = pin.to_dict()
        if pin.pending_definition is not None:
            fields, diff = definition_diff(pin.approved_definition, pin.pending_definition)
            doc["changed_fields"] = fields
            doc["diff"] = diff
        return doc

    @router.post("/{server}/{tool}/approve")
    def approve_tool(
        request: Request,
        caller: Caller,
        server: str,
        tool: str,
        body: ApproveBody | None = None,
        st: MCPStore = use_store,
    ) -> dict[str, Any]:
        _names(server, tool)
        if caller.depth != 0 or caller.subject.kind != "user":
            raise PermissionDenied(
                "only a person approves tool definitions (a user's own token, not a delegated one)"
            )
        svc = get_services(request)
        approver = str(caller.subject)

        def record(pin: PinRecord) -> None:
            fields, diff = definition_diff(pin.approved_definition, pin.pending_definition or {})
            svc.audit.record(
                Event(
                    type="tool.approved",
                    actor=approver,
                    subject=f"{server}.{tool}",
                    decision="allow",
                    data={
                        "server": server,
                        "tool": tool,
                        "sha256": pin.pending_sha256,
                        "previous_sha256": pin.approved_sha256,
                        "fields": fields,
                        "token_id": caller.token_id,
                    },
                    bodies={"diff": diff.encode()} if diff else {},
                )
            )

        sha = body.sha256 if body is not None else None
        pin = st.approve(server, tool, approver, int(svc.clock.now() * 1000), record, sha)
        return _summary(pin)

    return router
