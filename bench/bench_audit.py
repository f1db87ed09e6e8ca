"""Audit log: durable appends/s, ack latency, ack-to-checkpoint, verify and proofs at 1M.

Targets (issue 3, 2 cores): >= 20,000 durable appends/s with concurrent writers; p99
append-to-acknowledged <= 20 ms; every entry in a signed checkpoint within 1 s; full verify of
1,000,000 entries <= 30 s; an inclusion proof at 1,000,000 entries <= 1 ms.

Baselines measured side by side: raw ``sqlite3`` ``executemany`` + commit of the same rows in
the same durable mode (WAL, synchronous=FULL) without hashing, batching or signing; SHA-256 of
every stored entry (the floor of any verify); one primary-key ``SELECT`` (the floor of a proof).

The 1,000,000-entry log is built once and kept in the temp dir (``tether-bench-audit-1m``).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._table import Result
from tether.audit import AuditLog
from tether.audit.log import SyncMode, node_id
from tether.audit.note import NoteSigner, NoteVerifier
from tether.events import Event

ORIGIN = "bench.example/tether/audit"
SIGNER = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
BIG = 1_000_000
BIG_DIR = Path(tempfile.gettempdir()) / "tether-bench-audit-1m-v2"
THREADS = 64
PER_THREAD = 500
TASKS = 128
REPEATS = 3


def event(i: int) -> Event:
    """A typical gateway decision: identity, session, decision, a few details."""
    return Event(
        type="llm.invoke",
        actor=f"spiffe://example.org/agent/worker-{i % 64}",
        subject="spiffe://example.org/service/openai",
        session=f"task-{i % 97}",
        decision="allow" if i % 10 else "deny",
        data={
            "model": "gpt-4o",
            "tokens": 1200 + i % 500,
            "grants": ["model:gpt-4o*"],
            "reason": "permit p-models",
        },
    )


def _log(path: Path, interval: float = 0.25, sync: SyncMode = "commit") -> AuditLog:
    log = AuditLog(path, SIGNER, ORIGIN, checkpoint_interval=interval, sync=sync)
    log.start()
    return log


def threads_run(tmp: Path) -> tuple[float, list[float], list[float]]:
    """``THREADS`` threads each record ``PER_THREAD`` events. Returns (events/s, latencies,
    ack-to-signed-checkpoint delays of a sample)."""
    log = _log(tmp / f"threads-{time.monotonic_ns()}.db")
    events = [event(i) for i in range(THREADS * PER_THREAD)]
    latencies: list[float] = []
    acks: list[tuple[float, int]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine, sample = [], []
        for k in range(PER_THREAD):
            t0 = time.perf_counter()
            r = log.record(events[t * PER_THREAD + k])
            t1 = time.perf_counter()
            mine.append(t1 - t0)
            if k % 25 == 0:
                sample.append((t1, r.index))
        with lock:
            latencies.extend(mine)
            acks.extend(sample)

    signed: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:  # when did each checkpoint size become visible?
        last = -1
        while not stop.is_set():
            size = int(log.latest_checkpoint().split("\n", 2)[1])
            if size != last:
                signed.append((time.perf_counter(), size))
                last = size
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    time.sleep(0.55)  # let the last checkpoint (interval 0.25 s) land
    stop.set()
    watcher.join()
    log.close()
    delays = []
    for at, index in acks:
        covered = next((t for t, size in signed if size > index), None)
        if covered is not None:
            delays.append(max(0.0, covered - at))
    return THREADS * PER_THREAD / elapsed, latencies, delays


def single_run(tmp: Path, sync: SyncMode, n: int = 3000) -> list[float]:
    """One caller, one record at a time (a gateway at concurrency 1): submit -> durable."""
    log = _log(tmp / f"one-{sync}-{time.monotonic_ns()}.db", sync=sync)
    latencies: list[float] = []

    async def main() -> None:
        for i in range(n):
            t0 = time.perf_counter()
            await log.submit(event(i))
            latencies.append(time.perf_counter() - t0)

    asyncio.run(main())
    log.close()
    return sorted(latencies[n // 10 :])


def async_run(tmp: Path, sync: SyncMode = "commit") -> tuple[float, list[float]]:
    """``TASKS`` asyncio tasks in one loop call ``arecord`` (the gateway's shape)."""
    log = _log(tmp / f"async-{time.monotonic_ns()}.db", sync=sync)
    total = THREADS * PER_THREAD
    per = total // TASKS
    latencies: list[float] = []

    async def main() -> float:
        async def work(t: int) -> None:
            for k in range(per):
                t0 = time.perf_counter()
                await log.arecord(event(t * per + k))
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(work(t) for t in range(TASKS)))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    log.close()
    return per * TASKS / elapsed, latencies


def raw_sqlite_rate(tmp: Path, batch: int) -> float:
    """Baseline: the same rows, no hashing, ``executemany`` + commit per ``batch`` rows."""
    conn = sqlite3.connect(tmp / f"raw-{time.monotonic_ns()}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(
        "CREATE TABLE entries (idx INTEGER PRIMARY KEY, data BLOB, time_ms INTEGER, type TEXT,"
        " actor TEXT, subject TEXT, session TEXT, decision TEXT);"
        "CREATE INDEX e_time ON entries(time_ms); CREATE INDEX e_type ON entries(type);"
        "CREATE INDEX e_actor ON entries(actor); CREATE INDEX e_subject ON entries(subject);"
        "CREATE INDEX e_session ON entries(session); CREATE INDEX e_decision ON entries(decision);"
    )
    n = THREADS * PER_THREAD
    rows = []
    for i in range(n):
        e = event(i)
        data = (
            f'{{"actor":"{e.actor}","data":{{"model":"gpt-4o"}},"index":{i},'
            f'"type":"{e.type}","v":1}}'
        ).encode()
        rows.append(
            (i, data, 1_800_000_000_000 + i, e.type, e.actor, e.subject, e.session, e.decision)
        )
    t0 = time.perf_counter()
    for k in range(0, n, batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?)", rows[k : k + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def big_log() -> Path:
    """The 1,000,000-entry log, built once (arecord from many tasks: large group commits)."""
    path = BIG_DIR / "audit.db"
    done = BIG_DIR / "complete"
    if done.exists():
        return path
    BIG_DIR.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    print(f"  building a {BIG:,}-entry log in {BIG_DIR} (once) ...", file=sys.stderr, flush=True)
    log = _log(path, interval=1.0)

    async def fill() -> None:
        chunk = 4096
        for start in range(0, BIG, chunk):
            n = min(chunk, BIG - start)
            await asyncio.gather(*(log.arecord(event(start + k)) for k in range(n)))

    t0 = time.perf_counter()
    asyncio.run(fill())
    log.close()
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    done.write_text("ok\n")
    return path


def run() -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = [threads_run(tmp) for _ in range(REPEATS)]
        rate = statistics.median(r[0] for r in runs)
        lat = sorted(runs[[r[0] for r in runs].index(rate)][1])
        delays = sorted(x for r in runs for x in r[2])
        arate_runs = [async_run(tmp) for _ in range(REPEATS)]
        arate = statistics.median(r[0] for r in arate_runs)
        alat = sorted(arate_runs[[r[0] for r in arate_runs].index(arate)][1])
        irate = statistics.median(async_run(tmp, "interval")[0] for _ in range(REPEATS))
        one_commit = single_run(tmp, "commit")
        one_interval = single_run(tmp, "interval")
        raw_small = statistics.median(raw_sqlite_rate(tmp, THREADS) for _ in range(REPEATS))
        raw_big = statistics.median(raw_sqlite_rate(tmp, 1000) for _ in range(REPEATS))

    def p(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * q))]

    base = (
        f"raw sqlite executemany+commit, 6 indexes inline, 1 thread: {raw_small:,.0f}/s "
        f"@{THREADS}-row, "
        f"{raw_big:,.0f}/s @1000-row commits"
    )
    results.append(
        Result(
            "audit",
            f"durable appends/s, {THREADS} threads record()",
            rate,
            "/s",
            ">= 20000",
            base,
            rate >= 20_000,
        )
    )
    results.append(
        Result(
            "audit",
            f"durable appends/s, {TASKS} asyncio tasks arecord()",
            arate,
            "/s",
            ">= 20000",
            base,
            arate >= 20_000,
        )
    )
    results.append(
        Result(
            "audit",
            f"appends/s, {TASKS} asyncio tasks, sync = interval (tether serve's default)",
            irate,
            "/s",
            "",
            f"sync = commit: {arate:,.0f}/s",
        )
    )
    results.append(
        Result(
            "audit",
            "one record at a time (c=1), submit -> acknowledged p50, sync = interval",
            p(one_interval, 0.5) * 1000,
            "ms",
            "",
            f"p99 {p(one_interval, 0.99) * 1000:.2f} ms; sync = commit (an fsync each): "
            f"p50 {p(one_commit, 0.5) * 1000:.2f} ms, p99 {p(one_commit, 0.99) * 1000:.2f} ms",
        )
    )
    results.append(
        Result(
            "audit",
            f"p99 append->ack, {THREADS} threads",
            p(lat, 0.99) * 1000,
            "ms",
            "<= 20",
            f"p50 {p(lat, 0.5) * 1000:.1f} ms",
            p(lat, 0.99) <= 0.020,
        )
    )
    results.append(
        Result(
            "audit",
            f"p99 append->ack, {TASKS} tasks",
            p(alat, 0.99) * 1000,
            "ms",
            "<= 20",
            f"p50 {p(alat, 0.5) * 1000:.1f} ms",
            p(alat, 0.99) <= 0.020,
        )
    )
    results.append(
        Result(
            "audit",
            "ack -> in a signed checkpoint (max)",
            max(delays) * 1000,
            "ms",
            "<= 1000",
            f"p50 {p(delays, 0.5) * 1000:.0f} ms, interval 250 ms",
            max(delays) <= 1.0,
        )
    )

    path = big_log()
    verifier = NoteVerifier.from_vkey(SIGNER.verifier_key)
    ro = AuditLog.open_readonly(path, verifier, ORIGIN)
    size = ro.size()
    report = ro.verify()
    hash_floor = _hash_floor(path)
    results.append(
        Result(
            "audit",
            f"full verify, {size:,} entries",
            report.seconds,
            "s",
            "<= 30",
            f"SHA-256 of every entry alone: {hash_floor:.1f} s",
            report.seconds <= 30,
        )
    )
    rng = random.Random(7)
    times = []
    for _ in range(2000):
        i = rng.randrange(size)
        t0 = time.perf_counter()
        ro.inclusion_proof(i, size)
        times.append(time.perf_counter() - t0)
    proof_ms = statistics.median(times) * 1000
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    pk = []
    for _ in range(2000):
        i = node_id(0, rng.randrange(size))
        t0 = time.perf_counter()
        conn.execute("SELECT hash FROM nodes WHERE id = ?", (i,)).fetchone()
        pk.append(time.perf_counter() - t0)
    conn.close()
    ro.close()
    results.append(
        Result(
            "audit",
            f"inclusion proof at {size:,} entries",
            proof_ms,
            "ms",
            "<= 1",
            f"one PK SELECT: {statistics.median(pk) * 1000:.3f} ms",
            proof_ms <= 1.0,
        )
    )
    return results


def _hash_floor(path: Path) -> float:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    t0 = time.perf_counter()
    sha = hashlib.sha256
    for (data,) in conn.execute("SELECT data FROM entries ORDER BY idx"):
        sha(b"\x00" + data).digest()
    conn.close()
    return time.perf_counter() - t0


if __name__ == "__main__":
    from bench._table import print_table

    print_table(run())
