"""The one recording interface every part writes through.

Issuance, refusal, revocation, every decision and every forwarded call becomes an
:class:`Event` handed to a :class:`Recorder`. ``record`` returns only once the event is
durable; if it cannot be made durable it raises :class:`~tether.errors.RecordFailed` and the
caller must refuse the action it describes (fail closed). The audit log backs this interface;
:class:`MemoryRecorder` is the in-memory twin for unit tests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tether.errors import RecordFailed

__all__ = ["Event", "MemoryRecorder", "Receipt", "Recorder"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, in the shape the audit log stores.

    ``type``     dotted event type: ``identity.issued``, ``identity.refused``, ``llm.invoke`` ...
    ``actor``    SPIFFE ID of whoever acted (the verified caller), if known
    ``subject``  SPIFFE ID the event is about (the agent a token was issued to), if any
    ``session``  task / session id, for session timelines
    ``decision`` ``allow`` / ``deny`` / ``escalate`` / ``error`` when the event is a decision
    ``data``     JSON-compatible details; must hold no secret (the log redacts known ones too)
    ``bodies``   large payloads (prompts, responses, tool results) stored content-addressed;
                 the leaf carries their SHA-256, so a body cannot change unnoticed
    """

    type: str
    actor: str | None = None
    subject: str | None = None
    session: str | None = None
    decision: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    bodies: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof of acknowledgement: the entry's index in the log and its RFC 9162 leaf hash."""

    index: int
    leaf_hash: bytes


class Recorder(Protocol):
    def record(self, event: Event) -> Receipt:
        """Make ``event`` durable, or raise :class:`RecordFailed`."""
        ...

    async def arecord(self, event: Event) -> Receipt:
        """The same, for async callers; never blocks the event loop."""
        ...


def submit(recorder: Recorder, event: Event, *, lazy: bool = False) -> asyncio.Future[Any]:
    """Start making ``event`` durable from the running loop; the future settles when it is
    (or fails with RecordFailed). The audit log's own ``submit`` gives a plain future (no
    task) and honours ``lazy`` (a record nobody waits on shares the next commit); any other
    recorder is awaited in a task."""
    start = getattr(recorder, "submit", None)
    if start is not None:
        fut: asyncio.Future[Any] = start(event, lazy=lazy)
        return fut
    return asyncio.ensure_future(recorder.arecord(event))


class MemoryRecorder:
    """In-memory recorder for unit tests. ``fail`` makes every record raise (fail-closed tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail = False
        self._lock = threading.Lock()

    def record(self, event: Event) -> Receipt:
        if self.fail:
            raise RecordFailed("audit log unavailable (test)")
        with self._lock:
            self.events.append(event)
            return Receipt(index=len(self.events) - 1, leaf_hash=b"")

    async def arecord(self, event: Event) -> Receipt:
        await asyncio.sleep(0)
        return self.record(event)

    def of_type(self, type_: str) -> list[Event]:
        return [e for e in self.events if e.type == type_]
