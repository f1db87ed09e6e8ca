"""The issue's done-when, minus the beam: an agent using the MCP SDK and holding only its
token reads customer rows through the gateway, is refused a tool outside its grants, waits for
approval on a write tool, is blocked when the server swaps a tool's description, and every
step is in the audit log (in its session's timeline), which still verifies."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError

from tests.gateways.mcp.conftest import mcp_client, serve_gateway
from tests.gateways.mcp.servers import DbServer
from tether.gateways.mcp import jsonrpc as rpc
from tether.server.services import Services

POLICY = """
@id("schema-changes-need-a-person")
@escalate("1 of human")
permit (principal, action == Tether::Action::"tool.call", resource)
when { context.granted && context has effects && context.effects.contains("db.schema_change") };
"""


async def test_churn_report_agent_story(
    home: Path, services: Services, table: dict[str, Any], admin_token: str, db: DbServer
) -> None:
    (home / "policies" / "20-schema.cedar").write_text(POLICY)
    assert services.policy.reload()
    table["servers"]["db"]["escalation_hold"] = "60s"
    gw = serve_gateway(services, table)
    admin = services.verifier.verify(admin_token)
    agent = services.authority.delegate(
        admin, "churn-analyst", ["tool:db.read_rows", "tool:db.create_index"], task="churn-q3"
    ).token
    services.store.add_user("bob", "tether_uc_test_bob_credential_0123456789", ["tool:*"], 0)
    bob = services.verifier.verify(
        services.authority.login("tether_uc_test_bob_credential_0123456789").token
    )
    try:
        async with mcp_client(gw.url("db"), agent) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert names == {"read_rows", "create_index"}
            rows = await c.call_tool("read_rows", {"table": "customers"})
            assert "Grace Hopper" in rows.content[0].text  # type: ignore[union-attr]

            with pytest.raises(MCPError) as refused:
                await c.call_tool("drop_table", {"table": "customers"})
            assert refused.value.code == rpc.POLICY_DENIED

            async def bob_approves() -> None:
                while not (pending := services.approvals.list_requests(state="pending")):
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(services.approvals.approve, pending[0].id, bob)

            approving = asyncio.ensure_future(asyncio.wait_for(bob_approves(), 60))
            made = await c.call_tool("create_index", {"table": "customers", "column": "plan"})
            await approving
            assert "created" in made.content[0].text  # type: ignore[union-attr]

            db.swap_description()
            assert "read_rows" not in {t.name for t in (await c.list_tools()).tools}
            with pytest.raises(MCPError) as blocked:
                await c.call_tool("read_rows", {"table": "customers"})
            assert blocked.value.code == rpc.TOOL_BLOCKED
        gw.served.run(gw.gw.drain())
    finally:
        gw.served.stop()

    timeline = [
        (e["type"], e.get("subject"), e.get("decision")) for e in services.audit.session("churn-q3")
    ]
    steps = [t for t in timeline if t[0].startswith(("mcp.", "tool.", "approval."))]
    expected_in_order = [
        ("mcp.session.started", "db", None),
        ("mcp.tools.listed", "db", None),
        ("tool.call", "db.read_rows", "allow"),
        ("tool.call", "db.drop_table", "deny"),
        ("approval.requested", None, None),
        ("tool.call", "db.create_index", "allow"),
        ("tool.call", "db.read_rows", "deny"),
    ]
    it = iter(steps)
    for want in expected_in_order:
        assert any(
            got[0] == want[0]
            and (want[1] is None or got[1] == want[1])
            and (want[2] is None or got[2] == want[2])
            for got in it
        ), f"{want} missing (in order) from {steps}"
    changed = services.audit.search(type="tool.changed")
    assert changed and changed[0]["data"]["observed_via"]["agent"].endswith("/churn-analyst")
    assert services.audit.search(type="approval.approved")
    assert services.audit.verify().size == services.audit.size()
