"""Allowed egress through real sockets with real clients: raw CONNECT tunnels, httpx over
HTTPS (CONNECT + TLS to a local server with a self-signed certificate), plain http:// in
absolute form, curl; and what the audit log says about each connection."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.gateways.egress.conftest import (
    TASK,
    WAIT,
    EchoServer,
    GatewayFactory,
    HttpServer,
    connect_head,
    entries,
    open_proxy,
    proxy_url,
    read_reply,
    wait_entries,
)
from tether.gateways.egress.gateway import EgressGateway, EgressListener
from tether.server.services import Services


async def test_connect_tunnel_relays_bytes_and_records_both_ends(
    listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    reply = await read_reply(r)
    assert reply.status == 200
    payload = os.urandom(300_000)
    w.write(payload)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(payload)), WAIT)
    assert got == payload
    w.write_eof()  # half-close: the echo server closes, and so does the tunnel
    assert await asyncio.wait_for(r.read(), WAIT) == b""
    w.close()

    (closed,) = await wait_entries(services, "egress.closed")
    (opened,) = entries(services, "egress.connect")
    assert opened["decision"] == "allow"
    assert opened["index"] < closed["index"]
    assert opened["subject"] == f"127.0.0.1:{echo.port}"
    assert opened["actor"] == "spiffe://example.org/agent/fetcher"
    assert opened["session"] == TASK
    assert opened["data"]["grant"] == "egress:127.0.0.1"
    assert opened["data"]["action"]["context"]["port"] == echo.port
    data = closed["data"]
    assert data["bytes_up"] == len(payload) and data["bytes_down"] == len(payload)
    assert data["ended"] == "client_closed"
    assert data["address"] == "127.0.0.1"
    assert data["connection_id"] == opened["data"]["connection_id"]
    assert isinstance(data["duration_us"], int) and data["duration_us"] >= 0


async def test_https_through_connect_with_httpx(
    listener: EgressListener, token: str, https_server: HttpServer, services: Services
) -> None:
    """An ordinary client with HTTPS_PROXY-style configuration: Basic credentials in the
    proxy URL, TLS end to end through the tunnel (the gateway sees only ciphertext)."""
    assert https_server.cafile is not None
    ctx = ssl.create_default_context(cafile=str(https_server.cafile))
    async with httpx.AsyncClient(proxy=proxy_url(listener, token), verify=ctx) as client:
        for i in range(3):  # keep-alive requests inside one tunnel
            resp = await client.get(f"https://localhost:{https_server.port}/report?n={i}")
            assert resp.status_code == 200
            assert resp.json()["path"] == f"/report?n={i}"
    (opened,) = entries(services, "egress.connect")
    assert opened["subject"] == f"localhost:{https_server.port}"
    assert opened["data"]["grant"] == "egress:localhost"
    assert opened["data"]["addresses"] == ["127.0.0.1"]
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["bytes_up"] > 0 and closed["data"]["bytes_down"] > 0
    # the tunnel carried TLS: no request path in clear anywhere in the records
    assert "/report" not in json.dumps([opened, closed])


async def test_plain_http_absolute_form_with_httpx(
    listener: EgressListener, token: str, http_server: HttpServer, services: Services
) -> None:
    async with httpx.AsyncClient(proxy=proxy_url(listener, token)) as client:
        resp = await client.get(
            f"http://localhost:{http_server.port}/v1/items?secret=s3cr3t",
            headers={"X-Keep": "yes"},
        )
        assert resp.status_code == 200
        seen = resp.json()
        post = await client.post(
            f"http://localhost:{http_server.port}/upload", content=b"A" * 10_000
        )

        async def chunks():  # no length: httpx sends it chunked
            for _ in range(5):
                yield b"chunk-data-"

        chunked = await client.post(f"http://localhost:{http_server.port}/stream", content=chunks())
    assert seen["method"] == "GET" and seen["path"] == "/v1/items?secret=s3cr3t"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"localhost:{http_server.port}"
    assert headers["x-keep"] == "yes"
    assert "proxy-authorization" not in headers  # the credential never travels on
    assert headers["connection"] == "close"
    assert post.json()["body"] == "A" * 10_000
    assert chunked.json()["body"] == "chunk-data-" * 5
    assert post.headers["connection"] == "close"

    opened = entries(services, "egress.connect")
    assert [e["data"]["mode"] for e in opened] == ["http", "http", "http"]
    first = opened[0]["data"]
    assert first["method"] == "GET" and first["path"] == "/v1/items"  # never the query
    assert first["action"]["context"]["path"] == "/v1/items"
    assert "s3cr3t" not in json.dumps(opened)
    closed = await wait_entries(services, "egress.closed", 3)
    assert {e["data"]["status"] for e in closed} == {200}
    assert all(e["data"]["ended"] == "upstream_closed" for e in closed)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_curl_through_the_gateway(
    scheme: str,
    listener: EgressListener,
    token: str,
    http_server: HttpServer,
    https_server: HttpServer,
    services: Services,
) -> None:
    server = https_server if scheme == "https" else http_server
    env = {"PATH": os.environ["PATH"], f"{scheme}_proxy": proxy_url(listener, token)}
    args = ["curl", "-sS", "--max-time", "20", f"{scheme}://localhost:{server.port}/via-curl"]
    if scheme == "https":
        args[1:1] = ["--cacert", str(server.cafile)]
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["path"] == "/via-curl"
    (opened,) = entries(services, "egress.connect")
    assert opened["decision"] == "allow"
    assert opened["data"]["mode"] == ("connect" if scheme == "https" else "http")


async def test_client_disconnect_mid_tunnel_is_recorded(
    listener: EgressListener, token: str, services: Services
) -> None:
    """The destination streams without end; the client reads a little and hangs up."""

    async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                w.write(b"x" * 65536)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(firehose, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await open_proxy(listener)
        w.write(connect_head(f"127.0.0.1:{port}", token))
        assert (await read_reply(r)).status == 200
        w.write(b"hello")
        await asyncio.wait_for(r.readexactly(100_000), WAIT)
        w.transport.abort()  # a hard disconnect
        (closed,) = await wait_entries(services, "egress.closed")
    finally:
        server.close()
    assert closed["data"]["ended"] in ("client_closed", "client_reset")
    assert closed["data"]["bytes_up"] == 5
    assert closed["data"]["bytes_down"] >= 100_000


async def test_idle_tunnel_is_cut_and_recorded(
    make_gateway: GatewayFactory, token: str, echo: EchoServer, services: Services
) -> None:
    gw = make_gateway({"idle_timeout": "200ms"})
    listener = await gw.serve_tcp()
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    assert await asyncio.wait_for(r.read(), WAIT) == b""  # the gateway hung up
    w.close()
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "idle_timeout"


async def test_closing_a_listener_cuts_its_tunnels(
    listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), WAIT) == b"ping"
    await listener.aclose()
    assert await asyncio.wait_for(r.read(), WAIT) == b""
    w.close()
    (closed,) = await wait_entries(services, "egress.closed")
    assert closed["data"]["ended"] == "gateway_closed"
    with pytest.raises(OSError):
        await open_proxy(listener)


async def test_beam_socket_with_bound_identity_needs_no_token(
    gateway: EgressGateway,
    mint: Callable[..., str],
    echo: EchoServer,
    services: Services,
    short_dir: Path,
) -> None:
    """The lifecycle's path: a per-beam unix socket bound to the beam's claims. A token
    sent anyway does not change who acts."""
    beam_claims = services.verifier.verify(mint(name="beam-agent"))
    other = mint(name="someone-else", grants=["egress:*"])
    listener = await gateway.serve_unix(short_dir / "egress.sock", claims=beam_claims)
    assert oct((short_dir / "egress.sock").stat().st_mode & 0o777) == "0o600"
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", other))
    assert (await read_reply(r)).status == 200
    w.write(b"abc")
    assert await asyncio.wait_for(r.readexactly(3), WAIT) == b"abc"
    w.close()
    (opened,) = entries(services, "egress.connect")
    assert opened["actor"] == "spiffe://example.org/agent/beam-agent"
    assert opened["data"]["listener"] == f"unix:{short_dir / 'egress.sock'}"
    await listener.aclose()
    assert not (short_dir / "egress.sock").exists()


async def test_handle_on_streams_the_caller_accepted(
    gateway: EgressGateway, mint: Callable[..., str], echo: EchoServer, services: Services
) -> None:
    """``gateway.handle(reader, writer, claims=...)`` for a lifecycle that runs its own
    server (e.g. the sandbox forwarder's socket)."""
    claims = services.verifier.verify(mint(name="beam-2"))

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await gateway.handle(r, w, claims=claims)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        w.write(connect_head(f"127.0.0.1:{echo.port}"))
        assert (await read_reply(r)).status == 200
        w.write(b"xyz")
        assert await asyncio.wait_for(r.readexactly(3), WAIT) == b"xyz"
        w.write_eof()
        (closed,) = await wait_entries(services, "egress.closed")
        w.close()
    finally:
        server.close()
    assert closed["actor"] == "spiffe://example.org/agent/beam-2"
    assert closed["data"]["listener"] == "streams"


async def test_dial_goes_to_the_address_that_was_checked(
    make_gateway: GatewayFactory, mint: Callable[..., str], echo: EchoServer, services: Services
) -> None:
    """A name no real DNS knows, resolved once by the gateway's resolver: reaching the echo
    server proves the dial used the checked address, not a second lookup of the name."""
    from tether.gateways.egress.addresses import StaticResolver

    gw = make_gateway(resolver=StaticResolver({"svc.internal.test": ["127.0.0.1"]}))
    listener = await gw.serve_tcp()
    token = mint(grants=["egress:*.internal.test"])
    r, w = await open_proxy(listener)
    w.write(connect_head(f"SVC.internal.test.:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    w.write(b"ok")
    assert await asyncio.wait_for(r.readexactly(2), WAIT) == b"ok"
    w.close()
    (opened,) = entries(services, "egress.connect")
    assert opened["subject"] == f"svc.internal.test:{echo.port}"  # normalised
    assert opened["data"]["grant"] == "egress:*.internal.test"


async def test_grant_with_port_allows_only_that_port(
    listener: EgressListener, mint: Callable[..., str], echo: EchoServer, closed_port: int
) -> None:
    token = mint(grants=[f"egress:127.0.0.1:{echo.port}"])
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{echo.port}", token))
    assert (await read_reply(r)).status == 200
    w.close()
    r, w = await open_proxy(listener)
    w.write(connect_head(f"127.0.0.1:{closed_port}", token))
    reply = await read_reply(r)
    w.close()
    assert reply.status == 403 and reply.code == "not_granted"
