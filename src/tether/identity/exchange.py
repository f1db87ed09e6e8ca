"""RFC 8693 token-exchange identifiers, shared by the server and its clients."""

from __future__ import annotations

__all__ = ["GRANT_TYPE_TOKEN_EXCHANGE", "TOKEN_TYPE_JWT", "TOKEN_TYPE_USER_CREDENTIAL"]

# URNs, not secrets (hence the noqa for the hard-coded-password lint).
GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
# Tether's own: a local user's credential, exchanged for that user's JWT-SVID.
TOKEN_TYPE_USER_CREDENTIAL = "urn:tether:params:oauth:token-type:user-credential"  # noqa: S105
