"""Group limits on a real SQLite file: windows, settle, TTL, force, all-or-nothing, fail
closed, the swarm, and exactness under thread and asyncio concurrency."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from tether.clock import ManualClock
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action, Cost
from tether.policy.boundaries import parse_boundaries
from tether.policy.groups import Groups
from tether.policy.limits import STORE_LIMIT, SqliteLimiter, merge_quorums

TD = "example.org"
_ids = itertools.count()


def claims(name: str, labels: tuple[str, ...] = ("swarm",)) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(f"spiffe://{TD}/agent/{name}"),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id=f"t{next(_ids)}",
        grantors=(),
        chain_jti=(),
        grants=parse_grants(("tool:db.*", "model:*")),
        labels=labels,
    )


BASE = """
[groups.swarm]
labels = ["swarm"]

[groups.sre]
members = ["spiffe://example.org/user/*"]
delegated = false

[groups.dba]
members = ["spiffe://example.org/user/dana"]

[effects]
"db.schema_change" = ["tool.call:db.add_index", "tool.call:db.alter_*"]
"""

SWARM = (
    BASE
    + """
[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 3
window = "1h"
on_exceed = "escalate"
quorum = "2 of group:sre"
"""
)

GROUPS = frozenset({"swarm"})


def limiter(tmp_path: Path, text: str, clock: ManualClock, **kw: float) -> SqliteLimiter:
    return SqliteLimiter(tmp_path / "limits.db", parse_boundaries(text), clock=clock, **kw)


def add_index(who: str = "a", table: str = "orders") -> Action:
    return Action("tool.call", claims(who), "db.add_index", arguments={"table": table})


def llm(tokens: int = 0, usd: str = "0", who: str = "a") -> Action:
    return Action("llm.invoke", claims(who), "gpt-4o", cost=Cost(tokens=tokens, usd=Decimal(usd)))


def test_swarm_three_pass_rest_escalate_forced_one_counts(tmp_path: Path) -> None:
    clock = ManualClock()
    lim = limiter(tmp_path, SWARM, clock)
    groups = Groups(parse_boundaries(SWARM))
    agents = [claims(f"indexer-{i}") for i in range(50)]
    results = []
    for c in agents:
        action = Action("tool.call", c, "db.add_index", arguments={"table": "orders"})
        results.append(lim.reserve(action, groups.groups_of(c)))
    ok = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    assert len(ok) == 3 and len(refused) == 47
    for r in refused:
        assert r.on_exceed == "escalate"
        assert r.quorum == "2 of group:sre"
        assert r.limit == "schema-changes"
        assert "at most 3 db.schema_change per 1h across group swarm" in r.reason
        assert "3 used, 1 more requested" in r.reason
    forced = lim.reserve(add_index("indexer-9"), GROUPS, force=True)
    assert forced.ok and forced.reservation and forced.limit == "schema-changes"
    assert "forced past" in forced.reason
    assert lim.usage("schema-changes") == 4  # a forced reservation still counts
    # an hour later the window has slid past all four
    clock.advance(3600)
    assert lim.reserve(add_index(), GROUPS).ok


def test_actions_without_the_effect_are_not_counted(tmp_path: Path) -> None:
    lim = limiter(tmp_path, SWARM, ManualClock())
    for _ in range(10):
        r = lim.reserve(Action("tool.call", claims("a"), "db.select"), GROUPS)
        assert r.ok and r.reservation is None  # no limit applies: no store round trip
    assert lim.reserve(add_index(), frozenset({"dba"})).reservation is None  # not in swarm


def test_gateway_effects_count_too_without_double_counting(tmp_path: Path) -> None:
    lim = limiter(tmp_path, SWARM, ManualClock())
    # the gateway says this call changes the schema; the config does not know the tool
    a = Action("tool.call", claims("a"), "db.migrate", effects={"db.schema_change": 2})
    assert lim.reserve(a, GROUPS).ok
    assert lim.usage("schema-changes") == 2
    # both the config and the gateway name the effect: the larger count, not the sum
    b = Action("tool.call", claims("a"), "db.alter_table", effects={"db.schema_change": 1})
    assert lim.reserve(b, GROUPS).ok
    assert lim.usage("schema-changes") == 3
    assert not lim.reserve(b, GROUPS).ok


RATE = (
    BASE
    + """
[limits.rps]
group = "swarm"
kind = "rate"
amount = 3
window = "10s"
match = ["llm.invoke:gpt-*"]
"""
)


def test_sliding_window_is_exact(tmp_path: Path) -> None:
    clock = ManualClock(1_000.0)
    lim = limiter(tmp_path, RATE, clock)
    a = llm()
    assert lim.reserve(a, GROUPS).ok  # t = 0
    clock.advance(4)
    assert lim.reserve(a, GROUPS).ok  # t = 4
    assert lim.reserve(a, GROUPS).ok  # t = 4
    clock.advance(5.999)
    assert not lim.reserve(a, GROUPS).ok  # t = 9.999: all three still inside 10 s
    clock.advance(0.001)
    assert lim.reserve(a, GROUPS).ok  # t = 10: the first one slid out, exactly one room
    assert not lim.reserve(a, GROUPS).ok
    clock.advance(4)  # t = 14: the two from t = 4 slide out
    assert lim.reserve(a, GROUPS).ok
    assert lim.reserve(a, GROUPS).ok
    assert not lim.reserve(a, GROUPS).ok
    assert lim.usage("rps") == 3
    # an action the limit does not match is not counted
    assert lim.reserve(Action("llm.invoke", claims("a"), "claude-3"), GROUPS).reservation is None


BUDGETS = (
    BASE
    + """
[limits.tokens]
group = "swarm"
kind = "budget"
unit = "tokens"
amount = 1000
window = "1d"

[limits.usd]
group = "swarm"
kind = "budget"
unit = "usd"
amount = "1.00"
window = "1d"
"""
)


def test_settle_replaces_estimate_with_actual(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    r = lim.reserve(llm(tokens=600, usd="0.10"), GROUPS)
    assert r.ok and r.reservation
    assert not lim.reserve(llm(tokens=500), GROUPS).ok  # 600 + 500 > 1000
    lim.settle(r.reservation, Cost(tokens=250, usd=Decimal("0.0300001")))
    assert lim.usage("tokens") == 250
    assert lim.usage("usd") == 30_001  # micro-dollars, rounded up
    lim.settle(r.reservation, Cost(tokens=999))  # idempotent: settled once only
    assert lim.usage("tokens") == 250
    assert lim.reserve(llm(tokens=750), GROUPS).ok  # 250 + 750 = 1000, exactly the cap
    assert not lim.reserve(llm(tokens=1), GROUPS).ok


def test_settle_actual_above_estimate_blocks_the_next(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    r = lim.reserve(llm(tokens=100), GROUPS)
    assert r.reservation
    lim.settle(r.reservation, Cost(tokens=1200))  # a stream ran long
    assert lim.usage("tokens") == 1200
    refused = lim.reserve(llm(tokens=1), GROUPS)
    assert not refused.ok and refused.on_exceed == "deny" and refused.quorum is None
    assert "1200 used, 1 more requested" in refused.reason


def test_release_with_none(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    r = lim.reserve(llm(tokens=900, usd="0.90"), GROUPS)
    assert r.reservation
    lim.settle(r.reservation, None)
    assert lim.usage("tokens") == 0 and lim.usage("usd") == 0


def test_usd_budget_shown_in_dollars(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    assert lim.reserve(llm(tokens=1, usd="0.75"), GROUPS).ok
    r = lim.reserve(llm(tokens=1, usd="0.30"), GROUPS)
    assert not r.ok and r.limit == "usd"
    assert "at most $1.00 USD per 1d" in r.reason and "$0.75 used, $0.30 more" in r.reason


def test_all_or_nothing(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    # tokens fit, USD does not: nothing is reserved
    assert not lim.reserve(llm(tokens=10, usd="1.01"), GROUPS).ok
    assert lim.usage("tokens") == 0 and lim.usage("usd") == 0


CONC = (
    BASE
    + """
[settings]
reservation_ttl = "2m"

[limits.inflight]
group = "swarm"
kind = "concurrency"
amount = 2
"""
)


def test_concurrency_slots_freed_on_settle(tmp_path: Path) -> None:
    lim = limiter(tmp_path, CONC, ManualClock())
    a, b = lim.reserve(llm(), GROUPS), lim.reserve(llm(), GROUPS)
    assert a.ok and b.ok and a.reservation
    c = lim.reserve(llm(), GROUPS)
    assert not c.ok and "at most 2 in flight across group swarm" in c.reason
    lim.settle(a.reservation, Cost(tokens=5))
    assert lim.usage("inflight") == 1
    assert lim.reserve(llm(), GROUPS).ok


def test_unsettled_reservation_expires_after_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    lim = limiter(tmp_path, CONC + BUDGETS.replace(BASE, ""), clock)
    crashed = lim.reserve(llm(tokens=400), GROUPS)  # its process dies: never settled
    assert crashed.ok and crashed.reservation
    assert lim.reserve(llm(tokens=1), GROUPS).ok
    assert not lim.reserve(llm(tokens=1), GROUPS).ok  # 2 slots held
    clock.advance(119.999)
    assert not lim.reserve(llm(tokens=1), GROUPS).ok
    clock.advance(0.001)  # the TTL (2m) is over: both slots stop counting
    assert lim.usage("inflight") == 0
    # the estimate is final: a late settle is ignored, the tokens stay counted
    lim.settle(crashed.reservation, Cost(tokens=1))
    assert lim.usage("tokens") == 401  # refused attempts never counted
    assert lim.reserve(llm(tokens=1), GROUPS).ok


def test_reservation_ttl_override(tmp_path: Path) -> None:
    clock = ManualClock()
    lim = limiter(tmp_path, CONC, clock, reservation_ttl=5)
    assert lim.reserve(llm(), GROUPS).ok and lim.reserve(llm(), GROUPS).ok
    clock.advance(5)
    assert lim.reserve(llm(), GROUPS).ok


TWO = (
    BASE
    + """
[limits.deny-me]
group = "swarm"
kind = "rate"
amount = 1
window = "1h"

[limits.escalate-a]
group = "swarm"
kind = "rate"
amount = 1
window = "1h"
on_exceed = "escalate"
quorum = "1 of group:sre"

[limits.escalate-b]
group = "dba"
kind = "rate"
amount = 1
window = "1h"
on_exceed = "escalate"
quorum = "2 of group:sre and 1 of human"
"""
)


def test_deny_beats_escalate_and_quorums_merge(tmp_path: Path) -> None:
    both = frozenset({"swarm", "dba"})
    lim = limiter(tmp_path, TWO, ManualClock())
    assert lim.reserve(llm(), both).ok
    r = lim.reserve(llm(), both)
    assert not r.ok and r.on_exceed == "deny" and r.limit == "deny-me"
    assert "escalate-a" in r.reason and "escalate-b" in r.reason
    # without the denying limit: one approval must satisfy both escalating limits
    only_escalate = TWO.replace(
        '[limits.deny-me]\ngroup = "swarm"', '[limits.deny-me]\ngroup = "sre"'
    )
    lim2 = SqliteLimiter(
        tmp_path / "other.db", parse_boundaries(only_escalate), clock=ManualClock()
    )
    assert lim2.reserve(llm(), both).ok
    r = lim2.reserve(llm(), both)
    assert not r.ok and r.on_exceed == "escalate" and r.limit == "escalate-a"
    assert r.quorum == "2 of group:sre and 1 of human"


def test_merge_quorums() -> None:
    assert merge_quorums(["2 of group:sre"]) == "2 of group:sre"
    assert merge_quorums(["2 of group:sre", "2 of group:sre"]) == "2 of group:sre"
    assert (
        merge_quorums(["1 of group:sre, allow self", "3 of group:sre and 1 of human"])
        == "3 of group:sre and 1 of human"
    )


def test_negative_cost_is_refused(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    r = lim.reserve(llm(tokens=-500), GROUPS)
    assert not r.ok and r.limit == STORE_LIMIT and "negative tokens" in r.reason


def test_store_failure_fails_closed(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock())
    lim._conn.close()
    r = lim.reserve(llm(tokens=1), GROUPS)
    assert not r.ok and r.on_exceed == "deny" and r.limit == STORE_LIMIT
    assert "ProgrammingError" in r.reason and "fail closed" in r.reason


def test_locked_store_fails_closed(tmp_path: Path) -> None:
    lim = limiter(tmp_path, BUDGETS, ManualClock(), busy_timeout=0.05)
    other = sqlite3.connect(tmp_path / "limits.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock too long
    try:
        r = lim.reserve(llm(tokens=1), GROUPS)
        assert not r.ok and "locked" in r.reason
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert lim.reserve(llm(tokens=1), GROUPS).ok  # and recovers


def test_state_is_shared_by_limiters_on_one_file(tmp_path: Path) -> None:
    clock = ManualClock()
    a = limiter(tmp_path, SWARM, clock)
    b = limiter(tmp_path, SWARM, clock)
    assert a.reserve(add_index(), GROUPS).ok
    assert b.reserve(add_index(), GROUPS).ok
    r = a.reserve(add_index(), GROUPS)
    assert r.ok and r.reservation
    assert not b.reserve(add_index(), GROUPS).ok
    b.settle(r.reservation, None)  # settled through the other process's limiter
    assert b.reserve(add_index(), GROUPS).ok


def test_200_threads_against_budget_of_10(tmp_path: Path) -> None:
    text = SWARM.replace("amount = 3", "amount = 10")
    lim = limiter(tmp_path, text, ManualClock())
    barrier = threading.Barrier(200)
    oks: list[bool] = []

    def one() -> None:
        barrier.wait()
        oks.append(lim.reserve(add_index(), GROUPS).ok)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(oks) == 200 and sum(oks) == 10
    assert lim.usage("schema-changes") == 10


async def test_asyncio_concurrency_is_exact(tmp_path: Path) -> None:
    text = SWARM.replace("amount = 3", "amount = 10")
    lim = limiter(tmp_path, text, ManualClock())
    results = await asyncio.gather(*(lim.areserve(add_index(), GROUPS) for _ in range(100)))
    ok = [r for r in results if r.ok]
    assert len(ok) == 10
    await asyncio.gather(*(lim.asettle(r.reservation, None) for r in ok if r.reservation))
    assert lim.usage("schema-changes") == 0


def test_threads_reserve_and_settle_never_exceed_concurrency(tmp_path: Path) -> None:
    text = CONC.replace("amount = 2", "amount = 5")
    lim = limiter(tmp_path, text, ManualClock())
    held = 0
    peak = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal held, peak
        for _ in range(50):
            r = lim.reserve(llm(), GROUPS)
            if r.ok and r.reservation:
                with guard:
                    held += 1
                    peak = max(peak, held)
                with guard:
                    held -= 1
                lim.settle(r.reservation, Cost())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 5
    assert lim.usage("inflight") == 0


@pytest.mark.parametrize("force", [False, True])
def test_no_limits_no_reservation(tmp_path: Path, force: bool) -> None:
    lim = limiter(tmp_path, BASE, ManualClock())
    r = lim.reserve(add_index(), GROUPS, force=force)
    assert r.ok and r.reservation is None
