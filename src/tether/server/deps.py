"""FastAPI dependencies shared by every route module."""

from __future__ import annotations

from fastapi import Request

from tether.errors import AuthenticationError
from tether.identity.claims import TokenClaims
from tether.server.services import Services

__all__ = ["authenticated", "bearer_token", "get_services"]


def get_services(request: Request) -> Services:
    services: Services = request.app.state.tether
    return services


def bearer_token(request: Request) -> str:
    """The bearer token from ``Authorization`` (or Anthropic-style ``x-api-key``)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationError("Authorization header must be 'Bearer <token>'")
        return value.strip()
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    raise AuthenticationError("no credential presented: send 'Authorization: Bearer <token>'")


async def authenticated(request: Request) -> TokenClaims:
    """Verify the caller's JWT-SVID; raises InvalidToken / TokenExpired / TokenRevoked."""
    claims = get_services(request).verifier.verify(bearer_token(request))
    request.state.claims = claims
    return claims
