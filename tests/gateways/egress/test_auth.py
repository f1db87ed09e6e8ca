"""Who is asking: Proxy-Authorization (Bearer or Basic) on a shared listener, the bound
identity on a beam's socket; 407 for missing, malformed, foreign, expired and revoked tokens;
and no token ever in the audit log, a log line or what the destination receives."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateways.egress.conftest import (
    WAIT,
    EchoServer,
    HttpServer,
    connect_head,
    entries,
    open_proxy,
    proxy_url,
    read_reply,
    send_raw,
    wait_entries,
)
from tether.clock import ManualClock
from tether.gateways.egress.config import parse_egress_config
from tether.gateways.egress.gateway import EgressGateway, EgressListener, recheck_with
from tether.server.services import Services, init_data_dir


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _head(target: str, auth: str | None) -> bytes:
    line = f"Proxy-Authorization: {auth}\r\n" if auth is not None else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{line}\r\n".encode()


@pytest.fixture
def foreign_token(tmp_path: Path) -> Iterator[str]:
    """A well-signed token from another trust domain."""
    root = tmp_path / "other-home"
    init_data_dir(root, "other.org")
    other = Services(root)
    try:
        cred = (root / "credentials" / "admin").read_text().strip()
        yield other.authority.login(cred).token
    finally:
        other.close()


@pytest.mark.parametrize(
    "auth",
    ["bearer", "basic-user-token", "basic-token-as-user"],
)
async def test_accepted_credential_forms(
    auth: str, listener: EgressListener, token: str, echo: EchoServer
) -> None:
    value = {
        "bearer": f"Bearer {token}",
        "basic-user-token": _basic("tether", token),
        "basic-token-as-user": _basic(token, ""),
    }[auth]
    r, w = await open_proxy(listener)
    w.write(_head(f"127.0.0.1:{echo.port}", value))
    assert (await read_reply(r)).status == 200
    w.close()


BAD_CREDENTIALS = {
    "missing": None,
    "empty-bearer": "Bearer ",
    "unknown-scheme": "Digest username=x",
    "basic-not-base64": "Basic %%%not-base64%%%",
    "basic-empty": _basic("", ""),
    "garbage-token": "Bearer not.a.jwt",
    "truncated-jwt": "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0",
}


@pytest.mark.parametrize("name", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
async def test_bad_credentials_get_407_with_a_challenge(
    name: str, listener: EgressListener, echo: EchoServer, services: Services
) -> None:
    reply = await send_raw(listener, _head(f"127.0.0.1:{echo.port}", BAD_CREDENTIALS[name]))
    assert reply.status == 407
    assert reply.code in ("proxy_auth_required", "invalid_token")
    assert "proxy-authenticate" in reply.headers
    assert reply.body.startswith(b"tether egress: ")
    assert echo.accepted == 0
    (rec,) = entries(services, "egress.refused")
    assert rec["decision"] == "deny" and rec["data"]["status"] == 407


async def test_foreign_trust_domain_token_is_407(
    listener: EgressListener, foreign_token: str, echo: EchoServer
) -> None:
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", foreign_token))
    assert reply.status == 407 and reply.code == "invalid_token"
    assert echo.accepted == 0


async def test_revoked_token_is_407(
    listener: EgressListener,
    token: str,
    admin_token: str,
    echo: EchoServer,
    services: Services,
) -> None:
    ok = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
    assert ok.status == 200
    admin = services.verifier.verify(admin_token)
    services.authority.revoke(admin, "token", services.verifier.verify(token).token_id)
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
    assert reply.status == 407 and "revoked" in reply.body.decode()


async def test_expired_token_is_407(tmp_path: Path, echo: EchoServer) -> None:
    root = tmp_path / "clocked"
    init_data_dir(root, "example.org")
    clock = ManualClock(time.time())
    svc = Services(root, clock=clock)
    gw = EgressGateway(
        parse_egress_config({"allow_private": ["127.0.0.1/32"]}),
        verify=svc.verifier.verify,
        core=svc.core,
        audit=svc.audit,
        recheck=recheck_with(svc.verifier),
    )
    try:
        listener = await gw.serve_tcp()
        admin = svc.verifier.verify(
            svc.authority.login((root / "credentials" / "admin").read_text().strip()).token
        )
        token = svc.authority.delegate(admin, "brief", ["egress:127.0.0.1"], ttl=60).token
        assert (
            await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
        ).status == 200
        clock.advance(3600)
        reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}", token))
        assert reply.status == 407 and "expired" in reply.body.decode()
    finally:
        await gw.aclose()
        svc.close()


async def test_bound_identity_revoked_is_refused(
    gateway: EgressGateway,
    mint: Callable[..., str],
    admin_token: str,
    echo: EchoServer,
    services: Services,
    short_dir: Path,
) -> None:
    beam_token = mint(name="beam-x")
    claims = services.verifier.verify(beam_token)
    listener = await gateway.serve_unix(short_dir / "b.sock", claims=claims)
    assert (await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}"))).status == 200
    services.authority.revoke(services.verifier.verify(admin_token), "token", claims.token_id)
    reply = await send_raw(listener, connect_head(f"127.0.0.1:{echo.port}"))
    assert reply.status == 407 and reply.code == "identity_invalid"
    refused = entries(services, "egress.refused")
    assert refused[-1]["actor"] == "spiffe://example.org/agent/beam-x"


async def test_no_token_in_records_logs_or_forwarded_requests(
    listener: EgressListener,
    mint: Callable[..., str],
    foreign_token: str,
    http_server: HttpServer,
    echo: EchoServer,
    services: Services,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint()
    denied_token = mint(name="narrow", grants=["egress:nowhere.example"])
    async with httpx.AsyncClient(proxy=proxy_url(listener, token)) as client:
        resp = await client.get(f"http://127.0.0.1:{http_server.port}/q")
        assert resp.status_code == 200
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token) + b"payload")
    assert (await read_reply(r)).status == 200
    w.write_eof()
    await asyncio.wait_for(r.read(), WAIT)
    w.close()
    for tok, expect in ((denied_token, 403), (foreign_token, 407)):
        assert (await send_raw(listener, connect_head("127.0.0.1:1", tok))).status == expect
    assert (
        await send_raw(listener, _head("127.0.0.1:1", _basic("tether", token + "x")))
    ).status == 407
    await wait_entries(services, "egress.closed", 2)

    log_bytes = b"\n".join(services.audit.iter_entries())
    secrets = (token, denied_token, foreign_token)
    for secret in secrets:
        # the signature alone is the secret part of a JWT; check it and the whole token
        for needle in (secret, secret.rsplit(".", 1)[1]):
            assert needle.encode() not in log_bytes
            assert needle not in caplog.text
            assert needle not in str(http_server.seen)
    assert entries(services, "egress.refused")  # the refusals were recorded, without tokens
