"""ES256 compact JWS: what we sign is standard, and only ES256 with a trusted key verifies."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tether.errors import BadRequest, ConfigError, InvalidToken
from tether.identity.jws import MAX_TOKEN_BYTES, decode_unverified, sign_es256, verify_es256
from tether.identity.keys import ec_public_jwk

PAYLOAD: dict[str, Any] = {
    "iss": "spiffe://example.org",
    "sub": "spiffe://example.org/agent/researcher",
    "aud": ["tether"],
    "exp": 1_800_001_800,
    "tether": {"grants": ["model:gpt-4o*"], "task": "t-1"},
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def keys(key: ec.EllipticCurvePrivateKey) -> dict[str, ec.EllipticCurvePublicKey]:
    return {"k1": key.public_key()}


def raw_signed(key: ec.EllipticCurvePrivateKey, header: Any, payload: Any = PAYLOAD) -> str:
    """A token with any header, correctly ES256-signed: only the header check can refuse it."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def refused(token: str, keys: dict[str, ec.EllipticCurvePublicKey], says: str) -> None:
    with pytest.raises(InvalidToken) as info:
        verify_es256(token, keys)
    assert type(info.value) is InvalidToken
    assert says in str(info.value)
    assert not token or token not in str(info.value)


def test_sign_then_verify_round_trips(key: ec.EllipticCurvePrivateKey, keys: Any) -> None:
    token = sign_es256(PAYLOAD, key, "k1")
    assert verify_es256(token, keys) == PAYLOAD


def test_token_is_standard_compact_jws(key: ec.EllipticCurvePrivateKey) -> None:
    token = sign_es256(PAYLOAD, key, "k1")
    h, p, s = token.split(".")
    assert "=" not in token
    assert unb64(h) == b'{"alg":"ES256","kid":"k1","typ":"JWT"}'
    assert orjson.loads(unb64(p)) == PAYLOAD
    assert len(unb64(s)) == 64  # raw r || s, RFC 7518 section 3.4, not DER


def test_pyjwt_verifies_our_tokens_and_we_verify_pyjwt_tokens(
    key: ec.EllipticCurvePrivateKey, keys: Any
) -> None:
    ours = sign_es256(PAYLOAD, key, "k1")
    assert jwt.decode(ours, key.public_key(), algorithms=["ES256"], audience="tether") == PAYLOAD
    theirs = jwt.encode(PAYLOAD, key, algorithm="ES256", headers={"kid": "k1"})
    assert verify_es256(theirs, keys) == PAYLOAD


def test_decode_unverified_shows_header_and_payload(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    header, payload = decode_unverified(sign_es256(PAYLOAD, other, "someone-else"))
    assert header["kid"] == "someone-else"
    assert payload == PAYLOAD


def test_decode_unverified_still_checks_shape() -> None:
    with pytest.raises(InvalidToken, match="3 dot-separated"):
        decode_unverified("abc")


@pytest.mark.parametrize(
    "alg",
    ["none", "None", "NONE", "HS256", "RS256", "PS256", "ES384", "ES512", "EdDSA", "es256", ""],
)
def test_every_other_algorithm_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Any, alg: str
) -> None:
    # Signed correctly with the trusted key: the algorithm alone must cause the refusal.
    refused(raw_signed(key, {"alg": alg, "kid": "k1"}), keys, "unsupported token algorithm")


@pytest.mark.parametrize("header", [{"kid": "k1"}, {"alg": ["ES256"], "kid": "k1"}])
def test_missing_or_odd_alg_is_refused(
    key: ec.EllipticCurvePrivateKey, keys: Any, header: Any
) -> None:
    refused(raw_signed(key, header), keys, "only ES256 is accepted")


@pytest.mark.parametrize(
    "header", [{"alg": "ES256"}, {"alg": "ES256", "kid": 7}, {"alg": "ES256", "kid": ""}]
)
def test_kid_is_required(key: ec.EllipticCurvePrivateKey, keys: Any, header: Any) -> None:
    refused(raw_signed(key, header), keys, "no key id")


@pytest.mark.parametrize("typ", ["JWT", "JOSE", None])
def test_jwt_svid_typ_values_are_accepted(
    key: ec.EllipticCurvePrivateKey, keys: Any, typ: str | None
) -> None:
    header = {"alg": "ES256", "kid": "k1"} | ({"typ": typ} if typ else {})
    assert verify_es256(raw_signed(key, header), keys) == PAYLOAD


def test_other_typ_is_refused(key: ec.EllipticCurvePrivateKey, keys: Any) -> None:
    refused(raw_signed(key, {"alg": "ES256", "kid": "k1", "typ": "dpop+jwt"}), keys, "token type")


def test_crit_is_refused(key: ec.EllipticCurvePrivateKey, keys: Any) -> None:
    refused(raw_signed(key, {"alg": "ES256", "kid": "k1", "crit": ["b64"]}), keys, "'crit'")


def test_embedded_jwk_header_is_never_trusted(keys: Any) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "ES256", "kid": "k1", "jwk": ec_public_jwk(attacker.public_key())}
    refused(raw_signed(attacker, header), keys, "signature does not verify")
    header["kid"] = "attacker"
    refused(raw_signed(attacker, header), keys, "unknown key")


def test_der_signature_is_refused(key: ec.EllipticCurvePrivateKey, keys: Any) -> None:
    h, p, _ = sign_es256(PAYLOAD, key, "k1").split(".")
    der = key.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
    refused(f"{h}.{p}.{b64(der)}", keys, "signature is 64 bytes")


def test_out_of_range_signature_is_refused(key: ec.EllipticCurvePrivateKey, keys: Any) -> None:
    h, p, _ = sign_es256(PAYLOAD, key, "k1").split(".")
    too_big = b64(bytes([0xFF]) * 64)  # r and s above the group order
    refused(f"{h}.{p}.{too_big}", keys, "signature does not verify")


def test_key_on_another_curve_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    token = sign_es256(PAYLOAD, key, "k1")
    refused(token, {"k1": p384.public_key()}, "not a P-256 key")


def test_signing_with_a_non_p256_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="P-256"):
        sign_es256(PAYLOAD, ec.generate_private_key(ec.SECP384R1()), "k1")


def test_unserialisable_payload_is_a_bad_request(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        sign_es256({"when": object()}, key, "k1")


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("", "3 dot-separated"),
        ("a.b.c.d", "3 dot-separated"),
        (".e30.", "header segment is empty"),
        ("e30..", "payload segment is empty"),
        ("e30=.e30.AAAA", "header segment is not unpadded base64url"),
        ("e30.e30.AA+A", "signature segment is not unpadded base64url"),
        ("eyJhbGciOiJFUzI1NiJ9.é.AAAA", "payload segment is not unpadded base64url"),
        ("e.e30.", "not valid base64url"),
        ("bm90IGpzb24.e30.", "header is not valid JSON"),
        ("W10.e30.", "header is not a JSON object"),
    ],
)
def test_malformed_tokens_are_refused(keys: Any, token: str, says: str) -> None:
    refused(token, keys, says)


def test_oversized_token_is_refused_before_parsing(keys: Any) -> None:
    refused("a" * (MAX_TOKEN_BYTES + 1), keys, "token too large")


def test_non_string_is_refused(keys: Any) -> None:
    with pytest.raises(InvalidToken, match="not a string"):
        verify_es256(None, keys)  # type: ignore[arg-type]
