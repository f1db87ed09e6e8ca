"""The streamed answer's relay (relay.py): what the agent sees, and when, at the edges the
relay's guard handles in the request's own task: a client that leaves during the first upstream
read or while the request record is being made durable, the idle timer (pushed forward by each
read, blind to a slow gate), a cancellation from outside, and text released before a slow
event later in the same upstream read.

The agent here is a raw ASGI driver (its ``receive`` says ``http.disconnect`` when the test
says so, its ``send`` keeps every message), so what reached the agent is exact. The upstreams
are real ASGI apps behind the gateway's in-process streaming transport or a real socket."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import pytest

from tether.events import Event, Receipt
from tether.gateways.llm.config import parse_llm_config
from tether.gateways.llm.gateway import LLMGateway
from tether.gateways.llm.inspect import Finding, InspectContext
from tether.gateways.llm.scripted import MODEL_ID, ScriptedModel
from tether.gateways.llm.upstream import streaming_asgi_transport
from tether.server.services import Services
from tether.store.usage import UsageLedger

from .test_network_upstream import serving

Message = dict[str, Any]
BASE = {"id": "chatcmpl-relay", "object": "chat.completion.chunk", "created": 0, "model": MODEL_ID}
TEXT = re.compile(rb'"content":"[^"]')


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return b"data: " + orjson.dumps({**BASE, "choices": [choice]}) + b"\n\n"


ROLE = chunk({"role": "assistant", "content": ""})
DONE = b"data: [DONE]\n\n"


class SSEUpstream:
    """Answers every call with a 200 SSE head, then ``pieces`` (each one ``send``: one read for
    the gateway), then either ends the body or waits for the gateway to go away."""

    def __init__(self, pieces: list[bytes], end: bool = True) -> None:
        self.pieces = pieces
        self.end = end
        self.head_sent = asyncio.Event()
        self.disconnects = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            msg = await receive()
            more = msg.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        self.head_sent.set()
        for p in self.pieces:
            await send({"type": "http.response.body", "body": p, "more_body": True})
        if self.end:
            await send({"type": "http.response.body", "body": b""})
            return
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects += 1


class Agent:
    """A raw ASGI client for one streamed call: ``sent`` holds what reached it, ``leave()``
    makes its ``receive`` report ``http.disconnect``."""

    def __init__(
        self, token: str, messages: list[dict[str, Any]] | None = None, stream: bool = True
    ) -> None:
        body = orjson.dumps(
            {
                "model": MODEL_ID,
                "stream": stream,
                "messages": messages or [{"role": "user", "content": "hello there"}],
                "tools": [
                    {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
                ],
            }
        )
        self.scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [
                (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        self.body = body
        self.sent: list[Message] = []
        self.texted = asyncio.Event()
        self.ended = asyncio.Event()
        self.left = asyncio.Event()  # its receive has said http.disconnect
        self._got = asyncio.Event()
        self._gone = asyncio.Event()
        self._asked = False

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        self.left.set()
        return {"type": "http.disconnect"}

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)
        self._got.set()
        if msg["type"] == "http.response.body":
            if TEXT.search(msg.get("body", b"")):
                self.texted.set()
            if not msg.get("more_body", False):
                self.ended.set()

    async def until(self, needle: bytes) -> None:
        """Wait until ``needle`` has reached the agent."""
        while needle not in self.stream:
            self._got.clear()
            await self._got.wait()

    def call(self, gw: LLMGateway) -> asyncio.Task[None]:
        return asyncio.ensure_future(gw(self.scope, self.receive, self.send))

    @property
    def stream(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def _table(**extra: Any) -> dict[str, Any]:
    return {
        "providers": {"scripted": {"kind": "scripted"}},
        "routes": [{"model": MODEL_ID, "provider": "scripted"}],
        **extra,
    }


def _gateway(
    services: Services,
    ledger: UsageLedger,
    upstream: Any,
    table: dict[str, Any] | None = None,
    inspectors: list[Any] | None = None,
    audit: Any = None,
) -> LLMGateway:
    return LLMGateway(
        parse_llm_config(table or _table(), env={}),
        verify=services.verifier.verify,
        core=services.core,
        audit=audit or services.audit,
        ledger=ledger,
        inspectors=inspectors or [],
        transports={"scripted": streaming_asgi_transport(upstream)},
    )


def _last_response(services: Services) -> dict[str, Any]:
    entry: dict[str, Any] = services.audit.search(type="llm.response", limit=100)[-1]
    return entry


def _assembled(services: Services, entry: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(services.audit.body(entry["bodies"]["response"]))
    return doc


async def _eventually(cond: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(30):  # a failure backstop, not a synchronisation
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


def _signal_after_durable(gw: LLMGateway) -> asyncio.Event:
    """An event set once the request record is durable: from there the gateway goes on to
    its first upstream read without yielding to the loop."""
    done = asyncio.Event()
    durable: Callable[[asyncio.Future[Any]], Awaitable[None]] = gw._durable

    async def observed(record: asyncio.Future[Any]) -> None:
        await durable(record)
        done.set()

    gw._durable = observed  # type: ignore[method-assign]
    return done


# -- text first ---------------------------------------------------------------------------------


class SlowToolCheck:
    """An inspector whose tool-call check finishes only when the test lets it: the event after
    the text in the same upstream read is slow to pass the gate."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.checked: list[str] = []

    async def inbound(self, ctx: InspectContext, body: Mapping[str, Any]) -> Finding | None:
        return None

    async def outbound_text(self, ctx: InspectContext, text: str) -> Finding | None:
        return None

    async def outbound_tool(
        self, ctx: InspectContext, name: str, arguments: Mapping[str, Any]
    ) -> Finding | None:
        await self.release.wait()
        self.checked.append(name)
        return None


async def test_text_goes_out_before_a_slow_event_later_in_the_same_read(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """One upstream read holds the text and a whole tool call. The tool call's check waits for
    the agent to have the text: a relay that held the text until the read was gated would
    never get there."""
    tool = chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ]
        }
    )
    one_read = ROLE + chunk({"content": "first words"}) + tool + chunk({}, "tool_calls") + DONE
    check = SlowToolCheck()
    gw = _gateway(services, ledger, SSEUpstream([one_read]), inspectors=[check])
    agent = Agent(mint())
    try:
        task = agent.call(gw)
        async with asyncio.timeout(30):
            await agent.texted.wait()
            assert not check.checked and b"get_weather" not in agent.stream
            check.release.set()
            await task
    finally:
        await gw.aclose()
    stream = agent.stream
    assert stream.index(b"first words") < stream.index(b"get_weather") < stream.index(b"[DONE]")
    assert check.checked == ["get_weather"]
    assert agent.sent[0]["type"] == "http.response.start" and agent.sent[0]["status"] == 200
    resp = _last_response(services)
    assert resp["data"]["status"] == "ok"
    assert resp["data"]["tool_calls"][0]["outcome"] == "released"


async def test_text_after_the_first_in_a_read_goes_out_before_a_decision(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """Text after the read's first waits for nothing but gating: before the gate waits on a
    tool decision, everything it has passed reaches the agent."""
    tool = chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ]
        }
    )
    one_read = (
        ROLE
        + chunk({"content": "one"})
        + chunk({"content": " two"})
        + chunk({"content": " three"})
        + tool
        + chunk({}, "tool_calls")
        + DONE
    )
    check = SlowToolCheck()
    gw = _gateway(services, ledger, SSEUpstream([one_read]), inspectors=[check])
    agent = Agent(mint())
    try:
        task = agent.call(gw)
        async with asyncio.timeout(30):
            await agent.until(b" three")
            assert not check.checked and b"get_weather" not in agent.stream
            check.release.set()
            await task
    finally:
        await gw.aclose()
    stream = agent.stream
    order = [stream.index(x) for x in (b'"one"', b'" two"', b'" three"', b"get_weather", DONE)]
    assert order == sorted(order)
    assert _assembled(services, _last_response(services))["text"] == "one two three"


# -- client disconnects -------------------------------------------------------------------------


async def test_disconnect_during_the_first_read(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """The upstream answered with its head and nothing more; the agent leaves while the
    gateway waits for the first event: the upstream is let go, the agent got the SSE head and
    nothing after it, and the call is recorded as a disconnect."""
    up = SSEUpstream([], end=False)
    gw = _gateway(services, ledger, up)
    durable = _signal_after_durable(gw)
    agent = Agent(mint())
    try:
        task = agent.call(gw)
        async with asyncio.timeout(30):
            await durable.wait()
            agent.leave()
            await task  # the gateway returns: a disconnect is an ending, not an error
        await _eventually(lambda: up.disconnects == 1, "the upstream was not let go")
        await gw.drain()
    finally:
        await gw.aclose()
    assert [m["type"] for m in agent.sent] == ["http.response.start"]
    resp = _last_response(services)
    assert resp["data"]["status"] == "client_disconnected"
    assert _assembled(services, resp)["complete"] is False


class HeldRecords:
    """The real audit log, except that a call's request record (``llm.invoke``) is made durable
    only when the test says so."""

    def __init__(self, services: Services) -> None:
        self.audit = services.audit
        self.release = asyncio.Event()

    def record(self, event: Event) -> Receipt:
        return self.audit.record(event)

    async def arecord(self, event: Event) -> Receipt:
        if event.type == "llm.invoke":
            await self.release.wait()
        return await self.audit.arecord(event)


async def test_disconnect_while_the_request_record_is_made_durable(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """The agent leaves while the gateway waits for the request record (the upstream has
    already answered): the record is still written, not cancelled, and nothing is forwarded."""
    up = SSEUpstream([ROLE + chunk({"content": "never seen"})], end=False)
    held = HeldRecords(services)
    gw = _gateway(services, ledger, up, audit=held)
    waiting = asyncio.Event()
    durable = gw._durable

    async def observed(record: asyncio.Future[Any]) -> None:
        waiting.set()
        await durable(record)

    gw._durable = observed  # type: ignore[method-assign]
    agent = Agent(mint())
    try:
        task = agent.call(gw)
        async with asyncio.timeout(30):
            await waiting.wait()
            agent.leave()
            await agent.left.wait()
            # One turn: the watcher's done callback, queued before this task's wake-up, has
            # run, so the gateway knows before the record is released.
            await asyncio.sleep(0)
            held.release.set()
            await task
        await _eventually(lambda: up.disconnects == 1, "the upstream was not let go")
        await gw.drain()
    finally:
        await gw.aclose()
    assert agent.sent == []
    invoke = services.audit.search(type="llm.invoke", limit=10)
    assert invoke and invoke[-1]["data"]["stream"] is True
    assert _last_response(services)["data"]["status"] == "client_disconnected"


def _net_gateway(services: Services, ledger: UsageLedger, base: str) -> LLMGateway:
    return LLMGateway(
        parse_llm_config(
            {
                "providers": {"net": {"kind": "openai-compatible", "base_url": base + "/v1"}},
                "routes": [{"model": MODEL_ID, "provider": "net"}],
            },
            env={},
        ),
        verify=services.verifier.verify,
        core=services.core,
        audit=services.audit,
        ledger=ledger,
    )


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_client_that_leaves_at_once_still_cancels_the_upstream_call(
    services: Services, ledger: UsageLedger, mint: Callable[..., str], stream: bool
) -> None:
    """The disconnect watcher starts only once a call has run WATCH_AFTER; a client gone
    before then (the upstream has not answered) still has the upstream connection closed."""
    model = ScriptedModel(hang_after=0)  # never answers
    async with model.serving() as base:
        gw = _net_gateway(services, ledger, base)
        agent = Agent(mint(), stream=stream)
        agent.leave()  # it has sent its request and is gone
        try:
            async with asyncio.timeout(30):
                with pytest.raises(asyncio.CancelledError):  # as before: the call is cancelled
                    await agent.call(gw)
            await _eventually(lambda: model.stats.disconnects == 1, "the upstream was not let go")
            await gw.drain()
        finally:
            await gw.aclose()
    assert agent.sent == []
    assert _last_response(services)["data"]["status"] == "client_disconnected"


class LeavesOnTheHead(Agent):
    """Leaves as the SSE head reaches it, and lets the gateway notice before the send
    returns (a slow socket write would do the same)."""

    async def send(self, msg: Message) -> None:
        await super().send(msg)
        if msg["type"] == "http.response.start":
            self.leave()
            await self.left.wait()
            await asyncio.sleep(0)  # one turn: the watcher's done callback has run


async def test_disconnect_while_the_head_is_sent(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """A disconnect noticed between the record and the relay's first read still ends the
    call: the upstream, which sends nothing, is let go at once."""
    up = SSEUpstream([], end=False)
    gw = _gateway(services, ledger, up)
    agent = LeavesOnTheHead(mint())
    try:
        async with asyncio.timeout(30):
            await agent.call(gw)
        await _eventually(lambda: up.disconnects == 1, "the upstream was not let go")
        await gw.drain()
    finally:
        await gw.aclose()
    assert [m["type"] for m in agent.sent] == ["http.response.start"]
    assert _last_response(services)["data"]["status"] == "client_disconnected"


async def test_an_outside_cancellation_is_not_swallowed(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """A cancellation the guard did not make (a server shutting down) ends the call as a
    cancellation, recorded as interrupted, with the upstream let go."""
    up = SSEUpstream([ROLE + chunk({"content": "some text"})], end=False)
    gw = _gateway(services, ledger, up)
    agent = Agent(mint())
    try:
        task = agent.call(gw)
        async with asyncio.timeout(30):
            await agent.texted.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await _eventually(lambda: up.disconnects == 1, "the upstream was not let go")
        await gw.drain()
    finally:
        await gw.aclose()
    resp = _last_response(services)
    assert resp["data"]["status"] == "interrupted"
    assert _assembled(services, resp)["text"] == "some text"


# -- the idle timer -----------------------------------------------------------------------------


async def test_idle_timeout_in_the_first_read(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """Head, then silence: the agent gets the SSE head and the API's 504-shaped error event."""
    up = SSEUpstream([], end=False)
    gw = _gateway(services, ledger, up, _table(stream_idle_timeout="0.2s"))
    agent = Agent(mint())
    try:
        async with asyncio.timeout(30):
            await agent.call(gw)
        await _eventually(lambda: up.disconnects == 1, "the upstream was not let go")
        await gw.drain()
    finally:
        await gw.aclose()
    assert agent.sent[0]["type"] == "http.response.start" and agent.sent[0]["status"] == 200
    assert [m["more_body"] for m in agent.sent[1:]] == [False]  # the error ends the stream
    err = orjson.loads(agent.stream.removeprefix(b"data: "))["error"]
    assert err["code"] == "upstream_timeout" and "idle for 0.2s" in err["message"]
    resp = _last_response(services)
    assert resp["data"]["status"] == "upstream_timeout"
    assert resp["data"]["error"] == "no upstream bytes for 0.2s"


async def test_the_idle_timer_is_pushed_forward_by_each_read(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """Events come more often than the idle timeout, for longer than it in all; then the
    upstream stalls. Everything sent before the stall reaches the agent, then the timeout."""
    # 20 events 40 ms apart (0.76 s in all), idle timeout 0.6 s: 15 times the gap
    model = ScriptedModel(chunk_delay=0.04, hang_after=20)
    gw = _gateway(services, ledger, model, _table(stream_idle_timeout="0.6s"))
    words = "a b c d e f g h i j k l m n o p q r s t u v w x y z"
    agent = Agent(mint(), [{"role": "user", "content": words}])
    try:
        async with asyncio.timeout(30):
            await agent.call(gw)
        await gw.drain()
    finally:
        await gw.aclose()
    # event 0 is the role chunk; the 19 after it carry the first 19 words of the reply
    expected = " ".join(f"[scripted model] you said: {words}".split()[:19])
    resp = _last_response(services)
    assert resp["data"]["status"] == "upstream_timeout"
    assert _assembled(services, resp)["text"].split() == expected.split()
    assert b"upstream_timeout" in agent.stream


async def test_a_slow_gate_is_not_an_idle_upstream(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """A tool-call check that takes longer than the idle timeout (the upstream has sent
    everything) does not time the stream out: only waits for upstream bytes count."""

    class SlowCheck(SlowToolCheck):
        async def outbound_tool(
            self, ctx: InspectContext, name: str, arguments: Mapping[str, Any]
        ) -> Finding | None:
            await asyncio.sleep(0.6)  # the slow work itself, three idle timeouts long
            self.checked.append(name)
            return None

    check = SlowCheck()
    model = ScriptedModel()
    gw = _gateway(services, ledger, model, _table(stream_idle_timeout="0.2s"), inspectors=[check])
    agent = Agent(mint(), [{"role": "user", "content": "please call get_weather"}])
    try:
        async with asyncio.timeout(30):
            await agent.call(gw)
        await gw.drain()
    finally:
        await gw.aclose()
    assert check.checked == ["get_weather"]
    resp = _last_response(services)
    assert resp["data"]["status"] == "ok"
    assert resp["data"]["tool_calls"][0]["outcome"] == "released"
    assert b"get_weather" in agent.stream and b"upstream_timeout" not in agent.stream


# -- over the network ---------------------------------------------------------------------------


async def test_disconnect_during_the_first_read_over_the_network(
    services: Services, ledger: UsageLedger, mint: Callable[..., str]
) -> None:
    """The same with the upstream on a real socket (the h1 client): its connection is closed."""
    up = SSEUpstream([], end=False)
    async with serving(up) as port:
        gw = _net_gateway(services, ledger, f"http://127.0.0.1:{port}")
        durable = _signal_after_durable(gw)
        agent = Agent(mint())
        try:
            task = agent.call(gw)
            async with asyncio.timeout(30):
                await durable.wait()
                agent.leave()
                await task
            await _eventually(lambda: up.disconnects == 1, "the upstream connection stayed open")
            await gw.drain()
        finally:
            await gw.aclose()
    assert [m["type"] for m in agent.sent] == ["http.response.start"]
    assert _last_response(services)["data"]["status"] == "client_disconnected"


# -- how upstreams spell their events -----------------------------------------------------------


def _spelled(data_prefix: bytes, nl: bytes = b"\n") -> bytes:
    text = orjson.dumps({**BASE, "choices": [{"index": 0, "delta": {"content": "hi there"}}]})
    stop = orjson.dumps({**BASE, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(data_prefix + d + nl + nl for d in (text, stop, b"[DONE]"))


SPELLINGS = {
    "one space": _spelled(b"data: "),
    "no space": _spelled(b"data:"),
    "two spaces": _spelled(b"data:  "),
    "crlf": _spelled(b"data: ", b"\r\n"),
    "comment and event name first": b"".join(
        b": keep-alive\nevent: chunk\n" + e + b"\n\n"
        for e in _spelled(b"data: ").split(b"\n\n")
        if e
    ),
    "data over two lines": _spelled(b"data: ").replace(b'{"id"', b'{\ndata: "id"', 2),
}


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
async def test_every_spelling_of_an_event_streams_through(
    services: Services, ledger: UsageLedger, mint: Callable[..., str], spelling: bytes
) -> None:
    gw = _gateway(services, ledger, SSEUpstream([spelling]))
    agent = Agent(mint())
    try:
        async with asyncio.timeout(30):
            await agent.call(gw)
        await gw.drain()
    finally:
        await gw.aclose()
    resp = _last_response(services)
    assert resp["data"]["status"] == "ok"
    assert _assembled(services, resp)["text"] == "hi there"
    assert b"[DONE]" in agent.stream
