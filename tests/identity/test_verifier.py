"""The offline verifier: every named bogus token is refused with the right error, and the cache
never lets an expired or revoked token through."""

from __future__ import annotations

import pytest

from tests.identity.fixtures.bogus_tokens import AUDIENCE, BOGUS, TD, World, make_keyset
from tether.errors import InvalidToken, TokenExpired, TokenRevoked
from tether.identity.bundle import build_bundle, parse_bundle
from tether.identity.revocation import Revocation
from tether.identity.spiffe import SpiffeId


@pytest.fixture
def world() -> World:
    return World()


@pytest.mark.parametrize("name", sorted(BOGUS))
def test_bogus_token_is_refused_with_its_error(world: World, name: str) -> None:
    bogus = BOGUS[name](world)
    verifier = world.verifier()
    for attempt in range(2):  # failures are not cached: the second try fails the same way
        with pytest.raises(InvalidToken) as info:
            verifier.verify(bogus.token)
        assert type(info.value) is bogus.error, f"attempt {attempt}"
        assert bogus.says in str(info.value)
        for shown in (str(info.value), repr(info.value), info.value.diagnostics()):
            assert bogus.token not in shown
            for segment in bogus.token.split("."):
                assert len(segment) < 16 or segment not in shown


def test_every_named_bogus_fixture_the_issue_asks_for_exists() -> None:
    asked = {
        "bogus_tampered_signature",
        "bogus_alg_none",
        "bogus_hs256_with_public_key",
        "bogus_es384",
        "bogus_expired",
        "bogus_not_yet_valid",
        "bogus_wrong_audience",
        "bogus_foreign_trust_domain_key",
        "bogus_foreign_trust_domain_claims",
        "bogus_unknown_kid",
        "bogus_malformed_segments",
        "bogus_bad_base64",
        "bogus_payload_not_object",
        "bogus_oversized",
        "bogus_act_chain_mismatch",
        "bogus_revoked",
        "bogus_grantor_revoked",
    }
    assert asked <= set(BOGUS)


def test_valid_delegated_token_yields_its_claims(world: World) -> None:
    claims = world.claims()
    got = world.verifier().verify(world.token(claims))
    assert got == claims
    assert str(got.subject) == f"spiffe://{TD}/agent/researcher"
    assert [str(g) for g in got.grantors] == [
        f"spiffe://{TD}/user/alice",
        f"spiffe://{TD}/agent/planner",
    ]
    assert got.depth == 2


def test_user_token_without_chain_verifies(world: World) -> None:
    claims = world.claims(holder="user/alice", grantors=())
    assert world.verifier().verify(world.token(claims)).root == SpiffeId(TD, "user", "alice")


def test_cached_token_is_refused_once_revoked(world: World) -> None:
    claims = world.claims()
    token = world.token(claims)
    verifier = world.verifier()
    assert verifier.verify(token) == claims
    assert verifier.verify(token) == claims  # from the cache
    world.revocations.add(Revocation("token", claims.token_id, int(world.clock.now() * 1000)))
    with pytest.raises(TokenRevoked, match="was revoked"):
        verifier.verify(token)
    world.clock.advance(60)  # replayed later: still refused
    with pytest.raises(TokenRevoked):
        verifier.verify(token)


def test_revoking_an_agent_spares_its_later_tokens(world: World) -> None:
    verifier = world.verifier()
    old = world.token(world.claims())
    verifier.verify(old)
    world.revocations.add(
        Revocation("agent", f"spiffe://{TD}/agent/researcher", int(world.clock.now() * 1000))
    )
    world.clock.advance(1)
    new = world.token(world.claims())
    with pytest.raises(TokenRevoked, match="agent/researcher"):
        verifier.verify(old)
    assert verifier.verify(new).subject.name == "researcher"


def test_cached_token_expires_on_time(world: World) -> None:
    token = world.token(world.claims(ttl=60))
    verifier = world.verifier(leeway=5)
    verifier.verify(token)
    world.clock.advance(64)  # within the leeway: still good, from the cache
    verifier.verify(token)
    world.clock.advance(1)
    with pytest.raises(TokenExpired):
        verifier.verify(token)
    with pytest.raises(TokenExpired):
        verifier.verify(token)


def test_leeway_accepts_small_clock_skew(world: World) -> None:
    now = int(world.clock.now())
    early = world.token(world.claims(not_before=now + 5, issued_at=now + 5))
    world.verifier(leeway=5).verify(early)
    with pytest.raises(InvalidToken, match="not yet valid"):
        world.verifier(leeway=0).verify(early)


def test_not_yet_valid_token_becomes_valid(world: World) -> None:
    now = int(world.clock.now())
    token = world.token(world.claims(not_before=now + 60))
    verifier = world.verifier()
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify(token)
    world.clock.advance(60)
    assert verifier.verify(token).not_before == now + 60


def test_rotated_bundle_drops_cached_tokens_of_the_old_key(world: World) -> None:
    token = world.token()
    verifier = world.verifier()
    verifier.verify(token)
    new_keys = make_keyset()
    verifier.update_bundle(parse_bundle(build_bundle(new_keys), TD))
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(token)
    assert World(keys=new_keys, clock=world.clock).token() != token


def test_cache_is_bounded_and_still_verifies_evicted_tokens(world: World) -> None:
    verifier = world.verifier(cache_size=3)
    tokens = [world.token() for _ in range(5)]
    for t in tokens:
        verifier.verify(t)
    assert "cached=3" in repr(verifier)
    for t in tokens:  # evicted ones verify again from scratch
        verifier.verify(t)


def test_cache_can_be_disabled(world: World) -> None:
    verifier = world.verifier(cache_size=0)
    token = world.token()
    verifier.verify(token)
    verifier.verify(token)
    assert "cached=0" in repr(verifier)


def test_audience_list_containing_ours_is_accepted(world: World) -> None:
    claims = world.claims(audience=("billing", AUDIENCE))
    assert world.verifier().verify(world.token(claims)).audience == ("billing", AUDIENCE)


@pytest.mark.parametrize("token", [b"abc.def.ghi", ["abc"], None, 7])
def test_non_string_token_is_refused(world: World, token: object) -> None:
    with pytest.raises(InvalidToken, match="not a string"):
        world.verifier().verify(token)  # type: ignore[arg-type]


def test_verifier_repr_holds_no_token(world: World) -> None:
    verifier = world.verifier()
    token = world.token()
    verifier.verify(token)
    assert token not in repr(verifier)
