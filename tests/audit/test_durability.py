"""kill -9 under write load loses no acknowledged event, and the log verifies after restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tether.audit import AuditLog
from tether.audit.note import NoteSigner, NoteVerifier
from tether.events import Event

ORIGIN = "example.org/tether/audit"
SEED = b"\x2a" * 32

# The writer process: 16 threads record as fast as they can; each acknowledged index is printed
# (and flushed) only after record() returned, i.e. after the commit was durable.
WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from tether.audit import AuditLog
    from tether.audit.note import NoteSigner
    from tether.events import Event

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[3]))
    signer = NoteSigner(sys.argv[2], key)
    log = AuditLog(Path(sys.argv[1]), signer, sys.argv[2], checkpoint_interval=0.02)
    log.start()
    out = threading.Lock()

    def work(t):
        i = 0
        while True:
            r = log.record(Event(type="load", session=f"t{t}", data={"t": t, "i": i},
                                 bodies={"b": f"{t}-{i}".encode()} if i % 5 == 0 else {}))
            with out:
                sys.stdout.write(f"{r.index} {t} {i}\\n")
                sys.stdout.flush()
            i += 1

    for t in range(16):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


def run_and_kill(db: Path, min_acks: int) -> dict[int, tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), ORIGIN, SEED.hex()],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: dict[int, tuple[int, int]] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            idx, t, i = map(int, line.split())
            acked[idx] = (t, i)
            if len(acked) >= min_acks:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
    for line in rest.decode().splitlines():
        parts = line.split()
        if len(parts) == 3:  # a line cut by the kill is not an acknowledgement we saw
            idx, t, i = map(int, parts)
            acked[idx] = (t, i)
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(SEED))
    acked = run_and_kill(db, 3000)
    acked.update(run_and_kill(db, 1000))  # a second crash on top of the recovered first

    with AuditLog(db, signer, ORIGIN) as log:  # reopening runs the crash checks
        size = log.size()
        assert size >= len(acked)
        for idx, (t, i) in acked.items():
            assert log.entry(idx)["data"] == {"t": t, "i": i}
        report = log.verify()
        assert report.size == size
        after = log.record(Event(type="after.restart"))
        assert after.index == size
    final = AuditLog.open_readonly(db, NoteVerifier.from_vkey(signer.verifier_key), ORIGIN)
    report = final.verify()
    assert report.size == size + 1 and report.unsigned == 0
    final.close()
