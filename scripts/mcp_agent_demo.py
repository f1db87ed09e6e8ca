"""A real MCP agent: the official ``mcp`` SDK, nothing of Tether imported, holding only its token.

Run it in a beam and it reaches the CRM's tools through Tether's MCP gateway and nothing else::

    tether run --grant tool:crm.query --grant tool:crm.list_tables \\
        --grant tool:crm.create_index -- python mcp_agent_demo.py

``TETHER_URL`` (the in-beam forwarder) and ``TETHER_TOKEN_FILE`` (the beam's own delegated
token) come from the beam. The agent lists the tools it may call, reads a few customer rows,
tries a write tool it was not granted (refused, with the reason), then asks for a schema change,
which policy escalates: the call is held until a human approves it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

SERVER = os.environ.get("MCP_SERVER", "crm")


def say(text: str) -> None:
    print(f"mcp-agent: {text}", flush=True)


def _text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def main() -> int:
    token = Path(os.environ["TETHER_TOKEN_FILE"]).read_text().strip()
    url = f"{os.environ['TETHER_URL']}/mcp/{SERVER}"
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=120.0)
    )
    async with http, Client(streamable_http_client(url, http_client=http), cache=None) as c:
        tools = sorted(t.name for t in (await c.list_tools()).tools)
        say(f"the tools I may call on {SERVER}: {', '.join(tools)}")

        rows = await c.call_tool(
            "query", {"sql": "SELECT id, name, country FROM customers ORDER BY id", "limit": 3}
        )
        if rows.is_error:
            say(f"the query failed: {_text(rows)[:300]}")
            return 1
        say(f"customer rows: {json.dumps(json.loads(_text(rows)).get('rows'))[:300]}")

        try:
            await c.call_tool("execute_write", {"sql": "DELETE FROM customers"})
            say("UNEXPECTED: a write outside my grants went through")
            return 1
        except MCPError as e:
            say(f"execute_write refused ({e.code}): {e.message[:160]}")

        say("asking for an index on events(customer_id): a schema change, held for approval")
        made = await c.call_tool("create_index", {"table": "events", "columns": ["customer_id"]})
        if made.is_error:
            say(f"create_index failed: {_text(made)[:300]}")
            return 1
        say(f"approved and done: {json.dumps(json.loads(_text(made)))[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
