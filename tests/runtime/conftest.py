"""Fixtures for the sandbox tests: a real bwrap backend, a real HTTP server (uvicorn) on the
host unix socket that beams reach through their forwarder, and a helper that runs a Python
script in a beam and returns what it printed.

Everything is real: bwrap, namespaces, seccomp, cgroups on this host. The tests skip only
when the host cannot run bwrap at all (with bwrap's reason)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tether.runtime.bwrap import BwrapBackend, BwrapSandbox
from tether.runtime.sandbox import Limits, SandboxSpec

PY = sys.executable
BEAM_PATH = f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin"
RUN_TIMEOUT = 90.0  # a failure backstop only; beams finish in milliseconds


# Scripts run inside beams start with this: ``attempt(name, fn)`` records "ok" or the errno
# name of the OSError, ``done()`` prints the record as the last line (read with ``.result``).
PRELUDE = """
import ctypes, errno, json, os, socket, sys
_r = {}
def attempt(name, fn):
    try:
        v = fn()
        _r[name] = "ok" if v is None or not isinstance(v, (int, str)) else ["ok", v]
    except OSError as e:
        _r[name] = errno.errorcode.get(e.errno, e.errno) if e.errno else str(e)
def note(name, value):
    _r[name] = value
def done():
    print(json.dumps(_r), flush=True)
_libc = ctypes.CDLL(None, use_errno=True)
def syscall(nr, *args):
    res = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if res == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res
"""


def beam_env(**extra: str) -> dict[str, str]:
    return {"PATH": BEAM_PATH, "HOME": "/workspace", "LANG": "C.UTF-8", **extra}


@pytest.fixture(scope="session")
def bwrap_unavailable() -> str | None:
    return BwrapBackend(state_dir=Path(tempfile.mkdtemp(prefix="tb-probe-"))).available()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for unix sockets (paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tb-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend(bwrap_unavailable: str | None, short_dir: Path) -> BwrapBackend:
    if bwrap_unavailable is not None:
        pytest.skip(f"this host cannot run bwrap: {bwrap_unavailable}")
    b = BwrapBackend(state_dir=short_dir / "state")
    assert b.available() is None
    return b


@dataclass
class Seen:
    """What the host-side HTTP server received."""

    requests: list[dict[str, Any]] = field(default_factory=list)


def _echo_app(seen: Seen, name: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.requests.append({"path": scope["path"], "headers": headers, "body": body})
        path = scope["path"]
        if path == "/v1/chat/completions":
            req = json.loads(body)
            out = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": req["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"hello from {name}"},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
            ).encode()
        elif path.startswith("/bytes/"):
            out = os.urandom(int(path.rsplit("/", 1)[1]))
        elif path == "/echo":
            out = body
        else:
            out = json.dumps({"server": name, "path": path, "len": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": out})

    return app


@dataclass
class HostServer:
    socket: Path
    seen: Seen


@contextlib.asynccontextmanager
async def serve_unix(path: Path, name: str) -> AsyncIterator[HostServer]:
    """A real uvicorn server on a host unix socket: the bridge a beam's forwarder reaches."""
    seen = Seen()
    server = uvicorn.Server(
        uvicorn.Config(_echo_app(seen, name), uds=str(path), log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield HostServer(path, seen)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def bridge(short_dir: Path) -> AsyncIterator[HostServer]:
    async with serve_unix(short_dir / "gw.sock", "gateway") as s:
        yield s


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


@dataclass
class Ran:
    rc: int
    out: str
    err: str
    info: dict[str, Any]
    sandbox: BwrapSandbox

    @property
    def result(self) -> Any:
        """The JSON object the script printed last."""
        lines = [x for x in self.out.splitlines() if x.strip()]
        assert lines, f"the beam printed nothing (rc={self.rc}); stderr:\n{self.err}"
        return json.loads(lines[-1])


class Beams:
    """Starts beams for one test and makes sure none outlives it."""

    def __init__(self, backend: BwrapBackend, bridge: HostServer, workspace: Path) -> None:
        self.backend = backend
        self.bridge = bridge
        self.workspace = workspace
        self.started: list[BwrapSandbox] = []
        self._n = 0

    def spec(
        self,
        argv: Sequence[str],
        *,
        limits: Limits = Limits(),
        env: Mapping[str, str] | None = None,
        files: Mapping[str, bytes] | None = None,
        egress: Path | None = None,
    ) -> SandboxSpec:
        self._n += 1
        return SandboxSpec(
            beam_id=f"b-{os.getpid()}-{self._n}-{os.urandom(3).hex()}",
            argv=tuple(argv),
            env=beam_env() if env is None else env,
            workspace=self.workspace,
            files={"token": b"beam-token"} if files is None else files,
            bridge_socket=self.bridge.socket,
            egress_socket=egress,
            limits=limits,
        )

    async def start(self, argv: Sequence[str], **kw: Any) -> BwrapSandbox:
        sb = await self.backend.start(self.spec(argv, **kw))
        self.started.append(sb)
        return sb

    async def run(self, argv: Sequence[str], **kw: Any) -> Ran:
        sb = await self.start(argv, **kw)
        return await self.finish(sb)

    async def py(self, script: str, **kw: Any) -> Ran:
        """Run a Python script in a fresh beam (the venv's interpreter, as agents do)."""
        return await self.run([PY, "-c", script], **kw)

    async def finish(self, sb: BwrapSandbox) -> Ran:
        async def drain(r: asyncio.StreamReader) -> str:
            return (await r.read()).decode(errors="replace")

        out, err, rc = await asyncio.wait_for(
            asyncio.gather(drain(sb.stdout), drain(sb.stderr), sb.wait()), RUN_TIMEOUT
        )
        return Ran(rc, out, err, sb.info(), sb)

    async def close(self) -> None:
        for sb in self.started:
            await sb.kill()


@pytest.fixture
async def beams(backend: BwrapBackend, bridge: HostServer, workspace: Path) -> AsyncIterator[Beams]:
    b = Beams(backend, bridge, workspace)
    try:
        yield b
    finally:
        await b.close()


def host_pids_in_pidns(init_pid: int) -> set[int]:
    """Host pids of every process in the pid namespace whose init is ``init_pid``."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return set()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == target:
                    found.add(int(entry))
    return found


def proc_start(pid: int) -> int | None:
    """A process's start time (to tell it from a later process that reused its pid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def survivors(before: dict[int, int | None]) -> list[int]:
    """Which of the processes recorded in ``before`` (pid -> start time) still run."""
    return [p for p, start in before.items() if start is not None and proc_start(p) == start]
