"""``/v1/beams``: create, list, inspect, follow, exec into, kill and remove beams.

The app must hold the supervisor on its state (``tether serve`` does)::

    app.state.beams = BeamSupervisor(services, bridge_app=the_whole_server_app)

Every route needs a verified token. A beam is visible to its creator, to every identity above
the creator in its delegation chain, and to the admin; everyone else gets 404 as if it did not
exist. Creation is a ``beam.create`` Action: a deny or an escalation is recorded and answered
403. Errors are the app's JSON shape ``{"error": CODE, "error_description": TEXT}``.

Output (``/logs``, ``/exec``) streams as NDJSON, one frame per line, as it is produced::

    {"t": 1800000000123, "s": "out", "b64": "aGVsbG8K"}      (stdout; "err" for stderr)
    {"end": {"reason": "exit", "exit_code": 0}}              always the last line

``/logs?format=raw`` gives the bare bytes of stdout and stderr instead (for curl).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from tether.identity.claims import TokenClaims
from tether.runtime.beams import BackendUnavailable, parse_beam_request
from tether.runtime.supervisor import BeamSupervisor
from tether.server.deps import authenticated
from tether.store.beams import BeamRecord

__all__ = ["beam_view", "beams_router", "get_supervisor"]

NDJSON = "application/x-ndjson"


def get_supervisor(request: Request) -> BeamSupervisor:
    sup: BeamSupervisor | None = getattr(request.app.state, "beams", None)
    if sup is None:
        raise BackendUnavailable("beams are not enabled on this server (run 'tether serve')")
    return sup


Caller = Annotated[TokenClaims, Depends(authenticated)]
Sup = Annotated[BeamSupervisor, Depends(get_supervisor)]


class BeamBody(BaseModel):
    """A beam request. Sizes and durations are strings (``"2G"``, ``"15m"``) or numbers."""

    model_config = {"extra": "forbid"}
    objective: str = Field(description="what the beam is for (attested, digest in its token)")
    argv: list[str] = Field(description="the command and its arguments")
    grants: list[str] = Field(default_factory=list, description="KIND:PATTERN, within yours")
    ttl: str | float = Field(default="15m", description="lifetime; killed at expiry")
    workspace: str | None = Field(default=None, description="host dir (users only)")
    keep_workspace: bool = False
    memory: str | int | None = Field(default=None, description="e.g. 2G")
    cpus: float | str | None = None
    pids: int | str | None = None
    allow_domains: list[str] = Field(default_factory=list, description="egress allowed")
    backend: str | None = Field(default=None, description="bwrap (default) or runsc")
    tools: list[dict[str, Any]] = Field(default_factory=list, description="tool definitions")


class ExecBody(BaseModel):
    model_config = {"extra": "forbid"}
    argv: list[str] = Field(min_length=1)


def beam_view(rec: BeamRecord, entry: bytes | None = None) -> dict[str, Any]:
    """The JSON a client sees (no secret: the token itself is never stored)."""
    out = rec.to_dict()
    claims = out.pop("claims")
    ext = claims.get("tether", {})
    out["token"] = {
        "token_id": rec.token_id,
        "expires_at": claims.get("exp"),
        "objective_sha256": ext.get("objective_sha256"),
    }
    out["attestation"] = {
        "document": out.pop("attestation"),
        "sha256": out.pop("attestation_sha256"),
        "index": out.pop("attest_index"),
    }
    if entry is not None:
        out["attestation"]["entry"] = entry.decode()
    return out


def _frame(stream: str, data: bytes) -> bytes:
    return orjson.dumps({"s": stream, "b64": base64.b64encode(data).decode()}) + b"\n"


async def _raw(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in frames:
        for line in chunk.splitlines():
            doc = orjson.loads(line)
            if doc.get("s") in ("out", "err"):
                yield base64.b64decode(doc["b64"])


async def _exec_stream(proc: asyncio.subprocess.Process) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump(reader: asyncio.StreamReader | None, stream: str) -> None:
        try:
            while reader is not None:
                data = await reader.read(64 << 10)
                if not data:
                    break
                await queue.put(_frame(stream, data))
        finally:
            await queue.put(None)

    if proc.stdin is not None:
        proc.stdin.close()  # nothing is sent to it: a command reading stdin sees EOF
    tasks = [
        asyncio.create_task(pump(proc.stdout, "out")),
        asyncio.create_task(pump(proc.stderr, "err")),
    ]
    try:
        open_pipes = 2
        while open_pipes:
            item = await queue.get()
            if item is None:
                open_pipes -= 1
            else:
                yield item
        code = await proc.wait()
        yield orjson.dumps({"end": {"reason": "exit", "exit_code": code}}) + b"\n"
    finally:
        for t in tasks:
            t.cancel()
        if proc.returncode is None:  # the client went away: so does the command
            proc.kill()


def beams_router() -> APIRouter:
    router = APIRouter(prefix="/v1/beams", tags=["beams"])

    @router.post("", status_code=201)
    async def create(body: BeamBody, sup: Sup, caller: Caller) -> JSONResponse:
        """Create a beam: decided as ``beam.create``, attested, given a delegated identity, and
        started. Returns once it runs; follow its output at ``/logs?follow=true``."""
        req = parse_beam_request(
            body.model_dump(exclude_none=True), default_backend=sup.default_backend
        )
        rec = await sup.create(caller, req)
        return JSONResponse(beam_view(rec), status_code=201, headers={"Cache-Control": "no-store"})

    @router.get("")
    async def list_beams(sup: Sup, caller: Caller, all: bool = True) -> dict[str, Any]:
        """Beams you may see, newest first (``all=false``: only live ones)."""
        return {"beams": [beam_view(r) for r in await sup.list(caller, include_ended=all)]}

    @router.get("/{beam_id}")
    async def show(beam_id: str, sup: Sup, caller: Caller) -> dict[str, Any]:
        """One beam, with its ``beam.attest`` entry's exact bytes (prove it with the audit
        log's inclusion proof and signed checkpoint)."""
        rec = await sup.get(caller, beam_id)
        entry = await asyncio.to_thread(sup.attest_entry, rec)
        return beam_view(rec, entry)

    @router.get("/{beam_id}/logs")
    async def logs(
        beam_id: str,
        sup: Sup,
        caller: Caller,
        follow: bool = False,
        after: Annotated[int, Query(ge=0)] = 0,
        format: Annotated[str, Query(pattern="^(ndjson|raw)$")] = "ndjson",
    ) -> StreamingResponse:
        """The beam's output from byte offset ``after``; ``follow`` streams until it ends."""
        frames = await sup.frames(caller, beam_id, follow=follow, after=after)
        if format == "raw":
            return StreamingResponse(_raw(frames), media_type="application/octet-stream")
        return StreamingResponse(frames, media_type=NDJSON)

    @router.post("/{beam_id}/exec")
    async def exec_(beam_id: str, body: ExecBody, sup: Sup, caller: Caller) -> StreamingResponse:
        """Run a command inside the running beam (recorded as ``beam.exec``); its output
        streams as NDJSON frames, then its exit code."""
        proc = await sup.exec(caller, beam_id, body.argv)
        return StreamingResponse(_exec_stream(proc), media_type=NDJSON)

    @router.post("/{beam_id}/kill")
    async def kill(beam_id: str, sup: Sup, caller: Caller) -> dict[str, Any]:
        """Kill the whole process tree now; returns once the end is recorded."""
        return beam_view(await sup.kill(caller, beam_id))

    @router.delete("/{beam_id}")
    async def remove(beam_id: str, sup: Sup, caller: Caller, force: bool = False) -> dict[str, Any]:
        """Remove an ended beam's record and output (``force``: kill it first). A workspace
        that was kept, or was yours, stays."""
        await sup.remove(caller, beam_id, force=force)
        return {"removed": beam_id}

    return router
