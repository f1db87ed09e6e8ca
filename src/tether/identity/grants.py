"""Grants: what a token allows, written ``KIND:PATTERN``; and their attenuation rules.

Kinds: ``model`` (inference models), ``tool`` (MCP / tool names), ``http`` (HTTP services,
optionally with a path: ``billing/invoices/*``), ``egress`` (domains, optionally ``:port``),
and ``budget`` (``budget:tokens=50000``, ``budget:usd=2.50``, ``budget:requests=100``).

Patterns use ``*`` as the only wildcard; it matches any run of characters. A child grant is
within its parent when every value the child pattern can match is matched by the parent
pattern. We decide that by matching the child *pattern* as a literal string against the parent
pattern with ``fnmatchcase``: a ``*`` in the child can only be absorbed by a ``*`` in the
parent, so the test is sound (never admits a wider child). Budgets attenuate by amount: a
child's budget may not exceed its grantor's, and a child without one inherits the grantor's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Literal, cast

from tether.errors import BadRequest, DelegationRefused

__all__ = ["BUDGET_UNITS", "GRANT_KINDS", "Budget", "Grant", "GrantKind", "Grants"]

GrantKind = Literal["model", "tool", "http", "egress"]
GRANT_KINDS: tuple[GrantKind, ...] = ("model", "tool", "http", "egress")
BUDGET_UNITS = ("tokens", "usd", "requests")

_PATTERN = re.compile(r"^[A-Za-z0-9._:/@+*-]{1,200}$")
MAX_GRANTS = 64
_ALLOWS_MEMO = 256  # answers kept per grant set (one token's)


@dataclass(frozen=True, slots=True)
class Grant:
    kind: GrantKind
    pattern: str

    def __post_init__(self) -> None:
        if self.kind not in GRANT_KINDS:
            raise BadRequest(
                f"unknown grant kind {self.kind!r} in {self.kind}:{self.pattern} "
                f"(one of {', '.join(GRANT_KINDS)}, budget)"
            )
        if not _PATTERN.match(self.pattern):
            raise BadRequest(
                f"invalid grant pattern in {self.kind}:{self.pattern[:60]!r}: "
                "letters, digits and . _ : / @ + - with * as the only wildcard"
            )

    def matches(self, value: str) -> bool:
        """Does this grant allow ``value`` (a concrete model, tool, service or domain)?
        An ``egress`` pattern without a port covers ``host:port`` on any port, and an ``http``
        pattern without a path (``http:crm``) covers every path of the service."""
        if fnmatchcase(value, self.pattern):
            return True
        if self.kind == "egress":
            host, sep, port = value.rpartition(":")
            return bool(sep) and port.isdigit() and fnmatchcase(host, self.pattern)
        if self.kind == "http" and "/" not in self.pattern:  # http:crm is the whole service
            service, sep, _ = value.partition("/")
            return bool(sep) and fnmatchcase(service, self.pattern)
        return False

    def within(self, parent: Grant) -> bool:
        """Is every value this grant allows also allowed by ``parent``? (``egress:h:443``
        lies within ``egress:h``.)"""
        if self.kind != parent.kind:
            return False
        if fnmatchcase(self.pattern, parent.pattern):
            return True
        if self.kind == "egress":
            host, sep, port = self.pattern.rpartition(":")
            return (
                bool(sep) and (port.isdigit() or port == "*") and fnmatchcase(host, parent.pattern)
            )
        if self.kind == "http" and "/" not in parent.pattern:  # http:crm/x lies within http:crm
            service, sep, _ = self.pattern.partition("/")
            return bool(sep) and fnmatchcase(service, parent.pattern)
        return False

    def __str__(self) -> str:
        return f"{self.kind}:{self.pattern}"


@dataclass(frozen=True, slots=True)
class Budget:
    """Spending limits carried in a token. ``None`` means unlimited."""

    tokens: int | None = None
    usd: Decimal | None = None
    requests: int | None = None

    def items(self) -> list[tuple[str, int | Decimal]]:
        out: list[tuple[str, int | Decimal]] = []
        for unit in BUDGET_UNITS:
            v = getattr(self, unit)
            if v is not None:
                out.append((unit, v))
        return out

    def inherit(self, parent: Budget) -> Budget:
        """This budget with any unit it leaves open filled in from ``parent``."""
        return Budget(
            tokens=self.tokens if self.tokens is not None else parent.tokens,
            usd=self.usd if self.usd is not None else parent.usd,
            requests=self.requests if self.requests is not None else parent.requests,
        )


def _parse_budget(text: str, budget: dict[str, int | Decimal]) -> None:
    unit, sep, amount = text.partition("=")
    if not sep or unit not in BUDGET_UNITS:
        raise BadRequest(
            f"invalid budget grant 'budget:{text[:60]}' (use budget:tokens=N, budget:usd=X.YZ "
            "or budget:requests=N)"
        )
    if unit in budget:
        raise BadRequest(f"budget:{unit} given twice")
    try:
        value: int | Decimal = Decimal(amount) if unit == "usd" else int(amount)
    except (ValueError, InvalidOperation) as e:
        raise BadRequest(f"invalid amount in 'budget:{text[:60]}'") from e
    if (isinstance(value, Decimal) and not value.is_finite()) or value < 0:
        raise BadRequest(f"budget amount must be a non-negative number in 'budget:{text[:60]}'")
    budget[unit] = value


@dataclass(frozen=True, slots=True)
class Grants:
    """A validated set of grants plus a budget."""

    items: tuple[Grant, ...] = ()
    budget: Budget = field(default_factory=Budget)
    # allows() answers, per (kind, value): every decision asks, and the set never changes
    _allows: dict[tuple[str, str], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...]) -> Grants:
        if not isinstance(texts, list | tuple):
            raise BadRequest("grants must be a list of 'KIND:PATTERN' strings")
        if len(texts) > MAX_GRANTS:
            raise BadRequest(f"too many grants ({len(texts)} > {MAX_GRANTS})")
        items: list[Grant] = []
        budget: dict[str, int | Decimal] = {}
        for t in texts:
            if not isinstance(t, str) or ":" not in t:
                raise BadRequest(f"invalid grant {str(t)[:60]!r}: expected KIND:PATTERN")
            kind, _, pattern = t.partition(":")
            if kind == "budget":
                _parse_budget(pattern, budget)
                continue
            g = Grant(cast(GrantKind, kind), pattern)
            if g not in items:
                items.append(g)
        return cls(tuple(items), Budget(**budget))  # type: ignore[arg-type]

    def to_list(self) -> list[str]:
        out = [str(g) for g in self.items]
        out += [f"budget:{unit}={value}" for unit, value in self.budget.items()]
        return out

    def allows(self, kind: GrantKind, value: str) -> bool:
        memo = self._allows
        got = memo.get((kind, value))
        if got is None:
            got = any(g.kind == kind and g.matches(value) for g in self.items)
            if len(memo) < _ALLOWS_MEMO:
                memo[(kind, value)] = got
        return got

    def of_kind(self, kind: GrantKind) -> tuple[Grant, ...]:
        return tuple(g for g in self.items if g.kind == kind)

    def attenuate(self, parent: Grants) -> Grants:
        """Check this requested set against ``parent`` and return it with budgets inherited.

        Raises :class:`DelegationRefused` naming the first grant that is wider than the parent.
        """
        for g in self.items:
            if not any(g.within(p) for p in parent.items):
                held = ", ".join(str(p) for p in parent.of_kind(g.kind)) or f"no {g.kind} grants"
                raise DelegationRefused(
                    f"grant {g} is wider than the grantor's (grantor holds: {held})"
                )
        budget = self.budget.inherit(parent.budget)
        for unit, value in budget.items():
            limit = getattr(parent.budget, unit)
            if limit is not None and value > limit:
                raise DelegationRefused(
                    f"grant budget:{unit}={value} is wider than the grantor's budget:{unit}={limit}"
                )
        return Grants(self.items, budget)
