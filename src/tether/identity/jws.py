"""JWS compact serialization for ES256, and nothing else.

A JWT-SVID is ``BASE64URL(header) . BASE64URL(payload) . BASE64URL(r || s)`` (RFC 7515 section
7.1, RFC 7518 section 3.4). Tether signs and accepts exactly one algorithm, ES256 on P-256, which
the SPIFFE JWT-SVID spec allows. Accepting one algorithm, chosen by the verifier rather than
read from the token, removes the whole class of algorithm-confusion attacks: ``alg: none``,
HS256 keyed with the public key, or a downgrade to a weaker curve are refused before any key is
touched. It is hand-rolled on ``cryptography`` for that reason and for speed.

The verifier is strict about shape: exactly three unpadded base64url segments, a size cap, a
header that is a JSON object naming ``ES256`` and a known ``kid``, no ``crit``, a 64-byte
signature in canonical encoding with ``0 < r, s < n``, and a payload that is a JSON object.
Every failure raises :class:`~tether.errors.InvalidToken` whose message never contains the token.
Header fields that point at keys (``jwk``, ``jku``, ``x5c``, ``x5u``) are never consulted: the
verifier only uses the keys its caller trusts.

Speed: the ECDSA verification (~70 us here) is the floor. Around it the shape check is one
C-speed ``bytes.translate`` pass, and a header seen on a correctly signed token before is not
decoded again (all tokens of one key share a header), so the rest costs ~15 us per token.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ec import (
    ECDSA,
    SECP256R1,
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from tether.errors import BadRequest, ConfigError, InvalidToken

__all__ = [
    "ALGORITHM",
    "MAX_TOKEN_BYTES",
    "decode_unverified",
    "sign_es256",
    "verify_es256",
]

ALGORITHM = "ES256"
MAX_TOKEN_BYTES = 16 * 1024
"""Tokens longer than this are refused before any parsing (a delegated token is ~1 KiB)."""

_TYP_ALLOWED = frozenset({"JWT", "JOSE"})  # the SPIFFE JWT-SVID spec allows either, or none
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SIG_LEN = 64
_SIG_B64_LEN = 86
# 64 bytes = 86 base64url characters; the last one carries 4 padding bits, which must be zero.
# Allowing non-zero padding bits would make one signature have several spellings.
_SIG_LAST_CHARS = frozenset(b"AQgw")
_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ALPHABET_AND_DOT = _B64URL_ALPHABET + b"."
_ECDSA_SHA256 = ECDSA(hashes.SHA256())

_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PAD = (b"", b"", b"==", b"=")

_header_cache: dict[str, bytes] = {}  # kid -> encoded header, for signing
# Encoded headers that have passed every header check and then a signature check, mapped to
# their kid. Every token from one key has the same header, so this skips decoding and checking
# it again. Only headers of correctly signed tokens get in, so an attacker cannot fill it.
_verified_headers: dict[bytes, str] = {}
_MAX_VERIFIED_HEADERS = 256


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(segment: bytes) -> bytes:
    """Decode an unpadded base64url segment whose alphabet ``_split`` has already checked."""
    rem = len(segment) % 4
    if rem == 1:
        raise InvalidToken("malformed token: a segment is not valid base64url")
    try:
        return binascii.a2b_base64(segment.translate(_TO_STANDARD) + _PAD[rem])
    except (binascii.Error, ValueError) as e:
        raise InvalidToken("malformed token: a segment is not valid base64url") from e


def _encoded_header(kid: str) -> bytes:
    encoded = _header_cache.get(kid)
    if encoded is None:
        encoded = _b64encode(orjson.dumps({"alg": ALGORITHM, "kid": kid, "typ": "JWT"}))
        if len(_header_cache) < 64:  # a handful of kids over a process's life; never unbounded
            _header_cache[kid] = encoded
    return encoded


def sign_es256(payload: Mapping[str, Any], key: EllipticCurvePrivateKey, kid: str) -> str:
    """Sign ``payload`` as a compact JWS with header ``{"alg":"ES256","kid":kid,"typ":"JWT"}``."""
    if not isinstance(key.curve, SECP256R1):
        raise ConfigError(f"ES256 needs a P-256 key, not {key.curve.name}")
    try:
        body = orjson.dumps(payload)
    except orjson.JSONEncodeError as e:
        raise BadRequest(f"token payload is not JSON-serialisable: {e}") from e
    signing_input = _encoded_header(kid) + b"." + _b64encode(body)
    r, s = decode_dss_signature(key.sign(signing_input, _ECDSA_SHA256))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return (signing_input + b"." + _b64encode(signature)).decode("ascii")


def _split(token: object) -> tuple[bytes, bytes, bytes]:
    """Check the outer shape of a compact JWS and return its three segments (ASCII bytes).

    The signature may be empty here, so that ``alg: none`` gets its own clear refusal.
    """
    if not isinstance(token, str):
        raise InvalidToken("malformed token: not a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"token too large ({len(token)} bytes > {MAX_TOKEN_BYTES})")
    data = token.encode("utf-8", "replace")
    parts = data.split(b".")
    if len(parts) != 3:
        raise InvalidToken(
            f"malformed token: expected 3 dot-separated segments, found {len(parts)}"
        )
    # Deleting every base64url character and the dots leaves nothing, unless something else is
    # there (padding, the standard alphabet's + and /, whitespace, non-ASCII): one C-speed pass.
    if data.translate(None, _ALPHABET_AND_DOT) or not parts[0] or not parts[1]:
        for name, part in zip(("header", "payload", "signature"), parts, strict=True):
            if not part and name != "signature":
                raise InvalidToken(f"malformed token: the {name} segment is empty")
            if part.translate(None, _B64URL_ALPHABET):
                raise InvalidToken(f"malformed token: the {name} segment is not unpadded base64url")
    return parts[0], parts[1], parts[2]


def _json_object(segment: bytes, name: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64decode(segment))
    except orjson.JSONDecodeError as e:
        raise InvalidToken(f"malformed token: the {name} is not valid JSON") from e
    if not isinstance(value, dict):
        raise InvalidToken(f"malformed token: the {name} is not a JSON object")
    return value


def _check_header(header: dict[str, Any]) -> str:
    alg = header.get("alg")
    if alg != ALGORITHM:
        shown = repr(alg)[:24] if alg is not None else "missing"
        raise InvalidToken(f"unsupported token algorithm {shown}: only {ALGORITHM} is accepted")
    if "crit" in header:
        raise InvalidToken("token header has a 'crit' parameter, which is not supported")
    typ = header.get("typ")
    if typ is not None and typ not in _TYP_ALLOWED:
        raise InvalidToken(f"unsupported token type {repr(typ)[:24]} (expected JWT)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token header has no key id (kid)")
    return kid


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of ``token`` WITHOUT checking its signature: for display only.

    The shape checks of :func:`verify_es256` still apply (and raise ``InvalidToken``).
    """
    h, p, _ = _split(token)
    return _json_object(h, "header"), _json_object(p, "payload")


def verify_es256(token: str, keys: Mapping[str, EllipticCurvePublicKey]) -> dict[str, Any]:
    """Verify an ES256 compact JWS against ``keys`` (kid -> P-256 key) and return its payload.

    Checks no claim: time, audience and issuer belong to the caller (see ``Verifier``).
    Raises :class:`~tether.errors.InvalidToken`.
    """
    h, p, s = _split(token)
    kid = _verified_headers.get(h)
    known_header = kid is not None
    if kid is None:
        kid = _check_header(_json_object(h, "header"))
    key = keys.get(kid)
    if key is None:
        raise InvalidToken(
            f"token signed by an unknown key (kid {kid[:64]!r}): not in the trust bundle"
        )
    if not isinstance(key.curve, SECP256R1):
        raise InvalidToken(f"key {kid[:64]!r} is not a P-256 key")
    if len(s) != _SIG_B64_LEN:
        raise InvalidToken(
            f"malformed token: an {ALGORITHM} signature is {_SIG_LEN} bytes "
            f"({_SIG_B64_LEN} base64url characters), found {len(s)} characters"
        )
    if s[-1] not in _SIG_LAST_CHARS:
        raise InvalidToken("malformed token: the signature is not canonical base64url")
    raw = _b64decode(s)
    r = int.from_bytes(raw[:32], "big")
    v = int.from_bytes(raw[32:], "big")
    if not (0 < r < _P256_ORDER and 0 < v < _P256_ORDER):
        raise InvalidToken("token signature does not verify")
    try:
        key.verify(encode_dss_signature(r, v), h + b"." + p, _ECDSA_SHA256)
    except InvalidSignature as e:
        raise InvalidToken("token signature does not verify") from e
    if not known_header and len(_verified_headers) < _MAX_VERIFIED_HEADERS:
        _verified_headers[h] = kid
    return _json_object(p, "payload")
