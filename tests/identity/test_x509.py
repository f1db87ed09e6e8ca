"""X.509-SVIDs: what the CA issues follows the SPIFFE X509-SVID spec, and every chain that breaks
a rule is refused."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.identity.fixtures.bogus_certs import (
    AGENT,
    BOGUS_CHAINS,
    BOGUS_CSRS,
    CA,
    FOREIGN_TD,
    NOW,
    TD,
    good_csr,
    pem,
)
from tether.errors import BadRequest, InvalidToken
from tether.identity.spiffe import SpiffeId
from tether.identity.x509 import (
    ca_trust_domain,
    csr_public_key,
    issue_x509_svid,
    verify_x509_svid,
)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def test_ca_certificate_is_a_spiffe_signing_certificate(ca: CA) -> None:
    cert = ca.cert
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=0)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [f"spiffe://{TD}"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{TD} CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Tether"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    assert ca_trust_domain(cert) == TD


def test_leaf_follows_the_x509_svid_rules(ca: CA) -> None:
    leaf = ca.issue()
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert set(ext(leaf, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    sans = ext(leaf, x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(str(AGENT))]
    leaf.verify_directly_issued_by(ca.cert)
    assert leaf.serial_number != ca.issue().serial_number


def test_issued_leaf_verifies_alone_and_with_the_ca_appended(ca: CA) -> None:
    leaf = ca.issue()
    assert verify_x509_svid(pem(leaf), [ca.cert], TD, NOW) == AGENT
    # the authority returns leaf + CA; presenting that chain must work too
    assert verify_x509_svid(pem(leaf, ca.cert), [ca.cert], TD, NOW) == AGENT


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_verifies_the_leaf_with_no_tether_code(ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue()
    (tmp_path / "ca.pem").write_bytes(pem(ca.cert))
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(NOW.timestamp())),
            "-purpose",
            "sslclient",
            "-CAfile",
            "ca.pem",
            "leaf.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_leaf_without_extended_key_usage_is_accepted(ca: CA) -> None:
    # The spec says leaves SHOULD carry one; absent, nothing restricts the key's use.
    assert verify_x509_svid(pem(ca.custom_leaf(eku=())), [ca.cert], TD, NOW) == AGENT


@pytest.mark.parametrize("name", sorted(BOGUS_CHAINS))
def test_bogus_chain_is_refused(ca: CA, name: str) -> None:
    bogus = BOGUS_CHAINS[name](ca)
    with pytest.raises(InvalidToken) as info:
        verify_x509_svid(bogus.chain_pem, [ca.cert, *bogus.roots], TD, NOW)
    assert type(info.value) is InvalidToken
    assert bogus.says in str(info.value)


def test_no_roots_means_nothing_verifies(ca: CA) -> None:
    with pytest.raises(InvalidToken, match=r"no X\.509 roots"):
        verify_x509_svid(pem(ca.issue()), [], TD, NOW)


def test_issue_refuses_an_svid_outliving_the_ca(ca: CA) -> None:
    with pytest.raises(BadRequest, match="outlive the CA"):
        ca.issue(ttl=timedelta(days=20_000))


def test_issue_refuses_an_empty_lifetime(ca: CA) -> None:
    with pytest.raises(BadRequest, match="lifetime is empty"):
        ca.issue(ttl=timedelta(0))


def test_issue_refuses_another_trust_domain(ca: CA) -> None:
    with pytest.raises(BadRequest, match=FOREIGN_TD):
        ca.issue(SpiffeId(FOREIGN_TD, "agent", "researcher"))


def test_issue_refuses_a_ca_key_that_does_not_match(ca: CA) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(BadRequest, match="does not match"):
        issue_x509_svid(other, ca.cert, other.public_key(), AGENT, NOW, NOW + timedelta(hours=1))


def test_issue_never_starts_before_the_ca(ca: CA) -> None:
    leaf = ca.issue(start=NOW - timedelta(days=30), ttl=timedelta(days=31))
    assert leaf.not_valid_before_utc == ca.cert.not_valid_before_utc


def test_csr_key_is_returned_after_proof_of_possession() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    got = csr_public_key(good_csr(key), AGENT)
    assert got.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_csr_may_name_the_callers_own_identity() -> None:
    assert isinstance(
        csr_public_key(good_csr(uris=(str(AGENT),)), AGENT), ec.EllipticCurvePublicKey
    )


def test_ed25519_csr_is_accepted_and_its_svid_verifies(ca: CA) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = csr_public_key(good_csr(key), AGENT)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    leaf = issue_x509_svid(ca.key, ca.cert, public, AGENT, NOW, NOW + timedelta(hours=1))
    assert verify_x509_svid(pem(leaf), [ca.cert], TD, NOW) == AGENT


@pytest.mark.parametrize("name", sorted(BOGUS_CSRS))
def test_bogus_csr_is_refused(name: str) -> None:
    bogus = BOGUS_CSRS[name]()
    with pytest.raises(BadRequest) as info:
        csr_public_key(bogus.csr_pem, AGENT)
    assert type(info.value) is BadRequest
    assert bogus.says in str(info.value)
