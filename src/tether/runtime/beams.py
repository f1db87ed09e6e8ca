"""What a beam is asked to be: the validated request, its limits, and the errors beams raise.

Everything here is pure (no I/O), so the API and the CLI reject bad input the same way and
with the same words: a bad TTL, memory size, CPU or pids limit, an empty command, an unknown
backend, a malformed grant or domain each raise :class:`~tether.errors.BadRequest` naming the
field and what would be accepted. The lifecycle (identity, attestation, sandbox, TTL) lives in
:mod:`tether.runtime.supervisor`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.config import parse_duration
from tether.errors import BadRequest, ConfigError, TetherError
from tether.identity.claims import parse_grants
from tether.runtime.sandbox import BACKENDS, Limits

__all__ = [
    "BEAM_ID",
    "DEFAULT_TTL",
    "MAX_ARGV",
    "MAX_ARGV_BYTES",
    "MAX_OBJECTIVE_BYTES",
    "MAX_TOOLS",
    "MIN_TTL",
    "BackendUnavailable",
    "BeamConflict",
    "BeamRequest",
    "new_beam_id",
    "parse_argv",
    "parse_beam_request",
    "parse_cpus",
    "parse_domain",
    "parse_memory",
    "parse_ttl",
]

DEFAULT_TTL = "15m"
MIN_TTL = 1.0
MAX_OBJECTIVE_BYTES = 4096
MAX_ARGV = 256
MAX_ARGV_BYTES = 8192
MAX_TOOLS = 32
MAX_TOOL_BYTES = 16 * 1024
MAX_DOMAINS = 32

BEAM_ID = re.compile(r"^b-[0-9a-f]{12}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*(?::\d{{1,5}})?$")


class BackendUnavailable(TetherError):
    """The requested sandbox backend cannot run on this host (the message says why)."""

    code = "backend_unavailable"
    status = 503


class BeamConflict(TetherError):
    """The beam is not in a state that allows this (exec on an ended beam, rm of a live one)."""

    code = "conflict"
    status = 409


def new_beam_id() -> str:
    """48 random bits: unique enough per data dir, short enough for socket paths and ps."""
    return "b-" + secrets.token_hex(6)


def parse_ttl(value: str | float | int) -> float:
    """``"15m"``, ``"90s"``, ``"1h30m"`` or seconds; at least :data:`MIN_TTL`."""
    if isinstance(value, bool):
        raise BadRequest(f"invalid ttl {value!r}: use a duration such as 30s, 15m or 1h30m")
    try:
        ttl = parse_duration(value)
    except ConfigError as e:
        raise BadRequest(f"invalid ttl {str(value)[:40]!r}: use e.g. 30s, 15m or 1h30m") from e
    if ttl < MIN_TTL:
        raise BadRequest(f"ttl {str(value)[:40]!r} is shorter than the minimum {MIN_TTL:g}s")
    return ttl


def parse_memory(value: str | int | None) -> int | None:
    """``"2G"``, ``"512M"``, ``"1.5GiB"`` or bytes (binary units) -> bytes; None = no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("invalid memory size: use e.g. 512M or 2G")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value).strip().lower())
        if m is None:
            raise BadRequest(
                f"invalid memory size {str(value)[:40]!r}: use bytes or a number with K, M, G "
                "or T (e.g. 512M, 2G)"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n < 1 << 20:
        raise BadRequest(f"memory size {str(value)[:40]!r} is below the minimum of 1M")
    if n > 1 << 50:
        raise BadRequest(f"memory size {str(value)[:40]!r} is larger than any machine")
    return n


def parse_cpus(value: float | int | str | None) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        cpus = float(value)
        if cpus != cpus:  # NaN compares unequal to itself
            raise ValueError
    except (TypeError, ValueError) as e:
        raise BadRequest(f"invalid cpus {str(value)[:40]!r}: use a number such as 0.5 or 2") from e
    if not 0.01 <= cpus <= 1024:
        raise BadRequest(f"cpus {cpus:g} is outside 0.01..1024")
    return cpus


def parse_pids(value: int | str | None) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
            raise ValueError
        pids = int(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadRequest(f"invalid pids limit {str(value)[:40]!r}: use a whole number") from e
    if not 2 <= pids <= 4_194_304:
        raise BadRequest(f"pids limit {pids} is outside 2..4194304")
    return pids


def parse_domain(value: str) -> str:
    """An ``--allow-domain`` value: a host name, optionally ``*.``-prefixed and ``:port``-ed."""
    if not isinstance(value, str):
        raise BadRequest("allow_domains must be a list of host names")
    d = value.strip().lower().rstrip(".")
    if len(d) > 253 or not _DOMAIN.match(d):
        raise BadRequest(
            f"invalid domain {value[:80]!r}: a host name such as api.github.com, "
            "*.example.org or pypi.org:443"
        )
    port = d.partition(":")[2]
    if port and not 1 <= int(port) <= 65535:
        raise BadRequest(f"invalid port in domain {value[:80]!r}")
    return d


def parse_argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise BadRequest("argv must be a non-empty list: the command to run and its arguments")
    if len(value) > MAX_ARGV:
        raise BadRequest(f"argv has {len(value)} arguments; at most {MAX_ARGV}")
    if not all(isinstance(a, str) for a in value):
        raise BadRequest("argv must be a list of strings")
    if not value[0]:
        raise BadRequest("argv[0] (the command) is empty")
    if any("\0" in a for a in value):
        raise BadRequest("argv must not contain NUL bytes")
    if sum(len(a.encode()) for a in value) > MAX_ARGV_BYTES:
        raise BadRequest(f"argv is longer than {MAX_ARGV_BYTES} bytes")
    return tuple(value)


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(t, dict) for t in value):
        raise BadRequest("tools must be a list of tool definitions (JSON objects)")
    if len(value) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tool definitions")
    return tuple(value)


@dataclass(frozen=True)
class BeamRequest:
    """A validated request for a beam. Build with :func:`parse_beam_request`."""

    objective: str
    argv: tuple[str, ...]
    ttl: float
    grants: tuple[str, ...] = ()  # as asked, plus ``egress:D`` for each allowed domain
    workspace: Path | None = None
    keep_workspace: bool = False
    limits: Limits = field(default_factory=Limits)
    allow_domains: tuple[str, ...] = ()
    backend: str = "bwrap"
    tools: tuple[dict[str, Any], ...] = ()

    def summary(self) -> dict[str, Any]:
        """The request as policy and approvals see it (the action's arguments)."""
        return {
            "argv": list(self.argv),
            "grants": list(self.grants),
            "ttl_s": int(self.ttl),
            "backend": self.backend,
            "workspace": str(self.workspace) if self.workspace else None,
            "keep_workspace": self.keep_workspace,
            "memory_bytes": self.limits.memory_bytes,
            "cpus_milli": None if self.limits.cpus is None else int(self.limits.cpus * 1000),
            "pids": self.limits.pids,
            "allow_domains": list(self.allow_domains),
        }


def parse_beam_request(body: Mapping[str, Any], *, default_backend: str = "bwrap") -> BeamRequest:
    """Validate a beam request (the API's JSON body). Raises BadRequest naming the field."""
    unknown = set(body) - _FIELDS
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r} in a beam request")
    objective = body.get("objective")
    if not isinstance(objective, str) or not objective.strip():
        raise BadRequest("objective is required: say what the beam is for")
    if len(objective.encode()) > MAX_OBJECTIVE_BYTES:
        raise BadRequest(f"objective is longer than {MAX_OBJECTIVE_BYTES} bytes")
    argv = parse_argv(body.get("argv"))
    ttl = parse_ttl(body.get("ttl", DEFAULT_TTL))
    backend = body.get("backend") or default_backend
    if backend not in BACKENDS:
        raise BadRequest(f"unknown backend {str(backend)[:40]!r} (one of {', '.join(BACKENDS)})")
    raw_grants = body.get("grants") or []
    if not isinstance(raw_grants, list | tuple) or not all(isinstance(g, str) for g in raw_grants):
        raise BadRequest("grants must be a list of 'KIND:PATTERN' strings")
    domains_in = body.get("allow_domains") or []
    if not isinstance(domains_in, list | tuple):
        raise BadRequest("allow_domains must be a list of host names")
    if len(domains_in) > MAX_DOMAINS:
        raise BadRequest(f"at most {MAX_DOMAINS} allowed domains")
    domains = tuple(dict.fromkeys(parse_domain(d) for d in domains_in))
    grants = tuple(dict.fromkeys([*raw_grants, *(f"egress:{d}" for d in domains)]))
    parse_grants(grants)  # BadRequest naming the malformed grant
    workspace = body.get("workspace")
    if workspace is not None:
        if not isinstance(workspace, str) or not workspace:
            raise BadRequest("workspace must be an absolute directory path")
        ws = Path(workspace)
        if not ws.is_absolute():
            raise BadRequest(f"workspace {workspace[:120]!r} must be an absolute path")
    keep = body.get("keep_workspace", False)
    if not isinstance(keep, bool):
        raise BadRequest("keep_workspace must be true or false")
    limits = Limits(
        memory_bytes=parse_memory(body.get("memory")),
        cpus=parse_cpus(body.get("cpus")),
        pids=parse_pids(body.get("pids")),
    )
    return BeamRequest(
        objective=objective,
        argv=argv,
        ttl=ttl,
        grants=grants,
        workspace=Path(workspace) if workspace else None,
        keep_workspace=keep,
        limits=limits,
        allow_domains=domains,
        backend=str(backend),
        tools=_tools(body.get("tools")),
    )


_FIELDS = frozenset(
    {
        "objective",
        "argv",
        "ttl",
        "grants",
        "workspace",
        "keep_workspace",
        "memory",
        "cpus",
        "pids",
        "allow_domains",
        "backend",
        "tools",
    }
)


def short_list(items: Sequence[str], limit: int = 6) -> str:
    """``a, b, c (+4 more)``: lists in messages stay one readable line."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
