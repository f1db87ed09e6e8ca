"""The decision core: one answer for every Action, whatever protocol it came in on.

``decide`` runs the fixed order from DESIGN.md::

    authorize (Cedar) -> boundaries: escalate? group limits? budgets? -> approvals -> Decision

* A ``deny`` from policy ends it.
* Group limits reserve the action's cost and effects; when a limit is exceeded, the limit's
  ``on_exceed`` says deny or escalate (with the quorum it names).
* An ``escalate`` (from policy or from a limit) is turned into ``allow`` by a granted approval
  bound to this action's digest and the policy version, used once; otherwise a pending approval
  request is opened (or reused) and its id goes back in the decision.
* Any exception in any check denies the action with the error named (fail closed).

The core does not record: the enforcement point records exactly one event per action, built
by :meth:`DecisionCore.event`, and refuses the action if that record fails. That keeps one
audit entry per action with the request and response in it, and one shape for every gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tether.clock import Clock, SystemClock
from tether.events import Event
from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.policy.action import GRANT_KIND_OF, Action, Cost, Decision
from tether.policy.interfaces import (
    ApprovalDesk,
    Authorizer,
    GroupIndex,
    Limiter,
    Verdict,
)

__all__ = ["DecisionCore", "GrantsAuthorizer"]

log = logging.getLogger(__name__)

ExtraGrants = Callable[[TokenClaims], Grants]


class GrantsAuthorizer:
    """The smallest honest authorizer: permit exactly what the token's grants allow.

    Used by unit tests of enforcement points that do not exercise Cedar; ``tether serve``
    always runs the Cedar engine (whose default policy set says the same thing and more).
    """

    version = "grants-only"

    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict:
        if action.context.get("granted", action.granted) or action.type not in GRANT_KIND_OF:
            return Verdict("allow", ("permitted by the token's grants",), ("grants",), self.version)
        return Verdict(
            "deny",
            (f"no grant covers {action.type} on {action.resource!r}",),
            ("grants",),
            self.version,
        )


class DecisionCore:
    def __init__(
        self,
        authorizer: Authorizer,
        *,
        groups: GroupIndex | None = None,
        limiter: Limiter | None = None,
        approvals: ApprovalDesk | None = None,
        extra_grants: ExtraGrants | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.groups = groups
        self.limiter = limiter
        self.approvals = approvals
        self.extra_grants = extra_grants
        self.clock = clock or SystemClock()

    def __repr__(self) -> str:
        return f"DecisionCore(policy_version={self.authorizer.version!r})"

    # -- deciding -------------------------------------------------------------------------

    def decide(self, action: Action) -> Decision:
        """Decide one action. Never raises: a failing check is a deny naming the failure."""
        digest = ""
        try:
            digest = action.digest()
            return self._decide(action, digest)
        except Exception as e:  # fail closed, whatever broke
            return self._failed(action, digest, e)

    def _failed(self, action: Action, digest: str, e: Exception) -> Decision:
        log.warning("decision check failed for %s: %s", action.type, type(e).__name__)
        return Decision(
            "deny",
            digest,
            (f"a decision check failed ({type(e).__name__}: {e}); denied (fail closed)",),
            ("tether:fail-closed",),
            self._version_or_blank(),
        )

    def _version_or_blank(self) -> str:
        try:
            return self.authorizer.version
        except Exception:
            return ""

    def _with_jit(self, action: Action) -> Action:
        """Add the just-in-time grants in force for this identity to the ``granted`` test."""
        kind = GRANT_KIND_OF.get(action.type)
        if self.extra_grants is None or kind is None or action.granted:
            return action
        if self.extra_grants(action.principal).allows(kind, action.resource):
            ctx = dict(action.context)
            ctx["granted"] = True
            ctx["granted_by"] = "jit"
            return Action(
                action.type,
                action.principal,
                action.resource,
                action.arguments,
                ctx,
                action.effects,
                action.cost,
            )
        return action

    def _decide(self, action: Action, digest: str) -> Decision:
        action, groups, verdict = self._authorize(action)
        return self._boundaries(action, groups, verdict, digest)

    def authorize(self, action: Action) -> Verdict:
        """What policy alone says about ``action`` (JIT grants and groups applied): no group
        limit is reserved, no approval opened or consumed, nothing recorded. For views that
        filter (a tool list shows what policy would let the agent call), never to let an
        action through: that is :meth:`decide`. Never raises: a failing check is a deny."""
        try:
            return self._authorize(action)[2]
        except Exception as e:  # fail closed, like decide
            d = self._failed(action, "", e)
            return Verdict("deny", d.reasons, d.policies, d.policy_version)

    def _authorize(self, action: Action) -> tuple[Action, frozenset[str], Verdict]:
        """The in-memory part: JIT grants, groups, Cedar."""
        action = self._with_jit(action)
        groups = self.groups.groups_of(action.principal) if self.groups else frozenset()
        return action, groups, self.authorizer.authorize(action, groups)

    def _needs_io(self, action: Action, groups: frozenset[str], verdict: Verdict) -> bool:
        """Will the boundaries step touch a store (approvals, a group limit)?"""
        if verdict.outcome == "deny":
            return False
        if verdict.outcome == "escalate":
            return True
        if self.limiter is None:
            return False
        applies = getattr(self.limiter, "applies", None)
        return True if applies is None else bool(applies(action, groups))

    def _boundaries(
        self, action: Action, groups: frozenset[str], verdict: Verdict, digest: str
    ) -> Decision:
        version = verdict.policy_version
        reasons, policies = verdict.reasons, verdict.policies
        if verdict.outcome == "deny":
            return Decision("deny", digest, reasons, policies, version)
        quorum = verdict.quorum if verdict.outcome == "escalate" else None
        approval: str | None = None
        if quorum is not None:
            approval = self.approvals.consume(action, version) if self.approvals else None
            if approval is None:
                return self._escalate(action, digest, [*reasons], [*policies], version, quorum)
            reasons += (f"approved by approval {approval}",)

        reservation: str | None = None
        if self.limiter is not None:
            res = self.limiter.reserve(action, groups, force=approval is not None)
            if not res.ok:
                reasons += (res.reason,)
                policies += (f"limit:{res.limit}",)
                if res.on_exceed != "escalate" or res.quorum is None:
                    return Decision("deny", digest, reasons, policies, version)
                approval = self.approvals.consume(action, version) if self.approvals else None
                if approval is None:
                    return self._escalate(
                        action, digest, [*reasons], [*policies], version, res.quorum
                    )
                reasons += (f"limit passed by approval {approval}",)
                res = self.limiter.reserve(action, groups, force=True)
                if not res.ok:  # a forced reservation only fails when the store does
                    reasons += (res.reason,)
                    return Decision("deny", digest, reasons, policies, version)
            reservation = res.reservation
        return Decision(
            "allow",
            digest,
            reasons,
            policies,
            version,
            approval=approval,
            reservation=reservation,
        )

    def _escalate(
        self,
        action: Action,
        digest: str,
        reasons: list[str],
        policies: list[str],
        version: str,
        quorum: str,
    ) -> Decision:
        if self.approvals is None:
            reasons.append("escalation needs an approval desk and none is configured; denied")
            return Decision("deny", digest, tuple(reasons), tuple(policies), version)
        request = self.approvals.open(action, tuple(reasons), quorum, version)
        reasons.append(f"waiting for approval {request} ({quorum})")
        return Decision(
            "escalate",
            digest,
            tuple(reasons),
            tuple(policies),
            version,
            approval=request,
            quorum=quorum,
        )

    async def adecide(self, action: Action, hold: float = 0.0) -> Decision:
        """``decide`` for the event loop: policy runs inline (it is in memory); the boundary
        step runs in a worker thread only when it will touch a store (an escalation, a group
        limit that applies), so the common allow never leaves the loop. For an escalation,
        optionally hold up to ``hold`` seconds for the approval; once approved, decide again
        (which consumes the approval)."""
        decision = await self._adecide_once(action)
        if decision.outcome != "escalate" or hold <= 0 or decision.approval is None:
            return decision
        wait = getattr(self.approvals, "wait", None)
        if wait is None:
            return decision
        try:
            state = await wait(decision.approval, hold)
        except TimeoutError:
            return decision
        except Exception as e:
            log.warning("waiting for approval failed: %s", type(e).__name__)
            return decision
        if state == "approved":
            return await self._adecide_once(action)
        if state == "denied":
            return Decision(
                "deny",
                decision.action_digest,
                (*decision.reasons, f"approval {decision.approval} was denied"),
                decision.policies,
                decision.policy_version,
                approval=decision.approval,
            )
        return decision

    async def _adecide_once(self, action: Action) -> Decision:
        digest = ""
        try:
            digest = action.digest()
            action, groups, verdict = self._authorize(action)
            if not self._needs_io(action, groups, verdict):
                return self._boundaries(action, groups, verdict, digest)
            return await asyncio.to_thread(self._boundaries, action, groups, verdict, digest)
        except Exception as e:
            return self._failed(action, digest, e)

    def settle(self, decision: Decision, actual: Cost | None) -> None:
        """Settle the decision's group-limit reservation with the action's real cost
        (``None`` releases it: the action never ran). Never raises."""
        if decision.reservation is None or self.limiter is None:
            return
        try:
            self.limiter.settle(decision.reservation, actual)
        except Exception as e:
            log.warning("settling reservation failed: %s", type(e).__name__)

    # -- recording ------------------------------------------------------------------------

    @staticmethod
    def event(
        action: Action,
        decision: Decision,
        *,
        data: Mapping[str, Any] | None = None,
        bodies: Mapping[str, bytes] | None = None,
    ) -> Event:
        """The one audit shape for an action and its decision (plus the enforcement point's
        own details: request ids, status, usage; and large bodies stored by digest)."""
        doc: dict[str, Any] = {"action": action.summary(), "decision": decision.summary()}
        claims = action.principal
        if claims.grantors:
            doc["chain"] = [str(g) for g in claims.grantors]
        if data:
            doc.update(data)
        return Event(
            type=action.type,
            actor=str(claims.subject),
            subject=action.resource,
            session=claims.task,
            decision=decision.outcome,
            data=doc,
            bodies=dict(bodies or {}),
        )
