"""The ``[mcp]`` table of ``config.toml``: limits and the MCP servers the gateway fronts.

::

    [mcp]
    max_message_bytes = 1048576     # an agent's JSON-RPC message above this is refused (413)
    max_response_bytes = 16777216   # an upstream response above this is refused
    connect_timeout = "5s"          # upstream connect / stdio server start
    timeout = "30s"                 # one upstream request (a hanging upstream -> error)
    escalation_hold = "60s"         # how long an escalated tools/call waits for its approval
    catalog_ttl = "60s"             # a tool list older than this is fetched again before a call
    session_ttl = "24h"             # an agent session's lifetime
    session_recheck = "1s"          # how long a process trusts its cached copy of a session
    max_recorded_body = 65536       # request / result bodies in the audit log are cut here
    allowed_origins = []            # browser Origins allowed to call (none: any Origin -> 403)

    [mcp.servers.db]                # served to agents at /mcp/db
    url = "http://127.0.0.1:9000/mcp"       # a streamable-HTTP upstream, or:
    # command = ["python", "-m", "my_server"]   # a stdio server the gateway launches
    # env = { LOG_LEVEL = "info" }              # stdio: plain values (no secrets here)
    # secret_env = { DB_PASSWORD = "TETHER_DB_PASSWORD" }  # stdio: child var <- gateway var
    # cwd = "/srv/db"
    headers = { "X-Tenant" = "acme" }       # HTTP: extra non-secret headers
    credential_env = "DB_MCP_TOKEN"         # HTTP: a credential from the environment ...
    # credential_file = "/run/secrets/db"   # ... or from a file
    credential_header = "Authorization"     # where it goes (default Authorization: Bearer X)
    pin = "auto"                    # auto: trust a tool on first sight; approve: a human first
    record_first = true             # the call's record is durable before the upstream sees it
    passthrough = []                # opt-in: "prompts/list", "resources/read" ... (not decided)
    timeout = "30s"                 # overrides [mcp] values for this server
    escalation_hold = "60s"

    [mcp.servers.db.effects]        # side effects by tool, counted by group limits
    create_index = "db.schema_change"
    drop_table = ["db.schema_change", "db.destructive"]

Credentials are read from the environment or a file, never from ``config.toml`` (a key there
is refused), and are injected into upstream requests after the decision; agents never see
them. Server names are what agents and grants use: ``tool:db.read_rows`` grants the tool
``read_rows`` of the server ``db``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tether.config import parse_duration
from tether.errors import ConfigError

__all__ = [
    "DEFAULT_CATALOG_TTL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_ESCALATION_HOLD",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_RECORDED_BODY",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_SESSION_RECHECK",
    "DEFAULT_SESSION_TTL",
    "DEFAULT_TIMEOUT",
    "PASSTHROUGH_METHODS",
    "MCPSettings",
    "Secret",
    "ServerConfig",
    "parse_mcp_config",
]

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_ESCALATION_HOLD = 60.0
DEFAULT_CATALOG_TTL = 60.0
DEFAULT_SESSION_TTL = 24 * 3600.0
DEFAULT_SESSION_RECHECK = 1.0
DEFAULT_MAX_RECORDED_BODY = 64 * 1024

# Methods a server may opt into forwarding unchanged. They are recorded but not decided by
# policy (no grant kind covers them), so they stay off unless the operator lists them.
PASSTHROUGH_METHODS = (
    "completion/complete",
    "prompts/get",
    "prompts/list",
    "resources/list",
    "resources/read",
    "resources/templates/list",
)

SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_SECRETISH = re.compile(r"(?i)(key|token|secret|passw|credential|auth|cookie)")
_SECRET_FIELDS = ("api_key", "key", "token", "secret", "password", "credential", "bearer")
_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "accept",
        "connection",
        "transfer-encoding",
        "mcp-session-id",
        "mcp-protocol-version",
    }
)
_SERVER_KEYS = frozenset(
    {
        "url",
        "command",
        "env",
        "secret_env",
        "cwd",
        "headers",
        "credential_env",
        "credential_file",
        "credential_header",
        "pin",
        "record_first",
        "passthrough",
        "timeout",
        "connect_timeout",
        "escalation_hold",
        "catalog_ttl",
        "effects",
    }
)
_TOP_KEYS = frozenset(
    {
        "servers",
        "max_message_bytes",
        "max_response_bytes",
        "connect_timeout",
        "timeout",
        "escalation_hold",
        "catalog_ttl",
        "session_ttl",
        "session_recheck",
        "max_recorded_body",
        "allowed_origins",
    }
)


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


PinMode = Literal["auto", "approve"]


@dataclass(frozen=True)
class ServerConfig:
    """One upstream MCP server, validated."""

    name: str
    url: str | None = None
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, Secret] = field(default_factory=dict, repr=False)
    cwd: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    credential: Secret | None = field(default=None, repr=False)
    credential_header: str = "Authorization"
    credential_source: str = ""  # "env:NAME" / "file:PATH" (for docs; not the value)
    pin: PinMode = "auto"
    record_first: bool = True
    passthrough: frozenset[str] = frozenset()
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    escalation_hold: float = DEFAULT_ESCALATION_HOLD
    catalog_ttl: float = DEFAULT_CATALOG_TTL
    effects: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def kind(self) -> Literal["http", "stdio"]:
        return "http" if self.url is not None else "stdio"

    def effects_of(self, tool: str) -> dict[str, int]:
        return dict.fromkeys(self.effects.get(tool, ()), 1)

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers every upstream request carries: the configured ones, then the
        credential (so configuration cannot override it)."""
        out = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        if self.credential is not None:
            value = self.credential.reveal()
            if self.credential_header.lower() == "authorization" and " " not in value:
                value = f"Bearer {value}"
            out.append((self.credential_header.lower().encode(), value.encode("latin-1")))
        return out


@dataclass(frozen=True)
class MCPSettings:
    servers: Mapping[str, ServerConfig]
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    session_ttl: float = DEFAULT_SESSION_TTL
    session_recheck: float = DEFAULT_SESSION_RECHECK
    max_recorded_body: int = DEFAULT_MAX_RECORDED_BODY
    allowed_origins: frozenset[str] = frozenset()


def _duration(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    if key not in table:
        return default
    raw = table[key]
    if raw in (0, "0", "0s", "0ms") and key == "escalation_hold":
        return 0.0
    try:
        return parse_duration(raw)
    except ConfigError as e:
        raise ConfigError(f"{where} {key}: {e.message}") from None


def _positive_int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    raw = table.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise ConfigError(f"{where} {key} must be a positive integer, got {raw!r}")
    return raw


def _str_map(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ConfigError(f"{where} must be a table of strings")
    return dict(raw)


def _load_secret(env_name: Any, file_name: Any, where: str, env: Mapping[str, str]) -> Secret:
    if env_name is not None:
        value = env.get(str(env_name))
        if not value:
            raise ConfigError(
                f"{where}: environment variable {env_name!s} is not set",
                hint="export it before 'tether serve'",
            )
        return Secret(value.strip())
    path = Path(str(file_name)).expanduser()
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read credential_file {path}: {e.strerror}") from e
    if not value:
        raise ConfigError(f"{where}: credential_file {path} is empty")
    return Secret(value)


def _effects(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.effects must be a table of tool = effect kind(s)")
    out: dict[str, tuple[str, ...]] = {}
    for tool, kinds in raw.items():
        values = [kinds] if isinstance(kinds, str) else kinds
        if (
            not isinstance(values, list)
            or not values
            or not all(
                isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", k) for k in values
            )
        ):
            raise ConfigError(
                f'{where}.effects.{tool}: an effect kind ("db.schema_change") or a list of them'
            )
        out[str(tool)] = tuple(values)
    return out


def _server(name: str, table: Any, top: Mapping[str, Any], env: Mapping[str, str]) -> ServerConfig:
    where = f"[mcp.servers.{name}]"
    if not SERVER_NAME.match(name):
        raise ConfigError(
            f"{where}: server names are lower-case letters, digits, '_' and '-' (no dots: "
            "grants name tools SERVER.TOOL)"
        )
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - _SERVER_KEYS)
    for k in unknown:
        if k.lower() in _SECRET_FIELDS:
            raise ConfigError(
                f"{where} has {k!r}: upstream credentials never live in config.toml",
                hint='use credential_env = "VAR" or credential_file = "/path/to/secret"',
            )
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    url, command = table.get("url"), table.get("command")
    if (url is None) == (command is None):
        raise ConfigError(f'{where} needs either url = "http(s)://..." or command = [...]')
    cmd: tuple[str, ...] = ()
    if url is not None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f'{where} url must be "http://..." or "https://..."')
        for k in ("env", "secret_env", "cwd"):
            if k in table:
                raise ConfigError(f"{where}: {k} applies to stdio servers (command = [...])")
    else:
        if isinstance(command, str):
            command = shlex.split(command)
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) and c for c in command)
        ):
            raise ConfigError(f'{where} command must be a list of strings: ["prog", "arg"]')
        cmd = tuple(command)
        for k in ("headers", "credential_env", "credential_file", "credential_header"):
            if k in table:
                raise ConfigError(f"{where}: {k} applies to HTTP servers (url = ...)")
    headers = _str_map(table.get("headers"), f"{where} headers")
    for h, v in headers.items():
        if not _HEADER_NAME.match(h) or h.lower() in _HOP_HEADERS:
            raise ConfigError(f"{where} headers: {h!r} cannot be set")
        if any(c in v for c in "\r\n\0"):
            raise ConfigError(f"{where} headers: the value of {h!r} has a line break")
        if _SECRETISH.search(h):
            raise ConfigError(
                f"{where} headers: {h!r} looks like a credential; credentials never live in "
                "config.toml",
                hint='use credential_env = "VAR" and credential_header = "' + h + '"',
            )
    env_plain = _str_map(table.get("env"), f"{where} env")
    for k in env_plain:
        if _SECRETISH.search(k):
            raise ConfigError(
                f"{where} env: {k!r} looks like a secret; secrets never live in config.toml",
                hint=f'use secret_env = {{ {k} = "GATEWAY_ENV_VAR" }}',
            )
    secret_env = {
        k: _load_secret(v, None, f"{where} secret_env.{k}", env)
        for k, v in _str_map(table.get("secret_env"), f"{where} secret_env").items()
    }
    cred_env, cred_file = table.get("credential_env"), table.get("credential_file")
    credential: Secret | None = None
    source = ""
    if cred_env is not None and cred_file is not None:
        raise ConfigError(f"{where}: give credential_env or credential_file, not both")
    if cred_env is not None or cred_file is not None:
        credential = _load_secret(cred_env, cred_file, where, env)
        source = f"env:{cred_env}" if cred_env is not None else f"file:{cred_file}"
    cred_header = str(table.get("credential_header", "Authorization"))
    if not _HEADER_NAME.match(cred_header) or cred_header.lower() in _HOP_HEADERS:
        raise ConfigError(f"{where} credential_header {cred_header!r} cannot be set")
    pin = table.get("pin", "auto")
    if pin not in ("auto", "approve"):
        raise ConfigError(f'{where} pin must be "auto" or "approve", got {pin!r}')
    record_first = table.get("record_first", True)
    if not isinstance(record_first, bool):
        raise ConfigError(f"{where} record_first must be true or false")
    passthrough = table.get("passthrough", [])
    if not isinstance(passthrough, list) or not all(p in PASSTHROUGH_METHODS for p in passthrough):
        raise ConfigError(
            f"{where} passthrough must list methods among " + ", ".join(PASSTHROUGH_METHODS)
        )
    cwd = table.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{where} cwd must be a path")

    def d(key: str, default: float) -> float:
        return _duration(table, key, _duration(top, key, default, "[mcp]"), where)

    return ServerConfig(
        name=name,
        url=url.rstrip("/") if isinstance(url, str) else None,
        command=cmd,
        env=env_plain,
        secret_env=secret_env,
        cwd=cwd,
        headers=headers,
        credential=credential,
        credential_header=cred_header,
        credential_source=source,
        pin=pin,
        record_first=record_first,
        passthrough=frozenset(passthrough),
        timeout=d("timeout", DEFAULT_TIMEOUT),
        connect_timeout=d("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        escalation_hold=d("escalation_hold", DEFAULT_ESCALATION_HOLD),
        catalog_ttl=d("catalog_ttl", DEFAULT_CATALOG_TTL),
        effects=_effects(table.get("effects"), where),
    )


def parse_mcp_config(
    table: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> MCPSettings:
    """Validate the raw ``[mcp]`` table (``config.extra["mcp"]``). Raises ConfigError."""
    table = dict(table or {})
    env = os.environ if env is None else env
    unknown = sorted(set(table) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"[mcp]: unknown key(s) {', '.join(unknown)}")
    servers_raw = table.get("servers", {})
    if not isinstance(servers_raw, Mapping):
        raise ConfigError("[mcp.servers] must be a table of servers")
    servers = {str(n): _server(str(n), t, table, env) for n, t in servers_raw.items()}
    origins = table.get("allowed_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError("[mcp] allowed_origins must be a list of origins")
    return MCPSettings(
        servers=servers,
        max_message_bytes=_positive_int(
            table, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, "[mcp]"
        ),
        max_response_bytes=_positive_int(
            table, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES, "[mcp]"
        ),
        session_ttl=_duration(table, "session_ttl", DEFAULT_SESSION_TTL, "[mcp]"),
        session_recheck=_duration(table, "session_recheck", DEFAULT_SESSION_RECHECK, "[mcp]"),
        max_recorded_body=_positive_int(
            table, "max_recorded_body", DEFAULT_MAX_RECORDED_BODY, "[mcp]"
        ),
        allowed_origins=frozenset(o.rstrip("/") for o in origins),
    )
