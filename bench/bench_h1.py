"""The gateways' HTTP/1.1 client (``tether.gateways.h1``) against aiohttp, set up the way the
LLM gateway used it before (no cookie jar, nothing from the environment), and a raw keep-alive
socket with precomputed request bytes (the floor), all against the same local upstream.

The upstream is the bundled scripted model in its own process (uvicorn + httptools + uvloop,
as ``bench_llm`` starts it). The clients run in this process on uvloop, one at a time, their
runs interleaved, medians taken:

* c=1: sequential non-streaming chat completions on one keep-alive connection, p50 / p99;
* c=64: 64 tasks for a few seconds: calls/s, and the client's CPU per call (process time over
  calls; the upstream runs in another process). Inside the gateway the event loop is
  CPU-bound at c=64, so CPU per call is what a client costs the gateway.

    python -m bench.bench_h1 [--quick]        # standalone, prints the table
    python -m bench h1                          # via the runner
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop

from bench._table import Result
from bench.bench_llm import BODY, _upstream
from tether.gateways.h1 import HttpClient

PAYLOAD = json.dumps(BODY, separators=(",", ":")).encode()
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "authorization": "Bearer sk-bench-upstream-key",
}
CONCURRENCY = 64

Call = Callable[[], Awaitable[int]]  # one POST, body read; returns the status


class _Setup:
    """A client under test: ``open()`` inside the loop returns its call; ``close()`` after."""

    name = ""

    async def open(self, url: str) -> Call:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _H1(_Setup):
    name = "h1"

    async def open(self, url: str) -> Call:
        self.client = HttpClient(max_connections=256, read_timeout=600.0)
        client = self.client

        async def call() -> int:
            r = await client.request("POST", url, headers=HEADERS, body=PAYLOAD)
            await r.aread()
            return r.status_code

        return call

    async def close(self) -> None:
        await self.client.aclose()


class _Aiohttp(_Setup):
    name = "aiohttp"

    async def open(self, url: str) -> Call:
        # Set up as the gateways had it: no cookie jar, nothing from the environment.
        self.session = session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=600.0),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

        async def call() -> int:
            resp = await session.post(url, data=PAYLOAD, headers=HEADERS, allow_redirects=False)
            await resp.read()
            resp.release()
            return resp.status

        return call

    async def close(self) -> None:
        await self.session.close()


class _RawSocket(_Setup):
    """The floor: precomputed request bytes, one connection per task, Content-Length bodies."""

    name = "raw socket"

    async def open(self, url: str) -> Call:
        hostport, _, path = url.removeprefix("http://").partition("/")
        host, _, port = hostport.rpartition(":")
        head = f"POST /{path} HTTP/1.1\r\nhost: {hostport}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in HEADERS.items()
        )
        req = f"{head}content-length: {len(PAYLOAD)}\r\n\r\n".encode() + PAYLOAD
        self.conns: dict[asyncio.Task[Any] | None, Any] = {}
        conns = self.conns

        async def call() -> int:
            me = asyncio.current_task()
            pair = conns.get(me)
            if pair is None:
                pair = conns[me] = await asyncio.open_connection(host, int(port))
            reader, writer = pair
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                await reader.readexactly(int(lower[i + 15 : lower.find(b"\r\n", i)]))
            else:  # chunked
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            return int(head[9:12])

        return call

    async def close(self) -> None:
        for _, writer in self.conns.values():
            writer.close()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _latency(setup: _Setup, url: str, n: int) -> tuple[float, float]:
    call = await setup.open(url)
    try:
        for _ in range(max(50, n // 10)):
            await call()
        samples = []
        clock = time.perf_counter
        for _ in range(n):
            t = clock()
            status = await call()
            samples.append(clock() - t)
            assert status == 200, status
        return _pct(samples, 0.5), _pct(samples, 0.99)
    finally:
        await setup.close()


async def _throughput(setup: _Setup, url: str, seconds: float) -> tuple[float, float]:
    call = await setup.open(url)
    try:
        await asyncio.gather(*(call() for _ in range(CONCURRENCY)))  # open the connections
        count = 0
        end = 0.0

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < end:
                status = await call()
                assert status == 200, status
                count += 1

        cpu0, t0 = time.process_time(), time.perf_counter()
        end = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        return count / wall, cpu / count
    finally:
        await setup.close()


def bench(quick: bool = False) -> list[Result]:
    runs, n, seconds = (3, 1000, 2.0) if quick else (5, 3000, 4.0)
    setups: list[_Setup] = [_H1(), _Aiohttp(), _RawSocket()]
    lat: dict[str, list[tuple[float, float]]] = {s.name: [] for s in setups}
    tput: dict[str, list[tuple[float, float]]] = {s.name: [] for s in setups}
    with _upstream() as up:
        url = up.base + "/v1/chat/completions"
        for i in range(runs):
            for s in setups:
                lat[s.name].append(uvloop.run(_latency(s, url, n)))
                tput[s.name].append(uvloop.run(_throughput(s, url, seconds)))
            print(f"  h1 bench run {i + 1}/{runs} done", file=sys.stderr, flush=True)

    def med(d: dict[str, list[tuple[float, float]]], name: str, i: int) -> float:
        return statistics.median(v[i] for v in d[name])

    def base(d: dict[str, list[tuple[float, float]]], i: int, scale: float, fmt: str) -> str:
        return "; ".join(
            f"{name} {format(med(d, name, i) * scale, fmt)}" for name in ("aiohttp", "raw socket")
        )

    return [
        Result(
            "h1",
            "POST + whole body, c=1, p50 (client + local upstream)",
            med(lat, "h1", 0) * 1e6,
            "us",
            baseline=base(lat, 0, 1e6, ".0f") + " us",
        ),
        Result(
            "h1",
            "the same, p99",
            med(lat, "h1", 1) * 1e6,
            "us",
            baseline=base(lat, 1, 1e6, ".0f") + " us",
        ),
        Result(
            "h1",
            f"calls/s, c={CONCURRENCY} (upstream on the other core)",
            med(tput, "h1", 0),
            "/s",
            baseline=base(tput, 0, 1, ",.0f") + " /s",
        ),
        Result(
            "h1",
            f"client CPU per call, c={CONCURRENCY}",
            med(tput, "h1", 1) * 1e6,
            "us",
            baseline=base(tput, 1, 1e6, ".0f") + " us",
        ),
    ]


def run() -> list[Result]:
    return bench(quick=os.environ.get("TETHER_BENCH_QUICK") == "1")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_h1")
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    a = p.parse_args(argv)
    from bench._table import print_table

    print_table(bench(a.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
