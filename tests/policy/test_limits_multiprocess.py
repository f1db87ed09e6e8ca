"""Exactness across OS processes sharing one data directory: 2 processes x 100 concurrent
reservations against a budget of 10 -> exactly 10 pass, every run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BOUNDARIES = """
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
"""

# One process: N threads wait for the go file, then each reserves and settles with the
# actual cost (the side effect happened). Prints how many reservations passed.
WORKER = r"""
import os, sys, threading, time
from pathlib import Path
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action, Cost
from tether.policy.boundaries import BoundariesFile
from tether.policy.limits import SqliteLimiter

db, cfg, n, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
lim = SqliteLimiter(db, BoundariesFile(cfg))
oks = []
def one(i):
    c = TokenClaims("spiffe://example.org", SpiffeId.parse(f"spiffe://example.org/agent/a{os.getpid()}-{i}"),
                    ("tether",), 0, 0, 2**40, f"{os.getpid()}-{i}", (), (), parse_grants(()),
                    labels=("swarm",))
    while not go.exists():
        time.sleep(0.001)
    r = lim.reserve(Action("tool.call", c, "db.add_index"), frozenset({"swarm"}))
    if r.ok:
        lim.settle(r.reservation, Cost())
    oks.append(r.ok)
    if not r.ok:
        assert r.on_exceed == "deny" and "schema-changes" in r.reason, r.reason
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
print("ready", flush=True)
for t in threads: t.join()
print(sum(oks), len(oks), flush=True)
"""

PROCESSES = 2
PER_PROCESS = 100
RUNS = 3


def run_once(tmp: Path) -> list[tuple[int, int]]:
    tmp.mkdir()
    cfg = tmp / "boundaries.toml"
    cfg.write_text(BOUNDARIES)
    go = tmp / "go"
    db = tmp / "limits.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db), str(cfg), str(PER_PROCESS), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    for p in procs:  # every process has its threads started before anyone reserves
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    time.sleep(0.05)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        passed, total = (int(x) for x in stdout.split())
        out.append((passed, total))
    return out


def test_two_processes_100_concurrent_each_budget_10(tmp_path: Path) -> None:
    for run in range(RUNS):
        counts = run_once(tmp_path / f"run{run}")
        assert [t for _, t in counts] == [PER_PROCESS] * PROCESSES
        assert sum(p for p, _ in counts) == 10, f"run {run}: {counts}"
