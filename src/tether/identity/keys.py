"""The authority's keys: created once in the data directory, loaded ever after, never overwritten.

``<keys_dir>/``

=====================  ==========================================================  =====
file                   what                                                        mode
=====================  ==========================================================  =====
``jwt-signing.pem``    P-256 key that signs JWT-SVIDs (PKCS#8 PEM)                 0600
``x509-ca.pem``        P-256 key of the X.509 CA (PKCS#8 PEM)                      0600
``x509-ca.crt``        the self-signed CA certificate for the trust domain (PEM)   0644
``audit-note.pem``     Ed25519 key that signs audit checkpoints (PKCS#8 PEM)       0600
``audit-note.vkey``    its C2SP signed-note verifier key, for third parties        0644
=====================  ==========================================================  =====

A file is published with ``link(2)`` from a private temporary file, so it appears whole or not at
all and an existing file is never replaced, even by two ``tether init`` racing. Missing files are
created, existing ones loaded and checked: a private key readable by group or others, a CA
certificate that belongs to another key or trust domain, or a key of the wrong type is a
:class:`~tether.errors.ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tether.errors import ConfigError
from tether.identity.x509 import ca_trust_domain, make_ca_cert

__all__ = [
    "AUDIT_NOTE_KEY_FILE",
    "AUDIT_NOTE_VKEY_FILE",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "JWT_KEY_FILE",
    "KeySet",
    "ec_public_jwk",
    "jwk_thumbprint",
    "load_or_create_keys",
    "note_verifier_key",
]

JWT_KEY_FILE = "jwt-signing.pem"
CA_KEY_FILE = "x509-ca.pem"
CA_CERT_FILE = "x509-ca.crt"
AUDIT_NOTE_KEY_FILE = "audit-note.pem"
AUDIT_NOTE_VKEY_FILE = "audit-note.vkey"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_MAX_KEY_FILE = 64 * 1024


@dataclass(repr=False, eq=False)
class KeySet:
    """Every private key the authority holds. Its repr names key ids, never key material."""

    jwt_key: ec.EllipticCurvePrivateKey
    jwt_kid: str
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    note_key: Ed25519PrivateKey
    note_name: str

    def __repr__(self) -> str:
        return (
            f"KeySet(jwt_kid={self.jwt_kid!r}, ca_serial={self.ca_cert.serial_number:x}, "
            f"note_name={self.note_name!r})"
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The RFC 7517 JWK members of a P-256 public key (``kty``, ``crv``, ``x``, ``y``)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"expected a P-256 key, found {key.curve.name}")
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def jwk_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the ``kid`` of a JWT signing key."""
    jwk = ec_public_jwk(key)
    # RFC 7638 section 3.2: the required members only, sorted, no whitespace.
    canonical = orjson.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")})
    return _b64url(hashlib.sha256(canonical).digest())


def _check_note_name(name: str) -> None:
    # C2SP signed-note: a key name is non-empty and has no spaces and no '+'.
    if not name or "+" in name or any(c.isspace() for c in name) or not name.isprintable():
        raise ConfigError(f"invalid audit note key name {name!r}: no spaces or '+'")


def note_verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The C2SP signed-note verifier key ``<name>+<hash hex>+<base64(0x01 || key)>``."""
    _check_note_name(name)
    raw = b"\x01" + public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key_hash = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    return f"{name}+{key_hash.hex()}+{base64.b64encode(raw).decode('ascii')}"


def _publish(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` unless it exists. True if this call created it.

    The bytes go to a private temporary file first and are linked into place, so a reader never
    sees a half-written key and an existing file is never replaced.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # the umask may have narrowed a public file's mode
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from e


def _read(path: Path, *, private: bool) -> bytes:
    try:
        st = path.lstat()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if private and st.st_mode & 0o077:
        raise ConfigError(
            f"private key {path} is accessible to other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )
    if st.st_size > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is too large to be a key or certificate")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey | Ed25519PrivateKey:
    data = _read(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # The message of a parse error never echoes key bytes, but we do not pass it on anyway.
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from e
    if isinstance(key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey):
        return key
    raise ConfigError(f"{path} holds an unsupported key type ({type(key).__name__})")


def _ec_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    created = False
    if not path.exists():
        created = _publish(path, _pem(ec.generate_private_key(ec.SECP256R1())), _PRIVATE_MODE)
    key = _load_private(path)  # always from disk: if another process won a race, use its key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path} must hold an EC P-256 key")
    return key, created


def _ed25519_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    created = False
    if not path.exists():
        created = _publish(path, _pem(Ed25519PrivateKey.generate()), _PRIVATE_MODE)
    key = _load_private(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} must hold an Ed25519 key")
    return key, created


def _public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ca_cert(
    path: Path, key: ec.EllipticCurvePrivateKey, key_created: bool, trust_domain: str
) -> tuple[x509.Certificate, bool]:
    created = False
    if not path.exists():
        cert = make_ca_cert(key, trust_domain, datetime.now(UTC))
        created = _publish(path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    try:
        cert = x509.load_pem_x509_certificate(_read(path, private=False))
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM certificate") from e
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or _public_bytes(
        cert_key
    ) != _public_bytes(key.public_key()):
        detail = (
            "the CA key was just created but the certificate already existed"
            if key_created
            else "the certificate belongs to another key"
        )
        raise ConfigError(
            f"{path} does not match {path.with_name(CA_KEY_FILE)}: {detail}",
            hint="restore the CA key that issued this certificate, or move both files away",
        )
    found = ca_trust_domain(cert)
    if found != trust_domain:
        raise ConfigError(
            f"{path} is the CA of trust domain {found!r}, not {trust_domain!r}",
            hint="use the trust domain the data directory was created with",
        )
    return cert, created


def _vkey(path: Path, name: str, key: Ed25519PrivateKey) -> bool:
    text = note_verifier_key(name, key.public_key())
    created = False
    if not path.exists():
        created = _publish(path, (text + "\n").encode(), _PUBLIC_MODE)
    found = _read(path, private=False).decode("utf-8", "replace").strip()
    if found != text:
        raise ConfigError(
            f"{path} does not match {path.with_name(AUDIT_NOTE_KEY_FILE)} and note name {name!r}",
            hint="restore the original audit key and note name, or move the .vkey file away",
        )
    return created


def load_or_create_keys(keys_dir: Path, trust_domain: str, note_name: str) -> tuple[KeySet, bool]:
    """Load the keys in ``keys_dir``, creating any that are missing.

    Returns the key set and whether this call created anything. Never overwrites a file.
    Raises :class:`~tether.errors.ConfigError` for unreadable, mis-permissioned or
    inconsistent files.
    """
    _check_note_name(note_name)
    if not keys_dir.exists():
        try:
            keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {keys_dir}: {e.strerror}") from e
    if not keys_dir.is_dir():
        raise ConfigError(f"{keys_dir} is not a directory")
    ca_key_path = keys_dir / CA_KEY_FILE
    ca_cert_path = keys_dir / CA_CERT_FILE
    if not ca_key_path.exists() and ca_cert_path.exists():
        raise ConfigError(
            f"{ca_cert_path} exists but its key {ca_key_path} is missing: "
            "refusing to create a new CA key that would not match it",
            hint="restore the CA key, or move the certificate away to start a new CA",
        )
    jwt_key, jwt_created = _ec_key(keys_dir / JWT_KEY_FILE)
    ca_key, ca_key_created = _ec_key(ca_key_path)
    ca_cert, cert_created = _ca_cert(ca_cert_path, ca_key, ca_key_created, trust_domain)
    note_key, note_created = _ed25519_key(keys_dir / AUDIT_NOTE_KEY_FILE)
    vkey_created = _vkey(keys_dir / AUDIT_NOTE_VKEY_FILE, note_name, note_key)
    keys = KeySet(
        jwt_key=jwt_key,
        jwt_kid=jwk_thumbprint(jwt_key.public_key()),
        ca_key=ca_key,
        ca_cert=ca_cert,
        note_key=note_key,
        note_name=note_name,
    )
    created = jwt_created or ca_key_created or cert_created or note_created or vkey_created
    return keys, created
