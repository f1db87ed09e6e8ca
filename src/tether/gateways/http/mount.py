"""The integration seam: build the gateway from a running :class:`Services` and put it in
front of the server's app (same port; ``/http/...`` never collides with the API's paths)."""

from __future__ import annotations

from typing import Any

from tether.gateways.http.config import parse_http_config
from tether.gateways.http.gateway import ASGIApp, HTTPGateway, with_http_gateway
from tether.policy.core import DecisionCore

__all__ = ["build_http_gateway", "mount_http_gateway"]


def build_http_gateway(services: Any, *, core: DecisionCore | None = None) -> HTTPGateway:
    """The gateway for ``services``: its verifier, audit log, ``[http]`` config and ``core``
    (default: ``services.core``). Credentials are read now (from the environment or secret
    files); a missing one is a ConfigError naming the service. Close with ``await
    gateway.aclose()``."""
    settings = parse_http_config(services.config.extra.get("http"))
    return HTTPGateway(
        settings,
        verify=services.verifier.verify,
        core=core if core is not None else services.core,
        audit=services.audit,
    )


def mount_http_gateway(app: ASGIApp, gateway: HTTPGateway) -> ASGIApp:
    """``app`` with ``/http/...`` served by ``gateway`` (see ``with_http_gateway``)."""
    return with_http_gateway(app, gateway)
