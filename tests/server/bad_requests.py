"""Named bad inputs for the API. Each is (method, path, kwargs for httpx) with a placeholder
``{token}`` replaced by a valid admin token where a request needs one to get that far."""

from __future__ import annotations

from typing import Any

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"

BOGUS_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"

BAD_REQUESTS: dict[str, tuple[str, str, dict[str, Any], int, str]] = {
    # name: (method, path, request kwargs, expected status, expected error code)
    "bogus_malformed_json": (
        "POST",
        "/v1/token",
        {"content": b'{"grant_type": "urn:', "headers": {"content-type": "application/json"}},
        400,
        "invalid_request",
    ),
    "bogus_json_not_object": (
        "POST",
        "/v1/token",
        {"content": b"[1,2,3]", "headers": {"content-type": "application/json"}},
        400,
        "invalid_request",
    ),
    "bogus_json_nested_values": (
        "POST",
        "/v1/token",
        {"json": {"grant_type": {"a": 1}}},
        400,
        "invalid_request",
    ),
    "bogus_malformed_form": (
        "POST",
        "/v1/token",
        {
            "content": b"grant_type&&=%zz",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
    ),
    "bogus_non_utf8_form": (
        "POST",
        "/v1/token",
        {
            "content": b"grant_type=\xff\xfe",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
    ),
    "bogus_wrong_content_type": (
        "POST",
        "/v1/token",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        400,
        "invalid_request",
    ),
    "bogus_oversized_body": (
        "POST",
        "/v1/token",
        {"data": {"grant_type": TOKEN_EXCHANGE, "objective": "x" * 200_000}},
        413,
        "invalid_request",
    ),
    "bogus_unsupported_grant_type": (
        "POST",
        "/v1/token",
        {"data": {"grant_type": "password"}},
        400,
        "unsupported_grant_type",
    ),
    "bogus_missing_subject_token": (
        "POST",
        "/v1/token",
        {"data": {"grant_type": TOKEN_EXCHANGE}},
        400,
        "invalid_request",
    ),
    "bogus_duplicate_parameter": (
        "POST",
        "/v1/token",
        {
            "content": f"grant_type={TOKEN_EXCHANGE}&grant_type={TOKEN_EXCHANGE}".encode(),
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        400,
        "invalid_request",
    ),
    "bogus_subject_token_garbage": (
        "POST",
        "/v1/token",
        {
            "data": {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": "not.a.jwt",
                "subject_token_type": JWT,
                "agent": "x",
            }
        },
        400,
        "invalid_request",
    ),
    "bogus_bad_agent_name": (
        "POST",
        "/v1/token",
        {
            "data": {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": "{token}",
                "subject_token_type": JWT,
                "agent": "../../etc",
            }
        },
        400,
        "invalid_request",
    ),
    "bogus_unknown_grant_kind": (
        "POST",
        "/v1/token",
        {
            "data": {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": "{token}",
                "subject_token_type": JWT,
                "agent": "x",
                "grant": ["root:*"],
            }
        },
        400,
        "invalid_request",
    ),
    "bogus_bad_ttl": (
        "POST",
        "/v1/token",
        {
            "data": {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": "{token}",
                "subject_token_type": JWT,
                "agent": "x",
                "ttl": "forever",
            }
        },
        400,
        "invalid_request",
    ),
    "bogus_no_bearer": ("GET", "/v1/whoami", {}, 401, "unauthenticated"),
    "bogus_basic_auth": (
        "GET",
        "/v1/whoami",
        {"headers": {"authorization": "Basic YWRtaW46YWRtaW4="}},
        401,
        "unauthenticated",
    ),
    "bogus_revoke_unknown_kind": (
        "POST",
        "/v1/revoke",
        {
            "json": {"kind": "everything", "value": "x"},
            "headers": {"authorization": "Bearer {token}"},
        },
        400,
        "invalid_request",
    ),
    "bogus_revoke_bad_spiffe_id": (
        "POST",
        "/v1/revoke",
        {
            "json": {"kind": "agent", "value": "not-a-spiffe-id"},
            "headers": {"authorization": "Bearer {token}"},
        },
        400,
        "invalid_request",
    ),
    "bogus_csr": (
        "POST",
        "/v1/svid/x509",
        {
            "json": {"csr": BOGUS_CSR},
            "headers": {"authorization": "Bearer {token}"},
        },
        400,
        "invalid_request",
    ),
    "bogus_unknown_route": ("GET", "/v1/nope", {}, 404, "not_found"),
}
