"""The gateway on a real socket (uvicorn), in front of another app, built from the data
directory's config the way ``tether serve`` builds it; raw bytes on the wire for the requests
no HTTP client would send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tether.gateways.http import build_http_gateway, with_http_gateway
from tether.gateways.http.gateway import HTTPGateway
from tether.server.services import Services

from .conftest import SECRET, Upstream, serve_app, table_for


async def _other(scope: Any, receive: Any, send: Any) -> None:
    body = b'{"app": "other"}'
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def served(
    services: Services, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, HTTPGateway]]:
    monkeypatch.setenv("CRM_TOKEN", SECRET)
    monkeypatch.setenv("BILLING_PW", "pw-0000000000")
    monkeypatch.setenv("MAPS_KEY", "key-000000000")
    services.config.extra["http"] = table_for(upstream.base)
    gw = build_http_gateway(services)
    async with serve_app(with_http_gateway(_other, gw)) as base:
        yield base, gw
    await gw.aclose()


async def _raw(base: str, request: bytes) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()  # Connection: close
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


async def test_over_a_real_socket(
    served: tuple[str, HTTPGateway], upstream: Upstream, token: str
) -> None:
    base, _ = served
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.get("/http/crm/customers/42?x=1", headers=auth)
        assert r.status_code == 200
        assert r.json()["path"] == "/api/customers/42"
        assert upstream.seen[-1].header("authorization") == [f"Bearer {SECRET}"]
        r = await c.post("/http/crm/orders", headers=auth, json={"sku": 1})
        assert r.status_code == 200 and json.loads(r.json()["body"]) == {"sku": 1}
        denied = await c.delete("/http/crm/customers/42", headers=auth)
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "rule_denied"
        assert (await c.get("/anything-else")).json() == {"app": "other"}
        # a stream comes through as it is produced
        async with c.stream("GET", "/http/crm/stream", headers=auth) as s:
            it = s.aiter_raw()
            first = await it.__anext__()
            assert first == b"data: one\n\n"
            upstream.release.set()
            rest = b"".join([chunk async for chunk in it])
        assert rest == b"data: two\n\n"


RAW_TRICKS = {
    "dotdot": b"/http/crm/../admin",
    "encoded-dotdot": b"/http/crm/%2e%2e/admin",
    "encoded-slash": b"/http/crm/customers%2F..%2F..%2Fadmin",
    "double-encoded": b"/http/crm/%252e%252e/admin",
    "backslash": b"/http/crm/..\\admin",
}


@pytest.mark.parametrize("target", RAW_TRICKS.values(), ids=RAW_TRICKS.keys())
async def test_raw_traversal_on_the_wire(
    served: tuple[str, HTTPGateway], upstream: Upstream, token: str, target: bytes
) -> None:
    base, _ = served
    status, body = await _raw(
        base,
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 400, body
    assert json.loads(body)["error"]["type"] == "bad_path"
    assert upstream.seen == []


async def test_smuggling_attempt_on_the_wire(
    served: tuple[str, HTTPGateway], upstream: Upstream, token: str
) -> None:
    base, _ = served
    smuggled = b"GET /http/crm/admin HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _ = await _raw(
        base,
        b"POST /http/crm/notes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"0\r\n\r\n"
        + smuggled,
    )
    # the server or the gateway refuses the ambiguous framing; nothing reaches /admin
    assert status == 400
    assert all(s.path != "/api/admin" for s in upstream.seen)


async def test_build_from_services_uses_the_server_core(
    served: tuple[str, HTTPGateway], services: Services
) -> None:
    _, gw = served
    assert gw.core is services.core and gw.audit is services.audit
    assert sorted(gw.settings.services) == ["billing", "crm", "maps", "open"]
    assert SECRET not in repr(gw)


async def test_concurrent_requests_all_recorded(
    served: tuple[str, HTTPGateway], services: Services, mint: Callable[..., str]
) -> None:
    base, gw = served
    tok = mint(["http:crm/*"])
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        rs = await asyncio.gather(
            *(
                c.get(f"/http/crm/customers/{i}", headers={"Authorization": f"Bearer {tok}"})
                for i in range(20)
            )
        )
    assert [r.status_code for r in rs] == [200] * 20
    await gw.drain()
    evs = services.audit.search(type="http.request", limit=100)
    assert {e["data"]["path"] for e in evs} == {f"/customers/{i}" for i in range(20)}
    assert all(e["data"]["response"]["status"] == "ok" for e in evs)
