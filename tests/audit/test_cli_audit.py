"""``tether audit ...`` against a real data directory, read-only, with the server's log open."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tether.cli.audit import app
from tether.events import Event
from tether.server.services import Services

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def cli(home: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "--data-dir", str(home)])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def filled(home: Path, services: Services) -> Path:
    """A data dir whose log holds a short agent session (plus the init entry)."""
    log = services.audit
    td = "spiffe://example.org"
    log.record(
        Event(
            type="identity.issued",
            actor=f"{td}/user/admin",
            subject=f"{td}/agent/researcher",
            session="churn-42",
            data={"grants": ["model:gpt-4o*"], "chain": [f"{td}/user/admin"]},
        )
    )
    log.record(
        Event(
            type="llm.invoke",
            actor=f"{td}/agent/researcher",
            session="churn-42",
            decision="allow",
            data={"model": "gpt-4o", "reason": "permit p-models"},
            bodies={
                "prompt": b"Summarise churn for Q3. " * 30,
                "response": b"Churn fell by 2 points.",
            },
        )
    )
    log.record(
        Event(
            type="tool.call",
            actor=f"{td}/agent/researcher",
            session="churn-42",
            decision="deny",
            data={"tool": "shell.exec", "reason": "forbid p-shell"},
        )
    )
    for _ in range(300):  # wait for the checkpointer to cover everything
        if int(log.latest_checkpoint().split("\n")[1]) == log.size():
            break
        time.sleep(0.01)
    return home


def test_verify_ok_while_the_server_runs(filled: Path) -> None:
    code, out, _ = cli(filled, "verify")
    assert code == 0, out
    assert "OK" in out and "entries      4" in out


def test_verify_names_a_flipped_byte_and_exits_1(filled: Path, services: Services) -> None:
    services.close()
    conn = sqlite3.connect(filled / "audit.db", isolation_level=None)
    data = conn.execute("SELECT data FROM entries WHERE idx = 2").fetchone()[0]
    conn.execute("UPDATE entries SET data = ? WHERE idx = 2", (data.replace(b"gpt-4o", b"gpt-4x"),))
    conn.close()
    code, _, err = cli(filled, "verify")
    assert code == 1
    assert "FAILED" in err and "first bad entry: 2" in err


def test_saved_checkpoint_then_verify_extends(filled: Path, tmp_path: Path) -> None:
    saved = tmp_path / "cp.txt"
    assert cli(filled, "checkpoint", "--out", str(saved))[0] == 0
    assert saved.read_text().startswith("example.org/tether/audit\n4\n")
    code, out, _ = cli(filled, "verify", "--checkpoint", str(saved))
    assert code == 0 and "extends      the given checkpoint at size 4" in out


def test_session_timeline_reads_like_a_story(filled: Path) -> None:
    code, out, _ = cli(filled, "session", "churn-42")
    assert code == 0, out
    lines = out.splitlines()
    assert "session churn-42: 3 entries" in lines[0]
    text = " ".join(out.split())
    for expected in [
        "identity.issued",
        "-> spiffe://example.org/agent/researcher",
        'grants: ["model:gpt-4o*"]',
        "llm.invoke",
        "allow",
        "reason: permit p-models",
        "prompt: Summarise churn for Q3.",
        "response: Churn fell by 2 points.",
        "tool.call",
        "deny",
        "reason: forbid p-shell",
    ]:
        assert expected in text, expected
    assert "more]" in text  # the long prompt is truncated
    assert cli(filled, "session", "nope")[0] == 1


def test_show_proof_tail_search(filled: Path) -> None:
    code, out, _ = cli(filled, "show", "2")
    assert code == 0 and '"index": 2' in out and "body prompt" in out
    code, out, _ = cli(filled, "proof", "1")
    assert code == 0 and "verified against the signed checkpoint" in out
    code, out, _ = cli(filled, "tail", "-n", "2", "--json")
    assert [json.loads(line)["index"] for line in out.splitlines()] == [2, 3]
    code, out, _ = cli(filled, "search", "--decision", "deny", "--json")
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["tool.call"]
    code, out, _ = cli(filled, "search", "--type", "llm.*", "--since", "1h")
    assert code == 0 and "llm.invoke" in out and "1 entries" in out
    code, _, err = cli(filled, "search", "--since", "yesterday-ish")
    assert code == 1 and "not a time" in err
    code, _, err = cli(filled, "show", "99")
    assert code == 1 and "no audit entry 99" in err


def test_export_and_standalone_verifier(filled: Path, tmp_path: Path) -> None:
    export, cp, bodies = tmp_path / "e.jsonl", tmp_path / "cp.txt", tmp_path / "bodies"
    code, _, err = cli(
        filled,
        "export",
        "--format",
        "jsonl",
        "--out",
        str(export),
        "--bodies",
        str(bodies),
        "--checkpoint-out",
        str(cp),
    )
    assert code == 0 and "exported 4 entries" in err
    vkey = cli(filled, "vkey")[1].strip()
    assert vkey == (filled / "keys" / "audit-note.vkey").read_text().strip()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "verify_log.py"),
            "--log",
            str(export),
            "--checkpoint",
            str(cp),
            "--key",
            vkey,
            "--bodies",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code, out, _ = cli(filled, "export", "--format", "ocsf")
    assert [json.loads(line)["class_uid"] for line in out.splitlines()] == [6003, 3002, 6003, 6003]
    assert cli(filled, "export", "--format", "csv")[0] == 1


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path / "nowhere", "verify")
    assert code == 1 and "no Tether data directory" in err
