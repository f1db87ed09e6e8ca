"""Key files: created once with private modes, loaded ever after, never overwritten."""

from __future__ import annotations

import os
import re
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc.jwk import ECKey

from tether.errors import ConfigError
from tether.identity.keys import (
    AUDIT_NOTE_KEY_FILE,
    AUDIT_NOTE_VKEY_FILE,
    CA_CERT_FILE,
    CA_KEY_FILE,
    JWT_KEY_FILE,
    ec_public_jwk,
    jwk_thumbprint,
    load_or_create_keys,
    note_verifier_key,
)
from tether.identity.x509 import ca_trust_domain, make_ca_cert

TD = "example.org"
NOTE = "example.org/tether/audit"
PRIVATE = (JWT_KEY_FILE, CA_KEY_FILE, AUDIT_NOTE_KEY_FILE)
ALL = (*PRIVATE, CA_CERT_FILE, AUDIT_NOTE_VKEY_FILE)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_first_call_creates_every_file_with_private_modes(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys, created = load_or_create_keys(keys_dir, TD, NOTE)
    assert created
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted(ALL)  # no temp files left
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for name in PRIVATE:
        assert stat.S_IMODE((keys_dir / name).stat().st_mode) == 0o600, name
        assert (keys_dir / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert isinstance(keys.jwt_key.curve, ec.SECP256R1)
    assert isinstance(keys.note_key, Ed25519PrivateKey)
    assert ca_trust_domain(keys.ca_cert) == TD


def test_second_call_loads_the_same_keys_and_writes_nothing(tmp_path: Path) -> None:
    first, _ = load_or_create_keys(tmp_path, TD, NOTE)
    before = snapshot(tmp_path)
    second, created = load_or_create_keys(tmp_path, TD, NOTE)
    assert not created
    assert snapshot(tmp_path) == before
    assert second.jwt_kid == first.jwt_kid
    assert second.ca_cert == first.ca_cert


def test_concurrent_inits_agree_on_one_set_of_keys(tmp_path: Path) -> None:
    barrier = threading.Barrier(6)
    kids: list[str] = []

    def init() -> None:
        barrier.wait()
        kids.append(load_or_create_keys(tmp_path, TD, NOTE)[0].jwt_kid)

    threads = [threading.Thread(target=init) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kids) == 6 and len(set(kids)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ALL)


def test_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    keys, _ = load_or_create_keys(tmp_path, TD, NOTE)
    jwk = ec_public_jwk(keys.jwt_key.public_key())
    assert keys.jwt_kid == ECKey.import_key(jwk).thumbprint()  # type: ignore[arg-type]
    assert keys.jwt_kid == jwk_thumbprint(keys.jwt_key.public_key())


def test_vkey_file_is_the_c2sp_verifier_key(tmp_path: Path) -> None:
    from tether.audit.note import NoteSigner

    keys, _ = load_or_create_keys(tmp_path, TD, NOTE)
    vkey = (tmp_path / AUDIT_NOTE_VKEY_FILE).read_text().strip()
    assert vkey == NoteSigner(NOTE, keys.note_key).verifier_key
    assert vkey == note_verifier_key(NOTE, keys.note_key.public_key())
    assert vkey.startswith(NOTE + "+")


def test_repr_shows_no_key_material(tmp_path: Path) -> None:
    keys, _ = load_or_create_keys(tmp_path, TD, NOTE)
    text = repr(keys)
    assert keys.jwt_kid in text
    assert "PRIVATE" not in text and "object at" not in text
    scalar = keys.jwt_key.private_numbers().private_value
    assert str(scalar) not in text and format(scalar, "x") not in text


def test_readable_private_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path, TD, NOTE)
    path = tmp_path / JWT_KEY_FILE
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        load_or_create_keys(tmp_path, TD, NOTE)
    assert str(path) in info.value.message
    assert info.value.hint == f"chmod 600 {path}"


def test_missing_files_are_created_and_existing_ones_kept(tmp_path: Path) -> None:
    first, _ = load_or_create_keys(tmp_path, TD, NOTE)
    (tmp_path / CA_CERT_FILE).unlink()
    (tmp_path / AUDIT_NOTE_KEY_FILE).unlink()
    (tmp_path / AUDIT_NOTE_VKEY_FILE).unlink()
    second, created = load_or_create_keys(tmp_path, TD, NOTE)
    assert created
    assert second.jwt_kid == first.jwt_kid
    assert second.ca_cert.public_key() == first.ca_cert.public_key()  # new cert, same CA key
    assert second.ca_cert != first.ca_cert


def test_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path, TD, NOTE)
    (tmp_path / CA_KEY_FILE).unlink()
    with pytest.raises(ConfigError, match="refusing to create a new CA key"):
        load_or_create_keys(tmp_path, TD, NOTE)
    assert not (tmp_path / CA_KEY_FILE).exists()


def test_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path, TD, NOTE)
    other = make_ca_cert(ec.generate_private_key(ec.SECP256R1()), TD, datetime.now(UTC))
    (tmp_path / CA_CERT_FILE).write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="belongs to another key"):
        load_or_create_keys(tmp_path, TD, NOTE)


def test_other_trust_domain_is_refused(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path, TD, NOTE)
    with pytest.raises(ConfigError, match=re.escape("trust domain 'example.org', not 'other.org'")):
        load_or_create_keys(tmp_path, "other.org", NOTE)


def test_wrong_key_type_is_refused(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / JWT_KEY_FILE
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="P-256"):
        load_or_create_keys(tmp_path, TD, NOTE)


def test_garbage_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / JWT_KEY_FILE
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_or_create_keys(tmp_path, TD, NOTE)
    assert "c2VjcmV0" not in info.value.diagnostics()


def test_changed_note_name_is_refused(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path, TD, NOTE)
    with pytest.raises(ConfigError, match=AUDIT_NOTE_VKEY_FILE):
        load_or_create_keys(tmp_path, TD, "other/log")


@pytest.mark.parametrize("name", ["", "has space", "a+b", "tab\tname"])
def test_invalid_note_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="note key name"):
        load_or_create_keys(tmp_path, TD, name)
    assert not any(tmp_path.iterdir())


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    load_or_create_keys(tmp_path / "a", TD, NOTE)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / JWT_KEY_FILE).symlink_to(tmp_path / "a" / JWT_KEY_FILE)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_or_create_keys(tmp_path / "b", TD, NOTE)


def test_unwritable_keys_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create"):
        load_or_create_keys(tmp_path / "file" / "keys", TD, NOTE)
