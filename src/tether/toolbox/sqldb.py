"""The database behind the SQL tool server: SQLite by path, PostgreSQL by URL (SQLAlchemy).

Reads go through a connection the *database* keeps read-only, so no parsing of SQL decides
what is a write:

* SQLite: the file opened with ``mode=ro`` (a URI filename), ``PRAGMA query_only = ON``, and an
  authorizer that refuses ``ATTACH``/``DETACH`` (which could create or write another file) and
  any ``PRAGMA`` that sets a value (``PRAGMA query_only = OFF`` included). A progress handler
  aborts a read that runs past its time limit.
* PostgreSQL: every read runs in a ``READ ONLY`` transaction (SQLAlchemy's
  ``postgresql_readonly``) with ``statement_timeout`` set for it.

Writes use a second, ordinary engine, one transaction per call. Identifiers in the write tools
(tables, columns, index names) are checked against the live schema and quoted by the dialect;
values are always bound parameters.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

__all__ = [
    "DEFAULT_MAX_ROWS",
    "DEFAULT_QUERY_TIMEOUT",
    "Database",
    "DatabaseError",
]

DEFAULT_MAX_ROWS = 500
DEFAULT_QUERY_TIMEOUT = 10.0
MAX_INSERT_ROWS = 1000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class DatabaseError(Exception):
    """A refusal or failure to report to the caller as a tool error (never a crash)."""


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(v)).decode()}
    return str(v)


_SQLITE_DENY = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
# Pragmas that take an argument yet only read (the schema reflection uses them).
_READ_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "database_list",
        "collation_list",
        "function_list",
        "pragma_list",
    }
)


def _read_only_authorizer(
    action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
) -> int:
    if action in _SQLITE_DENY:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
        # an argument sets a value (PRAGMA query_only = OFF), except for the reading pragmas
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in _READ_PRAGMAS else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class Database:
    """Both engines for one database. ``target`` is a filesystem path (SQLite) or a URL."""

    def __init__(
        self,
        target: str | Path,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.max_rows = max_rows
        self.query_timeout = query_timeout
        self.kind = ""
        self.where = ""
        self.writer: Engine
        self.reader: Engine
        text = str(target)
        self._deadline = threading.local()
        if "://" in text:
            url = make_url(text)
            if url.get_backend_name() == "sqlite":
                self._open_sqlite(Path(url.database or ""))
            elif url.get_backend_name() == "postgresql":
                self.kind = "postgresql"
                self.where = url.render_as_string(hide_password=True)
                self.writer = sa.create_engine(url, pool_pre_ping=True)
                self.reader = self.writer.execution_options(postgresql_readonly=True)
            else:
                raise DatabaseError("only SQLite (a path) and PostgreSQL (a URL) are supported")
        else:
            self._open_sqlite(Path(text))

    def __repr__(self) -> str:
        return f"Database({self.kind}, {self.where!r})"

    # -- engines ------------------------------------------------------------------------------

    def _open_sqlite(self, path: Path) -> None:
        self.kind = "sqlite"
        path = path.expanduser().resolve()
        self.where = str(path)
        if not path.parent.is_dir():
            raise DatabaseError(f"no directory {path.parent}")

        def writer() -> sqlite3.Connection:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA busy_timeout = 10000")
            return conn

        def reader() -> sqlite3.Connection:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10
            )
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.set_authorizer(_read_only_authorizer)
            conn.set_progress_handler(self._over_time, 5000)
            return conn

        self.writer = sa.create_engine("sqlite://", creator=writer)
        with self.writer.connect():  # creates the file, and the WAL, before a reader opens it
            pass
        self.reader = sa.create_engine("sqlite://", creator=reader)

    def _over_time(self) -> int:
        deadline = getattr(self._deadline, "at", None)
        return 1 if deadline is not None and time.monotonic() > deadline else 0

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.reader.connect() as conn:
            if self.kind == "postgresql":
                conn.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {int(self.query_timeout * 1000)}"
                )
            self._deadline.at = time.monotonic() + self.query_timeout
            try:
                yield conn
            finally:
                self._deadline.at = None
                conn.rollback()

    def close(self) -> None:
        self.reader.dispose()
        self.writer.dispose()

    # -- reads ------------------------------------------------------------------------------------

    def list_tables(self) -> list[dict[str, Any]]:
        try:
            with self._read() as conn:
                insp = sa.inspect(conn)
                out = []
                for name in sorted(insp.get_table_names()):
                    q = sa.select(sa.func.count()).select_from(sa.table(name))
                    out.append({"name": name, "rows": int(conn.execute(q).scalar_one())})
                return out
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None

    def describe_table(self, table: str) -> dict[str, Any]:
        try:
            with self._read() as conn:
                insp = sa.inspect(conn)
                if table not in insp.get_table_names():
                    raise DatabaseError(f"no table named {table[:100]!r}")
                pk = set(insp.get_pk_constraint(table).get("constrained_columns") or ())
                columns = [
                    {
                        "name": c["name"],
                        "type": str(c["type"]),
                        "nullable": bool(c.get("nullable", True)),
                        "primary_key": c["name"] in pk,
                    }
                    for c in insp.get_columns(table)
                ]
                indexes = [
                    {
                        "name": i["name"],
                        "columns": [c for c in i["column_names"] if c],
                        "unique": bool(i.get("unique")),
                    }
                    for i in insp.get_indexes(table)
                ]
                fks = [
                    {
                        "columns": f["constrained_columns"],
                        "references": f"{f['referred_table']}({', '.join(f['referred_columns'])})",
                    }
                    for f in insp.get_foreign_keys(table)
                ]
                q = sa.select(sa.func.count()).select_from(sa.table(table))
                rows = int(conn.execute(q).scalar_one())
                return {
                    "table": table,
                    "columns": columns,
                    "indexes": indexes,
                    "foreign_keys": fks,
                    "rows": rows,
                }
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None

    def query(
        self, sql: str, params: Mapping[str, Any] | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """Run one statement on the read-only connection; the database refuses any write."""
        cap = min(limit or self.max_rows, self.max_rows)
        try:
            with self._read() as conn:
                result = (
                    conn.execute(sa.text(sql), dict(params))
                    if params
                    else conn.exec_driver_sql(sql)
                )
                if not result.returns_rows:
                    return {"columns": [], "rows": [], "row_count": 0, "truncated": False}
                columns = list(result.keys())
                fetched = result.fetchmany(cap + 1)
                rows = [
                    {c: _jsonable(v) for c, v in zip(columns, r, strict=True)}
                    for r in fetched[:cap]
                ]
                return {
                    "columns": columns,
                    "rows": rows,
                    "row_count": len(rows),
                    "truncated": len(fetched) > cap,
                }
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None

    # -- writes -----------------------------------------------------------------------------------

    def _table(self, conn: Connection, table: str) -> sa.Table:
        if table not in sa.inspect(conn).get_table_names():
            raise DatabaseError(f"no table named {table[:100]!r}")
        return sa.Table(table, sa.MetaData(), autoload_with=conn)

    def create_index(
        self, table: str, columns: Sequence[str], unique: bool = False, name: str | None = None
    ) -> dict[str, Any]:
        if not columns:
            raise DatabaseError("name at least one column")
        try:
            with self.writer.begin() as conn:
                t = self._table(conn, table)
                missing = [c for c in columns if c not in t.c]
                if missing:
                    raise DatabaseError(f"table {table!r} has no column {missing[0][:100]!r}")
                name = name or f"ix_{table}_{'_'.join(columns)}"[:63]
                if not _IDENT.match(name):
                    raise DatabaseError(
                        f"invalid index name {name[:100]!r}: letters, digits and _ (max 63)"
                    )
                existing = {i["name"] for i in sa.inspect(conn).get_indexes(table)}
                if name in existing:
                    return {"index": name, "table": table, "created": False}
                sa.Index(name, *(t.c[c] for c in columns), unique=unique).create(conn)
                return {"index": name, "table": table, "columns": list(columns), "created": True}
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None

    def insert_rows(self, table: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise DatabaseError("no rows to insert")
        if len(rows) > MAX_INSERT_ROWS:
            raise DatabaseError(f"at most {MAX_INSERT_ROWS} rows per call")
        try:
            with self.writer.begin() as conn:
                t = self._table(conn, table)
                for r in rows:
                    unknown = [k for k in r if k not in t.c]
                    if unknown:
                        raise DatabaseError(f"table {table!r} has no column {unknown[0][:100]!r}")
                conn.execute(t.insert(), [dict(r) for r in rows])
                return {"table": table, "inserted": len(rows)}
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None

    def execute_write(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        try:
            with self.writer.begin() as conn:
                raw = conn.connection.driver_connection if self.kind == "sqlite" else None
                before = raw.total_changes if raw is not None else 0
                result = (
                    conn.execute(sa.text(sql), dict(params))
                    if params
                    else conn.exec_driver_sql(sql)
                )
                # sqlite3's rowcount is -1 for a statement it does not recognise as DML
                # (WITH ... INSERT); the connection's change counter is exact.
                count = raw.total_changes - before if raw is not None else result.rowcount
                return {"rowcount": max(count, 0)}
        except SQLAlchemyError as e:
            raise DatabaseError(_message(e)) from None


def _message(e: SQLAlchemyError) -> str:
    """The driver's own words (``attempt to write a readonly database``), without SQLAlchemy's
    appended statement dump and documentation link."""
    orig = getattr(e, "orig", None)
    text = str(orig) if orig is not None else str(e).split("\n", 1)[0]
    if "interrupted" in text:
        text += " (the query ran past its time limit)"
    return f"the database refused: {text[:500]}"
