"""HTTP/1.1 framing on asyncio streams: read a bounded head, copy a framed request body.

Heads are read line by line so that the size and line-count limits bite as soon as they are
crossed (a header flood is cut at line ``max_lines + 1``, not after it has all arrived).
Request bodies are copied by their framing (``Content-Length`` or chunked), never "until the
client closes", so the one request the gateway decided is the only one the destination sees.
"""

from __future__ import annotations

import asyncio
import re

from tether.gateways.egress.protocol import ProxyError

__all__ = ["ClientGone", "copy_chunked", "copy_exact", "read_head"]

_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?\r\n$")
COPY = 64 * 1024
MAX_CHUNK_LINE = 4096


class ClientGone(Exception):
    """The peer closed before a complete head. ``partial``: it had sent part of one."""

    def __init__(self, partial: bool) -> None:
        super().__init__("peer closed before a complete head")
        self.partial = partial


async def read_head(reader: asyncio.StreamReader, max_bytes: int, max_lines: int) -> bytes:
    """The head up to and including its empty line. Raises ProxyError (400 / 431) or
    ClientGone."""
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProxyError(
                431, f"request head is larger than {max_bytes} bytes", "header_too_large"
            ) from None
        except asyncio.IncompleteReadError as e:
            raise ClientGone(bool(parts or e.partial)) from None
        size += len(line)
        if size > max_bytes:
            raise ProxyError(
                431, f"request head is larger than {max_bytes} bytes", "header_too_large"
            )
        if not line.endswith(b"\r\n"):
            raise ProxyError(400, "header lines must end in CRLF", "bad_request")
        parts.append(line)
        if line == b"\r\n":
            if len(parts) == 1:
                raise ProxyError(400, "malformed request line: empty", "bad_request")
            return b"".join(parts)
        if len(parts) > max_lines + 1:
            raise ProxyError(431, f"more than {max_lines} header lines", "too_many_headers")


async def copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> int:
    """Copy exactly ``n`` body bytes. Raises ClientGone if the peer ends early."""
    left = n
    while left > 0:
        data = await reader.read(min(COPY, left))
        if not data:
            raise ClientGone(True)
        writer.write(data)
        await writer.drain()
        left -= len(data)
    return n


async def copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy a chunked body verbatim (sizes, extensions, trailers), up to its last chunk.
    Raises ProxyError 400 on a malformed chunk, ClientGone if the peer ends early."""
    total = 0

    async def line() -> bytes:
        try:
            data = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise ClientGone(True) from None
        except asyncio.LimitOverrunError:
            raise ProxyError(400, "malformed chunked body (line too long)", "bad_framing") from None
        if len(data) > MAX_CHUNK_LINE:
            raise ProxyError(400, "malformed chunked body (line too long)", "bad_framing")
        return data

    while True:
        head = await line()
        m = _CHUNK_SIZE.match(head)
        if m is None:
            raise ProxyError(400, "malformed chunked body (chunk size)", "bad_framing")
        size = int(m.group(1), 16)
        writer.write(head)
        total += len(head)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await line()
                if not trailer.endswith(b"\r\n"):
                    raise ProxyError(400, "malformed chunked body (trailer)", "bad_framing")
                writer.write(trailer)
                total += len(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return total
        total += await copy_exact(reader, writer, size)
        end = await line()
        if end != b"\r\n":
            raise ProxyError(400, "malformed chunked body (chunk end)", "bad_framing")
        writer.write(end)
        total += len(end)
