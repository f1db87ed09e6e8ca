"""The inspection hook for tool calls: detectors see a call's arguments before it is forwarded
and its result before the agent does.

Same contract as the LLM gateway's (:mod:`tether.gateways.llm.inspect`): return ``None`` or
a :class:`Finding`; ``block`` refuses the call (JSON-RPC error ``-32056``), ``flag`` is only
recorded. With no inspector configured the gateway never calls into this module: the list is
empty and each hook site is one truth test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tether.gateways.llm.inspect import Finding
from tether.identity.claims import TokenClaims

__all__ = ["Finding", "ToolContext", "ToolInspector"]


@dataclass(frozen=True, slots=True)
class ToolContext:
    server: str
    tool: str
    principal: TokenClaims
    request_id: str


class ToolInspector(Protocol):
    async def call(self, ctx: ToolContext, arguments: Mapping[str, Any]) -> Finding | None:
        """The call's arguments, after policy allowed it and before it is forwarded."""
        ...

    async def result(self, ctx: ToolContext, result: Mapping[str, Any]) -> Finding | None:
        """The upstream's ``tools/call`` result, before the agent receives it."""
        ...
