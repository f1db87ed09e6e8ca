"""The LLM gateway against a fast local upstream, side by side with a direct call (and LiteLLM).

Processes (2 cores, so each is its own process and the load generator is never the GIL-bound
bottleneck of the thing measured):

* the upstream: the bundled scripted model as a real HTTP server
  (``python -m tether.gateways.llm.scripted``: raw ASGI on uvicorn + httptools + uvloop);
* the gateway: ``tether serve`` on a fresh data dir (``tether init``), its ``[llm]`` table
  routing every model to that upstream, full enforcement on (token check, policy, audit);
  the agent's token from ``tether delegate``;
* LiteLLM's proxy (one worker, no database) against the same upstream, when
  ``bench/litellm/setup.sh`` has installed it into /tmp/litellm-venv (otherwise a note);
* the load generator: this file run as ``python -m bench.bench_llm client SPEC``, a raw
  HTTP/1.1 keep-alive client on uvloop (precomputed request bytes, no HTTP library), one
  process per measurement.

Measured, each repeated and the median taken, direct and through-the-gateway runs interleaved:
added latency at concurrency 1 (p50, p99; added = gateway - direct, per run), throughput at
concurrency 64, added time to first token when streaming (first SSE event with non-empty
text), and the gateway's RSS after 100,000 requests with its growth over the last 80,000.

    python -m bench llm                          # via the runner (full)
    python -m bench.bench_llm [--quick]          # standalone: also prints the side-by-side table
    python -m bench.bench_llm --gateway-url http://127.0.0.1:7800 --token T   # a running one
    TETHER_BENCH_QUICK=1 python -m bench llm     # quick via the runner
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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
LITELLM_VENV = Path(os.environ.get("TETHER_LITELLM_VENV", "/tmp/litellm-venv"))
MODEL = "tether-scripted-1"
PROMPT = "What is the capital of France?"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}
STREAM_BODY = {**BODY, "stream": True}
TEXT_EVENT = re.compile(rb'"content":\s*"[^"]')


@dataclass
class Plan:
    runs: int  # repeats of each latency / TTFT measurement
    lat_n: int  # requests per latency run (after warmup)
    tput_runs: int
    tput_seconds: float
    rss_total: int  # requests for the RSS measurement
    litellm_lat_n: int
    litellm_rss_total: int


FULL = Plan(5, 2000, 3, 5.0, 100_000, 300, 2_000)
QUICK = Plan(3, 400, 2, 2.0, 20_000, 100, 500)


@dataclass
class Target:
    name: str
    base: str  # http://host:port
    token: str
    pid: int | None = None  # the process whose RSS we read
    prefix: str = "/v1"
    notes: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        hostport = self.base.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        return host.strip("[]"), int(port)


# =============================================================================================
# the load generator (runs in its own process)


def _request_bytes(host: str, path: str, token: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes, clock: Any
) -> tuple[float, float, int]:
    """One request on a keep-alive connection: (total seconds, first-text seconds, status)."""
    t0 = clock()
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    ttft = 0.0
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
    if m:
        body = await reader.readexactly(int(m.group(1)))
        if TEXT_EVENT.search(body):
            ttft = clock() - t0
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if not ttft and TEXT_EVENT.search(chunk):
                ttft = clock() - t0
    else:  # read to close
        await reader.read()
    return clock() - t0, ttft, status


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _client_main(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = spec["host"], spec["port"], spec["path"]
    req = _request_bytes(host, path, spec["token"], spec["body"])
    clock = time.perf_counter
    conc = int(spec.get("concurrency", 1))
    total = spec.get("total")  # a fixed number of requests, shared by the workers
    deadline = spec.get("seconds")
    warmup = int(spec.get("warmup", 0))
    lat: list[float] = []
    ttft: list[float] = []
    errors: dict[str, int] = {}
    remaining = [int(total)] if total is not None else [1 << 62]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(warmup):
                await _exchange(reader, writer, req, clock)
            ready[0] += 1
            await start.wait()
            while remaining[0] > 0 and (end is None or clock() < end):
                remaining[0] -= 1
                t, f, status = await _exchange(reader, writer, req, clock)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                lat.append(t)
                if f:
                    ttft.append(f)
        finally:
            writer.close()

    start = asyncio.Event()
    end: float | None = None
    ready = [0]
    tasks = [asyncio.create_task(worker()) for _ in range(conc)]
    # every connection opens and warms up before the clock starts
    while ready[0] < conc:
        await asyncio.sleep(0.005)
        for t in tasks:
            if t.done():
                t.result()  # a worker that failed early raises here
    t0 = clock()
    if deadline is not None:
        end = t0 + float(deadline)
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=float(spec.get("timeout", 600)))
    elapsed = clock() - t0
    return {
        "count": len(lat),
        "seconds": elapsed,
        "rps": len(lat) / elapsed if elapsed else 0.0,
        "p50": _pct(lat, 0.50),
        "p99": _pct(lat, 0.99),
        "ttft_p50": _pct(ttft, 0.50),
        "ttft_p99": _pct(ttft, 0.99),
        "ttft_n": len(ttft),
        "errors": errors,
    }


def client_process(spec_json: str) -> int:
    spec = json.loads(spec_json)
    with suppress(ImportError):
        import uvloop

        uvloop.install()
    out = asyncio.run(_client_main(spec))
    print(json.dumps(out), flush=True)
    return 0


def _load(target: Target, body: dict[str, Any], **spec: Any) -> dict[str, Any]:
    host, port = target.host_port
    doc = {
        "host": host,
        "port": port,
        "path": f"{target.prefix}/chat/completions",
        "token": target.token,
        "body": body,
        **spec,
    }
    proc = subprocess.run(
        [PY, "-m", "bench.bench_llm", "client", json.dumps(doc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=float(spec.get("timeout", 600)) + 30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {target.name}:\n{proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["errors"]:
        target.notes.append(f"non-200 answers: {out['errors']}")
    return out


# =============================================================================================
# the processes under test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, token: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.status_code == 200:
                return
            if r.status_code in (404, 405):
                raise RuntimeError(f"{url}: {r.status_code}: the LLM routes are not served there")
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s: {last}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def _upstream() -> Iterator[Target]:
    port = _free_port()
    proc = subprocess.Popen(
        [PY, "-m", "tether.gateways.llm.scripted", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/v1/models", "x", proc, 30)
        yield Target("direct", base, "upstream-key-unused", proc.pid)
    finally:
        _stop(proc)


def _tether(*args: str, env: dict[str, str] | None = None) -> str:
    exe = shutil.which("tether", path=str(Path(PY).parent)) or "tether"
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tether {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


@contextmanager
def _gateway(upstream: Target) -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="tether-bench-llm-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "TETHER_DATA_DIR": str(home)}
        _tether("init", "--data-dir", str(home), "--trust-domain", "bench.test", env=env)
        with (home / "config.toml").open("a") as f:
            f.write(
                "\n[llm.providers.bench]\n"
                'kind = "openai-compatible"\n'
                f'base_url = "{upstream.base}/v1"\n'
                "\n[[llm.routes]]\n"
                'model = "*"\n'
                'provider = "bench"\n'
            )
        port = _free_port()
        exe = shutil.which("tether", path=str(Path(PY).parent)) or "tether"
        log = (Path(tmp) / "serve.log").open("wb")
        proc = subprocess.Popen(
            [exe, "serve", "--data-dir", str(home), "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not (home / "tether.sock").exists() and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text()[-2000:])
                time.sleep(0.05)
            doc = json.loads(
                _tether(
                    "delegate",
                    "--agent",
                    "bench",
                    "--grant",
                    "model:*",
                    "--ttl",
                    "2h",
                    "--json",
                    "--data-dir",
                    str(home),
                    env=env,
                )
            )
            token = doc["token"]
            _wait_http(base + "/v1/models", token, proc, 60)
            yield Target("tether", base, token, proc.pid)
        finally:
            _stop(proc)
            log.close()


@contextmanager
def _litellm(upstream: Target) -> Iterator[Target | None]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        yield None
        return
    port = _free_port()
    env = {
        **os.environ,
        "BENCH_UPSTREAM": upstream.base + "/v1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    with tempfile.TemporaryDirectory(prefix="litellm-bench-") as tmp:
        log = (Path(tmp) / "litellm.log").open("wb")
        proc = subprocess.Popen(
            [
                str(exe),
                "--config",
                str(ROOT / "bench" / "litellm" / "config.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
                "--telemetry",
                "False",
            ],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(base + "/v1/models", "sk-bench", proc, 120)
            yield Target("litellm", base, "sk-bench", _child_pid(proc.pid))
        finally:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            log.close()


def _child_pid(pid: int) -> int:
    """LiteLLM's CLI may run the server in a child; measure the biggest process of its group."""
    best, best_rss = pid, _rss_mb(pid)
    with suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with suppress(OSError):
                    stat = (entry / "stat").read_text().split()
                    if int(stat[3]) == pid and _rss_mb(int(entry.name)) > best_rss:
                        best, best_rss = int(entry.name), _rss_mb(int(entry.name))
    return best


def _rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# =============================================================================================
# measurements


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)  # seconds, one per run
    p99: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    rss_start: float = float("nan")  # MB after the first fifth of the RSS run
    rss_end: float = float("nan")
    rss_requests: int = 0

    def med(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else float("nan")


def _latency(t: Target, fig: Figures, n: int, stream: bool) -> None:
    body = STREAM_BODY if stream else BODY
    out = _load(t, body, concurrency=1, total=n, warmup=max(50, n // 10))
    if stream:
        fig.ttft.append(out["ttft_p50"])
    else:
        fig.p50.append(out["p50"])
        fig.p99.append(out["p99"])


def _throughput(t: Target, fig: Figures, seconds: float) -> None:
    out = _load(t, BODY, concurrency=64, seconds=seconds, warmup=5)
    fig.rps.append(out["rps"])


def _rss(t: Target, fig: Figures, total: int) -> None:
    step = max(1, total // 5)
    done = 0
    while done < total:
        _load(t, BODY, concurrency=64, total=step, timeout=900)
        done += step
        if done == step:
            fig.rss_start = _rss_mb(t.pid)
    fig.rss_end = _rss_mb(t.pid)
    fig.rss_requests = done


def _measure(targets: list[Target], plan: Plan, log: Any) -> dict[str, Figures]:
    figs = {t.name: Figures() for t in targets}
    slow = {"litellm"}
    for run in range(plan.runs):
        for t in targets:
            n = plan.litellm_lat_n if t.name in slow else plan.lat_n
            if t.name in slow and run >= 2:
                continue
            _latency(t, figs[t.name], n, stream=False)
            _latency(t, figs[t.name], n, stream=True)
        log(f"  latency run {run + 1}/{plan.runs} done")
    for run in range(plan.tput_runs):
        for t in targets:
            if t.name in slow and run >= 1:
                continue
            _throughput(t, figs[t.name], plan.tput_seconds)
        log(f"  throughput run {run + 1}/{plan.tput_runs} done")
    for t in targets:
        if t.name == "direct":
            continue
        total = plan.litellm_rss_total if t.name in slow else plan.rss_total
        log(f"  {t.name}: {total:,} requests for RSS ...")
        _rss(t, figs[t.name], total)
    return figs


def _added(figs: dict[str, Figures], name: str, attr: str) -> float:
    """Median over runs of (target - direct), run by run (runs are interleaved)."""
    mine, base = getattr(figs[name], attr), getattr(figs["direct"], attr)
    pairs = list(zip(mine, base, strict=False))
    return statistics.median(a - b for a, b in pairs) if pairs else float("nan")


def _results(figs: dict[str, Figures], plan: Plan, notes: list[str]) -> list[Result]:
    d, g = figs["direct"], figs.get("tether")
    lite = figs.get("litellm")
    if g is None:
        return [Result("llm", "gateway not measured", 0, "", baseline="; ".join(notes))]

    def lite_s(text: str) -> str:
        return f"; LiteLLM {text}" if lite is not None else ""

    us = 1e6
    add50, add99 = _added(figs, "tether", "p50") * us, _added(figs, "tether", "p99") * us
    addttft = _added(figs, "tether", "ttft") * us
    growth = g.rss_end - g.rss_start
    lite_lat = lite_s(f"+{_added(figs, 'litellm', 'p50') * 1e3:,.1f} ms") if lite else ""
    lite_p99 = lite_s(f"+{_added(figs, 'litellm', 'p99') * 1e3:,.1f} ms") if lite else ""
    lite_tput = lite_s(f"{lite.med('rps'):,.0f}/s") if lite else ""
    lite_ttft = lite_s(f"+{_added(figs, 'litellm', 'ttft') * 1e3:,.1f} ms") if lite else ""
    lite_rss = lite_s(f"{lite.rss_end:,.0f} MB after {lite.rss_requests:,}") if lite else ""
    return [
        Result(
            "llm",
            "added latency p50, concurrency 1 (gateway - direct)",
            add50,
            "us",
            "<= 500 us",
            f"direct {d.med('p50') * 1e3:.3f} ms, gateway {g.med('p50') * 1e3:.3f} ms" + lite_lat,
            add50 <= 500,
        ),
        Result(
            "llm",
            "added latency p99, concurrency 1",
            add99,
            "us",
            "<= 2,000 us",
            f"direct {d.med('p99') * 1e3:.3f} ms, gateway {g.med('p99') * 1e3:.3f} ms" + lite_p99,
            add99 <= 2000,
        ),
        Result(
            "llm",
            "requests/s through one gateway process, concurrency 64",
            g.med("rps"),
            "/s",
            ">= 2,000",
            f"direct {d.med('rps'):,.0f}/s (gateway {g.med('rps') / d.med('rps'):.0%} of it)"
            + lite_tput,
            g.med("rps") >= 2000,
        ),
        Result(
            "llm",
            "streaming: added time to first token p50, concurrency 1",
            addttft,
            "us",
            "<= 500 us",
            f"direct {d.med('ttft') * 1e3:.3f} ms, gateway {g.med('ttft') * 1e3:.3f} ms"
            + lite_ttft,
            addttft <= 500,
        ),
        Result(
            "llm",
            f"gateway RSS after {g.rss_requests:,} requests",
            g.rss_end,
            "MB",
            "<= 150 MB, flat",
            f"grew {growth:+.1f} MB over the last {g.rss_requests * 4 // 5:,}" + lite_rss,
            g.rss_end <= 150 and growth <= 10,
        ),
    ]


def _detail_table(figs: dict[str, Figures]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(figs)
    table = Table(title="LLM gateway, side by side (medians over runs)")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    if "tether" in figs:
        table.add_column("tether / direct", justify="right")
    d = figs["direct"]

    def row(label: str, attr: str, scale: float, fmt: str) -> None:
        cells = [fmt.format(figs[n].med(attr) * scale) for n in names]
        if "tether" in figs:
            ratio = figs["tether"].med(attr) / d.med(attr) if d.med(attr) else float("nan")
            cells.append(f"{ratio:.2f}x")
        table.add_row(label, *cells)

    row("p50 latency, c=1 (ms)", "p50", 1e3, "{:.3f}")
    row("p99 latency, c=1 (ms)", "p99", 1e3, "{:.3f}")
    row("TTFT p50, stream, c=1 (ms)", "ttft", 1e3, "{:.3f}")
    row("requests/s, c=64", "rps", 1, "{:,.0f}")
    rss = [
        "-" if figs[n].rss_requests == 0 else f"{figs[n].rss_end:,.0f} ({figs[n].rss_requests:,})"
        for n in names
    ]
    table.add_row("RSS MB (after N requests)", *rss, *([""] if "tether" in figs else []))
    Console(width=140, stderr=True).print(table)


def bench(
    quick: bool = False,
    gateway_url: str | None = None,
    token: str | None = None,
    litellm: bool = True,
    detail: bool = False,
) -> list[Result]:
    plan = QUICK if quick else FULL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    notes: list[str] = []
    with _upstream() as direct:
        targets = [direct]
        with _maybe_gateway(direct, gateway_url, token, notes) as gw:
            if gw is not None:
                targets.append(gw)
            with _litellm(direct) if litellm else _none() as lite:
                if lite is not None:
                    targets.append(lite)
                elif litellm:
                    notes.append("LiteLLM not installed (bash bench/litellm/setup.sh)")
                log(f"llm bench ({'quick' if quick else 'full'}): {[t.name for t in targets]}")
                figs = _measure(targets, plan, log)
        for t in targets:
            notes += [f"{t.name}: {n}" for n in dict.fromkeys(t.notes)]
    if detail:
        _detail_table(figs)
    for n in notes:
        log(f"note: {n}")
    return _results(figs, plan, notes)


@contextmanager
def _none() -> Iterator[None]:
    yield None


@contextmanager
def _maybe_gateway(
    direct: Target, url: str | None, token: str | None, notes: list[str]
) -> Iterator[Target | None]:
    if url:
        yield Target("tether", url.rstrip("/"), token or "", _pid_listening(url))
        return
    try:
        cm = _gateway(direct)
        gw = cm.__enter__()
    except Exception as e:  # the gateway is not there (yet): measure the rest, say why
        notes.append(f"gateway not started: {str(e).strip().splitlines()[-1][:200]}")
        yield None
        return
    try:
        yield gw
    finally:
        cm.__exit__(None, None, None)


def _pid_listening(url: str) -> int | None:
    """The pid of a local process listening on the URL's port (for RSS), if we can see it."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    inode = None
    with suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:
                inode = parts[9]
                break
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(entry.name)
    return None


def run() -> list[Result]:
    return bench(quick=os.environ.get("TETHER_BENCH_QUICK") == "1")


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_process(argv[1])
    p = argparse.ArgumentParser(prog="python -m bench.bench_llm")
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs; 20k for RSS")
    p.add_argument("--gateway-url", help="measure this running gateway instead of starting one")
    p.add_argument("--token", help="the agent token for --gateway-url")
    p.add_argument("--no-litellm", action="store_true")
    a = p.parse_args(argv)
    from bench._table import print_table

    print_table(bench(a.quick, a.gateway_url, a.token, not a.no_litellm, detail=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
