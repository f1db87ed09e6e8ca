"""The SQLite store, written with SQLAlchemy Core so that PostgreSQL can take its place."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tether.errors import BadRequest, StoreError
from tether.identity.revocation import REVOCATION_KINDS, Revocation

__all__ = ["SCHEMA_VERSION", "IdentityRecord", "Store", "UserRecord"]

SCHEMA_VERSION = 1

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

identities = Table(
    "identities",
    metadata,
    Column("spiffe_id", String(512), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(128), nullable=False),
    Column("created_ms", Integer, nullable=False),
    Column("created_by", String(512), nullable=True),
)

users = Table(
    "users",
    metadata,
    Column("name", String(128), primary_key=True),
    # SHA-256 of the local credential: the credential is 256 random bits, so a plain hash is
    # enough (no password stretching needed) and keeps login cheap.
    Column("credential_sha256", String(64), nullable=False),
    Column("grants", Text, nullable=False),
    Column("created_ms", Integer, nullable=False),
)

revocations = Table(
    "revocations",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("value", String(512), nullable=False),
    Column("at_ms", Integer, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("revoked_by", String(512), nullable=True),
)


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    spiffe_id: str
    kind: str
    name: str
    created_ms: int
    created_by: str | None


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    grants: list[str]
    created_ms: int

    def __repr__(self) -> str:  # no credential material lives here, but be explicit
        return f"UserRecord(name={self.name!r}, grants={self.grants!r})"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def sqlite_or_url_engine(url_or_path: str | Path, *on_connect: Any) -> tuple[str, Engine]:
    """An engine for a URL, or for a SQLite file path; ``on_connect`` listeners (PRAGMAs) are
    attached for SQLite only."""
    url = str(url_or_path)
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        for listener in on_connect:
            event.listen(engine, "connect", listener)
    return url, engine


class Store:
    """Identities, users and revocations. Safe to share between threads and processes."""

    def __init__(self, url_or_path: str | Path) -> None:
        self.url, self._engine = sqlite_or_url_engine(url_or_path, _sqlite_pragmas)
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self._migrate()

    def __repr__(self) -> str:
        return f"Store({self._engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as e:
            raise StoreError(
                f"store error: {type(e).__name__}: {e.args[0] if e.args else ''}"
            ) from e

    def _migrate(self) -> None:
        with self._tx() as conn:
            metadata.create_all(conn)
            row = conn.execute(
                select(schema_info.c.value).where(schema_info.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(
                    insert(schema_info).values(key="schema_version", value=str(SCHEMA_VERSION))
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema {row[0]} is newer than this Tether knows ({SCHEMA_VERSION})"
                )

    def close(self) -> None:
        self._engine.dispose()

    # identities -------------------------------------------------------------------------
    def ensure_identity(
        self, spiffe_id: str, kind: str, name: str, now_ms: int, by: str | None
    ) -> None:
        """Record that an identity exists; cheap after the first call per identity."""
        if spiffe_id in self._known:
            return
        with self._tx() as conn:
            exists = conn.execute(
                select(identities.c.spiffe_id).where(identities.c.spiffe_id == spiffe_id)
            ).first()
            if exists is None:
                # another process may win the race with the same row
                with contextlib.suppress(IntegrityError):
                    conn.execute(
                        insert(identities).values(
                            spiffe_id=spiffe_id,
                            kind=kind,
                            name=name,
                            created_ms=now_ms,
                            created_by=by,
                        )
                    )
        with self._known_lock:
            self._known.add(spiffe_id)

    def is_known(self, spiffe_id: str) -> bool:
        """Whether this process has already recorded ``spiffe_id`` (no I/O)."""
        return spiffe_id in self._known

    def list_identities(self, kind: str | None = None) -> list[IdentityRecord]:
        q = select(identities).order_by(identities.c.created_ms, identities.c.spiffe_id)
        if kind:
            q = q.where(identities.c.kind == kind)
        with self._tx() as conn:
            return [IdentityRecord(**r._mapping) for r in conn.execute(q)]

    # users ------------------------------------------------------------------------------
    def add_user(self, name: str, credential: str, grants: list[str], now_ms: int) -> None:
        digest = hashlib.sha256(credential.encode()).hexdigest()
        with self._tx() as conn:
            if conn.execute(select(users.c.name).where(users.c.name == name)).first():
                raise BadRequest(f"user {name!r} already exists")
            conn.execute(
                insert(users).values(
                    name=name,
                    credential_sha256=digest,
                    grants=json.dumps(grants),
                    created_ms=now_ms,
                )
            )

    def check_user_credential(self, credential: str) -> UserRecord | None:
        """The user whose local credential this is, or None. Constant-time comparison."""
        digest = hashlib.sha256(credential.encode()).hexdigest()
        with self._tx() as conn:
            rows = conn.execute(select(users)).all()
        found: UserRecord | None = None
        for r in rows:
            if hmac.compare_digest(r.credential_sha256, digest):
                found = UserRecord(r.name, json.loads(r.grants), r.created_ms)
        return found

    def get_user(self, name: str) -> UserRecord | None:
        with self._tx() as conn:
            r = conn.execute(select(users).where(users.c.name == name)).first()
        return None if r is None else UserRecord(r.name, json.loads(r.grants), r.created_ms)

    # revocations ------------------------------------------------------------------------
    def add_revocation(
        self, kind: str, value: str, at_ms: int, reason: str, by: str | None
    ) -> Revocation:
        if kind not in REVOCATION_KINDS:
            raise BadRequest(f"unknown revocation kind {kind!r}")
        with self._tx() as conn:
            res = conn.execute(
                insert(revocations).values(
                    kind=kind, value=value, at_ms=at_ms, reason=reason, revoked_by=by
                )
            )
            key = res.inserted_primary_key
            if key is None:
                raise StoreError("the store did not return the revocation's sequence number")
            seq = int(key[0])
        return Revocation(kind, value, at_ms, reason, seq)

    def revocations_since(self, seq: int) -> list[Revocation]:
        with self._tx() as conn:
            rows = conn.execute(
                select(revocations).where(revocations.c.seq > seq).order_by(revocations.c.seq)
            ).all()
        return [Revocation(r.kind, r.value, r.at_ms, r.reason, r.seq) for r in rows]
