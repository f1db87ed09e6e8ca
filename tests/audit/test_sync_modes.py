"""The two durability modes of the audit log, lazy records, and commits made on the loop.

``sync = "interval"`` (the product default): async callers commit on their own event loop,
without an fsync; the writer thread fsyncs before it signs each checkpoint. These tests pin
what that must still guarantee: one consistent tree whoever commits, no checkpoint signed over
entries that were not forced to disk, and fail-closed once the disk refuses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit import AuditLog
from tether.audit.note import NoteSigner, NoteVerifier
from tether.config import Config
from tether.errors import ConfigError, RecordFailed
from tether.events import Event

ORIGIN = "example.org/tether/audit"
MODES = ["commit", "interval"]


def _signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def _ev(i: int, who: str = "loop") -> Event:
    return Event(
        type="test.event",
        actor=f"spiffe://example.org/agent/{who}",
        data={"i": i},
        bodies={"request": b'{"n": %d}' % i},
    )


def _poll(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the backstop")
        time.sleep(0.005)


def _count_commits(log: AuditLog) -> list[int]:
    """Wrap the commit (the SQLite seam) to count batches and their sizes."""
    sizes: list[int] = []
    real = log._commit

    def counted(batch: Any) -> None:
        sizes.append(len(batch.items))
        real(batch)

    log._commit = counted  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("sync", MODES)
def test_loop_and_threads_build_one_tree(tmp_path: Path, sync: str) -> None:
    """Async callers (committing on the loop in interval mode) and blocking threads (through
    the writer) interleave: every receipt is a distinct index, and the whole log verifies."""
    db = tmp_path / "audit.db"
    receipts: list[int] = []
    with AuditLog(db, _signer(), ORIGIN, checkpoint_interval=0.02, sync=sync) as log:  # type: ignore[arg-type]

        def worker(k: int) -> None:
            for i in range(50):
                receipts.append(log.record(_ev(i, f"thread{k}")).index)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()

        async def main() -> list[int]:
            out: list[int] = []
            for _ in range(5):
                done = await asyncio.gather(*(log.submit(_ev(i)) for i in range(40)))
                out += [r.index for r in done]
                await asyncio.sleep(0.01)
            return out

        receipts += asyncio.run(main())
        for t in threads:
            t.join()
        assert sorted(receipts) == list(range(350))
        report = log.verify()
        assert report.size == 350
    ro = AuditLog.open_readonly(db, NoteVerifier.from_vkey(_signer().verifier_key), ORIGIN)
    try:
        assert ro.size() == 350
        assert ro.verify().size == 350
    finally:
        ro.close()


def test_interval_mode_commits_on_the_loop(tmp_path: Path) -> None:
    """In interval mode an async record is committed by the loop that asked, in one batch per
    loop turn, never by the writer thread."""
    with AuditLog(tmp_path / "a.db", _signer(), ORIGIN, sync="interval") as log:
        committers: list[str] = []
        real = log._commit

        def spy(batch: Any) -> None:
            committers.append(threading.current_thread().name)
            real(batch)

        log._commit = spy  # type: ignore[method-assign]

        async def main() -> None:
            await asyncio.gather(*(log.submit(_ev(i)) for i in range(20)))

        asyncio.run(main())
        assert committers == [threading.main_thread().name]  # one batch, on this thread


def test_no_checkpoint_is_signed_over_unsynced_entries(tmp_path: Path) -> None:
    """Each signed checkpoint's size is at most what the last fsync before it covered."""
    with AuditLog(
        tmp_path / "a.db", _signer(), ORIGIN, checkpoint_interval=0.01, sync="interval"
    ) as log:
        synced: list[int] = []
        real = log._fsync_files

        def spy() -> None:
            size = log._head[0]
            real()
            synced.append(size)

        log._fsync_files = spy  # type: ignore[method-assign]

        async def main() -> None:
            for i in range(30):
                await log.submit(_ev(i))
                await asyncio.sleep(0.002)

        asyncio.run(main())
        _poll(lambda: log._cp_size == 30)
        notes = log.checkpoint_notes()
    assert synced, "interval mode never forced the disk"
    sizes = [int(n.splitlines()[1]) for n in notes]
    assert sizes[-1] == 30
    for size in sizes:
        if size:
            assert any(s >= size for s in synced), (size, synced)


def test_commit_mode_does_not_fsync_by_hand(tmp_path: Path) -> None:
    """commit mode: SQLite's own fsync per commit; the extra per-checkpoint sync is not used."""
    with AuditLog(
        tmp_path / "a.db", _signer(), ORIGIN, checkpoint_interval=0.01, sync="commit"
    ) as log:
        calls: list[int] = []
        log._fsync_files = lambda: calls.append(1)  # type: ignore[method-assign]
        log.record(_ev(1))
        _poll(lambda: log._cp_size == 1)
        assert log._conn is not None
        assert log._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert calls == []


def test_failed_fsync_fails_closed(tmp_path: Path) -> None:
    """The disk refuses the fsync before a checkpoint: nothing is signed, the writer stops, and
    every later record (async or blocking) is refused, so every action is refused."""
    log = AuditLog(tmp_path / "a.db", _signer(), ORIGIN, checkpoint_interval=0.01, sync="interval")
    log.start()
    try:

        def broken() -> None:
            raise OSError(5, "Input/output error")

        log._fsync_files = broken  # type: ignore[method-assign]

        async def first() -> None:
            await log.submit(_ev(1))

        asyncio.run(first())
        _poll(lambda: log._stopped)
        assert log._cp_size == 0  # no checkpoint over the unsynced entry

        async def later() -> None:
            await log.submit(_ev(2))

        with pytest.raises(RecordFailed, match="not running"):
            asyncio.run(later())
        with pytest.raises(RecordFailed):
            log.record(_ev(3))
    finally:
        log.close()


@pytest.mark.parametrize("sync", MODES)
def test_lazy_record_rides_with_the_next_one(tmp_path: Path, sync: str) -> None:
    """A lazy record and the must-wait record after it share one commit; a lazy record alone
    is still committed without anyone waking the writer for it."""
    with AuditLog(tmp_path / "a.db", _signer(), ORIGIN, sync=sync) as log:  # type: ignore[arg-type]
        sizes = _count_commits(log)

        async def main() -> None:
            for i in range(0, 40, 2):
                lazy = log.submit(_ev(i), lazy=True)
                await log.submit(_ev(i + 1))
                await lazy
            await asyncio.wait_for(log.submit(_ev(99), lazy=True), timeout=10)

        asyncio.run(main())
        assert sum(sizes) == 41
        if sync == "interval":  # the loop's flush took each pair; the lazy timer was cancelled
            assert len(sizes) == 21, sizes
        else:  # most pairs shared a commit (a lazy one may commit alone if the writer was awake)
            assert len(sizes) <= 31, sizes
        assert log.verify().size == 41


@pytest.mark.parametrize("sync", MODES)
def test_queued_records_are_committed_on_close(tmp_path: Path, sync: str) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db, _signer(), ORIGIN, sync=sync)  # type: ignore[arg-type]
    log.start()

    async def main() -> list[asyncio.Future[Any]]:
        futs: list[asyncio.Future[Any]] = [log.submit(_ev(i), lazy=True) for i in range(5)]
        log.close()  # before the loop ever turns
        await asyncio.sleep(0.05)
        return futs

    futs = asyncio.run(main())
    assert all(f.done() and f.exception() is None for f in futs)
    ro = AuditLog.open_readonly(db)
    try:
        assert ro.size() == 5
    finally:
        ro.close()


def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", _signer(), ORIGIN, sync="interval")
    log.start()
    log.close()

    async def main() -> None:
        await log.submit(_ev(1))

    with pytest.raises(RecordFailed, match="not running"):
        asyncio.run(main())


BAD_SYNC = {"empty": "", "fsync": "fsync", "upper": "COMMIT", "number": 1}


@pytest.mark.parametrize("value", BAD_SYNC.values(), ids=BAD_SYNC.keys())
def test_bad_sync_setting_is_refused(value: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sync"):
        Config.from_toml({"trust_domain": "example.org", "audit": {"sync": value}})
    with pytest.raises(ConfigError, match="sync"):
        AuditLog(tmp_path / "a.db", _signer(), ORIGIN, sync=value)


def test_sync_setting_round_trips() -> None:
    cfg = Config.from_toml({"trust_domain": "example.org"})
    assert cfg.audit_sync == "interval"
    again = Config.from_toml(cfg.to_toml())
    assert again.audit_sync == "interval"
    strict = Config.from_toml({"trust_domain": "example.org", "audit": {"sync": "commit"}})
    assert strict.to_toml()["audit"]["sync"] == "commit"


@pytest.mark.parametrize("sync", MODES)
def test_wal_is_copied_back_by_the_writer_not_inside_commits(
    tmp_path: Path, sync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's automatic WAL checkpoint is off (it would run inside a commit, possibly on a
    gateway's loop); the writer thread copies the WAL into the database once it is big."""
    import tether.audit.log as audit_log

    monkeypatch.setattr(audit_log, "WAL_TRIM_BYTES", 64 * 1024)
    db = tmp_path / "a.db"
    with AuditLog(db, _signer(), ORIGIN, checkpoint_interval=0.01, sync=sync) as log:  # type: ignore[arg-type]
        assert log._conn is not None
        assert log._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        before = db.stat().st_size
        for i in range(40):
            log.record(Event(type="big", data={"i": i}, bodies={"b": bytes([65 + i % 26]) * 8192}))
        _poll(lambda: db.stat().st_size > before + 200 * 1024)
        assert log.verify().size == 40
