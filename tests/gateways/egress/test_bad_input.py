"""Bad input over a real socket, each kind a named fixture: the answer is a plain-text refusal
with a status and a stable code (never a crash or a hang), nothing reaches a destination, and
the attempt is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TRUST_DOMAIN
from tests.gateways.egress.conftest import (
    WAIT,
    EchoServer,
    GatewayFactory,
    entries,
    open_proxy,
    read_reply,
    send_raw,
    wait_entries,
)
from tether.gateways.egress.gateway import EgressListener
from tether.server.services import Services, init_data_dir

AUTH = "Proxy-Authorization: Bearer {token}\r\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for this module's many small cases (each checks only its own
    record), so the suite does not pay for a new trust domain per bad input."""
    root = tmp_path_factory.mktemp("egress-bad-input") / "tether-home"
    init_data_dir(root, TRUST_DOMAIN)
    return root


@pytest.fixture(scope="module")
def services(home: Path) -> Iterator[Services]:
    svc = Services(home)
    try:
        yield svc
    finally:
        svc.close()


def refusals(services: Services) -> list[dict[str, Any]]:
    return entries(services, "egress.refused")


# name -> (request head with {token} and {port}, expected status, expected code)
BAD_REQUESTS: dict[str, tuple[str, int, str]] = {
    "request-line-garbage": ("GARBAGE\r\n\r\n", 400, "bad_request"),
    "request-line-two-parts": ("CONNECT 127.0.0.1:443\r\n\r\n", 400, "bad_request"),
    "request-line-four-parts": ("CONNECT a:1 HTTP/1.1 extra\r\n\r\n", 400, "bad_request"),
    "request-line-double-space": ("CONNECT  a:1 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "request-line-empty": ("\r\n", 400, "bad_request"),
    "method-invalid": ("CON(NECT a:1 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "version-garbage": ("CONNECT a:1 HTTX/1.1\r\n\r\n", 400, "bad_request"),
    "version-2": ("CONNECT a:1 HTTP/2.0\r\n\r\n", 505, "bad_version"),
    "bare-lf": ("CONNECT a:1 HTTP/1.1\n\n", 400, "bad_request"),
    "missing-host": ("CONNECT :443 HTTP/1.1\r\n" + AUTH + "\r\n", 400, "missing_host"),
    "missing-host-absolute": ("GET http:///x HTTP/1.1\r\n" + AUTH + "\r\n", 400, "missing_host"),
    "missing-port": ("CONNECT example.com HTTP/1.1\r\n" + AUTH + "\r\n", 400, "missing_port"),
    "port-zero": ("CONNECT example.com:0 HTTP/1.1\r\n" + AUTH + "\r\n", 400, "bad_port"),
    "port-70000": ("CONNECT example.com:70000 HTTP/1.1\r\n" + AUTH + "\r\n", 400, "bad_port"),
    "port-non-numeric": ("CONNECT example.com:https HTTP/1.1\r\n" + AUTH + "\r\n", 400, "bad_port"),
    "port-negative": ("CONNECT example.com:-1 HTTP/1.1\r\n" + AUTH + "\r\n", 400, "bad_port"),
    "port-empty": ("CONNECT example.com: HTTP/1.1\r\n" + AUTH + "\r\n", 400, "bad_port"),
    "port-absolute-bad": ("GET http://example.com:99999/ HTTP/1.1\r\n\r\n", 400, "bad_port"),
    "host-numeric-short": ("CONNECT 127.1:{port} HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-decimal-int": ("CONNECT 2130706433:{port} HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-hex": ("CONNECT 0x7f.0.0.1:{port} HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-spaces-or-symbols": ("CONNECT exa$mple.com:443 HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-unicode": ("CONNECT b\u00fccher.de:443 HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-ipv6-zone": ("CONNECT [fe80::1%eth0]:443 HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-ipv6-unclosed": ("CONNECT [::1:443 HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "host-label-too-long": ("CONNECT " + "a" * 64 + ".com:443 HTTP/1.1\r\n\r\n", 400, "bad_host"),
    "userinfo-in-url": ("GET http://u:p@example.com/ HTTP/1.1\r\n\r\n", 400, "bad_target"),
    "https-absolute-form": (
        "GET https://example.com/ HTTP/1.1\r\n\r\n",
        400,
        "https_needs_connect",
    ),
    "origin-form": ("GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "bad_target"),
    "other-scheme": ("GET ftp://example.com/ HTTP/1.1\r\n\r\n", 400, "bad_target"),
    "header-folded": ("CONNECT a.com:1 HTTP/1.1\r\nX: a\r\n  b\r\n\r\n", 400, "bad_header"),
    "header-no-colon": ("CONNECT a.com:1 HTTP/1.1\r\nNoColonHere\r\n\r\n", 400, "bad_header"),
    "header-space-before-colon": ("CONNECT a.com:1 HTTP/1.1\r\nX-A : b\r\n\r\n", 400, "bad_header"),
    "two-credentials": (
        "CONNECT a.com:1 HTTP/1.1\r\n" + AUTH + AUTH + "\r\n",
        400,
        "bad_header",
    ),
    "content-length-and-chunked": (
        "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "bad_framing",
    ),
    "transfer-encoding-gzip": (
        "POST http://a.com/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
        "bad_framing",
    ),
    "content-length-conflict": (
        "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        400,
        "bad_framing",
    ),
    "content-length-negative": (
        "POST http://a.com/ HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        400,
        "bad_framing",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
async def test_bad_request_is_refused_in_protocol_shape(
    name: str, listener: EgressListener, token: str, echo: EchoServer, services: Services
) -> None:
    text, status, code = BAD_REQUESTS[name]
    head = text.format(token=token, port=echo.port).encode("utf-8")
    before = len(refusals(services))
    reply = await send_raw(listener, head)
    assert (reply.status, reply.code) == (status, code), reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.body.startswith(b"tether egress: ")
    assert echo.accepted == 0
    (rec,) = refusals(services)[before:]
    assert rec["data"]["code"] == code
    assert token not in str(rec)


async def test_bad_chunked_body_is_400_and_recorded(
    listener: EgressListener, token: str, services: Services
) -> None:
    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.read()
        finally:
            w.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = len(entries(services, "egress.closed"))
    try:
        head = (
            f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "zz-not-hex\r\n"
        ).encode()
        reply = await send_raw(listener, head)
    finally:
        server.close()
    assert reply.status == 400 and reply.code == "bad_framing"
    closed = (await wait_entries(services, "egress.closed", before + 1))[-1]
    assert closed["subject"] == f"127.0.0.1:{port}"
    assert closed["data"]["ended"] == "bad_framing"


@pytest.mark.parametrize(
    "shape",
    ["header-flood", "oversized-line", "oversized-head"],
)
async def test_oversized_heads_get_431(
    shape: str, make_gateway: GatewayFactory, token: str, echo: EchoServer, services: Services
) -> None:
    gw = make_gateway({"max_header_bytes": 8192, "max_headers": 32})
    listener = await gw.serve_tcp()
    start = f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n"
    if shape == "header-flood":
        body = "".join(f"X-{i}: y\r\n" for i in range(20_000))
    elif shape == "oversized-line":
        body = "X-Big: " + "a" * 200_000 + "\r\n"
    else:
        body = "".join(f"X-{i}: {'b' * 500}\r\n" for i in range(30))
    before = len(refusals(services))
    r, w = await open_proxy(listener)
    w.write((start + body + "\r\n").encode())
    reply = await read_reply(r)
    w.close()
    assert reply.status == 431
    assert reply.code in ("too_many_headers", "header_too_large")
    assert echo.accepted == 0
    (rec,) = refusals(services)[before:]
    assert rec["data"]["status"] == 431


async def test_slowloris_head_is_cut_after_the_header_timeout(
    make_gateway: GatewayFactory, token: str, echo: EchoServer, services: Services
) -> None:
    """The client keeps sending header lines, slowly, forever: the head deadline closes it."""
    gw = make_gateway({"header_timeout": "300ms"})
    listener = await gw.serve_tcp()
    before = len(refusals(services))
    r, w = await open_proxy(listener)
    w.write(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n".encode())

    async def drip() -> None:
        i = 0
        while True:
            w.write(f"X-Drip-{i}: z\r\n".encode())  # the attack: a line every 50 ms
            await w.drain()
            await asyncio.sleep(0.05)
            i += 1

    dripping = asyncio.ensure_future(drip())
    try:
        reply = await read_reply(r)
        rest = await asyncio.wait_for(r.read(), WAIT)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        w.close()
    assert reply.status == 408 and reply.code == "header_timeout"
    assert rest == b""  # and the connection is closed
    (rec,) = refusals(services)[before:]
    assert rec["data"]["code"] == "header_timeout"
    assert echo.accepted == 0


async def test_silent_client_is_closed_after_the_header_timeout(
    make_gateway: GatewayFactory, services: Services
) -> None:
    gw = make_gateway({"header_timeout": "200ms"})
    listener = await gw.serve_tcp()
    r, w = await open_proxy(listener)
    reply = await read_reply(r)
    assert reply.status == 408
    assert await asyncio.wait_for(r.read(), WAIT) == b""
    w.close()


async def test_client_leaving_mid_head_is_recorded_and_an_empty_probe_is_not(
    listener: EgressListener, services: Services
) -> None:
    before = len(refusals(services))
    _r, w = await open_proxy(listener)
    w.close()  # a probe: connect and leave
    _r, w = await open_proxy(listener)
    w.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: exa")
    await w.drain()
    w.close()
    (rec,) = (await wait_entries(services, "egress.refused", before + 1))[before:]
    assert rec["data"]["code"] == "incomplete_head"
