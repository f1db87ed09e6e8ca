"""The egress gateway against local destinations, side by side with direct connections.

Processes (2 cores; each part its own process so the client never competes with the thing
measured for one GIL):

* the destinations: this file run as ``python -m bench.bench_egress dest``: an asyncio
  server on three ports: echo, a minimal HTTP/1.1 keep-alive responder (2-byte body), and a
  bulk source (sends as many bytes as asked);
* the gateway: ``python -m bench.bench_egress gateway``: a fresh data dir, the real services
  (Cedar core, durable audit log, verifier), ``build_egress_gateway`` on TCP, the agent's
  token minted there; on uvloop when installed (as under ``tether serve``). Run twice: with
  the durable audit log, and with an in-memory recorder (what the record costs);
* the client: this process, blocking sockets with TCP_NODELAY, one request at a time.

Measured, direct and through-the-gateway interleaved:

* CONNECT setup: TCP connect + ``CONNECT`` + ``200`` (gateway) vs TCP connect (direct), p50
  and p99, and the difference (added); each connection closed after, so the gateway also
  writes its end record in the background during the run, as it would in use;
* one keep-alive HTTP request inside an open tunnel vs on a direct connection (p50, p99);
* bulk throughput through a tunnel vs direct (MB/s, 64 MiB per run).

    python -m bench egress                       # via the runner
    python -m bench.bench_egress [--quick]       # standalone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bench._table import Result

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGET_SETUP_MS = 1.0
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
REQUEST = b"GET /ping HTTP/1.1\r\nHost: dest\r\n\r\n"


@dataclass(frozen=True)
class Plan:
    setups: int
    requests: int
    bulk_mb: int
    repeats: int


FULL = Plan(setups=2000, requests=5000, bulk_mb=64, repeats=3)
QUICK = Plan(setups=300, requests=1000, bulk_mb=16, repeats=2)


# -- the destination process -----------------------------------------------------------------


async def _dest_main(port_file: Path) -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(RESPONSE)
        w.close()

    async def bulk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        block = b"\0" * (256 * 1024)
        with suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                left = int.from_bytes(await r.readexactly(8), "big")
                while left > 0:
                    n = min(left, len(block))
                    w.write(block[:n])
                    await w.drain()
                    left -= n
        w.close()

    servers = [await asyncio.start_server(h, "127.0.0.1", 0) for h in (echo, http, bulk)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    port_file.write_text(" ".join(map(str, ports)))
    await asyncio.Event().wait()


# -- the gateway process ---------------------------------------------------------------------


async def _gateway_main(home: Path, out: Path, memory_audit: bool) -> None:
    from tether.gateways.egress.mount import build_egress_gateway
    from tether.server.services import Services, init_data_dir

    init_data_dir(home, "bench.example")
    services = Services(home)
    services.config.extra["egress"] = {"allow_private": ["127.0.0.1/32"]}
    gw = build_egress_gateway(services)
    if memory_audit:
        gw.audit = _Discard()  # type: ignore[assignment]
    admin = services.verifier.verify(
        services.authority.login((home / "credentials" / "admin").read_text().strip()).token
    )
    token = services.authority.delegate(admin, "bench", ["egress:127.0.0.1"], ttl=3600).token
    listener = await gw.serve_tcp("127.0.0.1", 0)
    assert listener.address is not None
    out.write_text(f"{listener.address[1]} {token}")
    out.chmod(0o600)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await gw.aclose()
    services.close()


class _Discard:
    """An in-memory recorder that keeps nothing (so a long run does not grow memory)."""

    async def arecord(self, event: object) -> object:
        return None

    def record(self, event: object) -> object:
        return None


def _run_loop(coro_factory: object) -> None:
    try:
        import uvloop

        uvloop.run(coro_factory)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro_factory)  # type: ignore[arg-type]


# -- the client ------------------------------------------------------------------------------


def _spawn(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([PY, "-m", "bench.bench_egress", *args], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"bench_egress {args[0]} did not start")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _destinations(tmp: Path) -> Iterator[tuple[int, int, int]]:
    out = tmp / "dest.ports"
    proc = _spawn(["dest", "--out", str(out)], out)
    try:
        echo, http, bulk = map(int, out.read_text().split())
        yield echo, http, bulk
    finally:
        _stop(proc)


@contextmanager
def _gateway(tmp: Path, name: str, memory_audit: bool) -> Iterator[tuple[int, str]]:
    out = tmp / f"{name}.out"
    args = ["gateway", "--home", str(tmp / name), "--out", str(out)]
    proc = _spawn(args + (["--memory-audit"] if memory_audit else []), out)
    try:
        port, token = out.read_text().split()
        yield int(port), token
    finally:
        _stop(proc)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed; got {buf[:200]!r}")
        buf += chunk
    return buf


def _tunnel(gw_port: int, token: str, dest: int) -> socket.socket:
    s = _connect(gw_port)
    s.sendall(
        f"CONNECT 127.0.0.1:{dest} HTTP/1.1\r\nHost: 127.0.0.1:{dest}\r\n"
        f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = _read_until(s, b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT refused: {head[:300]!r}")
    return s


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _setup_times(gw_port: int, token: str, echo: int, n: int) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    proxied: list[float] = []
    for i in range(n + n // 10):  # the first tenth warms up
        t = time.perf_counter()
        s = _connect(echo)
        d = time.perf_counter() - t
        s.close()
        t = time.perf_counter()
        s = _tunnel(gw_port, token, echo)
        p = time.perf_counter() - t
        s.close()
        if i >= n // 10:
            direct.append(d)
            proxied.append(p)
    return direct, proxied


def _request_times(s: socket.socket, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(REQUEST)
        buf = b""
        while not buf.endswith(b"ok"):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("destination closed")
            buf += chunk
        out.append(time.perf_counter() - t)
    return out


def _bulk_rate(s: socket.socket, mb: int) -> float:
    size = mb * 1024 * 1024
    t = time.perf_counter()
    s.sendall(size.to_bytes(8, "big"))
    got = 0
    buf = bytearray(1024 * 1024)
    while got < size:
        n = s.recv_into(buf)
        if not n:
            raise RuntimeError("source closed")
        got += n
    return mb / (time.perf_counter() - t)


@dataclass
class Figures:
    setup_direct: list[float]
    setup_gw: list[float]
    setup_mem: list[float]
    req_direct: list[float]
    req_gw: list[float]
    bulk_direct: list[float]
    bulk_gw: list[float]


def bench(quick: bool = False) -> list[Result]:
    plan = QUICK if quick else FULL
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    figs = Figures([], [], [], [], [], [], [])
    with tempfile.TemporaryDirectory(prefix="tether-bench-egress-") as d:
        tmp = Path(d)
        with _destinations(tmp) as (echo, http, bulk):
            with _gateway(tmp, "mem", memory_audit=True) as (port, token):
                for _ in range(plan.repeats):
                    _, mem = _setup_times(port, token, echo, plan.setups)
                    figs.setup_mem.append(statistics.median(mem))
            with _gateway(tmp, "gw", memory_audit=False) as (port, token):
                log(f"egress bench ({'quick' if quick else 'full'}): gateway on :{port}")
                direct_all: list[float] = []
                gw_all: list[float] = []
                for _ in range(plan.repeats):
                    direct, proxied = _setup_times(port, token, echo, plan.setups)
                    direct_all += direct
                    gw_all += proxied
                figs.setup_direct, figs.setup_gw = direct_all, gw_all
                for _ in range(plan.repeats):
                    with _connect(http) as s:
                        figs.req_direct += _request_times(s, plan.requests)
                    with _tunnel(port, token, http) as s:
                        figs.req_gw += _request_times(s, plan.requests)
                    with _connect(bulk) as s:
                        figs.bulk_direct.append(_bulk_rate(s, plan.bulk_mb))
                    with _tunnel(port, token, bulk) as s:
                        figs.bulk_gw.append(_bulk_rate(s, plan.bulk_mb))
    return _results(figs)


def _results(f: Figures) -> list[Result]:
    ms = 1000.0
    d50, d99 = _pct(f.setup_direct, 0.5) * ms, _pct(f.setup_direct, 0.99) * ms
    g50, g99 = _pct(f.setup_gw, 0.5) * ms, _pct(f.setup_gw, 0.99) * ms
    mem50 = statistics.median(f.setup_mem) * ms
    r50d, r99d = _pct(f.req_direct, 0.5) * ms, _pct(f.req_direct, 0.99) * ms
    r50g, r99g = _pct(f.req_gw, 0.5) * ms, _pct(f.req_gw, 0.99) * ms
    bd, bg = statistics.median(f.bulk_direct), statistics.median(f.bulk_gw)
    return [
        Result(
            "egress",
            "CONNECT setup: added p50 (connect+CONNECT+200 vs TCP connect)",
            g50 - d50,
            "ms",
            f"<= {TARGET_SETUP_MS:g} ms",
            f"direct {d50:.3f} ms; via gateway {g50:.3f} ms",
            g50 - d50 <= TARGET_SETUP_MS,
        ),
        Result(
            "egress",
            "CONNECT setup: added p99",
            g99 - d99,
            "ms",
            "",
            f"direct {d99:.3f} ms; via gateway {g99:.3f} ms",
        ),
        Result(
            "egress",
            "CONNECT setup p50 with an in-memory recorder (what the durable record costs)",
            mem50 - d50,
            "ms added",
            "",
            f"durable audit: {g50 - d50:.3f} ms added",
        ),
        Result(
            "egress",
            "keep-alive request in a tunnel: added p50",
            (r50g - r50d) * 1000,
            "us",
            "",
            f"direct {r50d * 1000:.0f} us; tunnel {r50g * 1000:.0f} us",
        ),
        Result(
            "egress",
            "keep-alive request in a tunnel: added p99",
            (r99g - r99d) * 1000,
            "us",
            "",
            f"direct {r99d * 1000:.0f} us; tunnel {r99g * 1000:.0f} us",
        ),
        Result(
            "egress",
            "bulk relay throughput (one tunnel)",
            bg,
            "MB/s",
            "",
            f"direct {bd:,.0f} MB/s ({bg / bd:.0%} of direct)",
        ),
    ]


def run() -> list[Result]:
    return bench(quick=os.environ.get("TETHER_BENCH_QUICK") == "1")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_egress")
    sub = parser.add_subparsers(dest="cmd")
    p_dest = sub.add_parser("dest")
    p_dest.add_argument("--out", type=Path, required=True)
    p_gw = sub.add_parser("gateway")
    p_gw.add_argument("--home", type=Path, required=True)
    p_gw.add_argument("--out", type=Path, required=True)
    p_gw.add_argument("--memory-audit", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "dest":
        with suppress(KeyboardInterrupt):
            _run_loop(_dest_main(args.out))
        return 0
    if args.cmd == "gateway":
        _run_loop(_gateway_main(args.home, args.out, args.memory_audit))
        return 0
    from bench._table import print_table

    print_table(bench(quick=args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
