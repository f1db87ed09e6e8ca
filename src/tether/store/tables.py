"""The shared shape of a group of store tables in its own engine.

Each group (approvals, MCP sessions and pins, beams) keeps its own engine over the same SQLite
file or PostgreSQL URL: writes run in ``BEGIN IMMEDIATE`` on SQLite (read-then-write never dies
on a lock upgrade, and two processes serialise exactly), reads in ``BEGIN DEFERRED`` (never
take the write lock), and any SQLAlchemy error surfaces as :class:`StoreError` naming the
group, never as a library exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from tether.errors import StoreError
from tether.store.db import sqlite_or_url_engine

__all__ = ["SqlTables"]


def _pragmas(synchronous: Literal["FULL", "NORMAL"]) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()

    return on_connect


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("tether_begin", "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


class SqlTables:
    """Base of the store's table groups: ``tx()`` to write, ``read()`` to read."""

    label = "store"  # names the group in errors: "approval store: ..."

    def __init__(
        self,
        url_or_path: str | Path,
        metadata: MetaData,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.url, self._engine = sqlite_or_url_engine(url_or_path, _pragmas(synchronous))
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "begin", _sqlite_begin)
        try:
            with self._engine.begin() as conn:
                metadata.create_all(conn)
        except SQLAlchemyError as e:
            raise StoreError(f"{self.label}: {type(e).__name__}") from e

    def __repr__(self) -> str:
        url = self._engine.url.render_as_string(hide_password=True)
        return f"{type(self).__name__}({url!r})"

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); exceptions roll it back."""
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as e:
            msg = e.args[0] if e.args else ""
            raise StoreError(f"{self.label}: {type(e).__name__}: {msg}") from e

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot (``BEGIN DEFERRED``): never takes the write lock."""
        try:
            with self._engine.connect() as conn:
                conn.execution_options(tether_begin="DEFERRED")
                with conn.begin():
                    yield conn
        except SQLAlchemyError as e:
            msg = e.args[0] if e.args else ""
            raise StoreError(f"{self.label}: {type(e).__name__}: {msg}") from e
