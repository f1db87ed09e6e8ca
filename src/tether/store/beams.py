"""The ``beams`` table: one row per beam, so a restarted server knows what it was running.

The audit log is the record of what happened; this table is the index the API lists and the
supervisor reaps from. It lives in ``<data>/tether.db`` under its own ``MetaData`` (as the
approval tables do). No secret is stored: the token never is; its claims (which carry none)
are, so the supervisor can revoke a leftover beam's identity after a restart.

States: ``starting`` (identity issued, sandbox being started), ``running``, ``ended``. An ended
beam has an ``end_reason``: ``exit``, ``ttl``, ``killed``, ``reaped`` (found alive or missing
after a restart) or ``failed`` (its sandbox never started).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row

from tether.store.tables import SqlTables

__all__ = ["BEAM_STATES", "BeamRecord", "BeamState", "BeamStore"]

BeamState = Literal["starting", "running", "ended"]
BEAM_STATES: tuple[BeamState, ...] = ("starting", "running", "ended")

metadata = MetaData()

beams = Table(
    "beams",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("spiffe_id", String(512), nullable=False),
    Column("state", String(10), nullable=False),
    Column("backend", String(16), nullable=False),
    Column("creator", String(512), nullable=False),
    Column("chain", Text, nullable=False),  # JSON: the beam's grantors, root first
    Column("objective", Text, nullable=False),
    Column("attestation", Text, nullable=False),  # JSON document
    Column("attestation_sha256", String(64), nullable=False),
    Column("attest_index", Integer, nullable=False),
    Column("grants", Text, nullable=False),  # JSON list
    Column("argv", Text, nullable=False),  # JSON list
    Column("limits", Text, nullable=False),  # JSON object
    Column("allow_domains", Text, nullable=False),  # JSON list
    Column("workspace", Text, nullable=False),
    Column("workspace_owned", Boolean, nullable=False),  # we made it, so we may delete it
    Column("keep_workspace", Boolean, nullable=False),
    Column("ttl_s", Float, nullable=False),
    Column("created_ms", Integer, nullable=False),
    Column("expires_ms", Integer, nullable=False),
    Column("started_ms", Integer, nullable=True),
    Column("ended_ms", Integer, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("end_reason", String(16), nullable=True),
    Column("ended_by", String(512), nullable=True),
    Column("token_id", String(64), nullable=False),
    Column("claims", Text, nullable=False),  # JSON: the token's payload (no signature)
    Column("pid", Integer, nullable=True),
    Column("info", Text, nullable=False),  # JSON: what the backend reported
    Index("ix_beams_state", "state"),
    Index("ix_beams_creator", "creator", "created_ms"),
)

_JSON = ("chain", "attestation", "grants", "argv", "limits", "allow_domains", "claims", "info")


@dataclass(frozen=True)
class BeamRecord:
    id: str
    spiffe_id: str
    state: BeamState
    backend: str
    creator: str
    chain: tuple[str, ...]
    objective: str
    attestation: dict[str, Any]
    attestation_sha256: str
    attest_index: int
    grants: tuple[str, ...]
    argv: tuple[str, ...]
    limits: dict[str, Any]
    allow_domains: tuple[str, ...]
    workspace: str
    workspace_owned: bool
    keep_workspace: bool
    ttl_s: float
    created_ms: int
    expires_ms: int
    token_id: str
    claims: dict[str, Any]
    started_ms: int | None = None
    ended_ms: int | None = None
    exit_code: int | None = None
    end_reason: str | None = None
    ended_by: str | None = None
    pid: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> BeamRecord:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("chain", "grants", "argv", "allow_domains"):
            out[k] = list(out[k])
        return out


def _row_values(rec: BeamRecord) -> dict[str, Any]:
    values = asdict(rec)
    for k in _JSON:
        values[k] = json.dumps(values[k], sort_keys=True, default=str)
    return values


def _from_row(row: Row[Any]) -> BeamRecord:
    m = dict(row._mapping)
    for k in _JSON:
        m[k] = json.loads(m[k])
    for k in ("chain", "grants", "argv", "allow_domains"):
        m[k] = tuple(m[k])
    m["workspace_owned"] = bool(m["workspace_owned"])
    m["keep_workspace"] = bool(m["keep_workspace"])
    return BeamRecord(**m)


class BeamStore(SqlTables):
    """Beam records. Safe to share between threads.

    ``synchronous=NORMAL``, not FULL: under WAL a crash of the process loses nothing, and a
    power loss can lose only the last beam rows; the audit log (FULL) stays the record of what
    happened. Keeps the two writes on the create path well under a millisecond."""

    label = "beam store"

    def __init__(self, url_or_path: str | Path) -> None:
        super().__init__(url_or_path, metadata, synchronous="NORMAL")

    def insert(self, rec: BeamRecord) -> None:
        with self.tx() as conn:
            conn.execute(insert(beams).values(**_row_values(rec)))

    def save(self, rec: BeamRecord) -> None:
        """Write every column of ``rec`` over its row."""
        values = _row_values(rec)
        del values["id"]
        with self.tx() as conn:
            conn.execute(update(beams).where(beams.c.id == rec.id).values(**values))

    def get(self, beam_id: str) -> BeamRecord | None:
        with self.read() as conn:
            row = conn.execute(select(beams).where(beams.c.id == beam_id)).first()
        return None if row is None else _from_row(row)

    def select(
        self,
        *,
        states: Sequence[str] = (),
        visible_to: Sequence[str] | None = None,
        limit: int = 200,
    ) -> list[BeamRecord]:
        """Newest first. ``visible_to``: only beams created by one of these identities."""
        q = select(beams).order_by(beams.c.created_ms.desc(), beams.c.id).limit(limit)
        if states:
            q = q.where(beams.c.state.in_(list(states)))
        if visible_to is not None:
            q = q.where(beams.c.creator.in_(list(visible_to)))
        with self.read() as conn:
            return [_from_row(r) for r in conn.execute(q).all()]

    def delete(self, beam_id: str) -> bool:
        with self.tx() as conn:
            return conn.execute(delete(beams).where(beams.c.id == beam_id)).rowcount == 1
