"""`tether approvals ...` and `tether request` through ApiClient against the real app."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from rich.console import Console
from typer.testing import CliRunner

from tether.cli import approvals as cli
from tether.cli.client import ApiClient
from tether.clock import ManualClock
from tether.config import DataDir
from tether.policy.action import Action
from tether.policy.approvals import Approvals
from tether.policy.jit import JitGrants
from tether.server.app import create_app
from tether.server.services import Services
from tether.store.approvals import ApprovalStore

app = typer.Typer()
app.add_typer(cli.approvals_app, name="approvals")
app.command("request")(cli.request_cmd)
runner = CliRunner()


class Env:
    def __init__(self, home: Path, desk: Approvals, services: Services, tmp: Path) -> None:
        self.home = home
        self.desk = desk
        self.services = services
        self.tmp = tmp

    def token_file(self, name: str, token: str) -> str:
        path = self.tmp / f"{name}.jwt"
        path.write_text(token)
        return str(path)

    def run(self, *args: str, ok: bool = True) -> str:
        res = runner.invoke(app, [*args, "--data-dir", str(self.home)], env={"COLUMNS": "200"})
        if ok:
            assert res.exit_code == 0, res.output
        else:
            assert res.exit_code == 1, res.output
        return res.output


@pytest.fixture
def env(
    home: Path,
    services: Services,
    admin_token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    # The console is built at import, with whatever width the collecting process had.
    monkeypatch.setattr(cli, "out", Console(width=200, highlight=False))
    store = ApprovalStore(services.data_dir.db_path)
    desk = Approvals(store, services.audit, clock=ManualClock(time.time()))
    api = create_app(services)
    api.state.approvals = desk
    api.state.jit = JitGrants(desk)
    http = TestClient(api, base_url="http://tether")

    def client(data_dir: Path | None) -> ApiClient:
        c = ApiClient(DataDir(home), addr="http://tether")
        c._http.close()
        c._http = http  # type: ignore[assignment]
        c.close = lambda: None  # type: ignore[method-assign]
        return c

    monkeypatch.setattr(cli, "_client", client)
    yield Env(home, desk, services, tmp_path)
    http.close()
    store.close()


def test_request_ls_show_approve(env: Env) -> None:
    s = env.services
    admin = s.verifier.verify(
        s.authority.login((env.home / "credentials/admin").read_text().strip()).token
    )
    worker = env.token_file("worker", s.authority.delegate(admin, "worker", ["tool:db.*"]).token)
    s.store.add_user("bob", "tether_uc_bob", ["tool:*"], 0)
    bob = env.token_file("bob", s.authority.login("tether_uc_bob").token)

    text = env.run(
        "request",
        "--grant",
        "tool:db.migrate",
        "--reason",
        "hotfix",
        "--ttl",
        "30m",
        "--token",
        worker,
    )
    assert "requested jit_" in text and "1 more of human" in text
    rid = text.split("requested ")[1].split()[0]

    listing = env.run("approvals", "ls")
    assert rid in listing and "grants tool:db.migrate" in listing
    doc = json.loads(env.run("approvals", "ls", "--json"))
    assert [a["id"] for a in doc["approvals"]] == [rid]

    shown = env.run("approvals", "show", rid)
    assert "hotfix" in shown and "1 of human" in shown

    # the admin delegated the worker: refused with the reason
    refused = env.run("approvals", "approve", rid, ok=False)
    assert "delegated the requester" in refused and "HTTP 403" in refused

    assert f"approved {rid}" in env.run(
        "approvals", "approve", rid, "--token", bob, "--comment", "ok"
    )
    again = env.run(
        "request", "--grant", "tool:db.migrate", "--reason", "x", "--ttl", "5m", "--token", worker
    )
    assert "already approved" in again
    assert "HTTP 409" in env.run(
        "approvals", "deny", rid, "--reason", "late", "--token", bob, ok=False
    )


def test_deny_and_escalated_action(env: Env) -> None:
    s = env.services
    admin = s.verifier.verify(
        s.authority.login((env.home / "credentials/admin").read_text().strip()).token
    )
    worker = s.verifier.verify(s.authority.delegate(admin, "worker", ["tool:db.*"]).token)
    s.store.add_user("bob", "tether_uc_bob", ["tool:*"], 0)
    bob = env.token_file("bob", s.authority.login("tether_uc_bob").token)
    rid = env.desk.open(
        Action("tool.call", worker, "db.drop", {"table": "t"}), ("risky",), "1 of human", "v1"
    )
    shown = env.run("approvals", "show", rid, "--token", bob)
    assert "tool.call db.drop" in shown and '{"table": "t"}' in shown
    assert f"denied {rid}" in env.run("approvals", "deny", rid, "--reason", "no", "--token", bob)
    assert rid in env.run("approvals", "ls", "--state", "denied")
    assert "HTTP 404" in env.run("approvals", "show", "apr_00", ok=False)
    assert "HTTP 400" in env.run(
        "request", "--grant", "budget:tokens=-3", "--reason", "x", "--ttl", "5m", ok=False
    )
