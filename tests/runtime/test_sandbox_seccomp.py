"""The seccomp program, checked two ways: its syscall tables against the kernel headers,
and its verdicts by running it in a small classic-BPF interpreter for both architectures
(the real kernel runs it for x86_64 in the escape tests)."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from tether.runtime import seccomp
from tether.runtime.seccomp import (
    AUDIT_ARCH,
    DENIED,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    SYSCALLS,
    build_filter,
)

EPERM = RET_ERRNO | errno.EPERM
ENOSYS = RET_ERRNO | errno.ENOSYS


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a classic BPF seccomp program on one ``struct seccomp_data``."""
    full = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in full])
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld w abs
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # and k
            acc &= k
        elif code == 0x15:  # jeq k
            pc += jt if acc == k else jf
        elif code == 0x35:  # jge k
            pc += jt if acc >= k else jf
        elif code == 0x45:  # jset k
            pc += jt if acc & k else jf
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


PROGRAM = build_filter()
ARCHES = sorted(AUDIT_ARCH)


def verdict(arch: str, name: str, *args: int) -> int:
    return run_bpf(PROGRAM, SYSCALLS[arch][name], AUDIT_ARCH[arch], args)


def test_program_is_within_kernel_limits() -> None:
    assert len(PROGRAM) % 8 == 0
    assert len(PROGRAM) // 8 <= 4096  # BPF_MAXINSNS


# Syscalls newer than the headers of some distributions (fchmodat2: Linux 6.6, 452 everywhere).
NEWER_THAN_HEADERS = {"fchmodat2"}


def _header_numbers(path: Path, pattern: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(pattern, path.read_text())}


def test_x86_64_numbers_match_the_kernel_headers() -> None:
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip("linux-libc-dev headers for x86_64 are not installed")
    known = _header_numbers(header, r"#define __NR_(\w+)\s+(\d+)")
    table = SYSCALLS["x86_64"]
    checked = {n: table[n] for n in table if n in known}
    assert checked == {n: known[n] for n in checked}
    assert set(table) - set(checked) <= NEWER_THAN_HEADERS


def test_aarch64_numbers_match_the_generic_headers() -> None:
    header = Path("/usr/include/asm-generic/unistd.h")
    if not header.exists():
        pytest.skip("asm-generic headers are not installed")
    known = _header_numbers(header, r"#define __NR(?:3264)?_(\w+)\s+(\d+)")
    table = SYSCALLS["aarch64"]
    checked = {n: table[n] for n in table if n in known}
    assert checked == {n: known[n] for n in checked}
    assert set(table) - set(checked) <= NEWER_THAN_HEADERS


DENIED_PER_ARCH = [(a, n) for a in ARCHES for n in sorted(DENIED) if n in SYSCALLS[a]]


@pytest.mark.parametrize("arch,name", DENIED_PER_ARCH, ids=[f"{a}-{n}" for a, n in DENIED_PER_ARCH])
def test_denied_syscalls_return_eperm(arch: str, name: str) -> None:
    assert verdict(arch, name) == EPERM


def test_every_denied_name_exists_somewhere() -> None:
    assert not [n for n in DENIED if not any(n in SYSCALLS[a] for a in ARCHES)]


@pytest.mark.parametrize("arch", ARCHES)
def test_ordinary_syscalls_are_allowed(arch: str) -> None:
    # read, write, mmap-ish numbers that are in no table of ours: everything else is allowed
    for nr in (0, 1, 3, 9, 60, 63, 64, 93, 222, 231):
        if nr in SYSCALLS[arch].values():
            continue
        assert run_bpf(PROGRAM, nr, AUDIT_ARCH[arch]) == RET_ALLOW, nr


@pytest.mark.parametrize("arch", ARCHES)
def test_socket_families_and_types(arch: str) -> None:
    AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_ALG = 1, 2, 10, 16, 17, 38
    STREAM, DGRAM, RAW, PACKET, NONBLOCK, CLOEXEC = 1, 2, 3, 10, 0o4000, 0o2000000
    for family in (AF_UNIX, AF_INET, AF_INET6):
        assert verdict(arch, "socket", family, STREAM | CLOEXEC) == RET_ALLOW
        assert verdict(arch, "socket", family, DGRAM | NONBLOCK) == RET_ALLOW
        assert verdict(arch, "socket", family, RAW) == EPERM
        assert verdict(arch, "socket", family, RAW | NONBLOCK | CLOEXEC) == EPERM
        assert verdict(arch, "socket", family, PACKET) == EPERM
    for family in (AF_NETLINK, AF_PACKET, AF_ALG, 0, 40, 255):
        assert verdict(arch, "socket", family, DGRAM) == EPERM
    # the high half of a 64-bit register does not sneak a family past the check
    assert verdict(arch, "socket", (1 << 32) | AF_NETLINK, DGRAM) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
def test_clone_with_namespace_flags_is_refused(arch: str) -> None:
    SIGCHLD, CLONE_VM, CLONE_THREAD = 17, 0x100, 0x10000
    assert verdict(arch, "clone", SIGCHLD) == RET_ALLOW  # fork
    assert verdict(arch, "clone", CLONE_VM | CLONE_THREAD | SIGCHLD) == RET_ALLOW  # threads
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert verdict(arch, "clone", SIGCHLD | flag) == EPERM, hex(flag)
    assert verdict(arch, "clone3", 0, 88) == ENOSYS  # libc falls back to clone
    assert verdict(arch, "openat2", 0, 0) == ENOSYS


@pytest.mark.parametrize("arch", ARCHES)
def test_setuid_and_setgid_bits_cannot_be_set(arch: str) -> None:
    O_CREAT, O_TMPFILE, O_RDONLY = 0o100, 0o20200000, 0
    for mode, expect in ((0o755, RET_ALLOW), (0o4755, EPERM), (0o2755, EPERM), (0o6777, EPERM)):
        assert verdict(arch, "fchmod", 3, mode) == expect
        assert verdict(arch, "fchmodat", -100, 0, mode) == expect
        assert verdict(arch, "fchmodat2", -100, 0, mode, 0) == expect
        assert verdict(arch, "mknodat", -100, 0, 0o100000 | mode) == expect
        assert verdict(arch, "openat", -100, 0, O_CREAT, mode) == expect
        assert verdict(arch, "openat", -100, 0, O_TMPFILE, mode) == expect
        # without O_CREAT the mode argument is garbage and must not matter
        assert verdict(arch, "openat", -100, 0, O_RDONLY, mode) == RET_ALLOW
    if arch == "x86_64":
        assert verdict(arch, "chmod", 0, 0o4755) == EPERM
        assert verdict(arch, "creat", 0, 0o4755) == EPERM
        assert verdict(arch, "open", 0, O_CREAT, 0o4755) == EPERM
        assert verdict(arch, "open", 0, O_RDONLY, 0o4755) == RET_ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_personality_only_query_and_linux(arch: str) -> None:
    assert verdict(arch, "personality", 0) == RET_ALLOW
    assert verdict(arch, "personality", 0xFFFFFFFF) == RET_ALLOW
    assert verdict(arch, "personality", 0x0040000) == EPERM  # ADDR_NO_RANDOMIZE
    assert verdict(arch, "personality", 0x0008) == EPERM


def test_foreign_abis_are_killed() -> None:
    AUDIT_ARCH_I386, AUDIT_ARCH_ARM = 0x40000003, 0x40000028
    for arch in (AUDIT_ARCH_I386, AUDIT_ARCH_ARM, 0):
        assert run_bpf(PROGRAM, 1, arch) == RET_KILL_PROCESS
    # x32 syscalls (bit 30) on x86_64 are refused, not interpreted as x86_64 ones
    assert run_bpf(PROGRAM, 0x40000000 | 1, AUDIT_ARCH["x86_64"]) == EPERM


def test_a_single_arch_program_kills_the_other() -> None:
    only_x86 = build_filter(["x86_64"])
    assert run_bpf(only_x86, 0, AUDIT_ARCH["aarch64"]) == RET_KILL_PROCESS
    assert run_bpf(only_x86, SYSCALLS["x86_64"]["bpf"], AUDIT_ARCH["x86_64"]) == EPERM


def test_unknown_arch_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match="no seccomp syscall table for riscv64"):
        build_filter(["riscv64"])


def test_native_arch_is_known_here() -> None:
    import platform

    expected = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    assert seccomp.native_arch() == expected.get(platform.machine())
