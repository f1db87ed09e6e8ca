"""Hostile workloads, resources: a fork bomb meets the pids limit, an allocation past the
memory limit is killed (or fails) inside the beam, /tmp cannot be used to get around the
memory limit, and the host carries on. Needs the host to offer the cgroup controllers;
skips with the backend's own reason when it does not."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.runtime.conftest import PRELUDE, Beams, host_pids_in_pidns, proc_start, survivors
from tether.runtime.sandbox import Limits


def _need(beams: Beams, *controllers: str) -> None:
    host = beams.backend.cgroup_host
    missing = {c: host.problems[c] for c in controllers if c not in host.controllers}
    if missing:
        pytest.skip(f"this host cannot enforce {', '.join(missing)}: {missing}")


async def test_fork_bomb_is_held_by_the_pids_limit(beams: Beams) -> None:
    _need(beams, "pids")
    # A fork bomb: every process forks forever and retries when a fork fails, so the
    # population stays at the limit. Half a CPU keeps the host responsive. The command
    # itself becomes `sleep`, so the beam lives on while the bomb runs.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    sb = await beams.start(
        ["/bin/sh", "-c", f'python3 -I -S -c "{bomb}" 2>/dev/null & exec sleep 600'],
        limits=Limits(pids=48, cpus=0.5),
    )
    (pids_cg,) = [Path(p) for p in sb.info()["cgroups"] if Path(p, "pids.max").exists()]

    def refused() -> int:  # "max N" in pids.events: forks refused by this limit
        return int((pids_cg / "pids.events").read_text().split()[1])

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while int((pids_cg / "pids.current").read_text()) < 48 or refused() == 0:
        assert loop.time() < deadline, "the bomb never reached the limit"
        await asyncio.sleep(0.01)
    # The limit holds (forks fail with EAGAIN inside), and the host still forks fine.
    assert int((pids_cg / "pids.current").read_text()) <= 48
    assert subprocess.run(["/bin/true"], check=False).returncode == 0
    before = {p: proc_start(p) for p in host_pids_in_pidns(sb.info()["init_pid"])}
    assert len(before) >= 10
    await sb.kill()
    assert survivors(before) == []
    assert not pids_cg.exists()


async def test_forks_past_the_limit_fail_with_eagain(beams: Beams) -> None:
    _need(beams, "pids")
    ran = await beams.py(
        PRELUDE
        + """
import time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        n += 1
except OSError as e:
    note("error", errno.errorcode[e.errno])
note("forked", n)
done()
""",
        limits=Limits(pids=20),
    )
    r = ran.result
    # 20 = the forwarder + this script + 18 children
    assert r == {"error": "EAGAIN", "forked": 18}
    assert ran.rc == 0


async def test_allocating_past_the_memory_limit_is_stopped(beams: Beams) -> None:
    _need(beams, "memory")
    ran = await beams.py(
        """
import sys
chunks = []
try:
    for i in range(64):
        chunks.append(b"\\x01" * (8 << 20))  # touched pages, 8 MiB each
        print(len(chunks) * 8, flush=True)
    print("allocated 512 MiB", flush=True)
except MemoryError:
    print("MemoryError", flush=True)
""",
        limits=Limits(memory_bytes=96 << 20, pids=32),
    )
    progress = ran.out.split()
    assert "allocated 512 MiB" not in ran.out
    if progress[-1] == "MemoryError":
        assert ran.rc == 0
    else:  # the kernel's OOM killer ended it: 128 + SIGKILL, and the cgroup says so
        assert ran.rc == 137
        assert ran.info["oom_kills"] >= 1
    assert int(progress[-2 if progress[-1] == "MemoryError" else -1]) <= 96


async def test_tmp_cannot_hold_more_than_the_memory_limit(beams: Beams) -> None:
    # /tmp is a tmpfs whose pages are charged to the beam's memory cgroup: filling it ends
    # like any other allocation past the limit, without touching the host's memory.
    _need(beams, "memory")
    ran = await beams.py(
        """
with open("/tmp/fill", "wb") as f:
    for i in range(64):
        f.write(b"\\x01" * (4 << 20))
        f.flush()
        print(4 * (i + 1), flush=True)
print("filled 256 MiB", flush=True)
""",
        limits=Limits(memory_bytes=64 << 20),
    )
    assert "filled" not in ran.out
    assert int(ran.out.split()[-1]) < 64
    assert ran.rc == 137 and ran.info["oom_kills"] >= 1


async def test_cpu_limit_is_written_and_the_beam_is_in_it(beams: Beams) -> None:
    _need(beams, "cpu")
    sb = await beams.start(["/bin/sleep", "600"], limits=Limits(cpus=0.5))
    info = sb.info()
    (cg,) = [Path(p) for p in info["cgroups"]]
    assert info["limits"] == {"cpu": "0.5 CPUs"}
    if (cg / "cpu.max").exists():
        assert (cg / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert (cg / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cg / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert str(info["init_pid"]) in (cg / "cgroup.procs").read_text().split()
    await sb.kill()
