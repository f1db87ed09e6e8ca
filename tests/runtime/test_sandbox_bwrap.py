"""The bwrap backend as the lifecycle uses it: start, streams, exit codes, kill, exec, info,
leftovers after a crash, and what a caller sees when the host or the spec is wrong."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.runtime.conftest import PY, Beams, beam_env, host_pids_in_pidns
from tether.errors import ConfigError
from tether.runtime.bwrap import BwrapBackend, SandboxError
from tether.runtime.cgroups import CgroupHost
from tether.runtime.sandbox import Backend, Limits, Sandbox


async def test_command_output_and_exit_code(beams: Beams) -> None:
    ran = await beams.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (ran.rc, ran.out, ran.err) == (7, "out\n", "err\n")


async def test_backend_and_sandbox_satisfy_the_protocols(beams: Beams) -> None:
    sb = await beams.start(["/bin/true"])
    assert isinstance(beams.backend, Backend)
    assert isinstance(sb, Sandbox)
    assert await sb.wait() == 0


async def test_environment_is_exactly_the_spec(beams: Beams) -> None:
    ran = await beams.run(["/usr/bin/env"], env={"PATH": "/usr/bin:/bin", "A": "1", "B": "x y"})
    assert sorted(ran.out.splitlines()) == ["A=1", "B=x y", "PATH=/usr/bin:/bin"]


async def test_command_not_found_is_127_with_a_message(beams: Beams) -> None:
    ran = await beams.run(["no-such-command-xyz"])
    assert ran.rc == 127
    assert "cannot run 'no-such-command-xyz'" in ran.err


async def test_killed_beam_reports_128_plus_signal_and_is_gone(beams: Beams) -> None:
    sb = await beams.start(["/bin/sh", "-c", "echo up; sleep 600"])
    assert await sb.stdout.readline() == b"up\n"
    init = sb.info()["init_pid"]
    inside = host_pids_in_pidns(init)
    assert len(inside) >= 2  # the forwarder and sh (and sleep)
    await sb.kill()
    assert await sb.wait() == 128 + signal.SIGKILL
    assert not [p for p in inside if Path(f"/proc/{p}").exists()]
    await sb.kill()  # idempotent


async def test_wait_and_kill_remove_cgroups_and_state(beams: Beams) -> None:
    sb = await beams.start(["/bin/true"], limits=Limits(pids=32))
    cgroups = [Path(p) for p in sb.info()["cgroups"]]
    assert cgroups and all(p.is_dir() for p in cgroups)
    assert (beams.backend.state_dir / sb.beam_id).is_dir()
    assert await sb.wait() == 0
    assert not [p for p in cgroups if p.exists()]
    assert not (beams.backend.state_dir / sb.beam_id).exists()
    assert beams.backend.leftovers() == []


async def test_info_names_backend_pids_limits(beams: Beams) -> None:
    sb = await beams.start(["/bin/sleep", "60"], limits=Limits(memory_bytes=64 << 20, pids=50))
    info = sb.info()
    assert info["backend"] == "bwrap" and info["pid"] == sb.pid
    assert info["limits"] == {"memory": f"{64 << 20} bytes", "pids": "50 processes"}
    assert info["warnings"] == []
    assert info["seccomp"] and info["no_new_privs"] and info["capabilities"] == []
    assert info["init_pid"] in host_pids_in_pidns(info["init_pid"])
    await sb.kill()


async def test_exec_runs_inside_the_same_beam(beams: Beams) -> None:
    sb = await beams.start(["/bin/sh", "-c", "echo hi > /tmp/marker; echo ready; sleep 600"])
    assert await sb.stdout.readline() == b"ready\n"
    proc = await sb.exec(
        ["/bin/sh", "-c", "cat /tmp/marker; hostname; echo $X; exit 3"], {"X": "1"}
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out.decode().split() == ["hi", sb.beam_id, "1"]
    assert proc.returncode == 3
    status = await sb.exec(["/bin/cat", "/proc/self/status"])
    text = (await status.communicate())[0].decode()
    assert "NoNewPrivs:\t1" in text and "CapEff:\t0000000000000000" in text
    assert "Seccomp:\t2" in text
    await sb.kill()


async def test_exec_stdin_and_default_environment(beams: Beams) -> None:
    sb = await beams.start(["/bin/sleep", "600"], env=beam_env(FROM_SPEC="yes"))
    proc = await sb.exec(["/bin/sh", "-c", "read line; echo got:$line:$FROM_SPEC"])
    out, _ = await asyncio.wait_for(proc.communicate(b"hello\n"), 60)
    assert out == b"got:hello:yes\n"
    await sb.kill()


async def test_killing_the_exec_client_kills_the_command(beams: Beams) -> None:
    sb = await beams.start(["/bin/sleep", "600"])
    proc = await sb.exec(["/bin/sh", "-c", "echo $$; exec sleep 600"])
    assert proc.stdout is not None
    inner = int(await proc.stdout.readline())
    before = host_pids_in_pidns(sb.info()["init_pid"])
    proc.kill()
    await proc.wait()
    # the command (pid `inner` inside) is killed by the forwarder when its client goes away
    check = await sb.exec(
        ["/bin/sh", "-c", f"kill -0 {inner} 2>/dev/null && echo alive || echo gone"]
    )
    assert (await check.communicate())[0] == b"gone\n"
    assert len(before) >= 3
    await sb.kill()


async def test_exec_after_the_beam_ended_is_refused(beams: Beams) -> None:
    sb = await beams.start(["/bin/true"])
    await sb.wait()
    with pytest.raises(SandboxError, match=r"not running"):
        await sb.exec(["/bin/true"])


async def test_exec_ends_when_the_beam_is_killed(beams: Beams) -> None:
    sb = await beams.start(["/bin/sleep", "600"])
    proc = await sb.exec(["/bin/sh", "-c", "echo running; exec sleep 600"])
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"running\n"
    await sb.kill()
    assert await asyncio.wait_for(proc.wait(), 60) == 137


async def test_exec_into_an_ending_beam_fails_cleanly(beams: Beams) -> None:
    sb = await beams.start(["/bin/sleep", "600"])
    proc = await sb.exec(["/bin/sleep", "600"])
    await sb.kill()
    # Either the command started and was killed with the beam (137), or the client found
    # the beam gone before it could hand over its stdio (125); never a hang.
    assert await asyncio.wait_for(proc.wait(), 60) in (125, 137)


async def test_leftovers_of_a_crashed_server_are_found_and_reaped(
    beams: Beams, short_dir: Path
) -> None:
    sb = await beams.start(["/bin/sh", "-c", "sleep 600 & sleep 600"], limits=Limits(pids=20))
    init = sb.info()["init_pid"]
    cgroups = [Path(p) for p in sb.info()["cgroups"]]
    # A new server with the same state dir: the beam above is what a crash left behind.
    restarted = BwrapBackend(state_dir=beams.backend.state_dir)
    assert beams.backend.leftovers() == []  # a server never reaps its own beams
    found = restarted.leftovers()
    assert [x.beam_id for x in found] == [sb.beam_id]
    assert init in found[0].pids and sb.pid in found[0].pids
    inside = host_pids_in_pidns(init)
    restarted.reap(found[0])
    assert not [p for p in inside if Path(f"/proc/{p}").exists()]
    assert not [p for p in cgroups if p.exists()]
    assert restarted.leftovers() == []
    assert await sb.wait() == 137


async def test_leftover_state_without_processes_is_listed_and_cleaned(
    backend: BwrapBackend,
) -> None:
    (backend.state_dir / "b-gone").mkdir(parents=True)
    (found,) = backend.leftovers()
    assert (found.beam_id, found.pids) == ("b-gone", ())
    backend.reap(found)
    assert backend.leftovers() == []


async def test_missing_bridge_socket_is_a_clear_error(beams: Beams, tmp_path: Path) -> None:
    spec = beams.spec(["/bin/true"])
    object.__setattr__(spec, "bridge_socket", tmp_path / "nope.sock")
    with pytest.raises(SandboxError, match=r"bridge socket .*nope.sock is missing"):
        await beams.backend.start(spec)
    assert beams.backend.leftovers() == []


async def test_workspace_must_be_a_directory(beams: Beams, tmp_path: Path) -> None:
    spec = beams.spec(["/bin/true"])
    (tmp_path / "file").write_text("")
    object.__setattr__(spec, "workspace", tmp_path / "file")
    with pytest.raises(SandboxError, match=r"workspace .* is not a directory"):
        await beams.backend.start(spec)


async def test_same_beam_id_twice_is_refused(beams: Beams) -> None:
    spec = beams.spec(["/bin/sleep", "60"])
    sb = await beams.backend.start(spec)
    beams.started.append(sb)
    with pytest.raises(SandboxError, match=r"already has a sandbox"):
        await beams.backend.start(spec)


async def test_bwrap_failing_before_the_sandbox_exists_is_reported(
    bwrap_unavailable: str | None, short_dir: Path, beams: Beams
) -> None:
    b = BwrapBackend(state_dir=short_dir / "state2", bwrap=beams.backend.bwrap)
    assert b.available() is None
    b._base = ["--no-such-option"]  # bwrap exits before it clones
    with pytest.raises(SandboxError, match=r"bwrap could not start beam .*no-such-option"):
        await b.start(beams.spec(["/bin/true"]))
    assert b.leftovers() == []


async def test_limits_that_cannot_be_set_are_warnings_or_refused_when_strict(
    beams: Beams, tmp_path: Path
) -> None:
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "mountinfo").write_text("")
    nowhere = CgroupHost(proc_cgroup=tmp_path / "cgroup", mountinfo=tmp_path / "mountinfo")
    lax = BwrapBackend(state_dir=beams.backend.state_dir.parent / "lax", cgroups=nowhere)
    sb = await lax.start(beams.spec(["/bin/true"], limits=Limits(pids=10, cpus=0.5)))
    beams.started.append(sb)
    warnings = sb.info()["warnings"]
    assert warnings == [
        "pids limit not applied: no cgroup hierarchy has the pids controller mounted",
        "CPU limit not applied: no cgroup hierarchy has the cpu controller mounted",
    ]
    assert await sb.wait() == 0
    strict = BwrapBackend(
        state_dir=beams.backend.state_dir.parent / "strict", strict_limits=True, cgroups=nowhere
    )
    with pytest.raises(ConfigError, match=r"limits cannot be enforced.*pids limit not applied"):
        await strict.start(beams.spec(["/bin/true"], limits=Limits(pids=10)))
    assert strict.leftovers() == []


def test_unusable_bwrap_is_explained(tmp_path: Path) -> None:
    b = BwrapBackend(state_dir=tmp_path / "s", bwrap=None)
    b.bwrap = None
    assert "no bwrap binary" in (b.available() or "")
    old = BwrapBackend(state_dir=tmp_path / "s", bwrap="/bin/echo")
    assert "too old" in (old.available() or "")


async def test_unusable_backend_refuses_to_start(tmp_path: Path, beams: Beams) -> None:
    b = BwrapBackend(state_dir=tmp_path / "s", bwrap="/bin/echo")
    with pytest.raises(ConfigError, match=r"not usable.*too old"):
        await b.start(beams.spec(["/bin/true"]))


async def test_secrets_are_not_on_any_command_line(beams: Beams) -> None:
    sb = await beams.start(
        ["/bin/sleep", "600"],
        env=beam_env(OPENAI_API_KEY="sk-canary-env"),
        files={"token": b"canary-file"},
    )
    pids = {sb.pid} | host_pids_in_pidns(sb.info()["init_pid"])
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"canary" not in cmdline
    assert "canary" not in repr(sb) and "canary" not in str(sb.info())
    assert "canary" not in repr(beams.spec(["x"], env={"K": "canary"}, files={"t": b"canary"}))
    await sb.kill()


async def test_python_agent_starts_with_the_venv(beams: Beams) -> None:
    ran = await beams.py(
        "import sys, json, ssl, openai; print(json.dumps([sys.prefix, ssl.OPENSSL_VERSION]))"
    )
    assert ran.rc == 0, ran.err
    assert ran.result[0] == __import__("sys").prefix
    assert os.path.realpath(PY)


def _processes_naming(word: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if word.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("delay", [0, 0.001, 0.003, 0.01, 0.03])
async def test_a_start_cancelled_midway_leaves_nothing_and_runs_nothing(
    beams: Beams, delay: float
) -> None:
    spec = beams.spec(["/bin/sh", "-c", "touch /workspace/ran"], limits=Limits(pids=16))
    task = asyncio.ensure_future(beams.backend.start(spec))
    await asyncio.sleep(delay)
    task.cancel()
    try:
        sb = await task
    except asyncio.CancelledError:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while _processes_naming(spec.beam_id):  # bwrap carries the id (--hostname)
            assert loop.time() < deadline, _processes_naming(spec.beam_id)
            await asyncio.sleep(0.005)
        assert not (beams.workspace / "ran").exists()
        assert beams.backend.leftovers() == []
        return
    beams.started.append(sb)  # it finished before the cancel landed: an ordinary beam
    assert await sb.wait() == 0


async def test_a_beam_without_its_state_file_is_still_found_and_reaped(beams: Beams) -> None:
    # A server that died between creating the beam's directory and writing its pids.
    sb = await beams.start(["/bin/sleep", "600"])
    inside = host_pids_in_pidns(sb.info()["init_pid"])
    (beams.backend.state_dir / sb.beam_id / "state.json").unlink()
    restarted = BwrapBackend(state_dir=beams.backend.state_dir)
    (found,) = restarted.leftovers()
    assert found.beam_id == sb.beam_id and sb.pid in found.pids
    restarted.reap(found)
    assert await sb.wait() == 137
    # killed processes may linger a moment as zombies until their new parent reaps them
    for _ in range(100):
        left = [p for p in inside if Path(f"/proc/{p}").exists()]
        if not left:
            break
        await asyncio.sleep(0.05)
    assert not left
    assert _processes_naming(sb.beam_id) == []
