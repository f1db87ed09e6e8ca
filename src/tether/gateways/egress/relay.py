"""The byte pump behind an established tunnel: both directions at once, half-close aware,
one idle timer for the pair, and a count of what went each way.

Once the tunnel is up, both transports are switched from their stream protocols to a pair
of small protocols that write each chunk straight to the other side (``data_received`` ->
``transport.write``), with flow control by pausing the reading side when the writing side's
buffer is full. That avoids a task wake-up per chunk per direction, which is most of the cost
of a stream-based pump on a keep-alive request.

A side that sends EOF gets its EOF passed on (``write_eof``) and the other direction keeps
flowing until it ends too, so request/response protocols that half-close work. A reset on
either side ends both. The idle timer is shared: a long download with a silent uplink is not
idle.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

__all__ = ["CHUNK", "RelayResult", "relay"]

CHUNK = 256 * 1024
_WRITE_HIGH = 512 * 1024  # a side's write buffer above this pauses reading from the other


@dataclass(slots=True)
class RelayResult:
    bytes_up: int = 0  # client -> destination
    bytes_down: int = 0  # destination -> client
    ended: str = (
        ""  # client_closed | upstream_closed | client_reset | upstream_reset | idle_timeout
    )
    error: str | None = None


class _Side(asyncio.Protocol):
    """The protocol on one transport; ``peer`` is the other side's transport."""

    def __init__(self, pump: _Pump, name: str, up: bool) -> None:
        self.pump = pump
        self.name = name
        self.up = up  # bytes read here go client -> destination
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.eof = False

    def data_received(self, data: bytes) -> None:
        pump = self.pump
        if self.up:
            pump.result.bytes_up += len(data)
        else:
            pump.result.bytes_down += len(data)
        pump.last = pump.loop.time()
        assert self.peer is not None
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.is_closing():
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                if peer.can_write_eof():
                    peer.write_eof()
        self.pump.closed(self.name)
        return True  # keep our side open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.pump.reset(self.name, exc)
        elif not self.eof:
            self.pump.closed(self.name)
            self.pump.finish(f"{self.name}_closed")

    # The transport *we* write to is full / drained: pause / resume reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None:
            with contextlib.suppress(Exception):
                self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            with contextlib.suppress(Exception):
                self.peer.resume_reading()


class _Pump:
    def __init__(self, loop: asyncio.AbstractEventLoop, result: RelayResult, idle: float) -> None:
        self.loop = loop
        self.result = result
        self.idle = idle
        self.done: asyncio.Future[None] = loop.create_future()
        self.last = loop.time()
        self.eofs: set[str] = set()
        self.timer = loop.call_later(idle, self._tick)

    def _tick(self) -> None:
        if self.done.done():
            return
        remaining = self.last + self.idle - self.loop.time()
        if remaining > 0:
            self.timer = self.loop.call_later(remaining, self._tick)
            return
        self.finish("idle_timeout", override=True)

    def closed(self, name: str) -> None:
        if not self.result.ended:
            self.result.ended = f"{name}_closed"  # the side that closed first
        self.eofs.add(name)
        if len(self.eofs) == 2:
            self.finish(self.result.ended)

    def reset(self, name: str, exc: Exception) -> None:
        self.result.error = f"{name}: {type(exc).__name__}"
        self.finish(f"{name}_reset", override=True)

    def finish(self, ended: str, override: bool = False) -> None:
        if self.done.done():
            return
        if override or not self.result.ended:
            self.result.ended = ended
        self.timer.cancel()
        self.done.set_result(None)


def _buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Bytes the stream already read but nobody consumed (e.g. a TLS ClientHello sent right
    behind the CONNECT), and whether it saw EOF. StreamReader has no public way to take its
    buffer without waiting, so this reads its two documented-by-use attributes."""
    buf: Any = getattr(reader, "_buffer", b"")
    data = bytes(buf)
    if data:
        buf.clear()
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False))


async def relay(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    idle_timeout: float,
    result: RelayResult | None = None,
) -> RelayResult:
    """Relay until both directions have ended, either side resets, or nothing moved for
    ``idle_timeout`` seconds. ``result`` is filled in as bytes
    move (so a caller that is cancelled mid-relay still knows the counts). Both transports
    are closed when it returns."""
    result = result if result is not None else RelayResult()
    loop = asyncio.get_running_loop()
    pump = _Pump(loop, result, idle_timeout)
    ct: Any = client_w.transport
    ut: Any = up_w.transport
    client = _Side(pump, "client", up=True)
    upstream = _Side(pump, "upstream", up=False)
    client.transport, client.peer = ct, ut
    upstream.transport, upstream.peer = ut, ct
    try:
        for t in (ct, ut):
            with contextlib.suppress(Exception):
                t.set_write_buffer_limits(high=_WRITE_HIGH)
        pending_up, client_eof = _buffered(client_r)
        pending_down, up_eof = _buffered(up_r)
        ct.set_protocol(client)
        ut.set_protocol(upstream)
        if pending_up:
            client.data_received(pending_up)
        if pending_down:
            upstream.data_received(pending_down)
        if client_eof:
            client.eof_received()
        if up_eof:
            upstream.eof_received()
        for t in (ct, ut):
            if t.is_closing():
                continue
            with contextlib.suppress(Exception):
                t.resume_reading()  # a stream protocol may have paused it
        if ct.is_closing() and not pump.done.done():
            pump.finish("client_closed")
        if ut.is_closing() and not pump.done.done():
            pump.finish("upstream_closed")
        await pump.done
        return result
    except asyncio.CancelledError:
        pump.finish("gateway_closed", override=True)
        raise
    finally:
        pump.timer.cancel()
        for t in (ct, ut):
            with contextlib.suppress(Exception):
                t.close()
