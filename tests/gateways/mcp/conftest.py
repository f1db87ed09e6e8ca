"""Fixtures for the MCP gateway: real services (audit log, Cedar core, approvals, store), SDK
upstream servers on real uvicorn servers (streamable HTTP) and as a stdio child, the gateway
on its own real uvicorn server, and the official SDK client talking to it over TCP."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.gateways.mcp.servers import DbServer, Liar, Served
from tether.gateways.mcp.config import parse_mcp_config
from tether.gateways.mcp.gateway import MCPGateway, with_mcp_gateway
from tether.server.services import Services
from tether.store.mcp import MCPStore

STDIO_SERVER = Path(__file__).with_name("stdio_server.py")
DEFAULT_GRANTS = ["tool:db.read_rows", "tool:db.create_index", "tool:db.slow", "tool:files.*"]


async def not_found(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class Running:
    gw: MCPGateway
    served: Served

    @property
    def base(self) -> str:
        return self.served.url

    def url(self, server: str = "db") -> str:
        return f"{self.served.url}/mcp/{server}"


def serve_gateway(services: Services, table: dict[str, Any], **kw: Any) -> Running:
    gw = MCPGateway(
        parse_mcp_config(table, env=kw.pop("env", {})),
        verify=services.verifier.verify,
        core=kw.pop("core", services.core),
        audit=kw.pop("audit", services.audit),
        store=MCPStore(services.data_dir.db_path),
        owns_store=True,
        **kw,
    )
    served = Served(with_mcp_gateway(not_found, gw), on_close=gw.aclose).start()
    return Running(gw, served)


@pytest.fixture
def db() -> Iterator[DbServer]:
    yield DbServer()


@pytest.fixture
def db_served(db: DbServer) -> Iterator[Served]:
    s = Served(db.app(), lifespan="on").start()
    yield s
    s.stop()


@pytest.fixture
def liar() -> Liar:
    return Liar()


@pytest.fixture
def liar_served(liar: Liar) -> Iterator[Served]:
    s = Served(liar).start()
    yield s
    s.stop()


@pytest.fixture
def table(db_served: Served) -> dict[str, Any]:
    return {
        "escalation_hold": "0s",
        "servers": {
            "db": {
                "url": db_served.url + "/mcp",
                "timeout": "10s",
                "effects": {"create_index": "db.schema_change"},
            },
            "files": {"command": [sys.executable, str(STDIO_SERVER)], "timeout": "20s"},
        },
    }


@pytest.fixture
def gateway(services: Services, table: dict[str, Any]) -> Iterator[Running]:
    r = serve_gateway(services, table)
    yield r
    r.served.stop()


@pytest.fixture
def mint(services: Services, admin_token: str) -> Callable[..., str]:
    admin = services.verifier.verify(admin_token)

    def mint(
        grants: list[str] | None = None, task: str | None = "task-1", name: str = "bot"
    ) -> str:
        return services.authority.delegate(
            admin, name, DEFAULT_GRANTS if grants is None else grants, task=task
        ).token

    return mint


@pytest.fixture
def token(mint: Callable[..., str]) -> str:
    return mint()


@asynccontextmanager
async def mcp_client(url: str, token: str | None, **kw: Any) -> AsyncIterator[Client]:
    """The official SDK client over streamable HTTP, with the agent's token as its only
    credential (default ``mode="auto"``: it probes ``server/discover`` and falls back)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0))
    async with (
        http,
        Client(streamable_http_client(url, http_client=http), cache=None, **kw) as client,
    ):
        yield client
