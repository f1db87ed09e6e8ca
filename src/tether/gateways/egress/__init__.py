"""The egress gateway: HTTP CONNECT (and absolute-form http://) for agents, one
``egress.connect`` Action per connection. See docs/egress.md."""

from tether.gateways.egress.config import EgressSettings, parse_egress_config
from tether.gateways.egress.gateway import EgressGateway, EgressListener, egress_grant
from tether.gateways.egress.mount import build_egress_gateway

__all__ = [
    "EgressGateway",
    "EgressListener",
    "EgressSettings",
    "build_egress_gateway",
    "egress_grant",
    "parse_egress_config",
]
