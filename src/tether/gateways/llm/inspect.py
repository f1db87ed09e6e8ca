"""The inspection hook: detectors look at what goes into a model and what comes out.

An :class:`Inspector` sees inbound content (the request's messages, including tool results)
before the call is forwarded, and outbound content (each model text delta, each proposed tool
call) before the agent receives it. It returns ``None`` (nothing to say) or a
:class:`Finding`. ``block`` findings refuse the call (inbound), end the stream with an error
(outbound text) or deny the tool call; ``flag`` findings are only recorded.

With no inspector configured the gateway never calls into this module on the hot path: the
list is empty and every hook site is guarded by one truth test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tether.identity.claims import TokenClaims

__all__ = ["Finding", "InspectContext", "Inspector"]


@dataclass(frozen=True, slots=True)
class InspectContext:
    api: str  # chat / responses / messages
    model: str
    principal: TokenClaims
    request_id: str


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str
    action: Literal["flag", "block"]
    reason: str


class Inspector(Protocol):
    async def inbound(self, ctx: InspectContext, body: Mapping[str, Any]) -> Finding | None:
        """The parsed request body (messages, tools, tool results)."""
        ...

    async def outbound_text(self, ctx: InspectContext, text: str) -> Finding | None:
        """Model text: a whole message, or for a stream each delta with up to 1 KiB of the
        text before it (so a phrase split across deltas is seen; a detector that must not
        count a match twice tracks what it has already reported)."""
        ...

    async def outbound_tool(
        self, ctx: InspectContext, name: str, arguments: Mapping[str, Any]
    ) -> Finding | None:
        """A tool call the model proposes, complete, before it is decided."""
        ...
