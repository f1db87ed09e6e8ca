"""Just-in-time grants: request, approve with the quorum machinery, time-box, reuse, cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.clock import ManualClock
from tether.errors import BadRequest, PermissionDenied, RecordFailed
from tether.events import MemoryRecorder
from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action
from tether.policy.approvals import Approvals, Conflict
from tether.policy.core import DecisionCore, GrantsAuthorizer
from tether.policy.jit import JitGrants
from tether.store.approvals import ApprovalStore

TD = "example.org"


def ident(path: str) -> SpiffeId:
    kind, _, name = path.partition("/")
    return SpiffeId(TD, kind, name)  # type: ignore[arg-type]


def claims(path: str, *grantors: str, task: str | None = None) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=ident(path),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**31,
        token_id=f"jti-{path}",
        grantors=tuple(ident(g) for g in grantors),
        chain_jti=tuple(f"jti-{g}" for g in grantors),
        grants=Grants.parse(["model:gpt-4o-mini"]),
        task=task,
    )


WORKER = claims("agent/worker", "user/alice", task="t-1")
ALICE = claims("user/alice")
BOB = claims("user/bob")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def recorder() -> MemoryRecorder:
    return MemoryRecorder()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ApprovalStore]:
    s = ApprovalStore(tmp_path / "tether.db")
    yield s
    s.close()


@pytest.fixture
def desk(store: ApprovalStore, recorder: MemoryRecorder, clock: ManualClock) -> Approvals:
    return Approvals(store, recorder, clock=clock)


@pytest.fixture
def jit(desk: Approvals) -> JitGrants:
    return JitGrants(desk, cache_ttl=5.0)


def test_request_approve_active_then_expire(
    jit: JitGrants, desk: Approvals, clock: ManualClock, recorder: MemoryRecorder
) -> None:
    req = jit.request_grants(WORKER, ["tool:db.migrate", "budget:tokens=5000"], "hotfix", "30m")
    assert req.id.startswith("jit_") and req.kind == "grants" and req.state == "pending"
    assert req.quorum == "1 of human" and req.summary["reason"] == "hotfix"
    assert jit.active_grants(WORKER) == Grants()
    approved = desk.approve(req.id, BOB)
    assert approved.state == "approved"
    assert approved.deadline_ms == int(clock.now() * 1000) + 30 * 60 * 1000
    active = jit.active_grants(WORKER)  # the approval invalidated the cache
    assert active.allows("tool", "db.migrate") and active.budget.tokens == 5000
    clock.advance(30 * 60 - 1)
    assert jit.active_grants(WORKER).allows("tool", "db.migrate")
    clock.advance(1)  # expires by itself, even from the cache
    assert jit.active_grants(WORKER) == Grants()
    desk.expire_due()
    assert desk.get(req.id).state == "expired"
    assert [e.type for e in recorder.events] == [
        "approval.requested",
        "approval.granted",
        "approval.approved",
        "approval.expired",
    ]
    assert recorder.events[0].data["kind"] == "grants"


def test_scoped_to_identity_chain_and_task(jit: JitGrants, desk: Approvals) -> None:
    req = jit.request_grants(WORKER, ["tool:db.migrate"], "hotfix", 600)
    desk.approve(req.id, BOB)
    assert jit.active_grants(WORKER).allows("tool", "db.migrate")
    for other in (
        claims("agent/worker", "user/alice", task="t-2"),  # another task
        claims("agent/worker", "user/mallory", task="t-1"),  # another chain
        claims("agent/other", "user/alice", task="t-1"),  # another identity
        ALICE,
    ):
        assert not jit.active_grants(other).allows("tool", "db.migrate"), other.subject


def test_request_without_task_applies_to_every_task(jit: JitGrants, desk: Approvals) -> None:
    req = jit.request_grants(BOB, ["http:billing/*"], "month end", "1h")
    desk.approve(req.id, ALICE)
    assert jit.active_grants(claims("user/bob", task="anything")).allows("http", "billing/x")


def test_covered_request_reuses_the_approved_one(
    jit: JitGrants, desk: Approvals, recorder: MemoryRecorder
) -> None:
    req = jit.request_grants(WORKER, ["tool:db.*", "budget:tokens=5000"], "hotfix", "30m")
    desk.approve(req.id, BOB)
    n = len(recorder.events)
    again = jit.request_grants(WORKER, ["tool:db.migrate", "budget:tokens=100"], "more", "10m")
    assert again.id == req.id and again.state == "approved"
    assert len(recorder.events) == n  # nothing new opened
    wider = jit.request_grants(WORKER, ["tool:db.migrate", "budget:tokens=9000"], "more", "10m")
    assert wider.id != req.id and wider.state == "pending"


def test_same_pending_request_is_reused(jit: JitGrants) -> None:
    a = jit.request_grants(WORKER, ["tool:a", "tool:b"], "x", "5m")
    b = jit.request_grants(WORKER, ["tool:b", "tool:a"], "x again", "5m")
    assert a.id == b.id
    c = jit.request_grants(WORKER, ["tool:c"], "x", "5m")
    assert c.id != a.id


@pytest.mark.parametrize(
    ("grants", "match"),
    [
        (["budget:tokens=-5"], "non-negative"),
        (["budget:usd=-0.01"], "non-negative"),
        (["budget:usd=NaN"], "non-negative"),
        (["budget:tokens=lots"], "invalid amount"),
        (["budget:bananas=3"], "invalid budget grant"),
        (["budget:tokens=1", "budget:tokens=2"], "given twice"),
        (["db.migrate"], "expected KIND:PATTERN"),
        (["root:*"], "unknown grant kind"),
        (["tool:a b"], "invalid grant pattern"),
        ([], "at least one grant"),
        ("tool:x", "must be a list"),
    ],
)
def test_negative_or_malformed_grants_refused(
    jit: JitGrants, recorder: MemoryRecorder, grants: list[str], match: str
) -> None:
    with pytest.raises(BadRequest, match=match):
        jit.request_grants(WORKER, grants, "why", "5m")
    assert recorder.events == []


@pytest.mark.parametrize(
    ("reason", "ttl", "match"),
    [
        ("", "5m", "reason is required"),
        ("x" * 2000, "5m", "reason too long"),
        ("ok", "0s", "invalid ttl"),
        ("ok", -5, "invalid ttl"),
        ("ok", "soon", "invalid ttl"),
        ("ok", "9h", "longer than"),
    ],
)
def test_bad_reason_or_ttl_refused(jit: JitGrants, reason: str, ttl: str | int, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        jit.request_grants(WORKER, ["tool:x"], reason, ttl)


def test_requester_may_not_approve_own_grants(jit: JitGrants, desk: Approvals) -> None:
    req = jit.request_grants(ALICE, ["tool:x"], "me", "5m")
    with pytest.raises(PermissionDenied, match="its own request"):
        desk.approve(req.id, ALICE)
    wreq = jit.request_grants(WORKER, ["tool:x"], "me", "5m")
    with pytest.raises(PermissionDenied, match="delegated the requester"):
        desk.approve(wreq.id, ALICE)


def test_agent_outside_human_quorum_refused(jit: JitGrants, desk: Approvals) -> None:
    req = jit.request_grants(WORKER, ["tool:x"], "me", "5m")
    with pytest.raises(PermissionDenied, match="not in the quorum"):
        desk.approve(req.id, claims("agent/reviewer", "user/bob"))


def test_denied_grants_never_active(jit: JitGrants, desk: Approvals) -> None:
    req = jit.request_grants(WORKER, ["tool:x"], "me", "5m")
    desk.deny(req.id, BOB, "not today")
    assert not jit.active_grants(WORKER).allows("tool", "x")
    with pytest.raises(Conflict):
        desk.approve(req.id, claims("user/carol"))


def test_configured_quorum(desk: Approvals) -> None:
    jit = JitGrants(desk, quorum="2 of human")
    req = jit.request_grants(WORKER, ["tool:x"], "me", "5m")
    assert desk.approve(req.id, BOB).state == "pending"
    assert desk.approve(req.id, claims("user/carol")).state == "approved"
    with pytest.raises(BadRequest, match="unknown selector"):
        JitGrants(desk, quorum="1 of nobody")


def test_cache_is_short_lived_for_other_processes(
    jit: JitGrants, store: ApprovalStore, recorder: MemoryRecorder, clock: ManualClock
) -> None:
    other = Approvals(store, recorder, clock=clock)  # another process: no in-process wake-up
    req = jit.request_grants(WORKER, ["tool:x"], "me", "1h")
    assert not jit.active_grants(WORKER).allows("tool", "x")  # cached empty
    other.approve(req.id, BOB)
    assert not jit.active_grants(WORKER).allows("tool", "x")  # still the cached answer
    clock.advance(5)
    assert jit.active_grants(WORKER).allows("tool", "x")


def test_record_failure_opens_nothing(jit: JitGrants, recorder: MemoryRecorder) -> None:
    recorder.fail = True
    with pytest.raises(RecordFailed):
        jit.request_grants(WORKER, ["tool:x"], "me", "5m")
    recorder.fail = False
    assert jit.requests_of(WORKER) == []


def test_decision_core_uses_active_grants(jit: JitGrants, desk: Approvals) -> None:
    core = DecisionCore(GrantsAuthorizer(), extra_grants=jit.active_grants)
    call = Action("tool.call", WORKER, "db.migrate")
    assert core.decide(call).outcome == "deny"
    req = jit.request_grants(WORKER, ["tool:db.migrate"], "hotfix", "10m")
    desk.approve(req.id, BOB)
    assert core.decide(call).outcome == "allow"
