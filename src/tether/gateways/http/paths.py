"""Request targets: ``/http/<service>/<path>`` from the raw bytes, normalised once.

Rules and policy match the path this module returns, and the upstream receives exactly that
path re-encoded, so what was decided is what is forwarded. Everything is read from the raw
request target (``raw_path``), never from the server's decoded ``path``: a server decodes
``%2F`` into ``/``, which would let ``/customers%2F..%2Fadmin`` be matched as one thing and
routed upstream as another.

Refused (400), because upstreams disagree on what they mean:

* an encoded ``/`` or ``\\`` (``%2F``, ``%5C``) and any backslash;
* a segment that still holds a percent escape after one decoding (double encoding,
  ``%252e%252e``);
* a decoded control character (``%00``, ``%0d%0a``), invalid UTF-8, a raw byte outside
  printable ASCII;
* ``..`` that would climb above the service's root (``/http/crm/../admin``), and a dot segment
  with a ``;`` parameter (``..;``: Tomcat and Spring treat it as ``..``).

``.`` segments and empty segments (``//``) are removed and ``..`` inside the service is
resolved; a trailing ``/`` is kept. No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

__all__ = ["PREFIX", "PathError", "Target", "parse_target"]

PREFIX = b"/http/"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DOUBLE = re.compile(r"%[0-9A-Fa-f]{2}")
# RFC 3986 pchar minus the percent escape itself: what a segment may carry unencoded.
_SAFE = "-._~!$&'()*+,;=:@"
_QUERY_OK = re.compile(rb"^[\x21-\x7e]*$")


class PathError(Exception):
    """A target the gateway refuses; ``status`` is 400 (bad path) or 404 (no such service)."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_path") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Target:
    service: str
    path: str  # decoded and normalised, starts with "/" ("/customers/42")
    encoded: str  # the same path percent-encoded for the upstream request line
    query: str  # the raw query string, "" if none (validated, forwarded as sent)

    @property
    def resource(self) -> str:
        """The Cedar resource: ``crm/customers/42`` (service, then the path)."""
        return self.service + self.path


def _decode(seg: bytes) -> str:
    """Percent-decode one raw segment (once), refusing what would be read two ways."""
    if b"%" in seg:
        if _BAD_ESCAPE.search(seg):
            raise PathError("malformed percent-encoding in the path")
        raw = unquote_to_bytes(seg)
    else:
        raw = seg
    if b"/" in raw or b"\\" in raw:
        raise PathError("an encoded '/' or '\\' in the path is refused (upstreams disagree on it)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("the path is not valid UTF-8 once decoded") from None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise PathError("the path holds a control character once decoded")
    if "%" in text and _DOUBLE.search(text):
        raise PathError("a double-encoded path is refused (%25 followed by an escape)")
    return text


def parse_target(raw_path: bytes, query: bytes = b"") -> Target:
    """``/http/crm/a/../customers/42`` -> Target("crm", "/customers/42", ...)."""
    raw_path = raw_path.split(b"?", 1)[0]
    if not raw_path.startswith(PREFIX):
        raise PathError("the path must start with /http/<service>/", 404, "unknown_service")
    for b in raw_path:
        if b <= 0x20 or b >= 0x7F:
            raise PathError("the path holds a raw space, control or non-ASCII byte")
    if b"\\" in raw_path:
        raise PathError("a backslash in the path is refused")
    parts = raw_path[len(PREFIX) :].split(b"/")
    service = parts[0].decode("ascii")
    if not service:
        raise PathError("no service named: use /http/<service>/<path>", 404, "unknown_service")
    stack: list[str] = []
    trailing = len(parts) > 1 and parts[-1] == b""
    for seg in parts[1:]:
        if not seg:
            continue
        text = _decode(seg)
        head = text.split(";", 1)[0]
        if head in (".", "..") and ";" in text:
            raise PathError("a dot segment with a ';' parameter is refused")
        if text == ".":
            continue
        if text == "..":
            if not stack:
                raise PathError(f"the path climbs above the root of service {service!r}")
            stack.pop()
            continue
        stack.append(text)
    if query and not _QUERY_OK.match(query):
        raise PathError("the query string holds a raw space, control or non-ASCII byte")
    if b"#" in query:
        raise PathError("a '#' in the query string is refused")
    path = "/" + "/".join(stack) + ("/" if trailing and stack else "")
    encoded = (
        "/" + "/".join(quote(s, safe=_SAFE) for s in stack) + ("/" if trailing and stack else "")
    )
    return Target(service, path, encoded, query.decode("ascii"))
