"""The approval desk on a real SQLite store: quorum, binding, uses, expiry, refusals, records."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tether.clock import ManualClock
from tether.errors import BadRequest, NotFound, PermissionDenied, RecordFailed
from tether.events import MemoryRecorder
from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action
from tether.policy.approvals import Approvals, Conflict
from tether.policy.core import DecisionCore
from tether.policy.interfaces import Verdict
from tether.store.approvals import ApprovalStore

TD = "example.org"
GROUPS: dict[str, frozenset[str]] = {
    f"spiffe://{TD}/user/sam": frozenset({"sre"}),
    f"spiffe://{TD}/user/sue": frozenset({"sre"}),
    f"spiffe://{TD}/agent/reviewer": frozenset({"reviewers"}),
}


def ident(path: str) -> SpiffeId:
    kind, _, name = path.partition("/")
    return SpiffeId(TD, kind, name)  # type: ignore[arg-type]


def claims(path: str, *grantors: str, task: str | None = None) -> TokenClaims:
    """Claims of ``kind/name`` delegated through ``grantors`` (root first)."""
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
        grants=Grants.parse(["tool:db.*"]),
        task=task,
    )


def groups_of(c: TokenClaims) -> frozenset[str]:
    return GROUPS.get(str(c.subject), frozenset())


WORKER = claims("agent/worker", "user/alice", task="t-1")
ALICE = claims("user/alice")
BOB = claims("user/bob")
SAM = claims("user/sam")
SUE = claims("user/sue")
REVIEWER = claims("agent/reviewer", "user/admin")


def action(principal: TokenClaims = WORKER, **arguments: object) -> Action:
    return Action(
        "tool.call",
        principal,
        "db.schema_change",
        arguments=arguments or {"sql": "CREATE INDEX i ON t(c)"},
    )


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
    return Approvals(store, recorder, groups_of=groups_of, clock=clock, poll_interval=0.01)


def types(recorder: MemoryRecorder) -> list[str]:
    return [e.type for e in recorder.events]


# -- opening -------------------------------------------------------------------------------


def test_open_reuses_the_pending_request(desk: Approvals, recorder: MemoryRecorder) -> None:
    a = action()
    first = desk.open(a, ("needs sre",), "2 of group:sre", "v1")
    assert first.startswith("apr_")
    assert desk.open(a, ("needs sre",), "2 of group:sre", "v1") == first
    assert desk.open(action(sql="DROP TABLE t"), (), "2 of group:sre", "v1") != first
    assert desk.open(a, (), "2 of group:sre", "v2") != first
    assert types(recorder) == ["approval.requested"] * 3
    ev = recorder.events[0]
    assert ev.actor == ev.subject == str(WORKER.subject) and ev.session == "t-1"
    assert ev.data["approval"] == first and ev.data["chain"] == [f"spiffe://{TD}/user/alice"]
    rec = desk.get(first)
    assert rec.state == "pending" and rec.digest == a.digest() and rec.policy_version == "v1"
    assert rec.summary["arguments"] == {"sql": "CREATE INDEX i ON t(c)"}
    assert rec.chain == (f"spiffe://{TD}/user/alice",) and rec.task == "t-1"


def test_open_after_a_racing_approval_returns_that_approval(desk: Approvals) -> None:
    """The core consumes, then opens: a quorum completed between the two must not leave the
    waiter on a fresh request nobody will vote on (the race CI once hit)."""
    a = action()
    rid = desk.open(a, ("needs sre",), "2 of group:sre", "v1")
    desk.approve(rid, SAM)
    assert desk.consume(a, "v1") is None  # the core's consume ...
    desk.approve(rid, SUE)  # ... the last vote lands ...
    assert desk.open(a, ("needs sre",), "2 of group:sre", "v1") == rid  # ... then its open
    assert desk.consume(a, "v1") == rid
    assert desk.open(a, ("needs sre",), "2 of group:sre", "v1") != rid  # used up: ask afresh
    other = action(principal=claims("agent/worker", "user/bob", task="t-1"))
    assert desk.open(other, (), "2 of group:sre", "v1") != rid


def test_unparsable_quorum_refused_at_open(desk: Approvals, recorder: MemoryRecorder) -> None:
    with pytest.raises(BadRequest, match="'3 of robots'"):
        desk.open(action(), (), "1 of human and 3 of robots", "v1")
    assert recorder.events == [] and desk.list_requests() == []


def test_unknown_request(desk: Approvals) -> None:
    calls: list[Callable[[], object]] = [
        lambda: desk.get("apr_nope"),
        lambda: desk.approve("apr_nope", SAM),
        lambda: desk.deny("apr_nope", SAM, "no"),
        lambda: desk.use("apr_nope", action(), "v1"),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()


# -- quorum and use ------------------------------------------------------------------------


def test_quorum_then_single_use(desk: Approvals, recorder: MemoryRecorder) -> None:
    a = action()
    rid = desk.open(a, ("needs sre",), "2 of group:sre", "v1")
    assert desk.consume(a, "v1") is None
    rec = desk.approve(rid, SAM, comment="looks fine")
    assert rec.state == "pending" and [v.approver for v in rec.votes] == [str(SAM.subject)]
    assert desk.consume(a, "v1") is None
    rec = desk.approve(rid, SUE)
    assert rec.state == "approved" and rec.uses == 1 and rec.uses_left == 1
    assert types(recorder) == [
        "approval.requested",
        "approval.granted",
        "approval.granted",
        "approval.approved",
    ]
    assert recorder.events[1].actor == str(SAM.subject)
    assert recorder.events[3].data["approvers"] == [str(SAM.subject), str(SUE.subject)]
    assert desk.consume(a, "v1") == rid
    assert desk.get(rid).state == "used"
    assert desk.consume(a, "v1") is None
    assert types(recorder)[-1] == "approval.used"
    assert recorder.events[-1].actor == str(WORKER.subject)


def test_approvers_grant_uses_smallest_wins(desk: Approvals) -> None:
    a = action()
    rid = desk.open(a, (), "2 of group:sre", "v1")
    desk.approve(rid, SAM, uses=3)
    assert desk.approve(rid, SUE, uses=2).uses == 2
    assert [desk.consume(a, "v1") for _ in range(3)] == [rid, rid, None]


@pytest.mark.parametrize("uses", [0, -1, 101, True])
def test_bad_uses_refused(desk: Approvals, uses: int) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    with pytest.raises(BadRequest, match="uses"):
        desk.approve(rid, BOB, uses=uses)


def test_human_and_reviewer_agent(desk: Approvals) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human and 1 of group:reviewers", "v1")
    assert desk.approve(rid, REVIEWER).state == "pending"  # reviewer agents are identities
    assert desk.approve(rid, BOB).state == "approved"


# -- named bad cases -----------------------------------------------------------------------


def test_approver_outside_quorum_refused(desk: Approvals, recorder: MemoryRecorder) -> None:
    rid = desk.open(action(), (), "2 of group:sre", "v1")
    with pytest.raises(PermissionDenied, match=r"not in the quorum .*2 of group:sre"):
        desk.approve(rid, BOB)
    with pytest.raises(PermissionDenied, match="not in the quorum"):
        desk.deny(rid, REVIEWER, "no")
    assert desk.get(rid).votes == () and types(recorder) == ["approval.requested"]


def test_self_approval_refused(desk: Approvals) -> None:
    a = action(ALICE)
    rid = desk.open(a, (), "1 of human", "v1")
    with pytest.raises(PermissionDenied, match="its own request"):
        desk.approve(rid, ALICE)
    with pytest.raises(PermissionDenied, match="its own request"):
        desk.deny(rid, ALICE, "changed my mind")
    assert desk.approve(rid, BOB).state == "approved"


def test_self_approval_when_quorum_allows_it(desk: Approvals) -> None:
    a = action(ALICE)
    rid = desk.open(a, (), "1 of human, allow self", "v1")
    assert desk.approve(rid, ALICE).state == "approved"
    assert desk.consume(a, "v1") == rid


def test_grantor_in_chain_refused(desk: Approvals) -> None:
    planner_worker = claims("agent/worker", "user/alice", "agent/planner")
    rid = desk.open(action(planner_worker), (), "1 of human and 1 of agent", "v1")
    with pytest.raises(PermissionDenied, match="delegated the requester"):
        desk.approve(rid, ALICE)  # the root human
    with pytest.raises(PermissionDenied, match="delegated the requester"):
        desk.approve(rid, claims("agent/planner", "user/alice"))  # the nearest grantor
    # another agent alice delegated acts for alice: refused too
    with pytest.raises(PermissionDenied, match=r"acts for spiffe://example\.org/user/alice"):
        desk.approve(rid, claims("agent/helper", "user/alice"))
    desk.approve(rid, BOB)
    assert desk.approve(rid, REVIEWER).state == "approved"


def test_replayed_approval_refused(desk: Approvals) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human", "v1")
    desk.approve(rid, BOB)
    assert desk.use(rid, a, "v1").state == "used"
    with pytest.raises(Conflict, match=r"used up .*replay refused"):
        desk.use(rid, a, "v1")
    assert desk.consume(a, "v1") is None


def test_expired_request_refused(
    desk: Approvals, clock: ManualClock, recorder: MemoryRecorder
) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    clock.advance(15 * 60)
    with pytest.raises(Conflict, match="already expired"):
        desk.approve(rid, BOB)
    rec = desk.get(rid)
    assert rec.state == "expired" and rec.decided_reason == "no quorum before the request expired"
    assert types(recorder) == ["approval.requested", "approval.expired"]
    # a new escalation of the same action opens a fresh request
    assert desk.open(action(), (), "1 of human", "v1") != rid


def test_expired_approval_refused(
    desk: Approvals, clock: ManualClock, recorder: MemoryRecorder
) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human", "v1")
    clock.advance(14 * 60)  # approved just in time: the use-by runs from the approval
    desk.approve(rid, BOB)
    clock.advance(15 * 60 - 1)
    assert desk.get(rid).state == "approved"
    clock.advance(1)
    assert desk.consume(a, "v1") is None
    assert desk.get(rid).state == "expired"
    with pytest.raises(Conflict, match="expired"):
        desk.use(rid, a, "v1")
    assert types(recorder)[-1] == "approval.expired"
    assert recorder.events[-1].data["was"] == "approved"


def test_approval_for_a_different_argument_digest_never_applies(desk: Approvals) -> None:
    a = action(sql="CREATE INDEX i ON t(c)")
    rid = desk.open(a, (), "1 of human", "v1")
    desk.approve(rid, BOB)
    other = action(sql="DROP TABLE t")
    assert desk.consume(other, "v1") is None
    with pytest.raises(PermissionDenied, match="different action"):
        desk.use(rid, other, "v1")
    assert desk.consume(a, "v1") == rid  # still there for the approved action


def test_approval_for_a_different_policy_version_never_applies(desk: Approvals) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human", "v1")
    desk.approve(rid, BOB)
    assert desk.consume(a, "v2") is None
    with pytest.raises(PermissionDenied, match="policy version v1"):
        desk.use(rid, a, "v2")
    assert desk.get(rid).uses_left == 1


def test_approval_bound_to_the_chain(desk: Approvals) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human", "v1")
    desk.approve(rid, BOB)
    impostor = action(claims("agent/worker", "user/mallory", task="t-1"))
    assert impostor.digest() == a.digest()  # same SPIFFE ID, same call ...
    assert desk.consume(impostor, "v1") is None  # ... but another chain
    with pytest.raises(PermissionDenied, match="another chain"):
        desk.use(rid, impostor, "v1")


# -- deny, double votes --------------------------------------------------------------------


def test_one_deny_decides(desk: Approvals, recorder: MemoryRecorder) -> None:
    a = action()
    rid = desk.open(a, (), "2 of group:sre", "v1")
    desk.approve(rid, SAM)
    with pytest.raises(BadRequest, match="reason"):
        desk.deny(rid, SUE, "  ")
    rec = desk.deny(rid, SUE, "not during the freeze")
    assert rec.state == "denied" and rec.decided_reason == "not during the freeze"
    assert types(recorder)[-1] == "approval.denied" and recorder.events[-1].decision == "deny"
    with pytest.raises(Conflict, match="already denied"):
        desk.approve(rid, SUE)
    assert desk.consume(a, "v1") is None
    with pytest.raises(Conflict, match="denied, not approved"):
        desk.use(rid, a, "v1")


def test_vote_twice_refused(desk: Approvals) -> None:
    rid = desk.open(action(), (), "2 of group:sre", "v1")
    desk.approve(rid, SAM)
    with pytest.raises(Conflict, match="already voted"):
        desk.approve(rid, SAM)
    with pytest.raises(Conflict, match="already voted"):
        desk.deny(rid, SAM, "no")


def test_approved_request_cannot_be_voted_again(desk: Approvals) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    desk.approve(rid, BOB)
    with pytest.raises(Conflict, match="already approved"):
        desk.approve(rid, claims("user/carol"))


def test_list_filters(desk: Approvals) -> None:
    r1 = desk.open(action(), (), "1 of human", "v1")
    r2 = desk.open(action(sql="x"), (), "1 of human", "v1")
    desk.approve(r2, BOB)
    assert [r.id for r in desk.list_requests(state="pending")] == [r1]
    assert [r.id for r in desk.list_requests(state="approved")] == [r2]
    assert {r.id for r in desk.list_requests(kind="action")} == {r1, r2}
    with pytest.raises(BadRequest, match="unknown state"):
        desk.list_requests(state="bogus")


# -- fail closed ---------------------------------------------------------------------------


def test_record_failure_means_no_state_change(
    desk: Approvals, recorder: MemoryRecorder, clock: ManualClock
) -> None:
    a = action()
    recorder.fail = True
    with pytest.raises(RecordFailed):
        desk.open(a, (), "1 of human", "v1")
    assert desk.list_requests() == []
    recorder.fail = False
    rid = desk.open(a, (), "1 of human", "v1")

    recorder.fail = True
    with pytest.raises(RecordFailed):
        desk.approve(rid, BOB)
    rec = desk.get(rid)
    assert rec.state == "pending" and rec.votes == ()
    with pytest.raises(RecordFailed):
        desk.deny(rid, BOB, "no")
    assert desk.get(rid).state == "pending"

    recorder.fail = False
    desk.approve(rid, BOB)
    recorder.fail = True
    with pytest.raises(RecordFailed):
        desk.consume(a, "v1")
    assert desk.get(rid).uses_left == 1  # the use was not taken

    clock.advance(3600)
    with pytest.raises(RecordFailed):
        desk.expire_due()
    recorder.fail = False
    assert desk.get(rid).state == "expired"


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_consumers_never_share_the_last_use(
    desk: Approvals, recorder: MemoryRecorder
) -> None:
    a = action()
    rid = desk.open(a, (), "1 of human", "v1")
    desk.approve(rid, BOB, uses=3)
    n = 12
    barrier = threading.Barrier(n)
    results: list[str | None] = []
    lock = threading.Lock()

    def consume() -> None:
        barrier.wait()
        got = desk.consume(a, "v1")
        with lock:
            results.append(got)

    threads = [threading.Thread(target=consume) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(rid) == 3 and results.count(None) == n - 3
    assert len(recorder.of_type("approval.used")) == 3
    rec = desk.get(rid)
    assert rec.state == "used" and rec.used == 3


def test_two_desks_share_one_store(
    store: ApprovalStore, recorder: MemoryRecorder, clock: ManualClock, tmp_path: Path
) -> None:
    one = Approvals(store, recorder, groups_of=groups_of, clock=clock)
    other_store = ApprovalStore(tmp_path / "tether.db")
    two = Approvals(other_store, recorder, groups_of=groups_of, clock=clock)
    a = action()
    rid = one.open(a, (), "1 of human", "v1")
    assert two.open(a, (), "1 of human", "v1") == rid
    two.approve(rid, BOB)
    assert one.consume(a, "v1") == rid
    assert two.consume(a, "v1") is None
    other_store.close()


# -- waiting -------------------------------------------------------------------------------


async def test_wait_is_woken_by_a_decision(desk: Approvals) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    waiter = asyncio.create_task(desk.wait(rid, 30))
    await asyncio.sleep(0)
    await asyncio.to_thread(desk.approve, rid, BOB)
    assert await asyncio.wait_for(waiter, 10) == "approved"


async def test_wait_times_out_pending(desk: Approvals) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    assert await desk.wait(rid, 0) == "pending"
    with pytest.raises(NotFound):
        await desk.wait("apr_nope", 0)


async def test_wait_sees_another_process_decision(
    desk: Approvals, recorder: MemoryRecorder, clock: ManualClock, tmp_path: Path
) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    other_store = ApprovalStore(tmp_path / "tether.db")
    other = Approvals(other_store, recorder, groups_of=groups_of, clock=clock)
    waiter = asyncio.create_task(desk.wait(rid, 30))
    await asyncio.to_thread(other.deny, rid, BOB, "no")  # no in-process wake-up: the poll sees it
    assert await asyncio.wait_for(waiter, 10) == "denied"
    other_store.close()


async def test_wait_reports_expiry(desk: Approvals, clock: ManualClock) -> None:
    rid = desk.open(action(), (), "1 of human", "v1")
    clock.advance(3600)
    assert await desk.wait(rid, 5) == "expired"


# -- with the decision core ----------------------------------------------------------------


class Escalating:
    version = "v-esc"

    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict:
        return Verdict(
            "escalate", ("schema changes need sre",), ("p1",), self.version, "2 of group:sre"
        )


async def test_decision_core_escalate_approve_allow(desk: Approvals) -> None:
    core = DecisionCore(Escalating(), approvals=desk)
    a = action()
    first = core.decide(a)
    assert first.outcome == "escalate" and first.approval and first.quorum == "2 of group:sre"
    assert core.decide(a).approval == first.approval  # reused, not duplicated
    desk.approve(first.approval, SAM)
    held = asyncio.create_task(core.adecide(a, hold=30))
    await asyncio.sleep(0)
    await asyncio.to_thread(desk.approve, first.approval, SUE)
    allowed = await asyncio.wait_for(held, 10)
    assert allowed.outcome == "allow" and allowed.approval == first.approval
    again = core.decide(a)  # used once: the next call escalates afresh
    assert again.outcome == "escalate" and again.approval != first.approval
