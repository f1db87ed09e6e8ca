from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

from tether.gateways.llm.gateway import with_llm_gateway
from tether.gateways.llm.mount import build_llm_gateway
from tether.gateways.llm.upstream import streaming_asgi_transport
from tether.server.app import create_app
from tether.server.routes_usage import usage_router
from tether.server.services import Services
from tether.store.usage import UsageLedger


async def test_mounted_gateway_and_usage_route(
    services: Services, admin_token: str, mint: Callable[..., str]
) -> None:
    gw = build_llm_gateway(services)  # no [llm] table: the scripted model serves everything
    app: FastAPI = create_app(services)
    app.include_router(usage_router(gw.ledger))
    asgi = with_llm_gateway(app, gw)
    try:
        async with httpx.AsyncClient(
            transport=streaming_asgi_transport(asgi), base_url="http://tether"
        ) as h:
            tok = mint(["model:tether-scripted-1"], task="t-9")
            c = openai.AsyncOpenAI(
                base_url="http://tether/v1", api_key=tok, http_client=h, max_retries=0
            )
            r = await c.chat.completions.create(
                model="tether-scripted-1", messages=[{"role": "user", "content": "hi"}]
            )
            assert "[scripted model]" in (r.choices[0].message.content or "")
            who = await h.get("/v1/whoami", headers={"authorization": f"Bearer {admin_token}"})
            assert who.status_code == 200  # the rest of the API still answers
            u = await h.get(
                "/v1/usage",
                params={"by": "task"},
                headers={"authorization": f"Bearer {admin_token}"},
            )
            assert u.status_code == 200
            assert u.json()["usage"][0]["task"] == "t-9"
            mine = await h.get("/v1/usage", headers={"authorization": f"Bearer {tok}"})
            assert [row["identity"] for row in mine.json()["usage"]] == [
                str(services.verifier.verify(tok).subject)
            ]
    finally:
        await gw.aclose()


def test_ledger_persists_spent_budget(
    tmp_path: Path, services: Services, mint: Callable[..., str]
) -> None:
    claims = services.verifier.verify(mint(["model:*", "budget:tokens=100"]))
    led = UsageLedger(tmp_path / "u.db")
    res = led.reserve(claims, 60, None)
    led.settle(
        res,
        claims,
        model="m",
        provider="p",
        api="chat",
        status="ok",
        input_tokens=30,
        output_tokens=30,
        usd=Decimal(0),
    )
    led.close()
    led2 = UsageLedger(tmp_path / "u.db")
    try:
        from tether.store.usage import BudgetExceeded

        with pytest.raises(BudgetExceeded):
            led2.reserve(claims, 50, None)
        led2.release(led2.reserve(claims, 40, None))
    finally:
        led2.close()
