"""Hostile workloads, files: the host's homes, credentials, data dir and system files are
absent or read-only inside a beam; only the workspace (and a private /tmp) can be written."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.conftest import PRELUDE, Beams


@pytest.fixture
def root_canary() -> Iterator[Path | None]:
    """A secret in /root for the duration of the test (when the test may write there)."""
    path = Path(f"/root/.tether-canary-{os.urandom(6).hex()}")
    try:
        path.write_text("root secret")
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def home_canary() -> Iterator[Path | None]:
    """Another user's home with a secret in it, when /home exists and is writable."""
    home = Path(f"/home/tether-canary-{os.urandom(6).hex()}")
    try:
        home.mkdir()
        (home / "secret").write_text("someone's secret")
    except OSError:
        yield None
        return
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _visible_under(top: str) -> list[str]:
    """What a beam should see under ``top``: only components leading to the Python roots."""
    names = set()
    for root in {sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix)}:
        if root.startswith(top.rstrip("/") + "/"):
            names.add(root[len(top.rstrip("/")) + 1 :].split("/")[0])
    return sorted(names)


async def test_root_home_shows_only_the_interpreter(beams: Beams, root_canary: Path | None) -> None:
    canary = str(root_canary) if root_canary else "/root/.bashrc"
    ran = await beams.py(
        PRELUDE
        + f"""
note("list", sorted(os.listdir("/root")) if os.path.isdir("/root") else None)
attempt("canary", lambda: open({canary!r}).read())
attempt("ssh", lambda: os.listdir("/root/.ssh"))
done()
"""
    )
    r = ran.result
    expected = _visible_under("/root")
    assert r["list"] == (expected if expected else None)
    assert r["canary"] == "ENOENT" and r["ssh"] == "ENOENT"


async def test_other_users_homes_are_absent(beams: Beams, home_canary: Path | None) -> None:
    target = str(home_canary / "secret") if home_canary else "/home"
    ran = await beams.py(
        PRELUDE
        + f"""
note("home_exists", os.path.exists("/home"))
attempt("secret", lambda: open({target!r}).read())
done()
"""
    )
    assert ran.result == {"home_exists": False, "secret": "ENOENT"}


async def test_host_data_dir_and_workspace_path_are_absent(beams: Beams, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "signing.key").write_text("PRIVATE")
    ran = await beams.py(
        PRELUDE
        + f"""
attempt("key", lambda: open({str(data / "keys" / "signing.key")!r}).read())
note("data_dir", os.path.exists({str(data)!r}))
note("workspace_host_path", os.path.exists({str(beams.workspace)!r}))
note("host_tmp", sorted(os.listdir("/tmp")))
done()
"""
    )
    assert ran.result == {
        "key": "ENOENT",
        "data_dir": False,
        "workspace_host_path": False,
        # nothing of the host's /tmp, except the way to an interpreter installed under it
        "host_tmp": _interpreter_dirs_under_tmp(),
    }


def _interpreter_dirs_under_tmp() -> list[str]:
    tops = set()
    for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix)):
        if p.startswith("/tmp/"):
            tops.add(p.split("/")[2])
    return sorted(tops)


async def test_host_credentials_and_system_state_are_absent(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
for p in ["/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/ssl/private", "/etc/sudoers",
          "/var", "/sys", "/home", "/mnt", "/srv", "/opt", "/var/run/docker.sock",
          "/run/docker.sock", "/run/systemd", "/boot"]:
    note(p, os.path.exists(p))
note("passwd", open("/etc/passwd").read().split("\\n")[1].split(":")[0])
done()
"""
    )
    r = ran.result
    assert r.pop("passwd") == "beam"
    assert r == dict.fromkeys(r, False) and len(r) == 15


async def test_writes_outside_the_workspace_are_refused(beams: Beams) -> None:
    pid_max = Path("/proc/sys/kernel/pid_max").read_text().strip()
    ran = await beams.py(
        PRELUDE
        + f"""
for p in ["/usr/x", "/etc/x", "/x", "/run/x", "/run/tether/x", "/etc/passwd",
          sys.prefix + "/x", os.__file__]:
    attempt(p, lambda: open(p, "a").close() if os.path.exists(p) else open(p, "w").close())
attempt("token", lambda: open("/run/tether/token", "w"))
attempt("token_chmod", lambda: os.chmod("/run/tether/token", 0o666))
attempt("gateway_sock_rm", lambda: os.remove("/run/tether/gateway.sock"))
attempt("token_link", lambda: os.link("/run/tether/token", "/workspace/t"))
# writing the value it already has: harmless even if this check ever failed
attempt("sysctl", lambda: open("/proc/sys/kernel/pid_max", "w").write({pid_max!r}))
attempt("oom_adj", lambda: open("/proc/self/oom_score_adj", "w").write("0"))
attempt("mkdir_root", lambda: os.mkdir("/root/x"))
done()
"""
    )
    r = ran.result
    assert r.pop("token_link") == "EXDEV"
    assert r == dict.fromkeys(r, "EROFS"), r


async def test_workspace_and_tmp_are_writable_and_run_tether_readable(beams: Beams) -> None:
    (beams.workspace / "input.txt").write_text("from the host")
    name = f"tether-{os.urandom(6).hex()}"
    ran = await beams.py(
        PRELUDE
        + f"""
note("cwd", os.getcwd())
note("input", open("input.txt").read())
open("/workspace/out.txt", "w").write("from the beam")
os.makedirs("/workspace/sub/dir")
open("/tmp/{name}", "w").write("scratch")
note("tmp", open("/tmp/{name}").read())
note("token", open("/run/tether/token").read())
note("token_mode", oct(os.stat("/run/tether/token").st_mode & 0o777))
done()
"""
    )
    assert ran.result == {
        "cwd": "/workspace",
        "input": "from the host",
        "tmp": "scratch",
        "token": "beam-token",
        "token_mode": "0o400",
    }
    assert (beams.workspace / "out.txt").read_text() == "from the beam"
    assert (beams.workspace / "sub" / "dir").is_dir()
    assert not Path(f"/tmp/{name}").exists()


async def test_tmp_is_private_to_each_beam(beams: Beams) -> None:
    first = await beams.py("open('/tmp/mine', 'w').write('1'); print('{}')")
    assert first.rc == 0
    second = await beams.py(PRELUDE + "attempt('other', lambda: open('/tmp/mine')); done()")
    assert second.result == {"other": "ENOENT"}


async def test_workspace_cannot_be_used_to_leave_a_setuid_file(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
import shutil, stat
shutil.copy("/bin/true", "/workspace/t")
attempt("chmod_suid", lambda: os.chmod("/workspace/t", 0o4755))
attempt("chmod_sgid", lambda: os.chmod("/workspace/t", 0o2755))
attempt("fchmod_suid", lambda: os.fchmod(os.open("/workspace/t", os.O_RDONLY), 0o4755))
attempt("create_suid", lambda: os.open("/workspace/n", os.O_CREAT | os.O_WRONLY, 0o4755))
attempt("mknod_suid", lambda: os.mknod("/workspace/m", 0o104755))
attempt("chmod_plain", lambda: os.chmod("/workspace/t", 0o755))
attempt("open_plain", lambda: os.close(os.open("/workspace/p", os.O_CREAT | os.O_WRONLY, 0o644)))
done()
"""
    )
    assert ran.result == {
        "chmod_suid": "EPERM",
        "chmod_sgid": "EPERM",
        "fchmod_suid": "EPERM",
        "create_suid": "EPERM",
        "mknod_suid": "EPERM",
        "chmod_plain": "ok",
        "open_plain": "ok",
    }
    modes = [p.stat().st_mode for p in beams.workspace.iterdir()]
    assert not [m for m in modes if m & 0o6000]
    with contextlib.suppress(FileNotFoundError):
        assert not (beams.workspace / "n").stat().st_mode & 0o6000
