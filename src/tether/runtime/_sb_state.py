"""What a backend writes down about each live sandbox, so a restarted server can find it.

One directory per beam under the backend's state dir, holding ``state.json``: the host pids
of the sandbox's outer and init processes with their start times (a pid alone may have been
reused by the time we look), and the beam's cgroup paths. The directory exists from just
before the sandbox starts until it is fully torn down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tether.errors import ConfigError

__all__ = [
    "ProcRef",
    "SandboxState",
    "default_state_dir",
    "private_dir",
    "proc_ref",
    "state_tag",
]

STATE_FILE = "state.json"


@dataclass(frozen=True)
class ProcRef:
    """A host process by pid and start time (clock ticks since boot), immune to pid reuse."""

    pid: int
    start: int

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start

    def kill(self) -> None:
        """SIGKILL it if it is still the same process (pidfd: no window for reuse)."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return
        try:
            if _start_time(self.pid) == self.start:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)


def proc_ref(pid: int) -> ProcRef | None:
    start = _start_time(pid)
    return None if start is None else ProcRef(pid, start)


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5); 20 after pid, comm and state
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class SandboxState:
    beam_id: str
    backend: str
    outer: ProcRef | None
    init: ProcRef | None
    cgroups: tuple[str, ...]

    def write(self, beam_dir: Path) -> None:
        tmp = beam_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(beam_dir / STATE_FILE)

    @classmethod
    def read(cls, beam_dir: Path) -> SandboxState | None:
        try:
            d = json.loads((beam_dir / STATE_FILE).read_text())
            return cls(
                beam_id=str(d["beam_id"]),
                backend=str(d["backend"]),
                outer=ProcRef(**d["outer"]) if d.get("outer") else None,
                init=ProcRef(**d["init"]) if d.get("init") else None,
                cgroups=tuple(str(c) for c in d.get("cgroups", ())),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def live_pids(self) -> tuple[int, ...]:
        from tether.runtime.cgroups import pids_in

        pids = {r.pid for r in (self.outer, self.init) if r is not None and r.alive()}
        pids |= pids_in(Path(c) for c in self.cgroups)
        return tuple(sorted(pids))


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def state_tag(state_dir: Path) -> str:
    """Short name of a state dir, carried in cgroup names so servers do not mix beams."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def private_dir(path: Path) -> Path:
    """Create (or accept) a directory only this user can enter; refuse anything else."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{path} is not a private directory of this user; refusing to keep sandbox state there",
            hint="remove it, or give the backend another state_dir",
        )
    return path


def default_state_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"tether-sandboxes-{os.getuid()}"
