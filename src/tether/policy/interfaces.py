"""The seams between the decision core's parts. Each part implements one protocol:

* :class:`Authorizer`  Cedar policies -> allow / deny / escalate (``policy/engine.py``)
* :class:`GroupIndex`  which groups an identity belongs to (``policy/groups.py``)
* :class:`Limiter`     group rate limits, concurrency caps and budgets (``policy/limits.py``)
* :class:`ApprovalDesk` approvals with quorum and just-in-time grants (``policy/approvals.py``)

``policy/core.py`` composes them in the order DESIGN.md fixes:
authorize -> boundaries (limits, escalation, approvals) -> decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tether.identity.claims import TokenClaims
from tether.policy.action import Action, Cost, Outcome

__all__ = [
    "ApprovalDesk",
    "Authorizer",
    "GroupIndex",
    "LimitResult",
    "Limiter",
    "Verdict",
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy engine says about one action, before boundaries."""

    outcome: Outcome
    reasons: tuple[str, ...]
    policies: tuple[str, ...]
    policy_version: str
    quorum: str | None = None  # for escalate: the approval the policy asks for


@dataclass(frozen=True, slots=True)
class LimitResult:
    """A reservation (``ok``) or the limit that refused it, and what policy says to do then."""

    ok: bool
    reservation: str | None = None
    limit: str | None = None  # the limit's name, e.g. "swarm/db.schema_change"
    reason: str = ""
    on_exceed: Outcome = "deny"  # deny or escalate
    quorum: str | None = None  # for escalate


class Authorizer(Protocol):
    @property
    def version(self) -> str:
        """Digest of the loaded policy set; approvals bind to it."""
        ...

    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict: ...


class GroupIndex(Protocol):
    def groups_of(self, claims: TokenClaims) -> frozenset[str]: ...


class Limiter(Protocol):
    def applies(self, action: Action, groups: frozenset[str]) -> bool:
        """Would ``reserve`` count this action against any limit? (In memory, no I/O.)"""
        ...

    def reserve(
        self, action: Action, groups: frozenset[str], *, force: bool = False
    ) -> LimitResult:
        """Reserve the action's cost and effects in every group limit that applies; all or
        nothing. ``force`` reserves even past a limit (an approval let the action through)."""
        ...

    def settle(self, reservation: str, actual: Cost | None) -> None:
        """Replace the reserved cost with the actual one (``None``: release it entirely) and
        end the reservation's concurrency slot."""
        ...


class ApprovalDesk(Protocol):
    def consume(self, action: Action, policy_version: str) -> str | None:
        """Use one granted approval bound to this action's digest and policy version, if one
        exists and is unexpired with uses left; return its id."""
        ...

    def open(
        self, action: Action, verdict_reasons: tuple[str, ...], quorum: str, policy_version: str
    ) -> str:
        """Open (or reuse the pending) approval request for this action; return its id."""
        ...
