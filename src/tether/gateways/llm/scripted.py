"""The bundled, clearly labelled scripted model: a fake LLM upstream for tests and benchmarks.

It is an ASGI app (raw ASGI, no framework on the request path, so it is fast enough to be the
baseline of the gateway benchmark) that speaks the upstream protocols faithfully enough for the
official ``openai`` and ``anthropic`` SDKs:

* OpenAI Chat Completions ``POST /v1/chat/completions`` (stream or not, ``stream_options.
  include_usage``, ``tools`` -> ``tool_calls`` whose argument fragments stream over several chunks),
* OpenAI Responses ``POST /v1/responses`` (``message`` and ``function_call`` output items; the
  streaming events ``response.created`` ... ``response.output_text.delta`` /
  ``response.function_call_arguments.delta`` ... ``response.completed`` with usage),
* ``GET /v1/models`` and ``GET /v1/models/{id}``,
* Anthropic Messages ``POST /v1/messages`` (``text`` and ``tool_use`` content blocks; the events
  ``message_start``, ``content_block_start``, ``content_block_delta`` (``text_delta``,
  ``input_json_delta``), ``content_block_stop``, ``message_delta`` (usage), ``message_stop``).

Paths work with and without the ``/v1`` prefix. It is not a language model and never pretends
to be one: every reply's text begins ``[scripted model]``, ``/v1/models`` lists
``tether-scripted-1``, and every response carries the header ``x-tether-scripted: 1``.

The script (deterministic, so tests can assert exact output):

* The *last* message decides. If it is a tool result (Chat ``role: tool``, Responses
  ``function_call_output``, Anthropic ``tool_result``), the reply is
  ``[scripted model] tool result: <its content>``.
* Otherwise it is the last user message. If tools are offered and its text says
  ``call NAME`` or ``use NAME with {json}`` for an offered tool NAME, the model proposes that call
  (arguments ``{json}``, or ``{}`` without ``with``); several such phrases give parallel calls.
  Anthropic replies put a short text block ``[scripted model] calling NAME`` before the
  ``tool_use`` blocks (as Claude does); OpenAI replies carry only the calls.
* Otherwise the reply is ``[scripted model] you said: <the message's first 64 words>``.
* ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` truncate a text reply to that
  many tokens and finish with ``length`` / ``max_tokens`` / ``incomplete``.

Token usage is an estimate, documented so tests can compute it: one token per
whitespace-separated word. Input tokens count the words of every message's text (system /
instructions included, tool definitions not); output tokens count the reply's words plus, per
tool call, one for its name and the words of its arguments JSON. Every reply reports at least
one token each way.

Knobs (constructor arguments, also plain attributes a test may change between requests):
``latency`` (seconds before the response starts), ``chunk_delay`` (seconds between stream
chunks), ``chunks`` (how many pieces the reply text is streamed in; default one per word),
``fail_after`` (a stream fails after that many events: ``fail_mode`` ``"abort"`` breaks the
connection mid-body, ``"truncate"`` ends the body cleanly without the terminator,
``"error_event"`` sends the provider's in-stream error event), ``garbage`` (``"text"``: a 200 whose
body is not JSON / SSE data that is not JSON; ``"shape"``: valid JSON of the wrong shape),
``hang_after`` (0: never send anything; K: a stream stops after K events and never ends; either
way until the client goes away), ``error_status`` (answer with that HTTP status and the
provider's error shape), ``api_key`` (require it as ``Authorization: Bearer`` or ``x-api-key``).

What it saw is kept for assertions: ``requests`` (the last ``record_limit`` requests: method,
path, headers, parsed body) and ``stats`` (counts of requests, completed responses and client
disconnects).

Run it in-process (``with ScriptedModel().running() as base_url``, or ``async with
model.serving()``), mount it as an ASGI app, or as its own server::

    python -m tether.gateways.llm.scripted --port 8199 [--chunk-delay 0.01 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

__all__ = [
    "MODEL_ID",
    "ReceivedRequest",
    "ScriptedModel",
    "ScriptedStats",
    "count_tokens",
    "main",
    "serve",
]

MODEL_ID = "tether-scripted-1"
LABEL = "[scripted model]"
ECHO_WORDS = 64

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FailMode = Literal["abort", "truncate", "error_event"]
Garbage = Literal["text", "shape"]
Api = Literal["chat", "responses", "anthropic"]

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"x-tether-scripted", b"1")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-tether-scripted", b"1"),
]
_TOOL_PHRASE = re.compile(r"\b(?:call|use)\s+([A-Za-z0-9_.\-]+)(\s+with\s+)?")


def count_tokens(text: str) -> int:
    """The scripted model's token estimate: whitespace-separated words."""
    return len(text.split())


class ScriptedFailure(RuntimeError):
    """Raised inside the app to break a stream mid-body (``fail_mode="abort"``)."""


class _Disconnected(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or the raw bytes when it was not JSON


@dataclass
class ScriptedStats:
    requests: int = 0
    completed: int = 0  # responses sent to their end
    disconnects: int = 0  # clients that went away before the end
    by_path: dict[str, int] = field(default_factory=dict)


@dataclass
class _Call:
    call_id: str
    name: str
    arguments: str  # JSON text


@dataclass
class _Reply:
    text: str  # empty when only tool calls
    calls: list[_Call]
    input_tokens: int
    output_tokens: int
    truncated: bool


# ---------------------------------------------------------------------------------------------
# reading requests: the text of messages in each protocol's shapes


def _content_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of parts of any of the three APIs."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif part.get("type") == "tool_result":
                    out.append(_content_text(part.get("content")))
        return " ".join(out)
    return ""


def _is_tool_result_message(api: Api, msg: Any) -> tuple[bool, str]:
    if not isinstance(msg, dict):
        return False, ""
    if api == "chat":
        if msg.get("role") == "tool":
            return True, _content_text(msg.get("content"))
        return False, ""
    if api == "responses":
        if msg.get("type") == "function_call_output":
            out = msg.get("output")
            return True, out if isinstance(out, str) else _content_text(out)
        return False, ""
    content = msg.get("content")
    if msg.get("role") == "user" and isinstance(content, list):
        results = [p for p in content if isinstance(p, dict) and p.get("type") == "tool_result"]
        if results:
            return True, " ".join(_content_text(p.get("content")) for p in results)
    return False, ""


def _tool_names(api: Api, tools: Any) -> set[str]:
    names: set[str] = set()
    if not isinstance(tools, list):
        return names
    for t in tools:
        if not isinstance(t, dict):
            continue
        if api == "chat":
            fn = t.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
        elif isinstance(t.get("name"), str):
            names.add(t["name"])
    return names


def _propose_calls(text: str, offered: set[str], prefix: str) -> list[_Call]:
    calls: list[_Call] = []
    decoder = json.JSONDecoder()
    for m in _TOOL_PHRASE.finditer(text):
        name = m.group(1).rstrip(".")
        if name not in offered:
            continue
        args = "{}"
        if m.group(2):
            try:
                value, _ = decoder.raw_decode(text, m.end())
            except ValueError:
                value = None
            if isinstance(value, dict):
                args = json.dumps(value, separators=(",", ":"))
        calls.append(_Call(f"{prefix}{len(calls)}", name, args))
    return calls


def _split(text: str, pieces: int | None, default_size: int | None = None) -> list[str]:
    """Split ``text`` into ``pieces`` non-empty parts (or per word / per ``default_size``)."""
    if not text:
        return []
    if pieces is None:
        if default_size is not None:
            return [text[i : i + default_size] for i in range(0, len(text), default_size)]
        parts = re.findall(r"\s*\S+", text)
        return parts or [text]
    n = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), n)
    out, pos = [], 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(text[pos : pos + step])
        pos += step
    return out


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


# ---------------------------------------------------------------------------------------------
# the app


class ScriptedModel:
    """The scripted model as a raw ASGI app. See the module docstring for the script and knobs."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        chunks: int | None = None,
        fail_after: int | None = None,
        fail_mode: FailMode = "abort",
        garbage: Garbage | None = None,
        hang_after: int | None = None,
        error_status: int | None = None,
        error_message: str = "scripted error",
        api_key: str | None = None,
        models: tuple[str, ...] = (MODEL_ID,),
        record_limit: int = 1000,
    ) -> None:
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.chunks = chunks
        self.fail_after = fail_after
        self.fail_mode: FailMode = fail_mode
        self.garbage: Garbage | None = garbage
        self.hang_after = hang_after
        self.error_status = error_status
        self.error_message = error_message
        self.api_key = api_key
        self.models = models
        self.requests: deque[ReceivedRequest] = deque(maxlen=max(0, record_limit))
        self.stats = ScriptedStats()
        self._seq = 0
        self._created = int(time.time())

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        if path.startswith("/v1/"):
            path = path[3:]
        method: str = scope["method"]
        stats = self.stats
        stats.requests += 1
        stats.by_path[path] = stats.by_path.get(path, 0) + 1

        api: Api = "anthropic" if path.startswith("/messages") else "chat"
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                stats.disconnects += 1
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)

        parsed: Any = None
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = body
        if self.requests.maxlen:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.requests.append(ReceivedRequest(method, scope["path"], headers, parsed))

        try:
            if path == "/models" or path.startswith("/models/"):
                if method != "GET":
                    raise _BadRequest(405, f"method {method} not allowed on {scope['path']}")
                self._check_key(scope, api)
                await self._models(path, send)
                stats.completed += 1
                return
            if method != "POST":
                raise _BadRequest(405, f"method {method} not allowed on {scope['path']}")
            if path == "/chat/completions":
                api = "chat"
            elif path == "/responses":
                api = "responses"
            elif path == "/messages":
                api = "anthropic"
            else:
                raise _BadRequest(404, f"unknown path {scope['path']}")
            self._check_key(scope, api)
            if self.latency:
                await self._wait(receive, self.latency)
            if self.error_status is not None:
                raise _BadRequest(self.error_status, self.error_message)
            if not isinstance(parsed, dict):
                raise _BadRequest(400, "request body is not a JSON object")
            stream = parsed.get("stream") is True
            if self.hang_after == 0:
                await self._hang(receive)
                return
            if self.garbage is not None:
                await self._send_garbage(send, stream)
                stats.completed += 1
                return
            reply = self._script(api, parsed)
            if api == "chat":
                if stream:
                    events = self._chat_events(parsed, reply)
                else:
                    return await self._json(send, 200, self._chat_body(parsed, reply))
            elif api == "responses":
                if stream:
                    events = self._responses_events(parsed, reply)
                else:
                    return await self._json(send, 200, self._responses_body(parsed, reply))
            elif stream:
                events = self._anthropic_events(parsed, reply)
            else:
                return await self._json(send, 200, self._anthropic_body(parsed, reply))
            await self._stream(api, events, receive, send)
        except _BadRequest as e:
            await self._json(send, e.status, _error_body(api, e.status, e.message))
        except _Disconnected:
            stats.disconnects += 1

    # -- plumbing -----------------------------------------------------------------------------

    def _check_key(self, scope: Scope, api: Api) -> None:
        if self.api_key is None:
            return
        want = self.api_key.encode()
        for k, v in scope["headers"]:
            if (k == b"authorization" and v == b"Bearer " + want) or (
                k == b"x-api-key" and v == want
            ):
                return
        raise _BadRequest(401, "invalid api key (scripted model)")

    async def _json(self, send: Send, status: int, doc: Any) -> None:
        body = orjson.dumps(doc)
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})
        if status < 400:
            self.stats.completed += 1

    async def _wait(self, receive: Receive, seconds: float) -> None:
        """Sleep, but notice a client that goes away meanwhile."""
        try:
            msg = await asyncio.wait_for(receive(), seconds)
        except TimeoutError:
            return
        if msg["type"] == "http.disconnect":
            raise _Disconnected

    async def _hang(self, receive: Receive) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self.stats.disconnects += 1
                return

    async def _send_garbage(self, send: Send, stream: bool) -> None:
        if stream:
            payload = (
                b"data: {not json at all\n\n"
                if self.garbage == "text"
                else b'data: {"scripted": "wrong shape", "choices": "nope"}\n\n'
            )
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await send({"type": "http.response.body", "body": payload})
            return
        payload = (
            b"<html>[scripted model] garbage: this is not JSON"
            if self.garbage == "text"
            else b'{"scripted": "wrong shape", "choices": "nope", "usage": 7}'
        )
        await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": payload})

    async def _stream(
        self, api: Api, events: Iterator[bytes], receive: Receive, send: Send
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        delay = self.chunk_delay
        fail_after = self.fail_after
        hang_after = self.hang_after
        try:
            for n, event in enumerate(events):
                if fail_after is not None and n >= fail_after:
                    await self._fail(api, send)
                    return
                if hang_after is not None and n >= hang_after:
                    await self._hang(receive)
                    return
                if delay and n:
                    await self._wait(receive, delay)
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except OSError:  # the server's transport reports a client that went away
            self.stats.disconnects += 1
            return
        self.stats.completed += 1

    async def _fail(self, api: Api, send: Send) -> None:
        if self.fail_mode == "truncate":
            await send({"type": "http.response.body", "body": b""})
            return
        if self.fail_mode == "error_event":
            err = _error_body(
                api, 500 if api != "anthropic" else 529, "scripted mid-stream failure"
            )
            if api == "anthropic":
                payload = b"event: error\ndata: " + orjson.dumps(err) + b"\n\n"
            elif api == "responses":
                doc = {"type": "error", "sequence_number": 0, **err["error"]}
                payload = b"event: error\ndata: " + orjson.dumps(doc) + b"\n\n"
            else:
                payload = b"data: " + orjson.dumps(err) + b"\n\n"
            await send({"type": "http.response.body", "body": payload, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        raise ScriptedFailure("scripted model: stream broken on purpose (fail_after)")

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    async def _models(self, path: str, send: Send) -> None:
        if path.startswith("/models/"):
            mid = path[len("/models/") :]
            if mid not in self.models:
                raise _BadRequest(404, f"The model '{mid}' does not exist")
            await self._json(send, 200, self._model_doc(mid))
            return
        doc = {"object": "list", "data": [self._model_doc(m) for m in self.models]}
        await self._json(send, 200, doc)

    def _model_doc(self, mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": self._created, "owned_by": "tether"}

    # -- the script ---------------------------------------------------------------------------

    def _script(self, api: Api, req: dict[str, Any]) -> _Reply:
        if api == "responses":
            raw = req.get("input")
            messages: Any = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
            if not isinstance(messages, list) or not messages:
                raise _BadRequest(400, "'input' must be a string or a non-empty list")
            system = req.get("instructions")
            limit = _int_or_none(req.get("max_output_tokens"))
        else:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest(400, "'messages' must be a non-empty list")
            if api == "anthropic":
                system = req.get("system")
                limit = _int_or_none(req.get("max_tokens"))
                if limit is None:
                    raise _BadRequest(400, "max_tokens: Field required")
            else:
                system = None
                limit = _int_or_none(req.get("max_completion_tokens")) or _int_or_none(
                    req.get("max_tokens")
                )
        if not isinstance(req.get("model"), str) or not req["model"]:
            raise _BadRequest(400, "'model' is required")

        input_tokens = count_tokens(_content_text(system)) if system else 0
        for m in messages:
            if isinstance(m, dict):
                input_tokens += count_tokens(_content_text(m.get("content")))
                if api == "responses" and m.get("type") == "function_call_output":
                    input_tokens += count_tokens(str(m.get("output", "")))
        input_tokens = max(1, input_tokens)

        last = messages[-1]
        is_result, result_text = _is_tool_result_message(api, last)
        calls: list[_Call] = []
        if is_result:
            text = f"{LABEL} tool result: {result_text}"
        else:
            user_text = ""
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role", "user") == "user":
                    user_text = _content_text(m.get("content"))
                    break
            offered = _tool_names(api, req.get("tools"))
            if offered and req.get("tool_choice") != "none":
                prefix = {"chat": "call_", "responses": "call_", "anthropic": "toolu_"}[api]
                calls = _propose_calls(user_text, offered, f"{prefix}scripted{self._seq + 1}_")
            if calls:
                names = ", ".join(c.name for c in calls)
                text = f"{LABEL} calling {names}" if api == "anthropic" else ""
            else:
                words = user_text.split()
                echo = " ".join(words[:ECHO_WORDS]) + (" ..." if len(words) > ECHO_WORDS else "")
                text = f"{LABEL} you said: {echo}" if words else f"{LABEL} (no user text)"
        truncated = False
        if limit is not None and not calls:
            words = re.findall(r"\s*\S+", text)
            if len(words) > limit:
                text = "".join(words[:limit])
                truncated = True
        output_tokens = count_tokens(text) + sum(1 + count_tokens(c.arguments) for c in calls)
        return _Reply(text, calls, input_tokens, max(1, output_tokens), truncated)

    # -- OpenAI Chat Completions --------------------------------------------------------------

    def _chat_body(self, req: dict[str, Any], r: _Reply) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": r.text or None,
            "refusal": None,
            "annotations": [],
        }
        if r.calls:
            message["tool_calls"] = [
                {
                    "id": c.call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in r.calls
            ]
        finish = "tool_calls" if r.calls else ("length" if r.truncated else "stop")
        return {
            "id": f"chatcmpl-scripted-{self._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req["model"],
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": _chat_usage(r),
            "system_fingerprint": "tether-scripted",
        }

    def _chat_events(self, req: dict[str, Any], r: _Reply) -> Iterator[bytes]:
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        base: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{self._next_id()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req["model"],
            "system_fingerprint": "tether-scripted",
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

        if r.calls:
            yield chunk({"role": "assistant", "content": None, "refusal": None})
            for i, c in enumerate(r.calls):
                head = {"index": i, "id": c.call_id, "type": "function"}
                yield chunk(
                    {"tool_calls": [{**head, "function": {"name": c.name, "arguments": ""}}]}
                )
                for frag in _split(c.arguments, self.chunks, default_size=6):
                    yield chunk({"tool_calls": [{"index": i, "function": {"arguments": frag}}]})
            yield chunk({}, "tool_calls")
        else:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            for piece in _split(r.text, self.chunks):
                yield chunk({"content": piece})
            yield chunk({}, "length" if r.truncated else "stop")
        if include_usage:
            yield (
                b"data: " + orjson.dumps({**base, "choices": [], "usage": _chat_usage(r)}) + b"\n\n"
            )
        yield b"data: [DONE]\n\n"

    # -- OpenAI Responses ---------------------------------------------------------------------

    def _responses_items(self, r: _Reply, rid: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if r.text:
            items.append(_message_item(f"msg_scripted{rid}", r.text, "completed"))
        for i, c in enumerate(r.calls):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_scripted{rid}_{i}",
                    "call_id": c.call_id,
                    "name": c.name,
                    "arguments": c.arguments,
                    "status": "completed",
                }
            )
        return items

    def _response_doc(
        self, req: dict[str, Any], rid: int, status: str, output: list[dict[str, Any]], r: _Reply
    ) -> dict[str, Any]:
        tools = req.get("tools")
        done = status != "in_progress"
        return {
            "id": f"resp_scripted{rid}",
            "object": "response",
            "created_at": self._created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "model": req["model"],
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": tools if isinstance(tools, list) else [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": (
                {
                    "input_tokens": r.input_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": r.output_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": r.input_tokens + r.output_tokens,
                }
                if done
                else None
            ),
            "user": None,
            "metadata": {},
        }

    def _responses_body(self, req: dict[str, Any], r: _Reply) -> dict[str, Any]:
        rid = self._next_id()
        status = "incomplete" if r.truncated else "completed"
        return self._response_doc(req, rid, status, self._responses_items(r, rid), r)

    def _responses_events(self, req: dict[str, Any], r: _Reply) -> Iterator[bytes]:
        rid = self._next_id()
        seq = 0

        def ev(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            doc = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

        yield ev("response.created", response=self._response_doc(req, rid, "in_progress", [], r))
        yield ev(
            "response.in_progress", response=self._response_doc(req, rid, "in_progress", [], r)
        )
        items = self._responses_items(r, rid)
        for idx, item in enumerate(items):
            if item["type"] == "message":
                item_id = item["id"]
                yield ev(
                    "response.output_item.added",
                    output_index=idx,
                    item=_message_item(item_id, "", "in_progress"),
                )
                empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield ev(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=idx,
                    content_index=0,
                    part=empty,
                )
                for piece in _split(r.text, self.chunks):
                    yield ev(
                        "response.output_text.delta",
                        item_id=item_id,
                        output_index=idx,
                        content_index=0,
                        delta=piece,
                        logprobs=[],
                    )
                yield ev(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=idx,
                    content_index=0,
                    text=r.text,
                    logprobs=[],
                )
                yield ev(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=idx,
                    content_index=0,
                    part=item["content"][0],
                )
            else:
                yield ev(
                    "response.output_item.added",
                    output_index=idx,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                for frag in _split(item["arguments"], self.chunks, default_size=6):
                    yield ev(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=idx,
                        delta=frag,
                    )
                yield ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=idx,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            yield ev("response.output_item.done", output_index=idx, item=item)
        status = "incomplete" if r.truncated else "completed"
        final = self._response_doc(req, rid, status, items, r)
        yield ev("response.incomplete" if r.truncated else "response.completed", response=final)

    # -- Anthropic Messages -------------------------------------------------------------------

    def _anthropic_body(self, req: dict[str, Any], r: _Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if r.text:
            content.append({"type": "text", "text": r.text})
        for c in r.calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": c.call_id,
                    "name": c.name,
                    "input": json.loads(c.arguments),
                }
            )
        return {
            "id": f"msg_scripted{self._next_id()}",
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": content,
            "stop_reason": _stop_reason(r),
            "stop_sequence": None,
            "usage": _anthropic_usage(r, r.output_tokens),
        }

    def _anthropic_events(self, req: dict[str, Any], r: _Reply) -> Iterator[bytes]:
        def ev(kind: str, doc: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

        start = {
            "id": f"msg_scripted{self._next_id()}",
            "type": "message",
            "role": "assistant",
            "model": req["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(r, 1),
        }
        yield ev("message_start", {"type": "message_start", "message": start})
        index = 0
        if r.text:
            block: dict[str, Any] = {"type": "text", "text": ""}
            yield ev(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            yield ev("ping", {"type": "ping"})
            for piece in _split(r.text, self.chunks):
                delta = {"type": "text_delta", "text": piece}
                yield ev(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            yield ev("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for c in r.calls:
            block = {
                "type": "tool_use",
                "id": c.call_id,
                "name": c.name,
                "input": {},
            }
            yield ev(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
            for frag in ["", *_split(c.arguments, self.chunks, default_size=6)]:
                delta = {"type": "input_json_delta", "partial_json": frag}
                yield ev(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            yield ev("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        yield ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(r), "stop_sequence": None},
                "usage": {"output_tokens": r.output_tokens},
            },
        )
        yield ev("message_stop", {"type": "message_stop"})

    # -- running it ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve on a real socket (uvicorn in a background thread); yields the base URL
        (``http://host:port``; the OpenAI SDK wants ``base_url + "/v1"``)."""
        import uvicorn

        sock = _bind(host, port)
        server = uvicorn.Server(_uvicorn_config(self))
        started = threading.Event()

        def run() -> None:
            with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                runner.run(_serve_and_signal(server, sock, started))

        thread = threading.Thread(target=run, name="scripted-model", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("scripted model did not start")
        try:
            yield _url(sock)
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on a real socket from the running event loop; yields the base URL."""
        import uvicorn

        sock = _bind(host, port)
        server = uvicorn.Server(_uvicorn_config(self))
        started = threading.Event()
        task = asyncio.create_task(_serve_and_signal(server, sock, started))
        while not started.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        try:
            yield _url(sock)
        finally:
            server.should_exit = True
            await task
            sock.close()


# ---------------------------------------------------------------------------------------------
# shapes shared by the builders


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status == "completed"
        else []
    )
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _chat_usage(r: _Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": r.input_tokens,
        "completion_tokens": r.output_tokens,
        "total_tokens": r.input_tokens + r.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _anthropic_usage(r: _Reply, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": r.input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _stop_reason(r: _Reply) -> str:
    return "tool_use" if r.calls else ("max_tokens" if r.truncated else "end_turn")


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_denied",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error_body(api: Api, status: int, message: str) -> dict[str, Any]:
    """The provider's own error shape, so its SDK raises its normal exception."""
    if api == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error")
    code = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------------------------------------
# serving


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: ScriptedModel, log_level: str = "warning") -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=30,
    )


async def _serve_and_signal(server: Any, sock: socket.socket, started: threading.Event) -> None:
    async def flag() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.002)
        started.set()

    watcher = asyncio.create_task(flag())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        started.set()


def serve(port: int = 8199, host: str = "127.0.0.1", **knobs: Any) -> None:
    """Run the scripted model as an HTTP server until interrupted (uvloop + httptools when
    installed). Prints ``scripted model listening on URL`` to stdout once it accepts; with
    ``port=0`` the URL names the port the system chose."""
    import uvicorn

    sock = _bind(host, port)
    config = _uvicorn_config(ScriptedModel(**knobs))
    server = uvicorn.Server(config)

    async def run() -> None:
        async def announce() -> None:
            while not server.started:
                await asyncio.sleep(0.002)
            print(f"scripted model listening on {_url(sock)}", flush=True)

        task = asyncio.create_task(announce())
        await server.serve(sockets=[sock])
        task.cancel()

    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=config.get_loop_factory()) as runner,
    ):
        runner.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tether.gateways.llm.scripted",
        description="The bundled scripted model: a fake OpenAI/Anthropic upstream (not an LLM).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8199, help="0 picks a free port (printed)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before responding")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument("--chunks", type=int, default=None, help="stream the text in N pieces")
    p.add_argument("--fail-after", type=int, default=None, help="break streams after N events")
    p.add_argument("--fail-mode", choices=["abort", "truncate", "error_event"], default="abort")
    p.add_argument("--garbage", choices=["text", "shape"], default=None)
    p.add_argument("--hang-after", type=int, default=None, help="0: never answer")
    p.add_argument("--error-status", type=int, default=None)
    p.add_argument("--api-key", default=None, help="require this upstream key")
    p.add_argument("--record-limit", type=int, default=0, help="requests kept in memory")
    a = p.parse_args(argv)
    serve(
        a.port,
        a.host,
        latency=a.latency,
        chunk_delay=a.chunk_delay,
        chunks=a.chunks,
        fail_after=a.fail_after,
        fail_mode=a.fail_mode,
        garbage=a.garbage,
        hang_after=a.hang_after,
        error_status=a.error_status,
        api_key=a.api_key,
        record_limit=a.record_limit,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
