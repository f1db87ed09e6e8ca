"""The ``[egress]`` table of ``config.toml``: timeouts, limits and the private-address allowlist.

::

    [egress]
    listen = "127.0.0.1:3128"         # optional host-wide TCP listener (tokens required);
                                      # beams get their own unix socket whatever this says
    connect_timeout = "10s"           # resolve + TCP connect to the destination
    header_timeout = "10s"            # the request head must arrive within this (slowloris)
    idle_timeout = "5m"               # a tunnel with no byte either way for this long is cut
    escalation_hold = "0s"            # hold an escalated connection this long for its approval
    max_header_bytes = 16384          # request line + headers; above it: 431
    max_headers = 64                  # header lines; above it: 431
    max_connections = 1024            # open connections per gateway; above it: 503
    allow_private = []                # CIDRs of internal addresses that may be reached

By default every address that is not globally routable is refused after resolution
(loopback, RFC 1918, link-local including the 169.254.169.254 metadata address, CGNAT,
unique-local IPv6, multicast, reserved). ``allow_private`` names the exceptions, e.g.
``["127.0.0.1/32"]`` for a test server or ``["10.20.0.0/16"]`` for a corporate proxy range.
Unknown keys are refused, so a misspelt limit cannot silently keep its default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tether.config import parse_duration
from tether.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_ESCALATION_HOLD",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "EgressSettings",
    "IPNetwork",
    "parse_egress_config",
]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_ESCALATION_HOLD = 0.0
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 64
DEFAULT_MAX_CONNECTIONS = 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEYS = frozenset(
    {
        "listen",
        "connect_timeout",
        "header_timeout",
        "idle_timeout",
        "escalation_hold",
        "max_header_bytes",
        "max_headers",
        "max_connections",
        "allow_private",
    }
)
# (minimum, maximum) for the integer limits: a head below 256 bytes cannot hold a CONNECT
# line plus a token; above a megabyte it is a memory lever for whoever sends it.
_INT_BOUNDS: Mapping[str, tuple[int, int]] = {
    "max_header_bytes": (256, 1024 * 1024),
    "max_headers": (1, 1000),
    "max_connections": (1, 1_000_000),
}


@dataclass(frozen=True, slots=True)
class EgressSettings:
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    escalation_hold: float = DEFAULT_ESCALATION_HOLD
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allow_private: tuple[IPNetwork, ...] = ()
    listen: tuple[str, int] | None = None


def _duration(table: Mapping[str, Any], key: str, default: float, zero_ok: bool = False) -> float:
    if key not in table:
        return default
    raw = table[key]
    if zero_ok and raw in (0, "0", "0s", "0ms"):
        return 0.0
    try:
        return parse_duration(raw)
    except ConfigError as e:
        raise ConfigError(f"[egress] {key}: {e.message}") from None


def _int(table: Mapping[str, Any], key: str, default: int) -> int:
    if key not in table:
        return default
    raw = table[key]
    lo, hi = _INT_BOUNDS[key]
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"[egress] {key} must be an integer, got {raw!r}")
    if not lo <= raw <= hi:
        raise ConfigError(f"[egress] {key} must be between {lo} and {hi}, got {raw}")
    return raw


def _networks(raw: Any) -> tuple[IPNetwork, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise ConfigError(
            f"[egress] allow_private must be a list of CIDRs, got {raw!r}",
            hint='e.g. allow_private = ["127.0.0.1/32", "10.20.0.0/16"]',
        )
    out: list[IPNetwork] = []
    for item in raw:
        if not isinstance(item, str):
            raise ConfigError(f"[egress] allow_private: {item!r} is not a CIDR string")
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as e:
            raise ConfigError(f"[egress] allow_private: {item!r} is not a valid CIDR ({e})") from e
    return tuple(out)


def _listen(raw: Any) -> tuple[str, int] | None:
    if raw is None:
        return None
    text = str(raw)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"[egress] listen: invalid address {text!r} (use HOST:PORT)")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_egress_config(table: Mapping[str, Any] | None) -> EgressSettings:
    """Validate the raw ``[egress]`` table (``config.extra["egress"]``). Raises ConfigError."""
    if table is None:
        return EgressSettings()
    if not isinstance(table, Mapping):
        raise ConfigError("[egress] must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(
            f"[egress] has unknown key(s): {', '.join(map(str, unknown))}",
            hint="known keys: " + ", ".join(sorted(_KEYS)),
        )
    return EgressSettings(
        connect_timeout=_duration(table, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        header_timeout=_duration(table, "header_timeout", DEFAULT_HEADER_TIMEOUT),
        idle_timeout=_duration(table, "idle_timeout", DEFAULT_IDLE_TIMEOUT),
        escalation_hold=_duration(table, "escalation_hold", DEFAULT_ESCALATION_HOLD, zero_ok=True),
        max_header_bytes=_int(table, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES),
        max_headers=_int(table, "max_headers", DEFAULT_MAX_HEADERS),
        max_connections=_int(table, "max_connections", DEFAULT_MAX_CONNECTIONS),
        allow_private=_networks(table.get("allow_private")),
        listen=_listen(table.get("listen")),
    )
