"""The beam lifecycle: create (decide, attest, delegate, start), watch (output, TTL), end
(kill, revoke, record), and reap what a previous server run left behind.

Creating a beam, in order (each step fails closed: nothing runs that was not recorded)::

    beam.create Action ─► DecisionCore ─► deny/escalate: record, 403
    attestation (objective, grants, argv, base fs, tools) ─► record "beam.attest"
        (the FIRST entry of the beam's session: the session id is the beam id)
    delegate the beam's identity from the creator's token: spiffe://TD/beam/<id>,
        the asked grants (the authority refuses wider), TTL, task = beam id,
        objective_sha256 = the attestation digest ─► "identity.issued"
    bridge socket (the gateways, for this beam only) ─► sandbox.start ─► "beam.start"
    watch: output into the log book; at TTL the whole tree is killed

Ending a beam, whatever ended it (exit, TTL, kill, server stop): the sandbox is killed (the
whole process tree), the token revoked (and with it anything the beam delegated), the bridge
closed, ``beam.end`` recorded with the reason and exit code, the record saved, a throwaway
workspace removed. A server never leaves a beam behind: ``aclose`` ends every live one, and
``start`` reaps what a crashed run left (``beam.reaped``).

The bridge: every beam gets its own unix socket, served in this process by the same ASGI app
as the server's port (through uvicorn's protocol, no relay hop), behind a gate that lets the
beam reach the gateways and a few read-only identity endpoints only. A request for anything
else is refused and recorded as a ``beam.violation`` in the beam's session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import uvicorn

from tether.audit.canonical import canonical_json
from tether.audit.log import AuditLog
from tether.clock import Clock
from tether.config import Config, DataDir
from tether.errors import (
    BadRequest,
    ConfigError,
    NotFound,
    PermissionDenied,
    RecordFailed,
    TetherError,
)
from tether.events import Event
from tether.identity.authority import Authority
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.grants import Grants
from tether.identity.revocation import RevocationList
from tether.identity.spiffe import SpiffeId
from tether.policy.action import Action, Decision
from tether.policy.core import DecisionCore
from tether.runtime import agentenv
from tether.runtime.attest import (
    BaseFsDigest,
    attestation_digest,
    base_fs_digest,
    build_attestation,
)
from tether.runtime.beams import (
    BackendUnavailable,
    BeamConflict,
    BeamRequest,
    new_beam_id,
    parse_argv,
)
from tether.runtime.sandbox import BACKENDS, Backend, Leftover, Sandbox, SandboxSpec, get_backend
from tether.store.beams import BeamRecord, BeamStore

__all__ = [
    "BRIDGE_PATHS",
    "BeamServices",
    "BeamSupervisor",
    "EgressGatewayLike",
    "LogBook",
]

log = logging.getLogger("tether.beams")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_LOG_BYTES = 64 << 20  # per beam; beyond it output is drained and dropped (and said so)
READ_CHUNK = 64 << 10
PUMP_GRACE = 2.0  # after the command ends, how long its pipes may take to reach EOF
KILL_BACKSTOP = 30.0  # a kill that has not ended the sandbox by then is reported, not waited on
MAX_VIOLATION_RECORDS = 100  # per beam: a beam hammering the bridge cannot flood the log
BRIDGE_PORT = 8080
EGRESS_PORT = 3128

# What a beam may reach over its bridge: the gateways and read-only identity endpoints.
# Exact paths, or prefixes when they end in "/".
BRIDGE_PATHS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/models",
    "/v1/models/",
    "/mcp",
    "/mcp/",
    "/http/",
    "/v1/token",
    "/v1/whoami",
    "/v1/bundle",
    "/v1/audit/checkpoint",
    "/v1/audit/vkey",
    "/v1/audit/proof/",
    "/healthz",
)


class BeamServices(Protocol):
    """What the supervisor uses of :class:`~tether.server.services.Services`."""

    config: Config
    data_dir: DataDir
    clock: Clock
    audit: AuditLog
    core: DecisionCore
    authority: Authority
    revocations: RevocationList
    bundle_doc: dict[str, Any]


class EgressListenerLike(Protocol):
    async def aclose(self) -> None: ...


class EgressGatewayLike(Protocol):
    """What the supervisor needs of the egress (HTTP CONNECT) gateway
    (:class:`tether.gateways.egress.EgressGateway`): a unix socket per beam whose every
    connection acts as the beam, each decided as an ``egress.connect`` Action."""

    async def serve_unix(
        self, path: str | os.PathLike[str], claims: TokenClaims | None = None, mode: int = 0o600
    ) -> EgressListenerLike: ...


def _now_ms(clock: Clock) -> int:
    return int(clock.now() * 1000)


# -- the log book ---------------------------------------------------------------------------


class LogBook:
    """A beam's output as NDJSON frames in ``output.ndjson``, appended as produced::

        {"t": 1800000000123, "s": "out", "b64": "aGVsbG8K"}     stdout bytes
        {"t": 1800000000124, "s": "err", "b64": "..."}          stderr bytes
        {"t": ..., "s": "meta", "text": "output truncated at 67108864 bytes"}
        {"end": {"reason": "exit", "exit_code": 0, ...}}        always last

    Followers read the file from any offset and wait for more; the file is the only copy, so a
    follower that connects late (or after a restart) sees everything."""

    def __init__(self, path: Path, clock: Clock, limit: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.clock = clock
        self.limit = limit
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self._fd).st_size
        self.truncated = False
        self.closed = False
        self._changed = asyncio.Event()

    def _append(self, line: bytes) -> None:
        os.write(self._fd, line)
        self.size += len(line)
        self._changed.set()
        self._changed = asyncio.Event()

    def write(self, stream: str, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.size + len(data) > self.limit:
            if not self.truncated:
                self.truncated = True
                self._append(
                    orjson.dumps(
                        {
                            "t": _now_ms(self.clock),
                            "s": "meta",
                            "text": f"output truncated at {self.limit} bytes",
                        }
                    )
                    + b"\n"
                )
            return
        frame = {"t": _now_ms(self.clock), "s": stream, "b64": base64.b64encode(data).decode()}
        self._append(orjson.dumps(frame) + b"\n")

    def close(self, end: Mapping[str, Any]) -> None:
        """Write the end frame; followers stop once they have read it (or at once, if the
        disk refused it: a follower never waits for output that cannot come)."""
        if self.closed:
            return
        try:
            self._append(orjson.dumps({"end": dict(end)}) + b"\n")
        finally:
            self.closed = True
            os.close(self._fd)
            self._changed.set()

    async def frames(self, after: int = 0, follow: bool = True) -> AsyncIterator[bytes]:
        """Complete NDJSON lines from byte offset ``after``; with ``follow``, until the end."""
        pos = after
        with self.path.open("rb") as f:
            while True:
                changed = self._changed  # before reading: a write after the read sets it
                f.seek(pos)
                chunk = f.read(READ_CHUNK * 4)
                cut = chunk.rfind(b"\n") + 1
                if cut:
                    pos += cut
                    yield chunk[:cut]
                    continue
                if self.closed or not follow:
                    return
                await changed.wait()


async def read_log_file(path: Path, after: int = 0) -> AsyncIterator[bytes]:
    """The frames of an ended beam's log (no live book)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(after)
        while True:
            chunk = await asyncio.to_thread(f.read, READ_CHUNK * 4)
            if not chunk:
                return
            yield chunk


# -- the bridge -----------------------------------------------------------------------------


def _allowed_path(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in BRIDGE_PATHS)


class _BeamGate:
    """The bridge's ASGI front for one beam: gateway paths pass (tagged with the beam id),
    anything else is refused with a JSON 403 and recorded as a violation."""

    def __init__(self, app: ASGIApp, beam_id: str, violation: Callable[[str, str], None]):
        self.app = app
        self.beam_id = beam_id
        self.violation = violation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and _allowed_path(path):
            scope["tether.beam"] = self.beam_id
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", scope["type"]))
        self.violation(method, path)
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = orjson.dumps(
            {
                "error": "permission_denied",
                "error_description": (
                    f"a beam reaches only the gateways over its bridge; {path[:100]} is not one"
                ),
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Bridge:
    """Per-beam unix sockets served by the server's ASGI app in this process.

    Each socket gets uvicorn's own HTTP protocol (the same parser and keep-alive handling as
    the server's port), so a request from a beam costs what a request on the server's unix
    socket costs; and since every socket belongs to one beam, the server knows which beam
    every connection comes from."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._servers: dict[str, asyncio.Server] = {}
        self._state = uvicorn.server.ServerState()

    async def open(self, beam_id: str, path: Path, violation: Callable[[str, str], None]) -> None:
        config = uvicorn.Config(
            _BeamGate(self.app, beam_id, violation),
            lifespan="off",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            log_config=None,
        )
        config.load()
        state = self._state

        def protocol() -> asyncio.Protocol:
            make: Any = config.http_protocol_class
            proto: asyncio.Protocol = make(config=config, server_state=state, app_state={})
            return proto

        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.get_running_loop().create_unix_server(
            protocol, path=str(path), backlog=128
        )
        self._servers[beam_id] = server

    async def close(self, beam_id: str, path: Path) -> None:
        server = self._servers.pop(beam_id, None)
        if server is not None:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    async def aclose(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for conn in list(self._state.connections):
            conn.shutdown()


# -- the supervisor -------------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    """A beam this process is running."""

    rec: BeamRecord
    claims: TokenClaims
    book: LogBook
    socket_path: Path
    deadline: float  # loop time
    sandbox: Sandbox | None = None
    end_reason: tuple[str, str | None] | None = None  # (reason, by whom)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    watch: asyncio.Task[None] | None = None
    egress: EgressListenerLike | None = None
    violations: int = 0
    ending: bool = False  # its end is being recorded


def _runtime_dir(data_root: Path) -> Path:
    """Where the bridge sockets live: a short 0700 directory (unix socket paths are limited
    to 107 bytes, and a data dir can be deep)."""
    import hashlib

    tag = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / f"tether-{os.getuid()}-{tag}"
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{d} is not a private directory of this user; refusing to put bridge sockets there",
            hint="remove it, or set TMPDIR to a private directory",
        )
    return d


class BeamSupervisor:
    """Creates, watches, ends and reaps beams for one server. Lives on the server's loop."""

    def __init__(
        self,
        services: BeamServices,
        *,
        bridge_app: ASGIApp | None = None,
        backends: Mapping[str, Backend] | None = None,
        base_fs: BaseFsDigest | None = None,
        tools: Callable[[Grants], Sequence[Mapping[str, Any]]] | None = None,
        egress: EgressGatewayLike | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.services = services
        conf = services.config.extra.get("beams", {})
        if not isinstance(conf, dict):
            raise ConfigError("[beams] in config.toml must be a table")
        self.default_backend = str(conf.get("backend", "bwrap"))
        self.strict_limits = bool(conf.get("strict_limits", False))
        self.max_log_bytes = int(conf.get("max_log_bytes", MAX_LOG_BYTES))
        roots = conf.get("workspace_roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise ConfigError("[beams] workspace_roots must be a list of directories")
        self.workspace_roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self.bridge_app = bridge_app
        self.egress = egress
        self.tools = tools
        self.base_fs = base_fs or base_fs_digest()
        self.beams_dir = services.data_dir.root / "beams"
        self.state_dir = services.data_dir.root / "sandboxes"
        self._runtime_dir = runtime_dir
        self.store = BeamStore(services.data_dir.db_path)
        self._backends: dict[str, Backend] = dict(backends or {})
        self._injected = backends is not None  # tests: only these, never the host's
        self._unusable: dict[str, str] = {}
        self._live: dict[str, _Live] = {}
        self._bridge: Bridge | None = None
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None
        self.trust_domain = services.config.trust_domain

    def __repr__(self) -> str:
        return f"BeamSupervisor(live={len(self._live)})"

    @property
    def runtime_dir(self) -> Path:
        if self._runtime_dir is None:
            self._runtime_dir = _runtime_dir(self.services.data_dir.root)
        return self._runtime_dir

    # -- lifecycle of the supervisor ------------------------------------------------------

    async def start(self, should_exit: Callable[[], bool] | None = None) -> None:
        """Reap what a previous run left, warm the base filesystem digest, and (given the
        server's ``should_exit``) end every beam as soon as the server starts stopping, so
        no follower holds the server's graceful shutdown open."""
        self.beams_dir.mkdir(mode=0o700, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        self.base_fs.warm()
        try:
            await asyncio.to_thread(self.reap_leftovers)
        except Exception as e:  # the server still starts; the log says what is left
            log.error("reaping leftover beams failed: %s: %s", type(e).__name__, e)
        self._watcher = asyncio.create_task(self._tick(should_exit or (lambda: False)))

    async def _tick(self, should_exit: Callable[[], bool]) -> None:
        """Every 100 ms: a beam whose identity was revoked (its own token, its creator's, a
        subtree above it) is killed at once; when the server stops, every beam is."""
        seen = -1
        while not should_exit():
            try:
                generation = self.services.revocations.generation
                if generation != seen:
                    seen = generation
                    await self._kill_revoked()
            except Exception as e:  # keep ticking: server stop must still end the beams
                log.error("beam revocation check failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(0.1)
        await self.end_all("server stop")

    async def _kill_revoked(self) -> None:
        for live in list(self._live.values()):
            if live.end_reason is not None:
                continue
            reason = self.services.revocations.reason(live.claims)
            if reason is not None:
                live.end_reason = ("revoked", reason)
                if live.sandbox is not None:
                    with contextlib.suppress(Exception):
                        await live.sandbox.kill()

    async def end_all(self, by: str) -> None:
        """Kill every live beam and wait for each end to be recorded."""
        self._closing = True
        lives = list(self._live.values())
        for live in lives:
            if live.end_reason is None:
                live.end_reason = ("killed", by)
            if live.sandbox is not None:
                with contextlib.suppress(Exception):
                    await live.sandbox.kill()
        for live in lives:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), KILL_BACKSTOP)

    async def aclose(self) -> None:
        """Server stop: every beam is killed and its end recorded before the log closes."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.end_all("server stop")
        if self._bridge is not None:
            await self._bridge.aclose()
        self.store.close()

    # -- backends -------------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        found = self._backends.get(name)
        if found is not None:
            return found
        if self._injected:
            raise BackendUnavailable(f"backend {name!r} is not configured on this server")
        if name not in BACKENDS:
            raise BadRequest(f"unknown backend {name[:40]!r} (one of {', '.join(BACKENDS)})")
        why = self._unusable.get(name)
        if why is None:
            try:
                found = get_backend(
                    name, state_dir=self.state_dir, strict_limits=self.strict_limits
                )
            except ConfigError as e:
                why = self._unusable[name] = e.message
            except Exception as e:  # a broken backend module must not take the server down
                why = self._unusable[name] = f"the {name} backend failed to load ({e})"
            else:
                self._backends[name] = found
                return found
        raise BackendUnavailable(f"beams cannot start here: {why}")

    # -- who may see a beam ---------------------------------------------------------------

    def _is_admin(self, caller: TokenClaims) -> bool:
        return (
            caller.subject.kind == "user"
            and caller.subject.name == self.services.config.admin_user
            and not caller.grantors
        )

    def _visible(self, caller: TokenClaims, rec: BeamRecord) -> bool:
        """The beam's creator and everyone above it in its chain (the user who delegated the
        agent that made it), and the admin. The beam itself is not: it has no API."""
        return self._is_admin(caller) or str(caller.subject) in rec.chain

    async def get(self, caller: TokenClaims, beam_id: str) -> BeamRecord:
        live = self._live.get(beam_id)
        rec = live.rec if live else await asyncio.to_thread(self.store.get, beam_id)
        if rec is None or not self._visible(caller, rec):
            raise NotFound(f"no beam {beam_id[:40]!r}")
        return rec

    async def list(self, caller: TokenClaims, include_ended: bool = True) -> list[BeamRecord]:
        states = () if include_ended else ("starting", "running")
        rows = await asyncio.to_thread(self.store.select, states=states, limit=1000)
        live = {b: lv.rec for b, lv in self._live.items()}
        return [live.get(r.id, r) for r in rows if self._visible(caller, r)]

    def attest_entry(self, rec: BeamRecord) -> bytes:
        """The canonical bytes of the beam's ``beam.attest`` entry (for proofs)."""
        return self.services.audit.entry_data(rec.attest_index)

    # -- create ---------------------------------------------------------------------------

    async def create(self, caller: TokenClaims, req: BeamRequest) -> BeamRecord:
        if self._closing:
            raise BackendUnavailable("the server is stopping; no new beams")
        svc = self.services
        backend = self.backend(req.backend)
        if req.allow_domains and self.egress is None:
            raise BackendUnavailable(
                "this server has no egress gateway: beams cannot be allowed any domain"
            )
        workspace, owned = self._check_workspace(caller, req)
        beam_id = new_beam_id()
        spiffe = str(SpiffeId(self.trust_domain, "beam", beam_id))
        action = Action("beam.create", caller, spiffe, arguments=req.summary())
        decision = await svc.core.adecide(action)
        if not decision.allowed:
            await svc.audit.arecord(svc.core.event(action, decision, data={"beam": beam_id}))
            detail = "; ".join(decision.reasons)
            if decision.outcome == "escalate":
                detail = f"creating this beam needs approval {decision.approval} "
                detail += f"({decision.quorum}): {'; '.join(decision.reasons)}"
            raise PermissionDenied(detail)
        try:
            return await self._create_allowed(
                caller, req, backend, beam_id, spiffe, action, decision, workspace, owned
            )
        except BaseException:
            svc.core.settle(decision, None)
            raise

    def _check_workspace(self, caller: TokenClaims, req: BeamRequest) -> tuple[Path | None, bool]:
        """A caller-named workspace is a host directory the beam may write as the server's
        user. So only people may name one: the admin anywhere (it runs the server), other
        users only below a ``[beams] workspace_roots`` directory; agents get a fresh one.
        Never the data directory, anything inside or above it, or ``/``."""
        ws = req.workspace
        if ws is None:
            return None, True
        if caller.subject.kind != "user" or caller.grantors:
            raise PermissionDenied(
                "only a user's own token may bind a host directory as a beam's workspace; "
                "agents get a fresh one"
            )
        real = Path(os.path.realpath(ws))
        if not self._is_admin(caller) and not any(
            real == root or root in real.parents for root in self.workspace_roots
        ):
            raise PermissionDenied(
                f"workspace {str(ws)[:120]!r} is not below a [beams] workspace_roots directory; "
                "only the admin may bind any directory"
            )
        if not real.is_dir():
            raise BadRequest(f"workspace {str(ws)[:120]!r} is not an existing directory")
        data = Path(os.path.realpath(self.services.data_dir.root))
        if real == Path("/") or real == data or data in real.parents or real in data.parents:
            raise BadRequest(
                f"workspace {str(ws)[:120]!r} would expose Tether's data directory "
                "(or the root filesystem) to the beam"
            )
        return real, False

    async def _create_allowed(
        self,
        caller: TokenClaims,
        req: BeamRequest,
        backend: Backend,
        beam_id: str,
        spiffe: str,
        action: Action,
        decision: Decision,
        workspace: Path | None,
        owned: bool,
    ) -> BeamRecord:
        svc = self.services
        base = await asyncio.to_thread(self.base_fs.get)
        # the definitions the caller declares, and those the tool gateway says the beam's
        # grants reach (pinned MCP tools, say): the beam is attested to them all
        granted = parse_grants(req.grants)
        tools = [*req.tools, *(self.tools(granted) if self.tools is not None else ())]
        doc = build_attestation(
            beam_id=beam_id,
            objective=req.objective,
            grants=req.grants,
            argv=req.argv,
            base_fs=base,
            tools=tools,
        )
        digest = attestation_digest(doc)
        create_event = svc.core.event(action, decision, data={"beam": beam_id})
        attest_event = Event(
            type="beam.attest",
            actor=str(caller.subject),
            subject=spiffe,
            session=beam_id,
            data={"attestation": doc, "sha256": digest},
        )
        # Both in one group commit; the attestation is the session's first entry either way
        # (the create decision belongs to the creator's session).
        receipts = await asyncio.gather(
            svc.audit.arecord(create_event), svc.audit.arecord(attest_event)
        )
        attest_index = receipts[1].index
        try:
            issued = await svc.authority.adelegate(
                caller,
                beam_id,
                list(req.grants),
                ttl=req.ttl,
                task=beam_id,
                objective=canonical_json(doc).decode(),  # so objective_sha256 == digest
                kind="beam",
            )
        except TetherError as e:
            await self._record_quietly(
                Event(
                    type="beam.end",
                    subject=spiffe,
                    session=beam_id,
                    data={"reason": "refused", "error": e.message},
                )
            )
            raise
        claims = issued.claims
        loop = asyncio.get_running_loop()
        now_ms = _now_ms(svc.clock)
        beam_dir = self.beams_dir / beam_id
        beam_dir.mkdir(mode=0o700, parents=True)
        if workspace is None:
            workspace = beam_dir / "workspace"
            workspace.mkdir(mode=0o700)
        rec = BeamRecord(
            id=beam_id,
            spiffe_id=spiffe,
            state="starting",
            backend=backend.name,
            creator=str(caller.subject),
            chain=tuple(str(g) for g in claims.grantors),
            objective=req.objective,
            attestation=doc,
            attestation_sha256=digest,
            attest_index=attest_index,
            grants=tuple(claims.grants.to_list()),
            argv=req.argv,
            limits={
                "memory_bytes": req.limits.memory_bytes,
                "cpus": req.limits.cpus,
                "pids": req.limits.pids,
            },
            allow_domains=req.allow_domains,
            workspace=str(workspace),
            workspace_owned=owned,
            keep_workspace=req.keep_workspace,
            ttl_s=req.ttl,
            created_ms=now_ms,
            expires_ms=claims.expires_at * 1000,
            token_id=claims.token_id,
            claims=claims.to_payload(),
        )
        live = _Live(
            rec=rec,
            claims=claims,
            book=LogBook(beam_dir / "output.ndjson", svc.clock, self.max_log_bytes),
            socket_path=self.runtime_dir / f"{beam_id}.sock",
            deadline=loop.time() + req.ttl,
        )
        self._live[beam_id] = live
        # The row is written while the sandbox starts; both must succeed before the beam
        # counts as running (a restart reaps from the row and from the backend's state).
        insert = asyncio.ensure_future(asyncio.to_thread(self.store.insert, rec))
        sandbox: Sandbox | None = None
        try:
            sandbox = await self._start_sandbox(live, backend, issued.token, req)
            await insert
        except BaseException as e:
            await asyncio.gather(insert, return_exceptions=True)
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    await sandbox.kill()
                    await asyncio.wait_for(sandbox.wait(), KILL_BACKSTOP)
            await self._fail(live, e)
            raise
        live.sandbox = sandbox
        if live.end_reason is not None:  # killed (or the server stopped) while it started
            with contextlib.suppress(Exception):
                await sandbox.kill()
        live.pumps = [
            asyncio.create_task(self._pump(sandbox.stdout, live.book, "out")),
            asyncio.create_task(self._pump(sandbox.stderr, live.book, "err")),
        ]
        info = _safe_info(sandbox)
        live.rec = rec = rec.evolve(
            state="running", started_ms=_now_ms(svc.clock), pid=sandbox.pid, info=info
        )
        live.watch = asyncio.create_task(self._watch(live))
        start_event = Event(
            type="beam.start",
            actor=str(caller.subject),
            subject=spiffe,
            session=beam_id,
            data={
                "backend": backend.name,
                "pid": sandbox.pid,
                "token_id": claims.token_id,
                "expires_at": claims.expires_at,
                "limits": rec.limits,
                "warnings": info.get("warnings", []),
            },
        )
        recorded, saved = await asyncio.gather(
            svc.audit.arecord(start_event),
            asyncio.to_thread(self.store.save, rec),
            return_exceptions=True,
        )
        if isinstance(recorded, BaseException):
            # fail closed: a beam whose start is not on the record does not run
            live.end_reason = ("killed", "audit log unavailable")
            await sandbox.kill()
            await live.done.wait()
            if isinstance(recorded, TetherError):
                raise recorded
            raise RecordFailed(f"audit record failed: {type(recorded).__name__}") from recorded
        if isinstance(saved, BaseException):  # the end saves it again; the log has the start
            log.error("could not save beam %s as running: %s", beam_id, saved)
        svc.core.settle(decision, action.cost)
        return rec

    async def _start_sandbox(
        self, live: _Live, backend: Backend, token: str, req: BeamRequest
    ) -> Sandbox:
        rec = live.rec
        if self._bridge is None:
            if self.bridge_app is None:
                raise BackendUnavailable("beams need the server's app for their bridge")
            self._bridge = Bridge(self.bridge_app)
        beam_id = rec.id

        def violation(method: str, path: str) -> None:
            self._violation(live, method, path)

        await self._bridge.open(beam_id, live.socket_path, violation)
        egress_socket: Path | None = None
        if req.allow_domains:
            if self.egress is None:
                raise BackendUnavailable("this server has no egress gateway for --allow-domain")
            egress_socket = self.runtime_dir / f"{beam_id}.egress.sock"
            live.egress = await self.egress.serve_unix(egress_socket, claims=live.claims)
        env = agentenv.beam_environment(
            beam_id=beam_id,
            spiffe_id=rec.spiffe_id,
            token=token,
            attestation_sha256=rec.attestation_sha256,
            bridge_port=BRIDGE_PORT,
            egress_port=EGRESS_PORT if egress_socket is not None else None,
        )
        spec = SandboxSpec(
            beam_id=beam_id,
            argv=rec.argv,
            env=env,
            workspace=Path(rec.workspace),
            files=agentenv.beam_files(token, self.services.bundle_doc, rec.attestation),
            bridge_socket=live.socket_path,
            bridge_port=BRIDGE_PORT,
            egress_socket=egress_socket,
            egress_port=EGRESS_PORT,
            limits=req.limits,
        )
        return await backend.start(spec)

    async def _fail(self, live: _Live, error: BaseException) -> None:
        """The sandbox never started: revoke, record, clean up."""
        reason = error.message if isinstance(error, TetherError) else type(error).__name__
        live.end_reason = ("failed", None)
        await self._finish(live, None, error=reason)

    def _violation(self, live: _Live, method: str, path: str) -> None:
        live.violations += 1
        if live.violations > MAX_VIOLATION_RECORDS:
            return
        event = Event(
            type="beam.violation",
            actor=live.rec.spiffe_id,
            session=live.rec.id,
            decision="deny",
            data={
                "what": "bridge request outside the gateways",
                "method": method[:16],
                "path": path[:200],
                "count": live.violations,
            },
        )
        task = asyncio.get_running_loop().create_task(self._record_quietly(event))
        live.pumps.append(task)

    async def _record_quietly(self, event: Event) -> None:
        try:
            await self.services.audit.arecord(event)
        except TetherError as e:
            log.error("could not record %s: %s", event.type, e.message)

    # -- watching -------------------------------------------------------------------------

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, book: LogBook, stream: str) -> None:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            book.write(stream, data)

    async def _watch(self, live: _Live) -> None:
        sandbox = live.sandbox
        assert sandbox is not None
        waiter = asyncio.ensure_future(sandbox.wait())
        code: int | None = None
        error: str | None = None
        try:
            remaining = live.deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({waiter}, timeout=max(0.0, remaining))
            if not done:
                if live.end_reason is None:
                    live.end_reason = ("ttl", None)
                await sandbox.kill()
            try:
                code = await asyncio.wait_for(asyncio.shield(waiter), KILL_BACKSTOP)
            except TimeoutError:
                error = "the sandbox did not end within 30 s of being killed"
                log.error("beam %s: %s", live.rec.id, error)
        except Exception as e:  # the watch must always end the beam
            error = f"{type(e).__name__}: {e}"
            log.error("beam %s watch failed: %s", live.rec.id, error)
            with contextlib.suppress(Exception):
                await sandbox.kill()
        await self._finish(live, code, error=error)

    async def _finish(self, live: _Live, code: int | None, error: str | None = None) -> None:
        """End a beam, whatever ended it: revoke, record, save, clean up. Never raises, and
        always releases whoever waits for the end."""
        live.ending = True
        end: dict[str, Any] = {"reason": "error", "exit_code": code}
        try:
            # the ended record becomes visible only now, with everything about the end done
            live.rec, end = await self._end(live, code, error)
        except Exception as e:
            log.error("ending beam %s failed: %s: %s", live.rec.id, type(e).__name__, e)
        finally:
            self._live.pop(live.rec.id, None)
            try:
                live.book.close(end)  # followers see the end after the record says so
            except OSError as e:
                log.error("could not close the output of beam %s: %s", live.rec.id, e)
            live.done.set()

    async def _end(
        self, live: _Live, code: int | None, error: str | None
    ) -> tuple[BeamRecord, dict[str, Any]]:
        svc = self.services
        rec = live.rec
        reason, by = live.end_reason or ("exit", None)
        # the identity first: nothing acts as the beam once it has ended
        revoked = await self._revoke(live.claims, f"beam {rec.id} ended ({reason})")
        if self._bridge is not None:
            await self._bridge.close(rec.id, live.socket_path)
        if live.egress is not None:  # cuts its open tunnels (each recorded as ended)
            with contextlib.suppress(Exception):
                await live.egress.aclose()
        if live.pumps:
            _, pending = await asyncio.wait(live.pumps, timeout=PUMP_GRACE)
            for t in pending:
                t.cancel()
        ended_ms = _now_ms(svc.clock)
        end: dict[str, Any] = {
            "reason": reason,
            "exit_code": code,
            "revoked": revoked is None,
            "duration_ms": ended_ms - rec.created_ms,
        }
        if by:
            end["by"] = by
        if error or revoked:
            end["error"] = "; ".join(x for x in (error, revoked) if x)
        await self._record_quietly(
            Event(
                type="beam.end",
                actor=by if by and by.startswith("spiffe://") else None,
                subject=rec.spiffe_id,
                session=rec.id,
                data=end,
            )
        )
        rec = rec.evolve(
            state="ended",
            ended_ms=ended_ms,
            exit_code=code,
            end_reason=reason,
            ended_by=by,
        )
        try:
            await asyncio.to_thread(self.store.save, rec)
        except TetherError as e:
            log.error("could not save the end of beam %s: %s", rec.id, e.message)
        if rec.workspace_owned and not rec.keep_workspace:
            await asyncio.to_thread(shutil.rmtree, rec.workspace, True)
        return rec, end

    async def _revoke(self, claims: TokenClaims, reason: str) -> str | None:
        """Revoke the beam's token (and everything delegated from it). The beam's own claims
        authorise it: a holder may always revoke its own token. None, or what went wrong."""
        if self.services.revocations.reason(claims) is not None:
            return None  # already revoked (a revocation above it is what ended the beam)
        try:
            await asyncio.to_thread(
                self.services.authority.revoke, claims, "token", claims.token_id, reason
            )
        except TetherError as e:
            log.error("could not revoke token %s: %s", claims.token_id, e.message)
            return f"revocation failed: {e.message}"
        return None

    # -- kill, exec, rm, logs -------------------------------------------------------------

    async def kill(self, caller: TokenClaims, beam_id: str) -> BeamRecord:
        rec = await self.get(caller, beam_id)
        live = self._live.get(beam_id)
        if live is not None and live.ending:  # its end is being recorded: let it finish
            await live.done.wait()
            rec, live = live.rec, None
        if live is None:
            raise BeamConflict(f"beam {beam_id} already ended ({rec.end_reason})")
        if live.end_reason is None:
            live.end_reason = ("killed", str(caller.subject))
        if live.sandbox is not None:
            await live.sandbox.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), KILL_BACKSTOP)
        return live.rec

    async def exec(
        self, caller: TokenClaims, beam_id: str, argv: Sequence[str]
    ) -> asyncio.subprocess.Process:
        rec = await self.get(caller, beam_id)
        live = self._live.get(beam_id)
        if live is None or live.sandbox is None or live.end_reason is not None or live.ending:
            raise BeamConflict(f"beam {beam_id} is not running ({rec.end_reason or rec.state})")
        args = parse_argv(list(argv))
        await self.services.audit.arecord(
            Event(
                type="beam.exec",
                actor=str(caller.subject),
                subject=rec.spiffe_id,
                session=rec.id,
                data={"argv": list(args)},
            )
        )
        return await live.sandbox.exec(args)

    async def remove(self, caller: TokenClaims, beam_id: str, force: bool = False) -> None:
        rec = await self.get(caller, beam_id)
        live = self._live.get(beam_id)
        if live is not None and live.ending:
            await live.done.wait()
            rec = live.rec
        elif live is not None:
            if not force:
                raise BeamConflict(f"beam {beam_id} is running; kill it first (or force)")
            rec = await self.kill(caller, beam_id)
        await self.services.audit.arecord(
            Event(
                type="beam.removed",
                actor=str(caller.subject),
                subject=rec.spiffe_id,
                session=rec.id,
                data={"workspace_kept": not rec.workspace_owned or rec.keep_workspace},
            )
        )
        await asyncio.to_thread(self.store.delete, beam_id)
        beam_dir = self.beams_dir / beam_id
        if rec.workspace_owned and rec.keep_workspace:  # the output goes, the kept files stay
            (beam_dir / "output.ndjson").unlink(missing_ok=True)
        else:
            await asyncio.to_thread(shutil.rmtree, beam_dir, True)

    async def frames(
        self, caller: TokenClaims, beam_id: str, follow: bool = False, after: int = 0
    ) -> AsyncIterator[bytes]:
        """The beam's output frames (see :class:`LogBook`), ending with its ``end`` frame."""
        rec = await self.get(caller, beam_id)
        live = self._live.get(beam_id)
        if live is not None:
            return live.book.frames(after, follow)
        return self._ended_frames(rec, after)

    async def _ended_frames(self, rec: BeamRecord, after: int) -> AsyncIterator[bytes]:
        path = self.beams_dir / rec.id / "output.ndjson"
        async for chunk in read_log_file(path, after):
            yield chunk
        if not await asyncio.to_thread(_ends_with_end, path):
            # a beam reaped after a crash never wrote its end line
            yield orjson.dumps({"end": _end_of(rec)}) + b"\n"

    # -- leftovers ------------------------------------------------------------------------

    def reap_leftovers(self) -> int:
        """Kill and record what a previous run of this server left: sandboxes still alive, and
        beams recorded as running whose sandbox is gone. Runs at start, in a thread."""
        stale = {r.id: r for r in self.store.select(states=("starting", "running"), limit=10_000)}
        reaped = 0
        for name in sorted(self._backends) if self._injected else BACKENDS:
            try:
                backend = self.backend(name)
            except TetherError:
                continue
            for leftover in backend.leftovers():
                if leftover.beam_id in self._live:
                    continue
                self._reap_one(backend, leftover, stale.pop(leftover.beam_id, None))
                reaped += 1
        for rec in stale.values():
            if rec.id not in self._live:
                self._reap_one(None, None, rec)
                reaped += 1
        return reaped

    def _reap_one(
        self, backend: Backend | None, leftover: Leftover | None, rec: BeamRecord | None
    ) -> None:
        svc = self.services
        error: str | None = None
        if backend is not None and leftover is not None:
            try:
                backend.reap(leftover)
            except Exception as e:
                error = f"reap failed: {type(e).__name__}: {e}"
        beam_id = leftover.beam_id if leftover else rec.id if rec else "?"
        data: dict[str, Any] = {
            "beam": beam_id,
            "backend": backend.name if backend else (rec.backend if rec else None),
            "pids": list(leftover.pids) if leftover else [],
            "found_alive": bool(leftover and leftover.pids),
        }
        if rec is not None:
            try:
                claims = TokenClaims.from_payload(rec.claims)
                svc.authority.revoke(
                    claims, "token", claims.token_id, f"beam {rec.id} reaped after a restart"
                )
                data["revoked"] = True
            except TetherError as e:
                error = f"{error + '; ' if error else ''}revocation failed: {e.message}"
        if error:
            data["error"] = error
        subject = rec.spiffe_id if rec else str(SpiffeId(self.trust_domain, "beam", beam_id))
        try:
            svc.audit.record(Event(type="beam.reaped", subject=subject, session=beam_id, data=data))
        except TetherError as e:
            log.error("could not record the reaping of %s: %s", beam_id, e.message)
        if rec is None:
            return
        rec = rec.evolve(
            state="ended",
            ended_ms=_now_ms(svc.clock),
            end_reason="reaped",
            ended_by="server restart",
        )
        self.store.save(rec)
        path = self.beams_dir / rec.id / "output.ndjson"
        with contextlib.suppress(OSError), path.open("ab") as f:
            f.write(orjson.dumps({"end": _end_of(rec)}) + b"\n")
        if rec.workspace_owned and not rec.keep_workspace:
            shutil.rmtree(rec.workspace, ignore_errors=True)


def _ends_with_end(path: Path) -> bool:
    """Is the log's last line its end frame?"""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().rstrip(b"\n").rsplit(b"\n", 1)
    except OSError:
        return False
    return lines[-1].startswith(b'{"end":')


def _end_of(rec: BeamRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"reason": rec.end_reason, "exit_code": rec.exit_code}
    if rec.ended_by:
        out["by"] = rec.ended_by
    return out


def _safe_info(sandbox: Sandbox) -> dict[str, Any]:
    try:
        info = sandbox.info()
        return orjson.loads(orjson.dumps(info, default=str))  # type: ignore[no-any-return]
    except Exception as e:
        return {"warnings": [f"info() failed: {type(e).__name__}"]}
