"""X.509-SVIDs as the SPIFFE X509-SVID spec defines them, issued by the trust domain's CA.

The CA certificate is self-signed, ``CA:true`` with path length 0 (Tether issues leaves directly,
so no certificate below it may act as a CA), key usage ``keyCertSign`` + ``cRLSign``, and the
trust domain's SPIFFE ID (``spiffe://<td>``) as its URI SAN.

A leaf SVID is ``CA:false`` with key usage ``digitalSignature`` only (never ``keyCertSign`` or
``cRLSign``), extended key usage serverAuth + clientAuth so it works on both ends of mTLS, and
exactly one URI SAN: the holder's SPIFFE ID. Its serial is random and its lifetime never exceeds
the CA's.

Verification is path validation by ``cryptography.x509.verification`` (signatures, validity at
the given time, CA constraints) with the SPIFFE leaf rules checked on top; every failure raises
:class:`~tether.errors.InvalidToken`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from tether.errors import BadRequest, InvalidToken
from tether.identity.spiffe import SpiffeId

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_CSR_BYTES",
    "SvidPublicKey",
    "ca_trust_domain",
    "csr_public_key",
    "issue_x509_svid",
    "make_ca_cert",
    "verify_x509_svid",
]

SvidPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
"""Key types an X.509-SVID may certify: EC P-256, Ed25519, or RSA of 2048 bits or more."""

MAX_CSR_BYTES = 64 * 1024
MAX_CHAIN_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
CA_BACKDATE = timedelta(minutes=5)  # tolerate clocks slightly behind the authority's


def _require_aware(name: str, when: datetime) -> None:
    if when.tzinfo is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")


def make_ca_cert(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime, ttl_days: int = 3650
) -> x509.Certificate:
    """A self-signed CA certificate for ``trust_domain`` (backdated a few minutes for skew)."""
    _require_aware("now", now)
    td_id = SpiffeId(trust_domain, "service", "ca").trust_domain_id  # validates the domain
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA"[:64]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + timedelta(days=ttl_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td_id)]), critical=False
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def ca_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain named by a CA certificate's ``spiffe://<td>`` URI SAN, if it has one."""
    for uri in _uri_sans(cert):
        if uri.startswith("spiffe://"):
            rest = uri[len("spiffe://") :].removesuffix("/")  # spec examples use a trailing '/'
            if rest and "/" not in rest:
                return rest
    return None


def _same_key(a: object, b: object) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return (
        isinstance(a, ec.EllipticCurvePublicKey)
        and isinstance(b, ec.EllipticCurvePublicKey)
        and a.public_bytes(*fmt) == b.public_bytes(*fmt)
    )


def _check_key_type(key: object) -> SvidPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise BadRequest(f"unsupported EC curve {key.curve.name}: use P-256")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadRequest(
                f"RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})"
            )
        return key
    raise BadRequest(
        f"unsupported key type {type(key).__name__}: use EC P-256, Ed25519 or RSA >= 2048"
    )


def issue_x509_svid(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: SvidPublicKey,
    spiffe_id: SpiffeId,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Issue a leaf X.509-SVID for ``spiffe_id`` certifying ``public_key``.

    Raises :class:`~tether.errors.BadRequest` if the key type is unsupported, the lifetime is
    empty or outlives the CA, or ``spiffe_id`` is in another trust domain than the CA.
    """
    _require_aware("not_before", not_before)
    _require_aware("not_after", not_after)
    key = _check_key_type(public_key)
    if not _same_key(ca_key.public_key(), ca_cert.public_key()):
        raise BadRequest("the CA key does not match the CA certificate")
    td = ca_trust_domain(ca_cert)
    if td != spiffe_id.trust_domain:
        raise BadRequest(
            f"cannot issue an SVID for trust domain {spiffe_id.trust_domain!r} "
            f"from the CA of {td!r}"
        )
    not_before = max(not_before, ca_cert.not_valid_before_utc)  # never before the CA
    if not_after <= not_before:
        raise BadRequest("X.509-SVID lifetime is empty (not_after <= not_before)")
    if not_after > ca_cert.not_valid_after_utc:
        raise BadRequest("X.509-SVID would outlive the CA certificate")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
                    x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.name[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def csr_public_key(csr_pem: bytes, expected: SpiffeId) -> SvidPublicKey:
    """The public key of a PEM CSR, after checking its signature (proof of possession).

    A URI SAN in the CSR, if any, must be exactly ``expected``; the authority decides the
    identity, so the rest of the CSR's subject and extensions are ignored.
    Raises :class:`~tether.errors.BadRequest`.
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise BadRequest(f"CSR too large ({len(csr_pem)} bytes > {MAX_CSR_BYTES})")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        key = csr.public_key()
        signature_ok = csr.is_signature_valid
        uris = _uri_sans(csr)
    except (ValueError, TypeError) as e:  # unparsable or unsupported
        raise BadRequest("malformed CSR: expected a PEM certificate signing request") from e
    except x509.DuplicateExtension as e:
        raise BadRequest("malformed CSR: duplicate extension") from e
    checked = _check_key_type(key)
    if not signature_ok:
        raise BadRequest("CSR signature does not verify (no proof of possession of the key)")
    if uris and uris != [str(expected)]:
        shown = ", ".join(u[:120] for u in uris[:4])
        raise BadRequest(f"CSR asks for URI SAN {shown}, but this identity is {expected}")
    return checked


def _ee_policy() -> ExtensionPolicy:
    # The web PKI end-entity profile wants a DNS or IP subject; an SVID names a URI instead. So
    # path validation accepts any leaf extensions and ``_check_leaf`` applies the SPIFFE rules.
    return ExtensionPolicy.permit_all()


def verify_x509_svid(
    chain_pem: bytes, roots: Sequence[x509.Certificate], trust_domain: str, now: datetime
) -> SpiffeId:
    """Verify a PEM chain (leaf first, then any intermediates) against ``roots``.

    Returns the leaf's SPIFFE ID. Raises :class:`~tether.errors.InvalidToken` if the chain does
    not lead to a root, is outside its validity at ``now``, breaks a SPIFFE leaf rule, or names
    another trust domain.
    """
    _require_aware("now", now)
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise InvalidToken(f"certificate chain too large ({len(chain_pem)} bytes)")
    if not roots:
        raise InvalidToken("no X.509 roots to verify against")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise InvalidToken("malformed certificate chain: expected PEM certificates") from e
    leaf, intermediates = certs[0], certs[1:]
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(4)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as e:
        raise InvalidToken(f"certificate chain does not verify: {e}") from e
    spiffe_id = _check_leaf(leaf)
    if spiffe_id.trust_domain != trust_domain:
        raise InvalidToken(
            f"certificate is for foreign trust domain {spiffe_id.trust_domain!r} "
            f"(expected {trust_domain!r})"
        )
    return spiffe_id


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE X509-SVID leaf rules (spec sections 4.1, 4.3, 4.4, 5.2).

    The caller is authenticating a client, so an extended key usage, when present, must allow
    clientAuth (the spec has SVIDs carry both serverAuth and clientAuth).
    """
    try:
        exts = leaf.extensions
    except (ValueError, x509.DuplicateExtension) as e:
        raise InvalidToken("malformed certificate extensions") from e
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as e:
        raise InvalidToken("not an X.509-SVID: the leaf has no basic constraints") from e
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as e:
        raise InvalidToken("not an X.509-SVID: the leaf has no key usage") from e
    if bc.ca:
        raise InvalidToken("not an X.509-SVID: the leaf certificate is a CA")
    if not ku.digital_signature:
        raise InvalidToken("not an X.509-SVID: the leaf lacks the digitalSignature key usage")
    if ku.key_cert_sign or ku.crl_sign:
        raise InvalidToken("not an X.509-SVID: the leaf may not sign certificates or CRLs")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None  # optional in the spec ("SHOULD include")
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise InvalidToken("not usable here: the leaf's extended key usage excludes clientAuth")
    uris = _uri_sans(leaf)
    if len(uris) != 1:
        raise InvalidToken(f"not an X.509-SVID: the leaf has {len(uris)} URI SANs (exactly 1)")
    try:
        return SpiffeId.parse(uris[0])
    except BadRequest as e:
        raise InvalidToken(f"not a Tether X.509-SVID: {e.message}") from e
