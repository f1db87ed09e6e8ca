"""Runs the app with uvicorn on TCP and on a unix socket in the data directory at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from tether.errors import ConfigError
from tether.gateways.egress.mount import build_egress_gateway
from tether.gateways.http import HTTPGateway, build_http_gateway, with_http_gateway
from tether.gateways.llm.gateway import LLMGateway, with_llm_gateway
from tether.gateways.llm.mount import build_llm_gateway
from tether.gateways.mcp.gateway import MCPGateway, with_mcp_gateway
from tether.gateways.mcp.mount import build_mcp_gateway
from tether.runtime.supervisor import BeamSupervisor
from tether.server.app import create_app
from tether.server.routes_tools import tools_router
from tether.server.routes_usage import usage_router
from tether.server.services import Services

__all__ = ["Gateways", "bind_sockets", "build_server_app", "serve"]

log = logging.getLogger(__name__)


def _tcp_socket(listen: str) -> socket.socket:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid listen address {listen!r} (use HOST:PORT)")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and accepted sockets inherit it. With proto 0, a keep-alive client that
    # writes headers and body separately waits ~40 ms for a delayed ACK on every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _unix_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        # A socket left by a server that died: only replace it if nothing answers on it.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise ConfigError(f"another Tether server is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is the owner's alone
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_sockets(services: Services, listen: str | None) -> list[socket.socket]:
    tcp = _tcp_socket(listen or services.config.listen)
    try:
        return [tcp, _unix_socket(services.data_dir.socket_path)]
    except Exception:
        tcp.close()
        raise


@dataclass
class Gateways:
    """The enforcement points served on the API's port, closed together."""

    llm: LLMGateway
    http: HTTPGateway
    mcp: MCPGateway

    async def aclose(self) -> None:
        for gw in (self.mcp, self.http, self.llm):  # upstream pools, ledgers' last writes
            try:
                await gw.aclose()
            except Exception as e:  # one failing close must not skip the others
                log.warning("closing %s failed: %s", type(gw).__name__, type(e).__name__)


def build_server_app(
    services: Services, beams: BeamSupervisor | None = None
) -> tuple[ASGIApp, Gateways]:
    """The whole server on one port: the gateways' fast paths (``/mcp/<server>``,
    ``/http/<service>/...``, and the LLM gateway's ``/v1/chat/completions``,
    ``/v1/responses``, ``/v1/models``, ``/v1/messages``) in front of the FastAPI app
    (identity, audit, approvals, usage, beams, tools). A bad ``[llm]``, ``[http]`` or
    ``[mcp]`` table is a ConfigError here, before anything listens."""
    app = create_app(services)
    llm = build_llm_gateway(services)
    app.include_router(usage_router(llm.ledger))
    http = build_http_gateway(services)
    mcp = build_mcp_gateway(services)
    app.include_router(tools_router(mcp.store))  # /v1/tools: pinned MCP tool definitions
    server_app = with_mcp_gateway(with_http_gateway(with_llm_gateway(app, llm), http), mcp)
    if beams is not None:  # /v1/beams; each beam's bridge socket serves this same app
        app.state.beams = beams
        beams.bridge_app = server_app
    return server_app, Gateways(llm, http, mcp)


def serve(root: Path, listen: str | None = None, log_level: str = "warning") -> None:
    services = Services(root)
    try:
        sockets = bind_sockets(services, listen)
        egress = build_egress_gateway(services)  # a unix socket per beam with --allow-domain
        beams = BeamSupervisor(services, egress=egress)
        app, gateways = build_server_app(services, beams)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            server_header=False,
            # Never take a client's address from X-Forwarded-For: identity is the token, and
            # records name the real peer. (It also costs a middleware call per request.)
            proxy_headers=False,
        )
        server = uvicorn.Server(config)

        async def run() -> None:
            # reaps what a crashed run left; ends every beam as soon as the server stops
            await beams.start(should_exit=lambda: server.should_exit)
            try:
                await server.serve(sockets=sockets)
            finally:
                await beams.aclose()  # every beam killed and its end recorded, log still open
                await egress.aclose()
                await gateways.aclose()

        # uvicorn's loop (uvloop when installed, as uvicorn[standard] does): the gateway's
        # per-request socket work costs about half what it does on asyncio's own loop.
        with (
            contextlib.suppress(KeyboardInterrupt),
            asyncio.Runner(loop_factory=config.get_loop_factory()) as runner,
        ):
            runner.run(run())
    finally:
        services.close()
        with contextlib.suppress(FileNotFoundError):
            services.data_dir.socket_path.unlink()
