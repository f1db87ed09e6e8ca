"""`make demo`: Tether's main job end to end on the embedded defaults.

Starts a real server on a fresh data directory (.demo/), then, with the real `tether` command:
a human identity, a two-hop delegated agent token and its chain, a refused widening with the
reason, a revocation that bites, the session timeline and a verification of the audit log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
HOME = DEMO / "home"
TETHER = [sys.executable, "-m", "tether.cli.main"]
ENV = {**os.environ, "TETHER_HOME": str(HOME)}
ENV.pop("TETHER_ADDR", None)
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def tether(*args: str, expect_fail: bool = False) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in args).replace(str(DEMO) + "/", "")
    print(f"{DIM}$ tether {shown}{RESET}", flush=True)
    proc = subprocess.run([*TETHER, *args], env=ENV, cwd=DEMO)
    if (proc.returncode != 0) != expect_fail:
        raise SystemExit(f"demo step failed unexpectedly: tether {shown}")


def wait_ready(server: subprocess.Popen[bytes]) -> None:
    sock = HOME / "tether.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited; see .demo/server.log")
        if sock.exists():
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
                    if c.get("http://tether/readyz").status_code == 200:
                        return
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    raise SystemExit("the server did not become ready in 30 s; see .demo/server.log")


def main() -> None:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    say("1. Initialise a trust domain (keys 0600, SQLite store, audit log, first admin)")
    tether("init", "--trust-domain", "demo.tether.local")

    say("2. Start the server (authority + API + audit log), on TCP and a unix socket")
    log = (DEMO / "server.log").open("w")
    server = subprocess.Popen(
        [*TETHER, "serve", "--listen", "127.0.0.1:0"], env=ENV, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(server)
        print("server ready")

        say("3. Who am I? The human at the root of every delegation")
        tether("whoami")

        say("4. Delegate to an agent: narrow grants, a budget, a TTL and an attested objective")
        tether(
            "delegate",
            "--agent",
            "planner",
            "--grant",
            "model:gpt-4o*",
            "--grant",
            "tool:search.*",
            "--grant",
            "budget:tokens=20000",
            "--ttl",
            "20m",
            "--objective",
            "Produce the weekly churn-risk report from the customers DB",
            "--task",
            "churn-report-42",
            "--out",
            str(DEMO / "planner.jwt"),
        )

        say("5. The agent delegates onward to a sub-agent, narrowing again (hop 2)")
        tether(
            "delegate",
            "--agent",
            "researcher",
            "--from-token",
            str(DEMO / "planner.jwt"),
            "--grant",
            "model:gpt-4o-mini",
            "--grant",
            "tool:search.web",
            "--ttl",
            "10m",
            "--out",
            str(DEMO / "researcher.jwt"),
        )

        say("6. The sub-agent's identity carries its whole chain back to the human")
        tether("whoami", "--token", str(DEMO / "researcher.jwt"))

        say("7. A sub-agent cannot widen what it was given: refused, with the reason")
        tether(
            "delegate",
            "--agent",
            "rogue",
            "--from-token",
            str(DEMO / "researcher.jwt"),
            "--grant",
            "model:*",
            expect_fail=True,
        )

        say("8. Revoke the planner's token: everything delegated from it dies with it")
        tether("revoke", "--token", str(DEMO / "planner.jwt"), "--reason", "demo incident")
        tether("whoami", "--token", str(DEMO / "researcher.jwt"), expect_fail=True)

        say("9. The session timeline, from the tamper-evident audit log")
        tether("audit", "session", "churn-report-42")

        say("10. Verify the whole log: Merkle tree, signed checkpoints")
        time.sleep(0.6)  # let the checkpointer sign the latest entries
        tether("audit", "verify")
        tether("audit", "checkpoint", "--out", str(DEMO / "checkpoint.txt"))
        tether("audit", "export", "--format", "jsonl", "--out", str(DEMO / "export.jsonl"))

        say("11. An auditor checks the export with no Tether code (stdlib + cryptography)")
        vkey = (HOME / "keys" / "audit-note.vkey").read_text().strip()
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "verify_log.py"),
            "--log",
            str(DEMO / "export.jsonl"),
            "--checkpoint",
            str(DEMO / "checkpoint.txt"),
            "--key",
            vkey,
        ]
        shown = "--log export.jsonl --checkpoint checkpoint.txt"
        print(f"{DIM}$ python tools/verify_log.py {shown} --key '{vkey}'{RESET}")
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("standalone verification failed")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    say("Done. Everything above is in .demo/ (data dir .demo/home).")


if __name__ == "__main__":
    main()
