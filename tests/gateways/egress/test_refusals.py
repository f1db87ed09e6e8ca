"""Refused egress, each recorded: outside the grants, a Cedar forbid, an escalation (and the
approved retry), internal addresses, names that do not resolve, destinations that refuse or
hang, an audit log that cannot write, and a gateway at capacity."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.gateways.egress.conftest import (
    WAIT,
    EchoServer,
    GatewayFactory,
    connect_head,
    entries,
    open_proxy,
    read_reply,
    send_raw,
    wait_entries,
)
from tether.events import MemoryRecorder
from tether.gateways.egress.addresses import StaticResolver
from tether.gateways.egress.gateway import ADDRESS_POLICY_ID, EgressListener
from tether.server.services import Services


async def test_destination_outside_the_grants_is_403_and_recorded(
    listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    reply = await send_raw(listener, connect_head("api.github.com:443", token))
    assert reply.status == 403
    assert reply.code == "not_granted"
    text = reply.body.decode()
    assert "api.github.com:443" in text
    assert "no egress grant matching" in text
    (rec,) = entries(services, "egress.connect")
    assert rec["decision"] == "deny"
    assert rec["subject"] == "api.github.com:443"
    assert any("no egress grant" in r for r in rec["data"]["decision"]["reasons"])
    assert rec["data"]["action"]["context"]["granted"] is False
    assert "addresses" not in rec["data"]  # a name no grant covers is never looked up
    assert entries(services, "egress.closed") == []


async def test_cedar_forbid_is_403_with_its_reason(
    listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    (services.data_dir.policies / "40-egress.cedar").write_text(
        '@id("no-localhost-name")\n@reason("use the address, not the name")\n'
        'forbid (principal, action == Tether::Action::"egress.connect", resource)\n'
        'when { resource.host == "localhost" };\n'
    )
    assert services.policy.reload()
    reply = await send_raw(listener, connect_head(f"localhost:{echo.port}", token))
    assert reply.status == 403
    assert reply.code == "policy_denied"
    assert "use the address, not the name" in reply.body.decode()
    # the same server by address is still allowed
    ok = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
    assert ok.status == 200
    denied = [e for e in entries(services, "egress.connect") if e["decision"] == "deny"]
    assert len(denied) == 1
    assert denied[0]["data"]["decision"]["policies"] == ["no-localhost-name"]
    assert echo.accepted == 1  # only the allowed one reached the server


async def test_cedar_sees_method_and_path_of_plain_http(
    listener: EgressListener, token: str, services: Services
) -> None:
    (services.data_dir.policies / "41-egress.cedar").write_text(
        '@id("read-only-web")\n@reason("plain http is read-only")\n'
        'forbid (principal, action == Tether::Action::"egress.connect", resource)\n'
        'when { context has method && context.method == "POST" };\n'
    )
    assert services.policy.reload()
    head = (
        "POST http://127.0.0.1:9/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
        f"Proxy-Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    reply = await send_raw(listener, head)
    assert reply.status == 403 and "read-only" in reply.body.decode()


async def test_escalation_is_403_with_the_approval_and_the_approved_retry_passes(
    listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    (services.data_dir.policies / "42-egress.cedar").write_text(
        '@id("egress-review")\n@escalate("1 of human")\n'
        'permit (principal, action == Tether::Action::"egress.connect", resource)\n'
        'when { context.granted && resource.host == "127.0.0.1" };\n'
    )
    assert services.policy.reload()
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
    assert reply.status == 403
    assert reply.code == "approval_pending"
    approval = reply.headers["x-tether-approval"]
    assert approval in reply.body.decode()
    assert echo.accepted == 0
    (rec,) = entries(services, "egress.connect")
    assert rec["decision"] == "escalate"
    assert rec["data"]["decision"]["approval"] == approval

    services.store.add_user("bob", "tether_uc_bob-egress", ["egress:*"], 0)
    bob = services.verifier.verify(services.authority.login("tether_uc_bob-egress").token)
    services.approvals.approve(approval, bob)
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    w.close()
    allowed = [e for e in entries(services, "egress.connect") if e["decision"] == "allow"]
    assert any(approval in reason for reason in allowed[0]["data"]["decision"]["reasons"])


async def test_escalation_held_until_approved_when_configured(
    make_gateway: GatewayFactory, token: str, echo: EchoServer, services: Services
) -> None:
    (services.data_dir.policies / "42-egress.cedar").write_text(
        '@id("egress-review")\n@escalate("1 of human")\n'
        'permit (principal, action == Tether::Action::"egress.connect", resource)\n'
        "when { context.granted };\n"
    )
    assert services.policy.reload()
    gw = make_gateway({"escalation_hold": "30s"})
    listener = await gw.serve_tcp()
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    services.store.add_user("bob", "tether_uc_bob-egress", ["egress:*"], 0)
    bob = services.verifier.verify(services.authority.login("tether_uc_bob-egress").token)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    pending = []
    while not pending and loop.time() < deadline:
        pending = services.approvals.list_requests(state="pending")
        await asyncio.sleep(0.02)
    assert pending, "no approval request was opened"
    services.approvals.approve(pending[0].id, bob)
    assert (await read_reply(r)).status == 200
    w.close()


# -- addresses ----------------------------------------------------------------------------------


async def test_internal_addresses_refused_by_default(
    make_gateway: GatewayFactory, token: str, echo: EchoServer, services: Services
) -> None:
    gw = make_gateway({"allow_private": []})
    listener = await gw.serve_tcp()
    for target in (f"127.0.0.1:{echo.port}", f"localhost:{echo.port}"):
        reply = await send_raw(listener, connect_head(target, token))
        assert reply.status == 403, target
        assert reply.code == "address_refused"
        assert "loopback" in reply.body.decode()
    assert echo.accepted == 0
    recs = entries(services, "egress.connect")
    assert [r["decision"] for r in recs] == ["deny", "deny"]
    assert all(ADDRESS_POLICY_ID in r["data"]["decision"]["policies"] for r in recs)
    assert recs[1]["data"]["addresses"] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("169.254.169.254", "metadata"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("100.64.1.1", "not a globally routable"),
        ("::ffff:127.0.0.1", "carrying 127.0.0.1"),
        ("fd00::1", "private"),
    ],
    ids=["metadata", "rfc1918-10", "rfc1918-192", "cgnat", "v4-mapped-loopback", "ula"],
)
async def test_granted_name_resolving_inside_is_refused(
    address: str,
    what: str,
    make_gateway: GatewayFactory,
    mint: Callable[..., str],
    services: Services,
) -> None:
    """DNS rebinding: a granted public-looking name that answers with an internal address."""
    gw = make_gateway(
        {"allow_private": []}, resolver=StaticResolver({"rebind.example.com": [address]})
    )
    listener = await gw.serve_tcp()
    token = mint(grants=["egress:*.example.com"])
    reply = await send_raw(listener, connect_head("rebind.example.com:443", token))
    assert reply.status == 403 and reply.code == "address_refused"
    assert what in reply.body.decode()
    (rec,) = entries(services, "egress.connect")
    assert rec["decision"] == "deny"


async def test_mixed_answer_dials_only_the_permitted_address(
    make_gateway: GatewayFactory, mint: Callable[..., str], echo: EchoServer, services: Services
) -> None:
    gw = make_gateway(
        {"allow_private": ["127.0.0.1/32"]},
        resolver=StaticResolver({"mixed.example.com": ["169.254.169.254", "127.0.0.1"]}),
    )
    listener = await gw.serve_tcp()
    token = mint(grants=["egress:mixed.example.com"])
    r, w = await open_proxy(listener)
    w.write(connect_head(f"mixed.example.com:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    w.write_eof()
    (closed,) = await wait_entries(services, "egress.closed")
    w.close()
    assert closed["data"]["address"] == "127.0.0.1"


async def test_name_that_does_not_resolve_is_502_and_recorded(
    listener: EgressListener, mint: Callable[..., str], services: Services
) -> None:
    token = mint(grants=["egress:*.invalid"])
    reply = await send_raw(listener, connect_head("no-such-host.invalid:443", token))
    assert reply.status == 502 and reply.code == "resolve_failed"
    assert "cannot resolve" in reply.body.decode()
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "resolve_failed"
    (opened,) = entries(services, "egress.connect")
    assert opened["decision"] == "allow" and "cannot resolve" in opened["data"]["error"]


async def test_destination_refusing_is_502_and_recorded(
    listener: EgressListener, token: str, closed_port: int, services: Services
) -> None:
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{closed_port}", token))
    assert reply.status == 502 and reply.code == "connect_failed"
    assert "refused" in reply.body.decode().lower()
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "connect_failed"
    assert closed["data"]["bytes_up"] == 0


async def test_destination_hanging_on_connect_times_out(
    make_gateway: GatewayFactory, token: str, blackhole: int, services: Services
) -> None:
    gw = make_gateway({"connect_timeout": "300ms"})
    listener = await gw.serve_tcp()
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{blackhole}", token))
    assert reply.status == 504 and reply.code == "connect_timeout"
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "connect_timeout"


async def test_plain_http_destination_closing_without_response_is_502(
    listener: EgressListener, token: str, services: Services
) -> None:
    async def rude(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        head = (
            f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        reply = await send_raw(listener, head)
    finally:
        server.close()
    assert reply.status == 502 and reply.code == "upstream_closed"
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "upstream_closed"


# -- fail closed ------------------------------------------------------------------------------


async def test_audit_log_down_means_nothing_flows(
    make_gateway: GatewayFactory, token: str, echo: EchoServer
) -> None:
    recorder = MemoryRecorder()
    recorder.fail = True
    gw = make_gateway(audit=recorder)
    listener = await gw.serve_tcp()
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token) + b"early bytes")
    reply = await read_reply(r)
    w.close()
    assert reply.status == 503 and reply.code == "audit_unavailable"
    assert echo.received == 0


async def test_at_capacity_new_connections_get_503(
    make_gateway: GatewayFactory, token: str, echo: EchoServer
) -> None:
    gw = make_gateway({"max_connections": 1})
    listener = await gw.serve_tcp()
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
    assert reply.status == 503 and reply.code == "over_capacity"
    w.close()
