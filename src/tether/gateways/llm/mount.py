"""The integration seam: build the gateway from a running :class:`Services` and put it in
front of the server's FastAPI app (same port; the four LLM paths never collide with /v1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import ASGIApp, LLMGateway, with_llm_gateway
from tether.gateways.llm.inspect import Inspector
from tether.policy.core import DecisionCore
from tether.store.usage import UsageLedger

__all__ = ["USAGE_DB", "build_llm_gateway", "mount_llm_gateway"]

USAGE_DB = "usage.db"


def build_llm_gateway(
    services: Any, *, core: DecisionCore | None = None, inspectors: Sequence[Inspector] = ()
) -> LLMGateway:
    """The gateway for ``services``: its verifier, audit log and ``[llm]`` config, a usage
    ledger in ``<data dir>/usage.db``, and ``core`` (default: ``services.core`` when the
    server has one, else grants only). Close it with ``await gateway.aclose()``."""
    settings = parse_llm_config(services.config.extra.get("llm"))
    if core is None:
        core = services.core
    ledger = UsageLedger(services.data_dir.root / USAGE_DB, services.clock)
    return LLMGateway(
        settings,
        verify=services.verifier.verify,
        core=core,
        audit=services.audit,
        ledger=ledger,
        inspectors=inspectors,
        owns_ledger=True,
    )


def mount_llm_gateway(app: ASGIApp, gateway: LLMGateway) -> ASGIApp:
    """``app`` with the LLM paths served by ``gateway`` (see ``with_llm_gateway``)."""
    return with_llm_gateway(app, gateway)
