"""The one shape every enforcement point hands the decision core: an :class:`Action`.

A gateway translates whatever protocol it speaks (OpenAI, Anthropic, MCP, HTTP, a CONNECT
request, a delegation, a beam launch) into an ``Action``:

* *who*      ``principal``: the verified token's claims, so the whole delegation chain;
* *what*     ``type``: one of :data:`ACTION_TYPES` (``llm.invoke``, ``tool.call`` ...);
* *on what*  ``resource``: the model, tool, service (``svc/path``), domain or identity;
* *with what* ``arguments`` (canonical JSON the approval binds to), ``context`` (the
  conditions policy may look at: ``max_tokens``, ``tools``, ``stream`` ...), ``effects``
  (side effects by kind, counted by group limits) and ``cost`` (estimated tokens / USD).

The core answers with a :class:`Decision`: ``allow``, ``deny`` or ``escalate``, with the
reasons and the ids of the policies that decided, and the policy version it was decided under.
Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from tether.audit.canonical import canonical_json
from tether.identity.claims import TokenClaims
from tether.identity.grants import GrantKind

__all__ = [
    "ACTION_TYPES",
    "GRANT_KIND_OF",
    "Action",
    "Cost",
    "Decision",
    "Outcome",
]

Outcome = Literal["allow", "deny", "escalate"]

ACTION_TYPES: tuple[str, ...] = (
    "llm.invoke",
    "tool.call",
    "http.request",
    "egress.connect",
    "identity.delegate",
    "beam.create",
)

# Which grant kind in a token covers which action type's resource. Action types not listed
# (delegation, beam creation) are not covered by a grant kind: policy alone decides them.
GRANT_KIND_OF: Mapping[str, GrantKind] = {
    "llm.invoke": "model",
    "tool.call": "tool",
    "http.request": "http",
    "egress.connect": "egress",
}


@dataclass(frozen=True, slots=True)
class Cost:
    """What an action is expected to spend (reserved before, settled after)."""

    tokens: int = 0
    usd: Decimal = Decimal(0)
    requests: int = 1


@dataclass(frozen=True, slots=True)
class Action:
    type: str
    principal: TokenClaims
    resource: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    effects: Mapping[str, int] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)

    @property
    def session(self) -> str | None:
        return self.principal.task

    @property
    def granted(self) -> bool:
        """Does the token's own grant set cover this resource? (False for ungranted types.)"""
        kind = GRANT_KIND_OF.get(self.type)
        return kind is not None and self.principal.grants.allows(kind, self.resource)

    def digest(self) -> str:
        """SHA-256 over the canonical (type, principal, resource, arguments): what an approval
        binds to. The same call with different arguments has a different digest."""
        doc = {
            "type": self.type,
            "principal": str(self.principal.subject),
            "resource": self.resource,
            "arguments": dict(self.arguments),
        }
        return hashlib.sha256(canonical_json(doc)).hexdigest()

    def summary(self) -> dict[str, Any]:
        """JSON view for decisions and audit records (no secret: the token is not in it)."""
        return {
            "type": self.type,
            "principal": str(self.principal.subject),
            "token_id": self.principal.token_id,
            "root": str(self.principal.root),
            "resource": self.resource,
            "context": dict(self.context),
            "effects": dict(self.effects),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The core's answer to one Action.

    ``reasons``   human-readable, most important first (shown to agents and humans)
    ``policies``  ids of the policies that determined the outcome (Cedar ``@id`` or file:line)
    ``approval``  for ``escalate``: the pending approval request's id; for an ``allow`` that
                  consumed an approval, that approval's id
    ``quorum``    for ``escalate``: the quorum the approval needs (``"2 of group:sre"``)
    ``reservation`` group-limit reservation id to settle once the action's real cost is known
    """

    outcome: Outcome
    action_digest: str
    reasons: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    policy_version: str = ""
    approval: str | None = None
    quorum: str | None = None
    reservation: str | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "action_digest": self.action_digest,
            "reasons": list(self.reasons),
            "policies": list(self.policies),
            "policy_version": self.policy_version,
        }
        for name in ("approval", "quorum", "reservation"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
