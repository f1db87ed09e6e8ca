"""Tether's exception tree. Every error a user can see derives from :class:`TetherError`.

    TetherError                  root; ``diagnostics()`` is the user-facing text
    ├── ConfigError              data dir or config missing / invalid
    ├── StoreError               the store could not be read or written (transport, not trust)
    ├── BadRequest               malformed input (JSON, form, sizes, patterns)
    ├── NotFound                 a named thing does not exist
    ├── AuthenticationError      no usable credential was presented
    │   └── InvalidToken         a token failed verification (signature, alg, time, aud, domain)
    │       ├── TokenExpired
    │       └── TokenRevoked
    ├── PermissionDenied         authenticated, but not allowed
    ├── DelegationRefused        a delegation asked for more than the grantor holds
    └── AuditError
        ├── RecordFailed         an event could not be made durable: the action is refused
        └── VerificationFailed   the log, a proof or a checkpoint does not verify

Errors never carry secrets: messages name grants, ids and reasons, never token or key bytes.
Foreign exceptions are mapped at the boundary with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "AuthenticationError",
    "BadRequest",
    "ConfigError",
    "DelegationRefused",
    "InvalidToken",
    "NotFound",
    "PermissionDenied",
    "RecordFailed",
    "StoreError",
    "TetherError",
    "TokenExpired",
    "TokenRevoked",
    "VerificationFailed",
]


class TetherError(Exception):
    """Root of every error Tether raises on purpose.

    ``code`` is a stable machine-readable name, ``status`` the HTTP status an API maps it to.
    """

    code: str = "tether_error"
    status: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The text to show a person: the message and, when there is one, what to do."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ConfigError(TetherError):
    code = "config_error"
    status = 500


class StoreError(TetherError):
    code = "store_error"
    status = 503


class BadRequest(TetherError):
    code = "invalid_request"
    status = 400


class NotFound(TetherError):
    code = "not_found"
    status = 404


class AuthenticationError(TetherError):
    code = "unauthenticated"
    status = 401


class InvalidToken(AuthenticationError):
    code = "invalid_token"


class TokenExpired(InvalidToken):
    code = "token_expired"


class TokenRevoked(InvalidToken):
    code = "token_revoked"


class PermissionDenied(TetherError):
    code = "permission_denied"
    status = 403


class DelegationRefused(TetherError):
    """A delegation was refused; the message names the offending grant, expiry or depth."""

    code = "invalid_scope"
    status = 400


class AuditError(TetherError):
    code = "audit_error"
    status = 500


class RecordFailed(AuditError):
    """The audit record could not be made durable, so the action it describes is refused."""

    code = "record_failed"
    status = 503


class VerificationFailed(AuditError):
    """The log does not verify. ``index`` names the first bad entry when there is one."""

    code = "verification_failed"

    def __init__(self, message: str, *, index: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.index = index
