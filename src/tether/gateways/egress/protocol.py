"""HTTP/1.1 proxy protocol, with no I/O: parse a request head, a target, a credential; render
the gateway's answers; rewrite a forwarded request or response head.

Two request shapes are accepted (RFC 9110 §9.3.6, RFC 9112 §3.2):

* ``CONNECT host:port HTTP/1.1``: authority-form, the port is required; the main case (HTTPS);
* ``GET http://host[:port]/path HTTP/1.1``: absolute-form for ``http://`` URLs only.

Everything else is refused with a plain-text answer naming the problem. Hosts are normalised
(lower case, no trailing dot) and must be an IPv4 dotted quad, a bracketed IPv6 address or an
LDH host name; numeric names that the C resolver would read as an address (``127.1``,
``2130706433``, ``0x7f.1``) are refused so that what a grant matches is what gets dialled.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ESTABLISHED",
    "HOP_BY_HOP",
    "IPAddress",
    "ProxyError",
    "ProxyRequest",
    "Target",
    "content_length",
    "forward_head",
    "parse_head",
    "parse_host",
    "parse_port",
    "proxy_token",
    "render_error",
    "rewrite_response_head",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:\d+|0x[0-9a-f]*)$")
_PATH_BAD = re.compile(r"[\x00-\x20\x7f]")
_STATUS_LINE = re.compile(r"^HTTP/1\.[01] (\d{3})(?: .*)?$")

# Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the proxy's own
# credential. Headers named in ``Connection`` are dropped too.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "upgrade",
    }
)

_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class ProxyError(Exception):
    """A refusal in the protocol's own shape: a status, a plain-text reason and a stable code.

    The message never holds a credential: it names what was wrong, not the bytes sent."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.recorded = False  # the audit record of this refusal is already written

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.code!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class Target:
    """A destination. ``host`` is normalised; an IPv6 literal is written without brackets
    (``::1``), so ``resource`` (``host:port``) splits on its last colon."""

    host: str
    port: int
    ip: IPAddress | None = None

    @property
    def resource(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        """The form a Host header takes (brackets around IPv6)."""
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    method: str
    mode: Literal["connect", "http"]
    target: Target
    version: str
    headers: tuple[tuple[str, str], ...]  # (name as sent, value), in order
    path: str = ""  # origin-form path and query (http mode)

    def header(self, name: str) -> str | None:
        """The one value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def header_count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for k, _ in self.headers if k.lower() == lname)


def parse_port(text: str) -> int:
    if not text or len(text) > 5 or not text.isascii() or not text.isdigit():
        raise ProxyError(400, f"invalid port {text[:20]!r}: expected 1-65535", "bad_port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ProxyError(400, f"invalid port {port}: expected 1-65535", "bad_port")
    return port


def parse_host(text: str) -> tuple[str, IPAddress | None]:
    """Normalise a host as it appears in a request target; raise ProxyError if it is not one."""
    if not text:
        raise ProxyError(400, "the request names no host", "missing_host")
    if text.startswith("["):
        if not text.endswith("]") or "%" in text:
            raise ProxyError(400, f"invalid IPv6 literal {text[:60]!r}", "bad_host")
        try:
            ip6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise ProxyError(400, f"invalid IPv6 literal {text[:60]!r}", "bad_host") from None
        return ip6.compressed, ip6
    if not text.isascii():
        raise ProxyError(400, "host names must be ASCII (send the xn-- form of an IDN)", "bad_host")
    try:
        ip4 = ipaddress.IPv4Address(text)
    except ValueError:
        pass
    else:
        return str(ip4), ip4
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ProxyError(400, f"invalid host {text[:80]!r}", "bad_host")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise ProxyError(
            400,
            f"invalid host {text[:80]!r}: a numeric name that is not a dotted-quad address",
            "bad_host",
        )
    return host, None


def _authority(text: str, default_port: int | None) -> Target:
    if "@" in text:
        raise ProxyError(400, "credentials in the request target are refused", "bad_target")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ProxyError(400, f"invalid IPv6 literal {text[:60]!r}", "bad_host")
        host_part, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ProxyError(400, f"invalid authority {text[:80]!r}", "bad_target")
        port_part: str | None = rest[1:] if rest else None
    else:
        host_part, sep, port_text = text.rpartition(":")
        if not sep:
            host_part, port_part = text, None
        else:
            port_part = port_text
    if port_part is None:
        if default_port is None:
            raise ProxyError(400, f"CONNECT target {text[:80]!r} must be host:port", "missing_port")
        port = default_port
    else:
        port = parse_port(port_part)
    host, ip = parse_host(host_part)
    return Target(host, port, ip)


def _absolute(target: str) -> tuple[Target, str]:
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme.isascii():
        raise ProxyError(
            400,
            "this is an egress proxy: send CONNECT host:port, or an absolute-form "
            "request (GET http://host/path)",
            "bad_target",
        )
    scheme = scheme.lower()
    if scheme == "https":
        raise ProxyError(
            400, "https:// URLs go through CONNECT (set HTTPS_PROXY)", "https_needs_connect"
        )
    if scheme != "http":
        raise ProxyError(400, f"unsupported scheme {scheme[:20]!r}: only http", "bad_target")
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    if _PATH_BAD.search(path):
        raise ProxyError(400, "invalid characters in the request path", "bad_target")
    return _authority(authority, 80), path


def parse_head(head: bytes, max_headers: int) -> ProxyRequest:
    """Parse a request head (request line and headers, ending in CRLF CRLF)."""
    text = head.decode("latin-1")
    if not text.endswith("\r\n\r\n"):
        raise ProxyError(400, "incomplete request head", "bad_request")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise ProxyError(
            400, "malformed request line: expected METHOD TARGET HTTP/1.1", "bad_request"
        )
    method, raw_target, version = parts
    if not _TOKEN.match(method):
        raise ProxyError(400, "malformed request line: invalid method", "bad_request")
    m = _VERSION.match(version)
    if m is None:
        raise ProxyError(400, "malformed request line: invalid HTTP version", "bad_request")
    if m.group(1) != "1":
        raise ProxyError(505, f"{version} is not supported: speak HTTP/1.1", "bad_version")
    if len(lines) - 1 > max_headers:
        raise ProxyError(431, f"more than {max_headers} header lines", "too_many_headers")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise ProxyError(400, "malformed header (folded or empty line)", "bad_header")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ProxyError(400, "malformed header line", "bad_header")
        value = value.strip(" \t")
        if any(c in value for c in "\r\n\x00"):
            raise ProxyError(400, f"invalid characters in header {name[:40]}", "bad_header")
        headers.append((name, value))
    if method == "CONNECT":
        return ProxyRequest(
            method, "connect", _authority(raw_target, None), version, tuple(headers)
        )
    target, path = _absolute(raw_target)
    req = ProxyRequest(method, "http", target, version, tuple(headers), path)
    _check_framing(req)
    return req


def _check_framing(req: ProxyRequest) -> None:
    """Refuse ambiguous request bodies (the classic smuggling shapes)."""
    te = req.header("transfer-encoding")
    cls = [v for k, v in req.headers if k.lower() == "content-length"]
    if te is not None:
        if cls:
            raise ProxyError(400, "both Content-Length and Transfer-Encoding", "bad_framing")
        if req.header_count("transfer-encoding") != 1 or te.strip().lower() != "chunked":
            raise ProxyError(501, "only Transfer-Encoding: chunked is supported", "bad_framing")
    if cls and (len(set(cls)) != 1 or not cls[0].isascii() or not cls[0].isdigit()):
        raise ProxyError(400, "invalid Content-Length", "bad_framing")


def content_length(req: ProxyRequest) -> int | None:
    value = req.header("content-length")
    return None if value is None else int(value)


def proxy_token(value: str | None) -> str:
    """The token inside a ``Proxy-Authorization`` value: ``Bearer <token>`` or
    ``Basic base64(user:token)`` (the token may also be the user name with an empty password,
    as ``http://TOKEN@host:port`` proxy URLs send). Raises ProxyError 407."""
    if value is None:
        raise _auth_required("no credential: send Proxy-Authorization with your Tether token")
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer" and rest:
        return rest
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _auth_required("Proxy-Authorization Basic value is not base64") from None
        user, _, password = decoded.partition(":")
        token = (password or user).strip()
        if token:
            return token
    raise _auth_required(
        "Proxy-Authorization must be 'Bearer <token>' or 'Basic base64(user:token)'"
    )


def _auth_required(message: str) -> ProxyError:
    return ProxyError(
        407,
        message,
        "proxy_auth_required",
        (
            ("Proxy-Authenticate", 'Basic realm="tether", charset="UTF-8"'),
            ("Proxy-Authenticate", 'Bearer realm="tether"'),
        ),
    )


def render_error(err: ProxyError) -> bytes:
    """The gateway's answer for a refusal: plain text, ``Connection: close``."""
    body = f"tether egress: {err.message}\n".encode()
    lines = [
        f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"X-Tether-Error: {err.code}",
    ]
    lines += [f"{k}: {v}" for k, v in err.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def _connection_tokens(headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for k, v in headers:
        if k.lower() in ("connection", "proxy-connection"):
            named.update(t.strip().lower() for t in v.split(",") if t.strip())
    return named


def forward_head(req: ProxyRequest) -> bytes:
    """The request as the destination sees it: origin-form, Host set to the target,
    hop-by-hop headers (and the proxy credential) removed, ``Connection: close``."""
    drop = HOP_BY_HOP | _connection_tokens(req.headers) | {"host"}
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {_host_header(req.target)}"]
    lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _host_header(t: Target) -> str:
    return t.authority if t.port != 80 else t.authority.rpartition(":")[0]


def rewrite_response_head(head: bytes) -> tuple[int, bytes]:
    """(status, head) for a destination's response head: hop-by-hop headers removed and
    ``Connection: close`` added (the gateway serves one request per plain-HTTP connection).
    Raises ProxyError 502 if it is not an HTTP/1.x response head."""
    text = head.decode("latin-1")
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else []
    m = _STATUS_LINE.match(lines[0]) if lines else None
    if m is None:
        raise ProxyError(502, "the destination did not answer with HTTP/1.x", "bad_upstream")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ProxyError(502, "the destination sent a malformed header", "bad_upstream")
        headers.append((name, value.strip(" \t")))
    drop = HOP_BY_HOP | _connection_tokens(headers)
    out = [lines[0]] + [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
    out.append("Connection: close")
    return int(m.group(1)), ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
