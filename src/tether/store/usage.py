"""The usage ledger: tokens, cost and requests per identity, task and delegation root; and
the budgets tokens carry (``budget:tokens=N``, ``budget:usd=X``, ``budget:requests=N``).

Exact under concurrency within one process: :meth:`UsageLedger.reserve` checks and reserves
an estimate (prompt size / 4 + ``max_tokens``) in one step with no await between check and
reserve, so N concurrent calls can never together pass a budget; :meth:`settle` replaces
the estimate with the upstream's reported usage once the call ends (the estimate stays
charged when no usage came back). A budget covers the token's own calls and every call of
tokens delegated from it (each call is charged to every token id in its chain), and an
ancestor's budget is enforced on its descendants once the ancestor's limits are known to the
ledger (it presented itself here once; the limits are persisted).

Rows are written by one background thread in batches (SQLAlchemy Core, ``usage.db`` in the
data directory), never on the event loop; ``report`` flushes first. The audit log holds the
same usage durably per call; this ledger is the fast, queryable view. In-memory state is
bounded: accounts of expired tokens are evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from tether.clock import Clock, SystemClock
from tether.errors import BadRequest, StoreError
from tether.identity.claims import TokenClaims
from tether.identity.grants import Budget

__all__ = ["BudgetExceeded", "Reservation", "UsageLedger", "micro_usd"]

log = logging.getLogger(__name__)

metadata = MetaData()
usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time_ms", Integer, nullable=False, index=True),
    Column("identity", String(512), nullable=False, index=True),
    Column("root", String(512), nullable=False, index=True),
    Column("task", String(256), nullable=True, index=True),
    Column("token_id", String(64), nullable=False),
    Column("model", String(256), nullable=False),
    Column("provider", String(128), nullable=False),
    Column("api", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("usd_micro", Integer, nullable=False),
)
spent = Table(
    "usage_spent",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("tokens", Integer, nullable=False),
    Column("usd_micro", Integer, nullable=False),
    Column("requests", Integer, nullable=False),
)
budgets = Table(
    "usage_budgets",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("tokens", Integer, nullable=True),
    Column("usd_micro", Integer, nullable=True),
    Column("requests", Integer, nullable=True),
    Column("expires_at", Integer, nullable=False),
)

GroupBy = Literal["identity", "task", "root", "model"]
GROUPS: tuple[str, ...] = ("identity", "task", "root", "model")
FLUSH_INTERVAL = 0.05
SWEEP_EVERY = 1024


def micro_usd(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value())


class BudgetExceeded(Exception):
    def __init__(self, unit: str, limit: str, used: str, token_id: str) -> None:
        super().__init__(f"budget:{unit}={limit} is spent ({used} used or reserved)")
        self.unit = unit
        self.token_id = token_id


@dataclass(slots=True)
class _Account:
    limit_tokens: int | None
    limit_usd: int | None  # micro-USD
    limit_requests: int | None
    expires_at: int
    tokens: int = 0
    usd: int = 0
    requests: int = 0

    @property
    def limited(self) -> bool:
        return not (
            self.limit_tokens is None and self.limit_usd is None and self.limit_requests is None
        )


@dataclass(slots=True)
class Reservation:
    keys: tuple[str, ...]
    tokens: int
    usd: int
    settled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _limits(b: Budget) -> tuple[int | None, int | None, int | None]:
    return b.tokens, None if b.usd is None else micro_usd(b.usd), b.requests


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class UsageLedger:
    def __init__(self, path_or_url: str | Path, clock: Clock | None = None) -> None:
        url = str(path_or_url)
        if "://" not in url:
            url = f"sqlite:///{Path(url).resolve()}"
        self._engine: Engine = create_engine(url, future=True)
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        try:
            metadata.create_all(self._engine)
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open the usage ledger: {e}") from e
        self.clock = clock or SystemClock()
        self._accounts: dict[str, _Account] = {}
        self._rows: list[dict[str, Any]] = []
        self._deltas: dict[str, list[int]] = {}
        self._new_budgets: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._settles = 0
        self._thread = threading.Thread(target=self._run, name="tether-usage", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"UsageLedger(accounts={len(self._accounts)})"

    # -- budgets ----------------------------------------------------------------------------

    def _account(self, token_id: str, own: Budget | None, expires_at: int) -> _Account | None:
        acct = self._accounts.get(token_id)
        if acct is not None:
            return acct
        with self._engine.connect() as conn:
            row = conn.execute(select(spent).where(spent.c.token_id == token_id)).first()
            brow = None
            if own is None:
                brow = conn.execute(select(budgets).where(budgets.c.token_id == token_id)).first()
        if own is not None:
            lt, lu, lr = _limits(own)
            with self._lock:
                self._new_budgets.append(
                    {
                        "token_id": token_id,
                        "tokens": lt,
                        "usd_micro": lu,
                        "requests": lr,
                        "expires_at": expires_at,
                    }
                )
        elif brow is not None:
            lt, lu, lr = brow.tokens, brow.usd_micro, brow.requests
            expires_at = brow.expires_at
        else:
            return None
        acct = _Account(lt, lu, lr, expires_at)
        if row is not None:
            acct.tokens, acct.usd, acct.requests = row.tokens, row.usd_micro, row.requests
        self._accounts[token_id] = acct
        return acct

    def reserve(self, claims: TokenClaims, tokens: int, usd: Decimal | None) -> Reservation:
        """Check every budget that applies and reserve the estimate in all of them, or raise
        :class:`BudgetExceeded`. ``usd`` None means the price is unknown: a usd budget then
        refuses (it cannot be enforced)."""
        budget = claims.grants.budget
        if budget.tokens is None and budget.usd is None and budget.requests is None:
            return Reservation((), tokens, 0)
        usd_m = 0 if usd is None else micro_usd(usd)
        accts: list[tuple[str, _Account]] = []
        for i, jti in enumerate((*claims.chain_jti, claims.token_id)):
            own = budget if i == len(claims.chain_jti) else None
            acct = self._account(jti, own, claims.expires_at)
            if acct is None or not acct.limited:
                continue
            accts.append((jti, acct))
            if acct.limit_requests is not None and acct.requests + 1 > acct.limit_requests:
                raise BudgetExceeded("requests", str(acct.limit_requests), str(acct.requests), jti)
            if acct.limit_tokens is not None and acct.tokens + tokens > acct.limit_tokens:
                raise BudgetExceeded("tokens", str(acct.limit_tokens), str(acct.tokens), jti)
            if acct.limit_usd is not None:
                if usd is None:
                    raise BudgetExceeded("usd", _usd(acct.limit_usd), "unknown price", jti)
                if acct.usd + usd_m > acct.limit_usd:
                    raise BudgetExceeded("usd", _usd(acct.limit_usd), _usd(acct.usd), jti)
        for _, acct in accts:
            acct.tokens += tokens
            acct.usd += usd_m
            acct.requests += 1
        return Reservation(tuple(j for j, _ in accts), tokens, usd_m)

    def settle(
        self,
        res: Reservation,
        claims: TokenClaims,
        *,
        model: str,
        provider: str,
        api: str,
        status: str,
        input_tokens: int | None,
        output_tokens: int | None,
        usd: Decimal | None,
    ) -> None:
        """Record one finished call and replace its reservation with what it really used.
        With no reported usage the reservation stays charged (conservative)."""
        if res.settled:
            return
        res.settled = True
        known = input_tokens is not None or output_tokens is not None
        i_tok, o_tok = input_tokens or 0, output_tokens or 0
        if known:
            d_tokens = i_tok + o_tok - res.tokens
            d_usd = (micro_usd(usd) if usd is not None else res.usd) - res.usd
        else:
            d_tokens = d_usd = 0
            i_tok, o_tok = res.tokens, 0
        for jti in res.keys:
            acct = self._accounts.get(jti)
            if acct is not None:
                acct.tokens += d_tokens
                acct.usd += d_usd
        with self._lock:
            for jti in res.keys:
                d = self._deltas.setdefault(jti, [0, 0, 0])
                d[0] += res.tokens + d_tokens
                d[1] += res.usd + d_usd
                d[2] += 1
            self._rows.append(
                {
                    "time_ms": int(self.clock.now() * 1000),
                    "identity": str(claims.subject),
                    "root": str(claims.root),
                    "task": claims.task,
                    "token_id": claims.token_id,
                    "model": model,
                    "provider": provider,
                    "api": api,
                    "status": status,
                    "input_tokens": i_tok,
                    "output_tokens": o_tok,
                    "usd_micro": res.usd + d_usd if usd is not None or res.usd else 0,
                }
            )
        self._wake.set()
        self._settles += 1
        if self._settles % SWEEP_EVERY == 0:
            self._sweep()

    def release(self, res: Reservation) -> None:
        """The call never reached the upstream: give the reservation back."""
        if res.settled:
            return
        res.settled = True
        for jti in res.keys:
            acct = self._accounts.get(jti)
            if acct is not None:
                acct.tokens -= res.tokens
                acct.usd -= res.usd
                acct.requests -= 1

    def _sweep(self) -> None:
        now = self.clock.now()
        for jti in [j for j, a in self._accounts.items() if a.expires_at + 60 < now]:
            del self._accounts[jti]

    # -- persistence -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(1.0)
            self._wake.clear()
            time.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception as e:  # keep the thread alive; the next flush retries
                log.warning("usage ledger flush failed: %s", type(e).__name__)

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            deltas, self._deltas = self._deltas, {}
            new_b, self._new_budgets = self._new_budgets, []
        if not (rows or deltas or new_b):
            return
        try:
            with self._engine.begin() as conn:
                if rows:
                    conn.execute(usage.insert(), rows)
                if new_b:
                    conn.execute(sqlite_insert(budgets).on_conflict_do_nothing(), new_b)
                if deltas:
                    stmt = sqlite_insert(spent)
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[spent.c.token_id],
                        set_={
                            "tokens": spent.c.tokens + stmt.excluded.tokens,
                            "usd_micro": spent.c.usd_micro + stmt.excluded.usd_micro,
                            "requests": spent.c.requests + stmt.excluded.requests,
                        },
                    )
                    conn.execute(
                        stmt,
                        [
                            {"token_id": k, "tokens": v[0], "usd_micro": v[1], "requests": v[2]}
                            for k, v in deltas.items()
                        ],
                    )
        except SQLAlchemyError:
            with self._lock:  # put them back for the next attempt
                self._rows[:0] = rows
                for k, v in deltas.items():
                    d = self._deltas.setdefault(k, [0, 0, 0])
                    for i in range(3):
                        d[i] += v[i]
                self._new_budgets[:0] = new_b
            raise

    def report(
        self,
        by: str = "identity",
        *,
        identity: str | None = None,
        root: str | None = None,
        since_ms: int | None = None,
    ) -> list[dict[str, Any]]:
        """Totals grouped by ``identity``, ``task``, ``root`` or ``model``."""
        if by not in GROUPS:
            raise BadRequest(f"by must be one of {', '.join(GROUPS)}")
        try:
            self.flush()
            col = usage.c[by]
            q = (
                select(
                    col.label("key"),
                    func.count().label("requests"),
                    func.sum(usage.c.input_tokens).label("input_tokens"),
                    func.sum(usage.c.output_tokens).label("output_tokens"),
                    func.sum(usage.c.usd_micro).label("usd_micro"),
                )
                .group_by(col)
                .order_by(col)
            )
            if identity is not None:
                q = q.where(usage.c.identity == identity)
            if root is not None:
                q = q.where(usage.c.root == root)
            if since_ms is not None:
                q = q.where(usage.c.time_ms >= since_ms)
            with self._engine.connect() as conn:
                rows = conn.execute(q).all()
        except SQLAlchemyError as e:
            raise StoreError(f"cannot read the usage ledger: {e}") from e
        return [
            {
                by: r.key,
                "requests": int(r.requests),
                "input_tokens": int(r.input_tokens or 0),
                "output_tokens": int(r.output_tokens or 0),
                "total_tokens": int((r.input_tokens or 0) + (r.output_tokens or 0)),
                "usd": _usd(int(r.usd_micro or 0)),
            }
            for r in rows
        ]

    def spent(self, token_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """In-memory totals (spent + reserved) for the given token ids that have budgets."""
        out = {}
        for j in token_ids:
            a = self._accounts.get(j)
            if a is not None:
                out[j] = {"tokens": a.tokens, "usd_micro": a.usd, "requests": a.requests}
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        except SQLAlchemyError as e:
            log.warning("usage ledger final flush failed: %s", type(e).__name__)
        self._engine.dispose()


def _usd(micro: int) -> str:
    return str((Decimal(micro) / 1_000_000).normalize())
