"""The approval desk: escalated actions wait here for a quorum of approvers.

An approval request binds to

* the action's digest (:meth:`Action.digest`: type, principal, resource, canonical arguments),
* the policy version the escalation was decided under,
* the requesting principal and its delegation chain,
* the quorum (``"2 of group:sre"``, see :mod:`tether.policy.quorum`),
* an expiry (``request_ttl``, default 15 min) and, once approved, a use-by time
  (``approval_ttl`` after approval, default 15 min) and a number of uses (default 1).

States::

    pending --(quorum met)--> approved --(last use)--> used
       |                         |
       +--(any eligible deny)--> denied
       +--(deadline passes)----> expired <--(use-by passes with uses left)--+

Rules (each refusal names its reason):

* Nobody approves their own action, nor an action of an agent they delegated: the approver's
  identity and its own grantors must not meet the requester's identity and chain (so an agent
  delegated by the requester's grantor is refused too). ``, allow self`` in the quorum lifts
  this rule.
* Approvers outside the quorum are refused (403); an approver votes once.
* A deny by any eligible approver denies the request.
* An approval applies only to the same digest, policy version and chain; replayed (used up)
  and expired approvals are refused.
* Uses: each approving vote may ask for ``uses`` (1..MAX_USES); the request gets the smallest.

Every state change is recorded (``approval.requested``, ``approval.granted`` per vote,
``approval.approved``, ``approval.denied``, ``approval.used``, ``approval.expired``) inside the
store transaction that makes it, before the commit: if the record fails the transaction rolls
back and the call raises (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from tether.audit.canonical import canonical_json
from tether.clock import Clock, SystemClock
from tether.errors import BadRequest, NotFound, PermissionDenied, TetherError
from tether.events import Event, Recorder
from tether.identity.claims import TokenClaims
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action
from tether.policy.quorum import Approver, GroupsOf, Quorum, parse_quorum
from tether.store.approvals import (
    ApprovalRecord,
    ApprovalStore,
    RequestKind,
    State,
    Vote,
)

__all__ = [
    "DEFAULT_APPROVAL_TTL",
    "DEFAULT_REQUEST_TTL",
    "MAX_USES",
    "Approvals",
    "Conflict",
]

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TTL = 15 * 60.0
DEFAULT_APPROVAL_TTL = 15 * 60.0
DEFAULT_POLL_INTERVAL = 0.1
MAX_USES = 100
MAX_TEXT = 1024
MAX_ARGUMENTS_BYTES = 8192


class Conflict(TetherError):
    """The request is not in a state that allows this (already decided, expired, used up)."""

    code = "conflict"
    status = 409


def _new_id(kind: RequestKind) -> str:
    return ("apr_" if kind == "action" else "jit_") + secrets.token_hex(10)


def _identities(subject: str, chain: tuple[str, ...]) -> set[str]:
    return {subject, *chain}


def _text(value: str, what: str, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    value = value.strip()
    if required and not value:
        raise BadRequest(f"{what} is required")
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{what} too long ({len(value)} > {MAX_TEXT} characters)")
    return value


def _arguments_view(action: Action) -> dict[str, Any]:
    """What reviewers see of the arguments: the canonical JSON when small, else its digest."""
    raw = canonical_json(dict(action.arguments))
    if len(raw) <= MAX_ARGUMENTS_BYTES:
        return {"arguments": dict(action.arguments)}
    return {
        "arguments_sha256": hashlib.sha256(raw).hexdigest(),
        "arguments_bytes": len(raw),
    }


class Approvals:
    """The :class:`~tether.policy.interfaces.ApprovalDesk`: open, vote on, consume and wait for
    approval requests. Thread-safe; several processes may share one store."""

    def __init__(
        self,
        store: ApprovalStore,
        recorder: Recorder,
        *,
        groups_of: GroupsOf | None = None,
        clock: Clock | None = None,
        request_ttl: float = DEFAULT_REQUEST_TTL,
        approval_ttl: float = DEFAULT_APPROVAL_TTL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        if request_ttl <= 0 or approval_ttl <= 0 or poll_interval <= 0:
            raise ValueError("request_ttl, approval_ttl and poll_interval must be positive")
        self.store = store
        self.recorder = recorder
        self.groups_of = groups_of
        self.clock = clock or SystemClock()
        self.request_ttl = request_ttl
        self.approval_ttl = approval_ttl
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._listeners: list[Callable[[ApprovalRecord], None]] = []

    def __repr__(self) -> str:
        return f"Approvals({self.store!r})"

    def now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    # -- change notification ---------------------------------------------------------------
    def subscribe(self, listener: Callable[[ApprovalRecord], None]) -> None:
        """Call ``listener`` after every committed state change made in this process."""
        self._listeners.append(listener)

    def _changed(self, rec: ApprovalRecord) -> None:
        with self._lock:
            waiters = list(self._waiters.get(rec.id, ()))
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
                loop.call_soon_threadsafe(ev.set)
        for listener in self._listeners:
            try:
                listener(rec)
            except Exception as e:  # a listener never undoes a committed change
                log.warning("approval listener failed: %s", type(e).__name__)

    # -- recording -------------------------------------------------------------------------
    def _record(
        self,
        type_: str,
        rec: ApprovalRecord,
        actor: str | None,
        data: dict[str, Any] | None = None,
        decision: str | None = None,
    ) -> None:
        doc: dict[str, Any] = {
            "approval": rec.id,
            "kind": rec.kind,
            "quorum": rec.quorum,
            "digest": rec.digest,
            "policy_version": rec.policy_version,
        }
        if rec.chain:
            doc["chain"] = list(rec.chain)
        if data:
            doc.update(data)
        self.recorder.record(
            Event(
                type=type_,
                actor=actor,
                subject=rec.requester,
                session=rec.task,
                decision=decision,
                data=doc,
            )
        )

    # -- opening ---------------------------------------------------------------------------
    def open(
        self, action: Action, verdict_reasons: tuple[str, ...], quorum: str, policy_version: str
    ) -> str:
        """Open (or reuse the pending) approval request for this action; return its id."""
        summary = {**action.summary(), **_arguments_view(action)}
        rec = self.open_request(
            "action",
            action.principal,
            digest=action.digest(),
            policy_version=policy_version,
            quorum=quorum,
            summary=summary,
            reasons=verdict_reasons,
            ttl_ms=int(self.approval_ttl * 1000),
        )
        return rec.id

    def open_request(
        self,
        kind: RequestKind,
        requester: TokenClaims,
        *,
        digest: str,
        policy_version: str,
        quorum: str,
        summary: dict[str, Any],
        reasons: tuple[str, ...],
        ttl_ms: int,
    ) -> ApprovalRecord:
        """The pending request of ``kind`` for ``digest`` under ``policy_version``, opened
        now unless one is already pending (then that one, unchanged)."""
        parsed = parse_quorum(quorum)  # BadRequest names the bad clause
        now = self.now_ms()
        self.expire_due()
        with self.store.tx() as conn:
            existing = self.store.find_pending(conn, kind, digest, policy_version)
            if existing is not None:
                found = self.store.get(conn, existing)
                if found is not None and found.deadline_ms > now:
                    return found
            # Approved between the caller's consume() and this open (a vote racing the
            # decision): hand back that approval, so a waiter sees "approved" and the retry
            # consumes it, instead of opening a second request nobody will ever vote on.
            chain = tuple(str(g) for g in requester.grantors)
            approved = self.store.find_approved(conn, kind, digest) if kind == "action" else []
            for done in approved:
                if (
                    done.policy_version == policy_version
                    and done.chain == chain
                    and done.requester == str(requester.subject)
                    and done.deadline_ms > now
                    and done.used < done.uses
                ):
                    return done
            rec = ApprovalRecord(
                id=_new_id(kind),
                kind=kind,
                state="pending",
                digest=digest,
                policy_version=policy_version,
                requester=str(requester.subject),
                chain=tuple(str(g) for g in requester.grantors),
                task=requester.task,
                quorum=str(parsed),
                summary=summary,
                reasons=tuple(reasons),
                created_ms=now,
                deadline_ms=now + int(self.request_ttl * 1000),
                ttl_ms=ttl_ms,
                decided_ms=None,
                decided_reason=None,
                uses=1,
                used=0,
            )
            self.store.insert(conn, rec)
            self._record(
                "approval.requested",
                rec,
                rec.requester,
                {
                    "summary": {k: v for k, v in summary.items() if k != "arguments"},
                    "reasons": list(reasons),
                    "expires_ms": rec.deadline_ms,
                },
                decision="escalate",
            )
        self._changed(rec)
        return rec

    # -- reading ---------------------------------------------------------------------------
    def get(self, request_id: str) -> ApprovalRecord:
        self.expire_due(request_id)
        with self.store.read() as conn:
            rec = self.store.get(conn, request_id)
        if rec is None:
            raise NotFound(f"no approval request {request_id[:64]!r}")
        return rec

    def list_requests(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        requester: str | None = None,
        limit: int = 100,
    ) -> list[ApprovalRecord]:
        if state is not None and state not in ("pending", "approved", "denied", "expired", "used"):
            raise BadRequest(
                f"unknown state {state[:20]!r} (pending, approved, denied, expired, used)"
            )
        if kind is not None and kind not in ("action", "grants"):
            raise BadRequest(f"unknown kind {kind[:20]!r} (action, grants)")
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be 1..1000")
        self.expire_due()
        with self.store.read() as conn:
            return self.store.select(conn, state=state, kind=kind, requester=requester, limit=limit)

    # -- expiry ----------------------------------------------------------------------------
    def expire_due(self, request_id: str | None = None) -> int:
        """Expire every pending request and approval whose deadline has passed (or just
        ``request_id``); each expiry is recorded. Returns how many expired."""
        now = self.now_ms()
        with self.store.read() as conn:
            if not self.store.due(conn, now, request_id):
                return 0
        changed: list[ApprovalRecord] = []
        with self.store.tx() as conn:
            for rec in self.store.due(conn, now, request_id):
                was = rec.state
                if was == "pending":
                    reason = "no quorum before the request expired"
                elif rec.kind == "grants":
                    reason = "the just-in-time grants reached the end of their lifetime"
                else:
                    reason = f"approval expired with {rec.uses - rec.used} of {rec.uses} uses left"
                if self.store.transition(
                    conn, rec.id, was, "expired", decided_reason=reason, decided_ms=now
                ):
                    self._record("approval.expired", rec, None, {"was": was, "reason": reason})
                    changed.append(rec)
        for rec in changed:
            self._changed(rec)
        return len(changed)

    # -- voting ----------------------------------------------------------------------------
    def _check_approver(self, rec: ApprovalRecord, claims: TokenClaims, quorum: Quorum) -> Approver:
        who = str(claims.subject)
        if not quorum.allow_self:
            theirs = _identities(rec.requester, rec.chain)
            if who == rec.requester:
                raise PermissionDenied(
                    f"{who} may not approve its own request {rec.id}",
                    hint="nobody approves their own action unless the quorum says ', allow self'",
                )
            if who in rec.chain:
                raise PermissionDenied(
                    f"{who} delegated the requester {rec.requester} (it is in the requester's "
                    f"chain) and may not approve its action"
                )
            shared = sorted(theirs & {str(g) for g in claims.grantors})
            if shared:
                raise PermissionDenied(
                    f"{who} acts for {shared[0]}, who is the requester or in its chain, "
                    "and may not approve"
                )
        approver = Approver.of(claims, self.groups_of)
        if not quorum.eligible(approver):
            raise PermissionDenied(f"{who} is not in the quorum for {rec.id} ({rec.quorum})")
        return approver

    def _pending(self, request_id: str, now: int) -> ApprovalRecord:
        self.expire_due(request_id)
        with self.store.read() as conn:
            rec = self.store.get(conn, request_id)
        if rec is None:
            raise NotFound(f"no approval request {request_id[:64]!r}")
        if rec.state != "pending":
            raise Conflict(f"approval request {rec.id} is already {rec.state}")
        if rec.deadline_ms <= now:
            raise Conflict(f"approval request {rec.id} has expired")
        return rec

    def approve(
        self,
        request_id: str,
        approver: TokenClaims,
        *,
        uses: int | None = None,
        comment: str = "",
    ) -> ApprovalRecord:
        """Vote to approve. Once the quorum is met the request becomes a usable approval
        (uses: the smallest any approving vote asked for; default 1)."""
        if uses is not None and (
            isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_USES
        ):
            raise BadRequest(f"uses must be 1..{MAX_USES}")
        comment = _text(comment, "comment")
        now = self.now_ms()
        self._pending(request_id, now)
        with self.store.tx() as conn:
            rec = self.store.get(conn, request_id)
            if rec is None:
                raise NotFound(f"no approval request {request_id[:64]!r}")
            if rec.state != "pending" or rec.deadline_ms <= now:
                raise Conflict(f"approval request {rec.id} is already {rec.state}")
            quorum = parse_quorum(rec.quorum)
            me = self._check_approver(rec, approver, quorum)
            who = str(approver.subject)
            if any(v.approver == who for v in rec.votes):
                raise Conflict(f"{who} has already voted on {rec.id}")
            vote = Vote(who, "approve", tuple(sorted(me.groups)), uses, comment, now)
            self.store.add_vote(conn, rec.id, vote)
            self._record(
                "approval.granted",
                rec,
                who,
                {"uses": uses or 1, "comment": comment, "groups": sorted(me.groups)},
            )
            approving = [v for v in (*rec.votes, vote) if v.vote == "approve"]
            approvers = [
                Approver(SpiffeId.parse(v.approver), frozenset(v.groups)) for v in approving
            ]
            if quorum.satisfied(approvers):
                granted = min(v.uses or 1 for v in approving)
                until = now + rec.ttl_ms
                if not self.store.transition(
                    conn,
                    rec.id,
                    "pending",
                    "approved",
                    decided_ms=now,
                    deadline_ms=until,
                    uses=granted,
                ):
                    raise Conflict(f"approval request {rec.id} changed while voting; try again")
                self._record(
                    "approval.approved",
                    rec,
                    who,
                    {
                        "approvers": [v.approver for v in approving],
                        "uses": granted,
                        "valid_until_ms": until,
                    },
                    decision="allow",
                )
            out = self.store.get(conn, rec.id)
        assert out is not None
        self._changed(out)
        return out

    def deny(self, request_id: str, approver: TokenClaims, reason: str) -> ApprovalRecord:
        """Deny: one eligible approver's deny decides the request."""
        reason = _text(reason, "reason", required=True)
        now = self.now_ms()
        self._pending(request_id, now)
        with self.store.tx() as conn:
            rec = self.store.get(conn, request_id)
            if rec is None:
                raise NotFound(f"no approval request {request_id[:64]!r}")
            if rec.state != "pending" or rec.deadline_ms <= now:
                raise Conflict(f"approval request {rec.id} is already {rec.state}")
            me = self._check_approver(rec, approver, parse_quorum(rec.quorum))
            who = str(approver.subject)
            if any(v.approver == who for v in rec.votes):
                raise Conflict(f"{who} has already voted on {rec.id}")
            self.store.add_vote(
                conn, rec.id, Vote(who, "deny", tuple(sorted(me.groups)), None, reason, now)
            )
            if not self.store.transition(
                conn, rec.id, "pending", "denied", decided_ms=now, decided_reason=reason
            ):
                raise Conflict(f"approval request {rec.id} changed while voting; try again")
            self._record("approval.denied", rec, who, {"reason": reason}, decision="deny")
            out = self.store.get(conn, rec.id)
        assert out is not None
        self._changed(out)
        return out

    # -- using -----------------------------------------------------------------------------
    @staticmethod
    def _mismatch(
        rec: ApprovalRecord, digest: str, policy_version: str, chain: tuple[str, ...]
    ) -> TetherError | None:
        if rec.kind != "action":
            return BadRequest(f"{rec.id} is a grant request, not an action approval")
        if rec.digest != digest:
            return PermissionDenied(
                f"approval {rec.id} is for a different action (argument digest "
                f"{rec.digest[:12]}..., this action {digest[:12]}...)"
            )
        if rec.policy_version != policy_version:
            return PermissionDenied(
                f"approval {rec.id} was granted under policy version {rec.policy_version[:16]}, "
                f"not the current {policy_version[:16]}"
            )
        if rec.chain != chain:
            return PermissionDenied(
                f"approval {rec.id} was granted to {rec.requester} delegated by another chain"
            )
        return None

    def _take(self, rec: ApprovalRecord, action: Action, now: int) -> str | None:
        """Take one use of ``rec`` for ``action``; the id, or None if none was left."""
        with self.store.tx() as conn:
            used = self.store.use_one(conn, rec.id, now)
            if used is None:
                return None
            self._record(
                "approval.used",
                rec,
                str(action.principal.subject),
                {"used": used, "uses": rec.uses, "token_id": action.principal.token_id},
                decision="allow",
            )
        self._changed(rec)
        return rec.id

    def consume(self, action: Action, policy_version: str) -> str | None:
        """Use one granted approval bound to this action's digest, policy version and chain,
        if one is unexpired with uses left; return its id (None: there is none)."""
        digest = action.digest()
        chain = tuple(str(g) for g in action.principal.grantors)
        now = self.now_ms()
        with self.store.read() as conn:
            candidates = self.store.find_approved(conn, "action", digest)
        if not candidates:
            return None
        if any(c.deadline_ms <= now for c in candidates):
            self.expire_due()
        for rec in candidates:
            if rec.deadline_ms <= now or self._mismatch(rec, digest, policy_version, chain):
                continue
            taken = self._take(rec, action, now)
            if taken is not None:
                return taken
        return None

    def use(self, approval_id: str, action: Action, policy_version: str) -> ApprovalRecord:
        """Use one use of the named approval for ``action``, or raise naming why not:
        a different digest / policy version / chain (403), not approved, denied, used up
        (replay) or expired (409)."""
        now = self.now_ms()
        self.expire_due(approval_id)
        with self.store.read() as conn:
            rec = self.store.get(conn, approval_id)
        if rec is None:
            raise NotFound(f"no approval {approval_id[:64]!r}")
        chain = tuple(str(g) for g in action.principal.grantors)
        bad = self._mismatch(rec, action.digest(), policy_version, chain)
        if bad is not None:
            raise bad
        if rec.state == "used":
            raise Conflict(
                f"approval {rec.id} is used up ({rec.used} of {rec.uses} uses); replay refused"
            )
        if rec.state == "expired":
            raise Conflict(f"approval {rec.id} has expired")
        if rec.state != "approved":
            raise Conflict(f"approval {rec.id} is {rec.state}, not approved")
        if self._take(rec, action, now) is None:
            raise Conflict(f"approval {rec.id} is used up or expired; replay refused")
        return self.get(rec.id)

    # -- waiting ---------------------------------------------------------------------------
    def _poll_state(self, request_id: str) -> State:
        now = self.now_ms()
        with self.store.read() as conn:
            got = self.store.state_of(conn, request_id)
        if got is None:
            raise NotFound(f"no approval request {request_id[:64]!r}")
        state, deadline = got
        if state == "pending" and deadline <= now:
            self.expire_due(request_id)
            return "expired"
        return state

    async def wait(self, request_id: str, timeout: float) -> State:
        """Wait up to ``timeout`` seconds for the request to leave ``pending``; return its
        state then (``pending`` on timeout). Woken at once by a decision made in this process;
        a decision made by another process is seen at the next store poll."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        ev = asyncio.Event()
        entry = (loop, ev)
        with self._lock:
            self._waiters.setdefault(request_id, []).append(entry)
        try:
            while True:
                ev.clear()
                state = await asyncio.to_thread(self._poll_state, request_id)
                if state != "pending":
                    return state
                remaining = end - loop.time()
                if remaining <= 0:
                    return state
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(self.poll_interval, remaining))
        finally:
            with self._lock:
                waiters = self._waiters.get(request_id, [])
                if entry in waiters:
                    waiters.remove(entry)
                if not waiters:
                    self._waiters.pop(request_id, None)
