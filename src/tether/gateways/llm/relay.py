"""The streamed answer's way to the agent: upstream reads -> stream gate -> agent, as they come.

It runs in the request's own task. The two things that may end a stream early do not need a
task or a context object per read:

* a client disconnect: one watcher task per call (it waits on ``receive``; started only once
  the call has run ``WATCH_AFTER``) cancels the request task while the guard is armed (the
  upstream call, the relay);
* the idle timeout: one loop timer per stream, pushed forward instead of re-armed per read; it
  cancels the request task only while the relay waits for upstream bytes (a tool call held for
  an approval inside the gate is not "idle").

A cancellation the guard made is taken back (``Task.uncancel``) by whoever handles it, so a
cancellation from elsewhere (server shutdown) still propagates.

What the agent gets and when (each item is one ``send``, one socket write; a write costs the
gateway a system call and wakes the agent, so events that arrived together leave together):

* the SSE head, once the request record is durable (the gateway sends it);
* the first event of an upstream read that carries text goes out as soon as the gate has
  passed it, with any events before it (held tool-call fragments stay held by the gate): it
  does not wait for the rest of the read to be gated;
* what follows in that read goes out when the read is used up, or before the gate waits on
  anything (a tool decision, an inspector): nothing waits for the upstream's next bytes, and
  nothing already gated waits behind a decision;
* the end of the stream (an error event, if any, and the terminating chunk) is one write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import orjson

from tether.gateways.llm.errors import GatewayError
from tether.gateways.llm.protocol import Api
from tether.gateways.llm.toolgate import Gate, SSESplitter, stream_error
from tether.gateways.llm.upstream import UpstreamFailed, UpstreamTimeout

__all__ = ["WATCH_AFTER", "CallGuard", "Downstream", "relay", "wait_disconnect"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

# A timer may fire a little early (the loop's clock granularity): within this, it is due.
_EARLY = 0.001
# A call older than this gets its disconnect watcher (see CallGuard).
WATCH_AFTER = 0.002


class _Chunks(Protocol):
    def aiter_raw(self) -> AsyncIterator[bytes]: ...


async def wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


class CallGuard:
    """One call's disconnect watcher and, for a stream, its idle timer.

    Armed, a disconnect cancels the request task (``why`` = ``"disconnect"``); so does the idle
    timer when the relay has waited ``idle`` seconds for upstream bytes (``why`` = ``"idle"``).
    Disarmed (``armed = False``: while the request record is awaited, once the stream is
    done), a disconnect is only noted (``gone``). It cancels at most once.

    The watcher is a task (only ``receive`` says a client left), started by the guard's timer
    once the call has run :data:`WATCH_AFTER`: a call to a fast upstream is over before then
    and never pays for it (a task, two steps and a cancellation: ~30 us of loop time on the
    2-core bench machine, half of it before the first byte); a client that leaves sooner is
    noticed then, as ``receive`` still says so."""

    __slots__ = (
        "_base",
        "_loop",
        "_receive",
        "_task",
        "_timer",
        "_timing",
        "_watch",
        "armed",
        "gone",
        "idle",
        "reading_since",
        "why",
    )

    def __init__(self, receive: Receive, idle: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._base = task.cancelling()
        self._loop = loop = asyncio.get_running_loop()
        self._receive = receive
        self._watch: asyncio.Task[None] | None = None
        self._timing = False  # the relay's reads are timed
        self.idle = idle
        self.armed = True
        self.gone = False
        self.why: str | None = None
        self.reading_since = 0.0  # loop time the current upstream read began; 0: not reading
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            loop.time() + WATCH_AFTER, self._on_timer
        )

    def _on_disconnect(self, w: asyncio.Future[None]) -> None:
        if w.cancelled() or w.exception() is not None:
            return
        self.gone = True
        if self.armed:
            self._cancel("disconnect")

    def _cancel(self, why: str) -> None:
        self.armed = False
        self.why = why
        self._task.cancel()

    def time_reads(self) -> None:
        """Arm the guard and time the relay's reads (it marks them in ``reading_since``). A
        disconnect noted while disarmed cancels now."""
        self.armed = True
        if self.gone and self.why is None:
            self._cancel("disconnect")
        self._timing = True
        if self._timer is None:  # else the watcher's start comes first, then the reads
            self._timer = self._loop.call_at(self._loop.time() + self.idle, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._watch is None:
            self._watch = self._loop.create_task(wait_disconnect(self._receive))
            self._watch.add_done_callback(self._on_disconnect)
        if not self._timing:
            return
        since = self.reading_since
        now = self._loop.time()
        if self.armed and since and now >= since + self.idle - _EARLY:
            self._cancel("idle")
            return
        self._timer = self._loop.call_at((since or now) + self.idle, self._on_timer)

    def took_back(self, why: str) -> bool:
        """In a CancelledError handler: was this cancellation the guard's own, for ``why``? If
        so it is taken back (the task is no longer cancelling) and the caller goes on."""
        return self.why == why and self._task.uncancel() <= self._base

    def close(self) -> None:
        """Disarm for good: stop the watcher and the timer."""
        self.armed = False
        self._timing = False
        if self._watch is not None:
            self._watch.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Downstream:
    """The agent's side of a stream, once its SSE head is out."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def write(self, parts: list[bytes]) -> None:
        """Send ``parts`` as one body chunk and empty the list."""
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def end(self, body: bytes) -> None:
        """The last bytes and the end of the stream, in one write; never raises (the agent may
        be gone)."""
        with contextlib.suppress(Exception):
            await self._send({"type": "http.response.body", "body": body, "more_body": False})


async def relay(
    api: Api,
    resp: _Chunks,
    gate: Gate,
    raw: list[bytes],
    down: Downstream,
    guard: CallGuard,
    read_timeout: float,
) -> tuple[str, str | None, bytes]:
    """Upstream events -> ``gate`` -> agent, as they arrive; every upstream byte is appended to
    ``raw`` (the record). Returns (status, error note, the bytes that end the stream), the last
    to be sent by the caller with the end of the stream once the guard is closed. A client
    disconnect propagates as the guard's CancelledError."""
    splitter = SSESplitter()
    it = resp.aiter_raw().__aiter__()
    clock = asyncio.get_running_loop().time
    text = gate.text
    out: list[bytes] = []
    status, note, last = "ok", None, b""

    async def flush() -> None:
        if out:
            await down.write(out)

    gate.before_wait = flush
    try:
        while True:
            guard.reading_since = clock()
            try:
                data = await it.__anext__()
            except StopAsyncIteration:
                break
            finally:
                guard.reading_since = 0.0
            raw.append(data)
            first = True  # the read's first text not seen yet
            for ev in splitter.feed(data):
                seen = len(text)
                got = await gate.feed(ev)
                if gate.blocked:  # this event's text is never sent
                    raise GatewayError(
                        403, f"response blocked by {gate.blocked}", "inspection_blocked"
                    )
                if got:
                    out += got
                    if first and len(text) != seen:  # to the agent now, not after the read
                        first = False
                        await down.write(out)
            if out:
                await down.write(out)
        tail = await gate.end()
        if not gate.complete:
            status, note = "upstream_cut", "the upstream stream ended before the response"
            tail.append(
                stream_error(api, GatewayError(502, "upstream stream ended early", "upstream_cut"))
            )
        last = b"".join(tail)
    except asyncio.CancelledError:
        if not guard.took_back("idle"):
            raise
        status, note = "upstream_timeout", f"no upstream bytes for {guard.idle}s"
        last = stream_error(
            api, GatewayError(504, f"upstream stream idle for {guard.idle}s", "upstream_timeout")
        )
    except UpstreamTimeout:  # the upstream client's own read timeout came first
        idle = min(guard.idle, read_timeout)
        status, note = "upstream_timeout", f"no upstream bytes for {idle}s"
        last = stream_error(
            api, GatewayError(504, f"upstream stream idle for {idle}s", "upstream_timeout")
        )
    except GatewayError as e:
        status, note = e.code, e.message
        last = stream_error(api, e)
    except (ValueError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        status, note = "upstream_garbage", "the upstream sent an event that is not valid"
        last = stream_error(
            api, GatewayError(502, "upstream sent an invalid stream event", "upstream_garbage")
        )
    except UpstreamFailed as e:
        status, note = "upstream_failed", f"upstream stream failed ({type(e).__name__})"
        last = stream_error(api, GatewayError(502, "upstream stream failed", "upstream_failed"))
    if out:  # gated before the error: it goes out first
        last = b"".join(out) + last
    return status, note, last
