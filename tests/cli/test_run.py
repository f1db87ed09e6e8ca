"""`tether run` and `tether beam ...` with the real command against a real `tether serve`
process and real bwrap sandboxes: output streamed, exit codes propagated, TTL, the attestation
proven, an unmodified OpenAI-SDK agent reaching its model through Tether and nothing else, and
leftovers reaped after the server is killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TETHER = [sys.executable, "-m", "tether.cli.main"]
AGENT = ROOT / "scripts" / "agent_demo.py"


def _bwrap_problem() -> str | None:
    from tether.runtime.sandbox import get_backend

    try:
        get_backend("bwrap", state_dir=Path(tempfile.mkdtemp(prefix="tr-probe-")))
    except Exception as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(
    (why := _bwrap_problem()) is not None, reason=f"this host cannot run bwrap: {why}"
)


def tether(
    home: Path, *args: str, ok: bool | None = True, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TETHER_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("TETHER_ADDR", None)
    proc = subprocess.run(
        [*TETHER, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if ok is True and proc.returncode != 0:
        raise AssertionError(f"tether {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.home = home
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "TETHER_HOME": str(self.home)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*TETHER, "serve", "--listen", f"127.0.0.1:{self.port}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        sock = self.home / "tether.sock"
        deadline = time.monotonic() + 60
        while True:
            if sock.exists():
                try:
                    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
                        if c.get("http://tether/readyz").status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("server did not start: " + self.log.read_text())
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


def _serving(root: Path) -> Iterator[Server]:
    home = root / "home"
    tether(home, "init", "--trust-domain", "example.org")
    srv = Server(home, free_port(), root / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from _serving(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that only read or get refused."""
    yield from _serving(tmp_path_factory.mktemp("shared"))


def _beam_id(stderr: str) -> str:
    found = re.search(r"beam (b-[0-9a-f]{12})", stderr)
    assert found is not None, stderr
    return found.group(1)


def _beam(home: Path, beam_id: str) -> dict[str, Any]:
    found = [
        b
        for b in json.loads(tether(home, "beam", "ls", "--json").stdout)["beams"]
        if b["id"] == beam_id
    ]
    assert len(found) == 1, beam_id
    return found[0]


def _session(home: Path, beam_id: str) -> list[dict[str, Any]]:
    proc = tether(home, "audit", "session", beam_id, "--json")
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_run_streams_output_and_exits_with_the_commands_code(shared: Server) -> None:
    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(7)"
    proc = tether(shared.home, "run", "--", "python", "-c", script, ok=None)
    assert proc.returncode == 7
    assert proc.stdout == "to stdout\n"  # only the command's output on stdout
    assert "to stderr" in proc.stderr and "exited with 7" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ttl_kills_the_beam_and_run_says_so(shared: Server) -> None:
    proc = tether(
        shared.home,
        "run",
        "--ttl",
        "1s",
        "--",
        "python",
        "-c",
        "import time; time.sleep(3600)",
        ok=None,
    )
    assert proc.returncode == 128 + signal.SIGKILL
    assert "TTL ran out" in proc.stderr
    beam = _beam(shared.home, _beam_id(proc.stderr))
    assert beam["state"] == "ended" and beam["end_reason"] == "ttl"
    types = [e["type"] for e in _session(shared.home, beam["id"])]
    assert types[0] == "beam.attest" and types[-1] == "beam.end"
    assert "identity.issued" in types and "beam.start" in types


def test_the_done_when_an_openai_sdk_agent_reaches_its_model_through_tether_only(
    shared: Server, tmp_path: Path
) -> None:
    server = shared
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(AGENT, work / "agent.py")
    probe = (
        "import json, socket\n"
        f"port = {server.port}\n"
        "out = {}\n"
        "targets = (('server_tcp', ('127.0.0.1', port)), ('bridge', ('127.0.0.1', 8080)))\n"
        "for name, addr in targets:\n"
        "    s = socket.socket()\n"
        "    s.settimeout(5)\n"
        "    try:\n"
        "        s.connect(addr); out[name] = 'connected'\n"
        "    except OSError as e:\n"
        "        out[name] = type(e).__name__\n"
        "    finally:\n"
        "        s.close()\n"
        "print(json.dumps(out))\n"
    )
    (work / "probe.py").write_text(probe)
    proc = tether(
        server.home,
        "run",
        "--objective",
        "check the weather",
        "--grant",
        "model:tether-scripted-1",
        "--grant",
        "tool:get_weather",
        "--workspace",
        str(work),
        "--",
        "sh",
        "-c",
        "python agent.py && python probe.py",
    )
    lines = proc.stdout.splitlines()
    assert any("proposes get_weather" in line for line in lines), proc.stdout
    assert any(
        line.startswith("agent: the model says: [scripted model] tool result:") for line in lines
    ), proc.stdout
    reach = json.loads(lines[-1])
    # the server's own TCP port is not there (the beam has its own network namespace),
    # the bridge forwarder is
    assert reach == {"server_tcp": "ConnectionRefusedError", "bridge": "connected"}

    beam = _beam(server.home, _beam_id(proc.stderr))
    session = _session(server.home, beam["id"])
    invoked = [e for e in session if e["type"] == "llm.invoke"]
    assert len(invoked) == 2 and all(e["actor"] == beam["spiffe_id"] for e in invoked)
    assert [e["type"] for e in session if e["type"] == "tool.call"] == ["tool.call"]

    show = tether(server.home, "beam", "show", beam["id"])
    assert "proven" in show.stdout and beam["attestation"]["sha256"] in show.stdout
    proof = json.loads(tether(server.home, "beam", "show", beam["id"], "--json").stdout)["proof"]
    assert proof["entry_index"] == session[0]["index"]  # the first entry of the session
    assert session[0]["type"] == "beam.attest"


def test_ctrl_c_kills_the_beam(shared: Server) -> None:
    env = {**os.environ, "TETHER_HOME": str(shared.home), "NO_COLOR": "1"}
    env.pop("TETHER_ADDR", None)
    proc = subprocess.Popen(
        [*TETHER, "run", "--", "sh", "-c", "echo up; sleep 1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"  # the beam runs
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"interrupted: killing beam" in err
    beam = _beam(shared.home, _beam_id(err.decode()))
    assert beam["state"] == "ended" and beam["end_reason"] == "killed"


def test_restart_reaps_what_a_killed_server_left(server: Server) -> None:
    beam_id = tether(
        server.home, "run", "-d", "--", "python", "-c", "import time; time.sleep(3600)"
    ).stdout.strip()
    server.stop(signal.SIGKILL)  # no chance to clean up
    server.start()
    [beam] = json.loads(tether(server.home, "beam", "ls", "--json").stdout)["beams"]
    assert beam["id"] == beam_id and beam["state"] == "ended" and beam["end_reason"] == "reaped"
    last = _session(server.home, beam_id)[-1]
    assert last["type"] == "beam.reaped" and last["data"]["revoked"] is True
    revoked = tether(server.home, "audit", "search", "--type", "identity.revoked", "--json")
    assert beam["token"]["token_id"] in revoked.stdout


def test_kill_exec_logs_and_rm(shared: Server) -> None:
    server = shared
    beam_id = tether(
        server.home,
        "run",
        "-d",
        "--",
        "python",
        "-c",
        "import time; print('started', flush=True); time.sleep(3600)",
    ).stdout.strip()
    ex = tether(
        server.home,
        "beam",
        "exec",
        beam_id,
        "--",
        "sh",
        "-c",
        "echo $TETHER_BEAM_ID; exit 4",
        ok=None,
    )
    assert ex.returncode == 4 and ex.stdout.strip() == beam_id
    busy = tether(server.home, "beam", "rm", beam_id, ok=False)
    assert busy.returncode == 1 and "running" in busy.stderr
    assert "killed beam" in tether(server.home, "beam", "kill", beam_id).stdout
    logs = tether(server.home, "beam", "logs", beam_id)
    assert logs.stdout == "started\n" and "killed by spiffe://example.org/user/admin" in logs.stderr
    tether(server.home, "beam", "rm", beam_id)
    gone = tether(server.home, "beam", "show", beam_id, ok=False)
    assert gone.returncode == 1 and "no beam" in gone.stderr


BAD_RUNS: dict[str, tuple[list[str], str]] = {
    "bad_ttl": (["--ttl", "soon"], "invalid ttl"),
    "bad_memory": (["--memory", "lots"], "invalid memory size"),
    "unknown_backend": (["--backend", "docker"], "unknown backend"),
    "malformed_grant": (["--grant", "gpt-4o"], "expected KIND:PATTERN"),
    "unknown_grant_kind": (["--grant", "disk:/"], "unknown grant kind"),
    "bad_cpus": (["--cpus", "0"], "outside 0.01..1024"),
    "bad_domain": (["--allow-domain", "https://x.org/"], "invalid domain"),
}


@pytest.mark.parametrize("name", sorted(BAD_RUNS))
def test_bad_input_gets_a_clear_error(shared: Server, name: str) -> None:
    args, words = BAD_RUNS[name]
    proc = tether(shared.home, "run", *args, "--", "true", ok=False)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_grants_wider_than_the_creators_are_refused(shared: Server, tmp_path: Path) -> None:
    agent = tmp_path / "agent.jwt"
    tether(
        shared.home,
        "delegate",
        "--agent",
        "runner",
        "--grant",
        "model:gpt-4o-mini",
        "--out",
        str(agent),
    )
    proc = tether(
        shared.home, "run", "--token", str(agent), "--grant", "model:*", "--", "true", ok=False
    )
    assert proc.returncode == 1
    assert "grant model:* is wider than the grantor's" in proc.stderr, proc.stderr
    ok = tether(
        shared.home, "run", "--token", str(agent), "--grant", "model:gpt-4o-mini", "--", "true"
    )
    assert ok.returncode == 0


def test_run_without_a_command_says_how(shared: Server) -> None:
    proc = tether(shared.home, "run", ok=False)
    assert proc.returncode == 2 and "Missing argument" in proc.stderr
