"""The ``[http]`` table of ``config.toml``: limits, and the services the gateway fronts.

::

    [http]
    max_body_bytes = 8388608        # request bodies above this are refused (413)
    max_response_bytes = 0          # upstream bodies above this are cut (0: no limit)
    record_body_bytes = 65536       # the first N bytes of each body go into the audit record
    max_header_bytes = 32768        # all request headers together (431 above)
    connect_timeout = "5s"          # upstream TCP connect
    timeout = "30s"                 # upstream: until the response headers, and between chunks
    escalation_hold = "0s"          # how long an escalated request waits for its approval
    max_connections = 256           # pooled keep-alive connections per service
    forward_cookies = false         # Cookie / Set-Cookie pass through (default: dropped)

    [http.services.crm]
    base_url = "http://127.0.0.1:9000/api"
    auth = { type = "bearer", secret_env = "CRM_TOKEN" }
    # auth = { type = "basic", user = "svc", secret_file = "/run/secrets/crm" }
    # auth = { type = "header", name = "X-Api-Key", secret_env = "CRM_KEY" }
    timeout = "10s"                 # any [http] limit above may be set per service

    [[http.services.crm.rules]]     # with rules, a request must match one (else 403)
    methods = ["GET", "HEAD"]
    paths = ["/customers", "/customers/*"]

    [[http.services.crm.rules]]
    methods = ["POST"]
    paths = ["/orders"]
    effects = ["crm.write"]         # or { "crm.write" = 1 }: counted by group limits

Credentials come from the environment or a secret file only: a secret written in
``config.toml`` is refused. They are read once, at startup.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from tether.config import parse_duration
from tether.errors import ConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_RECORD_BODY_BYTES",
    "DEFAULT_TIMEOUT",
    "METHODS",
    "Auth",
    "AuthType",
    "HTTPSettings",
    "Limits",
    "Rule",
    "Secret",
    "Service",
    "parse_http_config",
]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_RECORD_BODY_BYTES = 64 * 1024
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 256
MAX_HEADERS = 100

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
AuthType = Literal["none", "bearer", "basic", "header"]
AUTH_TYPES: tuple[str, ...] = ("none", "bearer", "basic", "header")

# A service name is one path segment and fits inside an ``http:`` grant pattern.
_SERVICE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an RFC 9110 header field name
_EFFECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_LITERAL_SECRET_KEYS = ("secret", "token", "password", "api_key", "key", "value")
# Headers a credential must never be injected as: framing, routing and hop-by-hop headers.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "cookie",
        "content-type",
        "expect",
    }
)


class Secret:
    """A credential the gateway injects: never printed, never in a repr, error or record."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Auth:
    """The credential injected into every forwarded request of a service, after the decision.

    ``header`` and ``value`` are what goes upstream; ``needles`` are the secret strings that
    must never reach an agent or a record (the raw secret and every encoded form of it)."""

    type: AuthType = "none"
    header: str = ""  # lower-case header name ("authorization", "x-api-key")
    value: Secret | None = field(default=None, repr=False)
    source: str = ""  # "env:NAME" / "file:PATH": says where, never what
    needles: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class Rule:
    """``methods`` x ``paths`` (``*`` the only wildcard, matching any run, ``/`` included),
    with the side effects a matching request has."""

    methods: frozenset[str]
    paths: tuple[str, ...]
    effects: Mapping[str, int] = field(default_factory=dict)
    index: int = 0
    _regex: re.Pattern[str] = field(default=re.compile("$^"), repr=False, compare=False)

    def matches(self, method: str, path: str) -> bool:
        return ("*" in self.methods or method in self.methods) and bool(self._regex.match(path))

    def describe(self) -> str:
        return f"rule #{self.index} ({', '.join(sorted(self.methods))} {', '.join(self.paths)})"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits; ``[http]`` sets the defaults and a service may override each."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_response_bytes: int = 0
    record_body_bytes: int = DEFAULT_RECORD_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    escalation_hold: float = 0.0
    forward_cookies: bool = False


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    base_url: str  # scheme://host[:port][/base], no trailing slash
    auth: Auth
    rules: tuple[Rule, ...]
    limits: Limits

    def rule_for(self, method: str, path: str) -> Rule | None:
        """The first rule that matches; ``None`` when none does (or there are no rules)."""
        for r in self.rules:
            if r.matches(method, path):
                return r
        return None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    services: Mapping[str, Service]
    defaults: Limits = field(default_factory=Limits)
    max_connections: int = DEFAULT_MAX_CONNECTIONS


# -- parsing ---------------------------------------------------------------------------------

_LIMIT_KEYS = {
    "max_body_bytes",
    "max_response_bytes",
    "record_body_bytes",
    "max_header_bytes",
    "connect_timeout",
    "timeout",
    "escalation_hold",
    "forward_cookies",
}


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(
            f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(allowed))})"
        )


def _size(table: Mapping[str, Any], key: str, default: int, where: str, zero_ok: bool) -> int:
    raw = table.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < (0 if zero_ok else 1):
        raise ConfigError(
            f"{where}: {key} must be a {'non-negative' if zero_ok else 'positive'} integer"
        )
    return raw


def _limits(table: Mapping[str, Any], base: Limits, where: str) -> Limits:
    hold = table.get("escalation_hold")
    fwd = table.get("forward_cookies", base.forward_cookies)
    if not isinstance(fwd, bool):
        raise ConfigError(f"{where}: forward_cookies must be true or false")
    return Limits(
        max_body_bytes=_size(table, "max_body_bytes", base.max_body_bytes, where, False),
        max_response_bytes=_size(table, "max_response_bytes", base.max_response_bytes, where, True),
        record_body_bytes=_size(table, "record_body_bytes", base.record_body_bytes, where, True),
        max_header_bytes=_size(table, "max_header_bytes", base.max_header_bytes, where, False),
        connect_timeout=parse_duration(table["connect_timeout"])
        if "connect_timeout" in table
        else base.connect_timeout,
        timeout=parse_duration(table["timeout"]) if "timeout" in table else base.timeout,
        escalation_hold=base.escalation_hold
        if hold is None
        else (0.0 if hold in (0, "0", "0s", "0ms") else parse_duration(hold)),
        forward_cookies=fwd,
    )


def _read_secret(
    table: Mapping[str, Any], prefix: str, env: Mapping[str, str], where: str
) -> tuple[str, str]:
    env_name = table.get(f"{prefix}_env")
    file_name = table.get(f"{prefix}_file")
    if (env_name is None) == (file_name is None):
        raise ConfigError(
            f"{where}: give exactly one of {prefix}_env or {prefix}_file",
            hint=f'{prefix}_env = "VAR" or {prefix}_file = "/run/secrets/NAME"',
        )
    if env_name is not None:
        value = env.get(str(env_name), "").strip()
        if not value:
            raise ConfigError(
                f"{where}: environment variable {env_name!s} is not set",
                hint="export it before 'tether serve'",
            )
        source = f"env:{env_name}"
    else:
        path = Path(str(file_name)).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {prefix}_file {path}: {e.strerror}") from e
        if not value:
            raise ConfigError(f"{where}: {prefix}_file {path} is empty")
        source = f"file:{path}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        # A newline in a header value is a header injection: refuse, naming only the source.
        raise ConfigError(f"{where}: the secret from {source} contains control characters")
    return value, source


def _auth(raw: Any, env: Mapping[str, str], where: str) -> Auth:
    if raw is None:
        return Auth()
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f'{where}: auth must be a table, e.g. {{ type = "bearer", secret_env = "VAR" }}'
        )
    for k in _LITERAL_SECRET_KEYS:
        if k in raw:
            raise ConfigError(
                f"{where}: auth has {k!r}: credentials never live in config.toml",
                hint='use secret_env = "VAR" or secret_file = "/path/to/secret"',
            )
    kind = str(raw.get("type", ""))
    if kind not in AUTH_TYPES:
        raise ConfigError(f"{where}: auth type {kind!r} is not one of {', '.join(AUTH_TYPES)}")
    allowed = {"type", "secret_env", "secret_file"}
    if kind == "none":
        _unknown(raw, {"type"}, where + " auth")
        return Auth()
    if kind == "basic":
        allowed |= {"user", "user_env", "user_file"}
    if kind == "header":
        allowed |= {"name"}
    _unknown(raw, allowed, where + " auth")
    secret, source = _read_secret(raw, "secret", env, where + " auth")
    if kind == "bearer":
        value = "Bearer " + secret
        return Auth("bearer", "authorization", Secret(value), source, _needles(secret, value))
    if kind == "basic":
        if "user" in raw:
            user = str(raw["user"])
        else:
            user, _ = _read_secret(raw, "user", env, where + " auth")
        if ":" in user or not user:
            raise ConfigError(f"{where}: a basic-auth user must be non-empty and without ':'")
        cred = base64.b64encode(f"{user}:{secret}".encode()).decode()
        value = "Basic " + cred
        return Auth("basic", "authorization", Secret(value), source, _needles(secret, value, cred))
    name = str(raw.get("name", "")).strip()
    if not _TOKEN.match(name):
        raise ConfigError(f'{where}: auth type "header" needs name = "X-Header-Name"')
    if name.lower() in _RESERVED_HEADERS:
        raise ConfigError(f"{where}: a credential cannot be injected as {name!r}")
    return Auth("header", name.lower(), Secret(secret), source, _needles(secret))


def _needles(*values: str) -> tuple[bytes, ...]:
    out = {v.encode() for v in values if len(v) >= 4}
    return tuple(sorted(out, key=len, reverse=True))


def _path_regex(pattern: str, where: str) -> str:
    if not pattern.startswith("/") or any(c in pattern for c in "\\?#") or "//" in pattern:
        raise ConfigError(
            f"{where}: path {pattern!r} must start with '/' and hold no '\\', '?', '#' or '//'"
        )
    if any(seg in (".", "..") for seg in pattern.split("/")):
        raise ConfigError(f"{where}: path {pattern!r} has a '.' or '..' segment")
    return "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern))


def _effects(raw: Any, where: str) -> dict[str, int]:
    if raw is None:
        return {}
    if isinstance(raw, list | tuple):
        raw = {str(k): 1 for k in raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{where}: effects must be a list (["crm.write"]) or a table of counts')
    out: dict[str, int] = {}
    for k, v in raw.items():
        if not _EFFECT.match(str(k)):
            raise ConfigError(f"{where}: invalid effect kind {str(k)[:60]!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: effect {k!r} must count a positive integer")
        out[str(k)] = v
    return out


def _rules(raw: Any, where: str) -> tuple[Rule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: rules must be an array of tables ([[...rules]])")
    out: list[Rule] = []
    for i, r in enumerate(raw, 1):
        w = f"{where} rule #{i}"
        if not isinstance(r, Mapping):
            raise ConfigError(f"{w} must be a table")
        _unknown(r, {"methods", "paths", "effects"}, w)
        methods = r.get("methods", ["*"])
        paths = r.get("paths")
        if (
            not isinstance(methods, list)
            or not methods
            or not all(isinstance(m, str) for m in methods)
        ):
            raise ConfigError(f'{w}: methods must be a non-empty list, e.g. ["GET"]')
        ms = frozenset(m.upper() for m in methods)
        bad = sorted(ms - METHODS - {"*"})
        if bad:
            raise ConfigError(
                f"{w}: unknown method {bad[0]!r} (one of {', '.join(sorted(METHODS))} or *)"
            )
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f'{w}: paths must be a non-empty list, e.g. ["/customers/*"]')
        regex = re.compile("^(?:" + "|".join(_path_regex(p, w) for p in paths) + ")$", re.DOTALL)
        out.append(Rule(ms, tuple(paths), _effects(r.get("effects"), w), i, regex))
    return tuple(out)


def _base_url(raw: Any, where: str) -> str:
    url = str(raw or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f'{where} needs base_url = "http(s)://host[:port][/path]"')
    if parts.username or parts.password:
        raise ConfigError(f"{where}: base_url must not carry credentials (use auth)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: base_url must not have a query or fragment")
    if any(c in url for c in " \\\r\n\t"):
        raise ConfigError(f"{where}: base_url has a space, backslash or control character")
    return url.rstrip("/")


def parse_http_config(
    table: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
) -> HTTPSettings:
    """Validate the raw ``[http]`` table (``config.extra["http"]``). Raises ConfigError."""
    table = dict(table or {})
    env = os.environ if env is None else env
    try:
        _unknown(table, {"services", "max_connections", *_LIMIT_KEYS}, "[http]")
        defaults = _limits(table, Limits(), "[http]")
        services: dict[str, Service] = {}
        raw_services = table.get("services", {})
        if not isinstance(raw_services, Mapping):
            raise ConfigError("[http.services] must be a table of services")
        for name, st in raw_services.items():
            where = f"[http.services.{name}]"
            if not _SERVICE.match(str(name)):
                raise ConfigError(
                    f"{where}: a service name is lower-case letters, digits, '.', '_', '-'"
                )
            if not isinstance(st, Mapping):
                raise ConfigError(f"{where} must be a table")
            _unknown(st, {"base_url", "auth", "rules", *_LIMIT_KEYS}, where)
            services[str(name)] = Service(
                str(name),
                _base_url(st.get("base_url"), where),
                _auth(st.get("auth"), env, where),
                _rules(st.get("rules"), f"[[http.services.{name}.rules]]"),
                _limits(st, defaults, where),
            )
        return HTTPSettings(
            services=services,
            defaults=defaults,
            max_connections=_size(
                table, "max_connections", DEFAULT_MAX_CONNECTIONS, "[http]", False
            ),
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[http] has an invalid value: {e}") from e
