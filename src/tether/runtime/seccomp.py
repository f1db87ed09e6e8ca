"""The beam's seccomp filter, compiled here to classic BPF (no libseccomp, no compiler).

bwrap loads the program from ``--seccomp FD`` just before it execs the command, after
``PR_SET_NO_NEW_PRIVS``. The namespaces and the dropped capabilities already stop most of
what is listed here; the filter is the second wall, and it closes the doors capabilities do
not: kernel attack surface reachable without privilege (``bpf``, ``perf_event_open``,
``userfaultfd``, ``io_uring``, ``keyctl``), new namespaces (a route to capabilities inside
a fresh user namespace), and setuid bits on files the beam owns in its workspace (the
workspace outlives the beam and the host may execute from it).

Layout of the program: check the audit architecture (x86_64 or aarch64; anything else,
including i386 ``int 0x80`` and the x32 ABI, is killed or refused), then one block per
architecture that jumps on the syscall number to a verdict or to an argument check.
Denials return ``EPERM`` ("Operation not permitted"), which is what an agent sees.
"""

from __future__ import annotations

import errno
import platform
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ARCHES",
    "AUDIT_ARCH",
    "DENIED",
    "SYSCALLS",
    "Instruction",
    "build_filter",
    "native_arch",
]

# Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# seccomp return actions (linux/seccomp.h).
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
ARCHES = tuple(AUDIT_ARCH)
_X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
# Both supported arches are little-endian, so the low 32 bits of args[i] sit at 16 + 8*i.
_OFF_NR = 0
_OFF_ARCH = 4


def _arg(i: int) -> int:
    return 16 + 8 * i


# Syscall numbers, checked against the kernel headers in the tests.
SYSCALLS: Mapping[str, Mapping[str, int]] = {
    "x86_64": {
        "open": 2, "socket": 41, "clone": 56, "creat": 85, "chmod": 90, "fchmod": 91,
        "ptrace": 101, "syslog": 103, "mknod": 133, "uselib": 134, "personality": 135,
        "ustat": 136, "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156,
        "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
        "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "iopl": 172, "ioperm": 173, "create_module": 174,
        "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
        "query_module": 178, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212,
        "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
        "keyctl": 250, "openat": 257, "mknodat": 259, "fchmodat": 268, "unshare": 272,
        "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
        "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "openat2": 437, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
        "quotactl_fd": 443, "fchmodat2": 452,
    },
    "aarch64": {
        "lookup_dcookie": 18, "mknodat": 33, "umount2": 39, "mount": 40, "pivot_root": 41,
        "nfsservctl": 42, "chroot": 51, "fchmod": 52, "fchmodat": 53, "openat": 56,
        "vhangup": 58, "quotactl": 60, "acct": 89, "personality": 92, "unshare": 97,
        "kexec_load": 104, "init_module": 105, "delete_module": 106, "clock_settime": 112,
        "syslog": 116, "ptrace": 117, "reboot": 142, "sethostname": 161,
        "setdomainname": 162, "settimeofday": 170, "socket": 198, "add_key": 217,
        "request_key": 218, "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225,
        "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
        "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "openat2": 437, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
        "quotactl_fd": 443, "fchmodat2": 452,
    },
}  # fmt: skip

# Refused outright with EPERM (where the arch has the syscall).
DENIED: tuple[str, ...] = (
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_getfd",
    # filesystems and namespaces
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "unshare", "setns",
    "name_to_handle_at", "open_by_handle_at",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "fanotify_init",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "uselib", "ustat", "_sysctl",
    "nfsservctl", "lookup_dcookie", "modify_ldt", "iopl", "ioperm",
    # the machine's state
    "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "sethostname", "setdomainname",
)  # fmt: skip

_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10
_SOCK_TYPE_MASK = 0xF
_SOCK_RAW, _SOCK_PACKET = 3, 10
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME is
# only reachable through clone3 and unshare, both refused).
_CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
_CLONE_NS_FLAGS |= 0x20000000 | 0x40000000
_SETID_BITS = 0o6000  # S_ISUID | S_ISGID
_O_CREAT_OR_TMPFILE = 0o100 | 0o20000000
_PER_LINUX, _PER_QUERY = 0, 0xFFFFFFFF

# Syscalls whose mode argument may carry setuid/setgid bits: (name, flags arg or None, mode arg).
_MODE_ARGS: tuple[tuple[str, int | None, int], ...] = (
    ("chmod", None, 1),
    ("fchmod", None, 1),
    ("fchmodat", None, 2),
    ("fchmodat2", None, 2),
    ("creat", None, 1),
    ("mknod", None, 1),
    ("mknodat", None, 2),
    ("open", 1, 2),
    ("openat", 2, 3),
)


@dataclass(frozen=True)
class Instruction:
    """One ``struct sock_filter``; jump targets are labels until :func:`_assemble`."""

    code: int
    k: int = 0
    jt: str | int = 0
    jf: str | int = 0


def _ld(offset: int) -> Instruction:
    return Instruction(_LD_W_ABS, offset)


def _ret(action: int) -> Instruction:
    return Instruction(_RET_K, action)


def _jeq(k: int, jt: str | int = 0, jf: str | int = 0) -> Instruction:
    return Instruction(_JEQ_K, k, jt, jf)


def _jset(k: int, jt: str | int = 0, jf: str | int = 0) -> Instruction:
    return Instruction(_JSET_K, k, jt, jf)


def _arch_block(arch: str) -> list[Instruction | str]:
    """The instructions for one architecture; strings are labels (prefixed with the arch)."""
    nrs = SYSCALLS[arch]
    p = f"{arch}:"
    deny, nosys, allow = p + "eperm", p + "enosys", p + "allow"
    out: list[Instruction | str] = [p + "start", _ld(_OFF_NR)]
    if arch == "x86_64":
        out.append(Instruction(_JGE_K, _X32_SYSCALL_BIT, deny, 0))
    out.append(_jeq(nrs["socket"], p + "socket"))
    out.append(_jeq(nrs["clone"], p + "clone"))
    out.append(_jeq(nrs["personality"], p + "personality"))
    for name in ("clone3", "openat2"):
        # ENOSYS: libc falls back to clone/openat, whose arguments we can inspect.
        out.append(_jeq(nrs[name], nosys))
    for name, flags_arg, mode_arg in _MODE_ARGS:
        if name in nrs:
            label = p + (f"mode{mode_arg}" if flags_arg is None else f"open{flags_arg}")
            out.append(_jeq(nrs[name], label))
    for name in DENIED:
        if name in nrs:
            out.append(_jeq(nrs[name], deny))
    out.append(_ret(RET_ALLOW))

    out += [p + "socket", _ld(_arg(0))]
    out += [_jeq(_AF_UNIX, p + "socktype"), _jeq(_AF_INET, p + "socktype")]
    out += [_jeq(_AF_INET6, p + "socktype"), _ret(RET_ERRNO | errno.EPERM)]
    out += [p + "socktype", _ld(_arg(1)), Instruction(_ALU_AND_K, _SOCK_TYPE_MASK)]
    out += [_jeq(_SOCK_RAW, deny), _jeq(_SOCK_PACKET, deny), _ret(RET_ALLOW)]

    out += [p + "clone", _ld(_arg(0)), _jset(_CLONE_NS_FLAGS, deny), _ret(RET_ALLOW)]
    out += [p + "personality", _ld(_arg(0)), _jeq(_PER_LINUX, allow), _jeq(_PER_QUERY, allow)]
    out += [_ret(RET_ERRNO | errno.EPERM)]

    mode_args = sorted({m for n, f, m in _MODE_ARGS if f is None and n in nrs})
    for m in mode_args:
        out += [p + f"mode{m}", _ld(_arg(m)), _jset(_SETID_BITS, deny), _ret(RET_ALLOW)]
    for name, flags_arg, mode_arg in _MODE_ARGS:
        if flags_arg is None or name not in nrs:
            continue
        # Only with O_CREAT/O_TMPFILE is the mode argument meaningful (else it is garbage).
        out += [p + f"open{flags_arg}", _ld(_arg(flags_arg)), _jset(_O_CREAT_OR_TMPFILE, 0, allow)]
        out += [_ld(_arg(mode_arg)), _jset(_SETID_BITS, deny), _ret(RET_ALLOW)]

    out += [allow, _ret(RET_ALLOW)]
    out += [deny, _ret(RET_ERRNO | errno.EPERM)]
    out += [nosys, _ret(RET_ERRNO | errno.ENOSYS)]
    return out


def program(arches: Iterable[str] = ARCHES) -> list[Instruction]:
    """The resolved program (labels replaced by relative jumps)."""
    arches = tuple(arches)
    unknown = [a for a in arches if a not in AUDIT_ARCH]
    if unknown:
        raise ValueError(f"no seccomp syscall table for {', '.join(unknown)}")
    body: list[Instruction | str] = [_ld(_OFF_ARCH)]
    body += [_jeq(AUDIT_ARCH[a], f"{a}:start") for a in arches]
    # Any other ABI (i386 via int 0x80, arm32 compat) is killed: nothing here is built for it.
    body.append(_ret(RET_KILL_PROCESS))
    for a in arches:
        body += _arch_block(a)
    return _assemble(body)


def _assemble(body: Sequence[Instruction | str]) -> list[Instruction]:
    labels: dict[str, int] = {}
    code: list[Instruction] = []
    for item in body:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)

    def offset(target: str | int, at: int) -> int:
        if isinstance(target, int):
            return target
        delta = labels[target] - (at + 1)
        if not 0 <= delta <= 255:
            raise ValueError(f"seccomp jump to {target} out of range ({delta})")
        return delta

    return [
        Instruction(ins.code, ins.k, offset(ins.jt, i), offset(ins.jf, i))
        for i, ins in enumerate(code)
    ]


def build_filter(arches: Iterable[str] = ARCHES) -> bytes:
    """The filter as bwrap reads it from ``--seccomp FD``: packed ``struct sock_filter``."""
    return b"".join(
        struct.pack("=HBBI", ins.code, int(ins.jt), int(ins.jf), ins.k) for ins in program(arches)
    )


def native_arch() -> str | None:
    """This machine's arch name if the filter covers it, else ``None``."""
    machine = platform.machine()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    return machine if machine in AUDIT_ARCH else None
