"""Hostile workloads, processes: a beam sees only its own processes, cannot trace or signal
anything else, learns nothing of the host's environment, and leaves nothing alive behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.runtime.conftest import PRELUDE, Beams, host_pids_in_pidns, proc_start, survivors
from tether.runtime.sandbox import Limits
from tether.runtime.seccomp import SYSCALLS, native_arch

NR = SYSCALLS[native_arch() or "x86_64"]


async def test_beam_sees_only_its_own_processes(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + f"""
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
note("pids", pids)
note("init", open("/proc/1/cmdline").read().split("\\0")[3])
note("me", os.getpid())
attempt("kill_host", lambda: os.kill({os.getpid()}, 0))
attempt("kill_init", lambda: os.kill(1, 9))
note("init_alive", os.path.exists("/proc/1"))
done()
"""
    )
    r = ran.result
    assert r["pids"] == [1, r["me"]]  # the forwarder and this script
    assert r["init"] == "/run/tether-init/forwarder.pyc"
    assert r["kill_host"] == "ESRCH"
    assert r["kill_init"] == "ok" and r["init_alive"]  # pid 1 ignores signals from inside


async def test_host_environment_does_not_leak(
    beams: Beams, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"canary-{os.urandom(6).hex()}"
    monkeypatch.setenv("TETHER_TEST_CANARY", canary)
    ran = await beams.py(
        PRELUDE
        + f"""
found = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            if b{canary!r} in open(f"/proc/{{p}}/environ", "rb").read():
                found.append(p)
        except OSError:
            pass
note("in_proc", found)
note("in_env", {canary!r} in str(os.environ))
note("init_env", open("/proc/1/environ").read().split("\\0")[:-1])
done()
"""
    )
    assert ran.result == {"in_proc": [], "in_env": False, "init_env": ["PWD=/workspace"]}


async def test_ptrace_and_cross_process_memory_are_refused(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + f"""
import time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206
attempt("attach_child", lambda: syscall({NR["ptrace"]}, PTRACE_ATTACH, child, 0, 0))
attempt("seize_child", lambda: syscall({NR["ptrace"]}, PTRACE_SEIZE, child, 0, 0))
attempt("attach_init", lambda: syscall({NR["ptrace"]}, PTRACE_ATTACH, 1, 0, 0))
attempt("traceme", lambda: syscall({NR["ptrace"]}, PTRACE_TRACEME, 0, 0, 0))
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
iovp = ctypes.addressof(iov)
attempt("vm_readv", lambda: syscall({NR["process_vm_readv"]}, child, iovp, 1, iovp, 1, 0))
pidfd = os.pidfd_open(child)
attempt("pidfd_getfd", lambda: syscall({NR["pidfd_getfd"]}, pidfd, 0, 0))
attempt("kcmp", lambda: syscall({NR["kcmp"]}, os.getpid(), child, 0, 0, 0))
os.kill(child, 9)
done()
"""
    )
    assert ran.result == dict.fromkeys(
        [
            "attach_child",
            "seize_child",
            "attach_init",
            "traceme",
            "vm_readv",
            "pidfd_getfd",
            "kcmp",
        ],
        "EPERM",
    )


@pytest.mark.parametrize("limits", [Limits(), Limits(pids=64)], ids=["pidns", "cgroup"])
async def test_double_forked_daemon_does_not_survive_kill(beams: Beams, limits: Limits) -> None:
    sb = await beams.start(
        [
            "/bin/sh",
            "-c",
            # the daemon: double fork, new session, ignores SIGTERM/SIGHUP, closes its stdio
            "setsid sh -c 'trap \"\" TERM HUP; (sleep 600 &) ; sleep 600' "
            "</dev/null >/dev/null 2>&1 & echo started; sleep 600",
        ],
        limits=limits,
    )
    assert await sb.stdout.readline() == b"started\n"
    init = sb.info()["init_pid"]
    cgroups = [Path(p) for p in sb.info()["cgroups"]]
    deadline = asyncio.get_running_loop().time() + 30
    while len(host_pids_in_pidns(init)) < 6:  # forwarder, sh, sleep, setsid sh, 2 sleeps
        assert asyncio.get_running_loop().time() < deadline, host_pids_in_pidns(init)
        await asyncio.sleep(0.01)
    inside = host_pids_in_pidns(init)
    before = {p: proc_start(p) for p in inside}
    await sb.kill()
    assert survivors(before) == []
    assert not [c for c in cgroups if c.exists()]


async def test_processes_left_by_an_exiting_command_are_killed(beams: Beams) -> None:
    # The command starts a detached daemon, then waits for the test's go (a file in the
    # workspace) and exits; the daemon must not outlive it.
    sb = await beams.start(
        [
            "/bin/sh",
            "-c",
            "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo ready; "
            "while [ ! -e /workspace/go ]; do sleep 0.01; done",
        ]
    )
    assert await sb.stdout.readline() == b"ready\n"
    init = sb.info()["init_pid"]
    inside = host_pids_in_pidns(init)
    assert len(inside) >= 3  # the forwarder, sh, the daemon (and sh's sleep)
    before = {p: proc_start(p) for p in inside}
    (beams.workspace / "go").touch()
    assert await sb.wait() == 0
    assert survivors(before) == []
