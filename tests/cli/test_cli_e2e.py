"""The README's story with the real `tether` command against a real server process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TETHER = [sys.executable, "-m", "tether.cli.main"]


def run(
    home: Path, *args: str, ok: bool = True, addr: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TETHER_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("TETHER_ADDR", None)
    if addr:
        env["TETHER_ADDR"] = addr
    proc = subprocess.run([*TETHER, *args], capture_output=True, text=True, env=env, timeout=60)
    if ok and proc.returncode != 0:
        raise AssertionError(f"tether {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def server(tmp_path: Path, port: int) -> Iterator[Path]:
    home = tmp_path / "home"
    run(home, "init", "--trust-domain", "example.org")
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "TETHER_HOME": str(home)}
    proc = subprocess.Popen(
        [*TETHER, "serve", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sock = home / "tether.sock"
    deadline = time.monotonic() + 30
    while True:
        if sock.exists():
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
                    if c.get("http://tether/readyz").status_code == 200:
                        break
            except httpx.TransportError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start: " + (tmp_path / "server.log").read_text())
        time.sleep(0.05)
    try:
        yield home
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_init_twice_never_overwrites_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "init", "--trust-domain", "example.org")
    keys = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (home / "keys").iterdir()}
    cred = (home / "credentials" / "admin").read_bytes()
    second = run(home, "init", "--trust-domain", "example.org")
    assert "already initialised" in second.stdout
    assert keys == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (home / "keys").iterdir()
    }
    assert (home / "credentials" / "admin").read_bytes() == cred
    for p in (home / "keys").glob("*.pem"):
        assert p.stat().st_mode & 0o777 == 0o600
    other = run(home, "init", "--trust-domain", "other.org", ok=False)
    assert other.returncode == 1 and "already holds trust domain" in other.stderr


def test_cli_without_server_says_what_to_do(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "init", "--trust-domain", "example.org")
    proc = run(home, "whoami", ok=False)
    assert proc.returncode == 1 and "tether serve" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_delegation_story(server: Path, tmp_path: Path) -> None:
    me = run(server, "whoami")
    assert "spiffe://example.org/user/admin" in me.stdout

    planner = tmp_path / "planner.json"
    out = run(
        server,
        "delegate",
        "--agent",
        "planner",
        "--grant",
        "model:gpt-4o*",
        "--grant",
        "tool:search.*",
        "--ttl",
        "20m",
        "--objective",
        "Write the churn report",
        "--task",
        "churn-42",
        "--json",
    )
    doc = json.loads(out.stdout)
    assert {"token", "spiffe_id", "expires_at"} <= doc.keys()
    planner.write_text(out.stdout)

    worker = tmp_path / "worker.jwt"
    run(
        server,
        "delegate",
        "--agent",
        "worker",
        "--grant",
        "model:gpt-4o-mini",
        "--ttl",
        "5m",
        "--from-token",
        str(planner),
        "--out",
        str(worker),
    )
    assert worker.stat().st_mode & 0o777 == 0o600

    chain = run(server, "whoami", "--token", str(worker))
    text = chain.stdout
    assert text.index("user/admin") < text.index("agent/planner") < text.index("agent/worker")
    assert "churn-42" in text

    wider = run(
        server,
        "delegate",
        "--agent",
        "worker2",
        "--grant",
        "model:*",
        "--from-token",
        str(planner),
        ok=False,
    )
    assert wider.returncode == 1 and "model:* is wider" in wider.stderr

    listed = run(server, "identities", "ls", "--json")
    names = {i["spiffe_id"] for i in json.loads(listed.stdout)["identities"]}
    assert {"spiffe://example.org/agent/planner", "spiffe://example.org/agent/worker"} <= names

    run(server, "revoke", "--token", str(planner), "--reason", "demo")
    bitten = run(server, "whoami", "--token", str(worker), ok=False)
    assert bitten.returncode == 1 and "revoked" in bitten.stderr
    assert worker.read_text().strip() not in bitten.stderr


def test_x509_svid(server: Path, tmp_path: Path) -> None:
    from cryptography import x509

    run(server, "svid", "x509", "--out", str(tmp_path / "svid"))
    certs = x509.load_pem_x509_certificates((tmp_path / "svid" / "svid.pem").read_bytes())
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/user/admin"
    ]
    assert (tmp_path / "svid" / "svid.key").stat().st_mode & 0o777 == 0o600


def test_cli_over_tcp_with_tether_addr(server: Path, port: int) -> None:
    me = run(server, "whoami", "--json", addr=f"127.0.0.1:{port}")
    assert json.loads(me.stdout)["spiffe_id"] == "spiffe://example.org/user/admin"
    with httpx.Client() as c:
        assert c.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        assert "/v1/token" in c.get(f"http://127.0.0.1:{port}/openapi.json").json()["paths"]
