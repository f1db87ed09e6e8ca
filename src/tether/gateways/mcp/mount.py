"""The integration seam: build the MCP gateway from a running :class:`Services` and put it in
front of the server's app (same port; ``/mcp/...`` never collides with ``/v1``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.gateways.mcp.config import parse_mcp_config
from tether.gateways.mcp.gateway import ASGIApp, MCPGateway, with_mcp_gateway
from tether.gateways.mcp.inspect import ToolInspector
from tether.policy.core import DecisionCore
from tether.store.mcp import MCPStore

__all__ = ["build_mcp_gateway", "mount_mcp_gateway"]


def build_mcp_gateway(
    services: Any,
    *,
    core: DecisionCore | None = None,
    inspectors: Sequence[ToolInspector] = (),
) -> MCPGateway:
    """The gateway for ``services``: its verifier, audit log, clock and ``[mcp]`` config,
    sessions and tool pins in the store (``<data dir>/tether.db``), and ``core`` (default:
    ``services.core``). Close it with ``await gateway.aclose()``."""
    settings = parse_mcp_config(services.config.extra.get("mcp"))
    return MCPGateway(
        settings,
        verify=services.verifier.verify,
        core=core if core is not None else services.core,
        audit=services.audit,
        store=MCPStore(services.data_dir.db_path),
        inspectors=inspectors,
        clock=services.clock,
        owns_store=True,
    )


def mount_mcp_gateway(app: ASGIApp, gateway: MCPGateway) -> ASGIApp:
    """``app`` with ``/mcp/...`` served by ``gateway`` (see ``with_mcp_gateway``)."""
    return with_mcp_gateway(app, gateway)
