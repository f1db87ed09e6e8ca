"""The runsc (gVisor) backend behind the same interface: the same layout and the same walls
(checked with a few of the hostile workloads), the bridge, kill, exec and leftovers. Runs
where runsc is installed and usable; skips with the backend's own reason elsewhere."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.runtime.conftest import PRELUDE, PY, HostServer, beam_env
from tether.errors import ConfigError
from tether.runtime.runsc import RunscBackend, RunscSandbox
from tether.runtime.sandbox import Backend, Limits, Sandbox, SandboxSpec, get_backend


@pytest.fixture(scope="module")
def runsc_unavailable() -> str | None:
    return RunscBackend(state_dir=Path(tempfile.mkdtemp(prefix="tb-rs-"))).available()


@pytest.fixture
def rbackend(runsc_unavailable: str | None, short_dir: Path) -> RunscBackend:
    if runsc_unavailable is not None:
        pytest.skip(f"runsc backend unavailable here: {runsc_unavailable}")
    return RunscBackend(state_dir=short_dir / "rstate")


class Runner:
    def __init__(self, backend: RunscBackend, bridge: HostServer, workspace: Path) -> None:
        self.backend, self.bridge, self.workspace = backend, bridge, workspace
        self.started: list[RunscSandbox] = []
        self.n = 0

    def spec(self, argv: list[str], **kw: object) -> SandboxSpec:
        self.n += 1
        return SandboxSpec(
            beam_id=f"b-rs-{self.n}",
            argv=tuple(argv),
            env=kw.pop("env", beam_env()),  # type: ignore[arg-type]
            workspace=self.workspace,
            files={"token": b"beam-token"},
            bridge_socket=self.bridge.socket,
            **kw,  # type: ignore[arg-type]
        )

    async def start(self, argv: list[str], **kw: object) -> RunscSandbox:
        sb = await self.backend.start(self.spec(argv, **kw))
        self.started.append(sb)
        return sb

    async def run(self, argv: list[str], **kw: object) -> tuple[int, str, str]:
        sb = await self.start(argv, **kw)
        out, err, rc = await asyncio.wait_for(
            asyncio.gather(sb.stdout.read(), sb.stderr.read(), sb.wait()), 120
        )
        return rc, out.decode(), err.decode()


@pytest.fixture
async def runner(
    rbackend: RunscBackend, bridge: HostServer, workspace: Path
) -> AsyncIterator[Runner]:
    r = Runner(rbackend, bridge, workspace)
    try:
        yield r
    finally:
        for sb in r.started:
            await sb.kill()


def test_unavailable_runsc_is_explained(tmp_path: Path) -> None:
    b = RunscBackend(state_dir=tmp_path / "s")
    b.runsc = None
    assert "runsc (gVisor) is not installed" in (b.available() or "")
    with pytest.raises(ConfigError, match="sandbox backend 'runsc' is not usable"):
        import tether.runtime.runsc as mod

        real = mod.find_runsc
        mod.find_runsc = lambda: None  # type: ignore[assignment]
        try:
            get_backend("runsc", state_dir=tmp_path / "s2")
        finally:
            mod.find_runsc = real


async def test_output_exit_code_and_exact_environment(runner: Runner) -> None:
    assert isinstance(runner.backend, Backend)
    env = {"A": "1", "PATH": "/usr/bin:/bin"}
    rc, out, err = await runner.run(["/usr/bin/env"], env=env)
    assert (rc, sorted(out.split())) == (0, ["A=1", "PATH=/usr/bin:/bin"]), err
    rc, out, err = await runner.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 5"])
    assert (rc, out, err) == (5, "out\n", "err\n")


async def test_same_walls_and_the_bridge(runner: Runner) -> None:
    rc, out, err = await runner.run(
        [
            PY,
            "-c",
            PRELUDE
            + """
import urllib.request
note("http", json.loads(urllib.request.urlopen("http://127.0.0.1:8080/x").read())["server"])
attempt("outside", lambda: socket.create_connection(("1.1.1.1", 443), timeout=5))
note("root", sorted(os.listdir("/root")))
note("home", os.path.exists("/home"))
attempt("write_usr", lambda: open("/usr/x", "w"))
attempt("write_run", lambda: open("/run/tether/x", "w"))
open("/workspace/out", "w").write("ok")
note("token", open("/run/tether/token").read())
st = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
note("caps", [st["CapEff"].strip(), st["CapBnd"].strip()])
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
done()
""",
        ]
    )
    assert rc == 0, err
    r = json.loads(out.splitlines()[-1])
    assert r["http"] == "gateway"
    assert r["outside"] in ("ENETUNREACH", "EHOSTUNREACH")
    under_root = {p.split("/")[2] for p in (sys.prefix, sys.base_prefix) if p.startswith("/root/")}
    assert r["home"] is False and r["root"] == sorted(under_root)
    assert r["write_usr"] == "EROFS" and r["write_run"] == "EROFS"
    assert r["token"] == "beam-token"
    assert r["raw"] in ("EPERM", "EACCES")
    assert r["caps"] == ["0000000000000000", "0000000000000000"]
    assert (runner.workspace / "out").read_text() == "ok"


async def test_kill_exec_and_leftovers(runner: Runner) -> None:
    sb = await runner.start(
        ["/bin/sh", "-c", "echo up; exec sleep 600"], limits=Limits(memory_bytes=256 << 20)
    )
    assert isinstance(sb, Sandbox)
    assert await asyncio.wait_for(sb.stdout.readline(), 120) == b"up\n"
    proc = await sb.exec(["/bin/sh", "-c", "echo in-$(hostname); exit 4"])
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert (out, proc.returncode) == (f"in-{sb.beam_id}\n".encode(), 4)
    restarted = RunscBackend(state_dir=runner.backend.state_dir)
    assert [x.beam_id for x in restarted.leftovers()] == [sb.beam_id]
    assert runner.backend.leftovers() == []
    await sb.kill()
    assert await sb.wait() != 0
    assert restarted.leftovers() == []
    with pytest.raises(Exception, match="not running"):
        await sb.exec(["/bin/true"])


async def test_pids_limit_is_a_warning_or_refused_when_strict(runner: Runner) -> None:
    sb = await runner.start(["/bin/true"], limits=Limits(pids=64))
    assert sb.info()["warnings"] == [
        "pids limit not applied: under runsc the host cgroup counts gVisor's own threads, "
        "not the beam's processes (a limit there starves the sandbox)"
    ]
    assert await sb.wait() == 0
    strict = RunscBackend(state_dir=runner.backend.state_dir, strict_limits=True)
    with pytest.raises(ConfigError, match="limits cannot be enforced on this backend"):
        await strict.start(runner.spec(["/bin/true"], limits=Limits(pids=64)))
    assert strict.leftovers() == []
