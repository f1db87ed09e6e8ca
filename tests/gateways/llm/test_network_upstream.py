"""The gateway against an upstream on a real socket: the pooled network client (aiohttp) that
production uses, as opposed to the in-process transport most gateway tests use. Same
behaviour is expected of both: answers, streams, timeouts, unreachable upstreams, garbage,
client disconnects, key injection, and no state carried from one agent's call to another's."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest

from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import LLMGateway
from tether.gateways.llm.scripted import MODEL_ID, ScriptedModel
from tether.server.services import Services
from tether.store.usage import UsageLedger

from .conftest import http_for

USER = {"role": "user", "content": "hello there"}
UPSTREAM_KEY = "sk-upstream-network-test-0123456789"


class CookieSettingModel(ScriptedModel):
    """A scripted model that sets a session cookie on every answer, like some hosted APIs:
    a gateway with a shared cookie jar would carry one agent's cookie into the next call."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_cookie(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg["headers"], (b"set-cookie", b"sid=agent-a; Path=/")]}
            await send(msg)

        await super().__call__(scope, receive, send_with_cookie)


@pytest.fixture
def model() -> Iterator[tuple[ScriptedModel, str]]:
    m = CookieSettingModel(api_key=UPSTREAM_KEY)
    with m.running() as url:
        yield m, url


def _gateway(services: Services, ledger: UsageLedger, base: str, **extra: Any) -> LLMGateway:
    table = {
        "providers": {
            "net": {"kind": "openai-compatible", "base_url": base, "api_key_env": "UP_KEY"}
        },
        "routes": [{"model": MODEL_ID, "provider": "net"}],
        **extra,
    }
    return LLMGateway(
        parse_llm_config(table, env={"UP_KEY": UPSTREAM_KEY}),
        verify=services.verifier.verify,
        core=services.core,
        audit=services.audit,
        ledger=ledger,
    )


@pytest.fixture
async def net_gateway(
    services: Services, ledger: UsageLedger, model: tuple[ScriptedModel, str]
) -> AsyncIterator[LLMGateway]:
    gw = _gateway(services, ledger, model[1] + "/v1")
    yield gw
    await gw.aclose()


async def _client(gw: LLMGateway, token: str) -> tuple[openai.AsyncOpenAI, Any]:
    h = http_for(gw)
    return openai.AsyncOpenAI(
        base_url="http://tether/v1", api_key=token, http_client=h, max_retries=0
    ), h


async def test_answers_and_streams_over_the_network(
    net_gateway: LLMGateway,
    model: tuple[ScriptedModel, str],
    mint: Callable[..., str],
    services: Services,
) -> None:
    token = mint()
    c, h = await _client(net_gateway, token)
    async with h:
        r = await c.chat.completions.create(model=MODEL_ID, messages=[USER])
        assert r.choices[0].message.content == "[scripted model] you said: hello there"
        parts = [
            ch.choices[0].delta.content or ""
            async for ch in await c.chat.completions.create(
                model=MODEL_ID, messages=[USER], stream=True
            )
            if ch.choices
        ]
        assert "".join(parts) == "[scripted model] you said: hello there"
    seen = list(model[0].requests)
    assert len(seen) == 2
    for req in seen:  # the upstream key was injected; the agent's token never left Tether
        assert req.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert token not in str(req.headers)
    await net_gateway.drain()
    statuses = [e["data"]["status"] for e in services.audit.search(type="llm.response")]
    assert statuses == ["ok", "ok"]


async def test_no_cookie_travels_from_one_call_to_the_next(
    net_gateway: LLMGateway, model: tuple[ScriptedModel, str], mint: Callable[..., str]
) -> None:
    for name in ("agent-a", "agent-b"):
        c, h = await _client(net_gateway, mint(name=name))
        async with h:
            await c.chat.completions.create(model=MODEL_ID, messages=[USER])
    assert [r.headers.get("cookie") for r in model[0].requests] == [None, None]


async def test_unreachable_upstream_is_a_502_in_openai_shape(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = _gateway(services, ledger, f"http://127.0.0.1:{port}/v1")
    try:
        c, h = await _client(gw, mint())
        async with h:
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model=MODEL_ID, messages=[USER])
        assert e.value.status_code == 502
        assert e.value.code == "upstream_unreachable"
        await gw.drain()
    finally:
        await gw.aclose()
    last = services.audit.search(type="llm.response", limit=5)[-1]
    assert last["data"]["status"] == "upstream_unreachable"


async def test_hanging_upstream_times_out(
    services: Services,
    ledger: UsageLedger,
    model: tuple[ScriptedModel, str],
    mint: Callable[..., str],
) -> None:
    gw = _gateway(
        services, ledger, model[1] + "/v1", read_timeout="0.3s", stream_idle_timeout="0.3s"
    )
    try:
        c, h = await _client(gw, mint())
        async with h:
            model[0].hang_after = 0  # sends nothing at all
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model=MODEL_ID, messages=[USER])
            assert e.value.status_code == 504 and e.value.code == "upstream_timeout"
            model[0].hang_after = 2  # a stream that stalls after two events
            with pytest.raises(openai.APIError) as e2:
                async for _ in await c.chat.completions.create(
                    model=MODEL_ID, messages=[USER], stream=True
                ):
                    pass
            assert "idle" in str(e2.value)
        await gw.drain()
    finally:
        await gw.aclose()
    statuses = [e["data"]["status"] for e in services.audit.search(type="llm.response")]
    assert statuses[-2:] == ["upstream_timeout", "upstream_timeout"]


async def test_garbage_from_the_network_is_a_502(
    net_gateway: LLMGateway, model: tuple[ScriptedModel, str], mint: Callable[..., str]
) -> None:
    model[0].garbage = "text"
    c, h = await _client(net_gateway, mint())
    async with h:
        with pytest.raises(openai.APIStatusError) as e:
            await c.chat.completions.create(model=MODEL_ID, messages=[USER])
    assert e.value.status_code == 502 and e.value.code == "upstream_garbage"


async def test_client_disconnect_closes_the_upstream_connection(
    net_gateway: LLMGateway, model: tuple[ScriptedModel, str], mint: Callable[..., str]
) -> None:
    model[0].chunk_delay = 0.05
    async with http_for(net_gateway) as h:
        async with h.stream(
            "POST",
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {mint()}"},
            json={
                "model": MODEL_ID,
                "stream": True,
                "messages": [{"role": "user", "content": "a b c d e f g h i j"}],
            },
        ) as r:
            async for _ in r.aiter_bytes():
                break
    for _ in range(100):
        if model[0].stats.disconnects:
            break
        await asyncio.sleep(0.05)
    assert model[0].stats.disconnects == 1
