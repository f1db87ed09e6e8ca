"""Errors as JSON: ``{"error": {"type", "message", ...}}`` with the status that names the cause.

=====  =========================================================================
400    ``bad_path``, ``bad_header``, ``bad_framing``, ``client_disconnected``
401    ``unauthenticated`` (no token, a malformed header, a refused token)
403    ``policy_denied``, ``not_granted``, ``rule_denied``, ``approval_required``
404    ``unknown_service``
405    ``method_not_allowed``
413    ``request_too_large``
431    ``headers_too_large``
502    ``upstream_unreachable``, ``upstream_garbage``, ``upstream_disconnected``,
       ``response_too_large``, ``gateway_error``
503    ``audit_unavailable`` (the record could not be made durable: nothing forwarded)
504    ``upstream_timeout``
=====  =========================================================================

Messages name services, paths, rules and policy reasons; never a token or a credential.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["HTTPGatewayError", "render_error"]


@dataclass(slots=True)
class HTTPGatewayError(Exception):
    status: int
    type: str
    message: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def render_error(err: HTTPGatewayError, request_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) for ``err``."""
    doc: dict[str, Any] = {"type": err.type, "message": err.message, **err.extra}
    doc["request_id"] = request_id
    body = orjson.dumps({"error": doc})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-tether-request-id", request_id.encode()),
    ]
    if err.status == 401:
        headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
    return headers, body
