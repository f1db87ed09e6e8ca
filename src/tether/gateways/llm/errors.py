"""Errors in each API's own shape, so the official SDKs raise their usual exceptions.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic:
``{"type": "error", "error": {"type", "message"}}``. The status picks the SDK exception
(400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
413, 429 RateLimitError, 502/503/504 APIStatusError / InternalServerError). Refusals Tether
decides (deny, escalate, budget) carry ``x-should-retry: false`` so SDKs do not retry them.
No message ever contains a token or an upstream key.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

__all__ = ["GatewayError", "render_error"]

_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


@dataclass(slots=True)
class GatewayError(Exception):
    """A refusal or failure to return in the API's shape.

    ``code`` is Tether's stable reason (``model_not_granted``, ``policy_denied``,
    ``approval_pending``, ``budget_exceeded``, ``upstream_timeout`` ...).
    """

    status: int
    message: str
    code: str
    param: str | None = None
    retry: bool = False

    def __str__(self) -> str:
        return self.message


def render_error(api: str, err: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) for ``err`` in the shape of ``api`` (openai / anthropic)."""
    if api == "anthropic":
        body = orjson.dumps(
            {
                "type": "error",
                "error": {
                    "type": _ANTHROPIC_TYPE.get(err.status, "api_error"),
                    "message": err.message,
                    "code": err.code,
                },
            }
        )
    else:
        body = orjson.dumps(
            {
                "error": {
                    "message": err.message,
                    "type": _OPENAI_TYPE.get(err.status, "api_error"),
                    "param": err.param,
                    "code": err.code,
                }
            }
        )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-should-retry", b"true" if err.retry else b"false"),
        (b"cache-control", b"no-store"),
    ]
    if err.status == 401:
        headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
    return err.status, headers, body
