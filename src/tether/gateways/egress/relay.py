"""The byte pump behind an established tunnel: both directions at once, half-close aware,
one idle timer for the pair, and a count of what went each way.

A side that sends EOF gets its EOF passed on (``write_eof``) and the other direction keeps
flowing until it ends too, so request/response protocols that half-close work. A reset on
either side ends both. The idle timer is shared: a long download with a silent uplink is not
idle.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

__all__ = ["CHUNK", "RelayResult", "relay"]

CHUNK = 256 * 1024


@dataclass(slots=True)
class RelayResult:
    bytes_up: int = 0  # client -> destination
    bytes_down: int = 0  # destination -> client
    ended: str = (
        ""  # client_closed | upstream_closed | client_reset | upstream_reset | idle_timeout
    )
    error: str | None = None


class _Idle:
    __slots__ = ("last", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last = loop.time()

    async def watch(self, idle: float) -> str:
        while True:
            remaining = self.last + idle - self.loop.time()
            if remaining <= 0:
                return "idle_timeout"
            await asyncio.sleep(remaining)


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    src_name: str,
    dst_name: str,
    result: RelayResult,
    up: bool,
    idle: _Idle,
) -> str:
    read = src.read
    write = dst.write
    drain = dst.drain
    loop = idle.loop
    while True:
        try:
            data = await read(CHUNK)
        except (ConnectionError, OSError) as e:
            result.error = f"{src_name}: {type(e).__name__}"
            return f"{src_name}_reset"
        if not data:
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()
            return f"{src_name}_closed"
        n = len(data)
        if up:
            result.bytes_up += n
        else:
            result.bytes_down += n
        idle.last = loop.time()
        try:
            write(data)
            await drain()
        except (ConnectionError, OSError) as e:
            result.error = f"{dst_name}: {type(e).__name__}"
            return f"{dst_name}_reset"


async def relay(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    idle_timeout: float,
    result: RelayResult | None = None,
) -> RelayResult:
    """Relay until both directions have ended, either side resets, or nothing moved for
    ``idle_timeout`` seconds. ``result`` is filled in as bytes move (so a caller that is
    cancelled mid-relay still knows the counts)."""
    result = result if result is not None else RelayResult()
    idle = _Idle(asyncio.get_running_loop())
    up = asyncio.ensure_future(_pump(client_r, up_w, "client", "upstream", result, True, idle))
    down = asyncio.ensure_future(_pump(up_r, client_w, "upstream", "client", result, False, idle))
    watch = asyncio.ensure_future(idle.watch(idle_timeout))
    pending: set[asyncio.Future[str]] = {up, down, watch}
    try:
        while up in pending or down in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                reason = task.result()
                if not reason.endswith("_closed"):
                    result.ended = reason  # a reset or the idle timer ends both directions
                    return result
                if not result.ended:
                    result.ended = reason  # the side that closed first
        return result
    finally:
        for task in (up, down, watch):
            task.cancel()
        await asyncio.gather(up, down, watch, return_exceptions=True)
