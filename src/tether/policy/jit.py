"""Just-in-time grants: zero standing privilege, extra grants asked for a task and approved.

An agent or a human asks for extra grants (``request_grants``) with a reason and a lifetime.
Approvers decide with the same desk and quorum machinery as escalated actions (kind
``grants``, ids ``jit_...``); the quorum comes from configuration (default ``"1 of human"``;
the requester never approves its own request unless the quorum says ``, allow self``).

An approved request is in force from its approval for the requested lifetime, for the
requesting SPIFFE ID with the same delegation chain (and the same task, when the request
named one); then it expires by itself. Asking again for grants an approved request in force
already covers returns that request; asking again for the same grants while a request is
pending returns the pending one.

:meth:`JitGrants.active_grants` is on the decision path (``DecisionCore(extra_grants=...)``)
and is cached per identity for ``cache_ttl`` seconds (never past the earliest expiry of a grant
it holds), invalidated at once by any change made in this process.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, replace
from decimal import Decimal

from tether.audit.canonical import canonical_json
from tether.config import parse_duration
from tether.errors import BadRequest, ConfigError
from tether.identity.claims import TokenClaims
from tether.identity.grants import BUDGET_UNITS, Budget, Grants
from tether.policy.approvals import MAX_TEXT, Approvals
from tether.policy.quorum import parse_quorum
from tether.store.approvals import ApprovalRecord

__all__ = ["DEFAULT_JIT_QUORUM", "DEFAULT_MAX_TTL", "JIT_POLICY_VERSION", "JitGrants"]

DEFAULT_JIT_QUORUM = "1 of human"
DEFAULT_MAX_TTL = 8 * 3600.0
DEFAULT_CACHE_TTL = 1.0
JIT_POLICY_VERSION = "jit"
_TASK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_Key = tuple[str, tuple[str, ...], str | None]


@dataclass(frozen=True, slots=True)
class _Cached:
    grants: Grants
    until: float


def _covers(held: Grants, asked: Grants) -> bool:
    """Does ``held`` already allow everything in ``asked`` (patterns and budget)?"""
    for g in asked.items:
        if not any(g.within(h) for h in held.items):
            return False
    for unit, value in asked.budget.items():
        have = getattr(held.budget, unit)
        if have is None or value > have:
            return False
    return True


def _merge(sets: list[Grants]) -> Grants:
    """Union of grant sets; for each budget unit the largest approved amount."""
    items = []
    for s in sets:
        for g in s.items:
            if g not in items:
                items.append(g)
    budget: dict[str, int | Decimal] = {}
    for s in sets:
        for unit, value in s.budget.items():
            if unit not in budget or value > budget[unit]:
                budget[unit] = value
    return Grants(tuple(items), Budget(**{u: budget[u] for u in BUDGET_UNITS if u in budget}))  # type: ignore[arg-type]


def _ttl_seconds(ttl: float | int | str) -> float:
    try:
        return parse_duration(ttl)
    except ConfigError as e:
        raise BadRequest(f"invalid ttl: {e.message}") from e


class JitGrants:
    def __init__(
        self,
        desk: Approvals,
        *,
        quorum: str = DEFAULT_JIT_QUORUM,
        max_ttl: float = DEFAULT_MAX_TTL,
        cache_ttl: float = DEFAULT_CACHE_TTL,
    ) -> None:
        self.quorum = str(parse_quorum(quorum))  # a bad configured quorum fails at start
        if max_ttl <= 0 or cache_ttl < 0:
            raise ValueError("max_ttl must be positive and cache_ttl non-negative")
        self.desk = desk
        self.max_ttl = max_ttl
        self.cache_ttl = cache_ttl
        self._cache: dict[_Key, _Cached] = {}
        self._lock = threading.Lock()
        desk.subscribe(self._on_change)

    def __repr__(self) -> str:
        return f"JitGrants(quorum={self.quorum!r})"

    def _on_change(self, rec: ApprovalRecord) -> None:
        if rec.kind == "grants":
            with self._lock:
                self._cache.clear()

    @staticmethod
    def _key(claims: TokenClaims) -> _Key:
        return (str(claims.subject), tuple(str(g) for g in claims.grantors), claims.task)

    @staticmethod
    def _applies(rec: ApprovalRecord, key: _Key) -> bool:
        subject, chain, task = key
        return (
            rec.requester == subject
            and rec.chain == chain
            and (rec.task is None or rec.task == task)
        )

    def request_grants(
        self,
        claims: TokenClaims,
        grants: list[str],
        reason: str,
        ttl: float | int | str,
        *,
        task: str | None = None,
    ) -> ApprovalRecord:
        """Ask for ``grants`` for ``ttl`` (seconds or ``"30m"``), for the token's task or, when
        the token has none, for ``task`` if given. Returns the request: a new pending one, the
        pending one for the same grants, or an approved one in force that already covers them.
        Raises BadRequest for malformed grants, negative budgets, an empty reason, a task other
        than the token's, or a lifetime over ``max_ttl``."""
        if task is not None and task != claims.task:
            if claims.task is not None:
                raise BadRequest(f"this token is bound to task {claims.task!r}, not {task[:64]!r}")
            if not isinstance(task, str) or not _TASK.match(task):
                raise BadRequest("task must be 1-128 of letters, digits, '.', '_', ':', '-'")
            claims = replace(claims, task=task)
        asked = Grants.parse(grants)
        if not asked.items and not asked.budget.items():
            raise BadRequest("ask for at least one grant (KIND:PATTERN or budget:UNIT=N)")
        if not isinstance(reason, str) or not reason.strip():
            raise BadRequest("a reason is required: approvers decide on it")
        reason = reason.strip()
        if len(reason) > MAX_TEXT:
            raise BadRequest(f"reason too long ({len(reason)} > {MAX_TEXT} characters)")
        seconds = _ttl_seconds(ttl)
        if seconds > self.max_ttl:
            raise BadRequest(
                f"ttl {seconds:g}s is longer than the {self.max_ttl:g}s a JIT grant may last"
            )
        key = self._key(claims)
        in_force = [
            r
            for r in self._approved(claims)
            if _covers(Grants.parse(list(r.summary.get("grants", []))), asked)
        ]
        if in_force:
            return max(in_force, key=lambda r: r.deadline_ms)
        doc = {
            "requester": key[0],
            "chain": list(key[1]),
            "task": key[2],
            "grants": sorted(asked.to_list()),
        }
        digest = hashlib.sha256(canonical_json(doc)).hexdigest()
        return self.desk.open_request(
            "grants",
            claims,
            digest=digest,
            policy_version=JIT_POLICY_VERSION,
            quorum=self.quorum,
            summary={
                "grants": asked.to_list(),
                "reason": reason,
                "ttl_s": seconds,
                "task": claims.task,
            },
            reasons=(reason,),
            ttl_ms=int(seconds * 1000),
        )

    def _approved(self, claims: TokenClaims) -> list[ApprovalRecord]:
        key = self._key(claims)
        now = self.desk.now_ms()
        with self.desk.store.read() as conn:
            rows = self.desk.store.active_grants(conn, key[0], now)
        return [r for r in rows if self._applies(r, key)]

    def active_grants(self, claims: TokenClaims) -> Grants:
        """The extra grants in force for this identity (same chain; same task if named)."""
        key = self._key(claims)
        now = self.desk.clock.now()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit.until > now:
            return hit.grants
        rows = self._approved(claims)
        merged = _merge([Grants.parse(list(r.summary.get("grants", []))) for r in rows])
        until = now + self.cache_ttl
        for r in rows:
            until = min(until, r.deadline_ms / 1000)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = _Cached(merged, until)
        return merged

    def requests_of(self, claims: TokenClaims, state: str | None = None) -> list[ApprovalRecord]:
        """The caller's own grant requests, newest first."""
        return self.desk.list_requests(state=state, kind="grants", requester=str(claims.subject))
