"""Memory, pids and CPU ceilings for beams through cgroups, v2 where it has the controllers,
v1 otherwise, per controller (hybrid hosts mount some controllers on each).

Each beam gets one cgroup per hierarchy, a child of the cgroup the server itself runs in
(``tether-<tag>-<beam id>``; ``tag`` names the state dir, so two servers on one host never
take each other's beams for leftovers). The backend puts the sandbox's first process in
before it runs anything (bwrap ``--block-fd``), so every later process inherits them.

Where a controller cannot be used (not mounted, not delegated, not writable) the reason is
returned as a warning; the backend shows it in ``info()["warnings"]`` or, when limits are
strict, refuses to start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tether.runtime.sandbox import Limits

__all__ = [
    "CONTROLLERS",
    "BeamCgroups",
    "CgroupHost",
    "Controller",
    "needed_controllers",
]

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


def needed_controllers(limits: Limits) -> tuple[str, ...]:
    """The controllers ``limits`` asks for, in a stable order."""
    wanted = {
        "memory": limits.memory_bytes is not None,
        "pids": limits.pids is not None,
        "cpu": limits.cpus is not None,
    }
    return tuple(c for c in CONTROLLERS if wanted[c])


@dataclass(frozen=True)
class Controller:
    """Where one controller lives for this process: hierarchy version and our cgroup dir."""

    name: str
    version: int  # 1 or 2
    parent: Path  # the cgroup this process is in; beams are created below it


@dataclass
class CgroupHost:
    """What this host offers, found once from ``/proc/self/cgroup`` and mountinfo.

    The paths are parameters so tests can point them at a fake tree; the real files are
    used everywhere else.
    """

    proc_cgroup: Path = Path("/proc/self/cgroup")
    mountinfo: Path = Path("/proc/self/mountinfo")
    controllers: dict[str, Controller] = field(init=False, default_factory=dict)
    problems: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._discover()

    def _discover(self) -> None:
        try:
            memberships = _parse_proc_cgroup(self.proc_cgroup.read_text())
            mounts = _parse_mountinfo(self.mountinfo.read_text())
        except OSError as e:
            for c in CONTROLLERS:
                self.problems[c] = f"cannot read cgroup membership ({e.strerror})"
            return
        v2_path = memberships.get("")
        v2_mount = mounts.get("")
        for c in CONTROLLERS:
            if c in memberships and c in mounts:
                self.controllers[c] = Controller(c, 1, _join(mounts[c], memberships[c]))
                continue
            if v2_path is not None and v2_mount is not None:
                parent = _join(v2_mount, v2_path)
                why = _v2_usable(parent, c)
                if why is None:
                    self.controllers[c] = Controller(c, 2, parent)
                else:
                    self.problems[c] = why
                continue
            self.problems[c] = f"no cgroup hierarchy has the {c} controller mounted"

    def plan(self, limits: Limits) -> tuple[list[Controller], list[str]]:
        """The controllers to use for ``limits`` and a warning per limit that cannot be set."""
        use: list[Controller] = []
        warnings: list[str] = []
        for c in needed_controllers(limits):
            if c in self.controllers:
                use.append(self.controllers[c])
            else:
                warnings.append(f"{_LIMIT_NAMES[c]} limit not applied: {self.problems[c]}")
        return use, warnings

    def create(self, name: str, limits: Limits) -> tuple[BeamCgroups, list[str]]:
        """Make the beam's cgroups and write the limits; never raises for a host shortfall."""
        use, warnings = self.plan(limits)
        made: dict[Path, tuple[int, list[str]]] = {}
        for ctl in use:
            path = ctl.parent / name
            if path in made:  # v2: one directory holds every controller
                made[path][1].append(ctl.name)
                continue
            try:
                path.mkdir(mode=0o755)
            except FileExistsError:
                pass
            except OSError as e:
                warnings.append(
                    f"{_LIMIT_NAMES[ctl.name]} limit not applied: "
                    f"cannot create {path} ({e.strerror})"
                )
                continue
            made[path] = (ctl.version, [ctl.name])
        cgroups = BeamCgroups(
            paths=tuple(made), versions={p: v for p, (v, _) in made.items()}, applied={}
        )
        for path, (version, names) in made.items():
            for c in names:
                why = _apply(path, version, c, limits)
                if why is None:
                    cgroups.applied[c] = _describe(c, limits)
                else:
                    warnings.append(f"{_LIMIT_NAMES[c]} limit not applied: {why}")
        return cgroups, warnings

    def children(self, prefix: str) -> list[Path]:
        """Cgroups named ``prefix*`` below ours, in every hierarchy (for leftovers)."""
        found: list[Path] = []
        for parent in {c.parent for c in self.controllers.values()}:
            with contextlib.suppress(OSError):
                found += [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
        return found


@dataclass
class BeamCgroups:
    """The cgroups of one beam: add its first process, list, kill and remove them."""

    paths: tuple[Path, ...]
    versions: dict[Path, int]
    applied: dict[str, str]

    def add(self, pid: int) -> None:
        for path in self.paths:
            (path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> set[int]:
        return pids_in(self.paths)

    def kill_all(self) -> None:
        kill_all(self.paths, self.versions)

    def remove(self) -> list[Path]:
        """Remove what can be removed now; returns the paths still there (busy)."""
        return remove(self.paths)

    def oom_kills(self) -> int | None:
        return oom_kills(self.paths, self.versions)


def pids_in(paths: Iterable[Path]) -> set[int]:
    """Every pid in these cgroups (as the host numbers them)."""
    pids: set[int] = set()
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(x) for x in (path / "cgroup.procs").read_text().split())
    return pids


def kill_all(paths: Iterable[Path], versions: Mapping[Path, int] | None = None) -> None:
    """SIGKILL everything in these cgroups; ``cgroup.kill`` on v2, a loop over pids on v1."""
    paths = tuple(paths)
    for path in paths:
        if (versions or {}).get(path, 1) == 2 and (path / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (path / "cgroup.kill").write_text("1")
    # v1 has no cgroup.kill; a process forking between our read and our kill is caught by
    # the next pass (the pid namespace's init dying already stops new forks in a beam).
    for _ in range(100):
        pids = pids_in(paths)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids == pids_in(paths):  # dying processes linger a moment; do not spin
            return


def remove(paths: Iterable[Path]) -> list[Path]:
    left: list[Path] = []
    for path in paths:
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            left.append(path)
    return left


def oom_kills(paths: Iterable[Path], versions: Mapping[Path, int]) -> int | None:
    """How many processes the kernel OOM-killed in the beam's memory cgroup, if known."""
    for path in paths:
        name = "memory.events" if versions.get(path) == 2 else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return None


_LIMIT_NAMES = {"memory": "memory", "pids": "pids", "cpu": "CPU"}


def _describe(controller: str, limits: Limits) -> str:
    if controller == "memory":
        return f"{limits.memory_bytes} bytes"
    if controller == "pids":
        return f"{limits.pids} processes"
    return f"{limits.cpus} CPUs"


def _apply(path: Path, version: int, controller: str, limits: Limits) -> str | None:
    """Write one controller's limit; ``None`` on success, else why not."""
    writes: list[tuple[str, str, bool]] = []  # (file, value, required)
    if controller == "memory":
        mem = str(limits.memory_bytes)
        if version == 1:
            # memsw (memory+swap) must be >= limit_in_bytes, so it is written second.
            writes += [
                ("memory.limit_in_bytes", mem, True),
                ("memory.memsw.limit_in_bytes", mem, False),
            ]
        else:
            writes += [("memory.max", mem, True), ("memory.swap.max", "0", False)]
    elif controller == "pids":
        writes.append(("pids.max", str(limits.pids), True))
    else:
        assert limits.cpus is not None
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if version == 1:
            writes += [
                ("cpu.cfs_period_us", str(CPU_PERIOD_US), True),
                ("cpu.cfs_quota_us", str(quota), True),
            ]
        else:
            writes.append(("cpu.max", f"{quota} {CPU_PERIOD_US}", True))
    for name, value, required in writes:
        try:
            (path / name).write_text(value)
        except OSError as e:
            if required:
                return f"cannot write {path / name} ({e.strerror})"
    return None


def _v2_usable(parent: Path, controller: str) -> str | None:
    """Whether children of our v2 cgroup can use ``controller`` (enabling it if we may)."""
    try:
        available = (parent / "cgroup.controllers").read_text().split()
    except OSError as e:
        return f"cannot read {parent / 'cgroup.controllers'} ({e.strerror})"
    if controller not in available:
        return (
            f"cgroup v2 at {parent} does not offer the {controller} controller "
            f"(available: {' '.join(available) or 'none'}); on a hybrid host it may be "
            "held by no v1 hierarchy either"
        )
    try:
        enabled = (parent / "cgroup.subtree_control").read_text().split()
    except OSError as e:
        return f"cannot read {parent / 'cgroup.subtree_control'} ({e.strerror})"
    if controller in enabled:
        return None
    try:
        (parent / "cgroup.subtree_control").write_text(f"+{controller}")
    except OSError as e:
        hint = (
            "the server's cgroup has processes in it (the no-internal-process rule)"
            if e.errno == errno.EBUSY
            else e.strerror
        )
        return (
            f"cannot enable {controller} for child cgroups of {parent} ({hint}); run the "
            "server in a cgroup delegated to it, e.g. a systemd unit with Delegate=yes whose "
            "own process sits in a leaf"
        )
    return None


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller name -> our path in its hierarchy; the v2 hierarchy is keyed by ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        if not names:
            out[""] = path
        for name in names.split(","):
            if name and not name.startswith("name="):
                out[name] = path
    return out


def _parse_mountinfo(text: str) -> dict[str, tuple[Path, str]]:
    """Controller name -> (mount point, root of the hierarchy it shows); v2 keyed by ``""``."""
    out: dict[str, tuple[Path, str]] = {}
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("", (point, root))
        elif fstype == "cgroup":
            for opt in options:
                if opt in CONTROLLERS or opt == "cpuacct":
                    out.setdefault(opt, (point, root))
    return out


def _join(mount: tuple[Path, str], path: str) -> Path:
    """The directory of hierarchy path ``path`` under a mount that shows ``root`` at ``point``."""
    point, root = mount
    rel = path
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root.rstrip("/")) :]
    return point / rel.lstrip("/")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape") if "\\" in field else field
