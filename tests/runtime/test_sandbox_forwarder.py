"""The forwarder on its own, run on the host (no sandbox): relay semantics a client would
notice (half-close, large bodies both ways, many connections), exit codes, signals, and
its refusals. In a beam it is pid 1; here it is an ordinary child, which it also supports."""

from __future__ import annotations

import asyncio
import hashlib
import marshal
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tether.runtime import forwarder

PY = sys.executable
SOURCE = forwarder.__file__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def launch(
    argv: Sequence[str],
    listen: Sequence[tuple[int, str]],
    env: Mapping[str, str] | None = None,
    raw: bytes | None = None,
) -> asyncio.subprocess.Process:
    cfg = (
        raw
        if raw is not None
        else marshal.dumps(
            {
                "argv": list(argv),
                "env": dict(env or {"PATH": "/usr/bin:/bin"}),
                "listen": list(listen),
                "cwd": "/",
            }
        )
    )
    fd = os.memfd_create("cfg", 0)
    os.write(fd, cfg)
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return await asyncio.create_subprocess_exec(
            PY, "-I", "-S", SOURCE, "launch", str(fd),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)


@pytest.fixture
async def upstream(short_dir: Path) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw unix-socket server: reads until EOF, then answers with the digest and length
    of what it got (so half-close must work for the client to get an answer)."""
    got: list[bytes] = []
    path = str(short_dir / "up.sock")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()
        got.append(data)
        if data.startswith(b"BIG "):
            w.write(os.urandom(int(data[4:])))
        else:
            w.write(hashlib.sha256(data).hexdigest().encode() + b" %d" % len(data))
        await w.drain()
        w.close()

    server = await asyncio.start_unix_server(handle, path)
    async with server:
        yield path, got


async def _wait_listening(port: int) -> None:
    for _ in range(2000):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.005)
    raise AssertionError("the forwarder never listened")


async def _client(port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(payload)
    await w.drain()
    w.write_eof()  # half-close: the upstream only answers after EOF
    data = await r.read()
    w.close()
    return data


async def test_relay_half_close_large_and_parallel(upstream: tuple[str, list[bytes]]) -> None:
    path, got = upstream
    port = free_port()
    proc = await launch(["/bin/sleep", "600"], [(port, path)])
    await _wait_listening(port)
    got.clear()
    big = os.urandom(8 << 20)
    answer = await _client(port, big)
    assert answer == hashlib.sha256(big).hexdigest().encode() + b" %d" % len(big)
    download = await _client(port, b"BIG 20000000")
    assert len(download) == 20_000_000
    payloads = [os.urandom(1000 + i) for i in range(64)]
    answers = await asyncio.gather(*[_client(port, p) for p in payloads])
    assert answers == [hashlib.sha256(p).hexdigest().encode() + b" %d" % len(p) for p in payloads]
    proc.send_signal(signal.SIGTERM)  # forwarded to the command: sleep dies of it
    assert await proc.wait() == 128 + signal.SIGTERM


async def test_command_exit_code_is_the_forwarders(upstream: tuple[str, list[bytes]]) -> None:
    proc = await launch(["/bin/sh", "-c", "exit 42"], [(free_port(), upstream[0])])
    assert await proc.wait() == 42
    proc = await launch(["/bin/sh", "-c", "kill -USR1 $$"], [(free_port(), upstream[0])])
    assert await proc.wait() == 128 + signal.SIGUSR1


async def test_environment_is_passed_exactly(upstream: tuple[str, list[bytes]]) -> None:
    proc = await launch(
        ["env"], [(free_port(), upstream[0])], env={"PATH": "/usr/bin:/bin", "Z": "1"}
    )
    out, _ = await proc.communicate()
    assert sorted(out.decode().split()) == ["PATH=/usr/bin:/bin", "Z=1"]


async def test_listener_is_up_before_the_command_runs(upstream: tuple[str, list[bytes]]) -> None:
    port = free_port()
    code = (
        f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
        "s.sendall(b'x'); s.shutdown(1); print(s.recv(99).decode())"
    )
    proc = await launch([PY, "-I", "-S", "-c", code], [(port, upstream[0])])
    out, err = await proc.communicate()
    assert out.decode().strip() == hashlib.sha256(b"x").hexdigest() + " 1", err


BAD: dict[str, tuple[dict[str, Any] | bytes, int, str]] = {
    "not_marshal": (b"\xff\xfe garbage", 125, "cannot start"),
    "missing_argv": ({"env": {}, "listen": []}, 125, "cannot start: 'argv'"),
    "empty_argv": ({"argv": [], "env": {}, "listen": []}, 125, "argv must be a non-empty list"),
    "env_not_dict": ({"argv": ["x"], "env": [], "listen": []}, 125, "env must be a dict"),
    "not_found": (
        {"argv": ["no-such-cmd-xyz"], "env": {}, "listen": []},
        127,
        "cannot run 'no-such-cmd-xyz'",
    ),
    "not_executable": (
        {"argv": ["/etc/hostname"], "env": {}, "listen": []},
        126,
        "cannot run '/etc/hostname'",
    ),
}


@pytest.mark.parametrize("cfg,code,message", BAD.values(), ids=BAD.keys())
async def test_bad_launches_fail_with_a_code_and_a_message(
    cfg: dict[str, Any] | bytes, code: int, message: str
) -> None:
    raw = cfg if isinstance(cfg, bytes) else marshal.dumps(cfg)
    proc = await launch([], [], raw=raw)
    _, err = await proc.communicate()
    assert proc.returncode == code
    assert err.decode().startswith("tether-forwarder: ") and message in err.decode()


async def test_port_in_use_is_refused_before_the_command_runs(
    upstream: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        marker = tmp_path / "ran"
        proc = await launch(["/usr/bin/touch", str(marker)], [(port, upstream[0])])
        _, err = await proc.communicate()
    assert proc.returncode == 125 and "Address already in use" in err.decode()
    assert not marker.exists()


async def test_usage() -> None:
    proc = await asyncio.create_subprocess_exec(
        PY, "-I", "-S", SOURCE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"usage" in err


@pytest.mark.parametrize("release", [b"1", b""], ids=["released", "host_gave_up"])
async def test_command_waits_for_the_release_byte(
    upstream: tuple[str, list[bytes]], tmp_path: Path, release: bytes
) -> None:
    go_r, go_w = os.pipe()
    marker = tmp_path / "ran"
    cfg = {
        "argv": ["/usr/bin/touch", str(marker)],
        "env": {},
        "listen": [(free_port(), upstream[0])],
        "go_fd": go_r,
    }
    fd = os.memfd_create("cfg", 0)
    os.write(fd, marshal.dumps(cfg))
    os.lseek(fd, 0, os.SEEK_SET)
    proc = await asyncio.create_subprocess_exec(
        PY, "-I", "-S", SOURCE, "launch", str(fd),
        stderr=asyncio.subprocess.PIPE, pass_fds=(fd, go_r),
    )  # fmt: skip
    os.close(fd)
    os.close(go_r)
    if release:
        os.write(go_w, release)
    os.close(go_w)
    _, err = await proc.communicate()
    if release:
        assert proc.returncode == 0 and marker.exists(), err
    else:
        assert proc.returncode == 125 and not marker.exists()
        assert b"not released by the host" in err
