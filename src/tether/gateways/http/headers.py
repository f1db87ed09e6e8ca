"""What crosses the gateway in headers, both ways, and what is kept out. No I/O here.

Agent -> upstream: every end-to-end header the agent sent, except

* its ``Authorization`` (the Tether token, verified here and never forwarded) and
  ``Proxy-Authorization``;
* hop-by-hop headers (RFC 9110 7.6.1: ``Connection``, ``Keep-Alive``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``) and every header ``Connection`` names. The
  credential is added *after* this filter and ``Connection`` is never forwarded, so
  ``Connection: X-Api-Key`` cannot make anything downstream drop the injected header;
* ``Host`` (the upstream's is set), ``Content-Length`` (recomputed), ``Expect``;
* anything claiming to describe the client: ``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``
  (the gateway sets ``X-Forwarded-For``/``-Proto``/``-Host``/``-Prefix`` itself);
* the header the service's credential is injected as (an agent cannot supply its own);
* ``Cookie``, unless the service sets ``forward_cookies``: a cookie is a credential the agent
  would otherwise carry past the decision.

Upstream -> agent: the response headers minus hop-by-hop ones, minus ``Set-Cookie`` unless
``forward_cookies`` (a session the upstream opened with the injected credential must not
become the agent's), with any occurrence of the credential masked. A ``Location`` inside the
service's base URL is rewritten to the gateway's path.

Refused: a header name that is not an RFC 9110 token, a CR, LF, NUL or other control byte in a
value (a raw ASGI scope can carry them), more than ``MAX_HEADERS`` headers or more bytes than
the limit (431), ``Transfer-Encoding`` other than exactly ``chunked``, or together with
``Content-Length``, and ``Content-Length`` values that disagree (request smuggling).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from tether.gateways.http.config import MAX_HEADERS
from tether.gateways.http.errors import HTTPGatewayError

__all__ = [
    "SENSITIVE_HEADERS",
    "Inbound",
    "Scrubber",
    "inbound",
    "outbound",
    "record_headers",
]

_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NEVER_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"content-length",
    b"expect",
    b"forwarded",
    b"x-real-ip",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-server",
    b"x-tether-request-id",
}
# Header values never written to a record (the audit log also redacts secret-named keys).
SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-access-token",
        "api-key",
    }
)


@dataclass(frozen=True, slots=True)
class Inbound:
    """The agent's request headers, checked and split."""

    token: str | None
    auth_error: str | None  # why the Authorization header is unusable, if it is
    host: str
    forward: list[tuple[str, str]]  # end-to-end headers to send upstream


def inbound(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    max_bytes: int,
    injected: str,
    forward_cookies: bool,
) -> Inbound:
    if len(headers) > MAX_HEADERS:
        raise HTTPGatewayError(431, "headers_too_large", f"more than {MAX_HEADERS} headers")
    total = 0
    auth: list[bytes] = []
    lengths: set[bytes] = set()
    te: list[bytes] = []
    named: set[bytes] = set()
    host = ""
    for name, value in headers:
        total += len(name) + len(value) + 4
        if not _NAME.match(name):
            raise HTTPGatewayError(400, "bad_header", "a header name is not a valid token")
        if _BAD_VALUE.search(value):
            raise HTTPGatewayError(
                400, "bad_header", f"header {name.decode()!r} holds a control character"
            )
        if name == b"authorization":
            auth.append(value)
        elif name == b"content-length":
            lengths.add(value.strip())
        elif name == b"transfer-encoding":
            te.append(value.strip().lower())
        elif name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
        elif name == b"host":
            host = value.decode("latin-1")
    if total > max_bytes:
        raise HTTPGatewayError(
            431, "headers_too_large", f"request headers exceed {max_bytes} bytes"
        )
    if te and (te != [b"chunked"] or lengths):
        raise HTTPGatewayError(
            400,
            "bad_framing",
            "Transfer-Encoding must be exactly 'chunked', without Content-Length",
        )
    if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
        raise HTTPGatewayError(400, "bad_framing", "conflicting or invalid Content-Length")
    token, auth_error = _bearer(auth)
    drop = _NEVER_FORWARDED | named | {injected.encode()} if injected else _NEVER_FORWARDED | named
    if not forward_cookies:
        drop = drop | {b"cookie"}
    forward = [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in headers
        if n not in drop and not n.startswith(b"proxy-")
    ]
    return Inbound(token, auth_error, host, forward)


def _bearer(values: list[bytes]) -> tuple[str | None, str | None]:
    if not values:
        return None, "no token: send 'Authorization: Bearer <your Tether token>'"
    if len(values) > 1:
        return None, "more than one Authorization header"
    scheme, _, token = values[0].decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None, "the Authorization header must be 'Bearer <token>'"
    return token, None


def outbound(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    forward_cookies: bool,
    scrub: Scrubber | None,
    base_url: str,
    prefix: str,
) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the agent gets them."""
    pairs = [(n.lower(), v) for n, v in raw]
    named = {t.strip().lower() for n, v in pairs if n == b"connection" for t in v.split(b",")}
    out: list[tuple[bytes, bytes]] = []
    for n, v in pairs:
        if n in HOP_BY_HOP or n in named or (n == b"set-cookie" and not forward_cookies):
            continue
        if n == b"location":
            v = _relocate(v, base_url, prefix)
        if scrub is not None:
            v = scrub.mask(v)
        out.append((n, v))
    return out


def _relocate(value: bytes, base_url: str, prefix: str) -> bytes:
    """A redirect inside the service (absolute, or a path under its base) -> the gateway."""
    text = value.decode("latin-1")
    if text.startswith("//"):  # another host, scheme-relative
        return value
    for base in (base_url, urlsplit(base_url).path):
        if text.startswith(base or "/") and (not base or text == base or text[len(base)] in "/?"):
            return (prefix + text[len(base) :]).encode("latin-1")
    return value


def record_headers(
    pairs: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]], injected: str
) -> dict[str, str]:
    """Headers as a record holds them: one key per name, sensitive values redacted."""
    out: dict[str, str] = {}
    for n, v in pairs:
        name = n.decode("latin-1") if isinstance(n, bytes) else n
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        name = name.lower()
        if name in SENSITIVE_HEADERS or name == injected:
            value = "[REDACTED]"
        out[name] = out[name] + ", " + value if name in out else value
    return out


class Scrubber:
    """Masks a credential's byte strings (``needles``) in a stream, chunk by chunk, keeping
    lengths (so ``Content-Length`` stays right). Only a tail that could be the start of a
    needle is held back, so an event stream is not delayed by it."""

    __slots__ = ("_hold", "needles")

    def __init__(self, needles: Sequence[bytes]) -> None:
        self.needles = tuple(needles)
        self._hold = b""

    def mask(self, data: bytes) -> bytes:
        for n in self.needles:
            if n in data:
                data = data.replace(n, b"*" * len(n))
        return data

    def feed(self, chunk: bytes) -> bytes:
        data = self.mask(self._hold + chunk) if self._hold else self.mask(chunk)
        keep = self._partial(data)
        if keep:
            self._hold = data[-keep:]
            return data[:-keep]
        self._hold = b""
        return data

    def end(self) -> bytes:
        out, self._hold = self._hold, b""
        return out

    def _partial(self, data: bytes) -> int:
        """The length of the longest tail of ``data`` that is a proper prefix of a needle."""
        best = 0
        size = len(data)
        for n in self.needles:
            first = n[:1]
            i = data.find(first, max(0, size - len(n) + 1))
            while i != -1:
                if n.startswith(data[i:]):
                    best = max(best, size - i)
                    break
                i = data.find(first, i + 1)
        return best
