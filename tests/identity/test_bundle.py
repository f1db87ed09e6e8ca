"""The SPIFFE trust bundle: standard JWKS that any JOSE library verifies Tether tokens with, and a
strict parser."""

from __future__ import annotations

import base64
import copy
import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import ECKey

from tests.identity.fixtures.bogus_bundles import BOGUS_BUNDLES, IGNORABLE
from tests.identity.fixtures.bogus_tokens import AUDIENCE, TD, World, make_keyset
from tether.clock import ManualClock
from tether.errors import BadRequest
from tether.identity.bundle import build_bundle, parse_bundle
from tether.identity.keys import KeySet


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return make_keyset()


def as_json(doc: Any) -> dict[str, Any]:
    """What a client receives: the document through a JSON round trip."""
    parsed: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    return parsed


def test_bundle_is_a_spiffe_jwks(keys: KeySet) -> None:
    doc = as_json(build_bundle(keys, sequence=7, refresh_hint=120))
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 120
    jwt_entry, x509_entry = doc["keys"]
    assert set(jwt_entry) == {"kty", "crv", "x", "y", "kid", "use"}
    assert jwt_entry["kty"] == "EC" and jwt_entry["crv"] == "P-256"
    assert jwt_entry["use"] == "jwt-svid" and jwt_entry["kid"] == keys.jwt_kid
    assert set(x509_entry) == {"kty", "crv", "x", "y", "use", "x5c"}  # no kid (X509-SVID 6.1)
    assert x509_entry["use"] == "x509-svid"
    assert x509_entry["x5c"] == [
        base64.b64encode(keys.ca_cert.public_bytes(serialization.Encoding.DER)).decode()
    ]


def test_bundle_round_trips(keys: KeySet) -> None:
    bundle = parse_bundle(as_json(build_bundle(keys, sequence=3)), TD)
    assert bundle.trust_domain == TD
    assert list(bundle.jwt_keys) == [keys.jwt_kid]
    assert (
        bundle.jwt_keys[keys.jwt_kid].public_numbers() == keys.jwt_key.public_key().public_numbers()
    )
    assert bundle.x509_roots == [keys.ca_cert]
    assert bundle.sequence == 3 and bundle.refresh_hint == 300
    assert bundle.ignored == []


def test_pyjwt_verifies_a_tether_token_from_the_bundle_alone() -> None:
    world = World(clock=ManualClock(time.time()))  # PyJWT checks times against the real clock
    token = world.token()
    doc = as_json(build_bundle(world.keys))
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(doc)[header["kid"]]
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=AUDIENCE)
    assert claims["sub"] == f"spiffe://{TD}/agent/researcher"
    assert claims["act"]["sub"] == f"spiffe://{TD}/agent/planner"


def test_joserfc_verifies_a_tether_token_from_the_bundle_alone() -> None:
    world = World(clock=ManualClock(time.time()))
    token = world.token()
    doc = as_json(build_bundle(world.keys))
    # A SPIFFE consumer picks the jwt-svid entries; joserfc only knows 'sig'/'enc' as uses.
    entry = next(k for k in doc["keys"] if k["use"] == "jwt-svid")
    key = ECKey.import_key({k: v for k, v in entry.items() if k != "use"})
    decoded = joserfc_jwt.decode(token, key, algorithms=["ES256"])
    joserfc_jwt.JWTClaimsRegistry(aud={"essential": True, "value": AUDIENCE}).validate(
        decoded.claims
    )
    assert decoded.header["kid"] == world.keys.jwt_kid
    assert decoded.claims["tether"]["grants"][0] == "model:gpt-4o*"


@pytest.mark.parametrize("name", sorted(BOGUS_BUNDLES))
def test_bogus_bundle_is_refused(keys: KeySet, name: str) -> None:
    doc, says = BOGUS_BUNDLES[name](as_json(build_bundle(keys)), keys)
    with pytest.raises(BadRequest) as info:
        parse_bundle(doc, TD)
    assert type(info.value) is BadRequest
    assert says in str(info.value)


@pytest.mark.parametrize("name", sorted(IGNORABLE))
def test_entries_the_spec_says_to_skip_are_skipped(keys: KeySet, name: str) -> None:
    doc = as_json(build_bundle(keys))
    doc["keys"].append(copy.deepcopy(IGNORABLE[name]))
    bundle = parse_bundle(doc, TD)
    assert list(bundle.jwt_keys) == [keys.jwt_kid]
    assert bundle.x509_roots == [keys.ca_cert]
    assert len(bundle.ignored) == 1


def test_invalid_trust_domain_is_refused(keys: KeySet) -> None:
    with pytest.raises(BadRequest, match="invalid trust domain"):
        parse_bundle(as_json(build_bundle(keys)), "Not A Domain")


def test_bundle_repr_lists_kids_not_keys(keys: KeySet) -> None:
    text = repr(parse_bundle(as_json(build_bundle(keys)), TD))
    assert keys.jwt_kid in text and "object at" not in text
