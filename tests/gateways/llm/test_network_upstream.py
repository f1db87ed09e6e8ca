"""The gateway against an upstream on a real socket: the pooled network client
(``tether.gateways.h1``) that production uses, as opposed to the in-process transport most
gateway tests use. Same behaviour is expected of both: answers, streams (event by event),
timeouts, unreachable upstreams, garbage, client disconnects, key injection, no state carried
from one agent's call to another's; and what only the network has: a POST that reached the
upstream is never sent again, TLS verified against the system's trust, and the upstream key in
no error or record."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
import uvicorn

from tether.gateways.llm import upstream
from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import LLMGateway
from tether.gateways.llm.scripted import MODEL_ID, ScriptedModel
from tether.gateways.llm.upstream import streaming_asgi_transport
from tether.server.services import Services
from tether.store.usage import UsageLedger

from ..test_h1 import self_signed
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


def _gateway(
    services: Services,
    ledger: UsageLedger,
    base: str,
    providers_extra: dict[str, Any] | None = None,
    **extra: Any,
) -> LLMGateway:
    table = {
        "providers": {
            "net": {
                "kind": "openai-compatible",
                "base_url": base,
                "api_key_env": "UP_KEY",
                **(providers_extra or {}),
            }
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


class GatedModel(ScriptedModel):
    """Holds its stream after the first event that carries text until ``gate`` opens: an
    agent can only see that text if every hop forwards it as it arrives."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        held = False

        async def gated(msg: dict[str, Any]) -> None:
            nonlocal held
            await send(msg)
            body = msg.get("body", b"")
            if not held and msg.get("more_body") and re.search(rb'"(content|text)":"[^"]', body):
                held = True
                await self.gate.wait()

        await super().__call__(scope, receive, gated)


@asynccontextmanager
async def serving(app: Any, **ssl: str) -> AsyncIterator[int]:
    """``app`` on uvicorn in this loop (optionally TLS), on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
        **ssl,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(2000):
        if server.started or task.done():
            break
        await asyncio.sleep(0.005)
    assert server.started, "uvicorn did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_streams_reach_the_agent_event_by_event(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """The upstream sends its next event only after the agent has seen the first one's text
    (through the SDK, the gateway and the network client): buffering anywhere would hang."""
    model = GatedModel(api_key=UPSTREAM_KEY)
    async with serving(model) as port:
        gw = _gateway(
            services,
            ledger,
            f"http://127.0.0.1:{port}/v1",
            providers_extra={"anthropic_messages": True},
        )
        try:
            c, h = await _client(gw, mint())
            async with h, asyncio.timeout(30):
                text = ""
                async for ch in await c.chat.completions.create(
                    model=MODEL_ID, messages=[USER], stream=True
                ):
                    if ch.choices and ch.choices[0].delta.content:
                        text += ch.choices[0].delta.content
                        model.gate.set()
                assert text == "[scripted model] you said: hello there"

            model.gate = asyncio.Event()
            async with (
                httpx2.AsyncClient(
                    transport=streaming_asgi_transport(gw, httpx2), base_url="http://tether"
                ) as h2,
                asyncio.timeout(30),
            ):
                claude = anthropic.AsyncAnthropic(
                    base_url="http://tether", api_key=mint(), http_client=h2, max_retries=0
                )
                parts = []
                async with claude.messages.stream(
                    model=MODEL_ID, max_tokens=64, messages=[USER]
                ) as stream:
                    async for t in stream.text_stream:
                        parts.append(t)
                        model.gate.set()
                assert "".join(parts) == "[scripted model] you said: hello there"
        finally:
            await gw.aclose()
    anthropic_call = model.requests[-1]
    assert anthropic_call.path == "/v1/messages"
    assert anthropic_call.headers["x-api-key"] == UPSTREAM_KEY


async def _raw_upstream(
    handler: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> tuple[asyncio.Server, str]:
    """A raw asyncio upstream running ``handler(connection number, reader, writer)``."""
    conns = [0]

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns[0] += 1
        try:
            await handler(conns[0], r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def _read_request(r: asyncio.StreamReader, seen: list[bytes]) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await r.readexactly(int(m.group(1))) if m else b""
    seen.append(head + body)
    return body


def _completion(text: str) -> bytes:
    doc = {
        "id": "chatcmpl-net-1",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    body = orjson.dumps(doc)
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


async def test_a_call_that_reached_the_upstream_is_never_sent_again(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """The upstream reads the second call on the reused connection and hangs up without a
    byte of answer. It may have run (and billed) that call, so the gateway reports it and
    does not send it again."""
    seen: list[bytes] = []
    connections: list[int] = []

    async def handler(n: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(n)
        await _read_request(r, seen)
        w.write(_completion("first"))
        await w.drain()
        await _read_request(r, seen)  # ... and close without answering

    server, base = await _raw_upstream(handler)
    gw = _gateway(services, ledger, base)
    try:
        c, h = await _client(gw, mint())
        async with h:
            r = await c.chat.completions.create(model=MODEL_ID, messages=[USER])
            assert r.choices[0].message.content == "first"
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model=MODEL_ID, messages=[USER])
        assert e.value.status_code == 502
        assert "closed the connection before answering" in e.value.message
        await gw.drain()
    finally:
        await gw.aclose()
        server.close()
    assert connections == [1] and len(seen) == 2
    statuses = [e["data"]["status"] for e in services.audit.search(type="llm.response")]
    assert statuses == ["ok", "upstream_unreachable"]


async def test_the_upstream_key_is_in_no_error_and_no_record(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """Upstreams that fail every way the network client can see (garbage, a cut, a reset of
    the connection), for both APIs: neither the agent's error nor any audit record holds the
    key the gateway injected."""
    seen: list[bytes] = []
    answers = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"partial',
        b"",
    ]

    async def handler(n: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r, seen)
        w.write(answers[(n - 1) % len(answers)])
        await w.drain()

    server, base = await _raw_upstream(handler)
    gw = _gateway(services, ledger, base, providers_extra={"anthropic_messages": True})
    errors: list[str] = []
    try:
        c, h = await _client(gw, mint())
        async with h:
            for _ in answers:
                with pytest.raises(openai.APIStatusError) as e:
                    await c.chat.completions.create(model=MODEL_ID, messages=[USER])
                assert e.value.status_code == 502
                errors.append(json.dumps(e.value.body) + str(e.value))
        async with httpx2.AsyncClient(
            transport=streaming_asgi_transport(gw, httpx2), base_url="http://tether"
        ) as h2:
            claude = anthropic.AsyncAnthropic(
                base_url="http://tether", api_key=mint(), http_client=h2, max_retries=0
            )
            for _ in answers:
                with pytest.raises(anthropic.APIStatusError) as e2:
                    await claude.messages.create(model=MODEL_ID, max_tokens=8, messages=[USER])
                assert e2.value.status_code == 502
                errors.append(json.dumps(e2.value.body) + str(e2.value))
        await gw.drain()
    finally:
        await gw.aclose()
        server.close()
    assert len(seen) == 6
    assert all(UPSTREAM_KEY.encode() in req for req in seen)  # it was sent, to the upstream only
    assert not [t for t in errors if UPSTREAM_KEY in t]
    records = json.dumps(services.audit.search(limit=1000))
    assert "upstream_unreachable" in records and UPSTREAM_KEY not in records


async def test_an_answer_over_the_size_limit_is_a_502(
    services: Services,
    ledger: UsageLedger,
    model: tuple[ScriptedModel, str],
    mint: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "MAX_RESPONSE_BYTES", 200)  # read when the pool is built
    gw = _gateway(services, ledger, model[1] + "/v1")
    try:
        c, h = await _client(gw, mint())
        async with h:
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model=MODEL_ID, messages=[USER])
        assert e.value.status_code == 502
        assert "larger than 200 bytes" in e.value.message
    finally:
        await gw.aclose()


async def test_https_upstreams_are_verified_against_the_system_trust(
    services: Services,
    ledger: UsageLedger,
    mint: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A self-signed upstream is refused (verification is on); trusted through the standard
    ``SSL_CERT_FILE`` it serves, over TLS, with the key injected."""
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    model = ScriptedModel(api_key=UPSTREAM_KEY)
    async with serving(model, ssl_certfile=str(cert), ssl_keyfile=str(key)) as port:
        base = f"https://localhost:{port}/v1"
        untrusting = _gateway(services, ledger, base)
        try:
            c, h = await _client(untrusting, mint())
            async with h:
                with pytest.raises(openai.APIStatusError) as e:
                    await c.chat.completions.create(model=MODEL_ID, messages=[USER])
            assert e.value.status_code == 502 and e.value.code == "upstream_unreachable"
            assert "certificate" in e.value.message
        finally:
            await untrusting.aclose()
        assert model.stats.requests == 0

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = _gateway(services, ledger, base)
        try:
            c, h = await _client(trusting, mint())
            async with h:
                r = await c.chat.completions.create(model=MODEL_ID, messages=[USER])
                assert r.choices[0].message.content == "[scripted model] you said: hello there"
        finally:
            await trusting.aclose()
    assert model.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


NOT_HTTP = {
    "not_a_status_line": b"HELLO THERE\r\n\r\n",
    "http_0_9_bytes": b"\x00\x01\x02garbage\r\n\r\n",
}


@pytest.mark.parametrize("reply", NOT_HTTP.values(), ids=NOT_HTTP.keys())
async def test_an_answer_that_is_not_http_is_upstream_garbage(
    services: Services, ledger: UsageLedger, mint: Callable[..., str], reply: bytes
) -> None:
    """The upstream answered, but not in HTTP/1.1: a 502 naming it garbage (not
    "unreachable", which would send an operator looking at the network), recorded."""

    async def handler(n: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r, [])
        w.write(reply)
        await w.drain()

    server, base = await _raw_upstream(handler)
    gw = _gateway(services, ledger, base)
    try:
        c, h = await _client(gw, mint())
        async with h:
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model=MODEL_ID, messages=[USER])
        assert e.value.status_code == 502 and e.value.code == "upstream_garbage"
        await gw.drain()
    finally:
        await gw.aclose()
        server.close()
    last = services.audit.search(type="llm.response")[-1]
    assert last["data"]["status"] == "upstream_garbage"
