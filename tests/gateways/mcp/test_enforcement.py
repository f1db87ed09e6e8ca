"""Fail-closed recording, credentials injected but never shown, the inspection hook, and the
opt-in passthrough of prompts and resources."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from mcp import MCPError

from tests.gateways.mcp.conftest import mcp_client, serve_gateway
from tests.gateways.mcp.servers import DbServer
from tether.errors import RecordFailed
from tether.events import Event, Receipt
from tether.gateways.mcp import jsonrpc as rpc
from tether.gateways.mcp.inspect import Finding, ToolContext
from tether.server.services import Services

UPSTREAM_SECRET = "sk-upstream-SECRET-0123456789abcdef"


class FailingFor:
    """The real audit log, except that events of ``types`` cannot be made durable."""

    def __init__(self, real: Any, *types: str) -> None:
        self.real = real
        self.types = set(types)

    def record(self, event: Event) -> Receipt:
        if event.type in self.types:
            raise RecordFailed("disk full (test)")
        result: Receipt = self.real.record(event)
        return result

    async def arecord(self, event: Event) -> Receipt:
        if event.type in self.types:
            raise RecordFailed("disk full (test)")
        result: Receipt = await self.real.arecord(event)
        return result


@pytest.mark.parametrize("record_first", [True, False], ids=["record_first", "overlapped"])
async def test_a_call_whose_record_fails_is_refused(
    record_first: bool, services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    table["servers"]["db"]["record_first"] = record_first
    gw = serve_gateway(services, table, audit=FailingFor(services.audit, "tool.call"))
    try:
        async with mcp_client(gw.url("db"), token) as c:
            with pytest.raises(MCPError) as e:
                await c.call_tool("read_rows", {"table": "customers"})
    finally:
        gw.served.stop()
    assert e.value.code == rpc.AUDIT_UNAVAILABLE
    assert "audit log unavailable, call refused" in e.value.message
    if record_first:
        assert db.calls == []  # the default: the upstream never saw an unrecorded call
    else:
        # record_first = false trades this away for latency: the call ran, its result was
        # withheld from the agent (docs/mcp-gateway.md says so)
        assert [c[0] for c in db.calls] == ["read_rows"]


async def test_upstream_credential_is_injected_and_never_shown(
    services: Services,
    table: dict[str, Any],
    token: str,
    db: DbServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    table["servers"]["db"]["credential_env"] = "DB_MCP_TOKEN"
    gw = serve_gateway(services, table, env={"DB_MCP_TOKEN": UPSTREAM_SECRET})
    try:
        assert UPSTREAM_SECRET not in repr(gw.gw.settings) + repr(gw.gw.upstreams)
        async with mcp_client(gw.url("db"), token) as c:
            await c.list_tools()
            await c.call_tool("read_rows", {"table": "customers", "limit": 1})
            # a secret an agent puts in arguments is redacted by the audit log
            await c.call_tool("read_rows", {"table": "t", "password": "hunter2-very-secret"})
            with pytest.raises(MCPError) as e:
                await c.call_tool("drop_table", {"table": "customers"})
        gw.served.run(gw.gw.drain())
    finally:
        gw.served.stop()
    # the upstream got the gateway's credential, never the agent's token
    seen = [h.get(b"authorization", b"").decode() for h in db.headers]
    assert seen and all(v == f"Bearer {UPSTREAM_SECRET}" for v in seen)
    assert all(token not in str(h) for h in db.headers)
    assert UPSTREAM_SECRET not in e.value.message
    audit_bytes = b"".join(
        services.audit.entry_data(i) for i in range(services.audit.size())
    ) + b"".join(
        services.audit.body(sha)
        for ev in services.audit.search(limit=1000)
        for sha in (ev.get("bodies") or {}).values()
    )
    assert UPSTREAM_SECRET.encode() not in audit_bytes
    assert token.encode() not in audit_bytes
    assert b"hunter2-very-secret" not in audit_bytes
    assert UPSTREAM_SECRET not in caplog.text and token not in caplog.text


class Inspector:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Mapping[str, Any]]] = []

    async def call(self, ctx: ToolContext, arguments: Mapping[str, Any]) -> Finding | None:
        self.calls.append((ctx.tool, arguments))
        if arguments.get("table") == "secrets":
            return Finding("table-guard", "block", "the secrets table is off limits")
        return None

    async def result(self, ctx: ToolContext, result: Mapping[str, Any]) -> Finding | None:
        text = str(result.get("content"))
        if "Grace Hopper" in text:
            return Finding("pii", "block", "a customer's name in the output")
        if "Ada" in text:
            return Finding("pii", "flag", "a customer's name in the output")
        return None


async def test_inspection_hook_blocks_and_flags(
    services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    ins = Inspector()
    gw = serve_gateway(services, table, inspectors=[ins])
    try:
        async with mcp_client(gw.url("db"), token) as c:
            with pytest.raises(MCPError) as blocked_call:
                await c.call_tool("read_rows", {"table": "secrets"})
            with pytest.raises(MCPError) as blocked_result:
                await c.call_tool("read_rows", {"table": "customers", "limit": 2})
            flagged = await c.call_tool("read_rows", {"table": "customers", "limit": 1})
        gw.served.run(gw.gw.drain())
    finally:
        gw.served.stop()
    assert blocked_call.value.code == rpc.INSPECTION_BLOCKED
    assert "table-guard" in blocked_call.value.message
    assert blocked_result.value.code == rpc.INSPECTION_BLOCKED
    assert "Grace" not in blocked_result.value.message
    assert "Ada" in flagged.content[0].text  # type: ignore[union-attr]
    assert [a["table"] for _, a in ins.calls] == ["secrets", "customers", "customers"]
    assert [c[1]["table"] for c in db.calls] == ["customers", "customers"]  # not "secrets"
    results = services.audit.search(type="tool.result")
    assert [r["data"]["status"] for r in results] == ["inspection_blocked", "blocked", "ok"]
    assert results[2]["data"]["findings"][0]["detector"] == "pii"


class Broken:
    async def call(self, ctx: ToolContext, arguments: Mapping[str, Any]) -> Finding | None:
        if arguments.get("table") == "boom":
            raise KeyError("bug")
        return None

    async def result(self, ctx: ToolContext, result: Mapping[str, Any]) -> Finding | None:
        raise RuntimeError("bug")


async def test_an_inspector_that_raises_blocks_fail_closed(
    services: Services, table: dict[str, Any], token: str, db: DbServer
) -> None:
    gw = serve_gateway(services, table, inspectors=[Broken()])
    try:
        async with mcp_client(gw.url("db"), token) as c:
            with pytest.raises(MCPError) as on_call:
                await c.call_tool("read_rows", {"table": "boom"})
            with pytest.raises(MCPError) as on_result:
                await c.call_tool("read_rows", {"table": "customers"})
    finally:
        gw.served.stop()
    for e in (on_call, on_result):
        assert e.value.code == rpc.INSPECTION_BLOCKED
        assert "the inspector failed" in e.value.message and "fail closed" in e.value.message
    assert [c[1]["table"] for c in db.calls] == ["customers"]  # the failed check sent nothing


async def test_prompts_and_resources_only_when_passed_through(
    services: Services, table: dict[str, Any], mint: Callable[..., str], db: DbServer
) -> None:
    plain = serve_gateway(services, table)
    try:
        async with mcp_client(plain.url("db"), mint()) as c:  # not passed through: refused
            assert c.session.server_capabilities.prompts is None  # type: ignore[union-attr]
            with pytest.raises(MCPError) as e:
                await c.list_prompts()
            assert e.value.code == rpc.METHOD_NOT_FOUND
            assert "does not pass it through" in e.value.message
    finally:
        plain.served.stop()
    table["servers"]["db"]["passthrough"] = ["prompts/list", "prompts/get", "resources/read"]
    gw = serve_gateway(services, table)
    try:
        async with mcp_client(gw.url("db"), mint()) as c:
            assert c.session.server_capabilities.prompts is not None  # type: ignore[union-attr]
            prompts = await c.list_prompts()
            assert [p.name for p in prompts.prompts] == ["churn_report"]
            got = await c.get_prompt("churn_report", {"quarter": "Q3"})
            assert "Q3" in str(got.messages[0].content)
            res = await c.read_resource("db://schema")
            assert "churn_risk" in str(res.contents[0])
            with pytest.raises(MCPError):
                await c.list_resources()  # resources/list was not listed
        gw.served.run(gw.gw.drain())
    finally:
        gw.served.stop()
    methods = [e["data"]["method"] for e in services.audit.search(type="mcp.passthrough")]
    assert methods == ["prompts/list", "prompts/get", "resources/read"]
