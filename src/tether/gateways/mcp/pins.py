"""Tool pinning: what a tool's definition was when it was approved, and what to do when the
server changes it (a "rug pull": a description rewritten to steer the model, a schema widened).

A tool's *definition* is the part a model sees and acts on: ``name``, ``title``,
``description``, ``inputSchema``, ``outputSchema``, ``annotations`` and ``execution``
(``_meta`` and ``icons`` are left out, and are not passed to agents either). Its pin is the
SHA-256 of the RFC 8785 canonical JSON of that definition.

Every time the gateway reads a server's tool list it *observes* it here:

* first sight: ``pin = "auto"`` pins it as approved (trust on first use, recorded as
  ``tool.pinned``); ``pin = "approve"`` records ``tool.new`` and keeps the tool blocked until a
  human approves it;
* same hash as approved: usable;
* different hash: blocked (hidden from ``tools/list``, refused on ``tools/call``) and recorded
  once per new hash as ``tool.changed`` with the changed fields and a unified diff, until
  someone approves the new definition (``tether tools approve SERVER TOOL``);
* a name Tether refuses (see :mod:`.names`), a malformed entry, a tool listed twice: never
  usable, recorded as ``tool.refused``.

Fail closed: a first-sight pin whose record cannot be written is taken back (the tool stays
blocked); a change whose record fails is forgotten so the next sighting records it again.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tether.audit.canonical import canonical_json
from tether.errors import TetherError
from tether.events import Event, Recorder
from tether.gateways.mcp.config import ServerConfig
from tether.gateways.mcp.names import collisions, name_problem, skeleton
from tether.store.mcp import MCPStore, PinRecord

__all__ = [
    "DEFINITION_FIELDS",
    "FIRST_SEEN",
    "Catalog",
    "CatalogTool",
    "PinBook",
    "definition_diff",
    "definition_of",
    "definition_sha256",
]

log = logging.getLogger("tether.gateways.mcp")

DEFINITION_FIELDS = (
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
    "execution",
)
FIRST_SEEN = "tether:first-seen"  # approved_by of a pin taken on first sight (pin = "auto")
MAX_TOOLS = 1000  # tools kept from one server's list
DIFF_IN_DATA = 4096  # characters of the unified diff kept in the event's data


def definition_of(tool: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tool[k] for k in DEFINITION_FIELDS if tool.get(k) is not None}


def definition_sha256(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(definition))).hexdigest()


def _pretty(definition: Mapping[str, Any] | None) -> list[str]:
    if definition is None:
        return []
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def definition_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> tuple[list[str], str]:
    """(the fields that differ, a unified diff of the pretty-printed definitions)."""
    old = old or {}
    fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    diff = "\n".join(
        difflib.unified_diff(_pretty(old), _pretty(new), "approved", "now listed", lineterm="", n=2)
    )
    return fields, diff


@dataclass(frozen=True, slots=True)
class CatalogTool:
    name: str
    definition: dict[str, Any]
    sha256: str
    usable: bool
    state: str  # approved | changed | new | unrecorded
    approved_sha256: str | None = None


@dataclass
class Catalog:
    """One server's tools as last listed, with what Tether thinks of each."""

    tools: dict[str, CatalogTool] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # listed name -> why refused
    fetched: float = 0.0  # loop time of the listing
    stale: bool = False

    def lookalike(self, name: str) -> str | None:
        """A listed tool whose name looks like ``name`` (for the agent's error message)."""
        sk = skeleton(name)
        for other in (*self.tools, *self.refused):
            if other != name and skeleton(other) == sk:
                return other
        return None


class PinBook:
    """Pins for every server, over the shared store, recording through the audit log."""

    def __init__(self, store: MCPStore, audit: Recorder, now_ms: Callable[[], int]) -> None:
        self.store = store
        self.audit = audit
        self.now_ms = now_ms
        self._refusals_seen: set[tuple[str, str, str]] = set()

    async def _record(self, ev: Event) -> bool:
        try:
            await self.audit.arecord(ev)
        except Exception as e:
            log.error("recording %s failed: %s", ev.type, type(e).__name__)
            return False
        return True

    async def observe(
        self, server: ServerConfig, listed: list[Any], via: Mapping[str, Any]
    ) -> Catalog:
        """Judge a freshly listed set of tools (``via``: the session and identity whose
        request made the gateway look, for the records)."""
        cat = Catalog()
        valid: dict[str, dict[str, Any]] = {}
        names: list[str] = []
        for entry in listed[:MAX_TOOLS]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                await self._refuse(
                    server, "?", "the server listed an entry that is not a tool", via
                )
                continue
            name = entry["name"]
            names.append(name)
            problem = name_problem(name)
            if problem is None and name in valid:
                problem = "the server lists this tool twice"
                del valid[name]
            if problem is None and not isinstance(entry.get("inputSchema"), dict):
                problem = "the tool has no inputSchema object"
            if problem is None and not isinstance(entry.get("description", ""), str):
                problem = "the tool's description is not a string"
            if problem is not None:
                cat.refused[name] = problem
                continue
            valid[name] = definition_of(entry)
        for name, others in collisions(names).items():
            shown = ", ".join(repr(o) for o in others[:3])
            cat.refused[name] = (
                f"the server also lists {shown}, which looks the same: look-alike tool names "
                "are refused (the server is lying or confused)"
            )
            valid.pop(name, None)
        for name, why in cat.refused.items():
            await self._refuse(server, name, why, via)
        pins = await asyncio.to_thread(self.store.pins_of, server.name) if valid else {}
        for name, definition in valid.items():
            try:
                sha = definition_sha256(definition)
            except TetherError:  # NaN, an integer beyond 2**53 ...: no stable hash, no pin
                why = "the tool's definition cannot be canonical JSON (RFC 8785)"
                cat.refused[name] = why
                await self._refuse(server, name, why, via)
                continue
            cat.tools[name] = await self._judge(server, name, definition, sha, pins.get(name), via)
        return cat

    async def _judge(
        self,
        server: ServerConfig,
        name: str,
        definition: dict[str, Any],
        sha: str,
        pin: PinRecord | None,
        via: Mapping[str, Any],
    ) -> CatalogTool:
        if pin is None:
            return await self._first_sight(server, name, definition, sha, via)
        if pin.approved_sha256 == sha:
            return CatalogTool(name, definition, sha, True, "approved", sha)
        state = "new" if pin.approved_sha256 is None else "changed"
        if pin.pending_sha256 != sha:
            await self._changed(server, name, definition, sha, pin, via)
        return CatalogTool(name, definition, sha, False, state, pin.approved_sha256)

    async def _first_sight(
        self,
        server: ServerConfig,
        name: str,
        definition: dict[str, Any],
        sha: str,
        via: Mapping[str, Any],
    ) -> CatalogTool:
        auto = server.pin == "auto"
        inserted = await asyncio.to_thread(
            self.store.add_pin,
            server.name,
            name,
            sha,
            definition,
            self.now_ms(),
            approved_by=FIRST_SEEN if auto else None,
        )
        if not inserted:  # another process pinned it first: judge against its pin
            pin = await asyncio.to_thread(self.store.get_pin, server.name, name)
            if pin is None:
                return CatalogTool(name, definition, sha, False, "unrecorded")
            return await self._judge(server, name, definition, sha, pin, via)
        ok = await self._record(
            Event(
                type="tool.pinned" if auto else "tool.new",
                subject=f"{server.name}.{name}",
                data={
                    "server": server.name,
                    "tool": name,
                    "sha256": sha,
                    "pin": server.pin,
                    "note": "trusted on first sight"
                    if auto
                    else "blocked until approved (tether tools approve)",
                    "observed_via": dict(via),
                },
                bodies={"definition": canonical_json(definition)},
            )
        )
        if not ok:
            await asyncio.to_thread(self.store.drop_pin, server.name, name, sha)
            return CatalogTool(name, definition, sha, False, "unrecorded")
        if auto:
            return CatalogTool(name, definition, sha, True, "approved", sha)
        return CatalogTool(name, definition, sha, False, "new")

    async def _changed(
        self,
        server: ServerConfig,
        name: str,
        definition: dict[str, Any],
        sha: str,
        pin: PinRecord,
        via: Mapping[str, Any],
    ) -> None:
        claimed = await asyncio.to_thread(
            self.store.mark_changed, server.name, name, sha, definition, self.now_ms()
        )
        if not claimed:
            return  # another process recorded this very change
        fields, diff = definition_diff(pin.approved_definition, definition)
        ok = await self._record(
            Event(
                type="tool.changed",
                subject=f"{server.name}.{name}",
                decision="deny",
                data={
                    "server": server.name,
                    "tool": name,
                    "approved_sha256": pin.approved_sha256,
                    "sha256": sha,
                    "fields": fields,
                    "diff": diff[:DIFF_IN_DATA],
                    "diff_truncated": len(diff) > DIFF_IN_DATA,
                    "note": f"blocked until re-approved: tether tools approve {server.name} {name}",
                    "observed_via": dict(via),
                },
                bodies={"definition": canonical_json(definition), "diff": diff.encode()},
            )
        )
        if not ok:
            await asyncio.to_thread(self.store.unmark_changed, server.name, name, sha)

    async def _refuse(
        self, server: ServerConfig, name: str, why: str, via: Mapping[str, Any]
    ) -> None:
        key = (server.name, name, why)
        if key in self._refusals_seen:
            return
        ok = await self._record(
            Event(
                type="tool.refused",
                subject=f"{server.name}.{name[:200]}",
                decision="deny",
                data={
                    "server": server.name,
                    "tool": name[:200],
                    "reason": why,
                    "observed_via": dict(via),
                },
            )
        )
        if ok:
            self._refusals_seen.add(key)
            if len(self._refusals_seen) > 10_000:
                self._refusals_seen.clear()

    async def recheck(self, server: ServerConfig, tool: CatalogTool) -> CatalogTool:
        """A blocked tool may have been approved since the list was read: look again."""
        pin = await asyncio.to_thread(self.store.get_pin, server.name, tool.name)
        if pin is not None and pin.approved_sha256 == tool.sha256:
            return CatalogTool(
                tool.name, tool.definition, tool.sha256, True, "approved", tool.sha256
            )
        return tool
