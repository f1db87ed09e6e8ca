"""DecisionCore's composition order and fail-closed behaviour.

The parts are tiny fakes at their seams here (their own suites test the real ones); the swarm
scenario in tests/policy/test_swarm.py runs the core with every real part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.policy.action import Action, Cost
from tether.policy.core import DecisionCore, GrantsAuthorizer
from tether.policy.interfaces import LimitResult, Verdict
from tether.server.services import Services


@pytest.fixture
def agent(services: Services, admin_token: str) -> TokenClaims:
    admin = services.verifier.verify(admin_token)
    issued = services.authority.delegate(admin, "worker", ["model:gpt-4o*", "tool:db.*"])
    return services.verifier.verify(issued.token)


class EscalatingAuthorizer:
    version = "v-esc"

    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict:
        return Verdict("escalate", ("needs a DBA",), ("p1",), self.version, "1 of group:dba")


class BrokenAuthorizer:
    version = "v-broken"

    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict:
        raise RuntimeError("cedar exploded")


@dataclass
class CountingLimiter:
    cap: int
    on_exceed: str = "deny"
    used: int = 0
    settled: list[tuple[str, Cost | None]] = field(default_factory=list)

    def reserve(
        self, action: Action, groups: frozenset[str], *, force: bool = False
    ) -> LimitResult:
        if self.used >= self.cap and not force:
            return LimitResult(
                False,
                limit="g/x",
                reason="group g is over its limit",
                on_exceed=self.on_exceed,  # type: ignore[arg-type]
                quorum="1 of human" if self.on_exceed == "escalate" else None,
            )
        self.used += 1
        return LimitResult(True, reservation=f"r{self.used}")

    def settle(self, reservation: str, actual: Cost | None) -> None:
        self.settled.append((reservation, actual))

    def applies(self, action: Action, groups: frozenset[str]) -> bool:
        return True


@dataclass
class Desk:
    granted: set[str] = field(default_factory=set)
    opened: list[tuple[str, str]] = field(default_factory=list)

    def consume(self, action: Action, policy_version: str) -> str | None:
        key = action.digest()
        if key in self.granted:
            self.granted.discard(key)
            return "ap-1"
        return None

    def open(
        self, action: Action, verdict_reasons: tuple[str, ...], quorum: str, policy_version: str
    ) -> str:
        self.opened.append((action.digest(), quorum))
        return "req-1"


def test_grants_alone_allow_and_deny(agent: TokenClaims) -> None:
    core = DecisionCore(GrantsAuthorizer())
    ok = core.decide(Action("llm.invoke", agent, "gpt-4o-mini"))
    assert ok.allowed and ok.policy_version == "grants-only"
    no = core.decide(Action("llm.invoke", agent, "claude-3-opus"))
    assert no.outcome == "deny"
    assert "claude-3-opus" in no.reasons[0]


def test_a_raising_check_denies_and_names_the_failure(agent: TokenClaims) -> None:
    d = DecisionCore(BrokenAuthorizer()).decide(Action("llm.invoke", agent, "gpt-4o"))
    assert d.outcome == "deny"
    assert "cedar exploded" in d.reasons[0] and d.policies == ("tether:fail-closed",)


def test_escalation_opens_a_request_then_an_approval_lets_exactly_one_through(
    agent: TokenClaims,
) -> None:
    desk = Desk()
    core = DecisionCore(EscalatingAuthorizer(), approvals=desk)
    action = Action("tool.call", agent, "db.add_index", arguments={"table": "orders"})
    first = core.decide(action)
    assert first.outcome == "escalate" and first.quorum == "1 of group:dba"
    assert first.approval == "req-1" and desk.opened == [(action.digest(), "1 of group:dba")]
    desk.granted.add(action.digest())
    second = core.decide(action)
    assert second.allowed and second.approval == "ap-1"
    assert core.decide(action).outcome == "escalate"  # the approval was used once


def test_escalation_without_an_approval_desk_is_a_deny(agent: TokenClaims) -> None:
    d = DecisionCore(EscalatingAuthorizer()).decide(Action("tool.call", agent, "db.x"))
    assert d.outcome == "deny"


def test_limit_denies_past_the_cap_and_settles(agent: TokenClaims) -> None:
    lim = CountingLimiter(cap=2)
    core = DecisionCore(GrantsAuthorizer(), limiter=lim)
    a = Action("tool.call", agent, "db.add_index")
    d1, d2, d3 = core.decide(a), core.decide(a), core.decide(a)
    assert [d.outcome for d in (d1, d2, d3)] == ["allow", "allow", "deny"]
    assert "over its limit" in d3.reasons[-1] and "limit:g/x" in d3.policies
    core.settle(d1, Cost(tokens=10))
    core.settle(d3, None)  # no reservation: nothing to settle
    assert lim.settled == [("r1", Cost(tokens=10))]


def test_limit_escalates_and_an_approval_forces_the_reservation(agent: TokenClaims) -> None:
    lim = CountingLimiter(cap=0, on_exceed="escalate")
    desk = Desk()
    core = DecisionCore(GrantsAuthorizer(), limiter=lim, approvals=desk)
    a = Action("tool.call", agent, "db.add_index", arguments={"t": 1})
    d = core.decide(a)
    assert d.outcome == "escalate" and d.quorum == "1 of human"
    desk.granted.add(a.digest())
    d = core.decide(a)
    assert d.allowed and d.reservation == "r1" and lim.used == 1


def test_jit_grants_widen_only_what_was_approved(agent: TokenClaims) -> None:
    extra = Grants.parse(["model:claude-*"])
    core = DecisionCore(GrantsAuthorizer(), extra_grants=lambda c: extra)
    assert core.decide(Action("llm.invoke", agent, "claude-3-haiku")).allowed
    assert core.decide(Action("llm.invoke", agent, "o1-pro")).outcome == "deny"


def test_digest_binds_arguments(agent: TokenClaims) -> None:
    a = Action("tool.call", agent, "db.add_index", arguments={"table": "orders"})
    b = Action("tool.call", agent, "db.add_index", arguments={"table": "users"})
    assert a.digest() != b.digest()
    assert a.digest() == Action("tool.call", agent, "db.add_index", {"table": "orders"}).digest()


def test_event_shape_has_action_decision_and_chain(agent: TokenClaims) -> None:
    core = DecisionCore(GrantsAuthorizer())
    a = Action("llm.invoke", agent, "gpt-4o")
    d = core.decide(a)
    ev = core.event(a, d, data={"status": 200}, bodies={"request": b"{}"})
    assert ev.type == "llm.invoke" and ev.decision == "allow"
    assert ev.actor == "spiffe://example.org/agent/worker" and ev.session == agent.task
    assert ev.data["chain"] == ["spiffe://example.org/user/admin"]
    assert ev.data["decision"]["outcome"] == "allow" and ev.data["status"] == 200


async def test_async_decide_matches_sync_and_fails_closed(agent: TokenClaims) -> None:
    core = DecisionCore(GrantsAuthorizer(), limiter=CountingLimiter(cap=1))
    a = Action("llm.invoke", agent, "gpt-4o")
    assert (await core.adecide(a)).allowed
    assert (await core.adecide(a)).outcome == "deny"  # the limit, checked off the loop
    broken = await DecisionCore(BrokenAuthorizer()).adecide(a)
    assert broken.outcome == "deny" and broken.policies == ("tether:fail-closed",)


async def test_async_escalation_without_hold_returns_the_pending_request(
    agent: TokenClaims,
) -> None:
    desk = Desk()
    core = DecisionCore(EscalatingAuthorizer(), approvals=desk)
    a = Action("tool.call", agent, "db.add_index")
    d = await core.adecide(a, hold=0)
    assert d.outcome == "escalate" and d.approval == "req-1"


def test_authorize_is_policy_alone_with_no_side_effect(agent: TokenClaims) -> None:
    """The view used to filter tool lists: the verdict, but no limit reserved, no approval
    request opened or consumed."""
    lim = CountingLimiter(cap=1)
    desk = Desk()
    core = DecisionCore(EscalatingAuthorizer(), limiter=lim, approvals=desk)
    action = Action("tool.call", agent, "db.add_index", arguments={"table": "orders"})
    desk.granted.add(action.digest())
    for _ in range(3):
        assert core.authorize(action).outcome == "escalate"
    assert lim.used == 0 and desk.opened == [] and action.digest() in desk.granted
    assert DecisionCore(BrokenAuthorizer()).authorize(action).outcome == "deny"
