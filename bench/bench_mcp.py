"""The MCP gateway against a fast local MCP upstream, side by side with a direct call.

Processes (2 cores: each its own process, so the load generator is not the bottleneck):

* the upstream: a minimal streamable-HTTP MCP server (raw ASGI on uvicorn + httptools +
  uvloop: initialize with a session id, tools/list, tools/call answered as JSON), run as
  ``python -m bench.bench_mcp upstream PORT``;
* the gateway: ``python -m bench.bench_mcp gateway HOME PORT UPSTREAM_URL``: a fresh data dir
  (``init_data_dir``), ``[mcp.servers]`` pointing at the upstream, and the server's whole app
  (``build_server_app``: FastAPI with every gateway in front) on uvicorn with the settings and
  event loop ``tether serve`` uses (uvloop when installed), full enforcement (token check,
  Cedar policy, tool pins, the audit log's durable record before the upstream sees the call).
  Two servers front the same upstream: ``bench`` (default, ``record_first = true``) and
  ``bench_overlap`` (``record_first = false``: the record's commit overlaps the upstream call
  and is awaited before the result is released). A second gateway process, the baseline,
  is the same with an in-memory recorder instead of the audit log (``... gateway HOME PORT
  UPSTREAM_URL memory``);
* the load generator: ``python -m bench.bench_mcp client SPEC``, a raw HTTP/1.1 keep-alive
  client on uvloop (precomputed request bytes with the session id), one process per run.

Measured (each repeated, medians; direct and gateway runs interleaved): added latency per
``tools/call`` at concurrency 1 (p50, p99; added = gateway - direct, per run) and calls/s
through one gateway process at concurrency 32.

    python -m bench mcp                  # via the runner
    python -m bench.bench_mcp [--quick]  # standalone, prints the table
    TETHER_BENCH_AUDIT_SYNC=commit python -m bench.bench_mcp   # [audit] sync (default: the
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
CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "read_rows", "arguments": {"table": "customers", "limit": 3}},
}
RESULT = {
    "content": [{"type": "text", "text": '[{"id":1,"name":"Ada"},{"id":2,"name":"Grace"}]'}],
    "isError": False,
}
TOOLS = [
    {
        "name": "read_rows",
        "description": "Read rows of a table.",
        "inputSchema": {
            "type": "object",
            "properties": {"table": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["table"],
        },
    }
]


@dataclass
class Plan:
    runs: int
    lat_n: int
    tput_runs: int
    tput_seconds: float
    concurrency: int


FULL = Plan(5, 3000, 3, 5.0, 32)
QUICK = Plan(3, 800, 2, 2.0, 32)


# =============================================================================================
# the upstream (its own process)


def upstream_process(port: int) -> int:
    import orjson
    import uvicorn

    sessions: set[bytes] = set()
    result_tail = b',"result":' + orjson.dumps(RESULT) + b"}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = dict(scope["headers"])
        msg = orjson.loads(body) if body else {}
        method = msg.get("method")
        extra: list[tuple[bytes, bytes]] = []
        status = 200
        if scope["method"] == "DELETE":
            out = b""
        elif method == "initialize":
            sid = os.urandom(8).hex().encode()
            sessions.add(sid)
            extra = [(b"mcp-session-id", sid)]
            out = orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": msg["id"],
                    "result": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "bench-upstream", "version": "1"},
                    },
                }
            )
        elif headers.get(b"mcp-session-id") not in sessions:
            status, out = 404, b""
        elif "id" not in msg:
            status, out = 202, b""
        elif method == "tools/list":
            out = orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": TOOLS}})
        else:
            out = b'{"jsonrpc":"2.0","id":' + orjson.dumps(msg["id"]) + result_tail
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
    )
    return 0


# =============================================================================================
# the gateway (its own process)


def gateway_process(home: str, port: int, upstream: str, memory: bool = False) -> int:
    import uvicorn

    from tether.events import MemoryRecorder
    from tether.server.serve import build_server_app
    from tether.server.services import Services

    root = Path(home)
    _init_home(root)
    with (root / "config.toml").open("a") as f:
        f.write(
            f'\n[mcp.servers.bench]\nurl = "{upstream}"\n'
            f'\n[mcp.servers.bench_overlap]\nurl = "{upstream}"\nrecord_first = false\n'
        )
    services = Services(root)
    admin_cred = (root / "credentials" / "admin").read_text().strip()
    admin = services.verifier.verify(services.authority.login(admin_cred).token)
    token = services.authority.delegate(
        admin, "bench", ["tool:bench.*", "tool:bench_overlap.*"], ttl=7200, task="bench"
    ).token
    app, gateways = build_server_app(services)  # exactly what tether serve runs
    if memory:  # the baseline: everything but the durable audit write
        gateways.mcp.audit = MemoryRecorder()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    print(json.dumps({"token": token, "sync": services.config.audit_sync}), flush=True)
    config = uvicorn.Config(  # as serve.py configures it
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            await gateways.aclose()

    try:
        with (
            suppress(KeyboardInterrupt),
            asyncio.Runner(loop_factory=config.get_loop_factory()) as runner,
        ):
            runner.run(run())
    finally:
        services.close()
    return 0


# =============================================================================================
# the load generator (its own process)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes
) -> tuple[int, bytes]:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head.lower())
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return status, body


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    payload = json.dumps(CALL, separators=(",", ":")).encode()
    head = (
        f"POST {spec['path']} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"Mcp-Session-Id: {spec['session']}\r\nMcp-Protocol-Version: 2025-11-25\r\n"
        + (f"Authorization: Bearer {spec['token']}\r\n" if spec.get("token") else "")
        + f"Content-Length: {len(payload)}\r\n\r\n"
    )
    req = head.encode() + payload
    clock = time.perf_counter
    conc = int(spec.get("concurrency", 1))
    total = spec.get("total")
    seconds = spec.get("seconds")
    warmup = int(spec.get("warmup", 0))
    lat: list[float] = []
    errors: dict[str, int] = {}
    remaining = [int(total) if total is not None else 1 << 62]
    ready = [0]
    start = asyncio.Event()
    end: list[float | None] = [None]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(warmup):
                status, body = await _exchange(reader, writer, req)
                if status != 200 or b'"result"' not in body:
                    raise RuntimeError(f"warmup answer {status}: {body[:300]!r}")
            ready[0] += 1
            await start.wait()
            while remaining[0] > 0 and (end[0] is None or clock() < end[0]):
                remaining[0] -= 1
                t0 = clock()
                status, body = await _exchange(reader, writer, req)
                lat.append(clock() - t0)
                if status != 200 or b'"result"' not in body:
                    key = f"{status}:{body[:120]!r}"
                    errors[key] = errors.get(key, 0) + 1
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
        "count": len(lat),
        "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50": _pct(lat, 0.50),
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
# orchestration


@dataclass
class Target:
    name: str
    port: int
    path: str
    session: str
    token: str | None = None
    notes: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _initialize(port: int, path: str, token: str | None) -> str:
    import httpx

    headers = {"accept": "application/json, text/event-stream"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}{path}",
                json={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {},
                        "clientInfo": {"name": "bench", "version": "1"},
                    },
                },
                headers=headers,
                timeout=5,
            )
            if r.status_code == 200:
                return str(r.headers["mcp-session-id"])
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"initialize on {port}{path} failed: {last}")


def _init_home(root: Path) -> None:
    """A fresh data dir; ``[audit] sync`` from TETHER_BENCH_AUDIT_SYNC when that is set."""
    from tether.config import DataDir
    from tether.server.services import init_data_dir

    init_data_dir(root, "bench.test")
    sync = os.environ.get("TETHER_BENCH_AUDIT_SYNC")
    if sync:
        config = DataDir(root).load_config()
        config.audit_sync = sync
        DataDir(root).write_config(config)


def _start_gateway(home: Path, port: int, upstream: str, memory: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            PY,
            "-m",
            "bench.bench_mcp",
            "gateway",
            str(home),
            str(port),
            upstream,
            *(["memory"] if memory else []),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _hello(gw: subprocess.Popen[str]) -> dict[str, Any]:
    assert gw.stdout is not None
    line = gw.stdout.readline()
    if not line:
        raise RuntimeError("the gateway process exited before printing its token")
    doc: dict[str, Any] = json.loads(line)
    return doc


@contextmanager
def _processes() -> Iterator[tuple[list[Target], str]]:
    """The upstream, the gateway and its in-memory-recorder twin; the targets (direct,
    gateway, gateway_overlap, gateway_memory) and the audit log's sync mode."""
    up_port, gw_port, mem_port = _free_port(), _free_port(), _free_port()
    up = subprocess.Popen(
        [PY, "-m", "bench.bench_mcp", "upstream", str(up_port)], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{up_port}/mcp"
    with tempfile.TemporaryDirectory(prefix="tether-bench-mcp-") as tmp:
        gw = _start_gateway(Path(tmp) / "home", gw_port, url, False)
        mem = _start_gateway(Path(tmp) / "home-memory", mem_port, url, True)
        try:
            hello, mem_hello = _hello(gw), _hello(mem)
            token, mem_token = hello["token"], mem_hello["token"]
            direct = Target("direct", up_port, "/mcp", _initialize(up_port, "/mcp", None))
            strict = Target(
                "gateway", gw_port, "/mcp/bench", _initialize(gw_port, "/mcp/bench", token), token
            )
            overlap = Target(
                "gateway_overlap",
                gw_port,
                "/mcp/bench_overlap",
                _initialize(gw_port, "/mcp/bench_overlap", token),
                token,
            )
            memory = Target(
                "gateway_memory",
                mem_port,
                "/mcp/bench",
                _initialize(mem_port, "/mcp/bench", mem_token),
                mem_token,
            )
            yield [direct, strict, overlap, memory], str(hello.get("sync", "?"))
        finally:
            _stop(gw)
            _stop(mem)
            _stop(up)


def _load(t: Target, **spec: Any) -> dict[str, Any]:
    doc = {"host": "127.0.0.1", "port": t.port, "path": t.path, "session": t.session}
    doc.update(token=t.token, **spec)
    proc = subprocess.run(
        [PY, "-m", "bench.bench_mcp", "client", json.dumps(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {t.name}:\n{proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["errors"]:
        t.notes.append(f"errors: {out['errors']}")
    return out


def _audit_alone(n: int) -> float:
    """p50 seconds of one durable audit append at concurrency 1 (an event the size of a
    tools/call record), on a fresh data dir: the floor record_first puts under every call."""
    from tether.events import Event
    from tether.server.services import Services

    with tempfile.TemporaryDirectory(prefix="tether-bench-mcp-audit-") as tmp:
        root = Path(tmp) / "home"
        _init_home(root)
        services = Services(root)
        try:

            async def run() -> list[float]:
                out = []
                for i in range(n):
                    ev = Event(
                        type="tool.call",
                        actor="spiffe://bench.test/agent/bench",
                        subject="bench.read_rows",
                        data={"i": i, "action": {"resource": "bench.read_rows"}},
                        bodies={"request": json.dumps(CALL).encode()},
                    )
                    t0 = time.perf_counter()
                    await services.audit.arecord(ev)
                    out.append(time.perf_counter() - t0)
                return out

            return statistics.median(asyncio.run(run())[n // 10 :])
        finally:
            services.close()


def measure(plan: Plan, log: Any = print) -> list[Result]:
    figs: dict[str, dict[str, list[float]]] = {}
    audit_p50 = statistics.median(_audit_alone(plan.lat_n // 2) for _ in range(3))
    with _processes() as (targets, sync):
        for t in targets:
            figs[t.name] = {"p50": [], "p99": [], "rps": []}
        for run in range(plan.runs):
            for t in targets:
                out = _load(t, concurrency=1, total=plan.lat_n, warmup=max(100, plan.lat_n // 10))
                figs[t.name]["p50"].append(out["p50"])
                figs[t.name]["p99"].append(out["p99"])
            log(f"  latency run {run + 1}/{plan.runs} done")
        for run in range(plan.tput_runs):
            for t in targets[:3]:
                out = _load(t, concurrency=plan.concurrency, seconds=plan.tput_seconds, warmup=5)
                figs[t.name]["rps"].append(out["rps"])
            log(f"  throughput run {run + 1}/{plan.tput_runs} done")
        notes = [f"{t.name}: {'; '.join(t.notes)}" for t in targets if t.notes]

    def med(name: str, key: str) -> float:
        return statistics.median(figs[name][key])

    def added(name: str, key: str) -> float:
        pairs = zip(figs[name][key], figs["direct"][key], strict=True)
        return statistics.median(a - b for a, b in pairs) * 1e6

    us50, us99 = added("gateway", "p50"), added("gateway", "p99")
    ov50, ov99 = added("gateway_overlap", "p50"), added("gateway_overlap", "p99")
    mem50, mem99 = added("gateway_memory", "p50"), added("gateway_memory", "p99")
    d50, d99 = med("direct", "p50") * 1e3, med("direct", "p99") * 1e3
    note = ("; " + " | ".join(notes)) if notes else ""
    return [
        Result(
            "mcp",
            "added latency per tools/call p50, c=1 (record durable before forwarding)",
            us50,
            "us",
            "<= 1,000 us",
            f"direct {d50:.3f} ms, gateway {med('gateway', 'p50') * 1e3:.3f} ms; with an "
            f"in-memory recorder instead of the audit log: +{mem50:,.0f} us; one audit append "
            f"alone, c=1: {audit_p50 * 1e3:.3f} ms; audit sync = {sync}{note}",
            us50 <= 1000,
        ),
        Result(
            "mcp",
            "added latency per tools/call p99, c=1",
            us99,
            "us",
            "",
            f"direct {d99:.3f} ms, gateway {med('gateway', 'p99') * 1e3:.3f} ms; in-memory "
            f"recorder: +{mem99:,.0f} us",
        ),
        Result(
            "mcp",
            "added latency p50 / p99, record_first = false (commit overlaps the upstream call)",
            ov50,
            "us",
            "<= 1,000 us",
            f"p99 +{ov99:,.0f} us; gateway p50 {med('gateway_overlap', 'p50') * 1e3:.3f} ms",
            ov50 <= 1000,
        ),
        Result(
            "mcp",
            f"tools/call per second through one gateway process, c={plan.concurrency}",
            med("gateway", "rps"),
            "/s",
            ">= 1,000",
            f"direct {med('direct', 'rps'):,.0f}/s; record_first = false "
            f"{med('gateway_overlap', 'rps'):,.0f}/s",
            med("gateway", "rps") >= 1000,
        ),
    ]


def run() -> list[Result]:
    plan = QUICK if os.environ.get("TETHER_BENCH_QUICK") else FULL
    return measure(plan, log=lambda m: print(m, file=sys.stderr, flush=True))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "upstream":
        return upstream_process(int(argv[1]))
    if argv and argv[0] == "gateway":
        return gateway_process(argv[1], int(argv[2]), argv[3], argv[4:5] == ["memory"])
    if argv and argv[0] == "client":
        return client_process(argv[1])
    ap = argparse.ArgumentParser(prog="python -m bench.bench_mcp")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from bench._table import print_table

    print_table(measure(QUICK if args.quick else FULL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
