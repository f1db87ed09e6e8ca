"""The integration seam: build the egress gateway from a running :class:`Services`.

The server (or the beam lifecycle) then opens listeners on it: a unix socket per beam with
the beam's claims bound (``await gateway.serve_unix(path, claims=beam_claims)``), and, when
``[egress] listen`` is set, one TCP listener where each client presents its token.
"""

from __future__ import annotations

from typing import Any

from tether.gateways.egress.addresses import Resolver
from tether.gateways.egress.config import parse_egress_config
from tether.gateways.egress.gateway import EgressGateway, recheck_with
from tether.policy.core import DecisionCore

__all__ = ["build_egress_gateway"]


def build_egress_gateway(
    services: Any, *, core: DecisionCore | None = None, resolver: Resolver | None = None
) -> EgressGateway:
    """The gateway for ``services``: its verifier, decision core, audit log and ``[egress]``
    config (raises ConfigError naming the bad key). Close it with ``await gateway.aclose()``."""
    settings = parse_egress_config(services.config.extra.get("egress"))
    return EgressGateway(
        settings,
        verify=services.verifier.verify,
        core=core if core is not None else services.core,
        audit=services.audit,
        recheck=recheck_with(services.verifier),
        resolver=resolver,
    )
