"""Beam sandboxes (bwrap backend): create-to-first-instruction, teardown, concurrent idle beams.

* create -> first instruction: from ``backend.start(spec)`` to the host reading the first
  byte the command writes (its first action). Two agents: ``sh -c 'printf x'`` and a
  ``python -c`` agent (the venv's interpreter with site, as real agents start). Baselines
  side by side, measured the same way: a bare fork+exec of the same command, and bare bwrap
  (new namespaces, the same read-only binds style, no seccomp, no forwarder, no cgroups).
  Also with memory+pids+CPU limits (cgroups joined before exec).
* teardown: ``kill()`` until the whole tree is gone and the cgroups and state removed;
  baseline: SIGKILL + reap of a bare child.
* concurrent idle beams: start N sleeping beams (target 200), check each is running, sum
  their memory (PSS of every process of every beam, plus the outer bwrap), then kill all.

    python -m bench.bench_beams [--quick]
    TETHER_BENCH_QUICK=1 python -m bench beams
Targets (issue 5): p50 <= 50 ms create -> first instruction; teardown <= 50 ms; 200 beams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench._table import Result, print_table
from tether.runtime.bwrap import BwrapBackend, BwrapSandbox
from tether.runtime.sandbox import Limits, SandboxSpec

PY = sys.executable
PY_AGENT = [PY, "-c", "import sys; sys.stdout.write('x'); sys.stdout.flush()"]
SH_AGENT = ["/bin/sh", "-c", "printf x"]
ENV = {"PATH": f"{sys.prefix}/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
LIMITS = Limits(memory_bytes=512 << 20, pids=256, cpus=1)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: Sequence[float], q: float) -> float:
    return _pct(values, q) * 1000


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ws = root / "ws"
        self.ws.mkdir()
        self.sock = root / "gw.sock"
        self.backend = BwrapBackend(state_dir=root / "state")
        why = self.backend.available()
        if why is not None:
            raise RuntimeError(why)
        self.n = 0

    def spec(self, argv: Sequence[str], limits: Limits = Limits()) -> SandboxSpec:
        self.n += 1
        return SandboxSpec(
            beam_id=f"bench-{self.n}",
            argv=tuple(argv),
            env=ENV,
            workspace=self.ws,
            files={"token": b"bench"},
            bridge_socket=self.sock,
            limits=limits,
        )

    async def first_byte_beam(self, argv: Sequence[str], limits: Limits = Limits()) -> float:
        spec = self.spec(argv, limits)
        t = time.perf_counter()
        sb = await self.backend.start(spec)
        first = await sb.stdout.read(1)
        elapsed = time.perf_counter() - t
        assert first == b"x", (first, await sb.stderr.read())
        await sb.wait()
        return elapsed

    async def first_byte_bare(self, argv: Sequence[str]) -> float:
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV
        )
        assert proc.stdout is not None
        first = await proc.stdout.read(1)
        elapsed = time.perf_counter() - t
        assert first == b"x"
        await proc.wait()
        return elapsed

    async def first_byte_bare_bwrap(self, argv: Sequence[str]) -> float:
        bwrap = self.backend.bwrap
        assert bwrap is not None
        args = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
        args += ["--cap-drop", "ALL", "--clearenv", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib64"):
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        for root in {sys.prefix, sys.base_prefix}:
            if not root.startswith("/usr"):
                args += ["--ro-bind", root, root]
        args += ["--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev"]
        args += ["--", *argv]
        return await self.first_byte_bare(args)

    async def teardown_beam(self, limits: Limits) -> float:
        sb = await self.backend.start(
            self.spec(["/bin/sh", "-c", "echo up; exec sleep 600"], limits)
        )
        assert await sb.stdout.readline() == b"up\n"
        t = time.perf_counter()
        await sb.kill()
        return time.perf_counter() - t

    async def teardown_bare(self) -> float:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", "echo up; exec sleep 600", stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        await proc.stdout.readline()
        t = time.perf_counter()
        proc.kill()
        await proc.wait()
        return time.perf_counter() - t


RELAY_SCRIPT = r"""
import socket, sys, time, json
N = int(sys.argv[1])
REQ = b"GET /r HTTP/1.1\r\nHost: beam\r\n\r\n"
def run(sock):
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(N):
        t = time.perf_counter()
        sock.sendall(REQ)
        got = b""
        while not got.endswith(b"ok"):
            got += sock.recv(4096)
        times.append(time.perf_counter() - t)
    sock.close()
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6
u = socket.socket(socket.AF_UNIX)
u.connect("/run/tether/gateway.sock")
direct = run(u)
via = run(socket.create_connection(("127.0.0.1", 8080)))
print(json.dumps({"direct": direct, "forwarder": via}))
"""


async def _keepalive_server(path: Path) -> asyncio.Server:
    """A minimal HTTP/1.1 keep-alive responder on the bridge socket (fixed reply)."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    return await asyncio.start_unix_server(handle, str(path))


async def _relay(b: Bench, n: int) -> dict[str, list[float]]:
    """Keep-alive requests from inside a beam: straight to the bridge socket vs through the
    forwarder's TCP listener; the difference is what the forwarder adds per request."""
    sb = await b.backend.start(b.spec(["python3", "-I", "-S", "-c", RELAY_SCRIPT, str(n)]))
    out, err = await asyncio.gather(sb.stdout.read(), sb.stderr.read())
    assert await sb.wait() == 0, err.decode()
    import json

    r: dict[str, list[float]] = json.loads(out)
    return r


async def _repeat(fn: Callable[[], Awaitable[float]], n: int) -> list[float]:
    for _ in range(max(2, n // 10)):  # warm caches
        await fn()
    return [await fn() for _ in range(n)]


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pids_in_ns(init_pid: int) -> set[int]:
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == target:
                    found.add(int(entry))
            except OSError:
                pass
    return found


async def _concurrent(b: Bench, n: int, log: Callable[[str], None]) -> dict[str, float]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 16 * n + 1024)), hard))
    beams: list[BwrapSandbox] = []
    t = time.perf_counter()
    try:
        for i in range(n):
            try:
                sb = await b.backend.start(
                    b.spec(["/bin/sh", "-c", "echo up; exec sleep 3600"], Limits(pids=64))
                )
            except Exception as e:
                log(f"beam {i + 1} failed to start: {e}")
                break
            beams.append(sb)
        for sb in beams:
            await asyncio.wait_for(sb.stdout.readline(), 60)
        started = time.perf_counter() - t
        running = [
            sb for sb in beams if sb.info()["init_pid"] and _pids_in_ns(sb.info()["init_pid"])
        ]
        pss = 0
        procs = 0
        for sb in running:
            pids = _pids_in_ns(sb.info()["init_pid"]) | {sb.pid}
            procs += len(pids)
            pss += sum(_pss_kib(p) for p in pids)
        t = time.perf_counter()
        await asyncio.gather(*[sb.kill() for sb in beams])
        killed = time.perf_counter() - t
        beams = []
        return {
            "running": len(running),
            "start_s": started,
            "kill_s": killed,
            "pss_mib": pss / 1024,
            "procs": procs,
        }
    finally:
        await asyncio.gather(*[sb.kill() for sb in beams])


async def _bench(quick: bool, concurrent: int, log: Callable[[str], None]) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    server = await _keepalive_server(root / "gw.sock")
    n = 30 if quick else 100
    try:
        b = Bench(root)
        out: list[Result] = []
        for label, agent in (("sh printf", SH_AGENT), ("python -c", PY_AGENT)):
            log(f"first instruction: {label}")
            beam = await _repeat(lambda a=agent: b.first_byte_beam(a), n)  # type: ignore[misc]
            bare = await _repeat(lambda a=agent: b.first_byte_bare(a), n)  # type: ignore[misc]
            bwrap = await _repeat(lambda a=agent: b.first_byte_bare_bwrap(a), n)  # type: ignore[misc]
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                out.append(
                    Result(
                        "beams",
                        f"create -> first instruction {name}, {label}",
                        _ms(beam, q),
                        "ms",
                        "<= 50 ms" if q == 0.5 else "",
                        f"fork+exec {_ms(bare, q):.1f} ms; bare bwrap {_ms(bwrap, q):.1f} ms",
                        _ms(beam, q) <= 50 if q == 0.5 else None,
                    )
                )
        log("first instruction with limits")
        limited = await _repeat(lambda: b.first_byte_beam(SH_AGENT, LIMITS), n)
        out.append(
            Result(
                "beams",
                "create -> first instruction p50, sh printf, memory+pids+CPU limits",
                _ms(limited, 0.5),
                "ms",
                "<= 50 ms",
                f"p99 {_ms(limited, 0.99):.1f} ms",
                _ms(limited, 0.5) <= 50,
            )
        )
        log("relay")
        relay = await _relay(b, 2000 if quick else 10000)
        added = relay["forwarder"][0] - relay["direct"][0]
        out.append(
            Result(
                "beams",
                "keep-alive request through the forwarder: added p50",
                added,
                "us",
                "",
                f"forwarder p50 {relay['forwarder'][0]:.0f} us, p99 {relay['forwarder'][1]:.0f} us;"
                f" unix socket direct p50 {relay['direct'][0]:.0f} us",
            )
        )
        log("teardown")
        bare_kill = await _repeat(b.teardown_bare, n)
        for label, limits in (("no limits", Limits()), ("with cgroups", LIMITS)):
            kills = await _repeat(lambda lim=limits: b.teardown_beam(lim), n)  # type: ignore[misc]
            out.append(
                Result(
                    "beams",
                    f"teardown (kill -> all gone) p50, {label}",
                    _ms(kills, 0.5),
                    "ms",
                    "<= 50 ms",
                    f"p99 {_ms(kills, 0.99):.1f} ms; "
                    f"bare SIGKILL+reap {_ms(bare_kill, 0.5):.2f} ms",
                    _ms(kills, 0.5) <= 50,
                )
            )
        log(f"{concurrent} concurrent idle beams")
        c = await _concurrent(b, concurrent, log)
        out.append(
            Result(
                "beams",
                "concurrent idle beams (sleeping, pids limit each)",
                c["running"],
                "beams",
                f">= {concurrent}",
                f"started in {c['start_s']:.1f} s, killed in {c['kill_s']:.2f} s, "
                f"{c['procs']:.0f} processes",
                c["running"] >= concurrent,
            )
        )
        per = c["pss_mib"] / max(1.0, c["running"])
        out.append(
            Result(
                "beams",
                "memory per idle beam (PSS: bwrap + forwarder + command)",
                per,
                "MiB",
                "",
                f"{c['pss_mib']:.0f} MiB for {c['running']:.0f} beams",
            )
        )
        return out
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def bench(quick: bool = False, concurrent: int = 200) -> list[Result]:
    def log(msg: str) -> None:
        print(f"  beams: {msg}", file=sys.stderr, flush=True)

    return asyncio.run(_bench(quick, concurrent, log))


def run() -> list[Result]:
    return bench(quick=os.environ.get("TETHER_BENCH_QUICK") == "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30 samples instead of 100")
    p.add_argument("--concurrent", type=int, default=200, help="idle beams to hold at once")
    a = p.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print_table(bench(a.quick, a.concurrent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
