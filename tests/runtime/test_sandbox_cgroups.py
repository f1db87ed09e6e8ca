"""Finding and using the cgroup controllers: v1, v2 and hybrid layouts from their
/proc/self/cgroup and mountinfo (containers show a hierarchy from a sub-path), v2
delegation problems explained, and the real controllers of this host."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tether.runtime.cgroups import CgroupHost, needed_controllers
from tether.runtime.sandbox import Limits

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n2:cpu,cpuacct:/\n0::/\n"


def _host(tmp_path: Path, cgroup: str, mountinfo: str) -> CgroupHost:
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text(mountinfo)
    return CgroupHost(proc_cgroup=tmp_path / "cgroup", mountinfo=tmp_path / "mountinfo")


def test_v1_controllers_are_found_below_our_own_cgroups(tmp_path: Path) -> None:
    host = _host(tmp_path, V1_CGROUP, V1_MOUNTS)
    found = {c.name: (c.version, str(c.parent)) for c in host.controllers.values()}
    assert found == {
        "memory": (1, "/sys/fs/cgroup/memory/process_api/x"),
        "pids": (1, "/sys/fs/cgroup/pids/a"),
        "cpu": (1, "/sys/fs/cgroup/cpu,cpuacct"),
    }


def test_a_container_sees_its_hierarchy_from_a_sub_path(tmp_path: Path) -> None:
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    host = _host(tmp_path, "4:memory:/docker/abc/inner\n", mounts)
    assert str(host.controllers["memory"].parent) == "/sys/fs/cgroup/memory/inner"


def _v2_files(tmp_path: Path, controllers: str, enabled: str) -> None:
    root = tmp_path / "unified"
    cg = root / "srv"
    cg.mkdir(parents=True)
    (cg / "cgroup.controllers").write_text(controllers)
    (cg / "cgroup.subtree_control").write_text(enabled)
    (tmp_path / "cgroup").write_text("0::/srv\n")
    (tmp_path / "mountinfo").write_text(f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n")


def _v2_tree(tmp_path: Path, controllers: str, enabled: str) -> CgroupHost:
    _v2_files(tmp_path, controllers, enabled)
    return CgroupHost(proc_cgroup=tmp_path / "cgroup", mountinfo=tmp_path / "mountinfo")


def test_v2_with_delegated_controllers(tmp_path: Path) -> None:
    host = _v2_tree(tmp_path, "cpu memory pids\n", "cpu memory pids\n")
    assert {c.name: c.version for c in host.controllers.values()} == {
        "memory": 2,
        "pids": 2,
        "cpu": 2,
    }
    cgroups, warnings = host.create("tether-t-b1", Limits(memory_bytes=1 << 30, pids=10, cpus=2))
    assert warnings == []
    (path,) = cgroups.paths  # one directory for every controller in v2
    assert (path / "memory.max").read_text() == str(1 << 30)
    assert (path / "memory.swap.max").read_text() == "0"
    assert (path / "pids.max").read_text() == "10"
    assert (path / "cpu.max").read_text() == "200000 100000"


def test_v2_enables_controllers_for_children_when_it_may(tmp_path: Path) -> None:
    host = _v2_tree(tmp_path, "memory pids\n", "\n")
    assert set(host.controllers) == {"memory", "pids"}
    assert "does not offer the cpu controller" in host.problems["cpu"]


def test_v2_without_the_right_to_delegate_is_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = Path.write_text

    def kernel_says_busy(self: Path, data: str, *a: object, **kw: object) -> int:
        if self.name == "cgroup.subtree_control":  # the no-internal-process rule
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_write(self, data)

    _v2_files(tmp_path, "memory pids\n", "pids\n")
    monkeypatch.setattr(Path, "write_text", kernel_says_busy)
    host = CgroupHost(proc_cgroup=tmp_path / "cgroup", mountinfo=tmp_path / "mountinfo")
    assert set(host.controllers) == {"pids"}
    why = host.problems["memory"]
    assert "cannot enable memory for child cgroups" in why
    assert "the server's cgroup has processes in it" in why and "Delegate=yes" in why
    _, warnings = host.create("tether-t-b9", Limits(memory_bytes=1 << 30))
    assert warnings == [f"memory limit not applied: {why}"]


def test_no_controllers_anywhere_gives_one_warning_per_limit(tmp_path: Path) -> None:
    host = _host(tmp_path, "0::/\n", "")
    cgroups, warnings = host.create("tether-t-b2", Limits(memory_bytes=1 << 30, pids=10))
    assert cgroups.paths == ()
    assert warnings == [
        "memory limit not applied: no cgroup hierarchy has the memory controller mounted",
        "pids limit not applied: no cgroup hierarchy has the pids controller mounted",
    ]


def test_unreadable_membership_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    host = CgroupHost(proc_cgroup=tmp_path / "missing", mountinfo=tmp_path / "missing")
    assert host.controllers == {}
    assert host.problems["pids"].startswith("cannot read cgroup membership")


def test_unwritable_parent_is_a_warning(tmp_path: Path) -> None:
    host = _v2_tree(tmp_path, "pids\n", "pids\n")
    parent = tmp_path / "unified" / "srv"
    (parent / "tether-t-b3").write_text("a file where the cgroup should go")
    _, warnings = host.create("tether-t-b3/x", Limits(pids=5))
    assert len(warnings) == 1 and "pids limit not applied: cannot create" in warnings[0]


def test_needed_controllers_follow_the_limits() -> None:
    assert needed_controllers(Limits()) == ()
    assert needed_controllers(Limits(cpus=1, pids=3)) == ("pids", "cpu")


def test_this_hosts_controllers_create_apply_and_remove() -> None:
    host = CgroupHost()
    if not host.controllers:
        pytest.skip(f"no usable cgroup controllers on this host: {host.problems}")
    limits = Limits(memory_bytes=64 << 20, pids=16, cpus=0.25)
    cgroups, warnings = host.create(f"tether-test-{os.getpid()}-{os.urandom(3).hex()}", limits)
    try:
        assert set(cgroups.applied) == set(host.controllers)
        assert warnings == []
        assert all(p.is_dir() for p in cgroups.paths)
        assert cgroups.pids() == set()
    finally:
        assert cgroups.remove() == []
    assert not [p for p in cgroups.paths if p.exists()]
