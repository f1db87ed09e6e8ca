"""The upstream client: the gateways' lean HTTP/1.1 client (:mod:`tether.gateways.h1`), one
pool per service.

Why not aiohttp (used here before): per keep-alive call against a local upstream it costs
~240 us where h1 costs ~140 us and a raw socket ~110 us, and ~80 us of event-loop CPU where
h1 costs ~32 us (``python -m bench h1``); the gateway's whole budget is 1 ms. h1 also does
what this gateway needs by construction:

* bodies pass through byte for byte (no decompression: ``Content-Length`` and
  ``Content-Encoding`` stay true); no redirect is followed; nothing is read from the
  environment (proxies, netrc); no cookie jar, so one agent's upstream session cookies never
  ride on another agent's requests;
* it adds exactly ``Host`` and ``Content-Length``: no ``User-Agent``, ``Accept``,
  ``Accept-Encoding`` or ``Content-Type`` the agent did not send;
* a request is written to a socket at most once (never retried after a byte went out: an
  unsafe request may have been acted on).

Each service gets its own pool (``max_connections``, ``connect_timeout`` and ``timeout`` are
per-service limits). A request header the agent sent more than once is forwarded as one
field, its values joined with ", " (RFC 9110 section 5.3; ``Cookie`` with "; ", as HTTP/2 to
HTTP/1.1 gateways do).
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.gateways.h1 import (
    HttpClient,
    Response,
    UpstreamFailed,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tether.gateways.http.config import HTTPSettings, Service

__all__ = [
    "Response",
    "UpstreamFailed",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "Upstreams",
    "content_length",
    "not_sent",
]

IDLE_TIMEOUT = 30.0  # seconds an idle keep-alive connection is kept for reuse
# h1 reports every timeout as UpstreamTimeout; these two happen before a byte of the request
# was written (connecting, or waiting for a pooled connection to come free).
_NOT_SENT = ("connecting to the upstream", "no connection to the upstream came free")


class Upstreams:
    def __init__(self, settings: HTTPSettings) -> None:
        self.settings = settings
        self._clients: dict[str, HttpClient] = {}

    def _client(self, service: Service) -> HttpClient:
        limits = service.limits
        client = self._clients[service.name] = HttpClient(
            max_connections=self.settings.max_connections,
            connect_timeout=limits.connect_timeout,
            read_timeout=limits.timeout,
            idle_timeout=IDLE_TIMEOUT,
        )
        return client

    async def request(
        self,
        service: Service,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> Response:
        """Send the request; the response once its status and headers are in (the body not
        read yet). The caller must ``aclose()`` the response."""
        client = self._clients.get(service.name) or self._client(service)
        fields: dict[str, str] = {}
        for name, value in headers:
            have = fields.get(name)
            if have is None:
                fields[name] = value
            else:
                fields[name] = have + ("; " if name == "cookie" else ", ") + value
        return await client.request(method, url, headers=fields, body=body)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


def content_length(resp: Response) -> int | None:
    """The declared body size, or None (chunked, or delimited by the end of the connection).
    httptools has already refused a malformed or conflicting Content-Length."""
    for name, value in resp.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def not_sent(e: UpstreamTimeout) -> bool:
    """Did this timeout happen before any byte of the request reached the upstream?"""
    return str(e).startswith(_NOT_SENT)
