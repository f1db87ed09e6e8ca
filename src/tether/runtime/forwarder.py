"""Pid 1 of a beam: bind the loopback listeners, start the command, relay, reap, exit with it.

A beam's network namespace holds nothing but ``lo``. Its way out is a unix socket bound at
``/run/tether/gateway.sock`` (and ``egress.sock``); this process listens on
``127.0.0.1:<port>`` for each and relays every TCP connection to its socket, so an
unmodified HTTP client (``OPENAI_BASE_URL=http://127.0.0.1:8080/v1``) works.

Started by bwrap as ``python -I -S forwarder.py launch <fd>`` where ``fd`` holds the launch
description (marshal: argv, env, listeners, cwd, control fd), never on a command line, since
the environment carries the beam's token. The listeners are bound *before* the command is
forked, so its first connection cannot race them. Being pid 1 it also reaps orphans, and
when the command exits it exits with the command's code, which ends the pid namespace and
with it every process the command left behind.

The control socket (``exec``): the host sends a request (argv, env) with one end of a fresh
socketpair; the host-side client (``exec-client`` mode, run on the host by the backend)
sends its own stdin/stdout/stderr over the other end; the command is forked here, inside
every wall of the beam, and its exit code goes back on the pair. If the client goes away,
the command's process group is killed.

It imports only built-in and extension modules (no ``os``, ``socket``, ``selectors``,
nothing from Tether): start time is the beam's start time. Exit codes of its own: 125 bad
launch description or listener, 126/127 command not executable / not found.
"""

# contextlib would cost the beam milliseconds of start time, hence plain try/except (SIM105);
# marshal data comes only from the host backend that started us (S302).
# ruff: noqa: SIM105, S302

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; signal would import enum
import _socket
import marshal
import posix
import select
import sys

TYPE_CHECKING = False  # typing costs milliseconds at start; only the checker needs it
if TYPE_CHECKING:
    from typing import Any

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP = select.EPOLLERR, select.EPOLLHUP
_CHUNK = 65536
_SIGNALS_FORWARDED = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT)
_RESET_IN_CHILD = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD, *_SIGNALS_FORWARDED)


def _say(msg: str) -> None:
    try:
        posix.write(2, f"tether-forwarder: {msg}\n".encode())
    except OSError:
        pass


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = posix.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _exit_code(status: int) -> int:
    code = posix.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _which(name: str, env: dict[str, str]) -> str:
    if "/" in name:
        return name
    for d in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
        path = f"{d or '.'}/{name}"
        if posix.access(path, posix.X_OK):
            return path
    return name


def _exec(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """In a forked child: restore what Python changed, then become the command."""
    for sig in _RESET_IN_CHILD:
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.set_wakeup_fd(-1)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    try:
        posix.chdir(cwd)
        posix.execve(_which(argv[0], env), argv, env)
    except OSError as e:
        _say(f"cannot run {argv[0]!r}: {e.strerror}")
        posix._exit(127 if isinstance(e, FileNotFoundError) else 126)


class _Link:
    """One relayed connection: TCP from the beam's client <-> unix socket to the gateway."""

    __slots__ = ("ends", "eof", "pending", "shut")

    def __init__(self, a: _socket.socket, b: _socket.socket) -> None:
        self.ends = (a, b)
        self.pending = [b"", b""]  # bytes waiting to be written to end i
        self.eof = [False, False]  # end i has sent EOF
        self.shut = [False, False]  # we have shut down writing to end i


class Forwarder:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.argv: list[str] = cfg["argv"]
        self.env: dict[str, str] = cfg["env"]
        self.cwd: str = cfg.get("cwd", "/")
        if not isinstance(self.argv, list) or not self.argv:
            raise ValueError("argv must be a non-empty list")
        if not isinstance(self.env, dict) or not isinstance(cfg["listen"], list):
            raise ValueError("env must be a dict and listen a list")
        self.ep = select.epoll()
        self.listeners: dict[int, tuple[_socket.socket, str]] = {}
        self.links: dict[int, tuple[_Link, int]] = {}
        self.execs: dict[int, _socket.socket] = {}  # command pid -> its client socket
        self.exec_socks: dict[int, tuple[_socket.socket, bytes]] = {}  # fd -> (sock, request)
        self.running_execs: dict[int, int] = {}  # client fd -> command pid
        self.ctl: _socket.socket | None = None
        self.child = 0
        self.pending_signals: list[int] = []
        self.warned = False

    # -- setup ----------------------------------------------------------------------------

    def listen(self) -> None:
        for port, path in self.cfg["listen"]:
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1024)
            s.setblocking(False)
            self.listeners[s.fileno()] = (s, path)
            self.ep.register(s.fileno(), EPOLLIN)

    def start(self) -> None:
        rfd, wfd = posix.pipe()
        posix.set_blocking(wfd, False)
        self.wake = rfd
        self.ep.register(rfd, EPOLLIN)
        _signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, self._on_signal)
        for sig in _SIGNALS_FORWARDED:
            _signal.signal(sig, self._on_signal)
        ctl_fd = self.cfg.get("ctl_fd")
        if ctl_fd is not None:
            self.ctl = _socket.socket(fileno=ctl_fd)
            posix.set_inheritable(ctl_fd, False)
            self.ctl.setblocking(False)
            self.ep.register(ctl_fd, EPOLLIN)
        pid = posix.fork()
        if pid == 0:
            _exec(self.argv, self.env, self.cwd)
        self.child = pid

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != _signal.SIGCHLD:
            self.pending_signals.append(signum)

    # -- loop -----------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            try:
                events = self.ep.poll()
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self.wake:
                    code = self._wake()
                    if code is not None:
                        return code
                elif fd in self.links:
                    self._link_event(fd, ev)
                elif fd in self.listeners:
                    self._accept(fd)
                elif self.ctl is not None and fd == self.ctl.fileno():
                    self._ctl_event()
                elif fd in self.exec_socks:
                    self._exec_request(fd)
                elif fd in self.running_execs:
                    self._exec_client_gone(fd)

    def _wake(self) -> int | None:
        try:
            posix.read(self.wake, 512)
        except BlockingIOError:
            pass
        while self.pending_signals:
            sig = self.pending_signals.pop()
            try:
                posix.kill(self.child, sig)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, status = posix.waitpid(-1, posix.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            if pid == self.child:
                return _exit_code(status)
            client = self.execs.pop(pid, None)
            if client is not None:
                self.running_execs.pop(client.fileno(), None)
                try:
                    self.ep.unregister(client.fileno())
                    client.send(_exit_code(status).to_bytes(4, "little", signed=True))
                except OSError:
                    pass
                client.close()

    # -- relay ----------------------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        lsock, path = self.listeners[fd]
        while True:
            try:
                cfd, _ = lsock._accept()  # type: ignore[attr-defined]  # no stub
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: refuse this one, keep serving
                _say(f"accept failed: {e.strerror}")
                return
            a = _socket.socket(fileno=cfd)
            a.setblocking(False)
            a.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            b = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            b.setblocking(False)
            try:
                b.connect(path)
            except OSError as e:
                if not self.warned:
                    self.warned = True
                    _say(f"cannot reach {path}: {e.strerror or e}")
                a.close()
                b.close()
                continue
            link = _Link(a, b)
            self.links[a.fileno()] = (link, 0)
            self.links[b.fileno()] = (link, 1)
            self.ep.register(a.fileno(), EPOLLIN)
            self.ep.register(b.fileno(), EPOLLIN)

    def _link_event(self, fd: int, ev: int) -> None:
        link, i = self.links[fd]
        j = 1 - i
        if ev & EPOLLERR:
            self._close(link)
            return
        try:
            if ev & EPOLLOUT and link.pending[i]:
                self._flush(link, i)
            if ev & (EPOLLIN | EPOLLHUP) and not link.eof[i] and not link.pending[j]:
                data = link.ends[i].recv(_CHUNK)
                if data:
                    link.pending[j] = data
                    self._flush(link, j)
                else:
                    link.eof[i] = True
                    if not link.pending[j]:
                        self._shut(link, j)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(link)
            return
        if link.eof[0] and link.eof[1] and not link.pending[0] and not link.pending[1]:
            self._close(link)
            return
        self._rearm(link)

    def _flush(self, link: _Link, j: int) -> None:
        data = link.pending[j]
        try:
            sent = link.ends[j].send(data)
        except BlockingIOError:
            sent = 0
        link.pending[j] = data[sent:]
        if not link.pending[j] and link.eof[1 - j]:
            self._shut(link, j)

    def _shut(self, link: _Link, j: int) -> None:
        if not link.shut[j]:
            link.shut[j] = True
            try:
                link.ends[j].shutdown(_socket.SHUT_WR)
            except OSError:
                pass

    def _rearm(self, link: _Link) -> None:
        for i in (0, 1):
            mask = 0
            if not link.eof[i] and not link.pending[1 - i]:
                mask |= EPOLLIN
            if link.pending[i]:
                mask |= EPOLLOUT
            self.ep.modify(link.ends[i].fileno(), mask)

    def _close(self, link: _Link) -> None:
        for s in link.ends:
            self.links.pop(s.fileno(), None)
            try:
                self.ep.unregister(s.fileno())
            except (OSError, ValueError):
                pass
            s.close()

    # -- exec -----------------------------------------------------------------------------

    def _ctl_event(self) -> None:
        assert self.ctl is not None
        try:
            msg, anc, _, _ = self.ctl.recvmsg(1 << 20, _socket.CMSG_SPACE(4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, anc = b"", []
        fds = _fds(anc)
        if not msg and not fds:  # the host closed the control socket
            self.ep.unregister(self.ctl.fileno())
            self.ctl.close()
            self.ctl = None
            return
        if len(fds) != 1:
            for fd in fds:
                posix.close(fd)
            return
        client = _socket.socket(fileno=fds[0])
        posix.set_inheritable(fds[0], False)
        client.setblocking(False)
        self.exec_socks[client.fileno()] = (client, msg)
        self.ep.register(client.fileno(), EPOLLIN)

    def _exec_request(self, fd: int) -> None:
        client, request = self.exec_socks.pop(fd)
        self.ep.unregister(fd)
        try:
            _, anc, _, _ = client.recvmsg(16, _socket.CMSG_SPACE(4 * 3))
        except OSError:
            anc = []
        fds = _fds(anc)
        try:
            argv, env = marshal.loads(request)
            if len(fds) != 3 or not argv:
                raise ValueError("bad exec request")
        except (ValueError, EOFError, TypeError):
            for x in fds:
                posix.close(x)
            client.close()
            return
        pid = posix.fork()
        if pid == 0:
            posix.setpgid(0, 0)
            for target, src in enumerate(fds):
                posix.dup2(src, target)
            for src in fds:
                if src > 2:
                    posix.close(src)
            _exec(argv, env, self.cwd)
        for x in fds:
            posix.close(x)
        self.execs[pid] = client
        self.running_execs[client.fileno()] = pid
        self.ep.register(client.fileno(), EPOLLIN)

    def _exec_client_gone(self, fd: int) -> None:
        pid = self.running_execs.pop(fd)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        try:
            posix.killpg(pid, _signal.SIGKILL)
        except OSError:
            pass


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[k : k + 4], sys.byteorder) for k in range(0, usable, 4)]
    return fds


def launch(cfg_fd: int) -> int:
    try:
        cfg = marshal.loads(_read_all(cfg_fd))
        posix.close(cfg_fd)
        fwd = Forwarder(cfg)
        fwd.listen()
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        _say(f"cannot start: {e}")
        return 125
    go_fd = cfg.get("go_fd")
    if go_fd is not None:
        # The host releases us with one byte once we are in the beam's cgroups; EOF means it
        # gave up or died mid-start, and then nothing of the command may run.
        try:
            released = posix.read(go_fd, 1) == b"1"
        except OSError:
            released = False
        posix.close(go_fd)
        if not released:
            _say("not released by the host (limits not in place); not starting the command")
            return 125
    fwd.start()
    return fwd.run()


def exec_client(fd: int) -> int:
    """On the host: hand our stdio to the beam's command and exit with its code."""
    sock = _socket.socket(fileno=fd)
    try:
        sock.sendmsg([b"s"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _pack_fds([0, 1, 2]))])
    except OSError as e:
        _say(f"the beam is not running ({e.strerror})")
        return 125
    # Our copies must not hold the pipes open: EOF is when the command closes them.
    null = posix.open("/dev/null", posix.O_RDWR)
    for target in (0, 1, 2):
        posix.dup2(null, target)
    try:
        data = sock.recv(4)
    except OSError:
        data = b""
    if len(data) != 4:
        return 137  # the beam ended (killed) before the command did
    return int.from_bytes(data, "little", signed=True)


def _pack_fds(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "launch":
        return launch(int(argv[2]))
    if len(argv) == 3 and argv[1] == "launch-file":  # runsc: no fds pass into gVisor
        try:
            fd = posix.open(argv[2], posix.O_RDONLY)
        except OSError as e:
            _say(f"cannot start: {e}")
            return 125
        return launch(fd)
    if len(argv) == 3 and argv[1] == "exec-client":
        return exec_client(int(argv[2]))
    _say("usage: forwarder.py launch FD | launch-file PATH | exec-client FD")
    return 2


if __name__ == "__main__":
    posix._exit(main(sys.argv))
