"""Hostile workloads, privileges: no capabilities, no new privileges, setuid binaries give
nothing, and the kernel's privileged doors (mount, namespaces, bpf, modules...) are shut by
the seccomp filter with EPERM."""

from __future__ import annotations

from tests.runtime.conftest import PRELUDE, Beams
from tether.runtime.seccomp import SYSCALLS, native_arch

NR = SYSCALLS[native_arch() or "x86_64"]


async def test_no_capabilities_no_new_privileges_and_seccomp(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + """
st = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"]:
    note(k, st[k].strip())
note("uid", [os.getuid(), os.geteuid(), os.getgid()])
done()
"""
    )
    zero = "0000000000000000"
    assert ran.result == {
        "CapInh": zero,
        "CapPrm": zero,
        "CapEff": zero,
        "CapBnd": zero,
        "CapAmb": zero,
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "uid": [1000, 1000, 1000],
    }


async def test_setuid_binaries_give_no_privilege(beams: Beams) -> None:
    ran = await beams.run(
        [
            "/bin/sh",
            "-c",
            "ls -l /usr/bin/su /usr/bin/mount | cut -c1-10; "
            "su -c id root </dev/null; echo su=$?; "
            "mount -t tmpfs none /tmp 2>&1; echo mount=$?; "
            "passwd </dev/null 2>/dev/null; echo passwd=$?; id -u",
        ]
    )
    lines = ran.out.splitlines()
    assert lines[:2] == ["-rwsr-xr-x", "-rwsr-xr-x"]  # they are setuid root on the host
    assert "su=1" in lines and "passwd=10" in lines
    assert "mount: /tmp: must be superuser to use mount." in lines and "mount=32" in lines
    assert lines[-1] == "1000"


async def test_mount_and_filesystem_syscalls_are_refused(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + f"""
s = lambda v: ctypes.c_char_p(v.encode())
buf = lambda v: ctypes.cast(s(v), ctypes.c_void_p).value
attempt("mount", lambda: syscall({NR["mount"]}, buf("none"), buf("/tmp"), buf("tmpfs"), 0, 0))
attempt("umount_proc", lambda: syscall({NR["umount2"]}, buf("/proc"), 0))
attempt("pivot_root", lambda: syscall({NR["pivot_root"]}, buf("/tmp"), buf("/tmp")))
attempt("chroot", lambda: syscall({NR["chroot"]}, buf("/tmp")))
attempt("open_tree", lambda: syscall({NR["open_tree"]}, -100, buf("/usr"), 1))
attempt("fsopen", lambda: syscall({NR["fsopen"]}, buf("tmpfs"), 0))
attempt("open_by_handle_at", lambda: syscall({NR["open_by_handle_at"]}, 3, 0, 0))
done()
"""
    )
    assert ran.result == dict.fromkeys(
        [
            "mount",
            "umount_proc",
            "pivot_root",
            "chroot",
            "open_tree",
            "fsopen",
            "open_by_handle_at",
        ],
        "EPERM",
    )


async def test_new_namespaces_are_refused(beams: Beams) -> None:
    ran = await beams.py(
        PRELUDE
        + f"""
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
flags = dict(user=CLONE_NEWUSER, net=CLONE_NEWNET, mnt=CLONE_NEWNS, pid=CLONE_NEWPID)
for name, flag in flags.items():
    attempt("unshare_" + name, lambda: syscall({NR["unshare"]}, flag))
attempt("clone_newuser", lambda: syscall({NR["clone"]}, CLONE_NEWUSER | 17, 0, 0, 0, 0))
attempt("clone3", lambda: syscall({NR["clone3"]}, 0, 0))
attempt("setns", lambda: syscall({NR["setns"]}, os.open("/proc/1/ns/net", os.O_RDONLY), 0))
def fork_and_reap():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
attempt("fork_still_works", fork_and_reap)
done()
"""
    )
    r = ran.result
    assert r.pop("fork_still_works") == "ok"
    assert r == dict.fromkeys(
        ["unshare_user", "unshare_net", "unshare_mnt", "unshare_pid", "clone_newuser", "setns"],
        "EPERM",
    ) | {"clone3": "ENOSYS"}
    shell = await beams.run(["/usr/bin/unshare", "-r", "id"])
    assert (shell.rc, shell.err) == (1, "unshare: unshare failed: Operation not permitted\n")


async def test_kernel_attack_surface_is_refused(beams: Beams) -> None:
    calls = {
        "bpf": "0, 0, 0",
        "perf_event_open": "0, 0, -1, -1, 0",
        "userfaultfd": "0",
        "io_uring_setup": "1, 0",
        "keyctl": "0, 0",
        "add_key": "0, 0, 0, 0, 0",
        "request_key": "0, 0, 0, 0",
        "kexec_load": "0, 0, 0, 0",
        "init_module": "0, 0, 0",
        "finit_module": "0, 0, 0",
        "delete_module": "0, 0",
        "swapon": "0, 0",
        "reboot": "0, 0, 0, 0",
        "syslog": "3, 0, 0",
        "sethostname": "0, 0",
        "settimeofday": "0, 0",
        "acct": "0",
        "fanotify_init": "0, 0",
        "personality": "0x0040000",  # ADDR_NO_RANDOMIZE: turning ASLR off
    }
    lines = "\n".join(f"attempt({n!r}, lambda: syscall({NR[n]}, {a}))" for n, a in calls.items())
    ran = await beams.py(
        PRELUDE
        + lines
        + f"""
attempt("personality_query", lambda: syscall({NR["personality"]}, 0xFFFFFFFF))
attempt("kmsg", lambda: open("/proc/kmsg", "rb").read(1))
done()
"""
    )
    r = ran.result
    assert r.pop("personality_query")[0] == "ok"
    assert r == dict.fromkeys(calls, "EPERM") | {"kmsg": "EPERM"}
