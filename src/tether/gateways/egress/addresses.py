"""Where a granted name may lead: host-side resolution and the internal-address policy.

A beam has no DNS; the gateway resolves on the host, after the decision (a name no grant
covers is never looked up, so DNS is not a side channel), and dials exactly the address it
checked. Re-resolving at connect time would let a name that answered with a public address
for the check answer ``127.0.0.1`` for the dial (DNS rebinding).

Refused unless ``allow_private`` names a CIDR containing it: every address that is not
globally routable (loopback, RFC 1918, link-local and so the 169.254.169.254 metadata
service, CGNAT 100.64/10, unique-local and site-local IPv6, documentation and benchmark
ranges, unspecified, broadcast), multicast, and IPv6 addresses that embed such an IPv4
address (IPv4-mapped, 6to4, Teredo, NAT64 64:ff9b::/96).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from tether.gateways.egress.config import IPNetwork
from tether.gateways.egress.protocol import IPAddress

__all__ = [
    "METADATA_ADDRESSES",
    "AddressPolicy",
    "ResolveError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
]

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_ADDRESSES = 8


class ResolveError(Exception):
    """The name does not resolve (or resolved to nothing usable)."""


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses ``host`` has, in the order to try them. Raises ResolveError."""
        ...


class SystemResolver:
    """The host's resolver (``getaddrinfo`` in the loop's executor), TCP addresses only."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (socket.gaierror, UnicodeError) as e:
            raise ResolveError(f"cannot resolve {host!r}: {_gai_text(e)}") from None
        out: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            except ValueError:
                continue
            if ip not in out:
                out.append(ip)
        if not out:
            raise ResolveError(f"cannot resolve {host!r}: no IPv4 or IPv6 address")
        return out[:MAX_ADDRESSES]


def _gai_text(e: Exception) -> str:
    if isinstance(e, socket.gaierror) and len(e.args) > 1:
        return str(e.args[1])
    return type(e).__name__


class StaticResolver:
    """A fixed name -> addresses table: the in-memory twin of :class:`SystemResolver` (tests,
    and deployments that pin destinations)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = {k.lower(): [ipaddress.ip_address(a) for a in v] for k, v in table.items()}

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        found = self.table.get(host.lower())
        if not found:
            raise ResolveError(f"cannot resolve {host!r}: Name or service not known")
        return list(found)


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """The address itself, and any IPv4 address an IPv6 one carries."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def _category(ip: IPAddress) -> str | None:
    if ip in METADATA_ADDRESSES:
        return "the cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


class AddressPolicy:
    """Which resolved addresses may be dialled. ``refusal`` returns why not, or None."""

    def __init__(self, allow: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)

    def __repr__(self) -> str:
        return f"AddressPolicy(allow={[str(n) for n in self.allow]!r})"

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.allow)

    def refusal(self, ip: IPAddress) -> str | None:
        candidates = _embedded(ip)
        if any(self._allowed(c) for c in candidates):
            return None
        for c in reversed(candidates):  # name the embedded IPv4 address first: it is the dial
            what = _category(c)
            if what is not None:
                shown = str(ip) if c == ip else f"{ip} (carrying {c})"
                return (
                    f"{shown} is {what}; the egress gateway refuses internal addresses "
                    "unless [egress] allow_private lists them"
                )
        return None
