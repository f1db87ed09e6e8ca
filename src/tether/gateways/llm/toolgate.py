"""Enforcement before execution: every tool call a model proposes is decided before the
agent sees it, in whole responses and in streams.

What the agent sees (the same for all three APIs):

* **allowed**: the tool call, unchanged (in a stream: released in one piece once complete);
* **denied**: the call is removed and a text block
  ``[tether] tool call NAME denied: REASONS`` takes its place;
* **escalated** (an approval is needed): the call is removed and a text block
  ``[tether] tool call NAME needs approval ID (QUORUM); retry once it is approved: REASONS``
  takes its place.

When no tool call remains, the stop reason that said "call a tool" becomes the plain one
(Chat ``finish_reason`` ``tool_calls`` -> ``stop``; Anthropic ``stop_reason`` ``tool_use`` ->
``end_turn``), so agent loops end the turn instead of waiting for a tool result. Streams stay
protocol-valid: text deltas pass through as they arrive; tool-call fragments are held until
the call is complete. Chat tool calls are re-indexed from 0 over the calls that remain;
Anthropic blocks keep their index (a text block replaces the tool_use block); Responses
events are renumbered (``sequence_number``) and the final ``response.completed`` carries the
replacement message item.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tether.gateways.llm.errors import GatewayError
from tether.gateways.llm.protocol import Api, usage_of

__all__ = [
    "ChatGate",
    "Gate",
    "MessagesGate",
    "ResponsesGate",
    "SSESplitter",
    "ToolVerdict",
    "gate_for",
    "gate_response",
    "stream_error",
]

# How much of the streamed text before a delta the outbound text hook sees with it.
HOOK_OVERLAP = 1024


@dataclass(frozen=True, slots=True)
class ToolVerdict:
    allowed: bool
    text: str = ""  # the refusal the agent reads, when not allowed


# (tool name, JSON arguments text, call id) -> verdict
ToolDecider = Callable[[str, str, str], Awaitable[ToolVerdict]]
TextHook = Callable[[str], Awaitable[str | None]]  # returns a block reason, or None


class SSESplitter:
    """Splits a byte stream into SSE events (without their blank-line terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    def rest(self) -> bytes:
        return self._buf


def _fields(ev: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one SSE event."""
    if ev.startswith(b"data: ") and b"\n" not in ev:  # a Chat chunk: one data line
        return None, ev[6:].lstrip(b" ")
    name: bytes | None = None
    data: list[bytes] = []
    for line in ev.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, (b"\n".join(data) if data else None)


def _sse(obj: Any, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_error(api: Api, err: GatewayError, seq: int = 0) -> bytes:
    """An in-stream error event each SDK raises as an exception."""
    if api == "messages":
        etype = {429: "rate_limit_error", 403: "permission_error", 504: "timeout_error"}.get(
            err.status, "api_error"
        )
        return _sse({"type": "error", "error": {"type": etype, "message": err.message}}, "error")
    body = {"message": err.message, "type": "api_error", "param": None, "code": err.code}
    if api == "responses":
        doc: dict[str, Any] = {
            "type": "error",
            "error": body,
            "code": err.code,
            "message": err.message,
            "param": None,
            "sequence_number": seq,
        }
        return _sse(doc, "error")
    return _sse({"error": body})


@dataclass
class Gate:
    """Base of the three stream gates; collects what the audit record needs."""

    api: Api
    decide: ToolDecider
    text_hook: TextHook | None = None
    wants_usage: bool = True
    text: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    usage: tuple[int, int] | None = None
    finish: str | None = None
    blocked: str | None = None  # set when an outbound text hook blocked the stream
    complete: bool = False  # the upstream finished the response properly
    _tail: str = ""  # the last HOOK_OVERLAP characters the text hook saw
    # Awaited before the gate waits on anything (a tool decision, the text hook): the relay
    # sends what it has gated so far, so nothing already passed waits behind a decision.
    before_wait: Callable[[], Awaitable[None]] | None = None

    async def feed(self, ev: bytes) -> list[bytes]:
        raise NotImplementedError

    async def end(self) -> list[bytes]:
        """At upstream EOF: held tool calls that never completed are withheld, not released."""
        return []

    def _withheld(self, name: str, call_id: str) -> None:
        self.tools.append(
            {"name": name, "id": call_id, "outcome": "withheld", "why": "stream ended early"}
        )

    async def _verdict(self, name: str, args: str, call_id: str) -> ToolVerdict:
        if self.before_wait is not None:
            await self.before_wait()
        v = await self.decide(name, args, call_id)
        self.tools.append(
            {
                "name": name,
                "id": call_id,
                "arguments": args,
                "outcome": "released" if v.allowed else "refused",
                **({} if v.allowed else {"note": v.text}),
            }
        )
        return v

    async def _text(self, piece: str) -> None:
        self.text.append(piece)
        if self.text_hook is not None and self.blocked is None:
            # The hook sees the delta with the text just before it, so a phrase split across
            # deltas is still seen (a detector on single deltas would miss it silently).
            window = self._tail + piece
            self._tail = window[-HOOK_OVERLAP:]
            if self.before_wait is not None:
                await self.before_wait()
            self.blocked = await self.text_hook(window)

    def assembled(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": "".join(self.text), "tool_calls": self.tools}
        if self.finish is not None:
            out["finish"] = self.finish
        if self.usage is not None:
            out["usage"] = {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}
        out["complete"] = self.complete
        return out


class ChatGate(Gate):
    """Chat Completions chunks (``data: {...}`` ... ``data: [DONE]``)."""

    def __init__(self, decide: ToolDecider, text_hook: TextHook | None, wants_usage: bool) -> None:
        super().__init__("chat", decide, text_hook, wants_usage)
        self.held: dict[int, dict[int, dict[str, Any]]] = {}
        self.last: dict[str, Any] = {}

    def _base(self) -> dict[str, Any]:
        return {k: self.last[k] for k in ("id", "object", "created", "model") if k in self.last}

    async def _release(self, idx: int) -> tuple[list[bytes], bool]:
        calls = self.held.pop(idx, {})
        out: list[bytes] = []
        kept: list[dict[str, Any]] = []
        notes: list[str] = []
        for _, c in sorted(calls.items()):
            args = "".join(c["args"])
            v = await self._verdict(c["name"], args, c["id"])
            if v.allowed:
                kept.append(
                    {
                        "index": len(kept),
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": args},
                    }
                )
            else:
                notes.append(v.text)
        if notes:
            note = ("\n" if self.text else "") + "\n".join(notes)
            self.text.append(note)
            delta = {"content": note}
            out.append(
                _sse(
                    {
                        **self._base(),
                        "choices": [
                            {"index": idx, "delta": delta, "finish_reason": None, "logprobs": None}
                        ],
                    }
                )
            )
        if kept:
            out.append(
                _sse(
                    {
                        **self._base(),
                        "choices": [
                            {
                                "index": idx,
                                "delta": {"tool_calls": kept},
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
            )
        return out, bool(kept)

    async def feed(self, ev: bytes) -> list[bytes]:
        _, data = _fields(ev)
        if data is None:
            return [ev + b"\n\n"]
        if data == b"[DONE]":
            out: list[bytes] = []
            for idx in list(self.held):
                more, _ = await self._release(idx)
                out += more
            self.complete = True
            return [*out, ev + b"\n\n"]
        chunk = orjson.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError("chunk is not an object")
        if chunk.get("error"):
            raise GatewayError(502, "upstream error in stream", "upstream_error")
        self.last = chunk
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_of("chat", usage) or self.usage
        choices = chunk.get("choices")
        modified = False
        pre: list[bytes] = []
        if isinstance(choices, list):
            kept_choices = []
            for ch in choices:
                idx = ch.get("index", 0)
                delta = ch.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        await self._text(content)
                    tcs = delta.pop("tool_calls", None)
                    if tcs:
                        modified = True
                        held = self.held.setdefault(idx, {})
                        for tc in tcs:
                            slot = held.setdefault(
                                tc.get("index", 0), {"id": "", "name": "", "args": []}
                            )
                            if tc.get("id"):
                                slot["id"] = tc["id"]
                            fn = tc.get("function") or {}
                            if fn.get("name"):
                                slot["name"] += fn["name"]
                            if fn.get("arguments"):
                                slot["args"].append(fn["arguments"])
                fr = ch.get("finish_reason")
                if fr is not None:
                    self.finish = fr
                    released, any_kept = await self._release(idx)
                    pre += released
                    if fr == "tool_calls" and not any_kept:
                        ch["finish_reason"] = "stop"
                        self.finish = "stop"
                        modified = True
                elif (
                    modified
                    and isinstance(delta, dict)
                    and not any(v is not None for v in delta.values())
                ):
                    continue  # nothing left in this delta but the held fragments
                kept_choices.append(ch)
            if modified:
                if not kept_choices and not usage:
                    return pre
                chunk["choices"] = kept_choices
        if usage and not choices and not self.wants_usage:
            return pre  # we asked upstream for usage; the agent did not
        if modified:
            return [*pre, _sse(chunk)]
        return [*pre, ev + b"\n\n"]


class MessagesGate(Gate):
    """Anthropic Messages events (``event: NAME`` + ``data: {...}``)."""

    def __init__(self, decide: ToolDecider, text_hook: TextHook | None) -> None:
        super().__init__("messages", decide, text_hook)
        self.held: dict[int, dict[str, Any]] = {}
        self.kept_tools = 0
        self.input_tokens = 0

    async def feed(self, ev: bytes) -> list[bytes]:
        _, data = _fields(ev)
        if data is None:
            return [ev + b"\n\n"]
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("event data is not an object")
        t = doc.get("type")
        if t == "content_block_delta":
            idx = doc.get("index", 0)
            if idx in self.held:
                pj = (doc.get("delta") or {}).get("partial_json")
                if isinstance(pj, str):
                    self.held[idx]["json"].append(pj)
                self.held[idx]["events"].append(ev + b"\n\n")
                return []
            d = doc.get("delta") or {}
            if d.get("type") == "text_delta" and isinstance(d.get("text"), str):
                await self._text(d["text"])
            return [ev + b"\n\n"]
        if t == "content_block_start":
            block = doc.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.held[doc.get("index", 0)] = {
                    "id": str(block.get("id", "")),
                    "name": str(block.get("name", "")),
                    "json": [],
                    "events": [ev + b"\n\n"],
                }
                return []
            if block.get("type") == "text" and block.get("text"):
                await self._text(block["text"])
            return [ev + b"\n\n"]
        if t == "content_block_stop":
            idx = doc.get("index", 0)
            h = self.held.pop(idx, None)
            if h is None:
                return [ev + b"\n\n"]
            args = "".join(h["json"]) or "{}"
            v = await self._verdict(h["name"], args, h["id"])
            if v.allowed:
                self.kept_tools += 1
                return [*h["events"], ev + b"\n\n"]
            self.text.append(v.text)
            return [
                _sse(
                    {
                        "type": "content_block_start",
                        "index": idx,
                        "content_block": {"type": "text", "text": ""},
                    },
                    "content_block_start",
                ),
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": idx,
                        "delta": {"type": "text_delta", "text": v.text},
                    },
                    "content_block_delta",
                ),
                _sse({"type": "content_block_stop", "index": idx}, "content_block_stop"),
            ]
        if t == "message_start":
            u = usage_of("messages", (doc.get("message") or {}).get("usage"))
            if u is not None:
                self.input_tokens = u[0]
                self.usage = u
            return [ev + b"\n\n"]
        if t == "message_delta":
            du = doc.get("usage") or {}
            out_tok = du.get("output_tokens")
            if isinstance(out_tok, int):
                inp = du.get("input_tokens")
                self.usage = (inp if isinstance(inp, int) else self.input_tokens, out_tok)
            d = doc.get("delta") or {}
            self.finish = d.get("stop_reason")
            if d.get("stop_reason") == "tool_use" and self.kept_tools == 0:
                d["stop_reason"] = "end_turn"
                self.finish = "end_turn"
                return [_sse(doc, "message_delta")]
            return [ev + b"\n\n"]
        if t == "message_stop":
            self.complete = True
        elif t == "error":
            raise GatewayError(502, "upstream error in stream", "upstream_error")
        return [ev + b"\n\n"]

    async def end(self) -> list[bytes]:
        for h in self.held.values():
            self._withheld(h["name"], h["id"])
        self.held.clear()
        return []


def _denied_message_item(call_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": f"msg_tether_{call_id}"[:64],
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": (
            [{"type": "output_text", "text": text, "annotations": []}]
            if status == "completed"
            else []
        ),
    }


class ResponsesGate(Gate):
    """OpenAI Responses events (``event: response.*`` + ``data: {..., sequence_number}``)."""

    def __init__(self, decide: ToolDecider, text_hook: TextHook | None) -> None:
        super().__init__("responses", decide, text_hook)
        self.held: dict[int, dict[str, Any]] = {}
        self.replaced: dict[int, dict[str, Any]] = {}
        self.offset = 0
        self.seq = 0

    def _emit(self, doc: dict[str, Any], raw: bytes, name: bytes | None) -> bytes:
        seq = doc.get("sequence_number")
        if isinstance(seq, int):
            self.seq = seq + self.offset
            if self.offset:
                doc["sequence_number"] = self.seq
                return _sse(doc, name.decode() if name else None)
        return raw + b"\n\n"

    def _new(self, doc: dict[str, Any]) -> bytes:
        self.seq += 1
        doc["sequence_number"] = self.seq
        return _sse(doc, str(doc["type"]))

    async def feed(self, ev: bytes) -> list[bytes]:
        name, data = _fields(ev)
        if data is None:
            return [ev + b"\n\n"]
        doc = orjson.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("event data is not an object")
        t = doc.get("type")
        oi_raw = doc.get("output_index")
        oi = oi_raw if isinstance(oi_raw, int) else -1
        if (
            t == "response.output_item.added"
            and (doc.get("item") or {}).get("type") == "function_call"
        ):
            self.held[oi] = {"events": [(doc, ev, name)]}
            return []
        if oi in self.held:
            h = self.held[oi]
            h["events"].append((doc, ev, name))
            if t != "response.output_item.done":
                return []
            del self.held[oi]
            item = doc.get("item") or {}
            call_id = str(item.get("call_id") or item.get("id") or "")
            v = await self._verdict(
                str(item.get("name", "")), str(item.get("arguments", "")), call_id
            )
            if v.allowed:
                return [self._emit(d, r, n) for d, r, n in h["events"]]
            self.text.append(v.text)
            first_seq = h["events"][0][0].get("sequence_number")
            if isinstance(first_seq, int):
                self.seq = first_seq + self.offset - 1
            done_item = _denied_message_item(call_id, v.text)
            self.replaced[oi] = done_item
            item_id = done_item["id"]
            part = {"type": "output_text", "text": "", "annotations": []}
            out = [
                self._new(
                    {
                        "type": "response.output_item.added",
                        "output_index": oi,
                        "item": _denied_message_item(call_id, "", "in_progress"),
                    }
                ),
                self._new(
                    {
                        "type": "response.content_part.added",
                        "item_id": item_id,
                        "output_index": oi,
                        "content_index": 0,
                        "part": part,
                    }
                ),
                self._new(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item_id,
                        "output_index": oi,
                        "content_index": 0,
                        "delta": v.text,
                        "logprobs": [],
                    }
                ),
                self._new(
                    {
                        "type": "response.output_text.done",
                        "item_id": item_id,
                        "output_index": oi,
                        "content_index": 0,
                        "text": v.text,
                        "logprobs": [],
                    }
                ),
                self._new(
                    {
                        "type": "response.content_part.done",
                        "item_id": item_id,
                        "output_index": oi,
                        "content_index": 0,
                        "part": {**part, "text": v.text},
                    }
                ),
                self._new(
                    {"type": "response.output_item.done", "output_index": oi, "item": done_item}
                ),
            ]
            last_seq = doc.get("sequence_number")
            if isinstance(last_seq, int):
                self.offset = self.seq - last_seq
            return out
        if t == "response.output_text.delta" and isinstance(doc.get("delta"), str):
            await self._text(doc["delta"])
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            resp = doc.get("response") or {}
            self.usage = usage_of("responses", resp.get("usage")) or self.usage
            self.finish = str(resp.get("status", t.rsplit(".", 1)[-1]))
            self.complete = True
            output = resp.get("output")
            if self.replaced and isinstance(output, list):
                for i, it in self.replaced.items():
                    if 0 <= i < len(output):
                        output[i] = it
                self.seq = (doc.get("sequence_number") or 0) + self.offset
                doc["sequence_number"] = self.seq
                return [_sse(doc, name.decode() if name else None)]
        elif t == "error":
            raise GatewayError(502, "upstream error in stream", "upstream_error")
        return [self._emit(doc, ev, name)]

    async def end(self) -> list[bytes]:
        for h in self.held.values():
            item = h["events"][0][0].get("item") or {}
            self._withheld(str(item.get("name", "")), str(item.get("call_id", "")))
        self.held.clear()
        return []


def gate_for(api: Api, decide: ToolDecider, text_hook: TextHook | None, wants_usage: bool) -> Gate:
    if api == "chat":
        return ChatGate(decide, text_hook, wants_usage)
    if api == "messages":
        return MessagesGate(decide, text_hook)
    return ResponsesGate(decide, text_hook)


# -- whole (non-streaming) responses -------------------------------------------------------------


async def gate_response(
    api: Api, doc: dict[str, Any], decide: ToolDecider
) -> tuple[bool, list[dict[str, Any]]]:
    """Decide every tool call in a whole response, editing ``doc`` in place.
    Returns (modified, tool records for the audit)."""
    records: list[dict[str, Any]] = []
    modified = False

    async def verdict(name: str, args: str, call_id: str) -> ToolVerdict:
        v = await decide(name, args, call_id)
        rec: dict[str, Any] = {
            "name": name,
            "id": call_id,
            "arguments": args,
            "outcome": "released" if v.allowed else "refused",
        }
        if not v.allowed:
            rec["note"] = v.text
        records.append(rec)
        return v

    if api == "chat":
        for ch in doc.get("choices") or []:
            msg = ch.get("message") if isinstance(ch, dict) else None
            if not isinstance(msg, dict) or not msg.get("tool_calls"):
                continue
            kept: list[Any] = []
            notes: list[str] = []
            for tc in msg["tool_calls"]:
                fn = tc.get("function") or {}
                v = await verdict(
                    str(fn.get("name", "")), str(fn.get("arguments", "")), str(tc.get("id", ""))
                )
                if v.allowed:
                    kept.append(tc)
                else:
                    notes.append(v.text)
            if notes:
                modified = True
                content = msg.get("content") or ""
                msg["content"] = content + ("\n" if content else "") + "\n".join(notes)
                if kept:
                    msg["tool_calls"] = kept
                else:
                    msg.pop("tool_calls", None)
                    if ch.get("finish_reason") == "tool_calls":
                        ch["finish_reason"] = "stop"
    elif api == "messages":
        content = doc.get("content")
        if isinstance(content, list):
            kept_tools = 0
            for i, block in enumerate(content):
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    v = await verdict(
                        str(block.get("name", "")),
                        orjson.dumps(block.get("input", {})).decode(),
                        str(block.get("id", "")),
                    )
                    if v.allowed:
                        kept_tools += 1
                    else:
                        content[i] = {"type": "text", "text": v.text}
                        modified = True
            if modified and kept_tools == 0 and doc.get("stop_reason") == "tool_use":
                doc["stop_reason"] = "end_turn"
    else:
        output = doc.get("output")
        if isinstance(output, list):
            for i, item in enumerate(output):
                if isinstance(item, dict) and item.get("type") == "function_call":
                    call_id = str(item.get("call_id") or item.get("id") or "")
                    v = await verdict(
                        str(item.get("name", "")), str(item.get("arguments", "")), call_id
                    )
                    if not v.allowed:
                        output[i] = _denied_message_item(call_id, v.text)
                        modified = True
    return modified, records
