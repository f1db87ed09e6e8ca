"""Group limits — rate limits, concurrency caps and budgets — exact across threads and processes.

:class:`SqliteLimiter` is the :class:`~tether.policy.interfaces.Limiter` of the decision core.
Its state lives in ``<data>/limits.db``, shared by every process on the data directory:

``limit_meters``   one row per limit: ``used`` (the live total, an integer in the limit's
                   unit; USD in micro-dollars) and ``next_until`` (the earliest moment one of
                   its charges stops counting, so most reservations skip the purge)
``limit_charges``  one row per (reservation, limit): ``amount`` and ``until``, the moment it
                   stops counting: reservation time + window for rate limits and budgets (a
                   sliding log: exact, no bucket edges), reservation time + TTL for a
                   concurrency slot. ``res`` is the reservation id until the charge is settled

``reserve`` runs one ``BEGIN IMMEDIATE`` transaction (the database write lock, taken before
anything is read, so two processes can never both read the same ``used``): for each limit
that applies, purge its charges whose ``until`` has passed (only when ``next_until`` says
one has), check ``used + amount <= cap``, then — all or nothing — insert the charges and
update the meters. Within a process a lock serialises the one connection (no busy-waiting
between threads); between processes SQLite's lock does, with a busy timeout. Invariant,
kept by every transaction: ``used`` = the sum of the limit's charge rows.

``settle`` replaces the estimate with the actual (tokens, USD, requests; effect counts are
kept), ends the concurrency slot, or with ``None`` deletes every charge (the action never
ran). A reservation not settled within the TTL is final at its estimate: its slots stop
counting at the deadline (crash safety: a process that died mid-action does not hold slots
forever) and a late ``settle`` is ignored. The deadline is part of the reservation id.

Fail closed: any error while reserving is a refusal (``ok=False``) naming the error.

PostgreSQL later: the same two tables; the transaction takes
``SELECT ... FROM limit_meters WHERE limit_key = ANY(:keys) ORDER BY limit_key FOR UPDATE``
(after ``INSERT ... ON CONFLICT DO NOTHING`` for new keys) instead of the database-wide lock,
so limits that share no key do not serialise, and the fixed order prevents deadlocks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tether.clock import Clock, SystemClock
from tether.policy.action import Action, Cost
from tether.policy.boundaries import Boundaries, BoundariesSource, LimitDef, usd_units
from tether.policy.interfaces import LimitResult

__all__ = ["STORE_LIMIT", "Charge", "SqliteLimiter", "merge_quorums"]

log = logging.getLogger(__name__)

STORE_LIMIT = "limits-store"  # LimitResult.limit when the store itself failed
_NEVER = 1e300  # next_until of a meter with no charges

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS limit_meters ("
    " limit_key TEXT PRIMARY KEY, used INTEGER NOT NULL, next_until REAL NOT NULL"
    ") WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS limit_charges ("
    " id INTEGER PRIMARY KEY, res TEXT, limit_key TEXT NOT NULL, unit TEXT NOT NULL,"
    " amount INTEGER NOT NULL, until REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS limit_charges_by_limit ON limit_charges(limit_key, until)",
    "CREATE INDEX IF NOT EXISTS limit_charges_by_res ON limit_charges(res) WHERE res IS NOT NULL",
)


_NOTHING_TO_RESERVE = LimitResult(ok=True)  # no limit counts the action (immutable)


@dataclass(frozen=True, slots=True)
class Charge:
    """One limit an action is charged against, and how much (in the limit's unit)."""

    limit: LimitDef
    amount: int


def _amount(lim: LimitDef, action: Action, effects: dict[str, int]) -> int:
    cost = action.cost
    if lim.kind == "concurrency":
        return 1
    if lim.kind == "rate":
        return cost.requests
    if lim.unit == "tokens":
        return cost.tokens
    if lim.unit == "usd":
        return usd_units(cost.usd, up=True)
    if lim.unit == "requests":
        return cost.requests
    return effects.get(lim.unit, 0)


def charges_for(b: Boundaries, action: Action, groups: Iterable[str]) -> list[Charge]:
    """Every limit that applies to ``action`` for a holder in ``groups``, with its amount.

    A limit applies when its group is one of ``groups``, its ``match`` (if any) matches the
    action, and the amount in its unit is positive: a limit sees only actions that add to it.
    A negative amount raises ``ValueError`` (a refund is ``settle``'s job, not the caller's).
    """
    if not b.limits_by_group:
        return []
    lims, kinds = b.matching(action.type, action.resource, frozenset(groups))
    if not lims:
        return []
    effects = {k: int(v) for k, v in action.effects.items()}
    for kind in kinds:
        effects[kind] = max(effects.get(kind, 0), 1)
    out: list[Charge] = []
    for lim in lims:
        amount = _amount(lim, action, effects)
        if amount < 0:
            raise ValueError(f"negative {lim.unit} in the action's cost ({amount})")
        if amount > 0:
            out.append(Charge(lim, amount))
    out.sort(key=lambda c: c.limit.name)  # a fixed order (PostgreSQL row locks: no deadlock)
    return out


def merge_quorums(quorums: Iterable[str]) -> str:
    """Several escalating limits ask for one approval that satisfies each of them: the
    clauses of all, the larger count for a selector named twice; ``allow self`` only when
    every quorum allows it."""
    qs = [q for q in dict.fromkeys(quorums) if q]
    if len(qs) <= 1:
        return qs[0] if qs else ""
    from tether.policy.quorum import parse_quorum

    counts: dict[str, int] = {}
    allow_self = True
    for text in qs:
        q = parse_quorum(text)
        allow_self = allow_self and q.allow_self
        for c in q.clauses:
            counts[c.selector] = max(counts.get(c.selector, 0), c.count)
    body = " and ".join(f"{n} of {sel}" for sel, n in counts.items())
    return f"{body}, allow self" if allow_self else body


def _split_id(reservation: str) -> int | None:
    """The deadline (ms since the epoch) carried in a reservation id, or None if malformed."""
    _, sep, deadline = reservation.rpartition(".")
    if not sep or not deadline.isdigit():
        return None
    return int(deadline)


class SqliteLimiter:
    """The store-backed :class:`~tether.policy.interfaces.Limiter`.

    ``SqliteLimiter(data_dir.limits_db_path, boundaries_file, clock=SystemClock())`` — one
    per process (the connection is not carried across ``fork``). ``reservation_ttl``
    overrides ``[settings] reservation_ttl`` from the boundaries file.
    """

    def __init__(
        self,
        path: str | Path,
        source: BoundariesSource,
        *,
        clock: Clock | None = None,
        reservation_ttl: float | None = None,
        busy_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self._source = source
        self._clock = clock or SystemClock()
        self._ttl = reservation_ttl
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path),
            timeout=busy_timeout,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # guarded by self._lock
            cached_statements=64,
        )
        c = self._conn
        c.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        c.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is atomic and visible to every process at once (the
        # WAL and its index are shared), and survives a process crash; only an OS crash or
        # power loss can lose the last commits. Losing a reservation then under-counts
        # briefly; it cannot make two live processes disagree, so exactness holds.
        c.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA:
                    c.execute(stmt)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def __repr__(self) -> str:
        return f"SqliteLimiter({str(self.path)!r})"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- reserve --------------------------------------------------------------------------

    def applies(self, action: Action, groups: frozenset[str]) -> bool:
        """Would ``reserve`` touch the store for this action? (In memory; lets async callers
        keep actions no limit counts on the event loop.) True when unsure."""
        try:
            return bool(charges_for(self._source.current(), action, groups))
        except Exception:
            return True

    def reserve(
        self, action: Action, groups: frozenset[str], *, force: bool = False
    ) -> LimitResult:
        try:
            b = self._source.current()
            charges = charges_for(b, action, groups)
            if not charges:
                return _NOTHING_TO_RESERVE
            now = self._clock.now()
            ttl = self._ttl if self._ttl is not None else b.reservation_ttl
            with self._lock:
                return self._reserve(charges, now, now + ttl, force)
        except Exception as e:
            log.warning("group-limit reservation failed: %s: %s", type(e).__name__, e)
            return LimitResult(
                ok=False,
                limit=STORE_LIMIT,
                reason=f"group limits could not be checked ({type(e).__name__}: {e}); "
                "refused (fail closed)",
                on_exceed="deny",
            )

    async def areserve(
        self, action: Action, groups: frozenset[str], *, force: bool = False
    ) -> LimitResult:
        """``reserve`` off the event loop (another process may hold the lock for a while)."""
        return await asyncio.to_thread(self.reserve, action, groups, force=force)

    def _purge(self, key: str, now: float) -> tuple[int, float]:
        """(used, next_until) of a limit after dropping the charges that stopped counting."""
        c = self._conn
        row = c.execute(
            "SELECT used, next_until FROM limit_meters WHERE limit_key = ?", (key,)
        ).fetchone()
        if row is None:
            return 0, _NEVER
        used, next_until = int(row[0]), float(row[1])
        if next_until > now:
            return used, next_until
        gone = c.execute(
            "DELETE FROM limit_charges WHERE limit_key = ? AND until <= ? RETURNING amount",
            (key, now),
        ).fetchall()
        used -= sum(int(r[0]) for r in gone)
        low = c.execute(
            "SELECT MIN(until) FROM limit_charges WHERE limit_key = ?", (key,)
        ).fetchone()[0]
        next_until = _NEVER if low is None else float(low)
        c.execute(
            "UPDATE limit_meters SET used = ?, next_until = ? WHERE limit_key = ?",
            (used, next_until, key),
        )
        return used, next_until

    def _reserve(
        self, charges: list[Charge], now: float, deadline: float, force: bool
    ) -> LimitResult:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            over: list[tuple[Charge, int]] = []
            meters: list[tuple[Charge, int, float]] = []
            for ch in charges:
                used, next_until = self._purge(ch.limit.name, now)
                if used + ch.amount > ch.limit.amount:
                    over.append((ch, used))
                meters.append((ch, used, next_until))
            if over and not force:
                c.execute("COMMIT")  # keep the purge
                return _refusal(over)
            res = f"{secrets.token_hex(12)}.{int(deadline * 1000)}"
            rows = []
            updates = []
            for ch, used, next_until in meters:
                lim = ch.limit
                until = deadline if lim.window is None else now + lim.window
                rows.append((res, lim.name, lim.unit, ch.amount, until))
                updates.append((lim.name, used + ch.amount, min(next_until, until)))
            c.executemany(
                "INSERT INTO limit_charges (res, limit_key, unit, amount, until)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            c.executemany(
                "INSERT INTO limit_meters (limit_key, used, next_until) VALUES (?, ?, ?)"
                " ON CONFLICT (limit_key) DO UPDATE"
                " SET used = excluded.used, next_until = excluded.next_until",
                updates,
            )
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        if over:  # forced past the limit: it still counts
            return LimitResult(
                ok=True,
                reservation=res,
                limit=over[0][0].limit.name,
                reason="forced past " + "; ".join(_why(ch, used) for ch, used in over),
            )
        return LimitResult(ok=True, reservation=res)

    # -- settle ---------------------------------------------------------------------------

    def settle(self, reservation: str, actual: Cost | None) -> None:
        """Apply the actual cost (or release with ``None``) and end the concurrency slots.
        Idempotent; ignored once the reservation's TTL has passed. Raises on store errors
        (the reservation then expires by itself at its deadline)."""
        deadline = _split_id(reservation) if isinstance(reservation, str) else None
        if deadline is None:
            log.warning("settle: malformed reservation id ignored")
            return
        if self._clock.now() * 1000 >= deadline:
            return  # expired: the estimate is final, the slots already stopped counting
        with self._lock:
            self._settle(reservation, actual)

    async def asettle(self, reservation: str, actual: Cost | None) -> None:
        await asyncio.to_thread(self.settle, reservation, actual)

    def _settle(self, reservation: str, actual: Cost | None) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            rows = c.execute(
                "SELECT id, limit_key, unit, amount FROM limit_charges WHERE res = ?",
                (reservation,),
            ).fetchall()
            deltas: dict[str, int] = {}
            for cid, key, unit, amount in rows:
                if actual is None or unit == "slots":
                    c.execute("DELETE FROM limit_charges WHERE id = ?", (cid,))
                    deltas[key] = deltas.get(key, 0) - amount
                    continue
                new = _actual(unit, actual, amount)
                c.execute(
                    "UPDATE limit_charges SET amount = ?, res = NULL WHERE id = ?", (new, cid)
                )
                if new != amount:
                    deltas[key] = deltas.get(key, 0) + new - amount
            for key, delta in deltas.items():
                if delta:
                    c.execute(
                        "UPDATE limit_meters SET used = used + ? WHERE limit_key = ?", (delta, key)
                    )
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    # -- inspection -----------------------------------------------------------------------

    def usage(self, limit: str) -> int:
        """What ``limit`` counts now (its unit; USD in micro-dollars)."""
        now = self._clock.now()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                used, _ = self._purge(limit, now)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        return used


def _actual(unit: str, actual: Cost, estimate: int) -> int:
    if unit == "tokens":
        value = actual.tokens
    elif unit == "usd":
        value = usd_units(actual.usd, up=True)
    elif unit == "requests":
        value = actual.requests
    else:
        return estimate  # effect counts: the action had the effect it was reserved for
    return max(0, int(value))


def _why(ch: Charge, used: int) -> str:
    lim = ch.limit
    return (
        f"limit {lim.name}: {lim.describe()}; {lim.show_amount(used)} used, "
        f"{lim.show_amount(ch.amount)} more requested"
    )


def _refusal(over: list[tuple[Charge, int]]) -> LimitResult:
    denying = [(ch, u) for ch, u in over if ch.limit.on_exceed == "deny"]
    first = (denying or over)[0][0].limit
    reason = "; ".join(_why(ch, u) for ch, u in over)
    if denying:
        return LimitResult(ok=False, limit=first.name, reason=reason, on_exceed="deny")
    quorum = merge_quorums(ch.limit.quorum or "" for ch, _ in over)
    return LimitResult(
        ok=False, limit=first.name, reason=reason, on_exceed="escalate", quorum=quorum
    )
