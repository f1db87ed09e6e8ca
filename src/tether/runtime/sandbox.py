"""The sandbox seam: what a beam's isolation looks like to the rest of Tether.

A backend (``bwrap`` here, ``runsc`` where gVisor is installed) turns a :class:`SandboxSpec`
into a running :class:`Sandbox`. Inside, the command sees only its workspace, read-only
``/run/tether`` files, loopback, and an in-beam forwarder on ``127.0.0.1:<bridge_port>`` that
relays to the host's gateway socket. Everything else (identity, TTL, attestation, API) is
the beam lifecycle's business and lives above this module.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from tether.errors import BadRequest, ConfigError

__all__ = [
    "BACKENDS",
    "Backend",
    "Leftover",
    "Limits",
    "Sandbox",
    "SandboxSpec",
    "get_backend",
]

_BEAM_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED_FILES = frozenset({"gateway.sock", "egress.sock"})


@dataclass(frozen=True)
class Limits:
    """Resource ceilings for one beam; ``None`` means no limit of that kind."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and self.memory_bytes < 1 << 20:
            raise BadRequest(f"memory limit {self.memory_bytes} bytes is below 1 MiB")
        if self.cpus is not None and not 0.01 <= self.cpus <= 1024:
            raise BadRequest(f"cpu limit {self.cpus} is outside 0.01..1024")
        if self.pids is not None and self.pids < 2:
            raise BadRequest(f"pids limit {self.pids} is below 2 (the forwarder and the command)")

    @property
    def any(self) -> bool:
        return self.memory_bytes is not None or self.cpus is not None or self.pids is not None


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to start one beam; validated when built."""

    beam_id: str
    argv: tuple[str, ...]
    # The environment and files carry the beam's token: never in a repr (or a log line).
    env: Mapping[str, str] = field(repr=False)
    workspace: Path
    files: Mapping[str, bytes] = field(repr=False)
    bridge_socket: Path
    bridge_port: int = 8080
    egress_socket: Path | None = None
    egress_port: int = 3128
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not _BEAM_ID.match(self.beam_id):
            raise BadRequest(f"beam id {self.beam_id!r} must match {_BEAM_ID.pattern}")
        if not self.argv or not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise BadRequest("argv must be a non-empty sequence of strings without NUL bytes")
        for k, v in self.env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise BadRequest(f"environment variable name {k!r} is not valid")
        for name in self.files:
            if not _FILE_NAME.match(name) or name in _RESERVED_FILES:
                raise BadRequest(
                    f"file name {name!r} must be a plain name ({_FILE_NAME.pattern}), "
                    "not a path or a reserved socket name"
                )
        ports = [self.bridge_port] + ([self.egress_port] if self.egress_socket else [])
        for port in ports:
            if not 1 <= port <= 65535:
                raise BadRequest(f"port {port} is outside 1..65535")
        if len(set(ports)) != len(ports):
            raise BadRequest("bridge_port and egress_port must differ")
        # Freeze the mappings and argv so a spec cannot change after it was checked.
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))


@dataclass(frozen=True)
class Leftover:
    """A sandbox from a previous server run that is still alive (or still has a cgroup/dir)."""

    beam_id: str
    pids: tuple[int, ...]


@runtime_checkable
class Sandbox(Protocol):
    beam_id: str
    pid: int
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader

    async def wait(self) -> int:
        """The command's exit code (128+signal when killed)."""
        ...

    async def kill(self) -> None:
        """Kill the whole process tree and remove cgroups/state; idempotent."""
        ...

    async def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Run another command inside the same sandbox."""
        ...

    def info(self) -> dict[str, Any]:
        """Backend, pid, cgroup paths, limits applied, warnings."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def available(self) -> str | None:
        """``None`` when usable, else why not (clear and actionable)."""
        ...

    async def start(self, spec: SandboxSpec) -> Sandbox: ...

    def leftovers(self) -> list[Leftover]: ...

    def reap(self, leftover: Leftover) -> None: ...


# Imported lazily: a server that never starts a beam does not load the backends.
_BACKEND_CLASSES: dict[str, tuple[str, str]] = {
    "bwrap": ("tether.runtime.bwrap", "BwrapBackend"),
    "runsc": ("tether.runtime.runsc", "RunscBackend"),
}
BACKENDS = tuple(_BACKEND_CLASSES)


def get_backend(
    name: str = "bwrap", *, state_dir: Path | None = None, strict_limits: bool = False
) -> Backend:
    """Build the named backend, or raise :class:`ConfigError` naming what is missing.

    ``state_dir`` holds one directory per live beam (``<data dir>/beams/`` in the server) so
    a restarted server can find leftovers; ``strict_limits`` turns "limits requested but this
    host cannot enforce them" from a warning in ``info()`` into a ConfigError at start.
    """
    target = _BACKEND_CLASSES.get(name)
    if target is None:
        raise ConfigError(
            f"unknown sandbox backend {name!r}", hint=f"use one of: {', '.join(BACKENDS)}"
        )
    module, cls = target
    factory: Callable[..., Backend] = getattr(importlib.import_module(module), cls)
    backend = factory(state_dir=state_dir, strict_limits=strict_limits)
    why = backend.available()
    if why is not None:
        raise ConfigError(f"sandbox backend {name!r} is not usable: {why}")
    return backend
