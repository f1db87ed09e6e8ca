"""Group-limit reservations: latency in-process, throughput with threads, and exactness with
two OS processes sharing one ``limits.db``.

Baselines side by side: a bare sqlite3 ``BEGIN IMMEDIATE; UPDATE; COMMIT`` on the same
pragmas (the floor for any exact, cross-process SQLite limiter) and an unlocked dict
increment (what a racy in-memory counter costs).
"""

from __future__ import annotations

import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._table import Result
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action, Cost
from tether.policy.boundaries import parse_boundaries
from tether.policy.limits import SqliteLimiter

CONFIG = """
[groups.swarm]
labels = ["swarm"]

[effects]
"db.schema_change" = ["tool.call:db.add_index"]

[limits.calls]
group = "swarm"
kind = "rate"
amount = 1000000000
window = "1h"

[limits.tokens]
group = "swarm"
kind = "budget"
unit = "tokens"
amount = 1000000000000
window = "1d"
"""

N_LATENCY = 5000
THREADS = 8
PER_THREAD = 1000
RUNS = 20
PROCESSES = 2
PER_PROCESS = 100  # 2 x 100 = 200 concurrent requests against a budget of 10


def _claims() -> TokenClaims:
    return TokenClaims(
        "spiffe://bench.local",
        SpiffeId.parse("spiffe://bench.local/agent/a"),
        ("tether",),
        0,
        0,
        2**40,
        "bench",
        (),
        (),
        parse_grants(()),
        labels=("swarm",),
    )


GROUPS = frozenset({"swarm"})


def _latency(lim: SqliteLimiter) -> tuple[float, float, float]:
    """(p50, p99) of one reserve in µs, and p50 of reserve + settle, one thread."""
    action = Action("llm.invoke", _claims(), "gpt-4o", cost=Cost(tokens=100))
    for _ in range(500):
        lim.reserve(action, GROUPS)
    samples = []
    pairs = []
    for _ in range(N_LATENCY):
        t = time.perf_counter()
        r = lim.reserve(action, GROUPS)
        t1 = time.perf_counter()
        assert r.ok and r.reservation
        lim.settle(r.reservation, Cost(tokens=80))
        t2 = time.perf_counter()
        samples.append((t1 - t) * 1e6)
        pairs.append((t2 - t) * 1e6)
    samples.sort()
    return (
        statistics.median(samples),
        samples[int(len(samples) * 0.99)],
        statistics.median(pairs),
    )


def _throughput(lim: SqliteLimiter) -> float:
    action = Action("llm.invoke", _claims(), "gpt-4o", cost=Cost(tokens=100))

    def worker() -> None:
        for _ in range(PER_THREAD):
            r = lim.reserve(action, GROUPS)
            assert r.ok and r.reservation
            lim.settle(r.reservation, Cost(tokens=80))

    rates = []
    for _ in range(3):
        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rates.append(THREADS * PER_THREAD / (time.perf_counter() - t))
    return statistics.median(rates)


def _bare_sqlite(path: Path) -> float:
    """µs per BEGIN IMMEDIATE; UPDATE one row; COMMIT (WAL, synchronous=NORMAL)."""
    c = sqlite3.connect(str(path), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("CREATE TABLE m (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
    c.execute("INSERT INTO m VALUES ('x', 0)")
    samples = []
    for _ in range(N_LATENCY):
        t = time.perf_counter()
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE m SET v = v + 1 WHERE k = 'x'")
        c.execute("COMMIT")
        samples.append((time.perf_counter() - t) * 1e6)
    c.close()
    return statistics.median(samples)


def _dict_increment() -> float:
    d = {"x": 0}
    n = 200_000
    t = time.perf_counter()
    for _ in range(n):
        d["x"] += 1
    return (time.perf_counter() - t) / n * 1e6


WORKER = r"""
import os, sys, threading, time
from pathlib import Path
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action, Cost
from tether.policy.boundaries import BoundariesFile
from tether.policy.limits import SqliteLimiter

root, runs, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
claims = TokenClaims("spiffe://bench.local", SpiffeId.parse("spiffe://bench.local/agent/a"),
                     ("tether",), 0, 0, 2**40, f"p{os.getpid()}", (), (), parse_grants(()),
                     labels=("swarm",))
action = Action("tool.call", claims, "db.add_index")
for run in range(runs):
    lim = SqliteLimiter(root / f"run{run}.db", BoundariesFile(root / "boundaries.toml"))
    go = root / f"go{run}"
    oks = []
    def one():
        while not go.exists():
            time.sleep(0.0005)
        r = lim.reserve(action, frozenset({"swarm"}))
        if r.ok:
            lim.settle(r.reservation, Cost())
        oks.append(r.ok)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads: t.start()
    print("ready", flush=True)
    for t in threads: t.join()
    lim.close()
    print(sum(oks), flush=True)
"""

EXACT_CONFIG = """
[groups.swarm]
labels = ["swarm"]

[effects]
"db.schema_change" = ["tool.call:db.add_index"]

[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 10
window = "1h"
on_exceed = "deny"
"""


def _exactness(root: Path) -> list[int]:
    """Passed reservations per run (2 processes x 100 concurrent, budget 10)."""
    (root / "boundaries.toml").write_text(EXACT_CONFIG)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(RUNS), str(PER_PROCESS)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    passed = []
    try:
        for run in range(RUNS):
            for p in procs:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "ready"
            time.sleep(0.02)
            (root / f"go{run}").touch()
            total = 0
            for p in procs:
                assert p.stdout is not None
                total += int(p.stdout.readline())
            passed.append(total)
    finally:
        for p in procs:
            p.wait(timeout=60)
    return passed


def run() -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lim = SqliteLimiter(root / "limits.db", parse_boundaries(CONFIG))
        try:
            p50, p99, pair = _latency(lim)
            rate = _throughput(lim)
        finally:
            lim.close()
        bare = _bare_sqlite(root / "bare.db")
        dict_us = _dict_increment()
        exact_dir = root / "exact"
        exact_dir.mkdir()
        passed = _exactness(exact_dir)
    exact_runs = sum(1 for n in passed if n == 10)
    return [
        Result(
            "limits",
            "reserve (2 limits), one thread, p50",
            p50,
            "µs",
            "<= 100 µs",
            f"bare sqlite3 BEGIN IMMEDIATE/UPDATE/COMMIT {bare:.1f} µs "
            f"({p50 / bare:.1f}x); unlocked dict += {dict_us:.2f} µs ({p50 / dict_us:.0f}x)",
            p50 <= 100,
        ),
        Result("limits", "reserve (2 limits), one thread, p99", p99, "µs", "", ""),
        Result("limits", "reserve + settle, one thread, p50", pair, "µs", "", ""),
        Result(
            "limits",
            f"reserve + settle / s, {THREADS} threads, one process",
            rate,
            "/s",
            "",
            f"bare sqlite3 txn one thread: {1e6 / bare:,.0f}/s",
        ),
        Result(
            "limits",
            f"runs with exactly 10 passed: {PROCESSES} processes x {PER_PROCESS} concurrent "
            f"vs budget 10 (passed per run: min {min(passed)}, max {max(passed)})",
            exact_runs,
            f"of {RUNS}",
            f"{RUNS} of {RUNS}",
            "",
            exact_runs == RUNS,
        ),
    ]
