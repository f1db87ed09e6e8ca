"""The SPIFFE trust bundle: a JWK Set that verifies a trust domain's SVIDs with no Tether code.

``build_bundle`` publishes the JWT-SVID signing key (``use: jwt-svid``, with its ``kid``) and the
X.509 CA (``use: x509-svid``, its certificate in ``x5c``, no ``kid``), as the SPIFFE Trust Domain
and Bundle, JWT-SVID and X509-SVID specs lay out. Any JOSE library can verify a Tether token from
the ``jwt-svid`` entry alone.

``parse_bundle`` reads one back, strictly: a malformed document or entry is a
:class:`~tether.errors.BadRequest`. As the spec requires, entries with an unknown ``use`` or
``kty`` are ignored; so are ``jwt-svid`` keys Tether cannot use (it verifies ES256 only, so an RSA
or P-384 key from a federated bundle is skipped rather than failing the whole bundle).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.errors import BadRequest
from tether.identity.keys import KeySet, ec_public_jwk
from tether.identity.spiffe import SpiffeId
from tether.identity.x509 import ca_trust_domain

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "MAX_BUNDLE_KEYS",
    "TrustBundle",
    "build_bundle",
    "parse_bundle",
]

DEFAULT_REFRESH_HINT = 300
MAX_BUNDLE_KEYS = 64
_USE_JWT = "jwt-svid"
_USE_X509 = "x509-svid"


@dataclass
class TrustBundle:
    """The keys that verify one trust domain's SVIDs."""

    trust_domain: str
    jwt_keys: dict[str, ec.EllipticCurvePublicKey]  # kid -> P-256 key
    x509_roots: list[x509.Certificate]
    sequence: int = 0
    refresh_hint: int | None = None
    ignored: list[str] = field(default_factory=list)  # why each skipped entry was skipped

    def __repr__(self) -> str:
        return (
            f"TrustBundle(trust_domain={self.trust_domain!r}, jwt_kids={sorted(self.jwt_keys)!r}, "
            f"x509_roots={len(self.x509_roots)}, sequence={self.sequence})"
        )


def build_bundle(
    keys: KeySet, sequence: int = 1, refresh_hint: int = DEFAULT_REFRESH_HINT
) -> dict[str, Any]:
    """The SPIFFE bundle document (a JWKS) for ``keys``, ready to serve as JSON."""
    jwt_entry: dict[str, Any] = {
        **ec_public_jwk(keys.jwt_key.public_key()),
        "kid": keys.jwt_kid,
        "use": _USE_JWT,
    }
    ca_public = keys.ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise BadRequest("the X.509 CA certificate does not hold an EC key")
    der = keys.ca_cert.public_bytes(serialization.Encoding.DER)
    x509_entry: dict[str, Any] = {
        **ec_public_jwk(ca_public),
        "use": _USE_X509,
        "x5c": [base64.b64encode(der).decode("ascii")],
    }
    return {
        "keys": [jwt_entry, x509_entry],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }


def _uint(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"malformed trust bundle: {name} must be a non-negative integer")
    return value


def _coordinate(entry: Mapping[str, Any], name: str, where: str) -> int:
    value = entry.get(name)
    if not isinstance(value, str) or len(value) != 43:  # 32 bytes, unpadded base64url
        raise BadRequest(f"malformed trust bundle: {where} has no valid P-256 '{name}'")
    try:
        raw = base64.urlsafe_b64decode(value + "=")
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"malformed trust bundle: {where} '{name}' is not base64url") from e
    if len(raw) != 32 or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != value:
        raise BadRequest(f"malformed trust bundle: {where} '{name}' is not base64url")
    return int.from_bytes(raw, "big")


def _ec_p256(entry: Mapping[str, Any], where: str) -> ec.EllipticCurvePublicKey:
    x = _coordinate(entry, "x", where)
    y = _coordinate(entry, "y", where)
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError as e:
        raise BadRequest(f"malformed trust bundle: {where} is not a point on P-256") from e


def _same(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def _parse_root(entry: Mapping[str, Any], where: str, trust_domain: str) -> x509.Certificate | None:
    x5c = entry.get("x5c")
    if x5c is None or x5c == []:
        return None  # X509-SVID spec 6.2: such an entry is ignored
    if not isinstance(x5c, list) or not isinstance(x5c[0], str):
        raise BadRequest(f"malformed trust bundle: {where} x5c must be a list of base64 strings")
    try:
        # Only the first certificate counts (X509-SVID spec 6.2).
        cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"malformed trust bundle: {where} x5c is not a DER certificate") from e
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError) as e:
        raise BadRequest(f"malformed trust bundle: {where} x5c is not a CA certificate") from e
    if not is_ca:
        raise BadRequest(f"malformed trust bundle: {where} x5c is not a CA certificate")
    found = ca_trust_domain(cert)
    if found is not None and found != trust_domain:
        raise BadRequest(
            f"trust bundle for {trust_domain!r} holds a CA of trust domain {found!r} ({where})"
        )
    cert_key = cert.public_key()
    if (
        entry.get("kty") == "EC"
        and entry.get("crv") == "P-256"
        and isinstance(cert_key, ec.EllipticCurvePublicKey)
        and not _same(_ec_p256(entry, where), cert_key)
    ):
        raise BadRequest(f"malformed trust bundle: {where} key does not match its x5c")
    return cert


def parse_bundle(doc: Mapping[str, Any], trust_domain: str) -> TrustBundle:
    """Parse a SPIFFE bundle document for ``trust_domain``. Raises BadRequest if malformed."""
    SpiffeId(trust_domain, "service", "bundle")  # validates the trust domain name
    if not isinstance(doc, Mapping):
        raise BadRequest("malformed trust bundle: not a JSON object")
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise BadRequest("malformed trust bundle: 'keys' must be a list")
    if len(entries) > MAX_BUNDLE_KEYS:
        raise BadRequest(f"trust bundle has too many keys ({len(entries)} > {MAX_BUNDLE_KEYS})")
    bundle = TrustBundle(
        trust_domain=trust_domain,
        jwt_keys={},
        x509_roots=[],
        sequence=_uint(doc, "spiffe_sequence") or 0,
        refresh_hint=_uint(doc, "spiffe_refresh_hint"),
    )
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(entry, Mapping):
            raise BadRequest(f"malformed trust bundle: {where} is not a JSON object")
        use, kty = entry.get("use"), entry.get("kty")
        if not isinstance(use, str) or not isinstance(kty, str):
            raise BadRequest(f"malformed trust bundle: {where} needs string 'use' and 'kty'")
        if use == _USE_X509:
            root = _parse_root(entry, where, trust_domain)
            if root is None:
                bundle.ignored.append(f"{where}: x509-svid entry without x5c")
            else:
                bundle.x509_roots.append(root)
        elif use == _USE_JWT:
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                raise BadRequest(f"malformed trust bundle: {where} jwt-svid key has no 'kid'")
            if kty != "EC" or entry.get("crv") != "P-256":
                bundle.ignored.append(f"{where}: {kty} {entry.get('crv', '')} is not an ES256 key")
                continue
            if kid in bundle.jwt_keys:
                raise BadRequest(f"malformed trust bundle: kid {kid[:64]!r} appears twice")
            bundle.jwt_keys[kid] = _ec_p256(entry, where)
        else:
            bundle.ignored.append(f"{where}: unknown use {use[:32]!r}")
    return bundle
