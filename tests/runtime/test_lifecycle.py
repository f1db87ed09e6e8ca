"""The beam lifecycle against the real core (store, audit log, Cedar, authority) with a fake
sandbox backend at the seam: plain child processes, no isolation. Isolation itself, and the
same lifecycle through the API with real bwrap, are tested in test_lifecycle_bwrap.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from tether.errors import (
    BadRequest,
    DelegationRefused,
    NotFound,
    PermissionDenied,
    RecordFailed,
    TokenRevoked,
)
from tether.identity.claims import TokenClaims
from tether.runtime.attest import BaseFsDigest, attestation_digest
from tether.runtime.beams import BeamConflict, parse_beam_request
from tether.runtime.sandbox import Leftover, SandboxSpec
from tether.runtime.supervisor import BeamSupervisor
from tether.server.services import Services

PY = sys.executable


class FakeSandbox:
    def __init__(self, spec: SandboxSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self.proc = proc
        self.beam_id = spec.beam_id
        self.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.kills = 0

    async def wait(self) -> int:
        rc = await self.proc.wait()
        return rc if rc >= 0 else 128 - rc

    async def kill(self) -> None:
        self.kills += 1
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env or self.spec.env),
            cwd=self.spec.workspace,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    def info(self) -> dict[str, Any]:
        return {"backend": "fake", "pid": self.pid, "warnings": ["fake: no isolation"]}


class FakeBackend:
    """Runs the command as a plain child in its own session; remembers pids in ``state_dir``
    like a real backend so a second supervisor finds leftovers."""

    name = "bwrap"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.specs: list[SandboxSpec] = []
        self.sandboxes: list[FakeSandbox] = []
        self.reaped: list[Leftover] = []
        self.fail_start = False

    def available(self) -> str | None:
        return None

    async def start(self, spec: SandboxSpec) -> FakeSandbox:
        if self.fail_start:
            raise OSError("fake start failure")
        self.specs.append(spec)
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            env=dict(spec.env),
            cwd=spec.workspace,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        (self.state_dir / spec.beam_id).write_text(str(proc.pid))
        sb = FakeSandbox(spec, proc)
        self.sandboxes.append(sb)
        return sb

    def leftovers(self) -> list[Leftover]:
        out = []
        for f in self.state_dir.iterdir():
            pid = int(f.read_text())
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                out.append(Leftover(f.name, ()))
            else:
                out.append(Leftover(f.name, (pid,)))
        return out

    def reap(self, leftover: Leftover) -> None:
        self.reaped.append(leftover)
        for pid in leftover.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (self.state_dir / leftover.beam_id).unlink(missing_ok=True)


@pytest.fixture
def fake(tmp_path: Path) -> FakeBackend:
    return FakeBackend(tmp_path / "fake-state")


@pytest.fixture
def base_fs(tmp_path: Path) -> BaseFsDigest:
    root = tmp_path / "base"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("x")
    return BaseFsDigest([str(root)], cache_dir=tmp_path / "basefs-cache")


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the fake backend never reaches the bridge")


@pytest.fixture
async def sup(
    services: Services, fake: FakeBackend, base_fs: BaseFsDigest, tmp_path: Path
) -> AsyncIterator[BeamSupervisor]:
    s = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    await s.start()
    yield s
    await s.aclose()


def _short_dir(tmp_path: Path) -> Path:
    import hashlib
    import tempfile

    d = Path(tempfile.gettempdir()) / (
        "tt-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    )
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@pytest.fixture
def admin(services: Services, admin_token: str) -> TokenClaims:
    return services.verifier.verify(admin_token)


def req(*argv: str, **kw: Any) -> Any:
    body: dict[str, Any] = {"objective": "test beam", "argv": list(argv), "ttl": "5m"}
    body.update(kw)
    return parse_beam_request(body)


async def _all_frames(
    sup: BeamSupervisor, caller: TokenClaims, beam_id: str
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for chunk in await sup.frames(caller, beam_id, follow=True):
        out += [orjson.loads(line) for line in chunk.splitlines()]
    return out


def _output(frames: list[dict[str, Any]], stream: str = "out") -> bytes:
    import base64

    return b"".join(base64.b64decode(f["b64"]) for f in frames if f.get("s") == stream)


async def _wait_ended(sup: BeamSupervisor, caller: TokenClaims, beam_id: str) -> Any:
    async with asyncio.timeout(30):  # failure backstop only
        while True:
            rec = await sup.get(caller, beam_id)
            if rec.state == "ended":
                return rec
            await asyncio.sleep(0.02)


async def test_a_beam_runs_streams_and_ends_on_the_record(
    sup: BeamSupervisor, admin: TokenClaims, services: Services, fake: FakeBackend
) -> None:
    rec = await sup.create(
        admin,
        req(
            PY,
            "-c",
            "import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)",
            grants=["model:tether-scripted-1"],
        ),
    )
    assert rec.state == "running" and rec.spiffe_id == f"spiffe://example.org/beam/{rec.id}"
    frames = await _all_frames(sup, admin, rec.id)
    assert _output(frames) == b"hello\n"
    assert _output(frames, "err") == b"oops\n"
    assert frames[-1]["end"]["reason"] == "exit" and frames[-1]["end"]["exit_code"] == 3
    ended = await _wait_ended(sup, admin, rec.id)
    assert ended.exit_code == 3 and ended.end_reason == "exit"

    session = services.audit.session(rec.id)
    types = [e["type"] for e in session]
    assert types[0] == "beam.attest"  # the attestation is the session's first entry
    assert types[:3] == ["beam.attest", "identity.issued", "beam.start"]
    assert types[-1] == "beam.end"
    assert session[-1]["data"]["exit_code"] == 3 and session[-1]["data"]["revoked"] is True
    # the create decision is recorded (in the creator's session, about the beam)
    created = services.audit.search(type="beam.create", identity=rec.spiffe_id)
    assert len(created) == 1 and created[0]["decision"] == "allow"

    # the identity: delegated from the admin, with the grants, task = beam id, attested digest
    env = fake.specs[0].env
    claims = TokenClaims.from_payload(rec.claims)
    assert claims.task == rec.id and [str(g) for g in claims.grantors] == [str(admin.subject)]
    assert claims.grants.to_list() == ["model:tether-scripted-1"]
    assert claims.objective_sha256 == rec.attestation_sha256
    attest = session[0]["data"]
    assert attest["sha256"] == rec.attestation_sha256 == attestation_digest(attest["attestation"])
    assert attest["attestation"]["argv"][0] == PY
    # and it is revoked now that the beam has ended
    with pytest.raises(TokenRevoked):
        services.verifier.verify(env["OPENAI_API_KEY"])


async def test_the_tool_definitions_a_beam_may_use_are_attested(
    services: Services,
    fake: FakeBackend,
    base_fs: BaseFsDigest,
    admin: TokenClaims,
    tmp_path: Path,
) -> None:
    from tether.identity.grants import Grants
    from tether.runtime.attest import tool_digest

    catalog = {"search": {"name": "search", "inputSchema": {}}, "db.drop": {"name": "db.drop"}}

    def reachable(grants: Grants) -> list[dict[str, Any]]:
        return [d for name, d in catalog.items() if grants.allows("tool", name)]

    s = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        tools=reachable,
        runtime_dir=_short_dir(tmp_path),
    )
    await s.start()
    try:
        declared = {"name": "local", "description": "the agent's own"}
        rec = await s.create(admin, req("true", grants=["tool:search"], tools=[declared]))
        assert rec.attestation["tools"] == sorted(
            [tool_digest(declared), tool_digest(catalog["search"])]
        )
    finally:
        await s.aclose()


async def test_the_environment_is_the_beams_own(
    sup: BeamSupervisor, admin: TokenClaims, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TEST_HOST_SECRET", "host-only")
    rec = await sup.create(
        admin, req(PY, "-c", "import os, json; print(json.dumps(dict(os.environ)))")
    )
    frames = await _all_frames(sup, admin, rec.id)
    seen = json.loads(_output(frames))
    token = fake.specs[0].env["OPENAI_API_KEY"]
    assert seen["OPENAI_API_KEY"] == seen["ANTHROPIC_API_KEY"] == token
    assert seen["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"
    assert seen["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert seen["TETHER_BEAM_ID"] == rec.id and seen["TETHER_TOKEN_FILE"] == "/run/tether/token"
    assert seen["HOME"] == "/workspace"
    assert "TETHER_TEST_HOST_SECRET" not in seen
    assert not {k for k in seen if k.startswith(("HTTP_PROXY", "HTTPS_PROXY"))}  # no egress asked
    files = fake.specs[0].files
    assert files["token"].decode() == token
    assert json.loads(files["bundle.json"])["keys"]
    assert json.loads(files["attestation.json"])["beam"] == rec.id


async def test_ttl_kills_a_beam_that_never_ends(
    sup: BeamSupervisor, admin: TokenClaims, services: Services, fake: FakeBackend
) -> None:
    rec = await sup.create(admin, req(PY, "-c", "import time; time.sleep(3600)", ttl="1s"))
    ended = await _wait_ended(sup, admin, rec.id)
    assert ended.end_reason == "ttl" and ended.exit_code == 128 + signal.SIGKILL
    assert fake.sandboxes[0].kills >= 1 and fake.sandboxes[0].proc.returncode is not None
    end = services.audit.session(rec.id)[-1]
    assert end["type"] == "beam.end" and end["data"]["reason"] == "ttl"
    with pytest.raises(TokenRevoked):
        services.verifier.verify(fake.specs[0].env["OPENAI_API_KEY"])


async def test_kill_records_who_killed_it(
    sup: BeamSupervisor, admin: TokenClaims, services: Services
) -> None:
    rec = await sup.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    killed = await sup.kill(admin, rec.id)
    assert killed.state == "ended" and killed.end_reason == "killed"
    assert killed.ended_by == str(admin.subject)
    end = services.audit.session(rec.id)[-1]
    assert end["type"] == "beam.end" and end["actor"] == str(admin.subject)
    with pytest.raises(BeamConflict):
        await sup.kill(admin, rec.id)


async def test_revoking_the_creator_kills_its_beams(
    sup: BeamSupervisor, services: Services, admin: TokenClaims
) -> None:
    issued = services.authority.delegate(admin, "planner", ["model:*"])
    agent = services.verifier.verify(issued.token)
    rec = await sup.create(agent, req(PY, "-c", "import time; time.sleep(3600)"))
    services.authority.revoke(admin, "token", agent.token_id, "incident 42")
    ended = await _wait_ended(sup, admin, rec.id)
    assert ended.end_reason == "revoked" and "revoked" in str(ended.ended_by)
    end = services.audit.session(rec.id)[-1]
    assert end["type"] == "beam.end" and end["data"]["reason"] == "revoked"
    # the beam's token died with its creator's; nothing revoked it a second time
    revoked = services.audit.search(type="identity.revoked")
    assert [r["data"]["value"] for r in revoked] == [agent.token_id]


async def test_server_stop_ends_every_beam_on_the_record(
    services: Services,
    fake: FakeBackend,
    base_fs: BaseFsDigest,
    admin: TokenClaims,
    tmp_path: Path,
) -> None:
    s = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    await s.start()
    a = await s.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    b = await s.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    await s.aclose()
    for rec in (a, b):
        end = services.audit.session(rec.id)[-1]
        assert end["type"] == "beam.end" and end["data"]["reason"] == "killed"
        assert end["data"]["by"] == "server stop"
    assert all(sb.proc.returncode is not None for sb in fake.sandboxes)


async def test_restart_reaps_leftovers_and_records_them(
    services: Services,
    fake: FakeBackend,
    base_fs: BaseFsDigest,
    admin: TokenClaims,
    tmp_path: Path,
) -> None:
    first = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    await first.start()
    rec = await first.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    token = fake.specs[0].env["OPENAI_API_KEY"]
    # the server dies: nothing of the first supervisor runs any more
    for live in list(first._live.values()):
        assert live.watch is not None
        live.watch.cancel()
        for t in live.pumps:
            t.cancel()
    first._live.clear()
    first.store.close()
    pid = fake.sandboxes[0].pid
    os.kill(pid, 0)  # still alive: a leftover

    second = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    await second.start()
    try:
        assert [lo.beam_id for lo in fake.reaped] == [rec.id]
        assert fake.sandboxes[0].proc.returncode is not None or await _dead(fake.sandboxes[0])
        reaped = services.audit.session(rec.id)[-1]
        assert reaped["type"] == "beam.reaped" and reaped["data"]["pids"] == [pid]
        assert reaped["data"]["revoked"] is True
        got = await second.get(admin, rec.id)
        assert got.state == "ended" and got.end_reason == "reaped"
        with pytest.raises(TokenRevoked):
            services.verifier.verify(token)
        frames = await _all_frames(second, admin, rec.id)
        assert frames[-1]["end"]["reason"] == "reaped"
    finally:
        await second.aclose()


async def _dead(sb: FakeSandbox) -> bool:
    async with asyncio.timeout(10):
        await sb.proc.wait()
    return True


async def test_policy_can_forbid_beam_creation_and_the_denial_is_recorded(
    home: Path, fake: FakeBackend, base_fs: BaseFsDigest, admin_credential: str, tmp_path: Path
) -> None:
    (home / "policies" / "10-no-beams.cedar").write_text(
        '@id("no-beams")\n@reason("no beams today")\n'
        'forbid (principal, action == Tether::Action::"beam.create", resource);\n'
    )
    services = Services(home)
    s = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    try:
        await s.start()
        admin = services.verifier.verify(services.authority.login(admin_credential).token)
        with pytest.raises(PermissionDenied, match="no beams today"):
            await s.create(admin, req("true"))
        denied = services.audit.search(type="beam.create")
        assert len(denied) == 1 and denied[0]["decision"] == "deny"
        assert "no-beams" in denied[0]["data"]["decision"]["policies"]
        assert fake.specs == [] and await s.list(admin) == []
    finally:
        await s.aclose()
        services.close()


async def test_grants_wider_than_the_creators_are_refused(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, fake: FakeBackend
) -> None:
    agent = services.verifier.verify(
        services.authority.delegate(admin, "planner", ["model:gpt-4o-mini"]).token
    )
    with pytest.raises(DelegationRefused, match="model:gpt-4o"):
        await sup.create(agent, req("true", grants=["model:gpt-4o*"]))
    assert fake.specs == []
    refused = services.audit.search(type="identity.refused")
    assert len(refused) == 1 and "wider" in refused[0]["data"]["reason"]
    beam_id = refused[0]["session"]
    session = [e["type"] for e in services.audit.session(beam_id)]
    assert session == ["beam.attest", "identity.refused", "beam.end"]
    # within its grants the same agent gets a beam, delegated from it
    rec = await sup.create(agent, req("true", grants=["model:gpt-4o-mini"]))
    assert rec.chain == (str(admin.subject), str(agent.subject))


async def test_creation_fails_closed_when_the_log_cannot_record(
    sup: BeamSupervisor,
    services: Services,
    admin: TokenClaims,
    fake: FakeBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(event: Any) -> Any:
        raise RecordFailed("audit log unavailable (test)")

    monkeypatch.setattr(services.audit, "arecord", broken)
    with pytest.raises(RecordFailed):
        await sup.create(admin, req("true"))
    assert fake.specs == []


async def test_a_beam_whose_start_cannot_be_recorded_does_not_run(
    sup: BeamSupervisor,
    services: Services,
    admin: TokenClaims,
    fake: FakeBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = services.audit.arecord

    async def no_start(event: Any) -> Any:
        if event.type == "beam.start":
            raise RecordFailed("audit log unavailable (test)")
        return await real(event)

    monkeypatch.setattr(services.audit, "arecord", no_start)
    with pytest.raises(RecordFailed):
        await sup.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    [sandbox] = fake.sandboxes
    assert sandbox.proc.returncode is not None  # killed, not left running
    [rec] = await sup.list(admin)
    assert rec.state == "ended" and rec.end_reason == "killed"
    end = services.audit.session(rec.id)[-1]
    assert end["type"] == "beam.end" and end["data"]["by"] == "audit log unavailable"
    with pytest.raises(TokenRevoked):
        services.verifier.verify(fake.specs[0].env["OPENAI_API_KEY"])


async def test_a_sandbox_that_fails_to_start_is_recorded_and_its_identity_revoked(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, fake: FakeBackend
) -> None:
    fake.fail_start = True
    with pytest.raises(OSError):
        await sup.create(admin, req("true"))
    ends = services.audit.search(type="beam.end")
    assert len(ends) == 1 and ends[0]["data"]["reason"] == "failed"
    assert ends[0]["data"]["revoked"] is True
    [rec] = await sup.list(admin)
    assert rec.state == "ended" and rec.end_reason == "failed"


async def test_workspaces(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, tmp_path: Path
) -> None:
    # a throwaway workspace is gone after the end; a kept one stays
    a = await sup.create(admin, req(PY, "-c", "open('f', 'w').write('x')"))
    b = await sup.create(admin, req(PY, "-c", "open('f', 'w').write('y')", keep_workspace=True))
    await _wait_ended(sup, admin, a.id)
    await _wait_ended(sup, admin, b.id)
    assert not Path(a.workspace).exists()
    assert (Path(b.workspace) / "f").read_text() == "y"
    # a user's own directory is bound and never deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    c = await sup.create(admin, req(PY, "-c", "open('out', 'w').write('z')", workspace=str(mine)))
    await _wait_ended(sup, admin, c.id)
    assert (mine / "out").read_text() == "z"


@pytest.mark.parametrize("where", ["data_dir", "inside_data_dir", "root", "missing"])
async def test_a_workspace_may_not_expose_the_data_dir(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, where: str, tmp_path: Path
) -> None:
    path = {
        "data_dir": services.data_dir.root,
        "inside_data_dir": services.data_dir.root / "keys",
        "root": Path("/"),
        "missing": tmp_path / "nope",
    }[where]
    with pytest.raises(BadRequest, match="workspace"):
        await sup.create(admin, req("true", workspace=str(path)))


async def test_other_users_bind_only_below_the_configured_roots(
    home: Path, fake: FakeBackend, base_fs: BaseFsDigest, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    (shared / "bob").mkdir(parents=True)
    config = home / "config.toml"
    config.write_text(config.read_text() + f'\n[beams]\nworkspace_roots = ["{shared}"]\n')
    services = Services(home)
    s = BeamSupervisor(
        services,
        bridge_app=_noop_app,
        backends={"bwrap": fake},
        base_fs=base_fs,
        runtime_dir=_short_dir(tmp_path),
    )
    try:
        await s.start()
        admin = services.verifier.verify(
            services.authority.login((home / "credentials" / "admin").read_text().strip()).token
        )
        bob_cred = services.authority.add_user(admin, "bob", ["model:*"])
        bob = services.verifier.verify(services.authority.login(bob_cred).token)
        with pytest.raises(PermissionDenied, match="workspace_roots"):
            await s.create(bob, req("true", workspace="/etc"))
        rec = await s.create(bob, req("true", workspace=str(shared / "bob")))
        assert rec.workspace == str(shared / "bob")
        # the admin runs the server: any directory but the data dir and /
        other = tmp_path / "elsewhere"
        other.mkdir()
        assert (await s.create(admin, req("true", workspace=str(other)))).workspace == str(other)
    finally:
        await s.aclose()
        services.close()


async def test_agents_cannot_bind_host_directories(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, tmp_path: Path
) -> None:
    agent = services.verifier.verify(services.authority.delegate(admin, "a1", []).token)
    with pytest.raises(PermissionDenied, match="workspace"):
        await sup.create(agent, req("true", workspace=str(tmp_path)))


async def test_follow_streams_output_as_it_is_produced(
    sup: BeamSupervisor, admin: TokenClaims
) -> None:
    script = (
        "import os, time\n"
        "print('first', flush=True)\n"
        "while not os.path.exists('go'): time.sleep(0.01)\n"
        "print('second')\n"
    )
    rec = await sup.create(admin, req(PY, "-c", script))
    stream = await sup.frames(admin, rec.id, follow=True)
    seen: list[dict[str, Any]] = []
    while _output(seen) != b"first\n":  # a write may arrive in pieces
        seen += [orjson.loads(line) for line in (await anext(stream)).splitlines()]
    assert (await sup.get(admin, rec.id)).state == "running"
    (Path(rec.workspace) / "go").write_text("")
    rest: list[dict[str, Any]] = []
    async for chunk in stream:
        rest += [orjson.loads(line) for line in chunk.splitlines()]
    assert _output(rest) == b"second\n" and rest[-1]["end"]["exit_code"] == 0


async def test_exec_runs_inside_and_is_recorded(
    sup: BeamSupervisor, admin: TokenClaims, services: Services
) -> None:
    rec = await sup.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    proc = await sup.exec(
        admin, rec.id, [PY, "-c", "import os; print(os.environ['TETHER_BEAM_ID'])"]
    )
    out, _ = await proc.communicate()
    assert out.decode().strip() == rec.id and proc.returncode == 0
    assert "beam.exec" in [e["type"] for e in services.audit.session(rec.id)]
    await sup.kill(admin, rec.id)
    with pytest.raises(BeamConflict):
        await sup.exec(admin, rec.id, ["true"])


async def test_remove(sup: BeamSupervisor, admin: TokenClaims, services: Services) -> None:
    rec = await sup.create(admin, req(PY, "-c", "import time; time.sleep(3600)"))
    with pytest.raises(BeamConflict, match="running"):
        await sup.remove(admin, rec.id)
    await sup.remove(admin, rec.id, force=True)
    with pytest.raises(NotFound):
        await sup.get(admin, rec.id)
    assert not (sup.beams_dir / rec.id).exists()
    types = [e["type"] for e in services.audit.session(rec.id)]
    assert types[-2:] == ["beam.end", "beam.removed"]
    # a kept workspace survives the removal of its beam; the output does not
    kept = await sup.create(admin, req(PY, "-c", "open('f', 'w').write('k')", keep_workspace=True))
    await _wait_ended(sup, admin, kept.id)
    await sup.remove(admin, kept.id)
    assert (Path(kept.workspace) / "f").read_text() == "k"
    assert not (sup.beams_dir / kept.id / "output.ndjson").exists()


async def test_only_the_chain_and_the_admin_see_a_beam(
    sup: BeamSupervisor, services: Services, admin: TokenClaims
) -> None:
    agent = services.verifier.verify(services.authority.delegate(admin, "maker", []).token)
    other = services.verifier.verify(services.authority.delegate(admin, "other", []).token)
    rec = await sup.create(agent, req("true"))
    assert (await sup.get(agent, rec.id)).id == rec.id
    assert (await sup.get(admin, rec.id)).id == rec.id  # above it in the chain
    with pytest.raises(NotFound):
        await sup.get(other, rec.id)
    with pytest.raises(NotFound):
        await sup.kill(other, rec.id)
    assert await sup.list(other) == []


async def test_no_secret_reaches_the_log_the_store_or_a_repr(
    sup: BeamSupervisor, services: Services, admin: TokenClaims, fake: FakeBackend
) -> None:
    rec = await sup.create(admin, req(PY, "-c", "print('done')"))
    await _wait_ended(sup, admin, rec.id)
    token = fake.specs[0].env["OPENAI_API_KEY"]
    assert token.startswith("eyJ")
    for entry in services.audit.iter_entries():
        assert token.encode() not in entry
    db = services.data_dir.db_path.read_bytes()
    assert token.encode() not in db
    stored = await sup.get(admin, rec.id)
    assert token not in repr(stored) and token not in json.dumps(stored.to_dict(), default=str)
    assert token not in repr(sup)
    log_text = (sup.beams_dir / rec.id / "output.ndjson").read_bytes()
    assert token.encode() not in log_text
