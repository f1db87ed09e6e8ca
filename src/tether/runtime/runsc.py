"""The runsc (gVisor) backend: the same beam layout as bwrap, behind gVisor's user-space kernel.

Where bwrap narrows the host kernel with namespaces and a seccomp filter, gVisor puts its
own kernel (the Sentry) between the beam and the host: the beam's syscalls are implemented
by gVisor, which itself runs under a tight host seccomp filter. The filesystem view is the
one bwrap gives (see ``bwrap.py``), declared as an OCI bundle; the network is
``--network=none`` (loopback only); the bridge socket is reached with ``--host-uds=open``.
The forwarder is pid 1 here too; it reads its launch description from a 0600 file in the
beam's state directory (gVisor passes no extra fds), mounted read-only.

Memory and CPU limits go into the OCI ``linux.resources`` and runsc applies them through
cgroups (with neither, ``--ignore-cgroups``). A pids limit is not applied (a warning in
``info()``, a refusal when limits are strict): the host cgroup would count gVisor's own
threads, not the beam's processes, and starve the sandbox. Modest on purpose: no
checkpoint, no GPU, no rootless mode. Every command goes through
``runsc --root <state dir>/.runsc``, so ``runsc list`` there is the list of this server's
beams (and of leftovers after a crash).
"""

from __future__ import annotations

import asyncio
import json
import marshal
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.errors import ConfigError
from tether.runtime import forwarder as _forwarder_module
from tether.runtime._sb_state import (
    SandboxState,
    default_state_dir,
    private_dir,
    proc_ref,
    remove_dir,
    state_tag,
)
from tether.runtime.bwrap import (
    _SYNTHETIC_ETC,
    EGRESS_SOCK,
    ETC_PIECES,
    GATEWAY_SOCK,
    INIT_DIR,
    ROOT_LINKS,
    RUN_DIR,
    TEARDOWN_BACKSTOP_S,
    WORKSPACE,
    SandboxError,
    _checked_dir,
    _checked_socket,
    _compiled,
    _python_roots,
)
from tether.runtime.cgroups import CPU_PERIOD_US
from tether.runtime.sandbox import Leftover, SandboxSpec

__all__ = ["RunscBackend", "RunscSandbox", "find_runsc"]

_PROBE_TIMEOUT_S = 60
# gVisor maps no user namespace here: the beam runs as the server's own uid (root) inside the
# Sentry, with no capabilities, so it owns its workspace as bwrap's mapped uid does.
_USER = os.geteuid()


def find_runsc() -> str | None:
    return shutil.which("runsc") or next(
        (p for p in ("/usr/bin/runsc", "/usr/local/bin/runsc") if os.access(p, os.X_OK)), None
    )


class RunscBackend:
    """Starts beams with gVisor's runsc. Needs root (runsc's rootful mode)."""

    name = "runsc"

    def __init__(
        self,
        state_dir: Path | None = None,
        strict_limits: bool = False,
        *,
        runsc: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.strict_limits = strict_limits
        self.runsc = runsc if runsc is not None else find_runsc()
        self.python = os.path.realpath(sys.executable)
        self.forwarder_source = os.path.realpath(_forwarder_module.__file__)
        self._why_not: str | None = None
        self._probed = False
        self._live: set[str] = set()

    @property
    def root(self) -> Path:
        return self.state_dir / ".runsc"

    def _cmd(self, *args: str) -> list[str]:
        assert self.runsc is not None
        return [self.runsc, "--root", str(self.root), *args]

    def available(self) -> str | None:
        if not self._probed:
            self._why_not = self._probe()
            self._probed = True
        return self._why_not

    def _probe(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"gVisor needs Linux (this is {sys.platform})"
        if self.runsc is None:
            return (
                "runsc (gVisor) is not installed: install it (Debian: apt-get install runsc; "
                "or https://gvisor.dev/docs/user_guide/install/) or use the bwrap backend"
            )
        if os.geteuid() != 0:
            return "the runsc backend runs gVisor rootful and needs the server to run as root"
        try:
            private_dir(self.state_dir)
            private_dir(self.root)
        except ConfigError as e:
            return e.message
        probe = self._cmd("--network=none", "--ignore-cgroups", "do", "/bin/true")
        try:
            res = subprocess.run(  # noqa: S603 - our own runsc binary, fixed arguments
                probe, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run {self.runsc}: {e}"
        if res.returncode != 0:
            said = res.stderr.strip().splitlines()[-1:] or ["no message"]
            return f"runsc cannot start a sandbox here: {said[0]}"
        return None

    async def start(self, spec: SandboxSpec) -> RunscSandbox:
        why = self.available()
        if why is not None:
            raise ConfigError(f"the runsc backend is not usable: {why}")
        workspace = _checked_dir(spec.workspace, "workspace")
        sockets = [(spec.bridge_socket, GATEWAY_SOCK, spec.bridge_port)]
        if spec.egress_socket is not None:
            sockets.append((spec.egress_socket, EGRESS_SOCK, spec.egress_port))
        for path, _, _ in sockets:
            _checked_socket(path)
        beam_dir = private_dir(self.state_dir) / spec.beam_id
        try:
            beam_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(
                f"beam {spec.beam_id} already has a sandbox (or a leftover)"
            ) from None
        warnings = []
        if spec.limits.pids is not None:
            warnings.append(
                "pids limit not applied: under runsc the host cgroup counts gVisor's own "
                "threads, not the beam's processes (a limit there starves the sandbox)"
            )
            if self.strict_limits:
                remove_dir(beam_dir)
                raise ConfigError(
                    "beam limits cannot be enforced on this backend: " + "; ".join(warnings),
                    hint="use the bwrap backend for a pids limit, or drop strict limits",
                )
        self._live.add(spec.beam_id)
        try:
            bundle = self._bundle(spec, beam_dir, workspace, sockets)
            cid = spec.beam_id
            flags = ["--network=none", "--host-uds=open"]
            if spec.limits.memory_bytes is None and spec.limits.cpus is None:
                flags.append("--ignore-cgroups")
            proc = await asyncio.create_subprocess_exec(
                *self._cmd(*flags, "run", "--bundle", str(bundle), cid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            remove_dir(beam_dir)
            self._live.discard(spec.beam_id)
            raise
        SandboxState(spec.beam_id, self.name, proc_ref(proc.pid), None, ()).write(beam_dir)
        return RunscSandbox(self, spec, proc, beam_dir, warnings)

    def _bundle(
        self,
        spec: SandboxSpec,
        beam_dir: Path,
        workspace: str,
        sockets: list[tuple[Path, str, int]],
    ) -> Path:
        bundle = beam_dir / "bundle"
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/tmp",  # noqa: S108 - the beam's own tmpfs
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev"],
            },
        ]

        def bind(src: str, dest: str, ro: bool = True) -> None:
            target = rootfs / dest.lstrip("/")
            if os.path.isdir(src):
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch(exist_ok=True)
            opts = ["rbind", "ro" if ro else "rw", "nosuid", "nodev"]
            mounts.append({"destination": dest, "type": "bind", "source": src, "options": opts})

        bind("/usr", "/usr")
        for name in ROOT_LINKS:
            host = Path("/") / name
            if host.is_symlink():
                (rootfs / name).symlink_to(os.readlink(host))
            elif host.is_dir():
                bind(str(host), str(host))
        for piece in ETC_PIECES:
            host = Path("/etc") / piece
            if host.exists():
                bind(str(host), str(host))
        etc = beam_dir / "etc"
        etc.mkdir()
        for name, text in _SYNTHETIC_ETC.items():
            (etc / name).write_text(text)
            (etc / name).chmod(0o644)
            bind(str(etc / name), f"/etc/{name}")
        for prefix in _python_roots():
            bind(prefix, prefix)
        bind(workspace, WORKSPACE, ro=False)
        files = beam_dir / "files"
        files.mkdir(mode=0o755)
        for name, data in sorted(spec.files.items()):
            (files / name).write_bytes(data)
            (files / name).chmod(0o400)
            bind(str(files / name), f"{RUN_DIR}/{name}")
        for host_path, inside, _ in sockets:
            bind(str(host_path), inside)
        init = beam_dir / "init"
        init.mkdir(mode=0o755)
        forwarder = _compiled(self.forwarder_source, init)
        launch = init / "launch"
        launch.write_bytes(
            marshal.dumps(
                {
                    "argv": list(spec.argv),
                    "env": dict(spec.env),
                    "listen": [(port, inside) for _, inside, port in sockets],
                    "cwd": WORKSPACE,
                }
            )
        )
        launch.chmod(0o400)
        bind(str(init), INIT_DIR)
        caps: dict[str, list[str]] = {
            k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
        }
        config: dict[str, Any] = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": _USER, "gid": _USER},
                "args": [
                    self.python,
                    "-I",
                    "-S",
                    f"{INIT_DIR}/{Path(forwarder).name}",
                    "launch-file",
                    f"{INIT_DIR}/launch",
                ],
                "env": [],
                "cwd": WORKSPACE,
                "capabilities": caps,
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": spec.beam_id,
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                "resources": _resources(spec),
                "cgroupsPath": f"/tether-{state_tag(self.state_dir)}-{spec.beam_id}",
            },
        }
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def leftovers(self) -> list[Leftover]:
        found: dict[str, Leftover] = {}
        if self.state_dir.is_dir():
            for d in sorted(self.state_dir.iterdir()):
                if d.name.startswith(".") or d.name in self._live or not d.is_dir():
                    continue
                st = SandboxState.read(d)
                found[d.name] = Leftover(d.name, st.live_pids() if st else ())
        for cid in self._containers():
            if cid not in self._live and cid not in found:
                found[cid] = Leftover(cid, ())
        return list(found.values())

    def _containers(self) -> list[str]:
        if self.runsc is None or not self.root.is_dir():
            return []
        try:
            res = subprocess.run(  # noqa: S603 - our own runsc binary, fixed arguments
                self._cmd("list", "--quiet"),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def reap(self, leftover: Leftover) -> None:
        if leftover.beam_id in self._live:
            raise SandboxError(f"beam {leftover.beam_id} belongs to this server; kill() it instead")
        self._destroy(leftover.beam_id)
        st = SandboxState.read(self.state_dir / leftover.beam_id)
        if st is not None and st.outer is not None:
            st.outer.kill()
        for pid in leftover.pids:
            ref = proc_ref(pid)
            if ref is not None:
                ref.kill()
        remove_dir(self.state_dir / leftover.beam_id)

    def _destroy(self, cid: str) -> None:
        for args in (("kill", "--all", cid, "KILL"), ("delete", "--force", cid)):
            cmd = self._cmd(*args)
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)  # noqa: S603


class RunscSandbox:
    def __init__(
        self,
        backend: RunscBackend,
        spec: SandboxSpec,
        proc: asyncio.subprocess.Process,
        beam_dir: Path,
        warnings: list[str],
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self._warnings = warnings
        self.beam_id = spec.beam_id
        self.pid = proc.pid
        self.stdout: asyncio.StreamReader = proc.stdout
        self.stderr: asyncio.StreamReader = proc.stderr
        self._backend = backend
        self._spec = spec
        self._proc = proc
        self._dir = beam_dir
        self._cleaned = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RunscSandbox(beam_id={self.beam_id!r}, pid={self.pid})"

    async def wait(self) -> int:
        rc = await self._proc.wait()
        await self._cleanup()
        return 128 - rc if rc < 0 else rc

    async def kill(self) -> None:
        if self._proc.returncode is None:
            await asyncio.to_thread(self._backend._destroy, self.beam_id)
            try:
                await asyncio.wait_for(self._proc.wait(), TEARDOWN_BACKSTOP_S)
            except TimeoutError:
                self._proc.send_signal(signal.SIGKILL)
                await self._proc.wait()
        await self._cleanup()

    async def _cleanup(self) -> None:
        async with self._lock:
            if self._cleaned:
                return
            await asyncio.to_thread(self._backend._destroy, self.beam_id)
            remove_dir(self._dir)
            self._backend._live.discard(self.beam_id)
            self._cleaned = True

    async def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise SandboxError("exec needs a non-empty argv of strings without NUL bytes")
        if self._proc.returncode is not None or self._cleaned:
            raise SandboxError(f"beam {self.beam_id} is not running")
        env = dict(self._spec.env if env is None else env)
        # The process description goes in a 0600 file: an --env flag would show the token
        # to anyone running ps on the host.
        process = {
            "terminal": False,
            "user": {"uid": _USER, "gid": _USER},
            "args": list(argv),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": WORKSPACE,
            "noNewPrivileges": True,
        }
        path = self._dir / f"exec-{time.monotonic_ns()}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(process, f)
        return await asyncio.create_subprocess_exec(
            *self._backend._cmd("exec", "--process", str(path), self.beam_id),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def info(self) -> dict[str, Any]:
        limits = self._spec.limits
        applied = {
            k: v
            for k, v in (
                ("memory", f"{limits.memory_bytes} bytes" if limits.memory_bytes else None),
                ("cpu", f"{limits.cpus} CPUs" if limits.cpus else None),
            )
            if v
        }
        return {
            "backend": "runsc",
            "runsc": self._backend.runsc,
            "pid": self.pid,
            "namespaces": ["gVisor sentry", "pid", "net", "ipc", "uts", "mount"],
            "seccomp": "gVisor's own host filter (syscalls are served by the sentry)",
            "no_new_privs": True,
            "capabilities": [],
            "limits": applied,
            "warnings": list(self._warnings),
            "ports": {
                "bridge": self._spec.bridge_port,
                **({"egress": self._spec.egress_port} if self._spec.egress_socket else {}),
            },
        }


def _resources(spec: SandboxSpec) -> dict[str, Any]:
    res: dict[str, Any] = {}
    limits = spec.limits
    if limits.memory_bytes is not None:
        res["memory"] = {"limit": limits.memory_bytes, "swap": limits.memory_bytes}
    if limits.cpus is not None:
        res["cpu"] = {"quota": int(limits.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    return res
