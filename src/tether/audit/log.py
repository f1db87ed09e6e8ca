"""The tamper-evident audit log: SQLite storage, group commit, signed checkpoints, proofs.

One :class:`AuditLog` per data directory backs the :class:`~tether.events.Recorder` interface.

**Entries.** Event *i* becomes the canonical JSON (RFC 8785) object::

    {"actor": ..., "bodies": {name: sha256hex}, "data": {...}, "decision": ...,
     "index": i, "session": ..., "subject": ..., "time_ms": int, "type": ..., "v": 1}

``actor``, ``subject``, ``session`` and ``decision`` are left out when the event has none,
``bodies`` when it has none; ``data`` is always there (maybe ``{}``). Those bytes are the RFC 9162
leaf data, and the only thing verification trusts: the indexed columns stored beside them serve
search and are checked against them by :meth:`AuditLog.verify`.

**Values.** ``data`` passes through redaction (:mod:`tether.audit.redact`) and is normalised to
the JSON that canonicalises without ambiguity: tuples become lists; an ``int`` outside
+-(2**53 - 1) and every ``float`` become strings (``repr``: ``0.25`` -> ``"0.25"``, ``nan`` ->
``"NaN"``), so no entry holds a binary float whose RFC 8785 form a reader could disagree on.
Keys must be strings; any other type is refused with :class:`~tether.errors.RecordFailed` (the
action it describes is refused too: fail closed). Bodies are redacted as text, stored once per
SHA-256 in ``bodies``, and referenced from the leaf by that digest.

**Durability.** ``record`` queues the event and waits. One writer thread takes everything queued,
appends it to the tree and writes entries, bodies and every newly completed tree node in one
WAL transaction, then acknowledges the whole batch. If the commit fails, every waiter gets
:class:`~tether.errors.RecordFailed` and the writer reloads the tree from what is actually
committed. ``sync`` says when the disk is forced:

* ``"commit"``: every commit is an fsync (``synchronous=FULL``); an acknowledged event survives
  a power loss. Costs ~0.3-0.5 ms per commit here, on the path of every must-wait record.
* ``"interval"``: commits go to the WAL in the OS (``synchronous=NORMAL``): an acknowledged event
  survives any crash of the process (kill -9, OOM) at once, and the writer fsyncs the WAL before
  it signs each checkpoint, so at most one ``checkpoint_interval`` of acknowledged events can be
  lost to a power loss or kernel crash, and never one a signed checkpoint covers (a published
  checkpoint is never rolled back). A failed fsync stops the writer: from then on every record
  fails, so every action is refused (fail closed). PostgreSQL's ``synchronous_commit = off`` and
  auditd's default ``flush = incremental_async`` make the same trade.

**Checkpoints.** The same thread signs a C2SP tlog checkpoint whenever the tree has grown and
``checkpoint_interval`` has passed since the last one, and keeps every checkpoint. One thread
owning every write means SQLite never makes a writer wait for another.

**Search** uses the columns ``time_ms, type, actor, subject, session, decision`` stored beside
each entry. Their secondary indexes live in a separate, derived file (``audit.search.db``) that
an indexer thread fills from the entries in large chunks, a few tens of milliseconds behind the
writer; a search reads the index for what it covers and scans the few newer entries. Verify
checks the columns against the signed bytes and the index against the columns (an edited index
could hide an entry from an investigator); a lost or foreign index is rebuilt on start.

**Tree nodes** are stored one row per complete subtree in table ``nodes`` under an integer key:
the node's position in completion order (``2*m - popcount(m) + level`` for the node completed
when leaf ``m`` was appended). Every insert is an append to a rowid B-tree, the ids of one leaf's
nodes are consecutive, and a whole proof is one ``WHERE id IN (...)`` query.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NoReturn

import orjson

from tether.audit.canonical import MAX_SAFE_INTEGER, canonical_json
from tether.audit.merkle import (
    EMPTY_ROOT,
    Node,
    TreeBuilder,
    assemble,
    consistency_ranges,
    fold,
    inclusion_ranges,
    range_nodes,
)
from tether.audit.note import (
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    sign_checkpoint,
    verify_checkpoint,
)
from tether.audit.redact import REDACTED, is_secret_key, redact_bytes, redact_text
from tether.clock import Clock, SystemClock
from tether.errors import (
    AuditError,
    BadRequest,
    ConfigError,
    NotFound,
    RecordFailed,
    StoreError,
    TetherError,
    VerificationFailed,
)
from tether.events import Event, Receipt

__all__ = ["ENTRY_VERSION", "SYNC_MODES", "AuditLog", "SyncMode", "VerifyReport", "node_id"]

log = logging.getLogger("tether.audit")

ENTRY_VERSION = 1
SyncMode = Literal["commit", "interval"]
SYNC_MODES: tuple[SyncMode, ...] = ("commit", "interval")
SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT = 5.0
LINGER = 0.001  # group commit: longest wait for the last batch's callers to queue again
LINGER_MIN = 8  # ... and only after a batch this big: a few callers must never wait for it
WAL_TRIM_BYTES = 4 << 20  # the writer copies the WAL into the database past this size
LAZY_DELAY = 0.002  # a lazy event waits at most this long for a non-lazy one to share its commit
MAX_SEARCH_LIMIT = 10_000
_MAX_DEPTH = 64
_ORJSON_JCS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_NON_BMP = re.compile("[\U00010000-\U0010ffff]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    actor TEXT,
    subject TEXT,
    session TEXT,
    decision TEXT
);
DROP INDEX IF EXISTS entries_time;
DROP INDEX IF EXISTS entries_type;
DROP INDEX IF EXISTS entries_actor;
DROP INDEX IF EXISTS entries_subject;
DROP INDEX IF EXISTS entries_session;
DROP INDEX IF EXISTS entries_decision;
CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bodies (sha256 BLOB PRIMARY KEY, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    note TEXT NOT NULL
);
"""
# The search index lives in its own file (``audit.search.db``), filled behind the writer by an
# indexer thread in large chunks: maintaining six secondary indexes inside every group commit
# cost more than everything else together (scattered index pages rewritten per commit).
_SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search (
    idx INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    actor TEXT,
    subject TEXT,
    session TEXT,
    decision TEXT
);
CREATE INDEX IF NOT EXISTS search_time ON search(time_ms);
CREATE INDEX IF NOT EXISTS search_type ON search(type);
CREATE INDEX IF NOT EXISTS search_actor ON search(actor) WHERE actor IS NOT NULL;
CREATE INDEX IF NOT EXISTS search_subject ON search(subject) WHERE subject IS NOT NULL;
CREATE INDEX IF NOT EXISTS search_session ON search(session) WHERE session IS NOT NULL;
CREATE INDEX IF NOT EXISTS search_decision ON search(decision) WHERE decision IS NOT NULL;
"""
_INDEX_CHUNK = 16384
_INDEX_POLL = 0.05
_INSERT_ENTRY = (
    "INSERT INTO entries (idx, data, time_ms, type, actor, subject, session, decision) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_NODE = "INSERT INTO nodes (id, hash) VALUES (?, ?)"
_INSERT_BODY = "INSERT OR IGNORE INTO bodies (sha256, content) VALUES (?, ?)"
# Batch inserts as ONE statement each: the rows travel as one blob plus a JSON index into it.
# sqlite3's executemany releases and retakes the GIL around every row; with many recording
# threads each retake can wait for a switch interval, which starved the writer (measured: 6k/s
# with executemany, see bench/bench_audit.py). One statement per table takes it back once.
_BATCH_ENTRIES = (
    "INSERT INTO entries (idx, data, time_ms, type, actor, subject, session, decision) "
    "SELECT value->>0, substr(?1, value->>1, value->>2), value->>3, value->>4, value->>5, "
    "value->>6, value->>7, value->>8 FROM json_each(?2)"
)
_BATCH_NODES = (
    "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?3) "
    "INSERT INTO nodes (id, hash) SELECT ?1 + i, substr(?2, i * 32 + 1, 32) FROM s"
)
_BATCH_BODIES = (
    "INSERT OR IGNORE INTO bodies (sha256, content) "
    "SELECT substr(?1, value->>0, 32), substr(?1, value->>1, value->>2) FROM json_each(?2)"
)
_BATCHED = sqlite3.sqlite_version_info >= (3, 38, 0)  # the ->> operator
_COLUMNS = ("time_ms", "type", "actor", "subject", "session", "decision")

_sha256 = hashlib.sha256


def node_id(level: int, index: int) -> int:
    """The storage key of node ``(level, index)``: its position in completion order."""
    m = ((index + 1) << level) - 1
    return 2 * m - m.bit_count() + level


def _node_count(size: int) -> int:
    """How many complete subtrees (leaves included) a tree of ``size`` leaves has."""
    return 2 * size - size.bit_count()


def _now_ms(clock: Clock) -> int:
    return int(clock.now() * 1000)


# -- turning an Event into entry bytes ---------------------------------------------------------


def _clean(value: Any, odd_keys: list[str], depth: int = 0) -> Any:
    """Redact and normalise one ``data`` value (see the module docstring). Keys with
    characters above U+FFFF (which sort differently in RFC 8785) are noted in ``odd_keys``."""
    t = type(value)
    if t is str:
        return redact_text(value)
    if value is None or t is bool:
        return value
    if t is int:
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if depth >= _MAX_DEPTH:
        raise RecordFailed(f"event data nests deeper than {_MAX_DEPTH} levels")
    if t is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                raise RecordFailed(f"event data keys must be strings, not {type(k).__name__}")
            if not k.isascii() and _NON_BMP.search(k):
                odd_keys.append(k)
            if v is not None and is_secret_key(k):
                out[k] = REDACTED
            else:
                out[k] = _clean(v, odd_keys, depth + 1)
        return out
    if t is list or t is tuple or isinstance(value, list | tuple):
        return [_clean(v, odd_keys, depth + 1) for v in value]
    if isinstance(value, str):  # a subclass: record its plain text, not its behaviour
        return redact_text(str.__str__(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _clean(int.__int__(value), odd_keys, depth)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(float(value))
    raise RecordFailed(f"event data holds a {type(value).__name__}, which is not JSON")


def _dumps(obj: dict[str, Any], exact: bool) -> bytes:
    """Canonical JSON of a cleaned value. ``exact``: only dict/list/str/int/bool/None with
    BMP-only keys, so orjson's sorted output is RFC 8785 (see tether.audit.canonical)."""
    if exact:
        try:
            return orjson.dumps(obj, option=_ORJSON_JCS)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate: the reference implementation refuses it with a reason
    try:
        return canonical_json(obj)
    except TetherError as e:
        raise RecordFailed(f"event cannot be canonicalised: {e.message}") from e
    except (TypeError, ValueError) as e:
        raise RecordFailed(f"event cannot be canonicalised: {type(e).__name__}") from e


def _field(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordFailed(f"event {name} must be a string, not {type(value).__name__}")
    return redact_text(value)


class _Item:
    """A prepared event: canonical JSON split around the ``index`` member, which only the
    writer knows. Keys sort as actor, bodies, data, decision | index | session, subject,
    time_ms, type, v; so ``head[:-1] + ',"index":N,' + tail[1:]`` is the canonical entry."""

    __slots__ = ("bodies", "head", "row", "tail")

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        row: tuple[int, str, str | None, str | None, str | None, str | None],
        bodies: list[tuple[bytes, bytes]],
    ) -> None:
        self.head = head
        self.tail = tail
        self.row = row
        self.bodies = bodies


def _prepare(event: Event, time_ms: int) -> _Item:
    if not isinstance(event, Event):
        raise RecordFailed(f"not an Event: {type(event).__name__}")
    if not isinstance(event.type, str) or not event.type:
        raise RecordFailed("an event needs a non-empty type")
    type_ = redact_text(event.type)
    actor = _field(event.actor, "actor")
    subject = _field(event.subject, "subject")
    session = _field(event.session, "session")
    decision = _field(event.decision, "decision")
    if not isinstance(event.data, Mapping):
        raise RecordFailed("event data must be a mapping")
    odd_keys: list[str] = []
    data = _clean(event.data, odd_keys)
    body_rows: list[tuple[bytes, bytes]] = []
    refs: dict[str, str] = {}
    for name, content in event.bodies.items():
        if not isinstance(name, str) or not isinstance(content, bytes | bytearray | memoryview):
            raise RecordFailed("event bodies must map names to bytes")
        clean = redact_bytes(bytes(content))
        digest = _sha256(clean).digest()
        refs[redact_text(name)] = digest.hex()
        body_rows.append((digest, clean))
    head: dict[str, Any] = {"data": data}
    if actor is not None:
        head["actor"] = actor
    if refs:
        head["bodies"] = refs
    if decision is not None:
        head["decision"] = decision
    tail: dict[str, Any] = {"time_ms": time_ms, "type": type_, "v": ENTRY_VERSION}
    if session is not None:
        tail["session"] = session
    if subject is not None:
        tail["subject"] = subject
    head_b = _dumps(head, not odd_keys)
    tail_b = _dumps(tail, True)
    return _Item(head_b, tail_b, (time_ms, type_, actor, subject, session, decision), body_rows)


def _entry_bytes(item: _Item, index: int) -> bytes:
    return b'%b,"index":%d,%b' % (item.head[:-1], index, item.tail[1:])


# -- batches and waiters ------------------------------------------------------------------------


class _Slot:
    """Where a waiting thread finds its outcome. Its lock is held by the caller from the
    start and released by the writer: the cheapest wake-up CPython has."""

    __slots__ = ("lock", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result: Receipt | RecordFailed | None = None


_Waiter = _Slot | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Receipt]"]
# (the event, or it prepared by an async caller; time_ms when recorded; who waits)
_Queued = tuple["Event | _Item", int, _Waiter]


class _Batch:
    """Events taken from the queue together: made durable and acknowledged together.

    ``results[pos]`` is the receipt of the event at ``pos`` or the RecordFailed it got: an
    event the writer cannot turn into an entry fails alone, a failed commit fails them all.
    """

    __slots__ = ("items", "results", "settled")

    def __init__(self, items: list[_Queued]) -> None:
        self.items = items
        self.results: list[Receipt | RecordFailed] = []
        self.settled = False

    def fail(self, error: RecordFailed) -> None:
        self.results = [error] * len(self.items)
        self.settle()

    def settle(self) -> None:
        self.settled = True
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Receipt | RecordFailed]]] = {}
        for (_, _, waiter), result in zip(self.items, self.results, strict=True):
            if isinstance(waiter, _Slot):
                waiter.result = result
                waiter.lock.release()
            else:
                by_loop.setdefault(waiter[0], []).append((waiter[1], result))
        here = _running_loop()
        for loop, futs in by_loop.items():  # one wake-up per event loop per batch
            if loop is here:  # committed on this very loop (sync = "interval")
                _settle_futures(futs)
                continue
            # A closed loop has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_futures, futs)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle_futures(futs: list[tuple[asyncio.Future[Receipt], Receipt | RecordFailed]]) -> None:
    for fut, result in futs:
        if fut.done():  # the caller was cancelled
            continue
        if isinstance(result, RecordFailed):
            fut.set_exception(RecordFailed(result.message))
        else:
            fut.set_result(result)


# -- verification report -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditLog.verify` established. It exists only if everything verified."""

    size: int
    root: bytes
    checkpoints: int  # stored checkpoints whose signature and root verified
    signed_size: int  # the largest size a verified checkpoint covers
    bodies: int  # stored bodies whose content matches their hash
    extends: int | None = None  # size of the given earlier checkpoint this log extends
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    @property
    def unsigned(self) -> int:
        """Entries after the last signed checkpoint (normal for a fraction of a second)."""
        return self.size - self.signed_size


# -- the log -----------------------------------------------------------------------------------


class AuditLog:
    """The audit log of one data directory. See the module docstring.

    ``AuditLog(path, signer, origin)`` is the writer (one per file; call :meth:`start` or use it
    as a context manager); :meth:`open_readonly` opens the same file for reading and verifying,
    also while a writer runs in another process.
    """

    def __init__(
        self,
        path: Path,
        signer: NoteSigner,
        origin: str,
        *,
        clock: Clock | None = None,
        checkpoint_interval: float = 0.25,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        sync: SyncMode = "commit",
    ) -> None:
        if checkpoint_interval <= 0:
            raise ConfigError("checkpoint_interval must be positive")
        if sync not in SYNC_MODES:
            raise ConfigError(f"audit sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.sync: SyncMode = sync
        self.path = Path(path)
        self.origin = origin
        self._signer: NoteSigner | None = signer
        self._verifier: NoteVerifier | None = NoteVerifier.from_vkey(signer.verifier_key)
        self._clock: Clock = clock or SystemClock()
        self._interval = checkpoint_interval
        self._busy_timeout = busy_timeout
        self._readonly = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        # writer state (owned by the writer thread once started)
        self._lifecycle = threading.Lock()
        # The queue is a deque: appending is atomic under the GIL, so recording threads never
        # queue on a shared lock (measured: a Condition there made 64 threads convoy).
        self._queue: collections.deque[_Queued] = collections.deque()
        self._wake = threading.Event()
        self._idle = False  # the writer is (about to be) blocked on _wake
        # Non-lazy events queued so far (bumped after the append) and the count the writer had
        # seen when it last drained the queue: a difference means someone is waiting.
        self._urgent = 0
        self._urgent_seen = 0
        self._expect = 0  # events the last batch had: how many to linger for
        self._stopped = False  # the writer has exited: nothing queued will be taken
        self._indexer: threading.Thread | None = None
        self._index_stop = threading.Event()
        self._started = False
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._inflight: _Batch | None = None
        # One commit at a time, whether the writer thread or an event loop makes it (sync =
        # "interval": async callers commit on their own loop, see submit).
        self._commit_lock = threading.Lock()
        self._trim_conn: sqlite3.Connection | None = None
        self._pending: collections.deque[_Queued] = collections.deque()
        self._flush_soon = False  # a loop has a flush of _pending scheduled for this turn
        self._flush_later = False  # ... or one LAZY_DELAY from now (lazy events only)
        self._later_handle: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None
        self._lazy_nudge = False  # sync = "commit": a loop will nudge the writer for lazy events
        self._conn: sqlite3.Connection | None = None
        self._tree = TreeBuilder()
        self._head: tuple[int, bytes] = (0, EMPTY_ROOT)  # committed (size, root)
        self._cp_size = -1
        self._cp_note: str | None = None
        self._cp_due = 0.0

    @classmethod
    def open_readonly(
        cls, path: Path, verifier: NoteVerifier | None = None, origin: str | None = None
    ) -> AuditLog:
        """Open ``path`` for queries, proofs and :meth:`verify` only (record refuses).

        ``origin`` defaults to the one the log was created with; pass it when known, so a
        file from another log is refused. ``verify`` needs ``verifier``.
        """
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"no audit log at {path}", hint="run 'tether init' and 'tether serve'")
        self = cls.__new__(cls)
        self.path = path
        self._signer = None
        self._verifier = verifier
        self._clock = SystemClock()
        self._interval = 1.0
        self._busy_timeout = DEFAULT_BUSY_TIMEOUT
        self._readonly = True
        self.sync = "commit"
        self._local = threading.local()
        self._readers = []
        self._readers_lock = threading.Lock()
        self._lifecycle = threading.Lock()
        self._queue = collections.deque()
        self._wake = threading.Event()
        self._idle = False
        self._urgent = self._urgent_seen = 0
        self._commit_lock = threading.Lock()
        self._trim_conn = None
        self._pending = collections.deque()
        self._flush_soon = self._flush_later = self._lazy_nudge = False
        self._later_handle = None
        self._expect = 0
        self._stopped = True
        self._indexer = None
        self._index_stop = threading.Event()
        self._started = True
        self._closing = False
        self._closed = False
        self._thread = None
        self._inflight = None
        self._conn = None
        self._tree = TreeBuilder()
        self._head = (0, EMPTY_ROOT)
        self._cp_size = -1
        self._cp_note = None
        self._cp_due = 0.0
        stored = self._meta("origin")
        if stored is None:
            raise StoreError(f"{path} is not a Tether audit log (no origin recorded)")
        if origin is not None and stored != origin:
            raise ConfigError(f"{path} is the audit log of {stored!r}, not {origin!r}")
        self.origin = stored
        return self

    def __repr__(self) -> str:
        mode = "readonly" if self._readonly else "writer"
        return f"AuditLog({str(self.path)!r}, origin={self.origin!r}, {mode})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open (or create) the store, check and repair its tail, start the writer thread."""
        if self._readonly:
            return
        with self._lifecycle:
            if self._started:
                return
            self._started = True
        try:
            self._conn = self._open_writer()
            self._recover(self._conn)
        except BaseException:
            self._started = False
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise
        if self._cp_size != self._head[0]:
            self._write_checkpoint()
        self._thread = threading.Thread(target=self._run, name="tether-audit-writer", daemon=True)
        self._thread.start()
        index_conn = self._open_index()
        if index_conn is not None:
            self._indexer = threading.Thread(
                target=self._index_loop,
                args=(index_conn,),
                name="tether-audit-indexer",
                daemon=True,
            )
            self._indexer.start()

    def close(self) -> None:
        """Drain the queue, sign a final checkpoint, close every connection."""
        with self._lifecycle:
            if self._closed:
                return
            self._closing = True
        self._flush_pending()  # what async callers queued this turn is committed, not dropped
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._index_stop.set()
        if self._indexer is not None:
            self._indexer.join()
        self._closed = True
        if self._trim_conn is not None:
            self._trim_conn.close()
            self._trim_conn = None
        if self._conn is not None:
            # Another process may still be reading; then the WAL stays, which is fine.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> AuditLog:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_timeout,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'commit' else 'NORMAL'}")
            # Appends touch only the right edge of each B-tree: a small cache keeps memory flat
            # as the log grows (64 MiB here once grew a gateway's RSS by as much).
            conn.execute("PRAGMA cache_size=-4096")
            # No checkpoint of the WAL inside a commit (it copies megabytes and syncs, and a
            # loop may be the committer): the writer thread runs them, see _trim_wal.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('origin', ?), ('schema', ?)",
                (self.origin, str(SCHEMA_VERSION)),
            )
            (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the audit log {self.path}: {e}") from e
        if stored != self.origin:
            conn.close()
            raise ConfigError(f"{self.path} is the audit log of {stored!r}, not {self.origin!r}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError("the audit log is closed")
        conn = self._connect_reader()
        self._local.conn = conn
        with self._readers_lock:
            self._readers.append(conn)
        return conn

    @property
    def search_path(self) -> Path:
        """The derived search index beside the log (rebuilt from entries if lost)."""
        return self.path.with_suffix(".search.db")

    def _connect_reader(self) -> sqlite3.Connection:
        mode = "?mode=ro" if self._readonly else ""
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}{mode}",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=self._busy_timeout,
            )
            conn.execute("PRAGMA query_only=ON")
            if self.search_path.is_file():
                conn.execute(
                    "ATTACH DATABASE ? AS s", (f"{self.search_path.resolve().as_uri()}?mode=ro",)
                )
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log {self.path}: {e}") from e
        return conn

    def _meta(self, key: str) -> str | None:
        try:
            row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path} is not a readable audit log: {e}") from e
        return None if row is None else str(row[0])

    # -- the search index ------------------------------------------------------------------

    def _open_index(self) -> sqlite3.Connection | None:
        """Open (or create, or rebuild) the search index; None if it cannot be had, in which
        case searches scan the entries (slower, still correct)."""
        for attempt in range(2):
            try:
                conn = sqlite3.connect(
                    self.search_path.resolve().as_uri(),
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=self._busy_timeout,
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=OFF")  # derived data: rebuilt if lost
                conn.executescript(_SEARCH_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('origin', ?)", (self.origin,)
                )
                (origin,) = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
                (last,) = conn.execute("SELECT max(idx) FROM search").fetchone()
                if origin != self.origin or (last is not None and last >= self._head[0]):
                    raise sqlite3.DatabaseError("search index is not of this log")
                conn.execute(
                    "ATTACH DATABASE ? AS log", (f"{self.path.resolve().as_uri()}?mode=ro",)
                )
                return conn
            except sqlite3.Error as e:
                with contextlib.suppress(NameError, sqlite3.Error):
                    conn.close()
                log.warning("audit search index %s rebuilt: %s", self.search_path, e)
                if attempt == 0:
                    for suffix in ("", "-wal", "-shm"):
                        Path(str(self.search_path) + suffix).unlink(missing_ok=True)
        return None

    def _index_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                stop = self._index_stop.wait(_INDEX_POLL)
                try:
                    self._index_step(conn)
                except sqlite3.Error as e:
                    log.warning("audit search indexing failed (will retry): %s", e)
                if stop:
                    return
        finally:
            conn.close()

    def _index_step(self, conn: sqlite3.Connection) -> None:
        """Copy the search columns of new entries, in chunks: one statement each, run by
        SQLite alone (no GIL), on the other core while the writer commits."""
        (last,) = conn.execute("SELECT max(idx) FROM search").fetchone()
        upto = 0 if last is None else int(last) + 1
        size = self._head[0]
        while upto < size:
            hi = min(size, upto + _INDEX_CHUNK)
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO search (idx, time_ms, type, actor, subject, session, decision) "
                "SELECT idx, time_ms, type, actor, subject, session, decision "
                "FROM log.entries WHERE idx >= ? AND idx < ?",
                (upto, hi),
            )
            conn.execute("COMMIT")
            upto = hi

    # -- opening checks and repair -----------------------------------------------------------

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Check what a crash could have left and load the tree.

        A commit is atomic, so after a crash the store normally holds whole batches. Damage (a
        restored backup, a truncated file, hand edits) is caught here: entries must be dense,
        every checkpoint must lie within them and match the stored nodes, and the entries after
        the last checkpoint are re-hashed. Missing nodes are recomputed from the entries;
        anything else that does not verify refuses to open (run ``tether audit verify``).
        """
        try:
            row = conn.execute("SELECT count(*), max(idx) FROM entries").fetchone()
            count, last = int(row[0]), row[1]
            size = 0 if last is None else int(last) + 1
            if count != size:
                self._fail_full_verify(f"entries are not dense: {count} rows up to {size}")
            (max_node,) = conn.execute("SELECT max(id) FROM nodes").fetchone()
            stored_nodes = 0 if max_node is None else int(max_node) + 1
            cps = conn.execute("SELECT size, note FROM checkpoints ORDER BY size").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log {self.path}: {e}") from e
        if stored_nodes > _node_count(size):
            raise VerificationFailed(
                f"the audit log holds tree nodes for entries beyond its last entry {size - 1}: "
                "entries were removed",
                index=size,
                hint="run 'tether audit verify' and restore the store from a backup",
            )
        if cps and int(cps[-1][0]) > size:
            raise VerificationFailed(
                f"a signed checkpoint covers {cps[-1][0]} entries but the log has {size}: "
                "acknowledged entries were lost",
                index=size,
                hint="restore the store from a backup; the checkpoint proves what was lost",
            )
        # The largest leaf count whose nodes are all stored; recompute the rest from entries.
        complete = size
        if stored_nodes < _node_count(size):
            lo, hi = 0, size
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _node_count(mid) <= stored_nodes:
                    lo = mid
                else:
                    hi = mid - 1
            complete = lo
        check: tuple[int, bytes] | None = None
        if cps:
            cp = self._check_note(cps[-1][1], int(cps[-1][0]))
            check = (cp.size, cp.root_hash)
            self._cp_size, self._cp_note = cp.size, str(cps[-1][1])
        start = complete if check is None else min(complete, check[0])
        tree = TreeBuilder(start, self._frontier(conn, start))
        repaired = self._replay_tail(conn, tree, size, complete, check)
        if repaired:
            log.warning(
                "audit log %s: recomputed %d missing tree nodes from entries", self.path, repaired
            )
        self._tree = tree
        self._head = (tree.size, tree.root())

    def _fail_full_verify(self, what: str) -> NoReturn:
        """Something is wrong: verify everything to name the first bad entry, then refuse."""
        reader = self._connect_reader()
        try:
            self._verify_with(reader, None)
        finally:
            reader.close()
        raise VerificationFailed(
            f"the audit log does not open cleanly: {what}",
            hint="run 'tether audit verify'; restore the store from a backup",
        )

    def _check_note(self, note: str, size: int) -> Checkpoint:
        assert self._verifier is not None
        cp = verify_checkpoint(note, self._verifier, self.origin)
        if cp.size != size:
            raise VerificationFailed(
                f"checkpoint stored as size {size} says size {cp.size}", index=min(size, cp.size)
            )
        return cp

    def _frontier(self, conn: sqlite3.Connection, size: int) -> list[bytes]:
        nodes = range_nodes(0, size)
        found = self._fetch_nodes(conn, nodes)
        try:
            return [found[n] for n in nodes]
        except KeyError as e:
            raise StoreError(f"tree node {e.args[0]} is missing from {self.path}") from e

    def _replay_tail(
        self,
        conn: sqlite3.Connection,
        tree: TreeBuilder,
        size: int,
        complete: int,
        check: tuple[int, bytes] | None,
    ) -> int:
        """Re-hash entries ``tree.size .. size`` and compare them with the stored nodes; add the
        nodes of entries from ``complete`` on that have none; check the last checkpoint's root
        when the replay reaches its size. Returns how many nodes were added."""

        def check_root() -> None:
            if check is not None and tree.size == check[0] and tree.root() != check[1]:
                self._fail_full_verify(f"the tree does not match checkpoint {check[0]}")

        check_root()
        if tree.size >= size:
            return 0
        first = tree.size
        node_cur = conn.execute(
            "SELECT id, hash FROM nodes WHERE id >= ? ORDER BY id", (_node_count(first),)
        )
        peek = node_cur.fetchone()
        missing: list[tuple[int, bytes]] = []
        cur = conn.execute("SELECT idx, data FROM entries WHERE idx >= ? ORDER BY idx", (first,))
        for idx, data in cur:
            _check_entry_bytes(idx, data)
            leaf = _sha256(b"\x00" + data).digest()
            base = 2 * idx - idx.bit_count()
            for k, (_, h) in enumerate(tree.append(leaf)):
                if peek is not None and peek[0] == base + k:
                    if peek[1] != h:
                        raise VerificationFailed(
                            f"entry {idx} does not match the stored tree: it was changed after "
                            "it was written",
                            index=idx,
                            hint="run 'tether audit verify'; restore the store from a backup",
                        )
                    peek = node_cur.fetchone()
                elif idx >= complete:
                    missing.append((base + k, h))
                else:
                    raise VerificationFailed(f"entry {idx} has no stored tree node", index=idx)
            check_root()
        if missing:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_NODE, missing)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return len(missing)

    # -- recording -----------------------------------------------------------------------------

    def _enqueue(
        self, event: Event | _Item, waiter: _Waiter, lazy: bool = False, time_ms: int | None = None
    ) -> None:
        # Callers only queue: redaction and canonicalisation run on the writer thread, so a
        # crowd of recording threads competes for the GIL in short slices and the writer
        # (which must hold it to build each batch) is not starved. Measured in bench_audit.
        if self._readonly:
            raise RecordFailed("this audit log is open read-only")
        if self._closing or not self._started:
            raise RecordFailed("the audit log is not running")
        self._queue.append((event, _now_ms(self._clock) if time_ms is None else time_ms, waiter))
        # Pairs with _next_batch: it sets _idle, then looks at the queue; we append, then look
        # at _idle. Under the GIL one of the two sees the other, so no event is left unseen.
        # A lazy event wakes nobody: the caller's loop nudges the writer after LAZY_DELAY.
        if not lazy:
            # After the append: the writer reads it before draining. Not atomic across threads;
            # a lost bump at worst leaves an event to the LAZY_DELAY bound, never unseen.
            self._urgent += 1
            if self._idle:
                self._wake.set()
        if self._stopped:  # the writer is gone; fail whatever it did not take, ours included
            self._fail_queued(RecordFailed("the audit log is not running"))

    def _fail_queued(self, error: RecordFailed) -> None:
        items: list[_Queued] = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(self._queue.popleft())
        if items:
            _Batch(items).fail(error)

    def record(self, event: Event) -> Receipt:
        """Append ``event``; return once it is durable. Raises RecordFailed otherwise."""
        slot = _Slot()
        self._enqueue(event, slot)
        slot.lock.acquire()  # released by the writer once the batch is durable (or failed)
        result = slot.result
        if isinstance(result, RecordFailed):
            raise RecordFailed(result.message) from result
        assert result is not None
        return result

    async def arecord(self, event: Event) -> Receipt:
        """The same for async callers: waits on a future the writer resolves, never blocking
        the loop on disk."""
        return await self.submit(event)

    def submit(self, event: Event, *, lazy: bool = False) -> asyncio.Future[Receipt]:
        """Start recording ``event`` from the running loop; the future settles once it is
        durable (or fails with RecordFailed). A plain future: no task per record.

        ``lazy=True`` is for records nobody waits on (a response record after the agent has
        its response): the writer is not woken for it; it shares the commit of the next
        non-lazy event, or commits on its own within :data:`LAZY_DELAY`. Without it, a
        keep-alive caller's next must-wait record queues behind a commit of its own.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Receipt] = loop.create_future()
        # Prepared here, on the loop: the writer thread then holds the GIL only briefly per
        # event, so it does not slow the loop's own socket work (measured in bench_llm).
        time_ms = _now_ms(self._clock)
        try:
            item = _prepare(event, time_ms)
        except RecordFailed as e:
            fut.set_exception(e)
            return fut
        except Exception as e:  # a hostile Mapping or str subclass: refuse this one event
            fut.set_exception(RecordFailed(f"event cannot be recorded: {type(e).__name__}"))
            return fut
        if self.sync == "interval" and not self._readonly:
            if self._closing or self._stopped or not self._started:
                fut.set_exception(RecordFailed("the audit log is not running"))
                return fut
            # A commit without fsync costs tens of microseconds: the loop makes it itself,
            # once per turn for everything queued in that turn, instead of handing it to the
            # writer thread (a thread hop and a GIL hand-off on every record).
            self._pending.append((item, time_ms, (loop, fut)))
            if lazy:
                if not (self._flush_soon or self._flush_later):
                    self._flush_later = True
                    self._later_handle = (
                        loop,
                        loop.call_later(LAZY_DELAY, self._flush_pending, True),
                    )
            elif not self._flush_soon:
                self._flush_soon = True
                loop.call_soon(self._flush_pending, False)
            return fut
        try:
            self._enqueue(item, (loop, fut), lazy, time_ms)
        except RecordFailed as e:  # not running: the caller learns it from the future
            if not fut.done():
                fut.set_exception(e)
            return fut
        if lazy and not self._lazy_nudge:
            # The loop, not a woken writer, times the lazy event (waking the writer for it
            # cost the loop ~70 us at the moment the next request arrived).
            self._lazy_nudge = True
            loop.call_later(LAZY_DELAY, self._nudge)
        return fut

    def _nudge(self) -> None:
        """LAZY_DELAY after a lazy event (sync = "commit"): make the writer commit it, as if
        someone waited, unless a batch took it meanwhile (then this is a cheap no-op)."""
        self._lazy_nudge = False
        if self._queue:
            self._urgent += 1
            if self._idle:
                self._wake.set()

    def _flush_pending(self, timer: bool = False) -> None:
        """Commit everything async callers queued (sync = "interval"), on the calling thread."""
        # The flag goes down before the queue is drained, so an event queued meanwhile
        # either is drained here or schedules a flush of its own: none is left behind.
        if timer:
            self._flush_later = False
        else:
            self._flush_soon = False
            later = self._later_handle
            if self._flush_later and later is not None and _running_loop() is later[0]:
                later[1].cancel()  # this flush takes the lazy events too (only its loop may)
                self._flush_later = False
        items: list[_Queued] = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(self._pending.popleft())
        if not items:
            return
        batch = _Batch(items)
        if self._stopped or self._conn is None:
            batch.fail(RecordFailed("the audit log is not running"))
            return
        with self._commit_lock:
            idle = self._head[0] == self._cp_size  # the writer may sleep with no deadline
            self._commit(batch)
        if idle and self._head[0] != self._cp_size:
            self._wake.set()  # a checkpoint is now due: let the writer time it

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        error = RecordFailed("the audit log is not running")
        try:
            self._loop()
        except BaseException as e:  # the writer must never die silently with callers waiting
            log.critical("audit writer stopped: %s", e)
            error = RecordFailed(f"the audit writer stopped: {type(e).__name__}")
            self._closing = True
            if self._inflight is not None and not self._inflight.settled:
                self._inflight.fail(error)
        finally:
            self._stopped = True
            self._fail_queued(error)

    def _loop(self) -> None:
        while True:
            items = self._next_batch()
            if items:
                batch = _Batch(items)
                self._inflight = batch
                with self._commit_lock:
                    self._commit(batch)
                self._inflight = None
                self._expect = len(items)
            elif self._closing:
                if self._cp_size != self._head[0]:
                    self._write_checkpoint()
                return
            wait = self._checkpoint_wait()
            if wait is not None and wait <= 0:
                self._write_checkpoint()
                self._trim_wal()

    def _next_batch(self) -> list[_Queued]:
        """Everything queued, once there is something (or a checkpoint falls due, or close)."""
        queue = self._queue
        lazy_deadline: float | None = None
        while not self._closing:
            self._wake.clear()
            self._idle = True
            if queue:
                if self._urgent != self._urgent_seen:
                    break  # someone waits
                if lazy_deadline is None:  # only lazy events: give them a little while
                    lazy_deadline = time.monotonic() + LAZY_DELAY
            timeout = self._checkpoint_wait()
            if timeout is not None and timeout <= 0:
                break  # a checkpoint is due: commit what is queued (if anything) first
            if lazy_deadline is not None:
                left = lazy_deadline - time.monotonic()
                if left <= 0:
                    break
                timeout = left if timeout is None else min(timeout, left)
            self._wake.wait(timeout)
        self._idle = False
        self._urgent_seen = self._urgent  # read before draining: nothing counted is left behind
        if not queue:
            return []
        self._linger()
        items: list[_Queued] = []
        with contextlib.suppress(IndexError):
            while True:
                items.append(queue.popleft())
        return items

    def _linger(self) -> None:
        """Group commit: give the callers just acknowledged a moment to queue their next event.

        Without it the writer takes a near-empty batch and then fights those callers for the
        GIL at every SQLite call. It sleeps in short steps for at most :data:`LINGER` seconds,
        and only until as many events are queued as the last batch had. Only after a batch of
        :data:`LINGER_MIN` or more: with a caller or two (a gateway at low concurrency, whose
        request and response records often share a batch) waiting would only add latency.
        """
        if self._expect < LINGER_MIN:
            return
        deadline = time.monotonic() + LINGER
        while len(self._queue) < self._expect and not self._closing:
            if time.monotonic() >= deadline:
                return
            time.sleep(LINGER / 10)

    def _checkpoint_wait(self) -> float | None:
        if self._head[0] == self._cp_size:
            return None
        return self._cp_due - time.monotonic()

    def _commit(self, batch: _Batch) -> None:
        conn = self._conn
        assert conn is not None
        tree = self._tree
        size0, frontier0 = tree.size, tree.frontier
        datas: list[bytes] = []
        rows: list[list[Any]] = []
        hashes: list[bytes] = []
        bodies: list[tuple[bytes, bytes]] = []
        results = batch.results
        append = tree.append
        offset = 1  # SQL substr() counts from 1
        for event, time_ms, _ in batch.items:
            try:
                item = event if isinstance(event, _Item) else _prepare(event, time_ms)
            except RecordFailed as e:
                results.append(e)
                continue
            except Exception as e:  # a hostile Mapping or str subclass: refuse this one event
                results.append(RecordFailed(f"event cannot be recorded: {type(e).__name__}"))
                continue
            i = tree.size
            data = _entry_bytes(item, i)
            leaf = _sha256(b"\x00" + data).digest()
            # Node ids are completion order, so this batch's nodes are one consecutive run.
            hashes += [h for _, h in append(leaf)]
            datas.append(data)
            rows.append([i, offset, len(data), *item.row])
            offset += len(data)
            if item.bodies:
                bodies.extend(item.bodies)
            results.append(Receipt(index=i, leaf_hash=leaf))
        if not rows:
            batch.settle()
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._insert(conn, size0, datas, rows, hashes, bodies)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as e:
            self._tree = TreeBuilder(size0, frontier0)
            self._reload_after_failure()
            log.error("audit commit of %d entries failed: %s", len(rows), e)
            err = RecordFailed(f"the audit log could not make the event durable: {e}")
            err.__cause__ = e
            batch.results = [r if isinstance(r, RecordFailed) else err for r in results]
        else:
            if self._head[0] == self._cp_size:
                self._cp_due = time.monotonic() + self._interval
            self._head = (tree.size, tree.root())
        batch.settle()

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        size0: int,
        datas: list[bytes],
        rows: list[list[Any]],
        hashes: list[bytes],
        bodies: list[tuple[bytes, bytes]],
    ) -> None:
        first_node = _node_count(size0)
        if not _BATCHED:
            conn.executemany(
                _INSERT_ENTRY, [(r[0], d, *r[3:]) for r, d in zip(rows, datas, strict=True)]
            )
            conn.executemany(_INSERT_NODE, [(first_node + k, h) for k, h in enumerate(hashes)])
            if bodies:
                conn.executemany(_INSERT_BODY, bodies)
            return
        conn.execute(_BATCH_ENTRIES, (b"".join(datas), orjson.dumps(rows)))
        conn.execute(_BATCH_NODES, (first_node, b"".join(hashes), len(hashes)))
        if bodies:
            index: list[tuple[int, int, int]] = []
            parts: list[bytes] = []
            pos = 1
            for key, content in bodies:
                index.append((pos, pos + 32, len(content)))
                parts += (key, content)
                pos += 32 + len(content)
            conn.execute(_BATCH_BODIES, (b"".join(parts), orjson.dumps(index)))

    def _reload_after_failure(self) -> None:
        """The commit may have failed after reaching the disk; trust only what is stored."""
        conn = self._conn
        assert conn is not None
        try:
            (last,) = conn.execute("SELECT max(idx) FROM entries").fetchone()
            size = 0 if last is None else int(last) + 1
            if size != self._tree.size:
                self._tree = TreeBuilder(size, self._frontier(conn, size))
                self._head = (size, self._tree.root())
        except (sqlite3.Error, TetherError, ValueError) as e:
            log.error("audit log state could not be reloaded after a failed commit: %s", e)

    def _write_checkpoint(self) -> None:
        with self._commit_lock:
            size, root = self._head
        signer = self._signer
        conn = self._conn
        assert signer is not None and conn is not None
        if self.sync == "interval":
            # Never sign over entries that are not on disk: a power loss must not roll the log
            # back behind a checkpoint someone holds. A failure here stops the writer (fail
            # closed: every later record is refused) rather than sign or go on unsynced.
            # Outside the lock: loops keep committing while the disk catches up.
            self._fsync_files()
        note = sign_checkpoint(Checkpoint(self.origin, size, root), signer)
        with self._commit_lock:
            self._cp_due = time.monotonic() + self._interval  # the next one, stored or not
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO checkpoints (size, time_ms, note) VALUES (?, ?, ?)",
                    (size, _now_ms(self._clock), note),
                )
            except sqlite3.Error as e:
                log.error("audit checkpoint at size %d could not be stored: %s", size, e)
                return
            self._cp_size, self._cp_note = size, note

    def _trim_wal(self) -> None:
        """Copy the WAL back into the database once it is big, on the writer thread and its
        own connection: PASSIVE never blocks a commit (SQLite's automatic checkpoint, off
        here, would run inside whichever commit crossed the threshold)."""
        try:
            if os.stat(f"{self.path}-wal").st_size < WAL_TRIM_BYTES:
                return
        except FileNotFoundError:
            return
        try:
            if self._trim_conn is None:
                self._trim_conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=0.1
                )
            self._trim_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:  # the next checkpoint tries again; commits go on
            log.warning("audit WAL checkpoint failed: %s", e)

    def _fsync_files(self) -> None:
        """Force the WAL (and the database file) to disk: what ``synchronous=FULL`` would do
        at each commit, done once per checkpoint. fsync flushes the file, whichever
        descriptor asks."""
        for suffix in ("-wal", ""):
            try:
                fd = os.open(f"{self.path}{suffix}", os.O_RDONLY)
            except FileNotFoundError:
                continue  # no WAL right now: everything is in the database file
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- state ---------------------------------------------------------------------------------

    def size(self) -> int:
        """Entries acknowledged so far (for a read-only log: committed so far)."""
        if self._readonly:
            return self._stored_size(self._reader())
        return self._head[0]

    def _stored_size(self, conn: sqlite3.Connection) -> int:
        try:
            (last,) = conn.execute("SELECT max(idx) FROM entries").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log: {e}") from e
        return 0 if last is None else int(last) + 1

    @property
    def verifier(self) -> NoteVerifier | None:
        """The checkpoint verifier (from the signer, or given to :meth:`open_readonly`)."""
        return self._verifier

    @property
    def verifier_key(self) -> str:
        """The C2SP note verifier key of the checkpoints (``<name>+<hex8>+<base64>``)."""
        if self._verifier is None:
            raise ConfigError("no checkpoint verifier key is known for this log")
        return self._verifier.verifier_key

    def latest_checkpoint(self) -> str:
        """The newest signed checkpoint note."""
        if not self._readonly and self._cp_note is not None:
            return self._cp_note
        try:
            row = (
                self._reader()
                .execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1")
                .fetchone()
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log: {e}") from e
        if row is None:
            raise NotFound("the audit log has no checkpoint yet")
        return str(row[0])

    def checkpoint_notes(self) -> list[str]:
        """Every stored checkpoint, oldest first."""
        rows = self._reader().execute("SELECT note FROM checkpoints ORDER BY size").fetchall()
        return [str(r[0]) for r in rows]

    # -- proofs ------------------------------------------------------------------------------

    @staticmethod
    def _fetch_nodes(conn: sqlite3.Connection, nodes: Sequence[Node]) -> dict[Node, bytes]:
        if not nodes:
            return {}
        by_id = {node_id(lvl, idx): (lvl, idx) for lvl, idx in nodes}
        marks = ",".join("?" * len(by_id))
        try:
            rows = conn.execute(
                f"SELECT id, hash FROM nodes WHERE id IN ({marks})",  # noqa: S608 - only marks
                tuple(by_id),
            ).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read tree nodes: {e}") from e
        return {by_id[i]: bytes(h) for i, h in rows}

    def _get(self, nodes: Sequence[Node]) -> Mapping[Node, bytes]:
        return self._fetch_nodes(self._reader(), nodes)

    def _resolve_size(self, size: int | None) -> int:
        current = self.size()
        if size is None:
            return current
        if not 0 <= size <= current:
            raise BadRequest(f"tree size {size} is outside the log (0..{current})")
        return size

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of entry ``index`` in the tree of ``size`` (default: all)."""
        n = self._resolve_size(size)
        if not 0 <= index < n:
            raise BadRequest(f"entry {index} is not in a tree of size {n}")
        return assemble(inclusion_ranges(index, n), self._get)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from ``old_size`` to ``new_size`` (default: all)."""
        n = self._resolve_size(new_size)
        if not 0 <= old_size <= n:
            raise BadRequest(f"no consistency proof from size {old_size} to {n}")
        return assemble(consistency_ranges(old_size, n), self._get)

    def root(self, size: int | None = None) -> bytes:
        """The Merkle tree hash of the first ``size`` entries (default: all)."""
        n = self._resolve_size(size)
        if not self._readonly and n == self._head[0]:
            return self._head[1]
        nodes = range_nodes(0, n)
        found = self._get(nodes)
        try:
            return fold([found[x] for x in nodes])
        except KeyError as e:
            raise StoreError(f"tree node {e.args[0]} is missing") from e

    # -- queries ---------------------------------------------------------------------------------

    def entry_data(self, index: int) -> bytes:
        """The canonical bytes of entry ``index`` (the leaf data)."""
        try:
            row = (
                self._reader()
                .execute("SELECT data FROM entries WHERE idx = ?", (index,))
                .fetchone()
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log: {e}") from e
        if row is None:
            raise NotFound(f"no audit entry {index}")
        return bytes(row[0])

    def entry(self, index: int) -> dict[str, Any]:
        """Entry ``index`` as a dict (parsed from its canonical bytes)."""
        return _parse(self.entry_data(index))

    def body(self, sha256hex: str) -> bytes:
        """A stored body by its SHA-256 (hex)."""
        try:
            key = bytes.fromhex(sha256hex)
        except ValueError as e:
            raise BadRequest("a body is named by its SHA-256 in hex") from e
        if len(key) != 32:
            raise BadRequest("a body is named by its SHA-256 in hex")
        try:
            row = (
                self._reader()
                .execute("SELECT content FROM bodies WHERE sha256 = ?", (key,))
                .fetchone()
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the audit log: {e}") from e
        if row is None:
            raise NotFound(f"no audit body sha256:{sha256hex}")
        return bytes(row[0])

    def search(
        self,
        identity: str | None = None,
        session: str | None = None,
        type: str | None = None,
        decision: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 100,
        descending: bool = False,
        after: int | None = None,
    ) -> list[dict[str, Any]]:
        """Entries matching every given filter, by index. ``identity`` matches actor or
        subject; ``type`` ending in ``*`` matches a prefix (``llm.*``); ``since_ms`` is
        inclusive, ``until_ms`` exclusive; ``after`` continues from an index (exclusive)."""
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_SEARCH_LIMIT}")
        where: list[str] = []
        args: list[Any] = []
        if identity is not None:
            where.append("(actor = ? OR subject = ?)")
            args += [identity, identity]
        if session is not None:
            where.append("session = ?")
            args.append(session)
        if type is not None:
            if type.endswith("*"):
                where.append("type >= ? AND type < ?")
                prefix = type[:-1]
                args += [prefix, prefix + "\U0010ffff"]
            else:
                where.append("type = ?")
                args.append(type)
        if decision is not None:
            where.append("decision = ?")
            args.append(decision)
        if since_ms is not None:
            where.append("time_ms >= ?")
            args.append(since_ms)
        if until_ms is not None:
            where.append("time_ms < ?")
            args.append(until_ms)
        if after is not None:
            where.append("idx < ?" if descending else "idx > ?")
            args.append(after)
        return self._select(" AND ".join(where) or "1", args, limit, descending)

    def _select(
        self, where: str, args: list[Any], limit: int | None, descending: bool
    ) -> list[dict[str, Any]]:
        """Entries matching ``where`` (over the search columns): through the search index for
        what it covers, by scanning the few entries after it for the rest."""
        order = "DESC" if descending else "ASC"
        lim = "" if limit is None else " LIMIT ?"
        conn = self._reader()
        try:
            attached = conn.execute(
                "SELECT 1 FROM pragma_database_list WHERE name = 's'"
            ).fetchone()
            upto = 0
            if attached:
                (last,) = conn.execute("SELECT max(idx) FROM s.search").fetchone()
                upto = 0 if last is None else int(last) + 1
            # Both halves use the same ``upto``, so nothing is missed or repeated.
            # ``where`` is built from fixed fragments only; every value is a bound parameter.
            indexed = _qualify(
                "SELECT e.data FROM s.search x JOIN entries e ON e.idx = x.idx "  # noqa: S608
                f"WHERE x.idx < ? AND ({where.replace('idx', 'x.idx')}) ORDER BY x.idx {order}",
                "x.",
            )
            scanned = (
                f"SELECT data FROM entries WHERE idx >= ? AND ({where}) "  # noqa: S608
                f"ORDER BY idx {order}"
            )
            halves = [(scanned, upto)]
            if attached:
                halves.insert(0 if not descending else 1, (indexed, upto))
            rows: list[Any] = []
            for sql, bound in halves:
                want = None if limit is None else limit - len(rows)
                if want is not None and want <= 0:
                    break
                params = [bound, *args] + ([] if want is None else [want])
                rows += conn.execute(sql + lim, params).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot search the audit log: {e}") from e
        return [_parse(bytes(r[0])) for r in rows]

    def session(self, session_id: str) -> list[dict[str, Any]]:
        """Every entry of one session, in order."""
        return self._select("session = ?", [session_id], None, False)

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` entries, oldest first."""
        if n <= 0:
            return []
        return list(reversed(self.search(limit=min(n, MAX_SEARCH_LIMIT), descending=True)))

    def iter_entries(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The canonical bytes of entries ``start .. end`` in order, from one snapshot."""
        conn = self._connect_reader()
        try:
            conn.execute("BEGIN")
            hi = self._stored_size(conn) if end is None else end
            cur = conn.execute(
                "SELECT data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, hi)
            )
            for (data,) in cur:
                yield bytes(data)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def export(
        self,
        fp: IO[bytes],
        fmt: Literal["jsonl", "ocsf"] = "jsonl",
        bodies_dir: Path | None = None,
        size: int | None = None,
    ) -> int:
        """Write the first ``size`` entries (default: all) to ``fp``; return how many.

        ``jsonl``: line *i* is exactly the leaf data of entry *i* and a newline, what
        ``tools/verify_log.py`` checks against a checkpoint. ``ocsf``: one OCSF 1.x event per
        line (mapping in :mod:`tether.audit._ocsf`). With ``bodies_dir``, each referenced body is
        written there as a file named by its SHA-256.
        """
        if fmt not in ("jsonl", "ocsf"):
            raise BadRequest(f"unknown export format {fmt!r} (jsonl or ocsf)")
        from tether.audit._ocsf import to_ocsf

        n = self._resolve_size(size)
        if bodies_dir is not None:
            bodies_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for data in self.iter_entries(0, n):
            if fmt == "jsonl":
                fp.write(data + b"\n")
            else:
                fp.write(orjson.dumps(to_ocsf(_parse(data), self.origin)) + b"\n")
            if bodies_dir is not None and b'"bodies":' in data:
                for digest in _parse(data).get("bodies", {}).values():
                    target = bodies_dir / str(digest)
                    if not target.exists():
                        target.write_bytes(self.body(str(digest)))
            count += 1
        return count

    # -- verification --------------------------------------------------------------------------

    def verify(self, checkpoint: str | None = None) -> VerifyReport:
        """Recompute and check everything; see :meth:`_verify_with`. Raises VerificationFailed
        naming the first bad entry."""
        if self._verifier is None:
            raise ConfigError(
                "verifying needs the log's checkpoint verifier key",
                hint="pass the key from <data dir>/keys/audit-note.vkey",
            )
        conn = self._connect_reader()
        try:
            return self._verify_with(conn, checkpoint)
        finally:
            conn.close()

    def _verify_with(self, conn: sqlite3.Connection, external: str | None) -> VerifyReport:
        """One read snapshot: every body re-hashed; every entry canonical, at its index, with
        its columns matching its bytes and its bodies present; the whole tree recomputed and
        compared node by node with the stored one; every stored checkpoint's signature checked
        and its root compared with the recomputed root at its size; and, given an earlier
        checkpoint, the log proven to extend it (a shorter or forked log fails)."""
        started = time.perf_counter()
        verifier = self._verifier
        assert verifier is not None
        try:
            conn.execute("BEGIN")
            try:
                return self._verify_snapshot(conn, verifier, external, started)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise VerificationFailed(f"the audit store cannot be read: {e}") from e

    @staticmethod
    def _verify_search_index(conn: sqlite3.Connection) -> None:
        """The search index is derived, but an edited one could hide entries from an
        investigator: every row must match its (already verified) entry, with no gaps."""
        if not conn.execute("SELECT 1 FROM pragma_database_list WHERE name = 's'").fetchone():
            return
        hint = "delete audit.search.db: the server rebuilds it from the verified entries"
        bad = conn.execute(_SEARCH_MISMATCH).fetchone()
        if bad is not None:
            raise VerificationFailed(
                f"the search index disagrees with entry {bad[0]}", index=int(bad[0]), hint=hint
            )
        count, last = conn.execute("SELECT count(*), max(idx) FROM s.search").fetchone()
        if last is not None and count != last + 1:
            (gap,) = conn.execute(
                "SELECT min(e.idx) FROM entries e LEFT JOIN s.search x ON x.idx = e.idx "
                "WHERE e.idx <= ? AND x.idx IS NULL",
                (last,),
            ).fetchone()
            raise VerificationFailed(
                f"the search index is missing entry {gap}: it would hide it from searches",
                index=gap,
                hint=hint,
            )

    def _verify_snapshot(
        self,
        conn: sqlite3.Connection,
        verifier: NoteVerifier,
        external: str | None,
        started: float,
    ) -> VerifyReport:
        origin = self.origin
        stored_origin = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        if stored_origin is None or stored_origin[0] != origin:
            raise VerificationFailed(f"the store is not the audit log of {origin!r}")
        # Bodies first: a body whose bytes no longer match its name is named by the first
        # entry that references it.
        known: set[bytes] = set()
        altered: set[bytes] = set()
        for key, content in conn.execute("SELECT sha256, content FROM bodies"):
            key = bytes(key)
            (known if _sha256(content).digest() == key else altered).add(key)
        # Stored checkpoints: signatures now, roots when the replay reaches their size.
        targets: list[tuple[int, bytes, str]] = []
        for size, note in conn.execute("SELECT size, note FROM checkpoints ORDER BY size"):
            try:
                cp = verify_checkpoint(note, verifier, origin)
            except VerificationFailed as e:
                raise VerificationFailed(
                    f"stored checkpoint at size {size}: {e.message}", index=None
                ) from e
            if cp.size != size:
                raise VerificationFailed(f"checkpoint stored as size {size} says {cp.size}")
            targets.append((cp.size, cp.root_hash, f"signed checkpoint at size {cp.size}"))
        extends: int | None = None
        if external is not None:
            cp = verify_checkpoint(external, verifier, origin)
            extends = cp.size
            targets.append((cp.size, cp.root_hash, f"the given checkpoint (size {cp.size})"))
        targets.sort(key=lambda t: t[0])
        checked = [0]  # the last size whose root matched a checkpoint, for naming ranges
        tree = TreeBuilder()

        def check_targets() -> None:
            while targets and targets[0][0] == tree.size:
                size, root, what = targets.pop(0)
                if tree.root() != root:
                    first = checked[0]
                    raise VerificationFailed(
                        f"the log does not match {what}: an entry in {first}..{size - 1} was "
                        "changed, removed or reordered, or the log was forked",
                        index=first if size > first else None,
                    )
                checked[0] = size

        check_targets()
        node_cur = conn.execute("SELECT id, hash FROM nodes ORDER BY id")
        next_node = node_cur.fetchone
        cur = conn.execute(
            "SELECT idx, data, time_ms, type, actor, subject, session, decision "
            "FROM entries ORDER BY idx"
        )
        for idx, data, *columns in cur:
            i = tree.size
            if idx != i:
                raise VerificationFailed(f"entry {i} is missing from the audit log", index=i)
            obj = _check_entry_bytes(idx, data)
            for name, value in zip(_COLUMNS, columns, strict=True):
                if obj.get(name) != value:
                    raise VerificationFailed(
                        f"entry {idx}: the stored {name} column does not match its signed bytes",
                        index=idx,
                    )
            refs = obj.get("bodies")
            if refs is not None:
                _check_refs(idx, refs, known, altered)
            leaf = _sha256(b"\x00" + data).digest()
            base = 2 * idx - idx.bit_count()
            for k, (_, h) in enumerate(tree.append(leaf)):
                row = next_node()
                if row is None or row[0] != base + k:
                    raise VerificationFailed(
                        f"entry {idx} has no stored tree node {base + k}: the tree is "
                        "incomplete or was edited",
                        index=idx,
                    )
                if row[1] != h:
                    what = "the entry" if k == 0 else "a stored tree node"
                    raise VerificationFailed(
                        f"entry {idx} does not match the stored tree ({what} was changed)",
                        index=idx,
                    )
            if targets and targets[0][0] == tree.size:
                check_targets()
        size = tree.size
        if next_node() is not None:
            raise VerificationFailed(
                f"the store holds tree nodes for entries after {size - 1}: entries were removed",
                index=size,
            )
        if targets:
            cp_size, _, what = targets[0]
            raise VerificationFailed(
                f"the log has {size} entries but {what} covers {cp_size}: "
                "the log was truncated or rolled back",
                index=size,
            )
        self._verify_search_index(conn)
        n_cps = conn.execute("SELECT count(*), coalesce(max(size), 0) FROM checkpoints").fetchone()
        warnings: list[str] = []
        if int(n_cps[1]) < size:
            warnings.append(
                f"{size - int(n_cps[1])} entries are not yet inside a signed checkpoint"
            )
        return VerifyReport(
            size=size,
            root=tree.root(),
            checkpoints=int(n_cps[0]),
            signed_size=int(n_cps[1]),
            bodies=len(known),
            extends=extends,
            seconds=time.perf_counter() - started,
            warnings=tuple(warnings),
        )


_COLUMN_RE = re.compile(r"(?<![.\w])(time_ms|type|actor|subject|session|decision)\b")


def _qualify(sql: str, alias: str) -> str:
    """Prefix the search columns in the WHERE part of ``sql`` with ``alias``."""
    head, _, tail = sql.partition(" WHERE ")
    where, _, order = tail.partition(" ORDER BY ")
    qualified = _COLUMN_RE.sub(lambda m: alias + m.group(1), where)
    return f"{head} WHERE {qualified} ORDER BY {order}"


_SEARCH_MISMATCH = """
SELECT x.idx FROM s.search x LEFT JOIN entries e ON e.idx = x.idx
WHERE e.idx IS NULL OR e.time_ms IS NOT x.time_ms OR e.type IS NOT x.type
   OR e.actor IS NOT x.actor OR e.subject IS NOT x.subject OR e.session IS NOT x.session
   OR e.decision IS NOT x.decision
ORDER BY x.idx LIMIT 1
"""


def _parse(data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise AuditError(f"an audit entry is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise AuditError("an audit entry is not a JSON object")
    return obj


def _check_entry_bytes(idx: int, data: bytes) -> dict[str, Any]:
    """The entry at position ``idx`` must be canonical JSON of the current version that says it
    is entry ``idx``; return it parsed."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise VerificationFailed(f"entry {idx} is not valid JSON", index=idx) from e
    if not isinstance(obj, dict) or obj.get("v") != ENTRY_VERSION:
        raise VerificationFailed(f"entry {idx} is not a version {ENTRY_VERSION} entry", index=idx)
    if obj.get("index") != idx:
        raise VerificationFailed(
            f"entry {idx} says it is entry {obj.get('index')!r}: entries were moved", index=idx
        )
    try:
        canonical = canonical_json(obj)
    except (TetherError, TypeError, ValueError) as e:
        raise VerificationFailed(f"entry {idx} cannot be canonicalised", index=idx) from e
    if canonical != data:
        raise VerificationFailed(f"entry {idx} is not canonical JSON: it was edited", index=idx)
    return obj


def _check_refs(idx: int, refs: Any, known: set[bytes], altered: set[bytes]) -> None:
    if not isinstance(refs, dict):
        raise VerificationFailed(f"entry {idx}: 'bodies' is not an object", index=idx)
    for name, digest in refs.items():
        try:
            key = bytes.fromhex(digest)
        except (TypeError, ValueError) as e:
            raise VerificationFailed(
                f"entry {idx}: body {name!r} has no valid hash", index=idx
            ) from e
        if key in altered:
            raise VerificationFailed(
                f"entry {idx}: body {name!r} (sha256:{digest[:16]}...) was altered", index=idx
            )
        if key not in known:
            raise VerificationFailed(
                f"entry {idx}: body {name!r} (sha256:{digest[:16]}...) is missing", index=idx
            )
