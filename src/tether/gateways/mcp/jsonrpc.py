"""JSON-RPC 2.0 as MCP uses it: message checks, the error codes Tether answers with, and the
bytes of responses. No I/O.

Error codes (``error.data.reason`` carries a stable name for programs)::

    -32700  parse_error          the body is not JSON
    -32600  invalid_request      not a JSON-RPC 2.0 message; batches (removed in MCP 2025-06-18);
                                 missing / unknown session; message too large (HTTP 413)
    -32601  method_not_found     a method the gateway does not serve or forward
    -32602  invalid_params       params of the wrong shape; a tool that does not exist
    -32603  gateway_error        the gateway itself failed (HTTP 502; a bug: see the log)
    -32050  policy_denied        tools/call denied by policy (data: reasons, policies)
    -32051  approval_pending     tools/call needs an approval (data: approval, quorum); retry
                                 once it is approved
    -32052  tool_blocked         the tool's definition changed since it was approved, or it
                                 was never approved (data: sha256, approved_sha256)
    -32053  audit_unavailable    the call's record could not be made durable: refused
    -32054  upstream_timeout     the upstream did not answer within the timeout
    -32055  upstream_failed      the upstream is unreachable or answered garbage
    -32056  inspection_blocked   an inspector blocked the call or its result
    -32057  tool_refused         the upstream lists the tool under a name Tether refuses
                                 (look-alike of another tool, characters outside A-Z a-z 0-9 _ - .)
    -32058  unauthenticated      no valid Tether token (HTTP 401)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "APPROVAL_PENDING",
    "AUDIT_UNAVAILABLE",
    "INSPECTION_BLOCKED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "POLICY_DENIED",
    "TOOL_BLOCKED",
    "TOOL_REFUSED",
    "UNAUTHENTICATED",
    "UPSTREAM_FAILED",
    "UPSTREAM_TIMEOUT",
    "Message",
    "RpcError",
    "error_bytes",
    "parse_message",
    "result_bytes",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
POLICY_DENIED = -32050
APPROVAL_PENDING = -32051
TOOL_BLOCKED = -32052
AUDIT_UNAVAILABLE = -32053
UPSTREAM_TIMEOUT = -32054
UPSTREAM_FAILED = -32055
INSPECTION_BLOCKED = -32056
TOOL_REFUSED = -32057
UNAUTHENTICATED = -32058

RequestId = str | int


@dataclass(slots=True)
class RpcError(Exception):
    """A JSON-RPC error to answer with. ``status`` is the HTTP status it travels under."""

    code: int
    message: str
    reason: str
    status: int = 200
    data: Mapping[str, Any] = field(default_factory=dict)
    recorded: bool = False  # already in the audit log (as a tool.call decision or result)
    note: str = ""  # for the audit record only, not for the caller

    def __str__(self) -> str:
        return self.message

    def payload(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "data": {"reason": self.reason, **self.data},
        }


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming JSON-RPC message: a request (``id`` set) or a notification."""

    method: str
    id: RequestId | None
    params: Mapping[str, Any]
    is_request: bool


def _bad(message: str, reason: str = "invalid_request") -> RpcError:
    return RpcError(INVALID_REQUEST, message, reason, 400)


def parse_message(body: bytes) -> Message:
    """The message in ``body``, or an :class:`RpcError` saying what is wrong with it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RpcError(PARSE_ERROR, "the body is not valid JSON", "parse_error", 400) from None
    if isinstance(doc, list):
        raise _bad(
            "JSON-RPC batches are not supported (MCP removed them in 2025-06-18): send one "
            "message per POST",
            "batch_refused",
        )
    if not isinstance(doc, dict):
        raise _bad("a JSON-RPC message must be a JSON object")
    if doc.get("jsonrpc") != "2.0":
        raise _bad('"jsonrpc" must be "2.0"')
    method = doc.get("method")
    if method is None:
        if "result" in doc or "error" in doc:
            raise _bad(
                "unexpected JSON-RPC response: this gateway sends no requests to clients",
                "unexpected_response",
            )
        raise _bad('a JSON-RPC request needs a "method"')
    if not isinstance(method, str) or not method or len(method) > 128:
        raise _bad('"method" must be a non-empty string of at most 128 characters')
    is_request = "id" in doc
    rid = doc.get("id")
    if is_request and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise _bad('"id" must be a string or an integer (MCP forbids null ids)')
    if isinstance(rid, str) and len(rid) > 256:
        raise _bad('"id" is longer than 256 characters')
    params = doc.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise (
            RpcError(INVALID_PARAMS, '"params" must be an object', "invalid_params", 200, {})
            if is_request
            else _bad('"params" must be an object')
        )
    return Message(method, rid if is_request else None, params, is_request)


def result_bytes(rid: RequestId | None, result: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": result})


def error_bytes(rid: RequestId | None, err: RpcError) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "error": err.payload()})
