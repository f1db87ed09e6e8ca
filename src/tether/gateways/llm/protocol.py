"""What the gateway needs to know about each API's request: validated once, re-serialised.

The gateway never forwards the agent's raw bytes: it parses the body (orjson; a duplicated
key keeps its last value), checks the fields it decides on, rewrites ``model`` to the routed
upstream name and serialises the parsed object. So the model policy decided on is exactly the
model sent upstream, whatever else the body holds. Unknown fields are forwarded (SDKs add
parameters faster than any gateway); fields the gateway decides on must have the right type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tether.gateways.llm.errors import GatewayError

__all__ = ["Api", "Req", "parse_request", "usage_of"]

Api = Literal["chat", "responses", "messages"]
MAX_TOOLS = 512
MAX_MODEL_CHARS = 256


@dataclass(slots=True)
class Req:
    api: Api
    doc: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None
    tools: tuple[str, ...]
    wants_usage: bool = True  # chat streams: did the client ask for the usage chunk?


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param)


def _int_field(doc: dict[str, Any], name: str) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(f"{name} must be a non-negative integer", name)
    return v


def _tool_names(doc: dict[str, Any], api: Api) -> tuple[str, ...]:
    tools = doc.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise _bad("tools must be an array", "tools")
    if len(tools) > MAX_TOOLS:
        raise _bad(f"at most {MAX_TOOLS} tools", "tools")
    names: list[str] = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise _bad(f"tools[{i}] must be an object", f"tools[{i}]")
        if api == "chat":
            fn = t.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            name = name if name is not None else t.get("type")
        else:
            name = t.get("name", t.get("type"))
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}] needs a name", f"tools[{i}]")
        names.append(name)
    return tuple(names)


def parse_request(api: Api, doc: Any) -> Req:
    """Validate the fields the gateway decides on. Raises GatewayError(400)."""
    if not isinstance(doc, dict):
        raise _bad("request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model")
    if len(model) > MAX_MODEL_CHARS or not model.isprintable():
        raise _bad("model name is too long or has control characters", "model")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    wants_usage = True
    if api == "chat":
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("messages must be a non-empty array", "messages")
        max_tokens = _int_field(doc, "max_completion_tokens")
        mt = _int_field(doc, "max_tokens")
        max_tokens = max_tokens if max_tokens is not None else mt
        opts = doc.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options must be an object", "stream_options")
        wants_usage = bool(opts and opts.get("include_usage"))
        n = _int_field(doc, "n")
        if n is not None and not 1 <= n <= 16:
            raise _bad("n must be between 1 and 16", "n")
    elif api == "responses":
        inp = doc.get("input")
        if inp is not None and not isinstance(inp, str | list):
            raise _bad("input must be a string or an array", "input")
        max_tokens = _int_field(doc, "max_output_tokens")
    else:
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("messages: must be a non-empty array", "messages")
        max_tokens = _int_field(doc, "max_tokens")
        if max_tokens is None:
            raise _bad("max_tokens: field required", "max_tokens")
    return Req(api, doc, model, stream, max_tokens, _tool_names(doc, api), wants_usage)


def usage_of(api: Api, usage: Any) -> tuple[int, int] | None:
    """(input tokens, output tokens) from an API's usage object, if it has one."""
    if not isinstance(usage, dict):
        return None
    if api == "chat":
        i, o = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        i, o = usage.get("input_tokens"), usage.get("output_tokens")
        if api == "messages":
            for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                x = usage.get(extra)
                if isinstance(x, int) and isinstance(i, int):
                    i += x
    if not isinstance(i, int) and not isinstance(o, int):
        return None
    return (i if isinstance(i, int) else 0, o if isinstance(o, int) else 0)
