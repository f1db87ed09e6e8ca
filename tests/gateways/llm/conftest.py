"""Fixtures for the LLM gateway: real services (audit log, verifier), the scripted model as
upstream, and official SDK clients wired to the gateway in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import LLMGateway
from tether.gateways.llm.scripted import ScriptedModel
from tether.gateways.llm.upstream import streaming_asgi_transport
from tether.policy.core import DecisionCore
from tether.server.services import Services
from tether.store.usage import UsageLedger

DEFAULT_GRANTS = ["model:tether-scripted-1", "model:gpt-*", "tool:get_weather", "tool:search"]


@pytest.fixture
def scripted() -> ScriptedModel:
    return ScriptedModel()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[UsageLedger]:
    led = UsageLedger(tmp_path / "usage.db")
    yield led
    led.close()


@pytest.fixture
def core(services: Services) -> DecisionCore:
    """The server's real decision core: Cedar (default policies), groups, limits, approvals."""
    return services.core


@pytest.fixture
def llm_table() -> dict[str, Any]:
    return {
        "providers": {"scripted": {"kind": "scripted"}},
        "routes": [
            {"model": "tether-scripted-1", "provider": "scripted"},
            {
                "model": "gpt-*",
                "provider": "scripted",
                "upstream_model": "tether-scripted-1",
                "usd_per_mtok_in": 1000,
                "usd_per_mtok_out": 2000,
            },
        ],
    }


@pytest.fixture
async def gateway(
    services: Services,
    core: DecisionCore,
    ledger: UsageLedger,
    scripted: ScriptedModel,
    llm_table: dict[str, Any],
) -> AsyncIterator[LLMGateway]:
    gw = LLMGateway(
        parse_llm_config(llm_table, env={}),
        verify=services.verifier.verify,
        core=core,
        audit=services.audit,
        ledger=ledger,
        transports={"scripted": streaming_asgi_transport(scripted)},
    )
    yield gw
    await gw.aclose()


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


def http_for(gw: LLMGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=streaming_asgi_transport(gw), base_url="http://tether")


@pytest.fixture
async def oai(gateway: LLMGateway, token: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with http_for(gateway) as h:
        yield openai.AsyncOpenAI(
            base_url="http://tether/v1", api_key=token, http_client=h, max_retries=0
        )


@pytest.fixture
async def claude(gateway: LLMGateway, token: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with httpx2.AsyncClient(
        transport=streaming_asgi_transport(gateway, httpx2), base_url="http://tether"
    ) as h:
        yield anthropic.AsyncAnthropic(
            base_url="http://tether", api_key=token, http_client=h, max_retries=0
        )
