"""Redaction: every named secret shape is removed; ordinary text is left alone."""

from __future__ import annotations

import hashlib

import pytest

from tether.audit.redact import REDACTED, is_secret_key, redact, redact_bytes, redact_text

# Named secret fixtures (fake values of the real shapes).
BOGUS_JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0"
    ".eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9hZ2VudC9hIn0"
    ".MEUCIQDx3c2lnbmF0dXJlLWJ5dGVzLW5vdC1yZWFs"
)
BOGUS_JWE = "eyJhbGciOiJSU0EtT0FFUCJ9.a2V5.aXY.Y2lwaGVydGV4dA.dGFn"
BOGUS_OPENAI_KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123"
BOGUS_ANTHROPIC_KEY = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz-0123456789"
BOGUS_TETHER_CREDENTIAL = "tether_uc_Zm9vYmFyYmF6cXV4cXV1eGNvcmdl"
BOGUS_GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
BOGUS_AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
BOGUS_BEARER_OPAQUE = "Bearer 3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
BOGUS_PEM = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBase64Stuff\n-----END EC PRIVATE KEY-----"

SHAPED = [
    BOGUS_OPENAI_KEY,
    BOGUS_ANTHROPIC_KEY,
    BOGUS_TETHER_CREDENTIAL,
    BOGUS_GITHUB_TOKEN,
    BOGUS_AWS_KEY_ID,
    BOGUS_PEM,
]


def jwt_marker(token: str) -> str:
    return f"[REDACTED jwt sha256:{hashlib.sha256(token.encode()).hexdigest()[:16]}]"


@pytest.mark.parametrize("secret", SHAPED, ids=lambda s: s[:10])
def test_secret_shapes_are_removed_from_text_and_bytes(secret: str) -> None:
    text = f"calling upstream with {secret} now"
    assert secret not in redact_text(text)
    assert REDACTED in redact_text(text)
    assert secret.encode() not in redact_bytes(text.encode())


@pytest.mark.parametrize("token", [BOGUS_JWT, BOGUS_JWE], ids=["jws", "jwe"])
def test_jwts_become_a_correlatable_marker(token: str) -> None:
    assert redact_text(f"token={token}") == f"token={jwt_marker(token)}"
    assert redact_text("token=opaque-value&x=1") == "token=[REDACTED]&x=1"
    assert redact_text(f"got {token}.") == f"got {jwt_marker(token)}."
    assert redact_bytes(f"got {token}".encode()) == f"got {jwt_marker(token)}".encode()


def test_bearer_and_authorization_headers() -> None:
    assert redact_text(BOGUS_BEARER_OPAQUE) == "Bearer [REDACTED]"
    raw = b"POST /v1/chat HTTP/1.1\r\nAuthorization: Basic dXNlcjpwYXNz\r\nX-Other: 1\r\n"
    assert redact_bytes(raw) == (
        b"POST /v1/chat HTTP/1.1\r\nAuthorization: [REDACTED]\r\nX-Other: 1\r\n"
    )


def test_json_members_with_secret_names_inside_bodies() -> None:
    body = b'{"model":"m","API_KEY":"hunter2","client_secret":"s3cr\\"et","max_tokens":5}'
    assert redact_bytes(body) == (
        b'{"model":"m","API_KEY":"[REDACTED]","client_secret":"[REDACTED]","max_tokens":5}'
    )


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "token",
        "access_token",
        "subject_token",
        "actor_token",
        "api_key",
        "x-api-key",
        "X-Api-Key",
        "password",
        "secret",
        "credential",
        "private_key",
        "refresh_token",
        "client_secret",
        "cookie",
        "github_token",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)
    assert redact({"outer": [{key: {"anything": 1}}]}) == {"outer": [{key: REDACTED}]}


@pytest.mark.parametrize(
    "key", ["max_tokens", "tokens", "token_type", "input_tokens", "model", "jti", "keys"]
)
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: "value"}) == {key: "value"}


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/agent/researcher",
        "model:gpt-4o*",
        "a basic example: the bearer of good news asked for the key to the token economy",
        "Summarise the churn report for Q3 and list the top five accounts.",
        "skeleton sk-short",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact_text(text) == text
    assert redact_bytes(text.encode()) == text.encode()


def test_redact_keeps_types_and_leaves_none() -> None:
    data = {"n": 1, "f": 0.5, "ok": True, "token": None, "list": (1, "x")}
    assert redact(data) == {"n": 1, "f": 0.5, "ok": True, "token": None, "list": [1, "x"]}


def test_non_ascii_text_with_a_secret() -> None:
    text = f"İstanbul {BOGUS_BEARER_OPAQUE} ünïcode"
    assert redact_text(text) == "İstanbul Bearer [REDACTED] ünïcode"
