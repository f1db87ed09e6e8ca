"""The HTTP gateway: services at ``/http/<service>/...`` behind policy, with credential
injection after the decision. See docs/http-gateway.md."""

from tether.gateways.http.config import HTTPSettings, parse_http_config
from tether.gateways.http.gateway import HTTPGateway, with_http_gateway
from tether.gateways.http.mount import build_http_gateway, mount_http_gateway

__all__ = [
    "HTTPGateway",
    "HTTPSettings",
    "build_http_gateway",
    "mount_http_gateway",
    "parse_http_config",
    "with_http_gateway",
]
