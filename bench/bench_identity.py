"""Delegated JWT-SVID issuance through the real authority, and revocation propagation.

Issuance is measured twice, side by side: with the real audit log (every issuance durable in
the Merkle log before the token is returned, group-committed across concurrent callers), and
with an in-memory recorder (the signing and rule-checking path alone).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench._table import Result
from tether.events import MemoryRecorder
from tether.identity.authority import Authority
from tether.identity.revocation import RevocationList
from tether.server.services import Services, init_data_dir
from tether.store import Store
from tether.store.revocations import RevocationPoller

THREADS = 16
PER_THREAD = 400


def _issue_rate(authority: Authority, grantor_token: str, services: Services) -> float:
    grantor = services.verifier.verify(grantor_token)

    def worker(i: int) -> None:
        for j in range(PER_THREAD):
            authority.delegate(
                grantor,
                f"agent-{i}-{j % 8}",
                ["model:gpt-4o*", "tool:search.*"],
                ttl=600,
                objective="bench objective",
                task=f"bench-{i}",
            )

    rates = []
    for _ in range(3):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rates.append(THREADS * PER_THREAD / (time.perf_counter() - t))
    return statistics.median(rates)


TASKS = 128
ASYNC_TOTAL = 6000


def _async_issue_rate(authority: Authority, grantor_token: str, services: Services) -> float:
    """Issuance the way the server does it: many concurrent requests on one event loop."""
    grantor = services.verifier.verify(grantor_token)

    async def one_round() -> float:
        sem = asyncio.Semaphore(TASKS)

        async def issue(i: int) -> None:
            async with sem:
                await authority.adelegate(
                    grantor,
                    f"agent-{i % 64}",
                    ["model:gpt-4o*", "tool:search.*"],
                    ttl=600,
                    objective="bench objective",
                    task=f"bench-{i % 16}",
                )

        t = time.perf_counter()
        await asyncio.gather(*(issue(i) for i in range(ASYNC_TOTAL)))
        return ASYNC_TOTAL / (time.perf_counter() - t)

    return statistics.median(asyncio.run(one_round()) for _ in range(3))


def _propagation(home: Path, services: Services, admin_token: str) -> float:
    """Median seconds from a revocation in one process's store to another's verifier list."""
    other_store = Store(home / "tether.db")
    other_list = RevocationList()
    poller = RevocationPoller(other_store, other_list)
    admin = services.verifier.verify(admin_token)
    delays = []
    try:
        for i in range(5):
            before = other_list.generation
            t = time.perf_counter()
            services.authority.revoke(admin, "agent", f"spiffe://bench.local/agent/victim-{i}")
            while other_list.generation == before:
                time.sleep(0.001)
            delays.append(time.perf_counter() - t)
    finally:
        poller.close()
        other_store.close()
    return statistics.median(delays)


def run() -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        res = init_data_dir(home, "bench.local")
        services = Services(home)
        try:
            credential = res.admin_credential_path.read_text().strip()
            admin_token = services.authority.login(credential).token
            durable_async = _async_issue_rate(services.authority, admin_token, services)
            durable = _issue_rate(services.authority, admin_token, services)
            memory = Authority(
                services.config, services.keys, services.store, MemoryRecorder(), RevocationList()
            )
            in_memory = _issue_rate(memory, admin_token, services)
            in_memory_async = _async_issue_rate(memory, admin_token, services)
            propagation = _propagation(home, services, admin_token)
        finally:
            services.close()
    return [
        Result(
            "identity",
            f"delegated JWT-SVIDs issued/s, durable audit, {TASKS} async tasks (server path)",
            durable_async,
            "/s",
            ">= 5,000",
            f"in-memory recorder: {in_memory_async:,.0f}/s",
            durable_async >= 5000,
        ),
        Result(
            "identity",
            f"delegated JWT-SVIDs issued/s, durable audit, {THREADS} threads (sync API)",
            durable,
            "/s",
            "",
            f"in-memory recorder: {in_memory:,.0f}/s",
        ),
        Result(
            "identity",
            "revocation reaches another process (median)",
            propagation * 1000,
            "ms",
            "<= 1,000 ms",
            "poll interval 250 ms",
            propagation <= 1.0,
        ),
    ]
