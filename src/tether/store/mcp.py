"""Tables for the MCP gateway: agent sessions, and tool pins (approved tool definitions).

They live in the store's SQLite file (``<data>/tether.db``) under their own ``MetaData``, so
this module owns its schema, and every gateway process on the data directory shares them:

* ``mcp_sessions``: an agent's MCP session (``Mcp-Session-Id``) with the identity that opened
  it, the server, the negotiated protocol version, the client's self-description and the
  upstream's own session id. Any process can continue a session another one opened.
* ``mcp_tool_pins``: per (server, tool), the SHA-256 of the definition a human (or the first
  sighting, in ``pin = "auto"``) approved, and the latest *different* definition seen, which
  waits for re-approval. A tool whose current definition is not the approved one is blocked.

Writes run in ``BEGIN IMMEDIATE`` transactions on SQLite and use conditional updates, so two
processes that see the same change claim it once. Every call here blocks: async callers run
them in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from tether.errors import NotFound, StoreError, TetherError
from tether.store.tables import SqlTables

__all__ = ["MCPStore", "PinConflict", "PinRecord", "SessionRecord"]

metadata = MetaData()

sessions = Table(
    "mcp_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("server", String(64), nullable=False),
    Column("subject", String(512), nullable=False),
    Column("token_id", String(128), nullable=False),
    Column("task", String(256), nullable=True),
    Column("protocol_version", String(32), nullable=False),
    Column("client_info", Text, nullable=False),  # JSON object
    Column("upstream_session", String(256), nullable=True),
    Column("created_ms", Integer, nullable=False),
    Column("expires_ms", Integer, nullable=False),
    Column("ended_ms", Integer, nullable=True),
    Index("ix_mcp_sessions_expires", "expires_ms"),
)

pins = Table(
    "mcp_tool_pins",
    metadata,
    Column("server", String(64), primary_key=True),
    Column("tool", String(256), primary_key=True),
    Column("approved_sha256", String(64), nullable=True),
    Column("approved_definition", Text, nullable=True),
    Column("approved_by", String(512), nullable=True),
    Column("approved_ms", Integer, nullable=True),
    Column("pending_sha256", String(64), nullable=True),
    Column("pending_definition", Text, nullable=True),
    Column("pending_ms", Integer, nullable=True),
    Column("first_seen_ms", Integer, nullable=False),
)


class PinConflict(TetherError):
    """The pin is not in the state the caller expected (nothing to approve, another hash)."""

    code = "conflict"
    status = 409


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    server: str
    subject: str
    token_id: str
    task: str | None
    protocol_version: str
    client_info: dict[str, Any]
    upstream_session: str | None
    created_ms: int
    expires_ms: int
    ended_ms: int | None = None

    def live(self, now_ms: int) -> bool:
        return self.ended_ms is None and now_ms < self.expires_ms


@dataclass(frozen=True, slots=True)
class PinRecord:
    server: str
    tool: str
    approved_sha256: str | None
    approved_definition: dict[str, Any] | None
    approved_by: str | None
    approved_ms: int | None
    pending_sha256: str | None
    pending_definition: dict[str, Any] | None
    pending_ms: int | None
    first_seen_ms: int

    @property
    def state(self) -> str:
        """``approved``; ``changed`` (approved once, now differs: blocked); ``new`` (never
        approved: blocked)."""
        if self.approved_sha256 is None:
            return "new"
        return "changed" if self.pending_sha256 is not None else "approved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "tool": self.tool,
            "state": self.state,
            "approved_sha256": self.approved_sha256,
            "approved_by": self.approved_by,
            "approved_ms": self.approved_ms,
            "pending_sha256": self.pending_sha256,
            "pending_ms": self.pending_ms,
            "first_seen_ms": self.first_seen_ms,
            "approved_definition": self.approved_definition,
            "pending_definition": self.pending_definition,
        }


def _json(text: str | None) -> dict[str, Any] | None:
    return None if text is None else dict(json.loads(text))


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _session(row: Row[Any]) -> SessionRecord:
    m = row._mapping
    return SessionRecord(
        id=m["id"],
        server=m["server"],
        subject=m["subject"],
        token_id=m["token_id"],
        task=m["task"],
        protocol_version=m["protocol_version"],
        client_info=json.loads(m["client_info"]),
        upstream_session=m["upstream_session"],
        created_ms=int(m["created_ms"]),
        expires_ms=int(m["expires_ms"]),
        ended_ms=None if m["ended_ms"] is None else int(m["ended_ms"]),
    )


def _pin(row: Row[Any]) -> PinRecord:
    m = row._mapping
    return PinRecord(
        server=m["server"],
        tool=m["tool"],
        approved_sha256=m["approved_sha256"],
        approved_definition=_json(m["approved_definition"]),
        approved_by=m["approved_by"],
        approved_ms=m["approved_ms"],
        pending_sha256=m["pending_sha256"],
        pending_definition=_json(m["pending_definition"]),
        pending_ms=m["pending_ms"],
        first_seen_ms=int(m["first_seen_ms"]),
    )


class MCPStore(SqlTables):
    """MCP sessions and tool pins. Safe to share between threads and processes."""

    label = "mcp store"

    def __init__(self, url_or_path: str | Path) -> None:
        super().__init__(url_or_path, metadata)

    # -- sessions ---------------------------------------------------------------------------

    def create_session(self, rec: SessionRecord, now_ms: int) -> None:
        """Insert ``rec``; drop sessions that expired before ``now_ms`` (ended ones stay
        until then, so every process keeps refusing them)."""
        with self.tx() as conn:
            conn.execute(delete(sessions).where(sessions.c.expires_ms <= now_ms))
            conn.execute(
                insert(sessions).values(
                    id=rec.id,
                    server=rec.server,
                    subject=rec.subject,
                    token_id=rec.token_id,
                    task=rec.task,
                    protocol_version=rec.protocol_version,
                    client_info=_dumps(rec.client_info),
                    upstream_session=rec.upstream_session,
                    created_ms=rec.created_ms,
                    expires_ms=rec.expires_ms,
                    ended_ms=rec.ended_ms,
                )
            )

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self.read() as conn:
            row = conn.execute(select(sessions).where(sessions.c.id == session_id)).first()
        return None if row is None else _session(row)

    def set_upstream_session(self, session_id: str, old: str | None, new: str | None) -> str | None:
        """Replace the upstream session id ``old`` by ``new``; returns the value now stored
        (``new``, or what another process stored first)."""
        with self.tx() as conn:
            cond = (
                sessions.c.upstream_session.is_(None)
                if old is None
                else sessions.c.upstream_session == old
            )
            res = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, cond)
                .values(upstream_session=new)
            )
            if res.rowcount == 1:
                return new
            row = conn.execute(
                select(sessions.c.upstream_session).where(sessions.c.id == session_id)
            ).first()
        return None if row is None else row[0]

    def end_session(self, session_id: str, now_ms: int) -> bool:
        with self.tx() as conn:
            res = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.ended_ms.is_(None))
                .values(ended_ms=now_ms)
            )
        return res.rowcount == 1

    # -- pins -------------------------------------------------------------------------------

    def pins_of(self, server: str) -> dict[str, PinRecord]:
        with self.read() as conn:
            rows = conn.execute(select(pins).where(pins.c.server == server)).all()
        return {r.tool: _pin(r) for r in rows}

    def get_pin(self, server: str, tool: str) -> PinRecord | None:
        with self.read() as conn:
            row = conn.execute(
                select(pins).where(pins.c.server == server, pins.c.tool == tool)
            ).first()
        return None if row is None else _pin(row)

    def list_pins(self, server: str | None = None) -> list[PinRecord]:
        q = select(pins).order_by(pins.c.server, pins.c.tool)
        if server is not None:
            q = q.where(pins.c.server == server)
        with self.read() as conn:
            return [_pin(r) for r in conn.execute(q).all()]

    def add_pin(
        self,
        server: str,
        tool: str,
        sha256: str,
        definition: dict[str, Any],
        now_ms: int,
        *,
        approved_by: str | None,
    ) -> bool:
        """First sighting of a tool: pinned as approved (``approved_by`` set) or as pending.
        False when a row exists already (another process saw it first)."""
        values: dict[str, Any] = {"server": server, "tool": tool, "first_seen_ms": now_ms}
        if approved_by is not None:
            values.update(
                approved_sha256=sha256,
                approved_definition=_dumps(definition),
                approved_by=approved_by,
                approved_ms=now_ms,
            )
        else:
            values.update(
                pending_sha256=sha256, pending_definition=_dumps(definition), pending_ms=now_ms
            )
        try:
            with self.tx() as conn:
                conn.execute(insert(pins).values(**values))
        except StoreError as e:
            if isinstance(e.__cause__, IntegrityError):
                return False
            raise
        return True

    def drop_pin(self, server: str, tool: str, sha256: str) -> None:
        """Undo :meth:`add_pin` (its record failed): only a row still holding ``sha256``."""
        with self.tx() as conn:
            conn.execute(
                delete(pins).where(
                    pins.c.server == server,
                    pins.c.tool == tool,
                    or_(pins.c.approved_sha256 == sha256, pins.c.pending_sha256 == sha256),
                )
            )

    def mark_changed(
        self, server: str, tool: str, sha256: str, definition: dict[str, Any], now_ms: int
    ) -> bool:
        """Remember a definition that differs from the approved one. True only for the first
        caller to report this hash (so one process records the change)."""
        with self.tx() as conn:
            res = conn.execute(
                update(pins)
                .where(
                    pins.c.server == server,
                    pins.c.tool == tool,
                    or_(pins.c.approved_sha256.is_(None), pins.c.approved_sha256 != sha256),
                    or_(pins.c.pending_sha256.is_(None), pins.c.pending_sha256 != sha256),
                )
                .values(
                    pending_sha256=sha256,
                    pending_definition=_dumps(definition),
                    pending_ms=now_ms,
                )
            )
        return res.rowcount == 1

    def unmark_changed(self, server: str, tool: str, sha256: str) -> None:
        """Undo :meth:`mark_changed` (its record failed), so the next sighting retries."""
        with self.tx() as conn:
            conn.execute(
                update(pins)
                .where(
                    pins.c.server == server,
                    pins.c.tool == tool,
                    pins.c.pending_sha256 == sha256,
                    pins.c.approved_sha256.is_not(None),
                )
                .values(pending_sha256=None, pending_definition=None, pending_ms=None)
            )

    def approve(
        self,
        server: str,
        tool: str,
        approver: str,
        now_ms: int,
        record: Callable[[PinRecord], None],
        sha256: str | None = None,
    ) -> PinRecord:
        """Approve the pending definition of ``server``/``tool`` (only ``sha256``, when
        given). ``record`` runs inside the transaction, before the commit: if it raises,
        nothing changes (fail closed)."""
        with self.tx() as conn:
            row = conn.execute(
                select(pins).where(pins.c.server == server, pins.c.tool == tool)
            ).first()
            if row is None:
                raise NotFound(f"no tool {tool!r} seen on MCP server {server!r}")
            rec = _pin(row)
            if rec.pending_sha256 is None:
                raise PinConflict(
                    f"{server}.{tool} has nothing waiting for approval (approved "
                    f"sha256:{(rec.approved_sha256 or '')[:16]})"
                )
            if sha256 is not None and not rec.pending_sha256.startswith(sha256.lower()):
                raise PinConflict(
                    f"{server}.{tool} now waits with sha256:{rec.pending_sha256[:16]}, not "
                    f"{sha256[:16]}: the definition changed again; look at it before approving"
                )
            record(rec)
            conn.execute(
                update(pins)
                .where(
                    pins.c.server == server,
                    pins.c.tool == tool,
                    pins.c.pending_sha256 == rec.pending_sha256,
                )
                .values(
                    approved_sha256=rec.pending_sha256,
                    approved_definition=row._mapping["pending_definition"],
                    approved_by=approver,
                    approved_ms=now_ms,
                    pending_sha256=None,
                    pending_definition=None,
                    pending_ms=None,
                )
            )
            new = conn.execute(
                select(pins).where(pins.c.server == server, pins.c.tool == tool)
            ).one()
        return _pin(new)
