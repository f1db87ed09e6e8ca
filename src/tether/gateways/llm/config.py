"""The ``[llm]`` table of ``config.toml``: limits, upstream providers and model routes.

::

    [llm]
    max_body_bytes = 4194304          # request bodies above this are refused (413)
    connect_timeout = "5s"            # upstream TCP/TLS connect
    read_timeout = "600s"             # upstream response (non-streaming) / between chunks
    stream_idle_timeout = "120s"      # a stream with no bytes for this long is cut
    escalation_hold = "0s"            # how long an escalated call waits for its approval
    default_max_tokens = 4096         # reservation estimate when a request names none
    max_connections = 256             # pooled keep-alive connections per provider

    [llm.providers.openai]
    kind = "openai"                   # openai | anthropic | openai-compatible | scripted
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"    # or api_key_file = "/run/secrets/openai"

    [llm.providers.local]
    kind = "openai-compatible"        # vLLM, llama.cpp, Ollama ...
    base_url = "http://127.0.0.1:8000/v1"
    anthropic_messages = true         # it also serves Anthropic Messages at <base_url>/messages

    [[llm.routes]]
    model = "gpt-4o*"                 # glob on the model name the agent asks for
    provider = "openai"
    upstream_model = "gpt-4o-2024-08-06"   # optional: default is the name asked for
    usd_per_mtok_in = 2.5             # optional prices, needed by budget:usd
    usd_per_mtok_out = 10.0

Upstream keys are read from the environment or a secret file only. A key written in
``config.toml`` itself is refused. With no providers configured the bundled ``scripted``
model serves every model name (in-process, labelled ``scripted`` everywhere).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, cast

from tether.config import parse_duration
from tether.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DEFAULT_MAX_TOKENS",
    "DEFAULT_ESCALATION_HOLD",
    "DEFAULT_LLM_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_STREAM_IDLE_TIMEOUT",
    "LLMSettings",
    "Provider",
    "ProviderKind",
    "Route",
    "Secret",
    "parse_llm_config",
]

DEFAULT_LLM_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_STREAM_IDLE_TIMEOUT = 120.0
DEFAULT_ESCALATION_HOLD = 0.0
DEFAULT_DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_CONNECTIONS = 256
ROUTE_CACHE_SIZE = 4096

ProviderKind = Literal["openai", "anthropic", "openai-compatible", "scripted"]
PROVIDER_KINDS: tuple[str, ...] = ("openai", "anthropic", "openai-compatible", "scripted")
_DEFAULT_BASE = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
_KEY_NAMES = ("api_key", "key", "token", "secret", "password")


class Secret:
    """An upstream credential: never printed, never in a repr, an error or the audit log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    kind: ProviderKind
    base_url: str
    api_key: Secret | None = field(default=None, repr=False)
    key_source: str = ""  # "env:NAME" / "file:PATH" (for docs and errors; not the key)
    anthropic_messages: bool = False  # an openai-compatible server that also speaks Messages

    @property
    def protocol(self) -> Literal["openai", "anthropic", "both"]:
        if self.kind == "anthropic":
            return "anthropic"
        if self.kind == "scripted" or self.anthropic_messages:
            return "both"
        return "openai"


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    provider: str
    upstream_model: str | None = None
    usd_per_mtok_in: Decimal | None = None
    usd_per_mtok_out: Decimal | None = None

    def upstream_name(self, requested: str) -> str:
        return self.upstream_model or requested


@dataclass(frozen=True)
class LLMSettings:
    providers: Mapping[str, Provider]
    routes: tuple[Route, ...]
    max_body_bytes: int = DEFAULT_LLM_MAX_BODY_BYTES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    escalation_hold: float = DEFAULT_ESCALATION_HOLD
    default_max_tokens: int = DEFAULT_DEFAULT_MAX_TOKENS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _cache: dict[str, Route | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def scripted_only(self) -> bool:
        return all(p.kind == "scripted" for p in self.providers.values())

    def route(self, model: str) -> Route | None:
        """The first route whose pattern matches ``model`` (memoised, bounded)."""
        cache = self._cache
        try:
            return cache[model]
        except KeyError:
            pass
        found = None
        for r in self.routes:
            if r.pattern == model or fnmatchcase(model, r.pattern):
                found = r
                break
        if len(cache) >= ROUTE_CACHE_SIZE:
            cache.clear()
        cache[model] = found
        return found

    def listed_models(self) -> list[str]:
        """Route patterns without a wildcard: the concrete names ``/v1/models`` can list."""
        return [r.pattern for r in self.routes if "*" not in r.pattern and "?" not in r.pattern]


def _duration(table: Mapping[str, Any], key: str, default: float, zero_ok: bool = False) -> float:
    if key not in table:
        return default
    raw = table[key]
    if zero_ok and raw in (0, "0", "0s", "0ms"):
        return 0.0
    return parse_duration(raw)


def _price(raw: Any, where: str) -> Decimal | None:
    if raw is None:
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation as e:
        raise ConfigError(f"{where}: not a number: {raw!r}") from e
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{where}: must be a non-negative number")
    return value


def _load_key(
    name: str, table: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[Secret | None, str]:
    for k in _KEY_NAMES:
        if k in table:
            raise ConfigError(
                f"[llm.providers.{name}] has {k!r}: upstream keys never live in config.toml",
                hint='use api_key_env = "VAR" or api_key_file = "/path/to/secret"',
            )
    env_name = table.get("api_key_env")
    file_name = table.get("api_key_file")
    if env_name is not None and file_name is not None:
        raise ConfigError(f"[llm.providers.{name}]: give api_key_env or api_key_file, not both")
    if env_name is not None:
        value = env.get(str(env_name))
        if not value:
            raise ConfigError(
                f"[llm.providers.{name}]: environment variable {env_name!s} is not set",
                hint="export it before 'tether serve'",
            )
        return Secret(value.strip()), f"env:{env_name}"
    if file_name is not None:
        path = Path(str(file_name)).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"[llm.providers.{name}]: cannot read api_key_file {path}: {e.strerror}"
            ) from e
        if not value:
            raise ConfigError(f"[llm.providers.{name}]: api_key_file {path} is empty")
        return Secret(value), f"file:{path}"
    return None, ""


def parse_llm_config(
    table: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> LLMSettings:
    """Validate the raw ``[llm]`` table (``config.extra["llm"]``). Raises ConfigError."""
    table = dict(table or {})
    env = os.environ if env is None else env
    try:
        providers: dict[str, Provider] = {}
        for name, ptable in dict(table.get("providers", {})).items():
            if not isinstance(ptable, Mapping):
                raise ConfigError(f"[llm.providers.{name}] must be a table")
            kind = str(ptable.get("kind", "openai-compatible"))
            if kind not in PROVIDER_KINDS:
                raise ConfigError(
                    f"[llm.providers.{name}] kind {kind!r} is not one of "
                    + ", ".join(PROVIDER_KINDS)
                )
            base = str(ptable.get("base_url", _DEFAULT_BASE.get(kind, ""))).rstrip("/")
            if kind != "scripted" and not base.startswith(("http://", "https://")):
                raise ConfigError(f'[llm.providers.{name}] needs base_url = "http(s)://..."')
            key, source = _load_key(str(name), ptable, env)
            messages = ptable.get("anthropic_messages", False)
            if not isinstance(messages, bool):
                raise ConfigError(f"[llm.providers.{name}] anthropic_messages must be true/false")
            if messages and kind != "openai-compatible":
                raise ConfigError(
                    f"[llm.providers.{name}] anthropic_messages is for openai-compatible servers"
                )
            providers[str(name)] = Provider(
                str(name), cast(ProviderKind, kind), base, key, source, messages
            )
        routes: list[Route] = []
        for i, rtable in enumerate(table.get("routes", [])):
            where = f"[[llm.routes]] #{i + 1}"
            if not isinstance(rtable, Mapping) or "model" not in rtable:
                raise ConfigError(f'{where} needs model = "PATTERN" and provider = "NAME"')
            prov = str(rtable.get("provider", ""))
            if prov not in providers:
                raise ConfigError(f"{where} names unknown provider {prov!r}")
            up = rtable.get("upstream_model")
            routes.append(
                Route(
                    str(rtable["model"]),
                    prov,
                    None if up is None else str(up),
                    _price(rtable.get("usd_per_mtok_in"), where),
                    _price(rtable.get("usd_per_mtok_out"), where),
                )
            )
        if not providers:
            providers["scripted"] = Provider("scripted", "scripted", "")
        if not routes:
            if len(providers) != 1:
                raise ConfigError("[llm] has several providers but no [[llm.routes]]")
            routes.append(Route("*", next(iter(providers))))
        return LLMSettings(
            providers=providers,
            routes=tuple(routes),
            max_body_bytes=int(table.get("max_body_bytes", DEFAULT_LLM_MAX_BODY_BYTES)),
            connect_timeout=_duration(table, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_duration(table, "read_timeout", DEFAULT_READ_TIMEOUT),
            stream_idle_timeout=_duration(
                table, "stream_idle_timeout", DEFAULT_STREAM_IDLE_TIMEOUT
            ),
            escalation_hold=_duration(
                table, "escalation_hold", DEFAULT_ESCALATION_HOLD, zero_ok=True
            ),
            default_max_tokens=int(table.get("default_max_tokens", DEFAULT_DEFAULT_MAX_TOKENS)),
            max_connections=int(table.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[llm] has an invalid value: {e}") from e
