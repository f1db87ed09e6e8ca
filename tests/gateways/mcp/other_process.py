"""A second gateway *process* on the same data directory, for the cross-process session test.

It shares what a scale-out replica shares: the store (sessions, pins) and the trust bundle.
It keeps its own audit recorder (the audit log allows one writer per data directory; two
processes writing one log would collide on the log, not on sessions) and a grants-only core.

    python other_process.py HOME BUNDLE_JSON TABLE_JSON  -> prints the port, then serves
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvicorn

from tether.config import DataDir
from tether.events import MemoryRecorder
from tether.gateways.mcp.config import parse_mcp_config
from tether.gateways.mcp.gateway import MCPGateway, with_mcp_gateway
from tether.identity.bundle import parse_bundle
from tether.identity.revocation import RevocationList
from tether.identity.verifier import Verifier
from tether.policy.core import DecisionCore, GrantsAuthorizer
from tether.store.mcp import MCPStore


async def not_found(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def main() -> None:
    home, bundle_doc, table = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    dd = DataDir(home)
    cfg = dd.load_config()
    verifier = Verifier(
        parse_bundle(bundle_doc, cfg.trust_domain),
        audience=cfg.audience,
        revocations=RevocationList(),
    )
    gw = MCPGateway(
        parse_mcp_config(table, env={}),
        verify=verifier.verify,
        core=DecisionCore(GrantsAuthorizer()),
        audit=MemoryRecorder(),
        store=MCPStore(dd.db_path),
        owns_store=True,
    )
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    server = uvicorn.Server(
        uvicorn.Config(with_mcp_gateway(not_found, gw), log_level="warning", lifespan="off")
    )

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            await gw.aclose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
