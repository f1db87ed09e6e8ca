"""The MCP gateway: MCP servers (streamable HTTP or stdio) served to agents at ``/mcp/<server>``
with every tool call decided by the one decision core, pinned tool definitions, and sessions
shared by every gateway process on a data directory. See docs/mcp-gateway.md."""

from tether.gateways.mcp.gateway import MCPGateway, with_mcp_gateway
from tether.gateways.mcp.mount import build_mcp_gateway, mount_mcp_gateway

__all__ = ["MCPGateway", "build_mcp_gateway", "mount_mcp_gateway", "with_mcp_gateway"]
