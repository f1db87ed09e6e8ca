"""Agent sessions (``Mcp-Session-Id``), kept in the store and cached per process.

A session is created by ``initialize`` in whichever gateway process received it and lives in
the shared store, so the agent's next request may land on any process. Each process keeps a
copy for ``session_recheck`` seconds before reading the row again: a session ended (``DELETE``)
through one process is refused by the others within that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from tether.store.mcp import MCPStore, SessionRecord

__all__ = ["MAX_CACHED", "Sessions"]

MAX_CACHED = 100_000


class Sessions:
    def __init__(
        self,
        store: MCPStore,
        *,
        recheck: float,
        now_ms: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.recheck = recheck
        self.now_ms = now_ms
        self.monotonic = monotonic
        self._cache: dict[str, tuple[SessionRecord, float]] = {}

    def _keep(self, rec: SessionRecord) -> None:
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[rec.id] = (rec, self.monotonic())

    async def create(self, rec: SessionRecord) -> None:
        await asyncio.to_thread(self.store.create_session, rec, self.now_ms())
        self._keep(rec)

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live session, or ``None`` (unknown, ended or expired)."""
        hit = self._cache.get(session_id)
        if hit is not None and self.monotonic() - hit[1] < self.recheck:
            rec: SessionRecord | None = hit[0]
        else:
            rec = await asyncio.to_thread(self.store.get_session, session_id)
            if rec is None:
                self._cache.pop(session_id, None)
                return None
            self._keep(rec)
        if rec is None or not rec.live(self.now_ms()):
            return None
        return rec

    async def fresh(self, session_id: str) -> SessionRecord | None:
        """The stored row, bypassing the cache."""
        rec = await asyncio.to_thread(self.store.get_session, session_id)
        if rec is not None:
            self._keep(rec)
        return rec

    async def set_upstream(self, rec: SessionRecord, old: str | None, new: str) -> str | None:
        stored = await asyncio.to_thread(self.store.set_upstream_session, rec.id, old, new)
        self._keep(dataclasses.replace(rec, upstream_session=stored))
        return stored

    async def end(self, rec: SessionRecord) -> bool:
        ended = await asyncio.to_thread(self.store.end_session, rec.id, self.now_ms())
        self._cache.pop(rec.id, None)
        return ended

    def forget(self, session_id: str) -> Any:
        return self._cache.pop(session_id, None)
