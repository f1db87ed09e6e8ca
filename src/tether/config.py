"""The data directory and its TOML config.

Layout of a data directory (``--data-dir``, env ``TETHER_HOME``, default ``~/.tether``)::

    config.toml            settings (this module's :class:`Config`)
    keys/                  0700; private keys 0600, never overwritten once made
      jwt-signing.pem        ES256 key that signs JWT-SVIDs
      x509-ca.pem            EC P-256 key of the X.509-SVID CA
      x509-ca.crt            its self-signed CA certificate
      audit-note.pem         Ed25519 key that signs audit checkpoints (C2SP signed note)
    credentials/           0700; the local users' credentials (0600)
    tether.db              SQLite store: identities, credentials, revocations
    audit.db               SQLite audit log: entries, bodies, tree nodes, checkpoints
    tether.sock            the server's unix socket
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from tether.errors import ConfigError

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_AUDIENCE",
    "DEFAULT_MAX_CHAIN_DEPTH",
    "Config",
    "DataDir",
    "parse_duration",
    "resolve_data_dir",
    "write_private",
]

DEFAULT_ADDR = "127.0.0.1:7800"
DEFAULT_AUDIENCE = "tether"
DEFAULT_TOKEN_TTL = 30 * 60.0
DEFAULT_USER_TOKEN_TTL = 8 * 3600.0
DEFAULT_MAX_TTL = 24 * 3600.0
DEFAULT_MAX_CHAIN_DEPTH = 4
DEFAULT_X509_TTL = 3600.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_CHECKPOINT_INTERVAL = 0.25
# "interval": acknowledged = in the OS (survives any crash of Tether), fsynced before every
# signed checkpoint; "commit": an fsync per commit. See tether.audit.log and docs/audit.md.
DEFAULT_AUDIT_SYNC = "interval"
AUDIT_SYNC_MODES = ("commit", "interval")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")


def parse_duration(text: str | float | int) -> float:
    """``"30m"`` -> 1800.0; ``"1h30m"``, ``"250ms"`` and plain seconds are accepted."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"duration must be positive, got {text}")
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return parse_duration(float(s))
    total, pos = 0.0, 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or total <= 0:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h30m)")
    return total


def write_private(path: Path, data: str | bytes, *, overwrite: bool = True) -> bool:
    """Write ``path`` readable by its owner only (0600).

    With ``overwrite=False`` an existing file is left alone and ``False`` is returned (keys
    and credentials are never replaced). An existing file is brought back to 0600.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data.encode() if isinstance(data, str) else data)
    return True


def validate_trust_domain(td: str) -> str:
    if not _TRUST_DOMAIN.match(td) or td.startswith((".", "-")) or ".." in td:
        raise ConfigError(
            f"invalid trust domain {td!r}: lowercase letters, digits, '.', '-' and '_' only"
        )
    return td


def _audit_sync(value: Any) -> str:
    if value not in AUDIT_SYNC_MODES:
        raise ConfigError(
            f"[audit] sync must be one of {', '.join(map(repr, AUDIT_SYNC_MODES))}, not {value!r}"
        )
    return str(value)


@dataclass
class Config:
    trust_domain: str
    listen: str = DEFAULT_ADDR
    audience: str = DEFAULT_AUDIENCE
    token_ttl: float = DEFAULT_TOKEN_TTL
    user_token_ttl: float = DEFAULT_USER_TOKEN_TTL
    max_ttl: float = DEFAULT_MAX_TTL
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    x509_ttl: float = DEFAULT_X509_TTL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    audit_sync: str = DEFAULT_AUDIT_SYNC
    admin_user: str = "admin"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audit_origin(self) -> str:
        """The checkpoint origin line (C2SP tlog-checkpoint): unique per log."""
        return f"{self.trust_domain}/tether/audit"

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> Config:
        try:
            ident = data.get("identity", {})
            server = data.get("server", {})
            audit = data.get("audit", {})
            return cls(
                trust_domain=validate_trust_domain(str(data["trust_domain"])),
                listen=str(server.get("listen", DEFAULT_ADDR)),
                max_body_bytes=int(server.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                audience=str(ident.get("audience", DEFAULT_AUDIENCE)),
                token_ttl=parse_duration(ident.get("token_ttl", DEFAULT_TOKEN_TTL)),
                user_token_ttl=parse_duration(ident.get("user_token_ttl", DEFAULT_USER_TOKEN_TTL)),
                max_ttl=parse_duration(ident.get("max_ttl", DEFAULT_MAX_TTL)),
                max_chain_depth=int(ident.get("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH)),
                x509_ttl=parse_duration(ident.get("x509_ttl", DEFAULT_X509_TTL)),
                checkpoint_interval=parse_duration(
                    audit.get("checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL)
                ),
                audit_sync=_audit_sync(audit.get("sync", DEFAULT_AUDIT_SYNC)),
                admin_user=str(data.get("admin_user", "admin")),
                extra={k: v for k, v in data.items() if k not in _KNOWN_SECTIONS},
            )
        except KeyError as e:
            raise ConfigError(f"config.toml is missing {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.toml has an invalid value: {e}") from e

    def to_toml(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "admin_user": self.admin_user,
            "server": {"listen": self.listen, "max_body_bytes": self.max_body_bytes},
            "identity": {
                "audience": self.audience,
                "token_ttl": f"{int(self.token_ttl)}s",
                "user_token_ttl": f"{int(self.user_token_ttl)}s",
                "max_ttl": f"{int(self.max_ttl)}s",
                "max_chain_depth": self.max_chain_depth,
                "x509_ttl": f"{int(self.x509_ttl)}s",
            },
            "audit": {
                "checkpoint_interval": f"{int(self.checkpoint_interval * 1000)}ms",
                "sync": self.audit_sync,
            },
            **self.extra,
        }


_KNOWN_SECTIONS = {"trust_domain", "admin_user", "server", "identity", "audit"}


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--data-dir`` beats ``TETHER_HOME`` beats ``~/.tether``."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("TETHER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".tether").resolve()


class DataDir:
    """Paths inside one data directory, and its config."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    @property
    def db_path(self) -> Path:
        return self.root / "tether.db"

    @property
    def audit_db_path(self) -> Path:
        return self.root / "audit.db"

    @property
    def policies(self) -> Path:
        """Cedar policies (``*.cedar``) and ``boundaries.toml`` (groups, limits); live-reloaded."""
        return self.root / "policies"

    @property
    def limits_db_path(self) -> Path:
        """Group-limit reservations, shared by every process on this data directory."""
        return self.root / "limits.db"

    @property
    def socket_path(self) -> Path:
        return self.root / "tether.sock"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> Config:
        if not self.exists():
            raise ConfigError(
                f"no Tether data directory at {self.root}",
                hint="run 'tether init --trust-domain example.org' first, or set TETHER_HOME",
            )
        try:
            data = tomllib.loads(self.config_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{self.config_path}: {e}") from e
        return Config.from_toml(data)

    def write_config(self, config: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(config.to_toml()))
        tmp.replace(self.config_path)

    def ensure_private_dirs(self) -> None:
        for d in (self.root, self.keys, self.credentials):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.keys, self.credentials):
            d.chmod(0o700)
