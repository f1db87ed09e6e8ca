"""A real ``tether serve`` subprocess with one OpenAI-compatible upstream, and an agent token
for it: the gateway exactly as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TETHER = [sys.executable, "-m", "tether.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tether(home: Path, *args: str) -> str:
    env = {**os.environ, "TETHER_HOME": str(home), "NO_COLOR": "1"}
    env.pop("TETHER_ADDR", None)
    proc = subprocess.run([*TETHER, *args], capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"tether {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


@contextmanager
def tether_gateway(
    home: Path, upstream_v1: str, model: str, *, anthropic_messages: bool = True
) -> Iterator[tuple[str, str]]:
    """Serve Tether from ``home`` with ``upstream_v1`` (``http://host:port/v1``) as the
    provider for ``model``; yields (base URL, an agent token granted that model)."""
    _tether(home, "init", "--trust-domain", "example.org")
    with (home / "config.toml").open("a") as f:
        f.write(
            "\n[llm.providers.upstream]\n"
            'kind = "openai-compatible"\n'
            f'base_url = "{upstream_v1}"\n'
            f"anthropic_messages = {'true' if anthropic_messages else 'false'}\n"
            "\n[[llm.routes]]\n"
            f'model = "{model}"\n'
            'provider = "upstream"\n'
        )
    port = _free_port()
    log_path = home.parent / "tether-serve.log"
    env = {**os.environ, "TETHER_HOME": str(home)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*TETHER, "serve", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("tether serve did not start: " + log_path.read_text())
                time.sleep(0.05)
            doc = json.loads(
                _tether(
                    home,
                    "delegate",
                    "--agent",
                    "llm-test",
                    "--grant",
                    f"model:{model}",
                    "--ttl",
                    "30m",
                    "--json",
                )
            )
            yield base, doc["token"]
        finally:
            proc.terminate()
            proc.wait(timeout=15)
