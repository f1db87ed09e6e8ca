"""Fixtures for the egress gateway: the real services (Cedar core, audit log, verifier), real
destination servers on free ports (a TCP echo server, an HTTP server, an HTTPS server with a
self-signed certificate) and a gateway listening on TCP."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.gateways.egress.addresses import Resolver
from tether.gateways.egress.config import parse_egress_config
from tether.gateways.egress.gateway import EgressGateway, EgressListener, recheck_with
from tether.server.services import Services

TASK = "egress-task"
DEFAULT_GRANTS = ["egress:127.0.0.1", "egress:localhost", "model:gpt-4o"]
WAIT = 20.0  # backstop for anything awaited in a test (never a timing assertion)


# -- destinations -----------------------------------------------------------------------------


@dataclass
class EchoServer:
    """A TCP echo server: counts connections and bytes; closes when the client half-closes."""

    port: int = 0
    accepted: int = 0
    received: int = 0
    server: asyncio.AbstractServer | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await r.read(65536):
                self.received += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
            self.closed.set()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    srv = EchoServer()
    srv.server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = srv.server.sockets[0].getsockname()[1]
    yield srv
    srv.server.close()


class _Handler(BaseHTTPRequestHandler):
    """Answers every request with JSON describing what it received."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self) -> None:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(length)) if length else b""
        doc = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        out = json.dumps(doc).encode()
        self.server.seen.append(doc)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_HEAD = _reply


@dataclass
class HttpServer:
    port: int
    seen: list[dict[str, Any]]
    cafile: Path | None = None


def _serve(httpd: ThreadingHTTPServer) -> Iterator[None]:
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.seen = []  # type: ignore[attr-defined]
    for _ in _serve(httpd):
        yield HttpServer(httpd.server_address[1], httpd.seen)  # type: ignore[attr-defined]


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[HttpServer]:
    cert, key = _self_signed(tmp_path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.seen = []  # type: ignore[attr-defined]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    for _ in _serve(httpd):
        yield HttpServer(httpd.server_address[1], httpd.seen, cert)  # type: ignore[attr-defined]


# -- identities ---------------------------------------------------------------------------------


@pytest.fixture
def mint(services: Services, admin_token: str) -> Callable[..., str]:
    admin = services.verifier.verify(admin_token)

    def mint(grants: list[str] | None = None, name: str = "fetcher", **kw: Any) -> str:
        kw.setdefault("task", TASK)
        return services.authority.delegate(
            admin, name, DEFAULT_GRANTS if grants is None else grants, **kw
        ).token

    return mint


@pytest.fixture
def token(mint: Callable[..., str]) -> str:
    return mint()


# -- the gateway ----------------------------------------------------------------------------------


GatewayFactory = Callable[..., EgressGateway]


@pytest.fixture
async def make_gateway(services: Services) -> AsyncIterator[GatewayFactory]:
    """Build gateways on the real services; ``table`` is the ``[egress]`` table. Each is
    closed (listeners, end records) when the test ends."""
    made: list[EgressGateway] = []

    def make(
        table: dict[str, Any] | None = None,
        resolver: Resolver | None = None,
        audit: Any = None,
    ) -> EgressGateway:
        base: dict[str, Any] = {"allow_private": ["127.0.0.1/32"], "connect_timeout": "10s"}
        base.update(table or {})
        gw = EgressGateway(
            parse_egress_config(base),
            verify=services.verifier.verify,
            core=services.core,
            audit=audit if audit is not None else services.audit,
            recheck=recheck_with(services.verifier),
            resolver=resolver,
        )
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.aclose()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> EgressGateway:
    return make_gateway()


@pytest.fixture
async def listener(gateway: EgressGateway) -> EgressListener:
    return await gateway.serve_tcp("127.0.0.1", 0)


def proxy_url(listener: EgressListener, token: str | None = None) -> str:
    assert listener.address is not None
    host, port = listener.address
    cred = f"tether:{token}@" if token else ""
    return f"http://{cred}{host}:{port}"


# -- raw client helpers --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str | None:
        return self.headers.get("x-tether-error")


async def read_reply(r: asyncio.StreamReader) -> Reply:
    """Read the gateway's answer: a status line, headers and (if it says) a body."""
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(r.readexactly(n), WAIT) if n else b""
    return Reply(status, headers, body)


async def open_proxy(
    listener: EgressListener,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if listener.path is not None:
        return await asyncio.open_unix_connection(str(listener.path))
    assert listener.address is not None
    return await asyncio.open_connection(*listener.address)


async def send_raw(listener: EgressListener, data: bytes) -> Reply:
    r, w = await open_proxy(listener)
    try:
        w.write(data)
        await w.drain()
        return await read_reply(r)
    finally:
        w.close()


def connect_head(target: str, token: str | None = None, extra: str = "") -> bytes:
    auth = f"Proxy-Authorization: Bearer {token}\r\n" if token else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}{extra}\r\n".encode()


def entries(services: Services, type_: str) -> list[dict[str, Any]]:
    return services.audit.search(type=type_, limit=1000)


async def wait_entries(services: Services, type_: str, n: int = 1) -> list[dict[str, Any]]:
    """Poll the audit log (with a deadline) until ``n`` entries of ``type_`` are there: the end
    of a connection is recorded in the background once both sides are done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        found = entries(services, type_)
        if len(found) >= n:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"expected {n} {type_} entries, found {len(found)}")
        await asyncio.sleep(0.01)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a TCP connect to it hangs (SYNs are dropped)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.socket()
    filler.connect(srv.getsockname())
    try:
        yield srv.getsockname()[1]
    finally:
        filler.close()
        srv.close()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (the OS gave it out, then it was closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for unix sockets (paths are limited to ~108 bytes)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="eg-", dir="/tmp"))
    d.chmod(0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
