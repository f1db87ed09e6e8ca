"""The one way gateways open an upstream HTTP pool (aiohttp).

Every gateway session is shared by many agents, so the settings that keep one agent's call
from leaking into another's live here, once: no cookie jar (aiohttp's default jar would replay
an upstream's session cookie on the next agent's request), no proxy or credentials taken from
the environment, and callers pass ``allow_redirects=False`` on each request.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp

__all__ = ["shared_session"]


def shared_session(
    connector: aiohttp.BaseConnector,
    *,
    timeout: aiohttp.ClientTimeout | None = None,
    auto_decompress: bool = True,
    skip_auto_headers: Iterable[str] = ("User-Agent",),
) -> aiohttp.ClientSession:
    """An aiohttp session safe to share between agents (build it inside the running loop)."""
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout if timeout is not None else aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=auto_decompress,
        skip_auto_headers=tuple(skip_auto_headers),
        raise_for_status=False,
    )
