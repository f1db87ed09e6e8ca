"""A revocation made by the server reaches a verifier in another process sharing the store."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tether.server.services import Services

WATCHER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from tether.config import DataDir
    from tether.errors import TokenRevoked
    from tether.identity.bundle import parse_bundle
    from tether.identity.revocation import RevocationList
    from tether.identity.verifier import Verifier
    from tether.store import Store
    from tether.store.revocations import RevocationPoller

    home, token = Path(sys.argv[1]), sys.stdin.read().strip()
    dd = DataDir(home)
    cfg = dd.load_config()
    bundle = parse_bundle(json.loads(sys.argv[2]), cfg.trust_domain)
    revs = RevocationList()
    poller = RevocationPoller(Store(dd.db_path), revs)
    verifier = Verifier(bundle, audience=cfg.audience, revocations=revs)
    verifier.verify(token)
    print("verified", flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            verifier.verify(token)
        except TokenRevoked as e:
            print("revoked:", e.message, flush=True)
            sys.exit(0)
        time.sleep(0.01)
    print("still valid", flush=True)
    sys.exit(1)
    """
)


def test_revocation_reaches_another_process(
    services: Services, admin_token: str, home: Path
) -> None:
    admin = services.verifier.verify(admin_token)
    agent = services.authority.delegate(admin, "remote", ["model:*"], ttl=600)
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(home), json.dumps(services.bundle_doc)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(agent.token)
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "verified"
    services.authority.revoke(admin, "agent", str(agent.claims.subject), "cross-process test")
    out = proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=30) == 0, out + err
    assert "revoked:" in out and agent.token not in out + err
