"""Tables and queries for approval requests, their votes and just-in-time grant requests.

One table holds both kinds of request (``action``: an escalated action waiting for a quorum;
``grants``: a just-in-time grant request), one table the votes. They live in the same SQLite
file as the :class:`~tether.store.db.Store` (``<data>/tether.db``) but under their own
``MetaData``, so this module owns its schema.

Every write path runs in one transaction that the desk also records through (the event is made
durable before the commit; if recording fails the transaction rolls back). On SQLite write
transactions start with ``BEGIN IMMEDIATE``: read-then-write never dies on a lock upgrade, and
two processes sharing the file serialise cleanly. State changes are also conditional updates
(``WHERE state = ...``, ``used < uses``), so they stay correct on a server database too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Row

from tether.store.tables import SqlTables

__all__ = [
    "STATES",
    "ApprovalRecord",
    "ApprovalStore",
    "RequestKind",
    "State",
    "Vote",
]

State = Literal["pending", "approved", "denied", "expired", "used"]
RequestKind = Literal["action", "grants"]
STATES: tuple[State, ...] = ("pending", "approved", "denied", "expired", "used")

metadata = MetaData()

requests = Table(
    "approval_requests",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("state", String(10), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("policy_version", String(128), nullable=False),
    Column("requester", String(512), nullable=False),
    Column("chain", Text, nullable=False),  # JSON list of grantor SPIFFE IDs, root first
    Column("task", String(256), nullable=True),
    Column("quorum", String(512), nullable=False),
    Column("summary", Text, nullable=False),  # JSON: the action summary, or the grants
    Column("reasons", Text, nullable=False),  # JSON list
    Column("created_ms", Integer, nullable=False),
    # pending: when the request expires; approved: until when the approval may be used
    Column("deadline_ms", Integer, nullable=False),
    Column("ttl_ms", Integer, nullable=False),  # an approval's (or JIT grant's) lifetime
    Column("decided_ms", Integer, nullable=True),
    Column("decided_reason", Text, nullable=True),
    Column("uses", Integer, nullable=False),
    Column("used", Integer, nullable=False),
    Index("ix_approval_requests_state_deadline", "state", "deadline_ms"),
    Index("ix_approval_requests_digest", "digest", "policy_version", "state"),
    Index("ix_approval_requests_requester", "requester", "kind", "state"),
    # at most one pending request per kind, digest and policy version (across processes)
    Index(
        "ux_approval_requests_pending",
        "kind",
        "digest",
        "policy_version",
        unique=True,
        sqlite_where=text("state = 'pending'"),
        postgresql_where=text("state = 'pending'"),
    ),
)

votes = Table(
    "approval_votes",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("approver", String(512), primary_key=True),
    Column("vote", String(8), nullable=False),  # approve | deny
    Column("groups", Text, nullable=False),  # JSON list: the approver's groups when voting
    Column("uses", Integer, nullable=True),
    Column("comment", Text, nullable=False),
    Column("at_ms", Integer, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Vote:
    approver: str
    vote: str
    groups: tuple[str, ...] = ()
    uses: int | None = None
    comment: str = ""
    at_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "approver": self.approver,
            "vote": self.vote,
            "at_ms": self.at_ms,
        }
        if self.uses is not None:
            out["uses"] = self.uses
        if self.comment:
            out["comment"] = self.comment
        if self.groups:
            out["groups"] = list(self.groups)
        return out


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: str
    kind: RequestKind
    state: State
    digest: str
    policy_version: str
    requester: str
    chain: tuple[str, ...]
    task: str | None
    quorum: str
    summary: dict[str, Any]
    reasons: tuple[str, ...]
    created_ms: int
    deadline_ms: int
    ttl_ms: int
    decided_ms: int | None
    decided_reason: str | None
    uses: int
    used: int
    votes: tuple[Vote, ...] = field(default=())

    @property
    def uses_left(self) -> int:
        return max(0, self.uses - self.used) if self.state == "approved" else 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "requester": self.requester,
            "chain": list(self.chain),
            "task": self.task,
            "quorum": self.quorum,
            "digest": self.digest,
            "policy_version": self.policy_version,
            "summary": self.summary,
            "reasons": list(self.reasons),
            "created_ms": self.created_ms,
            "decided_ms": self.decided_ms,
            "uses": self.uses,
            "used": self.used,
            "votes": [v.to_dict() for v in self.votes],
        }
        if self.state == "pending":
            out["expires_ms"] = self.deadline_ms
        elif self.state == "approved":
            out["valid_until_ms"] = self.deadline_ms
        if self.decided_reason:
            out["decided_reason"] = self.decided_reason
        return out


def _record(row: Row[Any], vote_rows: Sequence[Row[Any]] = ()) -> ApprovalRecord:
    m = row._mapping
    return ApprovalRecord(
        id=m["id"],
        kind=m["kind"],
        state=m["state"],
        digest=m["digest"],
        policy_version=m["policy_version"],
        requester=m["requester"],
        chain=tuple(json.loads(m["chain"])),
        task=m["task"],
        quorum=m["quorum"],
        summary=json.loads(m["summary"]),
        reasons=tuple(json.loads(m["reasons"])),
        created_ms=m["created_ms"],
        deadline_ms=m["deadline_ms"],
        ttl_ms=m["ttl_ms"],
        decided_ms=m["decided_ms"],
        decided_reason=m["decided_reason"],
        uses=m["uses"],
        used=m["used"],
        votes=tuple(
            Vote(
                approver=v.approver,
                vote=v.vote,
                groups=tuple(json.loads(v.groups)),
                uses=v.uses,
                comment=v.comment,
                at_ms=v.at_ms,
            )
            for v in vote_rows
        ),
    )


class ApprovalStore(SqlTables):
    """Approval requests and votes. Safe to share between threads and processes."""

    label = "approval store"

    def __init__(self, url_or_path: str | Path) -> None:
        super().__init__(url_or_path, metadata)

    @staticmethod
    def insert(conn: Connection, rec: ApprovalRecord) -> None:
        conn.execute(
            insert(requests).values(
                id=rec.id,
                kind=rec.kind,
                state=rec.state,
                digest=rec.digest,
                policy_version=rec.policy_version,
                requester=rec.requester,
                chain=json.dumps(list(rec.chain)),
                task=rec.task,
                quorum=rec.quorum,
                summary=json.dumps(rec.summary, sort_keys=True, default=str),
                reasons=json.dumps(list(rec.reasons)),
                created_ms=rec.created_ms,
                deadline_ms=rec.deadline_ms,
                ttl_ms=rec.ttl_ms,
                decided_ms=rec.decided_ms,
                decided_reason=rec.decided_reason,
                uses=rec.uses,
                used=rec.used,
            )
        )

    @staticmethod
    def get(conn: Connection, request_id: str) -> ApprovalRecord | None:
        row = conn.execute(select(requests).where(requests.c.id == request_id)).first()
        if row is None:
            return None
        vote_rows = conn.execute(
            select(votes).where(votes.c.request_id == request_id).order_by(votes.c.at_ms)
        ).all()
        return _record(row, vote_rows)

    @staticmethod
    def state_of(conn: Connection, request_id: str) -> tuple[State, int] | None:
        """(state, deadline_ms) only: the cheap read a waiter polls."""
        row = conn.execute(
            select(requests.c.state, requests.c.deadline_ms).where(requests.c.id == request_id)
        ).first()
        return None if row is None else (row[0], int(row[1]))

    @staticmethod
    def find_pending(
        conn: Connection, kind: RequestKind, digest: str, policy_version: str
    ) -> str | None:
        row = conn.execute(
            select(requests.c.id).where(
                requests.c.kind == kind,
                requests.c.digest == digest,
                requests.c.policy_version == policy_version,
                requests.c.state == "pending",
            )
        ).first()
        return None if row is None else str(row[0])

    @staticmethod
    def find_approved(conn: Connection, kind: RequestKind, digest: str) -> list[ApprovalRecord]:
        """Approved requests of ``kind`` with this digest, oldest deadline first (any version:
        the caller checks version and deadline so it can name what did not match)."""
        rows = conn.execute(
            select(requests)
            .where(
                requests.c.kind == kind,
                requests.c.digest == digest,
                requests.c.state == "approved",
            )
            .order_by(requests.c.deadline_ms, requests.c.id)
        ).all()
        return [_record(r) for r in rows]

    @staticmethod
    def select(
        conn: Connection,
        *,
        state: str | None = None,
        kind: str | None = None,
        requester: str | None = None,
        limit: int = 100,
    ) -> list[ApprovalRecord]:
        q = select(requests).order_by(requests.c.created_ms.desc(), requests.c.id).limit(limit)
        if state:
            q = q.where(requests.c.state == state)
        if kind:
            q = q.where(requests.c.kind == kind)
        if requester:
            q = q.where(requests.c.requester == requester)
        rows = conn.execute(q).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        by_id: dict[str, list[Row[Any]]] = {}
        for v in conn.execute(
            select(votes).where(votes.c.request_id.in_(ids)).order_by(votes.c.at_ms)
        ).all():
            by_id.setdefault(v.request_id, []).append(v)
        return [_record(r, by_id.get(r.id, [])) for r in rows]

    @staticmethod
    def active_grants(conn: Connection, requester: str, now_ms: int) -> list[ApprovalRecord]:
        rows = conn.execute(
            select(requests).where(
                requests.c.kind == "grants",
                requests.c.requester == requester,
                requests.c.state == "approved",
                requests.c.deadline_ms > now_ms,
            )
        ).all()
        return [_record(r) for r in rows]

    @staticmethod
    def due(conn: Connection, now_ms: int, request_id: str | None = None) -> list[ApprovalRecord]:
        """Pending or approved requests whose deadline has passed (they are to expire)."""
        q = select(requests).where(
            or_(requests.c.state == "pending", requests.c.state == "approved"),
            requests.c.deadline_ms <= now_ms,
        )
        if request_id is not None:
            q = q.where(requests.c.id == request_id)
        return [_record(r) for r in conn.execute(q).all()]

    @staticmethod
    def add_vote(conn: Connection, request_id: str, v: Vote) -> None:
        conn.execute(
            insert(votes).values(
                request_id=request_id,
                approver=v.approver,
                vote=v.vote,
                groups=json.dumps(list(v.groups)),
                uses=v.uses,
                comment=v.comment,
                at_ms=v.at_ms,
            )
        )

    @staticmethod
    def transition(
        conn: Connection,
        request_id: str,
        from_state: State,
        to_state: State,
        **values: Any,
    ) -> bool:
        """Move ``request_id`` from ``from_state`` to ``to_state`` (plus column ``values``);
        False when it was not in ``from_state`` any more."""
        res = conn.execute(
            update(requests)
            .where(requests.c.id == request_id, requests.c.state == from_state)
            .values(state=to_state, **values)
        )
        return res.rowcount == 1

    @staticmethod
    def use_one(conn: Connection, request_id: str, now_ms: int) -> int | None:
        """Take one use of an approved, unexpired request; the new ``used`` count, or None
        when no use was left (a single conditional UPDATE: two consumers never share one)."""
        res = conn.execute(
            update(requests)
            .where(
                and_(
                    requests.c.id == request_id,
                    requests.c.state == "approved",
                    requests.c.used < requests.c.uses,
                    requests.c.deadline_ms > now_ms,
                )
            )
            .values(used=requests.c.used + 1)
        )
        if res.rowcount != 1:
            return None
        row = conn.execute(
            select(requests.c.used, requests.c.uses).where(requests.c.id == request_id)
        ).one()
        if row[0] >= row[1]:
            conn.execute(
                update(requests)
                .where(requests.c.id == request_id, requests.c.state == "approved")
                .values(state="used")
            )
        return int(row[0])
