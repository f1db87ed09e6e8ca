"""Approval quorums: who must approve an escalated action or a just-in-time grant.

Grammar (whitespace-tolerant, case-sensitive names)::

    quorum   := clause (" and " clause)* [", allow self"]
    clause   := N " of " selector                  N in 1..MAX_COUNT
    selector := "human"                            any user identity   (spiffe://TD/user/*)
              | "agent"                            any agent identity  (spiffe://TD/agent/*)
              | "user:" NAME                       one user            (spiffe://TD/user/NAME)
              | "agent:" NAME                      one agent           (spiffe://TD/agent/NAME)
              | "group:" NAME                      members of a Tether group

Examples: ``"2 of group:sre"``, ``"1 of human and 1 of group:reviewers"``,
``"1 of user:alice, allow self"``.

Approvers are distinct identities and each approver counts toward at most one clause: with
``"1 of human and 1 of group:sre"`` a single human in ``sre`` satisfies one clause, not both.
Whether a set of approvers satisfies the quorum is a bipartite matching (approvers against
clause slots), solved exactly with augmenting paths; quorums are small, so this is cheap.

``allow self`` lifts the default rule that nobody approves their own action or an action of
an agent they delegated; the desk (``policy/approvals.py``) enforces that rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tether.errors import BadRequest
from tether.identity.claims import TokenClaims
from tether.identity.spiffe import SpiffeId

__all__ = [
    "MAX_CLAUSES",
    "MAX_COUNT",
    "Approver",
    "Clause",
    "GroupsOf",
    "Quorum",
    "parse_quorum",
]

MAX_COUNT = 50
MAX_CLAUSES = 8
MAX_TEXT = 500

GroupsOf = Callable[[TokenClaims], frozenset[str]]

_CLAUSE = re.compile(r"^(\d{1,4})\s+of\s+(\S+)$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_GROUP = re.compile(r"^[A-Za-z0-9._:/@-]{1,128}$")
_AND = re.compile(r"\s+and\s+")
_ALLOW_SELF = re.compile(r",\s*allow\s+self\s*$")


@dataclass(frozen=True, slots=True)
class Approver:
    """One identity that voted, with the groups it belonged to when it voted."""

    id: SpiffeId
    groups: frozenset[str] = frozenset()

    @classmethod
    def of(cls, claims: TokenClaims, groups_of: GroupsOf | None = None) -> Approver:
        return cls(claims.subject, groups_of(claims) if groups_of else frozenset())


@dataclass(frozen=True, slots=True)
class Clause:
    count: int
    kind: str  # "human" | "agent" | "user" | "agent_name" | "group"
    name: str = ""

    @property
    def selector(self) -> str:
        if self.kind in ("human", "agent"):
            return self.kind
        prefix = "agent" if self.kind == "agent_name" else self.kind
        return f"{prefix}:{self.name}"

    def admits(self, approver: Approver) -> bool:
        ident = approver.id
        if self.kind == "human":
            return ident.kind == "user"
        if self.kind == "agent":
            return ident.kind == "agent"
        if self.kind == "user":
            return ident.kind == "user" and ident.name == self.name
        if self.kind == "agent_name":
            return ident.kind == "agent" and ident.name == self.name
        return self.name in approver.groups

    def __str__(self) -> str:
        return f"{self.count} of {self.selector}"


def _parse_clause(text: str) -> Clause:
    m = _CLAUSE.match(text)
    if not m:
        raise BadRequest(
            f"invalid quorum clause {text[:80]!r}: expected 'N of SELECTOR' "
            "(SELECTOR: human, agent, user:NAME, agent:NAME, group:NAME)"
        )
    count = int(m.group(1))
    if not 1 <= count <= MAX_COUNT:
        raise BadRequest(f"invalid quorum clause {text[:80]!r}: N must be 1..{MAX_COUNT}")
    sel = m.group(2)
    if sel in ("human", "agent"):
        return Clause(count, sel)
    prefix, sep, name = sel.partition(":")
    if sep and prefix in ("user", "agent") and _NAME.match(name):
        return Clause(count, "user" if prefix == "user" else "agent_name", name)
    if sep and prefix == "group" and _GROUP.match(name):
        return Clause(count, "group", name)
    raise BadRequest(
        f"invalid quorum clause {text[:80]!r}: unknown selector {sel[:60]!r} "
        "(human, agent, user:NAME, agent:NAME, group:NAME)"
    )


@dataclass(frozen=True, slots=True)
class Quorum:
    clauses: tuple[Clause, ...]
    allow_self: bool = False

    @property
    def size(self) -> int:
        """Approvers needed in all."""
        return sum(c.count for c in self.clauses)

    def eligible(self, approver: Approver) -> bool:
        """Could this approver count toward any clause?"""
        return any(c.admits(approver) for c in self.clauses)

    def assignment(self, approvers: Iterable[Approver]) -> list[list[Approver]]:
        """A maximum assignment of distinct approvers to clause slots: for each clause, the
        approvers counted toward it (at most ``count``)."""
        people: list[Approver] = []
        seen: set[SpiffeId] = set()
        for a in approvers:
            if a.id not in seen:
                seen.add(a.id)
                people.append(a)
        slots: list[int] = [i for i, c in enumerate(self.clauses) for _ in range(c.count)]
        adj: list[list[int]] = [
            [s for s, ci in enumerate(slots) if self.clauses[ci].admits(p)] for p in people
        ]
        owner: list[int] = [-1] * len(slots)  # slot -> person index

        def augment(p: int, visited: list[bool]) -> bool:
            for s in adj[p]:
                if visited[s]:
                    continue
                visited[s] = True
                if owner[s] == -1 or augment(owner[s], visited):
                    owner[s] = p
                    return True
            return False

        filled = 0
        for p in range(len(people)):
            if filled == len(slots):
                break
            if adj[p] and augment(p, [False] * len(slots)):
                filled += 1
        out: list[list[Approver]] = [[] for _ in self.clauses]
        for s, p in enumerate(owner):
            if p != -1:
                out[slots[s]].append(people[p])
        return out

    def satisfied(self, approvers: Iterable[Approver]) -> bool:
        return all(
            len(got) == c.count
            for got, c in zip(self.assignment(approvers), self.clauses, strict=True)
        )

    def missing(self, approvers: Iterable[Approver]) -> str:
        """What is still needed, e.g. ``"1 more of group:sre"``; empty when satisfied."""
        parts = [
            f"{c.count - len(got)} more of {c.selector}"
            for got, c in zip(self.assignment(approvers), self.clauses, strict=True)
            if len(got) < c.count
        ]
        return " and ".join(parts)

    def __str__(self) -> str:
        text = " and ".join(str(c) for c in self.clauses)
        return f"{text}, allow self" if self.allow_self else text


def parse_quorum(text: str) -> Quorum:
    """Parse a quorum expression. Raises :class:`BadRequest` naming the bad clause."""
    if not isinstance(text, str):
        raise BadRequest("quorum must be a string such as '2 of group:sre'")
    if len(text) > MAX_TEXT:
        raise BadRequest(f"quorum too long ({len(text)} > {MAX_TEXT} characters)")
    body = text.strip()
    allow_self = False
    m = _ALLOW_SELF.search(body)
    if m:
        allow_self = True
        body = body[: m.start()].rstrip()
    if not body:
        raise BadRequest("empty quorum: expected 'N of SELECTOR' clauses joined by ' and '")
    parts = _AND.split(body)
    if len(parts) > MAX_CLAUSES:
        raise BadRequest(f"too many quorum clauses ({len(parts)} > {MAX_CLAUSES})")
    clauses = tuple(_parse_clause(p.strip()) for p in parts)
    selectors = [c.selector for c in clauses]
    for s in selectors:
        if selectors.count(s) > 1:
            raise BadRequest(f"quorum names {s} twice in {text[:80]!r}: write one clause")
    return Quorum(clauses, allow_self)
