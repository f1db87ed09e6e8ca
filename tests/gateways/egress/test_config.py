"""The ``[egress]`` table: defaults, valid values, named bad fixtures with clear errors; the
``build_egress_gateway`` seam on real services; the host's resolver."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.gateways.egress.conftest import connect_head, send_raw
from tether.errors import ConfigError
from tether.gateways.egress.addresses import ResolveError, SystemResolver
from tether.gateways.egress.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    parse_egress_config,
)
from tether.gateways.egress.gateway import EgressGateway
from tether.gateways.egress.mount import build_egress_gateway
from tether.server.services import Services


def test_defaults_refuse_every_private_range() -> None:
    s = parse_egress_config(None)
    assert s.allow_private == ()
    assert s.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert s.max_header_bytes == DEFAULT_MAX_HEADER_BYTES
    assert s.listen is None


def test_valid_table() -> None:
    s = parse_egress_config(
        {
            "listen": "127.0.0.1:3128",
            "connect_timeout": "2s",
            "header_timeout": 3,
            "idle_timeout": "1m",
            "escalation_hold": "0s",
            "max_header_bytes": 4096,
            "max_headers": 10,
            "max_connections": 5,
            "allow_private": ["127.0.0.1/32", "fd00::/8"],
        }
    )
    assert s.listen == ("127.0.0.1", 3128)
    assert (s.connect_timeout, s.header_timeout, s.idle_timeout) == (2.0, 3.0, 60.0)
    assert s.escalation_hold == 0.0
    assert s.allow_private == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )


BAD_TABLES: dict[str, tuple[Any, str]] = {
    "not-a-table": ("yes", "must be a table"),
    "unknown-key": ({"allow_privat": ["127.0.0.1/32"]}, "unknown key(s): allow_privat"),
    "timeout-garbage": ({"connect_timeout": "soon"}, "connect_timeout"),
    "timeout-zero": ({"idle_timeout": 0}, "idle_timeout"),
    "limit-not-int": ({"max_headers": "64"}, "max_headers must be an integer"),
    "limit-bool": ({"max_connections": True}, "max_connections must be an integer"),
    "limit-too-small": ({"max_header_bytes": 10}, "between 256"),
    "limit-too-large": ({"max_headers": 10**6}, "between 1 and 1000"),
    "cidr-not-list": ({"allow_private": "127.0.0.1/32"}, "must be a list of CIDRs"),
    "cidr-garbage": ({"allow_private": ["localhost"]}, "not a valid CIDR"),
    "cidr-host-bits": ({"allow_private": ["10.0.0.1/8"]}, "not a valid CIDR"),
    "cidr-not-string": ({"allow_private": [10]}, "not a CIDR string"),
    "listen-no-port": ({"listen": "127.0.0.1"}, "listen: invalid address"),
    "listen-bad-port": ({"listen": "127.0.0.1:99999"}, "listen: invalid address"),
}


@pytest.mark.parametrize("name", list(BAD_TABLES), ids=list(BAD_TABLES))
def test_bad_tables_are_clear_config_errors(name: str) -> None:
    table, message = BAD_TABLES[name]
    with pytest.raises(ConfigError) as e:
        parse_egress_config(table)
    assert message in e.value.diagnostics()
    assert "[egress]" in e.value.message


async def test_build_from_services_reads_the_egress_table(services: Services, token: str) -> None:
    services.config.extra["egress"] = {"allow_private": ["127.0.0.1/32"], "max_headers": 5}
    gw = build_egress_gateway(services)
    try:
        assert gw.settings.max_headers == 5
        listener = await gw.serve_tcp()
        head = connect_head("127.0.0.1:9", token, extra="".join(f"X-{i}: 1\r\n" for i in range(9)))
        reply = await send_raw(listener, head)
        assert reply.status == 431
    finally:
        await gw.aclose()


def test_build_refuses_a_bad_table(services: Services) -> None:
    services.config.extra["egress"] = {"max_headers": -1}
    with pytest.raises(ConfigError):
        build_egress_gateway(services)


async def test_system_resolver() -> None:
    resolver = SystemResolver()
    assert ipaddress.ip_address("127.0.0.1") in await resolver.resolve("localhost", 80)
    with pytest.raises(ResolveError) as e:
        await resolver.resolve("no-such-name.invalid", 443)
    assert "no-such-name.invalid" in str(e.value)


async def test_tcp_listen_on_a_busy_port_is_a_config_error(gateway: EgressGateway) -> None:
    first = await gateway.serve_tcp("127.0.0.1", 0)
    assert first.address is not None
    with pytest.raises(ConfigError) as e:
        await gateway.serve_tcp("127.0.0.1", first.address[1])
    assert "cannot listen" in e.value.message
