"""Hostile workloads, network: inside a beam there is loopback and the forwarder, nothing else.
Each test runs a real beam and asserts the exact failure the workload sees."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tests.runtime.conftest import PRELUDE, Beams


def _host_outbound_ip() -> str | None:
    """This host's address on its default route (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


async def test_outside_addresses_are_unreachable(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
for host, port in [("1.1.1.1", 443), ("10.0.0.1", 80), ("169.254.169.254", 80)]:
    attempt(f"{host}:{port}", lambda: socket.create_connection((host, port), timeout=5))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp", lambda: udp.sendto(b"x", ("8.8.8.8", 53)))
done()
"""
    )
    assert ran.result == {
        "1.1.1.1:443": "ENETUNREACH",
        "10.0.0.1:80": "ENETUNREACH",
        "169.254.169.254:80": "ENETUNREACH",
        "udp": "ENETUNREACH",
    }


async def test_host_loopback_port_is_not_the_beams_loopback(beams: Beams) -> None:
    accepted: list[object] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w.get_extra_info("peername"))
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    host_ip = _host_outbound_ip()
    async with server:
        ran = await beams.py(
            PRELUDE
            + f"""
attempt("loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5))
attempt("localhost", lambda: socket.create_connection(("localhost", {port}), timeout=5))
if {host_ip!r}:
    attempt("host_ip", lambda: socket.create_connection(({host_ip!r}, {port}), timeout=5))
done()
"""
        )
    expected = {"loopback": "ECONNREFUSED", "localhost": "ECONNREFUSED"}
    if host_ip:
        expected["host_ip"] = "ENETUNREACH"
    assert ran.result == expected
    assert accepted == []


async def test_ipv6_host_listener_and_outside_are_unreachable(beams: Beams) -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        server = await asyncio.start_server(lambda r, w: w.close(), "::1", 0)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback on this host: {e}")
    port = server.sockets[0].getsockname()[1]
    async with server:
        ran = await beams.py(
            PRELUDE
            + f"""
def c6(addr, port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((addr, port))
attempt("host_v6_loopback", lambda: c6("::1", {port}))
attempt("outside_v6", lambda: c6("2606:4700:4700::1111", 443))
done()
"""
        )
    assert ran.result == {"host_v6_loopback": "ECONNREFUSED", "outside_v6": "ENETUNREACH"}


async def test_raw_packet_netlink_and_exotic_sockets_are_refused(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
S = socket
attempt("raw_icmp", lambda: S.socket(S.AF_INET, S.SOCK_RAW, S.IPPROTO_ICMP))
attempt("raw_v6", lambda: S.socket(S.AF_INET6, S.SOCK_RAW, S.IPPROTO_ICMPV6))
attempt("raw_nonblock", lambda: S.socket(S.AF_INET, S.SOCK_RAW | S.SOCK_NONBLOCK, 255))
attempt("packet", lambda: S.socket(S.AF_PACKET, S.SOCK_RAW, 0))
attempt("packet_dgram", lambda: S.socket(S.AF_PACKET, S.SOCK_DGRAM, 0))
attempt("netlink_route", lambda: S.socket(S.AF_NETLINK, S.SOCK_RAW, 0))
attempt("netlink_audit", lambda: S.socket(S.AF_NETLINK, S.SOCK_DGRAM, 9))
attempt("alg", lambda: S.socket(38, S.SOCK_SEQPACKET, 0))
attempt("vsock", lambda: S.socket(40, S.SOCK_STREAM, 0))
attempt("ping", lambda: S.socket(S.AF_INET, S.SOCK_DGRAM, S.IPPROTO_ICMP))
attempt("tcp", lambda: S.socket(S.AF_INET, S.SOCK_STREAM).close())
attempt("unix", lambda: S.socket(S.AF_UNIX, S.SOCK_STREAM).close())
done()
"""
    )
    r = ran.result
    for name in (
        "raw_icmp", "raw_v6", "raw_nonblock", "packet", "packet_dgram", "netlink_route",
        "netlink_audit", "alg", "vsock",
    ):  # fmt: skip
        assert r[name] == "EPERM", name
    assert r["ping"] == "EACCES"  # ping sockets: the beam's netns allows no group
    assert (r["tcp"], r["unix"]) == ("ok", "ok")


async def test_dns_resolution_fails_at_once(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
def resolve(name):
    try:
        return socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        return ["gaierror", e.errno]
note("example", resolve("example.com"))
note("pypi", resolve("pypi.org"))
note("localhost", resolve("localhost"))
attempt("resolv_conf", lambda: open("/etc/resolv.conf"))
done()
"""
    )
    assert ran.result == {
        "example": ["gaierror", socket.EAI_NONAME],
        "pypi": ["gaierror", socket.EAI_NONAME],
        "localhost": "127.0.0.1",
        "resolv_conf": "ENOENT",
    }


async def test_host_abstract_unix_sockets_are_out_of_reach(beams: Beams) -> None:
    name = f"\0tether-test-{os.urandom(6).hex()}"
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.bind(name)
    host.listen()
    try:
        ran = await beams.py(
            PRELUDE
            + f"""
attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect({name!r}))
done()
"""
        )
    finally:
        host.close()
    assert ran.result == {"abstract": "ECONNREFUSED"}


async def test_the_only_interface_is_loopback_and_the_only_sockets_are_the_bridge(
    beams: Beams,
) -> None:
    ran = await beams.py(
        PRELUDE
        + """
import stat
note("interfaces", sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]))
socks = []
roots = {sys.prefix, sys.base_prefix}
for top in os.listdir("/"):
    if top in ("proc", "usr") or any(r.startswith("/" + top + "/") for r in roots):
        continue
    for d, dirs, files in os.walk("/" + top):
        for f in files:
            p = os.path.join(d, f)
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                socks.append(p)
note("sockets", sorted(socks))
done()
"""
    )
    assert ran.result == {"interfaces": ["lo"], "sockets": ["/run/tether/gateway.sock"]}
