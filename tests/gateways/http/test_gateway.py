"""The HTTP gateway against a real upstream (uvicorn on a free port) with the server's real
decision core (Cedar defaults, boundaries.toml, approvals) and audit log: what is forwarded,
what is injected, what is refused, what is recorded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tether.events import MemoryRecorder
from tether.gateways.http.config import parse_http_config
from tether.gateways.http.gateway import HTTPGateway
from tether.policy.core import DecisionCore, GrantsAuthorizer
from tether.server.services import Services, init_data_dir

from .conftest import (
    BASIC_PASSWORD,
    ENV,
    HEADER_KEY,
    SECRET,
    Upstream,
    asgi_call,
    table_for,
)


def _events(services: Services, type_: str) -> list[dict[str, Any]]:
    return services.audit.search(type=type_, limit=1000)


def _last_response(services: Services) -> dict[str, Any]:
    """The latest recorded response: inside a safe request's one record, or a record of its
    own (unsafe or streamed requests)."""
    for e in reversed(services.audit.search(limit=10_000)):
        if e["type"] in ("http.request", "http.response") and "response" in e["data"]:
            return e
    raise AssertionError("no response recorded")


def _body_of(services: Services, entry: dict[str, Any], name: str) -> bytes:
    return services.audit.body(entry["bodies"][name])  # type: ignore[no-any-return]


async def _gw(services: Services, table: dict[str, Any], **kw: Any) -> HTTPGateway:
    return HTTPGateway(
        parse_http_config(table, env=ENV),
        verify=services.verifier.verify,
        core=kw.pop("core", services.core),
        audit=kw.pop("audit", services.audit),
    )


# -- the happy path ------------------------------------------------------------------------------


async def test_get_forwarded_with_credential_injected_and_recorded(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    r = await asgi_call(
        gateway,
        "GET",
        "/http/crm/customers/42",
        token=token,
        query=b"fields=name",
        headers=[
            (b"accept", b"application/json"),
            (b"user-agent", b"agent/1"),
            (b"x-forwarded-for", b"6.6.6.6"),  # an agent cannot say where it comes from
            (b"forwarded", b"for=6.6.6.6"),
        ],
    )
    assert r.status == 200, r.body
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.query) == ("GET", "/api/customers/42", b"fields=name")
    assert seen.header("authorization") == [f"Bearer {SECRET}"]  # the agent's token replaced
    assert token not in json.dumps([(n.decode(), v.decode()) for n, v in seen.headers])
    assert seen.header("accept") == ["application/json"]
    assert seen.header("user-agent") == ["agent/1"]
    assert seen.header("x-forwarded-for") == ["10.1.2.3"] and seen.header("forwarded") == []
    assert seen.header("x-forwarded-host") == ["tether.test"]
    assert seen.header("x-forwarded-prefix") == ["/http/crm"]
    rid = r.header("x-tether-request-id")
    assert rid and seen.header("x-tether-request-id") == [rid]
    # the upstream echoed its headers: the agent sees the credential masked, never in clear
    assert SECRET not in r.body.decode() and "*" * len(SECRET) in r.body.decode()
    await gateway.drain()
    # a GET and its whole response: one record, durable before the agent saw a byte
    [req] = _events(services, "http.request")
    assert _events(services, "http.response") == []
    assert req["decision"] == "allow" and req["subject"] == "crm/customers/42"
    assert req["data"]["action"]["context"] == {"method": "GET", "path": "/customers/42"}
    assert req["data"]["headers"]["authorization"] == "[REDACTED]"
    assert req["data"]["request_id"] == rid and req["data"]["rule"] == 1
    resp = req["data"]["response"]
    assert resp["status"] == "ok" and resp["upstream_status"] == 200
    assert resp["bytes"] == len(r.body)
    recorded = _body_of(services, req, "response")
    assert b'"path": "/api/customers/42"' in recorded
    assert b'"authorization": "[REDACTED]"' in recorded  # the log redacts by key, too


@pytest.mark.parametrize(
    "service,header,value",
    [
        ("crm", "authorization", f"Bearer {SECRET}"),
        (
            "billing",
            "authorization",
            "Basic " + base64.b64encode(f"svc:{BASIC_PASSWORD}".encode()).decode(),
        ),
        ("maps", "x-api-key", HEADER_KEY),
    ],
    ids=["bearer", "basic", "header"],
)
async def test_each_credential_kind_injected_and_never_shown(
    gateway: HTTPGateway,
    upstream: Upstream,
    token: str,
    services: Services,
    service: str,
    header: str,
    value: str,
) -> None:
    r = await asgi_call(
        gateway,
        "GET",
        f"/http/{service}/customers",
        token=token,
        # an agent cannot supply its own (a second Authorization header is refused outright)
        headers=[] if header == "authorization" else [(header.encode(), b"agent-forged-value")],
    )
    assert r.status == 200
    assert upstream.seen[-1].header(header) == [value]
    for needle in {value, value.split(" ")[-1], BASIC_PASSWORD, HEADER_KEY, SECRET}:
        assert needle not in r.body.decode()
        assert all(needle not in v.decode() for _, v in r.headers)


async def test_service_without_credential(
    gateway: HTTPGateway, upstream: Upstream, token: str
) -> None:
    r = await asgi_call(
        gateway, "GET", "/http/open/x", token=token, headers=[(b"authorization-extra", b"1")]
    )
    assert r.status == 200
    assert upstream.seen[-1].header("authorization") == []


async def test_post_body_forwarded_and_recorded_capped_with_secrets_redacted(
    services: Services, upstream: Upstream, token: str
) -> None:
    gw = await _gw(services, table_for(upstream.base, record_body_bytes=256))
    body = json.dumps({"note": "call back", "password": "hunter2-hunter2", "pad": "z" * 2000})
    r = await asgi_call(
        gw,
        "POST",
        "/http/crm/notes",
        token=token,
        body=body.encode(),
        headers=[(b"content-type", b"application/json")],
    )
    await gw.aclose()
    assert r.status == 200
    assert upstream.seen[-1].body == body.encode()  # the upstream gets the agent's data as is
    req = _events(services, "http.request")[-1]
    assert req["data"]["request_bytes"] == len(body)
    assert req["data"]["request_truncated"] is True
    recorded = _body_of(services, req, "request")
    assert len(recorded) <= 256 + 20 and b"hunter2" not in recorded
    assert b"[REDACTED]" in recorded
    resp = _events(services, "http.response")[-1]  # a POST: its response has its own record
    assert resp["data"]["response"]["truncated"] is True
    assert len(_body_of(services, resp, "response")) <= 256 + 20


async def test_redirect_location_points_back_through_the_gateway(
    gateway: HTTPGateway, token: str
) -> None:
    r = await asgi_call(gateway, "GET", "/http/crm/redirect", token=token)
    assert r.status == 302
    assert r.header("location") == "/http/crm/customers/1"


async def test_head_has_no_body(gateway: HTTPGateway, upstream: Upstream, token: str) -> None:
    r = await asgi_call(gateway, "HEAD", "/http/crm/customers/1", token=token)
    assert r.status == 200 and r.body == b"" and r.complete
    assert upstream.seen[-1].method == "HEAD"


async def test_upstream_error_status_is_relayed_not_rewritten(
    gateway: HTTPGateway, token: str
) -> None:
    r = await asgi_call(gateway, "GET", "/http/crm/status/503", token=token)
    assert r.status == 503 and r.json()["method"] == "GET"


# -- cookies -------------------------------------------------------------------------------------


async def test_cookies_dropped_both_ways_by_default(
    gateway: HTTPGateway, upstream: Upstream, token: str
) -> None:
    r = await asgi_call(
        gateway, "GET", "/http/crm/cookie", token=token, headers=[(b"cookie", b"sid=agent")]
    )
    assert r.status == 200
    assert upstream.seen[-1].header("cookie") == []
    assert r.header("set-cookie") is None


async def test_cookies_pass_when_the_service_says_so(
    services: Services, upstream: Upstream, token: str
) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"forward_cookies": True}))
    r = await asgi_call(
        gw, "GET", "/http/crm/cookie", token=token, headers=[(b"cookie", b"sid=agent")]
    )
    await gw.aclose()
    assert upstream.seen[-1].header("cookie") == ["sid=agent"]
    assert r.header("set-cookie") == "session=upstream-session-abc; HttpOnly"
    resp = _last_response(services)
    assert resp["data"]["response"]["headers"]["set-cookie"] == "[REDACTED]"


# -- refusals: authentication, unknown service, method, size -------------------------------------


def _foreign_token(tmp_path: Path) -> str:
    other = tmp_path / "other"
    init_data_dir(other, "other.org")
    s = Services(other)
    try:
        cred = (other / "credentials" / "admin").read_text().strip()
        admin = s.verifier.verify(s.authority.login(cred).token)
        return s.authority.delegate(admin, "bot", ["http:*"]).token
    finally:
        s.close()


async def test_unauthenticated_requests_refused_and_recorded(
    gateway: HTTPGateway,
    upstream: Upstream,
    services: Services,
    tmp_path: Path,
    token: str,
    admin_token: str,
) -> None:
    revoked = services.authority.delegate(
        services.verifier.verify(admin_token), "gone", ["http:crm/*"]
    ).token
    services.authority.revoke(
        services.verifier.verify(admin_token), "agent", "spiffe://example.org/agent/gone"
    )
    bad: dict[str, list[tuple[bytes, bytes]]] = {
        "missing": [],
        "basic-scheme": [(b"authorization", b"Basic " + base64.b64encode(b"a:b"))],
        "garbage-token": [(b"authorization", b"Bearer not-a-jwt")],
        "tampered": [(b"authorization", b"Bearer " + token[:-4].encode() + b"AAAA")],
        "foreign-trust-domain": [
            (b"authorization", b"Bearer " + _foreign_token(tmp_path).encode())
        ],
        "revoked": [(b"authorization", b"Bearer " + revoked.encode())],
    }
    for name, headers in bad.items():
        r = await asgi_call(gateway, "GET", "/http/crm/customers", headers=headers)
        assert r.status == 401, name
        err = r.json()["error"]
        assert err["type"] == "unauthenticated", name
        assert r.header("www-authenticate")
    assert upstream.seen == []
    refused = _events(services, "http.refused")
    assert len(refused) == len(bad)
    assert all(e["data"]["status"] == 401 for e in refused)
    # the refused token is not in the record (only a redaction marker may be)
    assert token[:-4] not in json.dumps(refused)


async def test_unknown_service_404_after_auth(
    gateway: HTTPGateway, token: str, services: Services
) -> None:
    r = await asgi_call(gateway, "GET", "/http/nope/x", token=token)
    assert r.status == 404 and r.json()["error"]["type"] == "unknown_service"
    r = await asgi_call(gateway, "GET", "/http/nope/x")  # no token: nothing revealed
    assert r.status == 401


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "FOO"])
async def test_method_not_forwarded(
    gateway: HTTPGateway, upstream: Upstream, token: str, method: str
) -> None:
    r = await asgi_call(gateway, method, "/http/crm/customers", token=token)
    assert r.status == 405 and upstream.seen == []


async def test_body_too_large(services: Services, upstream: Upstream, token: str) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"max_body_bytes": 1000}))
    declared = await asgi_call(gw, "POST", "/http/crm/notes", token=token, body=b"x" * 1001)
    streamed = await asgi_call(
        gw, "POST", "/http/crm/notes", token=token, chunks=[b"x" * 600, b"x" * 600]
    )
    ok = await asgi_call(gw, "POST", "/http/crm/notes", token=token, body=b"x" * 1000)
    await gw.aclose()
    assert declared.status == 413 and streamed.status == 413
    assert declared.json()["error"]["type"] == "request_too_large"
    assert ok.status == 200
    assert len(upstream.seen) == 1


# -- bad input through a raw ASGI scope ----------------------------------------------------------

TRAVERSALS = {
    "dotdot": b"/http/crm/../admin",
    "dotdot-deep": b"/http/crm/customers/../../billing/x",
    "encoded-dotdot": b"/http/crm/%2e%2e/admin",
    "encoded-slash": b"/http/crm/customers%2f..%2f..%2fadmin",
    "double-encoded": b"/http/crm/%252e%252e/admin",
    "backslash": b"/http/crm/..\\admin",
    "encoded-backslash": b"/http/crm/..%5cadmin",
    "dotdot-semicolon": b"/http/crm/..;/admin",
    "encoded-crlf": b"/http/crm/x%0d%0aX-Api-Key:%20forged",
    "encoded-nul": b"/http/crm/customers%00.json",
}


@pytest.mark.parametrize("raw", TRAVERSALS.values(), ids=TRAVERSALS.keys())
async def test_path_tricks_refused_nothing_forwarded_attempt_recorded(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services, raw: bytes
) -> None:
    r = await asgi_call(gateway, "GET", raw, token=token)
    assert r.status == 400, r.body
    assert r.json()["error"]["type"] == "bad_path"
    assert upstream.seen == []
    ev = _events(services, "http.refused")[-1]
    assert ev["data"]["error"] == "bad_path" and ev["actor"].endswith("/agent/bot")


async def test_dotdot_inside_the_service_is_resolved_before_rules(
    gateway: HTTPGateway, upstream: Upstream, token: str
) -> None:
    # /orders/../customers/1 is /customers/1: the GET rule decides, and that is what goes up
    r = await asgi_call(gateway, "GET", "/http/crm/orders/../customers/1", token=token)
    assert r.status == 200
    assert upstream.seen[-1].raw_path == b"/api/customers/1"
    # and the reverse cannot sneak a path past a rule
    r = await asgi_call(gateway, "GET", "/http/crm/customers/../admin", token=token)
    assert r.status == 403 and r.json()["error"]["type"] == "rule_denied"
    assert len(upstream.seen) == 1


HEADER_TRICKS: dict[str, tuple[list[tuple[bytes, bytes]], int]] = {
    "crlf-in-value": ([(b"x-note", b"a\r\nX-Api-Key: forged")], 400),
    "lf-in-value": ([(b"x-note", b"a\nX-Api-Key: forged")], 400),
    "nul-in-value": ([(b"x-note", b"a\x00b")], 400),
    "bad-name": ([(b"x note", b"1")], 400),
    "te-smuggling": ([(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], 400),
    "te-obfuscated": ([(b"transfer-encoding", b"chunked, identity")], 400),
    "two-content-lengths": ([(b"content-length", b"3"), (b"content-length", b"30")], 400),
    "oversized": ([(b"x-big", b"a" * 40000)], 431),
    "too-many": ([(f"x-h{i}".encode(), b"1") for i in range(120)], 431),
}


@pytest.mark.parametrize("headers,status", HEADER_TRICKS.values(), ids=HEADER_TRICKS.keys())
async def test_header_tricks_refused(
    gateway: HTTPGateway,
    upstream: Upstream,
    token: str,
    services: Services,
    headers: list[tuple[bytes, bytes]],
    status: int,
) -> None:
    r = await asgi_call(
        gateway, "POST", "/http/crm/notes", token=token, headers=headers, body=b"abc"
    )
    assert r.status == status, r.body
    assert upstream.seen == []
    assert b"forged" not in r.body
    assert _events(services, "http.refused")[-1]["data"]["status"] == status


async def test_connection_header_cannot_drop_the_injected_credential(
    gateway: HTTPGateway, upstream: Upstream, token: str
) -> None:
    r = await asgi_call(
        gateway,
        "GET",
        "/http/maps/x",
        token=token,
        headers=[
            (b"connection", b"close, X-Api-Key, Authorization"),
            (b"x-api-key", b"forged"),
            (b"keep-alive", b"timeout=1"),
            (b"upgrade", b"websocket"),
        ],
    )
    assert r.status == 200
    seen = upstream.seen[-1]
    assert seen.header("x-api-key") == [HEADER_KEY]
    assert seen.header("upgrade") == [] and seen.header("keep-alive") == []
    assert all(v != "close, X-Api-Key, Authorization" for v in seen.header("connection"))


async def test_a_repeated_request_header_reaches_the_upstream_as_one_field(
    services: Services, upstream: Upstream, token: str
) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"forward_cookies": True}))
    r = await asgi_call(
        gw,
        "GET",
        "/http/crm/customers/1",
        token=token,
        headers=[
            (b"x-trace", b"a"),
            (b"accept", b"text/plain"),
            (b"x-trace", b"b"),
            (b"cookie", b"sid=1"),
            (b"cookie", b"theme=dark"),
        ],
    )
    await gw.aclose()
    assert r.status == 200
    seen = upstream.seen[-1]
    # values in the order sent (RFC 9110 5.3); cookies joined as one Cookie header
    assert seen.header("x-trace") == ["a, b"]
    assert seen.header("accept") == ["text/plain"]
    assert seen.header("cookie") == ["sid=1; theme=dark"]


async def test_websocket_refused(gateway: HTTPGateway) -> None:
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    await gateway({"type": "websocket", "path": "/http/crm/ws", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- decisions: rules, grants, Cedar, limits, approvals ------------------------------------------


async def test_rules_gate_method_and_path(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    denied = [
        ("DELETE", "/http/crm/customers/1"),
        ("POST", "/http/crm/customers/1"),
        ("GET", "/http/crm/admin"),
        ("GET", "/http/crm/orders"),
    ]
    for method, path in denied:
        r = await asgi_call(gateway, method, path, token=token)
        assert r.status == 403, (method, path)
        err = r.json()["error"]
        assert err["type"] == "rule_denied"
        assert "no rule of service 'crm' allows" in err["message"]
    assert upstream.seen == []
    evs = _events(services, "http.request")
    assert len(evs) == len(denied)
    assert all(e["decision"] == "deny" for e in evs)
    assert evs[0]["data"]["decision"]["policies"] == ["http.rules:crm"]


async def test_grants_decide_which_paths(
    gateway: HTTPGateway, upstream: Upstream, mint: Callable[..., str]
) -> None:
    narrow = mint(["http:crm/customers/*"])
    ok = await asgi_call(gateway, "GET", "/http/crm/customers/7", token=narrow)
    no = await asgi_call(gateway, "POST", "/http/crm/notes", token=narrow, body=b"{}")
    other = await asgi_call(gateway, "GET", "/http/maps/x", token=narrow)
    assert ok.status == 200
    assert no.status == 403 and no.json()["error"]["type"] == "not_granted"
    assert other.status == 403 and other.json()["error"]["type"] == "not_granted"
    assert len(upstream.seen) == 1


async def test_cedar_policy_sees_method_and_path(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    (services.data_dir.policies / "50-http.cedar").write_text(
        '@id("crm-read-only-for-agents")\n@reason("agents only read the CRM")\n'
        'forbid (principal is Tether::Agent, action == Tether::Action::"http.request", resource)\n'
        'when { resource.service == "crm" && context has method && context.method != "GET" };\n'
    )
    assert services.policy.reload()
    r = await asgi_call(gateway, "POST", "/http/crm/notes", token=token, body=b"{}")
    assert r.status == 403
    err = r.json()["error"]
    assert err["type"] == "policy_denied" and "agents only read the CRM" in err["message"]
    assert (await asgi_call(gateway, "GET", "/http/crm/customers/1", token=token)).status == 200
    assert [s.method for s in upstream.seen] == ["GET"]


BOUNDARIES = """
[groups.crm-agents]
labels = ["crm-agent"]

[effects]
"crm.write" = []

[limits.crm-writes]
group = "crm-agents"
kind = "budget"
unit = "crm.write"
amount = 2
window = "1h"
"""


async def test_rule_effects_are_counted_by_group_limits(
    gateway: HTTPGateway, upstream: Upstream, mint: Callable[..., str], services: Services
) -> None:
    (services.data_dir.policies / "boundaries.toml").write_text(BOUNDARIES)
    assert services.boundaries.check()
    a = mint(name="writer-a", labels=["crm-agent"])
    b = mint(name="writer-b", labels=["crm-agent"])
    statuses = []
    for tok in (a, b, a, b):
        r = await asgi_call(gateway, "POST", "/http/crm/orders", token=tok, body=b'{"sku": 1}')
        statuses.append(r.status)
    assert statuses == [200, 200, 403, 403]
    assert len([s for s in upstream.seen if s.path == "/api/orders"]) == 2
    # reads carry no effect and still pass
    assert (await asgi_call(gateway, "GET", "/http/crm/customers/1", token=a)).status == 200
    await gateway.drain()
    denied = [e for e in _events(services, "http.request") if e["decision"] == "deny"]
    assert "limit:crm-writes" in denied[-1]["data"]["decision"]["policies"]


ESCALATE = (
    '@id("orders-need-a-human")\n@escalate("1 of human")\n'
    'permit (principal, action == Tether::Action::"http.request", resource)\n'
    'when { context.granted && context has effects && context.effects.contains("crm.write") };\n'
)


def _approver(services: Services) -> Any:
    services.store.add_user("bob", "tether_uc_bob-credential-0123456789", ["http:*"], 0)
    return services.verifier.verify(
        services.authority.login("tether_uc_bob-credential-0123456789").token
    )


async def test_escalation_returns_the_approval_then_the_approved_retry_goes_through(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    (services.data_dir.policies / "60-orders.cedar").write_text(ESCALATE)
    assert services.policy.reload()
    order = b'{"sku": "A-1", "qty": 3}'
    r = await asgi_call(gateway, "POST", "/http/crm/orders", token=token, body=order)
    assert r.status == 403
    err = r.json()["error"]
    assert err["type"] == "approval_required" and err["quorum"] == "1 of human"
    assert upstream.seen == []
    services.approvals.approve(err["approval"], _approver(services))
    # the approval binds to this exact body: another order is not approved by it
    other = await asgi_call(
        gateway, "POST", "/http/crm/orders", token=token, body=b'{"sku": "A-1", "qty": 300}'
    )
    assert other.status == 403 and other.json()["error"]["approval"] != err["approval"]
    ok = await asgi_call(gateway, "POST", "/http/crm/orders", token=token, body=order)
    assert ok.status == 200
    again = await asgi_call(gateway, "POST", "/http/crm/orders", token=token, body=order)
    assert again.status == 403  # used once
    assert [s.body for s in upstream.seen] == [order]


async def test_escalation_hold_waits_for_the_approval(
    services: Services, upstream: Upstream, token: str
) -> None:
    (services.data_dir.policies / "60-orders.cedar").write_text(ESCALATE)
    assert services.policy.reload()
    gw = await _gw(services, table_for(upstream.base, crm={"escalation_hold": "60s"}))
    bob = _approver(services)
    task = asyncio.ensure_future(
        asgi_call(gw, "POST", "/http/crm/orders", token=token, body=b'{"sku": 9}')
    )
    async with asyncio.timeout(30):
        while not services.approvals.list_requests():
            await asyncio.sleep(0.01)
    assert not task.done() and upstream.seen == []
    services.approvals.approve(services.approvals.list_requests()[0].id, bob)
    async with asyncio.timeout(30):
        r = await task
    await gw.aclose()
    assert r.status == 200
    assert [s.path for s in upstream.seen] == ["/api/orders"]


# -- failing upstreams ---------------------------------------------------------------------------


async def test_upstream_that_hangs_is_a_504(
    services: Services, upstream: Upstream, token: str
) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"timeout": "0.3s"}))
    r = await asgi_call(gw, "GET", "/http/crm/hang", token=token)
    await gw.aclose()
    assert r.status == 504 and r.json()["error"]["type"] == "upstream_timeout"
    assert _last_response(services)["data"]["response"]["status"] == "upstream_timeout"


async def test_upstream_that_hangs_mid_body_cuts_the_response(
    services: Services, upstream: Upstream, token: str
) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"timeout": "0.3s"}))
    r = await asgi_call(gw, "GET", "/http/crm/hang-mid", token=token)
    await gw.aclose()
    assert r.status == 200 and r.body == b"partial"
    assert not r.complete  # never a body that looks whole
    assert _last_response(services)["data"]["response"]["status"] == "upstream_timeout"


async def test_no_free_connection_is_a_504_and_nothing_is_forwarded(
    services: Services, upstream: Upstream, token: str
) -> None:
    # One connection per service: while it hangs, the next request waits for it at most
    # connect_timeout, then is refused without a byte reaching the upstream.
    table = table_for(upstream.base, crm={"connect_timeout": "0.2s"}, max_connections=1)
    gw = await _gw(services, table)
    hang = asyncio.ensure_future(asgi_call(gw, "GET", "/http/crm/hang", token=token))
    try:
        async with asyncio.timeout(30):
            while not upstream.seen:
                await asyncio.sleep(0.01)
            r = await asgi_call(gw, "GET", "/http/crm/customers/7", token=token)
    finally:
        hang.cancel()
        with contextlib.suppress(BaseException):
            await hang
        await gw.aclose()
    assert r.status == 504 and r.json()["error"]["type"] == "upstream_timeout"
    assert "no connection" in r.json()["error"]["message"]
    assert [s.path for s in upstream.seen] == ["/api/hang"]
    [refused] = [
        e for e in _events(services, "http.request") if e["data"].get("path") == "/customers/7"
    ]
    assert refused["data"]["response"]["status"] == "upstream_timeout"


async def _garbage_server(reply: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "reply,kind",
    [
        (b"this is not http\r\n\r\n", "upstream_garbage"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "upstream_garbage"),
        (b"", "upstream_disconnected"),
    ],
    ids=["not-http", "bad-content-length", "closes-at-once"],
)
async def test_upstream_garbage_is_a_502(
    services: Services, mint: Callable[..., str], reply: bytes, kind: str
) -> None:
    server, port = await _garbage_server(reply)
    gw = await _gw(services, {"services": {"bad": {"base_url": f"http://127.0.0.1:{port}"}}})
    try:
        r = await asgi_call(gw, "GET", "/http/bad/x", token=mint(["http:bad/*"]))
    finally:
        await gw.aclose()
        server.close()
    assert r.status == 502, r.body
    assert r.json()["error"]["type"] == kind
    assert _last_response(services)["data"]["response"]["status"] == kind


async def test_unreachable_upstream_is_a_502_and_releases_the_limit(
    services: Services, mint: Callable[..., str]
) -> None:
    gw = await _gw(services, {"services": {"crm": {"base_url": "http://127.0.0.1:9"}}})
    r = await asgi_call(gw, "GET", "/http/crm/x", token=mint(["http:*"]))
    await gw.aclose()
    assert r.status == 502 and r.json()["error"]["type"] == "upstream_unreachable"
    assert _last_response(services)["data"]["response"]["status"] == "upstream_unreachable"


async def test_response_over_the_cap(services: Services, upstream: Upstream, token: str) -> None:
    gw = await _gw(services, table_for(upstream.base, crm={"max_response_bytes": 1000}))
    declared = await asgi_call(gw, "GET", "/http/crm/big/5000", token=token)
    streamed = await asgi_call(gw, "GET", "/http/crm/chunked-big", token=token)
    fits = await asgi_call(gw, "GET", "/http/crm/big/1000", token=token)
    await gw.aclose()
    assert declared.status == 502 and declared.json()["error"]["type"] == "response_too_large"
    assert streamed.status == 200 and not streamed.complete and len(streamed.body) <= 1000
    assert fits.status == 200 and len(fits.body) == 1000


# -- streaming -----------------------------------------------------------------------------------


async def test_stream_forwarded_as_it_arrives(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    got: list[bytes] = []

    def on_body(chunk: bytes) -> None:
        got.append(chunk)
        if chunk == b"data: one\n\n":
            # the upstream holds its second event until the agent has seen the first
            upstream.release.set()

    async with asyncio.timeout(30):
        r = await asgi_call(gateway, "GET", "/http/crm/stream", token=token, on_body=on_body)
    assert r.status == 200 and r.complete
    assert r.body == b"data: one\n\ndata: two\n\n"
    assert r.header("content-type") == "text/event-stream"
    await gateway.drain()
    resp = _events(services, "http.response")[-1]  # streamed: request, then response records
    assert resp["data"]["response"]["status"] == "ok"
    assert _body_of(services, resp, "response") == r.body


async def test_client_leaving_mid_stream_is_recorded(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    gone = asyncio.Event()

    def on_body(chunk: bytes) -> None:
        gone.set()  # the agent hangs up after the first event

    async with asyncio.timeout(30):
        r = await asgi_call(
            gateway, "GET", "/http/crm/stream", token=token, on_body=on_body, gone=gone
        )
    assert r.body == b"data: one\n\n" and not r.complete
    await gateway.drain()
    assert _last_response(services)["data"]["response"]["status"] == "client_disconnected"


async def test_response_records_are_written_without_anyone_draining(
    gateway: HTTPGateway, token: str, services: Services
) -> None:
    r = await asgi_call(gateway, "POST", "/http/crm/notes", token=token, body=b"{}")
    assert r.status == 200
    async with asyncio.timeout(30):  # batched with the next commit, or flushed by a timer
        while not _events(services, "http.response"):
            await asyncio.sleep(0.01)
    [resp] = _events(services, "http.response")
    assert resp["data"]["request_id"] == r.header("x-tether-request-id")


async def test_large_body_streamed_through(gateway: HTTPGateway, token: str) -> None:
    r = await asgi_call(gateway, "GET", "/http/crm/chunked-big", token=token)
    assert r.status == 200 and r.complete and r.body == b"y" * 65536 * 8


# -- fail closed ---------------------------------------------------------------------------------


async def test_no_record_no_forward(services: Services, upstream: Upstream, token: str) -> None:
    audit = MemoryRecorder()
    audit.fail = True
    gw = await _gw(services, table_for(upstream.base), audit=audit)
    post = await asgi_call(gw, "POST", "/http/crm/notes", token=token, body=b"{}")
    get = await asgi_call(gw, "GET", "/http/crm/customers/1", token=token)
    await gw.aclose()
    assert post.status == 503 and post.json()["error"]["type"] == "audit_unavailable"
    # the POST's side effect never happened; the GET (no side effect) went up, but the agent
    # sees nothing of its answer
    assert [s.method for s in upstream.seen] == ["GET"]
    assert get.status == 503 and get.json()["error"]["type"] == "audit_unavailable"
    assert b"customers" not in get.body


async def test_a_failing_decision_check_denies(
    services: Services, upstream: Upstream, token: str
) -> None:
    class Broken(GrantsAuthorizer):
        def authorize(self, action: Any, groups: Any) -> Any:
            raise RuntimeError("policy store down")

    gw = await _gw(services, table_for(upstream.base), core=DecisionCore(Broken()))
    r = await asgi_call(gw, "GET", "/http/crm/customers/1", token=token)
    await gw.aclose()
    assert r.status == 403 and "fail closed" in r.json()["error"]["message"]
    assert upstream.seen == []


# -- secrets never leak --------------------------------------------------------------------------


async def test_no_credential_in_any_record_error_or_repr(
    gateway: HTTPGateway, upstream: Upstream, token: str, services: Services
) -> None:
    for service in ("crm", "billing", "maps"):
        await asgi_call(gateway, "GET", f"/http/{service}/customers/1", token=token)
        await asgi_call(gateway, "GET", f"/http/{service}/nope/../../x", token=token)
        await asgi_call(gateway, "POST", f"/http/{service}/notes", token=token, body=b"{}")
    await gateway.drain()
    everything = json.dumps(services.audit.search(limit=10_000))
    bodies = b"".join(
        services.audit.body(d)
        for e in services.audit.search(limit=10_000)
        for d in e.get("bodies", {}).values()
    )
    basic = base64.b64encode(f"svc:{BASIC_PASSWORD}".encode()).decode()
    for secret in (SECRET, BASIC_PASSWORD, HEADER_KEY, basic):
        assert secret not in everything
        assert secret.encode() not in bodies
        assert secret not in repr(gateway) + repr(gateway.settings)
    assert token not in everything  # the agent's own token is not recorded either
