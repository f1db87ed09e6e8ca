"""The HTTP gateway against a fast local upstream, side by side with a direct call.

Processes (2 cores: each its own process, so the load generator is never the bottleneck of
the thing measured):

* the upstream: a raw ASGI app on uvicorn + httptools + uvloop answering a small JSON body
  (``python -m bench.bench_http upstream PORT``);
* the gateway: the whole server app as ``tether serve`` composes it (FastAPI app, LLM gateway
  fast path) with the HTTP gateway mounted in front, on a fresh data dir with full enforcement:
  token verification, Cedar, the service's rules, the durable audit log (fsync per group
  commit), credential injection (``python -m bench.bench_http gateway HOME PORT UPSTREAM``);
* the load generator: a raw HTTP/1.1 keep-alive client on uvloop, one process per run.

Measured, direct and through-the-gateway runs interleaved, medians over runs:

* added latency at concurrency 1, p50 and p99 (added = gateway - direct, run by run), for a
  GET (its record overlaps the upstream call; the response waits for it to be durable) and for
  a POST (its record must be durable before the upstream sees it);
* requests/s at concurrency 32 (GET);
* the upstream client alone, per keep-alive call against the same upstream: h1 (what the
  gateway uses, ``tether.gateways.h1``) and aiohttp (what it used before).

    python -m bench http                  # via the runner
    python -m bench.bench_http [--quick]  # standalone
    TETHER_BENCH_AUDIT_SYNC=commit python -m bench.bench_http   # [audit] sync (default: the
                                                                # data dir's default)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._table import Result

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
UPSTREAM_SECRET = "bench-upstream-credential-0123456789"
BODY = b'{"id": 42, "name": "Ada Lovelace", "plan": "pro", "status": "active"}'
ORDER = b'{"sku": "A-1", "qty": 3}'


@dataclass
class Plan:
    runs: int
    lat_n: int
    tput_runs: int
    tput_seconds: float
    client_n: int


FULL = Plan(5, 2000, 3, 5.0, 3000)
QUICK = Plan(3, 500, 2, 2.0, 1000)


# =============================================================================================
# the upstream (its own process)


async def _upstream_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while True:
        msg = await receive()
        if not msg.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def _tcp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def upstream_process(port: int) -> int:
    import uvicorn

    config = uvicorn.Config(
        _upstream_app, log_level="warning", access_log=False, lifespan="off", server_header=False
    )
    with suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[_tcp_socket(port)])
    return 0


# =============================================================================================
# the gateway (its own process): the server app as serve.py builds it, HTTP gateway in front


def gateway_process(home: str, port: int, upstream: str, memory: bool = False) -> int:
    import uvicorn

    from tether.config import DataDir
    from tether.events import MemoryRecorder
    from tether.server.serve import build_server_app
    from tether.server.services import Services, init_data_dir

    root = Path(home)
    init_data_dir(root, "bench.test")
    sync = os.environ.get("TETHER_BENCH_AUDIT_SYNC")
    if sync:
        cfg = DataDir(root).load_config()
        cfg.audit_sync = sync
        DataDir(root).write_config(cfg)
    with (root / "config.toml").open("a") as f:
        f.write(
            "\n[http.services.crm]\n"
            f'base_url = "{upstream}/api"\n'
            'auth = { type = "bearer", secret_env = "BENCH_UPSTREAM_TOKEN" }\n'
            "[[http.services.crm.rules]]\n"
            'methods = ["GET"]\npaths = ["/customers/*"]\n'
            "[[http.services.crm.rules]]\n"
            'methods = ["POST"]\npaths = ["/orders"]\n'
        )
    os.environ["BENCH_UPSTREAM_TOKEN"] = UPSTREAM_SECRET
    services = Services(root)
    cred = (root / "credentials" / "admin").read_text().strip()
    admin = services.verifier.verify(services.authority.login(cred).token)
    token = services.authority.delegate(admin, "bench", ["http:crm/*"], ttl=7200).token
    app, gateways = build_server_app(services)  # exactly what tether serve runs
    http_gw = gateways.http
    if memory:  # the baseline: everything but the durable audit write
        http_gw.audit = MemoryRecorder()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    print(json.dumps({"token": token, "sync": services.config.audit_sync}), flush=True)

    async def run() -> None:
        try:
            await server.serve(sockets=[_tcp_socket(port)])
        finally:
            await gateways.aclose()

    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(run())
    finally:
        services.close()
    return 0


# =============================================================================================
# the load generator (its own process)


def _request(method: str, host: str, path: str, token: str | None, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes, clock: Any
) -> tuple[float, int]:
    t0 = clock()
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head.lower())
    if m:
        await reader.readexactly(int(m.group(1)))
    else:  # chunked
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return clock() - t0, status


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    req = _request(spec["method"], host, spec["path"], spec.get("token"), spec["body"].encode())
    clock = time.perf_counter
    conc = int(spec["concurrency"])
    remaining = [int(spec.get("total") or 1 << 62)]
    seconds = spec.get("seconds")
    lat: list[float] = []
    errors: dict[str, int] = {}
    ready = [0]
    start = asyncio.Event()
    end: list[float | None] = [None]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(int(spec.get("warmup", 0))):
                await _exchange(reader, writer, req, clock)
            ready[0] += 1
            await start.wait()
            while remaining[0] > 0 and (end[0] is None or clock() < end[0]):
                remaining[0] -= 1
                t, status = await _exchange(reader, writer, req, clock)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                lat.append(t)
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(conc)]
    while ready[0] < conc:
        await asyncio.sleep(0.005)
        for t in tasks:
            if t.done():
                t.result()
    t0 = clock()
    if seconds is not None:
        end[0] = t0 + float(seconds)
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
    elapsed = clock() - t0
    return {
        "rps": len(lat) / elapsed,
        "p50": _pct(lat, 0.5),
        "p99": _pct(lat, 0.99),
        "errors": errors,
    }


def client_process(spec_json: str) -> int:
    with suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(_client_main(json.loads(spec_json)))), flush=True)
    return 0


# =============================================================================================
# the upstream client alone, in this process


async def _clients_alone(base: str, n: int) -> dict[str, float]:
    import aiohttp

    from tether.gateways.h1 import HttpClient

    url = base + "/api/customers/42"
    out: dict[str, float] = {}
    client = HttpClient()
    try:
        for _ in range(200):
            await (await client.request("GET", url)).aread()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            await (await client.request("GET", url)).aread()
            lat.append(time.perf_counter() - t)
        out["h1"] = statistics.median(lat)
    finally:
        await client.aclose()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for _ in range(200):
            async with s.get(url) as r:
                await r.read()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            async with s.get(url) as r:
                await r.read()
            lat.append(time.perf_counter() - t)
        out["aiohttp"] = statistics.median(lat)
    return out


# =============================================================================================
# orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout:.0f}s")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _upstream() -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen([PY, "-m", "bench.bench_http", "upstream", str(port)], cwd=ROOT)
    try:
        _wait_port(port, proc, 30)
        yield port
    finally:
        _stop(proc)


@contextmanager
def _gateway(upstream_port: int, memory: bool = False) -> Iterator[tuple[int, str, str]]:
    with tempfile.TemporaryDirectory(prefix="tether-bench-http-") as tmp:
        port = _free_port()
        log = (Path(tmp) / "gateway.log").open("wb")
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "bench.bench_http",
                "gateway",
                str(Path(tmp) / "home"),
                str(port),
                f"http://127.0.0.1:{upstream_port}",
                *(["memory"] if memory else []),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                proc.wait(30)
                raise RuntimeError((Path(tmp) / "gateway.log").read_text()[-2000:])
            hello = json.loads(line)
            token, sync = hello["token"], str(hello.get("sync", "?"))
            _wait_port(port, proc, 60)
            yield port, token, sync
        finally:
            _stop(proc)
            log.close()


def _load(port: int, **spec: Any) -> dict[str, Any]:
    doc = {"host": "127.0.0.1", "port": port, **spec}
    proc = subprocess.run(
        [PY, "-m", "bench.bench_http", "client", json.dumps(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=700,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["errors"]:
        raise RuntimeError(f"non-200 answers from port {port}: {out['errors']}")
    return out


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)

    def med(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else float("nan")


def _added(mine: list[float], base: list[float]) -> float:
    return statistics.median(a - b for a, b in zip(mine, base, strict=False))


def bench(quick: bool = False) -> list[Result]:
    plan = QUICK if quick else FULL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = ("direct_get", "gw_get", "mem_get", "direct_post", "gw_post")
    figs = {k: Figures() for k in names}
    with (
        _upstream() as up,
        _gateway(up) as (gw, token, sync),
        _gateway(up, True) as (mem, mtoken, _),
    ):
        base = f"http://127.0.0.1:{up}"
        common = {"concurrency": 1, "total": plan.lat_n, "warmup": max(50, plan.lat_n // 10)}
        get = {"method": "GET", "body": ""}
        post = {"method": "POST", "body": ORDER.decode()}
        targets: dict[str, dict[str, Any]] = {
            "direct_get": {"port": up, "path": "/api/customers/42", **get},
            "gw_get": {"port": gw, "path": "/http/crm/customers/42", "token": token, **get},
            "mem_get": {"port": mem, "path": "/http/crm/customers/42", "token": mtoken, **get},
            "direct_post": {"port": up, "path": "/api/orders", **post},
            "gw_post": {"port": gw, "path": "/http/crm/orders", "token": token, **post},
        }
        for run in range(plan.runs):
            for name, t in targets.items():
                out = _load(**t, **common)
                figs[name].p50.append(out["p50"])
                figs[name].p99.append(out["p99"])
            log(f"  http latency run {run + 1}/{plan.runs} done")
        for run in range(plan.tput_runs):
            for name in ("direct_get", "gw_get"):
                t = {**targets[name], "concurrency": 32, "seconds": plan.tput_seconds, "warmup": 5}
                figs[name].rps.append(_load(**t)["rps"])
            log(f"  http throughput run {run + 1}/{plan.tput_runs} done")
        alone = asyncio.run(_clients_alone(base, plan.client_n))
    us = 1e6
    d, g, m = figs["direct_get"], figs["gw_get"], figs["mem_get"]
    dp, gp = figs["direct_post"], figs["gw_post"]
    add50 = _added(g.p50, d.p50) * us
    add99 = _added(g.p99, d.p99) * us
    addm50 = _added(m.p50, d.p50) * us
    addm99 = _added(m.p99, d.p99) * us
    addp50 = _added(gp.p50, dp.p50) * us
    addp99 = _added(gp.p99, dp.p99) * us
    return [
        Result(
            "http",
            "added latency p50, GET, concurrency 1 (gateway - direct)",
            add50,
            "us",
            "<= 1,000 us",
            f"direct {d.med('p50') * 1e3:.3f} ms, gateway {g.med('p50') * 1e3:.3f} ms; "
            f"with an in-memory recorder instead of the audit log: +{addm50:,.0f} us; "
            f"audit sync = {sync}",
            add50 <= 1000,
        ),
        Result(
            "http",
            "added latency p99, GET, concurrency 1",
            add99,
            "us",
            "",
            f"direct {d.med('p99') * 1e3:.3f} ms, gateway {g.med('p99') * 1e3:.3f} ms; "
            f"in-memory recorder: +{addm99:,.0f} us",
        ),
        Result(
            "http",
            "added latency p50, POST (record durable before forwarding), c=1",
            addp50,
            "us",
            "<= 1,000 us",
            f"direct {dp.med('p50') * 1e3:.3f} ms, gateway {gp.med('p50') * 1e3:.3f} ms; "
            f"p99 added {addp99 / 1e3:.2f} ms",
            addp50 <= 1000,
        ),
        Result(
            "http",
            "requests/s through one gateway process, GET, concurrency 32",
            g.med("rps"),
            "/s",
            ">= 1,000",
            f"direct {d.med('rps'):,.0f}/s (gateway {g.med('rps') / d.med('rps'):.0%} of it)",
            g.med("rps") >= 1000,
        ),
        Result(
            "http",
            "upstream client alone, keep-alive GET, c=1, p50 (h1, used here)",
            alone["h1"] * us,
            "us",
            "",
            f"aiohttp {alone['aiohttp'] * us:,.0f} us, same upstream, same process",
        ),
    ]


def run() -> list[Result]:
    return bench(quick=os.environ.get("TETHER_BENCH_QUICK") == "1")


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_process(argv[1])
    if argv[:1] == ["upstream"]:
        return upstream_process(int(argv[1]))
    if argv[:1] == ["gateway"]:
        return gateway_process(argv[1], int(argv[2]), argv[3], argv[4:5] == ["memory"])
    p = argparse.ArgumentParser(prog="python -m bench.bench_http")
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    a = p.parse_args(argv)
    from bench._table import print_table

    print_table(bench(a.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
