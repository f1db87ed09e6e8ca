"""AuditLog: entries, receipts, proofs, checkpoints, queries, export, concurrency, fail-closed."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit import AuditLog, VerifyReport
from tether.audit.canonical import canonical_json
from tether.audit.log import node_id
from tether.audit.merkle import (
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from tether.audit.note import NoteSigner, NoteVerifier, verify_checkpoint
from tether.clock import ManualClock
from tether.errors import BadRequest, ConfigError, NotFound, RecordFailed
from tether.events import Event, Receipt

ORIGIN = "example.org/tether/audit"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture(params=["commit", "interval"])
def audit(db: Path, signer: NoteSigner, request: pytest.FixtureRequest) -> Iterator[AuditLog]:
    """Every test of the writer runs in both sync modes: same entries, same guarantees."""
    with AuditLog(
        db, signer, ORIGIN, clock=ManualClock(), checkpoint_interval=0.05, sync=request.param
    ) as log:
        yield log


def ev(i: int = 0, **kw: Any) -> Event:
    base: dict[str, Any] = {
        "type": "tool.call",
        "actor": "spiffe://example.org/agent/researcher",
        "subject": "spiffe://example.org/service/search",
        "session": "task-1",
        "decision": "allow",
        "data": {"tool": "search.web", "n": i},
    }
    base.update(kw)
    return Event(**base)


def wait_signed(log: AuditLog, size: int) -> str:
    """Poll until a signed checkpoint covers ``size`` (the checkpointer runs every 50 ms)."""
    for _ in range(400):
        note = log.latest_checkpoint()
        if int(note.split("\n")[1]) >= size:
            return note
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint covering {size}")


# -- entries --------------------------------------------------------------------------------


def test_entry_is_canonical_json_with_index_time_and_fields(audit: AuditLog) -> None:
    r = audit.record(ev(7))
    data = audit.entry_data(r.index)
    assert r == Receipt(index=0, leaf_hash=leaf_hash(data))
    entry = orjson.loads(data)
    assert canonical_json(entry) == data
    assert entry == {
        "v": 1,
        "index": 0,
        "time_ms": 1_800_000_000_000,
        "type": "tool.call",
        "actor": "spiffe://example.org/agent/researcher",
        "subject": "spiffe://example.org/service/search",
        "session": "task-1",
        "decision": "allow",
        "data": {"tool": "search.web", "n": 7},
    }


def test_absent_fields_are_left_out_and_data_is_always_there(audit: AuditLog) -> None:
    audit.record(Event(type="tether.started"))
    assert audit.entry(0) == {
        "v": 1,
        "index": 0,
        "time_ms": 1_800_000_000_000,
        "type": "tether.started",
        "data": {},
    }


def test_floats_and_huge_ints_become_strings_tuples_lists(audit: AuditLog) -> None:
    audit.record(
        ev(
            data={
                "score": 0.25,
                "nan": float("nan"),
                "inf": float("-inf"),
                "big": 2**60,
                "t": (1, 2),
                "ok": 2**53 - 1,
            }
        )
    )
    assert audit.entry(0)["data"] == {
        "score": "0.25",
        "nan": "NaN",
        "inf": "-Infinity",
        "big": str(2**60),
        "t": [1, 2],
        "ok": 2**53 - 1,
    }


def test_spliced_entry_equals_canonical_json_of_the_whole(audit: AuditLog) -> None:
    """The writer splices "index" into pre-canonicalised halves; it must be byte-identical."""
    events = [
        Event(type="a"),
        Event(type="b", actor="x", decision="deny", data={"é": "ü", "z": [None, True]}),
        Event(type="c", subject="s", session="\u2603", bodies={"p": b"hi"}),
        ev(3, data={"nested": {"k": {"deep": ["\x00", "\u2028"]}}}),
        ev(4, data={"\U0001f600": 1, "\uffff": 2, "a": {"\U00010000": [], "\ue000": {}}}),
    ]
    for e in events:
        audit.record(e)
    for i in range(len(events)):
        data = audit.entry_data(i)
        assert canonical_json(orjson.loads(data)) == data


# named bad events: each must be refused with RecordFailed, and nothing recorded
bogus_non_json_value = Event(type="x", data={"when": object()})
bogus_non_string_key = Event(type="x", data={1: "one"})
bogus_empty_type = Event(type="")
bogus_body_not_bytes = Event(type="x", bodies={"prompt": "text, not bytes"})  # type: ignore[dict-item]
bogus_lone_surrogate = Event(type="x", data={"s": "\ud800"})
bogus_too_deep = Event(type="x", data=(lambda d: [d := {"d": d} for _ in range(100)][-1])({}))


@pytest.mark.parametrize(
    "bad",
    [
        bogus_non_json_value,
        bogus_non_string_key,
        bogus_empty_type,
        bogus_body_not_bytes,
        bogus_lone_surrogate,
        bogus_too_deep,
    ],
    ids=[
        "non_json_value",
        "non_string_key",
        "empty_type",
        "body_not_bytes",
        "lone_surrogate",
        "too_deep",
    ],
)
def test_bad_event_is_refused_alone(audit: AuditLog, bad: Event) -> None:
    with pytest.raises(RecordFailed):
        audit.record(bad)
    assert audit.record(ev()).index == 0  # the log is fine and dense
    assert audit.size() == 1


def test_not_an_event_is_refused(audit: AuditLog) -> None:
    with pytest.raises(RecordFailed):
        audit.record({"type": "x"})  # type: ignore[arg-type]


def test_secrets_are_redacted_before_recording(audit: AuditLog) -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9lL2FnZW50L2EifQ.c2lnbmF0dXJlc2lnbmF0dXJl"
    audit.record(
        ev(
            data={
                "headers": {"Authorization": f"Bearer {jwt}"},
                "subject_token": jwt,
                "note": f"used {jwt}",
                "api_key": "sk-abcdefghijklmnopqrstuvwx",
            },
            bodies={
                "request": b'{"api_key":"hunter2","messages":[{"content":"hi"}]}',
                "headers": f"Authorization: Bearer {jwt}\r\n".encode(),
            },
        )
    )
    raw = audit.entry_data(0)
    entry = orjson.loads(raw)
    for digest in entry["bodies"].values():
        raw += audit.body(digest)
    assert jwt.encode() not in raw and b"hunter2" not in raw and b"sk-abc" not in raw
    assert entry["data"]["subject_token"] == "[REDACTED]"
    assert entry["data"]["note"].startswith("used [REDACTED jwt sha256:")


def test_bodies_are_content_addressed_and_deduplicated(audit: AuditLog) -> None:
    prompt = b"Summarise churn for Q3." * 100
    audit.record(ev(bodies={"prompt": prompt}))
    audit.record(ev(bodies={"prompt": prompt, "response": b"Churn fell."}))
    refs = audit.entry(1)["bodies"]
    assert audit.entry(0)["bodies"]["prompt"] == refs["prompt"]
    assert audit.body(refs["prompt"]) == prompt
    assert audit.body(refs["response"]) == b"Churn fell."
    with pytest.raises(NotFound):
        audit.body("00" * 32)
    with pytest.raises(BadRequest):
        audit.body("not-hex")


# -- tree, proofs, checkpoints ----------------------------------------------------------------


def test_node_ids_are_completion_order() -> None:
    order = []
    for m in range(1, 17):  # after appending leaf m-1, nodes complete bottom-up
        level = 0
        while True:
            order.append((level, (m >> level) - 1))
            if m >> level & 1:
                break
            level += 1
    assert [node_id(lvl, i) for lvl, i in order] == list(range(len(order)))


def test_root_and_proofs_verify_at_every_size(audit: AuditLog) -> None:
    leaves = [audit.record(ev(i)).leaf_hash for i in range(33)]
    for size in range(1, 34):
        root = audit.root(size)
        assert root == root_from_leaves(leaves[:size])
        for index in range(size):
            verify_inclusion(leaves[index], index, size, audit.inclusion_proof(index, size), root)
        for old in range(0, size + 1):
            verify_consistency(old, size, audit.root(old), root, audit.consistency_proof(old, size))


def test_proof_arguments_outside_the_log_are_refused(audit: AuditLog) -> None:
    audit.record(ev())
    with pytest.raises(BadRequest):
        audit.inclusion_proof(1)
    with pytest.raises(BadRequest):
        audit.inclusion_proof(0, 2)
    with pytest.raises(BadRequest):
        audit.consistency_proof(2)


def test_every_acknowledged_entry_gets_a_signed_checkpoint(
    audit: AuditLog, signer: NoteSigner
) -> None:
    for i in range(5):
        audit.record(ev(i))
    note = wait_signed(audit, 5)
    cp = verify_checkpoint(note, NoteVerifier.from_vkey(signer.verifier_key), ORIGIN)
    assert (cp.size, cp.root_hash) == (5, audit.root(5))
    assert audit.verifier_key == signer.verifier_key


def test_close_signs_the_tail_and_reopen_continues(db: Path, signer: NoteSigner) -> None:
    with AuditLog(db, signer, ORIGIN, checkpoint_interval=3600) as log:
        for i in range(10):
            log.record(ev(i))
    with AuditLog(db, signer, ORIGIN) as log:
        assert int(log.latest_checkpoint().split("\n")[1]) == 10
        assert log.record(ev(10)).index == 10
        report = log.verify()
    assert report.size == 11


def test_verify_report(audit: AuditLog) -> None:
    for i in range(20):
        audit.record(ev(i, bodies={"b": str(i % 3).encode()}))
    wait_signed(audit, 20)
    report = audit.verify()
    assert isinstance(report, VerifyReport)
    assert (report.size, report.root, report.signed_size, report.bodies) == (
        20,
        audit.root(),
        20,
        3,
    )
    assert report.checkpoints >= 2 and report.unsigned == 0


def test_another_logs_file_is_refused(db: Path, signer: NoteSigner) -> None:
    with AuditLog(db, signer, ORIGIN):
        pass
    with pytest.raises(ConfigError):
        AuditLog(db, signer, "other.org/tether/audit").start()
    with pytest.raises(ConfigError):
        AuditLog.open_readonly(db, origin="other.org/tether/audit")


# -- queries and export -------------------------------------------------------------------------


def test_search_session_tail(db: Path, signer: NoteSigner) -> None:
    clock = ManualClock(1_800_000_000.0)
    with AuditLog(db, signer, ORIGIN, clock=clock) as log:
        log.record(
            Event(
                type="identity.issued",
                actor="spiffe://e/user/alice",
                subject="spiffe://e/agent/a",
                session="s1",
            )
        )
        clock.advance(1)
        log.record(
            Event(type="llm.invoke", actor="spiffe://e/agent/a", session="s1", decision="allow")
        )
        clock.advance(1)
        log.record(
            Event(type="llm.invoke", actor="spiffe://e/agent/b", session="s2", decision="deny")
        )
        clock.advance(1)
        log.record(
            Event(type="tool.call", actor="spiffe://e/agent/a", session="s1", decision="escalate")
        )

        def idx(rows: list[dict[str, Any]]) -> list[int]:
            return [r["index"] for r in rows]

        assert idx(log.search(identity="spiffe://e/agent/a")) == [0, 1, 3]
        assert idx(log.search(type="llm.*")) == [1, 2]
        assert idx(log.search(decision="deny")) == [2]
        assert idx(log.search(since_ms=1_800_000_001_000, until_ms=1_800_000_003_000)) == [1, 2]
        assert idx(log.search(limit=2, descending=True)) == [3, 2]
        assert idx(log.search(after=1, limit=10)) == [2, 3]
        assert idx(log.session("s1")) == [0, 1, 3]
        assert idx(log.tail(2)) == [2, 3]
        with pytest.raises(BadRequest):
            log.search(limit=0)
        with pytest.raises(NotFound):
            log.entry(99)


def test_export_jsonl_passes_the_standalone_verifier(
    audit: AuditLog, signer: NoteSigner, tmp_path: Path
) -> None:
    for i in range(12):
        audit.record(ev(i, bodies={"prompt": f"prompt {i}".encode()}))
    note = wait_signed(audit, 12)
    export, bodies, cp = tmp_path / "export.jsonl", tmp_path / "bodies", tmp_path / "cp.txt"
    with export.open("wb") as fp:
        assert audit.export(fp, "jsonl", bodies, size=12) == 12
    cp.write_text(note)
    lines = export.read_bytes().split(b"\n")
    assert lines[:-1] == [audit.entry_data(i) for i in range(12)] and lines[-1] == b""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "verify_log.py"),
            "--log",
            str(export),
            "--checkpoint",
            str(cp),
            "--key",
            signer.verifier_key,
            "--origin",
            ORIGIN,
            "--bodies",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_export_ocsf_maps_classes_and_keeps_everything(audit: AuditLog) -> None:
    audit.record(
        Event(
            type="identity.issued",
            actor="spiffe://example.org/user/alice",
            subject="spiffe://example.org/agent/a",
            session="t",
            data={"jti": "j"},
        )
    )
    audit.record(
        Event(
            type="llm.invoke",
            actor="spiffe://example.org/agent/a",
            decision="deny",
            data={"model": "m"},
        )
    )
    buf = io.BytesIO()
    assert audit.export(buf, "ocsf") == 2
    auth, api = (orjson.loads(line) for line in buf.getvalue().splitlines())
    assert (auth["class_uid"], auth["category_uid"], auth["type_uid"]) == (3002, 3, 300203)
    assert auth["user"]["uid"] == "spiffe://example.org/agent/a"
    assert auth["actor"]["user"] == {
        "uid": "spiffe://example.org/user/alice",
        "name": "alice",
        "type_id": 1,
        "type": "User",
    }
    assert auth["metadata"]["correlation_uid"] == "t"
    assert auth["unmapped"]["tether"]["data"] == {"jti": "j"}
    assert (api["class_uid"], api["activity_id"], api["status"]) == (6003, 99, "Failure")
    assert api["api"]["operation"] == "llm.invoke" and api["time"] == 1_800_000_000_000
    assert api["metadata"]["product"]["name"] == "Tether"
    with pytest.raises(BadRequest):
        audit.export(buf, "csv")  # type: ignore[arg-type]


# -- concurrency, async, read-only -------------------------------------------------------------


def test_many_threads_get_unique_dense_indices(audit: AuditLog) -> None:
    receipts: list[Receipt] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        mine = [audit.record(ev(t * 1000 + i)) for i in range(50)]
        with lock:
            receipts.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.index for r in receipts) == list(range(800))
    for r in receipts:
        assert leaf_hash(audit.entry_data(r.index)) == r.leaf_hash
    audit.verify()


async def test_arecord_from_many_tasks(audit: AuditLog) -> None:
    receipts = await asyncio.gather(*(audit.arecord(ev(i)) for i in range(300)))
    assert sorted(r.index for r in receipts) == list(range(300))
    with pytest.raises(RecordFailed):
        await audit.arecord(bogus_non_json_value)


def test_readonly_reader_sees_and_verifies_while_writer_runs(
    audit: AuditLog, db: Path, signer: NoteSigner
) -> None:
    for i in range(10):
        audit.record(ev(i))
    wait_signed(audit, 10)
    ro = AuditLog.open_readonly(db, NoteVerifier.from_vkey(signer.verifier_key), ORIGIN)
    try:
        assert ro.size() == 10 and ro.entry(3) == audit.entry(3)
        assert ro.root() == audit.root()
        assert ro.inclusion_proof(3) == audit.inclusion_proof(3)
        audit.record(ev(10))
        assert ro.verify().size == 11
        with pytest.raises(RecordFailed):
            ro.record(ev())
    finally:
        ro.close()


def test_readonly_verify_needs_the_key(audit: AuditLog, db: Path) -> None:
    ro = AuditLog.open_readonly(db)
    try:
        with pytest.raises(ConfigError):
            ro.verify()
    finally:
        ro.close()


def test_readonly_open_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        AuditLog.open_readonly(tmp_path / "nope.db")


# -- fail closed ------------------------------------------------------------------------------


def test_record_fails_closed_when_the_store_is_locked_then_recovers(
    db: Path, signer: NoteSigner
) -> None:
    with AuditLog(db, signer, ORIGIN, busy_timeout=0.05) as log:
        log.record(ev(0))
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        try:
            with pytest.raises(RecordFailed, match="durable"):
                log.record(ev(1))
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Nothing half-written: the next event takes the index the failed one would have had.
        assert log.record(ev(2)).index == 1
        assert [e["data"]["n"] for e in log.search()] == [0, 2]
        log.verify()


def test_record_after_close_is_refused(db: Path, signer: NoteSigner) -> None:
    log = AuditLog(db, signer, ORIGIN)
    with pytest.raises(RecordFailed):
        log.record(ev())  # not started
    log.start()
    log.close()
    with pytest.raises(RecordFailed):
        log.record(ev())


def test_search_is_the_same_through_the_index_and_the_scan(db: Path, signer: NoteSigner) -> None:
    """The search index trails the writer; results must not depend on where it stands."""
    clock = ManualClock(1_800_000_000.0)

    def make(i: int) -> Event:
        return Event(
            type=f"t.{i % 3}",
            actor=f"a{i % 4}",
            subject=f"a{(i + 1) % 5}",
            session=f"s{i % 2}",
            decision=("allow", "deny", None)[i % 3],
        )

    with AuditLog(db, signer, ORIGIN, clock=clock) as log:
        for i in range(30):
            log.record(make(i))
            clock.advance(1)
        for _ in range(400):  # wait for the indexer to cover the first 30
            if log.search_path.is_file():
                conn = sqlite3.connect(log.search_path)
                (last,) = conn.execute("SELECT max(idx) FROM search").fetchone()
                conn.close()
                if last == 29:
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the search index never caught up")
        for i in range(30, 45):  # these are found by the scan, until indexed
            log.record(make(i))
            clock.advance(1)
        everything = [log.entry(i) for i in range(45)]

        def brute(pred: Any, descending: bool = False, limit: int = 100) -> list[int]:
            hits = [e["index"] for e in everything if pred(e)]
            return (hits[::-1] if descending else hits)[:limit]

        def got(rows: list[dict[str, Any]]) -> list[int]:
            return [r["index"] for r in rows]

        assert got(log.search(identity="a1")) == brute(
            lambda e: "a1" in (e.get("actor"), e.get("subject"))
        )
        assert got(log.search(type="t.*", decision="deny", descending=True, limit=7)) == brute(
            lambda e: e.get("decision") == "deny", descending=True, limit=7
        )
        assert got(log.search(session="s0", after=20, limit=8)) == brute(
            lambda e: e.get("session") == "s0" and e["index"] > 20, limit=8
        )
        assert got(log.search(since_ms=1_800_000_025_000, until_ms=1_800_000_035_000)) == list(
            range(25, 35)
        )
        assert got(log.session("s1")) == brute(lambda e: e.get("session") == "s1")
        assert got(log.tail(3)) == [42, 43, 44]


def test_public_surface() -> None:
    import tether.audit

    assert tether.audit.__all__ == ["AuditLog", "VerifyReport", "redact"]
    assert all(hasattr(tether.audit, name) for name in tether.audit.__all__)
