"""The tool gateway's done-when, in a beam: an agent using the official MCP SDK and holding only
its beam token reads customer rows through ``/mcp/crm`` (the bundled SQL MCP server over
stdio), is refused a write tool outside its grants, and waits for a human's approval on a
schema change, which then really happens; every step is in the audit log. (The description
swap is tested against a swapping upstream in tests/gateways/mcp/test_story.py.)"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.test_cli_e2e import TETHER, free_port, run
from tether.runtime.sandbox import get_backend

ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
@id("crm-schema-changes-need-a-human")
@escalate("1 of human")
permit (
  principal,
  action == Tether::Action::"tool.call",
  resource == Tether::Tool::"crm.create_index"
) when { context.granted };
"""


def _bwrap_missing() -> str | None:
    try:
        return get_backend("bwrap").available()
    except Exception as e:
        return str(e)


pytestmark = pytest.mark.skipif(_bwrap_missing() is not None, reason=str(_bwrap_missing()))


@pytest.fixture
def crm_server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    home = tmp_path / "home"
    db = tmp_path / "crm.db"
    run(home, "init", "--trust-domain", "example.org")
    subprocess.run(
        [sys.executable, "-m", "tether.toolbox.sql", "--db", str(db), "--seed-demo", "--seed-only"],
        check=True,
        capture_output=True,
    )
    with (home / "config.toml").open("a") as f:
        f.write(
            "\n[mcp.servers.crm]\n"
            f'command = ["{sys.executable}", "-m", "tether.toolbox.sql", "--db", "{db}"]\n'
            'escalation_hold = "60s"\n'
        )
    (home / "policies" / "40-crm.cedar").write_text(POLICY)
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "TETHER_HOME": str(home)}
    env.pop("TETHER_ADDR", None)
    proc = subprocess.Popen(
        [*TETHER, "serve", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start: " + (tmp_path / "server.log").read_text())
        time.sleep(0.05)
    try:
        yield home, db
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def test_mcp_agent_in_a_beam_reads_is_refused_and_waits_for_approval(
    crm_server: tuple[Path, Path], tmp_path: Path
) -> None:
    home, db = crm_server
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "scripts" / "mcp_agent_demo.py", work / "mcp_agent.py")
    run(home, "users", "add", "bob")
    env = {**os.environ, "TETHER_HOME": str(home), "NO_COLOR": "1"}
    env.pop("TETHER_ADDR", None)
    agent = subprocess.Popen(
        [
            *TETHER,
            "run",
            "--objective",
            "weekly churn-risk report",
            "--grant",
            "tool:crm.query",
            "--grant",
            "tool:crm.list_tables",
            "--grant",
            "tool:crm.create_index",
            "--ttl",
            "3m",
            "--workspace",
            str(work),
            "--",
            "python",
            "mcp_agent.py",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        approval = None
        deadline = time.monotonic() + 90
        while approval is None and time.monotonic() < deadline and agent.poll() is None:
            doc = json.loads(run(home, "approvals", "ls", "--json").stdout)
            held = [a for a in doc["approvals"] if a["summary"]["resource"] == "crm.create_index"]
            approval = held[0]["id"] if held else None
            time.sleep(0.2)
        assert approval, "the schema change never asked for approval"
        with sqlite3.connect(db) as conn:  # held: nothing happened yet
            assert not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'ix_events_customer_id'"
            ).fetchall()
        bob = {**env, "TETHER_USER": "bob"}
        subprocess.run(
            [*TETHER, "approvals", "approve", approval], env=bob, check=True, capture_output=True
        )
        out, err = agent.communicate(timeout=90)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, out + err
    assert "create_index, list_tables, query" in out  # only what its grants reach
    assert "customer rows: [" in out
    assert "execute_write refused (-32050)" in out
    assert '"created": true' in out
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'ix_events_customer_id'"
        ).fetchall()

    beam = json.loads(run(home, "beam", "ls", "--json").stdout)["beams"][0]["id"]
    lines = run(home, "audit", "session", beam, "--json").stdout.splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    calls = [(e["subject"], e["decision"]) for e in entries if e["type"] == "tool.call"]
    assert ("crm.query", "allow") in calls
    assert ("crm.execute_write", "deny") in calls
    assert ("crm.create_index", "allow") in calls  # held, then allowed by the approval
    kinds = [e["type"] for e in entries]
    assert kinds.index("approval.requested") < kinds.index("approval.used")
    assert entries[0]["type"] == "beam.attest"
