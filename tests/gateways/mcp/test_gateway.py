"""The MCP gateway end to end: the official SDK client, a real uvicorn server running the
gateway, SDK-built upstreams over streamable HTTP and stdio, the real Cedar core, approvals,
group limits and the audit log."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import MCPError

from tests.gateways.mcp.conftest import Running, mcp_client, serve_gateway
from tests.gateways.mcp.servers import POISONED_DOC, ROWS, DbServer
from tether.gateways.mcp import jsonrpc as rpc
from tether.server.services import Services

ESCALATE_WRITES = """
@id("db-writes-need-a-human")
@escalate("1 of human")
@reason("schema changes need a person's approval")
permit (principal, action == Tether::Action::"tool.call", resource)
when { context.granted && context has effects && context.effects.contains("db.schema_change") };
"""


def events(services: Services, type_: str) -> list[dict[str, Any]]:
    return services.audit.search(type=type_, limit=1000)


def drain(gw: Running) -> None:
    gw.served.run(gw.gw.drain())


def user_token(services: Services, name: str) -> str:
    credential = f"tether_uc_test_{name}_credential_0123456789"
    if services.store.get_user(name) is None:
        services.store.add_user(name, credential, ["tool:*"], 0)
    return services.authority.login(credential).token


# -- listing and calling ------------------------------------------------------------------


async def test_tools_list_shows_only_granted_tools(
    gateway: Running, mint: Callable[..., str]
) -> None:
    async with mcp_client(gateway.url("db"), mint(["tool:db.read_rows"])) as c:
        names = {t.name for t in (await c.list_tools()).tools}
    assert names == {"read_rows"}
    async with mcp_client(gateway.url("db"), mint(["tool:db.*"])) as c:
        names = {t.name for t in (await c.list_tools()).tools}
    assert names == {"read_rows", "create_index", "drop_table", "slow"}


async def test_allowed_call_goes_through_and_is_recorded(
    gateway: Running, token: str, db: DbServer, services: Services
) -> None:
    async with mcp_client(gateway.url("db"), token) as c:
        tools = (await c.list_tools()).tools
        desc = next(t.description for t in tools if t.name == "read_rows")
        result = await c.call_tool("read_rows", {"table": "customers", "limit": 2})
    assert desc == "Read rows of a table (at most `limit`)."
    assert not result.is_error
    assert "Ada Lovelace" in result.content[0].text  # type: ignore[union-attr]
    assert ROWS[2]["name"] not in result.content[0].text  # type: ignore[union-attr]
    assert db.calls == [("read_rows", {"table": "customers", "limit": 2})]
    drain(gateway)
    calls = events(services, "tool.call")
    assert [(e["subject"], e["decision"]) for e in calls] == [("db.read_rows", "allow")]
    assert calls[0]["data"]["action"]["context"]["server"] == "db"
    assert calls[0]["data"]["action"]["context"]["arguments_digest"]
    results = events(services, "tool.result")
    assert [e["data"]["status"] for e in results] == ["ok"]
    body = services.audit.body(results[0]["bodies"]["response"])
    assert b"Ada Lovelace" in body
    assert events(services, "mcp.refused") == []  # the SDK's server/discover probe is no attempt
    started = events(services, "mcp.session.started")
    assert started and started[0]["data"]["server"] == "db"
    listed = events(services, "mcp.tools.listed")
    assert listed and "drop_table" in listed[0]["data"]["hidden"]


async def test_denied_call_gets_a_json_rpc_error_that_says_why(
    gateway: Running, mint: Callable[..., str], db: DbServer, services: Services
) -> None:
    async with mcp_client(gateway.url("db"), mint(["tool:db.read_rows"])) as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool("drop_table", {"table": "customers"})
    assert e.value.code == rpc.POLICY_DENIED
    assert "tools/call db.drop_table denied" in e.value.message
    assert "default deny" in e.value.message
    assert e.value.data["reason"] == "policy_denied"
    assert db.calls == []  # nothing reached the upstream
    denied = events(services, "tool.call")
    assert [(x["subject"], x["decision"]) for x in denied] == [("db.drop_table", "deny")]


async def test_escalated_call_waits_for_approval_then_passes(
    home: Path, services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    (home / "policies" / "20-writes.cedar").write_text(ESCALATE_WRITES)
    assert services.policy.reload()
    table["servers"]["db"]["escalation_hold"] = "60s"
    gw = serve_gateway(services, table)
    bob = services.verifier.verify(user_token(services, "bob"))
    try:

        async def approve_when_asked() -> str:
            for _ in range(600):
                pending = services.approvals.list_requests(state="pending")
                if pending:
                    await asyncio.to_thread(services.approvals.approve, pending[0].id, bob)
                    return pending[0].id
                await asyncio.sleep(0.05)
            raise AssertionError("no approval request appeared")

        async with mcp_client(gw.url("db"), token) as c:
            approver = asyncio.ensure_future(approve_when_asked())
            result = await c.call_tool("create_index", {"table": "orders", "column": "email"})
            approval = await approver
        assert "index on orders(email) created" in result.content[0].text  # type: ignore[union-attr]
        assert db.indexes == [("orders", "email")]
        drain(gw)
        decisions = [e["decision"] for e in events(services, "tool.call")]
        assert decisions == ["allow"]
        assert approval in str(events(services, "tool.call")[0]["data"]["decision"])
        assert events(services, "approval.used")
    finally:
        gw.served.stop()


async def test_escalation_not_approved_in_time_names_the_approval_then_retry_passes(
    home: Path, services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    (home / "policies" / "20-writes.cedar").write_text(ESCALATE_WRITES)
    assert services.policy.reload()
    table["servers"]["db"]["escalation_hold"] = "0.3s"
    gw = serve_gateway(services, table)
    try:
        async with mcp_client(gw.url("db"), token) as c:
            with pytest.raises(MCPError) as e:
                await c.call_tool("create_index", {"table": "orders", "column": "email"})
            assert e.value.code == rpc.APPROVAL_PENDING
            approval = e.value.data["approval"]
            assert approval in e.value.message and "1 of human" in e.value.message
            assert db.indexes == []
            bob = services.verifier.verify(user_token(services, "bob"))
            services.approvals.approve(approval, bob)
            result = await c.call_tool("create_index", {"table": "orders", "column": "email"})
            assert not result.is_error
            # an approval is for those arguments only
            with pytest.raises(MCPError) as e2:
                await c.call_tool("create_index", {"table": "orders", "column": "phone"})
            assert e2.value.code == rpc.APPROVAL_PENDING
        assert db.indexes == [("orders", "email")]
    finally:
        gw.served.stop()


async def test_group_limit_bites_through_configured_effects(
    home: Path, services: Services, gateway: Running, token: str, db: DbServer
) -> None:
    (home / "policies" / "boundaries.toml").write_text(
        '[groups.bots]\nmembers = ["spiffe://example.org/agent/bot"]\n\n'
        '[effects]\n"db.schema_change" = []\n\n'
        '[limits.schema]\ngroup = "bots"\nkind = "budget"\nunit = "db.schema_change"\n'
        'amount = 2\nwindow = "1h"\non_exceed = "deny"\n'
    )
    assert services.boundaries.check()  # reload now, not at the next stat interval
    async with mcp_client(gateway.url("db"), token) as c:
        for col in ("a", "b"):
            assert not (await c.call_tool("create_index", {"table": "t", "column": col})).is_error
        with pytest.raises(MCPError) as e:
            await c.call_tool("create_index", {"table": "t", "column": "c"})
        # reads carry no schema-change effect: not limited
        assert not (await c.call_tool("read_rows", {"table": "t"})).is_error
    assert e.value.code == rpc.POLICY_DENIED
    assert "limit" in e.value.message
    assert db.indexes == [("t", "a"), ("t", "b")]


# -- pinning ------------------------------------------------------------------------------


async def test_rug_pull_is_blocked_diffed_and_unblocked_by_reapproval(
    gateway: Running, token: str, db: DbServer, services: Services, admin_token: str
) -> None:
    async with mcp_client(gateway.url("db"), token) as c:
        assert "read_rows" in {t.name for t in (await c.list_tools()).tools}
        assert not (await c.call_tool("read_rows", {"table": "customers"})).is_error
        db.swap_description()
        tools = (await c.list_tools()).tools
        assert "read_rows" not in {t.name for t in tools}  # the poisoned text never shows
        assert all(POISONED_DOC not in (t.description or "") for t in tools)
        with pytest.raises(MCPError) as e:
            await c.call_tool("read_rows", {"table": "customers"})
        assert e.value.code == rpc.TOOL_BLOCKED
        assert "changed since it was approved" in e.value.message
        assert "tether tools approve db read_rows" in e.value.message
        assert len(db.calls) == 1  # the blocked call never reached the server

        changed = events(services, "tool.changed")
        assert len(changed) == 1
        data = changed[0]["data"]
        assert data["fields"] == ["description"]
        assert '+  "description": "Read rows of a table. IMPORTANT' in data["diff"]
        assert data["approved_sha256"] != data["sha256"]
        pinned = events(services, "tool.pinned")
        assert {e["data"]["tool"] for e in pinned} >= {"read_rows", "create_index"}

        # A person re-approves through the API; the agent can use the tool again.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_api(services)), base_url="http://tether"
        ) as api:
            auth = {"Authorization": f"Bearer {admin_token}"}
            shown = (await api.get("/v1/tools/db/read_rows", headers=auth)).json()
            assert shown["state"] == "changed" and "IMPORTANT" in shown["diff"]
            r = await api.post(
                "/v1/tools/db/read_rows/approve",
                json={"sha256": shown["pending_sha256"][:16]},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "approved"
        result = await c.call_tool("read_rows", {"table": "customers"})
        assert not result.is_error
        listed = (await c.list_tools()).tools
        assert any(t.name == "read_rows" and t.description == POISONED_DOC for t in listed)
    approved = events(services, "tool.approved")
    assert [e["actor"] for e in approved] == ["spiffe://example.org/user/admin"]


def _api(services: Services) -> Any:
    from tether.server.app import create_app
    from tether.server.routes_tools import tools_router

    app = create_app(services)
    app.include_router(tools_router())
    return app


async def test_pin_approve_mode_keeps_new_tools_blocked_until_approved(
    services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    table["servers"]["db"]["pin"] = "approve"
    gw = serve_gateway(services, table)
    try:
        async with mcp_client(gw.url("db"), token) as c:
            assert (await c.list_tools()).tools == []
            with pytest.raises(MCPError) as e:
                await c.call_tool("read_rows", {"table": "t"})
            assert e.value.code == rpc.TOOL_BLOCKED and "not approved yet" in e.value.message
            assert [x["data"]["tool"] for x in events(services, "tool.new")].count("read_rows") == 1
            gw.served.run(asyncio.to_thread(_approve, gw, services, "read_rows"))
            assert [t.name for t in (await c.list_tools()).tools] == ["read_rows"]
            assert not (await c.call_tool("read_rows", {"table": "t"})).is_error
    finally:
        gw.served.stop()


def _approve(gw: Running, services: Services, tool: str) -> None:
    gw.gw.store.approve("db", tool, "spiffe://example.org/user/admin", 1, lambda _: None)


# -- sessions ------------------------------------------------------------------------------


async def test_session_continues_on_a_second_gateway_instance(
    services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    """A load balancer alternates every request between two gateway instances, each with its
    own store connection, session cache, upstream pool and event loop (thread): the SDK
    session opened on one continues on the other, and so does its upstream session.

    (They share the data dir's one audit writer: the audit log allows one writer per data
    directory, so a second ``Services`` on it would collide on the log, not on sessions.)"""
    a = serve_gateway(services, table)
    b = serve_gateway(services, table)
    assert a.gw.store is not b.gw.store
    ports = [a.served.port, b.served.port]
    hits: list[int] = []

    import httpx2

    class Alternate(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()
            self.n = 0

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            port = ports[self.n % 2]
            self.n += 1
            hits.append(port)
            request.url = request.url.copy_with(port=port)
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, transport=Alternate(), timeout=30
    )
    try:
        async with (
            http,
            Client(
                streamable_http_client(a.url("db"), http_client=http), cache=None, mode="legacy"
            ) as c,
        ):
            for i in range(3):
                assert not (await c.call_tool("read_rows", {"table": f"t{i}"})).is_error
            names = {t.name for t in (await c.list_tools()).tools}
            # one upstream session served the agent's session on both instances
            assert len(db.mcp.session_manager._server_instances) == 1
        assert "read_rows" in names
        assert set(hits) == set(ports)
        assert len(db.calls) == 3
        sessions = {e["data"]["mcp_session"] for e in events(services, "tool.call")}
        assert len(sessions) == 1
    finally:
        a.served.stop()
        b.served.stop()


async def test_delete_ends_the_session_everywhere(
    gateway: Running, token: str, services: Services
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=gateway.base, headers=headers) as h:
        r = await h.post("/mcp/db", json=_init())
        sid = r.headers["mcp-session-id"]
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        assert (await h.post("/mcp/db", json=ping, headers={"mcp-session-id": sid})).json() == {
            "jsonrpc": "2.0",
            "id": 2,
            "result": {},
        }
        assert (await h.delete("/mcp/db", headers={"mcp-session-id": sid})).status_code == 204
        r = await h.post("/mcp/db", json=ping, headers={"mcp-session-id": sid})
    assert r.status_code == 404
    assert r.json()["error"]["data"]["reason"] == "session_not_found"
    assert services.store  # the store row says ended: another process refuses it too
    assert gateway.gw.store.get_session(sid).ended_ms is not None  # type: ignore[union-attr]
    drain(gateway)
    assert events(services, "mcp.session.ended")


def _init(version: str = "2025-06-18") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "curl", "version": "8"},
        },
    }


# -- stdio ---------------------------------------------------------------------------------


async def test_stdio_server_is_launched_kept_alive_and_gets_no_gateway_secrets(
    gateway: Running, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TEST_GATEWAY_SECRET", "s3cret-value")
    async with mcp_client(gateway.url("files"), token) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert names == {"read_file", "env_keys", "pid", "crash"}
        r = await c.call_tool("read_file", {"path": "notes.txt"})
        assert r.content[0].text == "contents of notes.txt"  # type: ignore[union-attr]
        keys = (await c.call_tool("env_keys", {})).content[0].text  # type: ignore[union-attr]
        assert "TETHER_TEST_GATEWAY_SECRET" not in keys
        assert not {k for k in os.environ if "KEY" in k or "TOKEN" in k} & set(keys.split(","))
        pid1 = (await c.call_tool("pid", {})).content[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError) as e:
            await c.call_tool("crash", {})
        assert e.value.code == rpc.UPSTREAM_FAILED and "exit code" in e.value.message
        # restarted (with back-off) and initialized again, transparently
        pid2 = None
        for _ in range(100):
            try:
                pid2 = (await c.call_tool("pid", {})).content[0].text  # type: ignore[union-attr]
                break
            except MCPError:
                await asyncio.sleep(0.1)
        assert pid2 is not None and pid2 != pid1


async def test_a_lost_upstream_session_is_reopened_transparently(
    gateway: Running, token: str, db: DbServer
) -> None:
    async with mcp_client(gateway.url("db"), token) as c:
        assert not (await c.call_tool("read_rows", {"table": "a"})).is_error
        row = next(gateway.gw.store.get_session(s) for s in list(gateway.gw._up_sessions))
        assert row is not None and row.upstream_session
        version, _, upstream_id = row.upstream_session.partition(" ")
        # the upstream forgets the session (restart, idle expiry ...)
        url = gateway.gw.settings.servers["db"].url
        assert url is not None
        async with httpx.AsyncClient() as h:
            r = await h.delete(
                url, headers={"mcp-session-id": upstream_id, "mcp-protocol-version": version}
            )
        assert r.status_code in (200, 204)
        assert not (await c.call_tool("read_rows", {"table": "b"})).is_error
        again = gateway.gw.store.get_session(row.id)
    assert again is not None and again.upstream_session not in (None, row.upstream_session)
    assert [x[1]["table"] for x in db.calls] == ["a", "b"]


async def test_session_continues_in_another_process(
    home: Path, services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    """The same with a real second process sharing the data dir's store and trust bundle:
    every other request of one SDK session lands in that process."""
    import json
    import subprocess
    import sys

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    a = serve_gateway(services, table)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("other_process.py")),
            str(home),
            json.dumps(services.bundle_doc),
            json.dumps(table),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port_b = int(proc.stdout.readline())
        ports = [a.served.port, port_b]
        for _ in range(200):  # until the other process answers
            try:
                httpx.get(f"http://127.0.0.1:{port_b}/mcp/db", timeout=1)
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)

        class Alternate(httpx2.AsyncBaseTransport):
            def __init__(self) -> None:
                self.inner = httpx2.AsyncHTTPTransport()
                self.n = 0

            async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
                request.url = request.url.copy_with(port=ports[self.n % 2])
                self.n += 1
                return await self.inner.handle_async_request(request)

            async def aclose(self) -> None:
                await self.inner.aclose()

        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, transport=Alternate(), timeout=30
        )
        async with (
            http,
            Client(
                streamable_http_client(a.url("db"), http_client=http), cache=None, mode="legacy"
            ) as c,
        ):
            for i in range(4):
                assert not (await c.call_tool("read_rows", {"table": f"t{i}"})).is_error
            assert len(db.mcp.session_manager._server_instances) == 1
        assert [x[1]["table"] for x in db.calls] == ["t0", "t1", "t2", "t3"]
        # this process recorded the calls it served; the other process served the rest
        served_here = {e["data"]["request_id"] for e in events(services, "tool.call")}
        assert 0 < len(served_here) < 4
    finally:
        proc.terminate()
        proc.wait(10)
        a.served.stop()
