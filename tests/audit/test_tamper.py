"""Edits made to the store file with sqlite3 behind the log's back: verify names the entry.

Each ``bogus_*`` function is one named way to tamper with a closed 40-entry log (entries 0..39,
a signed checkpoint at 40); it returns the index verify must name (or None when no single
entry is to blame).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit import AuditLog
from tether.audit.log import node_id
from tether.audit.merkle import leaf_hash
from tether.audit.note import NoteSigner, NoteVerifier
from tether.clock import ManualClock
from tether.errors import VerificationFailed
from tether.events import Event

ORIGIN = "example.org/tether/audit"
SIZE = 40
SIGNER = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
VERIFIER = NoteVerifier.from_vkey(SIGNER.verifier_key)


def build(path: Path, n: int = SIZE, tweak: int | None = None) -> None:
    with AuditLog(path, SIGNER, ORIGIN, clock=ManualClock(), checkpoint_interval=3600) as log:
        for i in range(n):
            body = {"prompt": f"prompt {i}".encode()} if i % 4 == 0 else {}
            who = "mallory" if i == tweak else "researcher"
            log.record(
                Event(
                    type="llm.invoke",
                    actor=f"spiffe://example.org/agent/{who}",
                    session="s",
                    decision="allow",
                    data={"n": i},
                    bodies=body,
                )
            )


def sql(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for stmt, args in statements:
            conn.execute(stmt, args)
    finally:
        conn.close()


def data_of(path: Path, idx: int) -> bytes:
    conn = sqlite3.connect(path)
    try:
        return bytes(conn.execute("SELECT data FROM entries WHERE idx = ?", (idx,)).fetchone()[0])
    finally:
        conn.close()


# -- named tampering ----------------------------------------------------------------------------


def bogus_flipped_byte(path: Path) -> int:
    data = bytearray(data_of(path, 17))
    data[data.index(b'"n":17') + 5] = ord("8")  # "n":17 -> "n":18: still canonical JSON
    sql(path, ("UPDATE entries SET data = ? WHERE idx = 17", (bytes(data),)))
    return 17


def bogus_non_canonical_edit(path: Path) -> int:
    data = data_of(path, 9).replace(b'"n":9', b'"n": 9')
    sql(path, ("UPDATE entries SET data = ? WHERE idx = 9", (data,)))
    return 9


def bogus_deleted_row(path: Path) -> int:
    sql(path, ("DELETE FROM entries WHERE idx = 23", ()))
    return 23


def bogus_inserted_row(path: Path) -> int:
    """Shift 12.. up by one and insert a forged entry 12 (self-consistent index)."""
    forged = data_of(path, 12).replace(b'"n":12', b'"n":99')
    sql(
        path,
        ("UPDATE entries SET idx = -idx - 1 WHERE idx >= 12", ()),
        ("UPDATE entries SET idx = -idx WHERE idx < 0", ()),
        (
            "INSERT INTO entries (idx, data, time_ms, type, actor, subject, session, decision) "
            "SELECT 12, ?, time_ms, type, actor, subject, session, decision FROM entries "
            "WHERE idx = 13",
            (forged,),
        ),
    )
    return 12


def bogus_swapped_rows(path: Path) -> int:
    a, b = data_of(path, 5), data_of(path, 30)
    sql(
        path,
        ("UPDATE entries SET data = ? WHERE idx = 5", (b,)),
        ("UPDATE entries SET data = ? WHERE idx = 30", (a,)),
    )
    return 5


def bogus_truncated_tail(path: Path) -> int:
    sql(path, ("DELETE FROM entries WHERE idx >= 35", ()))
    return 35


def bogus_truncated_tail_and_tree(path: Path) -> int:
    """Remove entries 35.. with their nodes: the signed checkpoint at 40 still says 40."""
    sql(
        path,
        ("DELETE FROM entries WHERE idx >= 35", ()),
        ("DELETE FROM nodes WHERE id >= ?", (2 * 35 - (35).bit_count(),)),
    )
    return 35


def bogus_changed_body(path: Path) -> int:
    sql(path, ("UPDATE bodies SET content = ? WHERE content = ?", (b"prompt X", b"prompt 8")))
    return 8


def bogus_deleted_body(path: Path) -> int:
    sql(path, ("DELETE FROM bodies WHERE content = ?", (b"prompt 20",)))
    return 20


def bogus_changed_search_column(path: Path) -> int:
    """Hide an entry from search by its actor: the signed bytes still name the real actor."""
    sql(path, ("UPDATE entries SET actor = 'spiffe://example.org/agent/nobody' WHERE idx = 3", ()))
    return 3


def bogus_hidden_from_search(path: Path) -> int:
    """Drop an entry from the derived search index so searches would not find it."""
    search = path.with_suffix(".search.db")
    sql(search, ("DELETE FROM search WHERE idx = 6", ()))
    return 6


def bogus_changed_tree_node(path: Path) -> int:
    sql(path, ("UPDATE nodes SET hash = zeroblob(32) WHERE id = ?", (node_id(2, 6),)))
    return 27  # node (2, 6) covers 24..27 and completes when entry 27 is appended


def bogus_rewritten_entry_and_tree(path: Path) -> int:
    """Rewrite entry 14 and recompute its leaf and every node above it: only the signed
    checkpoint can tell, so verify names the range since the last good checkpoint (0)."""
    from tether.audit.merkle import TreeBuilder

    forged = data_of(path, 14).replace(b'"n":14', b'"n":77')
    sql(path, ("UPDATE entries SET data = ? WHERE idx = 14", (forged,)))
    tree = TreeBuilder()
    rows: list[tuple[int, bytes]] = []
    for i in range(SIZE):
        leaf = leaf_hash(forged if i == 14 else data_of(path, i))
        base = 2 * i - i.bit_count()
        rows += [(base + k, h) for k, (_, h) in enumerate(tree.append(leaf))]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executemany("UPDATE nodes SET hash = ? WHERE id = ?", [(h, i) for i, h in rows])
    conn.close()
    return 0


def bogus_forged_checkpoint_signature(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    note = conn.execute("SELECT note FROM checkpoints WHERE size = ?", (SIZE,)).fetchone()[0]
    lines = note.split("\n")
    lines[1] = str(SIZE - 1)  # claim a different size under the old signature
    conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", ("\n".join(lines), SIZE))
    conn.close()
    return None


TAMPERING: list[Callable[[Path], int | None]] = [
    bogus_flipped_byte,
    bogus_non_canonical_edit,
    bogus_deleted_row,
    bogus_inserted_row,
    bogus_swapped_rows,
    bogus_truncated_tail,
    bogus_truncated_tail_and_tree,
    bogus_changed_body,
    bogus_deleted_body,
    bogus_changed_search_column,
    bogus_hidden_from_search,
    bogus_changed_tree_node,
    bogus_rewritten_entry_and_tree,
    bogus_forged_checkpoint_signature,
]


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__)
def test_verify_names_the_tampered_entry(
    tmp_path: Path, tamper: Callable[[Path], int | None]
) -> None:
    path = tmp_path / "audit.db"
    build(path)
    ro = AuditLog.open_readonly(path, VERIFIER, ORIGIN)
    ro.verify()
    expected = tamper(path)
    with pytest.raises(VerificationFailed) as caught:
        ro.verify()
    ro.close()
    assert caught.value.index == expected, caught.value.message


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__)
def test_writer_refuses_or_keeps_nothing_unverified(
    tmp_path: Path, tamper: Callable[[Path], int | None]
) -> None:
    """Opening a tampered log to write either refuses, or the log it continues still fails
    verify: tampering is never silently absorbed into new checkpoints."""
    path = tmp_path / "audit.db"
    build(path)
    tamper(path)
    log = AuditLog(path, SIGNER, ORIGIN, checkpoint_interval=3600)
    try:
        log.start()
    except VerificationFailed:
        return
    try:
        with pytest.raises(VerificationFailed):
            log.verify()
    finally:
        log.close()


def test_rollback_behind_a_saved_checkpoint_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    build(path)
    saved = AuditLog.open_readonly(path, VERIFIER, ORIGIN).latest_checkpoint()  # size 40
    # The attacker restores an older copy: 30 entries, its own consistent checkpoints.
    old = tmp_path / "old.db"
    build(old, 30)
    old.replace(path)
    old.with_suffix(".search.db").replace(path.with_suffix(".search.db"))
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    ro = AuditLog.open_readonly(path, VERIFIER, ORIGIN)
    ro.verify()  # on its own the old copy is consistent
    with pytest.raises(VerificationFailed, match="rolled back") as caught:
        ro.verify(saved)
    assert caught.value.index == 30


def test_fork_with_the_signing_key_is_caught_by_a_saved_checkpoint(tmp_path: Path) -> None:
    """Even an attacker holding the signing key cannot make a different history that
    matches a checkpoint someone saved earlier."""
    path = tmp_path / "audit.db"
    build(path, 20)
    saved = AuditLog.open_readonly(path, VERIFIER, ORIGIN).latest_checkpoint()
    forked = tmp_path / "forked.db"
    build(forked, SIZE, tweak=11)  # entry 11 differs; re-signed with the real key
    ro = AuditLog.open_readonly(forked, VERIFIER, ORIGIN)
    ro.verify()
    with pytest.raises(VerificationFailed, match="given checkpoint"):
        ro.verify(saved)


def test_a_saved_checkpoint_the_log_extends_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    build(path, 20)
    saved = AuditLog.open_readonly(path, VERIFIER, ORIGIN).latest_checkpoint()
    with AuditLog(path, SIGNER, ORIGIN) as log:
        log.record(Event(type="more"))
    assert AuditLog.open_readonly(path, VERIFIER, ORIGIN).verify(saved).extends == 20


def test_a_checkpoint_from_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    build(path, 5)
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    note = other.sign(f"{ORIGIN}\n5\n{'A' * 43}=\n")
    with pytest.raises(VerificationFailed, match="not signed by"):
        AuditLog.open_readonly(path, VERIFIER, ORIGIN).verify(note)
