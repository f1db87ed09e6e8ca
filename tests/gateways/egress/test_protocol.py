"""The I/O-free parts: request heads, hosts and ports, credentials, forwarded heads, the
egress grant rules and the address policy."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from tether.gateways.egress.addresses import AddressPolicy
from tether.gateways.egress.gateway import egress_grant
from tether.gateways.egress.protocol import (
    ProxyError,
    Target,
    forward_head,
    parse_head,
    parse_host,
    proxy_token,
    render_error,
    rewrite_response_head,
)
from tether.identity.grants import Grants


def test_connect_head_parses_to_a_normalised_target() -> None:
    req = parse_head(b"CONNECT API.GitHub.com.:443 HTTP/1.1\r\nHost: x\r\n\r\n", 10)
    assert req.mode == "connect" and req.method == "CONNECT"
    assert req.target == Target("api.github.com", 443)
    assert req.target.resource == "api.github.com:443"
    assert req.header("HOST") == "x"


def test_ipv6_literal_target() -> None:
    req = parse_head(b"CONNECT [2001:DB8::1]:8443 HTTP/1.1\r\n\r\n", 10)
    assert req.target.host == "2001:db8::1"
    assert req.target.resource == "2001:db8::1:8443"
    assert req.target.authority == "[2001:db8::1]:8443"
    assert req.target.ip == ipaddress.ip_address("2001:db8::1")


def test_absolute_form_defaults_port_80_and_keeps_the_query() -> None:
    req = parse_head(b"GET http://Example.com/a/b?x=1#frag HTTP/1.1\r\n\r\n", 10)
    assert req.mode == "http"
    assert req.target == Target("example.com", 80)
    assert req.path == "/a/b?x=1"
    bare = parse_head(b"GET http://example.com:8080 HTTP/1.1\r\n\r\n", 10)
    assert bare.path == "/" and bare.target.port == 8080


def test_forward_head_rewrites_host_and_drops_hop_by_hop() -> None:
    req = parse_head(
        b"GET http://example.com:8080/x HTTP/1.1\r\nHost: evil.example\r\n"
        b"Proxy-Authorization: Bearer secret\r\nConnection: keep-alive, X-Private\r\n"
        b"X-Private: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n",
        20,
    )
    out = forward_head(req).decode()
    assert out.startswith("GET /x HTTP/1.1\r\nHost: example.com:8080\r\n")
    assert "Accept: */*" in out
    for gone in ("secret", "evil.example", "X-Private", "Keep-Alive"):
        assert gone not in out
    assert out.endswith("Connection: close\r\n\r\n")
    default_port = parse_head(b"GET http://example.com/ HTTP/1.1\r\n\r\n", 5)
    assert "Host: example.com\r\n" in forward_head(default_port).decode()


def test_response_head_rewrite() -> None:
    status, head = rewrite_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\n\r\n"
    )
    assert status == 200
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    with pytest.raises(ProxyError) as e:
        rewrite_response_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert e.value.status == 502


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc", "abc"),
        ("Basic " + base64.b64encode(b"tether:tok").decode(), "tok"),
        ("Basic " + base64.b64encode(b"tok:").decode(), "tok"),
    ],
    ids=["bearer", "bearer-lowercase", "basic-password", "basic-user-only"],
)
def test_proxy_token_forms(value: str, token: str) -> None:
    assert proxy_token(value) == token


def test_proxy_token_errors_never_echo_the_value() -> None:
    with pytest.raises(ProxyError) as e:
        proxy_token("Weird sekrit-value")
    assert e.value.status == 407
    assert "sekrit" not in e.value.message and "sekrit" not in repr(e.value)
    assert b"Proxy-Authenticate: Basic" in render_error(e.value)


@pytest.mark.parametrize(
    "text",
    ["", "a..b", "-a.com", "a-.com", "a b", "127.1", "1.2.3.4.5", "0x10", "[::1", "é.com"],
    ids=[
        "empty",
        "empty-label",
        "leading-hyphen",
        "trailing-hyphen",
        "space",
        "short-numeric",
        "five-octets",
        "hex",
        "open-bracket",
        "non-ascii",
    ],
)
def test_parse_host_refuses(text: str) -> None:
    with pytest.raises(ProxyError):
        parse_host(text)


def test_parse_host_accepts() -> None:
    assert parse_host("Foo_bar.Example.COM.") == ("foo_bar.example.com", None)
    assert parse_host("10.0.0.1")[0] == "10.0.0.1"
    assert parse_host("[::FFFF:127.0.0.1]")[0] == "::ffff:7f00:1"


GRANTS = Grants.parse(
    ["egress:api.github.com", "egress:*.example.com", "egress:pypi.org:443", "egress:10.0.0.5"]
)


@pytest.mark.parametrize(
    ("host", "port", "grant"),
    [
        ("api.github.com", 443, "egress:api.github.com"),
        ("api.github.com", 22, "egress:api.github.com"),  # no port in the grant: any port
        ("a.b.example.com", 8443, "egress:*.example.com"),
        ("pypi.org", 443, "egress:pypi.org:443"),
        ("pypi.org", 80, None),  # the grant names 443 only
        ("example.com", 443, None),  # *.example.com does not cover the apex
        ("api.github.com.evil.net", 443, None),
        ("10.0.0.5", 5432, "egress:10.0.0.5"),
    ],
)
def test_egress_grant_rules(host: str, port: int, grant: str | None) -> None:
    found = egress_grant(GRANTS, Target(host, port))
    assert (str(found) if found else None) == grant


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700::1111", False),
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("10.0.0.1", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("fd00::1", True),
        ("::ffff:10.0.0.1", True),
        ("2002:a00:1::", True),  # 6to4 carrying 10.0.0.1
        ("64:ff9b::7f00:1", True),  # NAT64 carrying 127.0.0.1
    ],
)
def test_address_policy_default(address: str, refused: bool) -> None:
    why = AddressPolicy().refusal(ipaddress.ip_address(address))
    assert (why is not None) == refused


def test_address_policy_allowlist_is_exact() -> None:
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.1/32")])
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("127.0.0.2")) is not None
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) is not None
