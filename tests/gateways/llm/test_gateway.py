"""The gateway against the official SDKs and raw HTTP: streaming, tool calls, refusals,
audit, budgets, bad input and failing upstreams. The upstream is the scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest

from tether.events import MemoryRecorder
from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import LLMGateway
from tether.gateways.llm.scripted import ScriptedModel
from tether.gateways.llm.upstream import streaming_asgi_transport
from tether.policy.action import Action
from tether.policy.core import DecisionCore, GrantsAuthorizer
from tether.policy.interfaces import Verdict
from tether.server.services import Services
from tether.store.usage import UsageLedger

from .conftest import http_for

FIXTURES = Path(__file__).parent / "fixtures"
USER = {"role": "user", "content": "hello there"}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
DEPLOY_TOOL = {
    "type": "function",
    "function": {"name": "deploy", "parameters": {"type": "object", "properties": {}}},
}


def _chat_tools(*names: str) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in names
    ]


# -- OpenAI Chat -------------------------------------------------------------------------------


async def test_chat_stream_text(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="tether-scripted-1", messages=[USER], stream=True
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(parts) > 2
    assert "".join(parts) == "[scripted model] you said: hello there"


async def test_chat_stream_usage_only_when_asked(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="tether-scripted-1",
        messages=[USER],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage async for c in stream if c.usage]
    assert usage and usage[0].completion_tokens > 0


async def test_chat_tool_call_allowed_and_denied(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(
        model="tether-scripted-1",
        messages=[{"role": "user", "content": 'use get_weather with {"city": "Oslo"}'}],
        tools=_chat_tools("get_weather"),
    )
    assert r.choices[0].finish_reason == "tool_calls"
    tc = r.choices[0].message.tool_calls
    assert tc and tc[0].function.name == "get_weather"
    assert orjson.loads(tc[0].function.arguments) == {"city": "Oslo"}

    r = await oai.chat.completions.create(
        model="tether-scripted-1",
        messages=[{"role": "user", "content": "call deploy"}],
        tools=_chat_tools("deploy"),
    )
    msg = r.choices[0].message
    assert not msg.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert msg.content and "[tether] tool call deploy denied" in msg.content


async def test_chat_stream_tool_calls_mixed(oai: openai.AsyncOpenAI) -> None:
    """Parallel calls, one allowed one denied: the SDK's stream accumulator still parses."""
    async with oai.chat.completions.stream(
        model="tether-scripted-1",
        messages=[
            {"role": "user", "content": 'call deploy and use get_weather with {"city": "Rome"}'}
        ],
        tools=_chat_tools("deploy", "get_weather"),
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    msg = final.choices[0].message
    assert [t.function.name for t in msg.tool_calls or []] == ["get_weather"]
    assert orjson.loads((msg.tool_calls or [])[0].function.arguments) == {"city": "Rome"}
    assert "[tether] tool call deploy denied" in (msg.content or "")
    assert final.choices[0].finish_reason == "tool_calls"


async def test_chat_stream_only_denied_tool_finishes_stop(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="tether-scripted-1",
        messages=[{"role": "user", "content": "call deploy"}],
        tools=_chat_tools("deploy"),
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls


# -- Responses ---------------------------------------------------------------------------------


async def test_responses_plain_and_stream(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="tether-scripted-1", input="hello there")
    assert r.output_text == "[scripted model] you said: hello there"
    async with oai.responses.stream(model="tether-scripted-1", input="hello again") as s:
        final = await s.get_final_response()
    assert final.output_text == "[scripted model] you said: hello again"


async def test_responses_function_call_denied_in_stream(oai: openai.AsyncOpenAI) -> None:
    tools: Any = [
        {"type": "function", "name": "deploy", "parameters": {"type": "object"}},
        {"type": "function", "name": "search", "parameters": {"type": "object"}},
    ]
    async with oai.responses.stream(
        model="tether-scripted-1", input="call deploy and call search", tools=tools
    ) as s:
        events = [e async for e in s]
        final = await s.get_final_response()
    kinds = [o.type for o in final.output]
    assert "function_call" in kinds
    calls = [o for o in final.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["search"]
    assert "[tether] tool call deploy denied" in final.output_text
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    r = await oai.responses.create(model="tether-scripted-1", input="call deploy", tools=tools)
    assert all(o.type != "function_call" for o in r.output)
    assert "[tether] tool call deploy denied" in r.output_text


# -- Anthropic ---------------------------------------------------------------------------------

ANTH_TOOLS: Any = [
    {"name": "get_weather", "input_schema": {"type": "object"}},
    {"name": "deploy", "input_schema": {"type": "object"}},
]


async def test_messages_stream_text(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="tether-scripted-1",
        max_tokens=100,
        messages=[USER],  # type: ignore[list-item]
    ) as s:
        text = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert "".join(text) == "[scripted model] you said: hello there"
    assert final.usage.output_tokens > 0


async def test_messages_tool_use_allowed_denied(claude: anthropic.AsyncAnthropic) -> None:
    r = await claude.messages.create(
        model="tether-scripted-1",
        max_tokens=200,
        tools=ANTH_TOOLS,
        messages=[{"role": "user", "content": 'use get_weather with {"city": "Oslo"}'}],
    )
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert uses and uses[0].input == {"city": "Oslo"}

    async with claude.messages.stream(
        model="tether-scripted-1",
        max_tokens=200,
        tools=ANTH_TOOLS,
        messages=[{"role": "user", "content": "call deploy"}],
    ) as s:
        final = await s.get_final_message()
    assert all(b.type != "tool_use" for b in final.content)
    assert final.stop_reason == "end_turn"
    texts = " ".join(b.text for b in final.content if b.type == "text")
    assert "[tether] tool call deploy denied" in texts


# -- refusals before anything goes upstream ---------------------------------------------------


async def test_model_outside_grants_zero_upstream(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, scripted: ScriptedModel
) -> None:
    before = scripted.stats.requests
    with pytest.raises(openai.PermissionDeniedError) as e:
        await oai.chat.completions.create(model="claude-opus", messages=[USER])
    assert "claude-opus" in str(e.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        await claude.messages.create(model="o1-secret", max_tokens=5, messages=[USER])  # type: ignore[list-item]
    assert scripted.stats.requests == before


async def test_models_lists_only_granted(gateway: LLMGateway, mint: Callable[..., str]) -> None:
    tok = mint(["model:tether-scripted-1"])
    async with http_for(gateway) as h:
        c = openai.AsyncOpenAI(base_url="http://tether/v1", api_key=tok, http_client=h)
        ids = [m.id async for m in c.models.list()]
        assert ids == ["tether-scripted-1"]
        tok2 = mint(["model:gpt-4o"])
        c2 = openai.AsyncOpenAI(base_url="http://tether/v1", api_key=tok2, http_client=h)
        assert [m.id async for m in c2.models.list()] == ["gpt-4o"]


@pytest.mark.parametrize("bad", ["", "Bearer ", "Bearer not-a-jwt", "Basic abc"])
async def test_bad_tokens(gateway: LLMGateway, bad: str, scripted: ScriptedModel) -> None:
    async with http_for(gateway) as h:
        headers = {"authorization": bad} if bad else {}
        r = await h.post(
            "/v1/chat/completions",
            headers=headers,
            json={"model": "tether-scripted-1", "messages": [USER]},
        )
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert scripted.stats.requests == 0


async def test_sdk_auth_errors(gateway: LLMGateway) -> None:
    async with http_for(gateway) as h:
        c = openai.AsyncOpenAI(
            base_url="http://tether/v1", api_key="nope", http_client=h, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(model="tether-scripted-1", messages=[USER])


async def test_expired_token(
    gateway: LLMGateway, services: Services, mint: Callable[..., str]
) -> None:
    tok = mint()
    claims = services.verifier.verify(tok)
    clock = services.verifier.clock
    services.verifier.clock = type("C", (), {"now": lambda self: claims.expires_at + 3600})()
    try:
        async with http_for(gateway) as h:
            r = await h.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {tok}"},
                json={"model": "tether-scripted-1", "messages": [USER]},
            )
    finally:
        services.verifier.clock = clock
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


# -- bad input (named fixtures) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "status"),
    [
        ("malformed_json.txt", 400),
        ("wrong_types.json", 400),
        ("not_an_object.json", 400),
        ("model_not_string.json", 400),
    ],
)
async def test_bad_bodies(
    gateway: LLMGateway,
    token: str,
    scripted: ScriptedModel,
    services: Services,
    fixture: str,
    status: int,
) -> None:
    async with http_for(gateway) as h:
        r = await h.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            content=(FIXTURES / fixture).read_bytes(),
        )
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert scripted.stats.requests == 0
    assert services.audit.search(type="llm.refused", limit=10)


async def test_duplicate_model_key_decides_what_it_sends(
    gateway: LLMGateway, mint: Callable[..., str], scripted: ScriptedModel
) -> None:
    """orjson keeps the last duplicate; policy decides on that name and it is what goes up."""
    tok = mint(["model:tether-scripted-1"])
    async with http_for(gateway) as h:
        r = await h.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {tok}"},
            content=(FIXTURES / "duplicate_model_key.json").read_bytes(),
        )
    assert r.status_code == 403 and "gpt-secret" in r.json()["error"]["message"]
    assert scripted.stats.requests == 0


async def test_smuggled_model_is_not_routed(
    gateway: LLMGateway, mint: Callable[..., str], scripted: ScriptedModel
) -> None:
    tok = mint(["model:gpt-4o"])
    async with http_for(gateway) as h:
        r = await h.post(
            "/v1/chat/completions?model=forbidden-model",
            headers={"authorization": f"Bearer {tok}"},
            content=(FIXTURES / "smuggled_model.json").read_bytes(),
        )
    assert r.status_code == 200, r.text
    sent = scripted.requests[-1]
    assert sent.body["model"] == "tether-scripted-1"  # the routed upstream name of gpt-4o
    assert sent.body["unknown_field"] == 1  # unknown fields are forwarded
    assert "forbidden-model" not in sent.path


async def test_huge_body(gateway: LLMGateway, token: str, scripted: ScriptedModel) -> None:
    big = {"model": "tether-scripted-1", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    async with http_for(gateway) as h:
        r = await h.post(
            "/v1/chat/completions", headers={"authorization": f"Bearer {token}"}, json=big
        )
    assert r.status_code == 413
    assert scripted.stats.requests == 0


async def test_missing_max_tokens_anthropic(gateway: LLMGateway, token: str) -> None:
    async with http_for(gateway) as h:
        r = await h.post(
            "/v1/messages",
            headers={"x-api-key": token},
            json={"model": "tether-scripted-1", "messages": [USER]},
        )
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


# -- audit -------------------------------------------------------------------------------------


async def test_audit_session_has_prompt_and_response(
    oai: openai.AsyncOpenAI, services: Services, gateway: LLMGateway
) -> None:
    await oai.chat.completions.create(
        model="tether-scripted-1", messages=[{"role": "user", "content": "the secret plan"}]
    )
    stream = await oai.chat.completions.create(
        model="tether-scripted-1",
        messages=[{"role": "user", "content": "streamed words"}],
        stream=True,
    )
    async for _ in stream:
        pass
    await gateway.drain()
    entries = services.audit.session("task-1")
    types = [e["type"] for e in entries]
    assert types.count("llm.invoke") == 2 and types.count("llm.response") == 2
    bodies = b""
    for e in entries:
        for digest in (e.get("bodies") or {}).values():
            bodies += services.audit.body(digest)
    assert b"the secret plan" in bodies and b"streamed words" in bodies
    assert b"you said: the secret plan" in bodies
    assert b"you said: streamed words" in bodies
    resp = [e for e in entries if e["type"] == "llm.response"]
    assert all(e["data"]["usage"]["output_tokens"] > 0 for e in resp)


async def test_fail_closed_when_audit_fails(
    services: Services,
    scripted: ScriptedModel,
    tmp_path: Path,
    mint: Callable[..., str],
    llm_table: dict[str, Any],
) -> None:
    rec = MemoryRecorder()
    rec.fail = True
    led = UsageLedger(tmp_path / "u2.db")
    gw = LLMGateway(
        parse_llm_config(llm_table, env={}),
        verify=services.verifier.verify,
        core=DecisionCore(GrantsAuthorizer()),
        audit=rec,
        ledger=led,
        transports={"scripted": streaming_asgi_transport(scripted)},
    )
    try:
        async with http_for(gw) as h:
            c = openai.AsyncOpenAI(
                base_url="http://tether/v1", api_key=mint(), http_client=h, max_retries=0
            )
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model="tether-scripted-1", messages=[USER])
            assert e.value.status_code == 503
            with pytest.raises(openai.APIStatusError):
                await c.chat.completions.create(
                    model="tether-scripted-1", messages=[USER], stream=True
                )
    finally:
        await gw.aclose()
        led.close()


# -- escalation --------------------------------------------------------------------------------


class EscalatingAuthorizer(GrantsAuthorizer):
    def authorize(self, action: Action, groups: frozenset[str]) -> Verdict:
        if action.resource in ("deploy", "gpt-escalate"):
            return Verdict(
                "escalate", ("deploys need a human",), ("p1",), self.version, quorum="1 of human"
            )
        return super().authorize(action, groups)


class Desk:
    def consume(self, action: Action, policy_version: str) -> str | None:
        return None

    def open(self, action: Action, reasons: tuple[str, ...], quorum: str, v: str) -> str:
        return "apr-42"


async def test_escalation(
    services: Services,
    scripted: ScriptedModel,
    ledger: UsageLedger,
    mint: Callable[..., str],
    llm_table: dict[str, Any],
) -> None:
    core = DecisionCore(EscalatingAuthorizer(), approvals=Desk())
    gw = LLMGateway(
        parse_llm_config(llm_table, env={}),
        verify=services.verifier.verify,
        core=core,
        audit=services.audit,
        ledger=ledger,
        transports={"scripted": streaming_asgi_transport(scripted)},
    )
    try:
        async with http_for(gw) as h:
            c = openai.AsyncOpenAI(
                base_url="http://tether/v1",
                api_key=mint(["model:*", "tool:*"]),
                http_client=h,
                max_retries=0,
            )
            with pytest.raises(openai.PermissionDeniedError) as e:
                await c.chat.completions.create(model="gpt-escalate", messages=[USER])
            assert "pending approval apr-42" in str(e.value)
            assert scripted.stats.requests == 0
            r = await c.chat.completions.create(
                model="tether-scripted-1",
                messages=[{"role": "user", "content": "call deploy"}],
                tools=_chat_tools("deploy"),
            )
            assert "[tether] tool call deploy needs approval apr-42" in (
                r.choices[0].message.content or ""
            )
    finally:
        await gw.aclose()


# -- budgets -----------------------------------------------------------------------------------


async def test_budget_requests_and_concurrency(
    gateway: LLMGateway, mint: Callable[..., str], ledger: UsageLedger
) -> None:
    tok = mint([*["model:tether-scripted-1"], "budget:requests=5"])
    async with http_for(gateway) as h:
        c = openai.AsyncOpenAI(
            base_url="http://tether/v1", api_key=tok, http_client=h, max_retries=0
        )

        async def one() -> bool:
            try:
                await c.chat.completions.create(model="tether-scripted-1", messages=[USER])
                return True
            except openai.RateLimitError:
                return False

        results = await asyncio.gather(*[one() for _ in range(20)])
    assert sum(results) == 5
    rows = ledger.report("identity")
    assert rows[0]["requests"] == 5


async def test_budget_tokens(gateway: LLMGateway, mint: Callable[..., str]) -> None:
    tok = mint(["model:tether-scripted-1", "budget:tokens=200"])
    if True:
        c = anthropic.AsyncAnthropic(
            base_url="http://tether",
            api_key=tok,
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=streaming_asgi_transport(gateway, httpx2)),
        )
        ok = 0
        with pytest.raises(anthropic.RateLimitError):
            for _ in range(40):
                await c.messages.create(model="tether-scripted-1", max_tokens=100, messages=[USER])  # type: ignore[list-item]
                ok += 1
    assert 1 <= ok < 40


async def test_usage_report(oai: openai.AsyncOpenAI, ledger: UsageLedger) -> None:
    await oai.chat.completions.create(model="gpt-4o", messages=[USER])
    rows = ledger.report("task")
    assert rows[0]["task"] == "task-1" and rows[0]["total_tokens"] > 0
    assert rows[0]["usd"] != "0"


# -- failing upstreams ------------------------------------------------------------------------


async def test_upstream_garbage(oai: openai.AsyncOpenAI, scripted: ScriptedModel) -> None:
    scripted.garbage = "text"
    with pytest.raises(openai.APIStatusError) as e:
        await oai.chat.completions.create(model="tether-scripted-1", messages=[USER])
    assert e.value.status_code == 502
    with pytest.raises(openai.APIError):
        stream = await oai.chat.completions.create(
            model="tether-scripted-1", messages=[USER], stream=True
        )
        async for _ in stream:
            pass


async def test_upstream_error_status(
    claude: anthropic.AsyncAnthropic, scripted: ScriptedModel
) -> None:
    scripted.error_status = 429
    with pytest.raises(anthropic.RateLimitError):
        await claude.messages.create(model="tether-scripted-1", max_tokens=5, messages=[USER])  # type: ignore[list-item]


@pytest.mark.parametrize("mode", ["abort", "truncate", "error_event"])
async def test_stream_cut_halfway(
    oai: openai.AsyncOpenAI,
    scripted: ScriptedModel,
    services: Services,
    gateway: LLMGateway,
    mode: str,
) -> None:
    scripted.fail_after = 3
    scripted.fail_mode = mode  # type: ignore[assignment]
    got: list[str] = []
    with pytest.raises(openai.APIError):
        stream = await oai.chat.completions.create(
            model="tether-scripted-1", messages=[USER], stream=True
        )
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert got
    await gateway.drain()
    resp = services.audit.search(type="llm.response", limit=10)
    assert resp and resp[-1]["data"]["status"] != "ok"


async def test_upstream_hangs_times_out(
    services: Services,
    scripted: ScriptedModel,
    ledger: UsageLedger,
    mint: Callable[..., str],
    llm_table: dict[str, Any],
) -> None:
    table = {**llm_table, "read_timeout": "0.3s", "stream_idle_timeout": "0.3s"}
    gw = LLMGateway(
        parse_llm_config(table, env={}),
        verify=services.verifier.verify,
        core=DecisionCore(GrantsAuthorizer()),
        audit=services.audit,
        ledger=ledger,
        transports={"scripted": streaming_asgi_transport(scripted)},
    )
    try:
        async with http_for(gw) as h:
            c = openai.AsyncOpenAI(
                base_url="http://tether/v1", api_key=mint(), http_client=h, max_retries=0
            )
            scripted.hang_after = 2
            with pytest.raises(openai.APIError) as e:
                stream = await c.chat.completions.create(
                    model="tether-scripted-1", messages=[USER], stream=True
                )
                async for _ in stream:
                    pass
            assert "idle" in str(e.value)
    finally:
        await gw.aclose()
    resp = services.audit.search(type="llm.response", limit=10)
    assert resp[-1]["data"]["status"] == "upstream_timeout"


async def test_client_disconnect_cancels_upstream(
    gateway: LLMGateway, token: str, scripted: ScriptedModel, services: Services
) -> None:
    scripted.chunk_delay = 0.05
    async with http_for(gateway) as h:
        async with h.stream(
            "POST",
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {token}"},
            json={
                "model": "tether-scripted-1",
                "stream": True,
                "messages": [{"role": "user", "content": "a b c d e f g h"}],
            },
        ) as r:
            async for _ in r.aiter_bytes():
                break
    for _ in range(40):
        await asyncio.sleep(0.05)
        if scripted.stats.disconnects:
            break
    assert scripted.stats.disconnects == 1
    await gateway.drain()
    resp = services.audit.search(type="llm.response", limit=10)
    assert resp[-1]["data"]["status"] == "client_disconnected"


# -- real server --------------------------------------------------------------------------------


def test_over_real_uvicorn(
    services: Services, mint: Callable[..., str], tmp_path: Path, llm_table: dict[str, Any]
) -> None:
    import socket
    import threading

    import uvicorn

    from tether.gateways.llm.gateway import with_llm_gateway

    model = ScriptedModel()
    led = UsageLedger(tmp_path / "u3.db")
    with model.running() as up:
        table = {
            "providers": {
                "local": {"kind": "openai-compatible", "base_url": up + "/v1"},
                "anth": {"kind": "anthropic", "base_url": up},
            },
            "routes": [
                {"model": "claude-*", "provider": "anth", "upstream_model": "tether-scripted-1"},
                {"model": "*", "provider": "local"},
            ],
        }
        gw = LLMGateway(
            parse_llm_config(table, env={}),
            verify=services.verifier.verify,
            core=DecisionCore(GrantsAuthorizer()),
            audit=services.audit,
            ledger=led,
        )

        async def other(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(with_llm_gateway(other, gw), log_level="warning", lifespan="off")
        )
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        try:
            for _ in range(100):
                if server.started:
                    break
                threading.Event().wait(0.02)
            tok = mint(["model:tether-scripted-1", "model:claude-*", "tool:get_weather"])
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=tok, max_retries=0)
            r = c.chat.completions.create(model="tether-scripted-1", messages=[USER])
            assert r.choices[0].message.content == "[scripted model] you said: hello there"
            s = c.chat.completions.create(model="tether-scripted-1", messages=[USER], stream=True)
            assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
            a = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=tok, max_retries=0)
            with a.messages.stream(model="claude-x", max_tokens=50, messages=[USER]) as ms:  # type: ignore[list-item]
                assert "hello there" in "".join(ms.text_stream)
            with pytest.raises(anthropic.BadRequestError):  # no translation anthropic->openai
                a.messages.create(model="tether-scripted-1", max_tokens=5, messages=[USER])  # type: ignore[list-item]
            r2 = httpx.get(f"http://127.0.0.1:{port}/v1/whoami")
            assert r2.status_code == 404  # not ours: dispatched to the other app
        finally:
            server.should_exit = True
            t.join(5)
            asyncio.run(gw.aclose())
            led.close()


async def test_cedar_policy_decides_on_request_conditions(
    oai: openai.AsyncOpenAI, services: Services, scripted: ScriptedModel
) -> None:
    """The gateway hands the request's conditions to Cedar: a policy in the data dir caps
    max_tokens, and a call over the cap is refused before anything goes upstream."""
    (services.data_dir.policies / "30-caps.cedar").write_text(
        '@id("cap-max-tokens")\n@reason("at most 1000 tokens per call")\n'
        'forbid(principal, action == Tether::Action::"llm.invoke", resource)\n'
        "when { context has max_tokens && context.max_tokens > 1000 };\n"
    )
    assert services.policy.reload()
    before = scripted.stats.requests
    with pytest.raises(openai.PermissionDeniedError) as e:
        await oai.chat.completions.create(
            model="tether-scripted-1", messages=[USER], max_tokens=5000
        )
    assert "at most 1000 tokens" in str(e.value)
    assert scripted.stats.requests == before
    ok = await oai.chat.completions.create(
        model="tether-scripted-1", messages=[USER], max_tokens=10
    )
    assert ok.choices[0].message.content
