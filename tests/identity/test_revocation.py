from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.identity.revocation import Revocation, RevocationList
from tether.identity.spiffe import SpiffeId

TD = "example.org"


def claims(sub: str, chain: list[str], jtis: list[str], jti: str, at_ms: int) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(sub),
        audience=("tether",),
        issued_at=at_ms // 1000,
        not_before=at_ms // 1000,
        expires_at=at_ms // 1000 + 60,
        token_id=jti,
        grantors=tuple(SpiffeId.parse(c) for c in chain),
        chain_jti=tuple(jtis),
        grants=Grants.parse(["model:*"]),
        issued_at_ms=at_ms,
    )


ALICE = f"spiffe://{TD}/user/alice"
PLANNER = f"spiffe://{TD}/agent/planner"
WORKER = f"spiffe://{TD}/agent/worker"


def test_token_revocation_kills_descendants_only() -> None:
    rl = RevocationList([Revocation("token", "p1", 0)])
    planner = claims(PLANNER, [ALICE], ["a1"], "p1", 1000)
    worker = claims(WORKER, [ALICE, PLANNER], ["a1", "p1"], "w1", 2000)
    other = claims(WORKER, [ALICE, PLANNER], ["a1", "p2"], "w2", 2000)
    assert rl.reason(planner) and rl.reason(worker)
    assert rl.reason(other) is None


def test_agent_revocation_spares_later_tokens() -> None:
    rl = RevocationList([Revocation("agent", WORKER, at_ms=5000)])
    assert rl.reason(claims(WORKER, [ALICE], ["a1"], "w1", 4999))
    assert rl.reason(claims(WORKER, [ALICE], ["a1"], "w2", 5001)) is None
    assert rl.reason(claims(PLANNER, [ALICE], ["a1"], "p1", 10)) is None


def test_subtree_revocation_reaches_any_depth() -> None:
    rl = RevocationList([Revocation("subtree", PLANNER, at_ms=5000)])
    assert rl.reason(claims(WORKER, [ALICE, PLANNER], ["a1", "p1"], "w1", 4000))
    assert rl.reason(claims(PLANNER, [ALICE], ["a1"], "p1", 4000))
    assert rl.reason(claims(WORKER, [ALICE], ["a1"], "w9", 4000)) is None
