"""The claims of a Tether JWT-SVID, and their mapping to and from the JWT payload.

Payload of a delegated token (user tokens have no ``act`` and an empty ``chain_jti``)::

    {
      "iss": "spiffe://example.org",
      "sub": "spiffe://example.org/agent/researcher",      # the holder (JWT-SVID subject)
      "aud": ["tether"],
      "iat": 1800000000, "nbf": 1800000000, "exp": 1800001800,
      "jti": "2f1c...",                                     # token id, 128 random bits, hex
      "act": {                                              # RFC 8693: the grantor chain,
        "sub": "spiffe://example.org/agent/planner",        # nearest grantor outermost
        "act": {"sub": "spiffe://example.org/user/alice"}
      },
      "tether": {
        "v": 1,
        "grants": ["model:gpt-4o*", "tool:search.*", "budget:tokens=20000"],
        "task": "churn-report-42",
        "objective_sha256": "9f86d0...",
        "chain_jti": ["<alice's token id>", "<planner's token id>"],   # root first
        "iat_ms": 1800000000123
      }
    }

``chain_jti`` lets every verifier refuse a token whose grantor token was revoked, offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tether.errors import InvalidToken
from tether.identity.grants import Grants
from tether.identity.spiffe import SpiffeId

__all__ = ["CLAIMS_VERSION", "TokenClaims", "parse_grants"]

CLAIMS_VERSION = 1

# Verification parses the same few identities and grant sets over and over; both results are
# frozen, so sharing them is safe, and it halves the cost of a cold verification.
_parse_id = lru_cache(maxsize=4096)(SpiffeId.parse)


@lru_cache(maxsize=4096)
def parse_grants(texts: tuple[str, ...]) -> Grants:
    """:meth:`Grants.parse`, memoised (grant sets repeat; the result is frozen)."""
    return Grants.parse(texts)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """Claims of a verified (or about-to-be-signed) Tether JWT-SVID."""

    issuer: str
    subject: SpiffeId
    audience: tuple[str, ...]
    issued_at: int
    not_before: int
    expires_at: int
    token_id: str
    grantors: tuple[SpiffeId, ...]  # root first, nearest grantor last
    chain_jti: tuple[str, ...]  # token ids of the grantors' tokens, root first
    grants: Grants
    task: str | None = None
    objective_sha256: str | None = None
    issued_at_ms: int = 0
    labels: tuple[str, ...] = ()  # group labels; a child keeps all of its grantor's

    @property
    def depth(self) -> int:
        """Delegation hops from the root identity: 0 for a user's own token."""
        return len(self.grantors)

    @property
    def root(self) -> SpiffeId:
        """The identity at the top of the chain (the human, usually)."""
        return self.grantors[0] if self.grantors else self.subject

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": str(self.subject),
            "aud": list(self.audience),
            "iat": self.issued_at,
            "nbf": self.not_before,
            "exp": self.expires_at,
            "jti": self.token_id,
        }
        act: dict[str, Any] | None = None
        for grantor in self.grantors:  # root first: each later grantor wraps the earlier
            act = {"sub": str(grantor), "act": act} if act else {"sub": str(grantor)}
        if act:
            payload["act"] = act
        ext: dict[str, Any] = {
            "v": CLAIMS_VERSION,
            "grants": self.grants.to_list(),
            "chain_jti": list(self.chain_jti),
            "iat_ms": self.issued_at_ms,
        }
        if self.task is not None:
            ext["task"] = self.task
        if self.objective_sha256 is not None:
            ext["objective_sha256"] = self.objective_sha256
        if self.labels:
            ext["labels"] = list(self.labels)
        payload["tether"] = ext
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TokenClaims:
        """Parse a payload whose signature has already been checked. Raises InvalidToken."""
        try:
            aud = payload["aud"]
            audience = (aud,) if isinstance(aud, str) else tuple(str(a) for a in aud)
            grantors: list[SpiffeId] = []
            act = payload.get("act")
            depth = 0
            while act is not None:
                depth += 1
                if not isinstance(act, dict) or depth > 32:
                    raise InvalidToken("malformed act claim")
                grantors.append(_parse_id(act["sub"]))
                act = act.get("act")
            grantors.reverse()
            ext = payload["tether"]
            if not isinstance(ext, dict) or ext.get("v") != CLAIMS_VERSION:
                raise InvalidToken("unsupported tether claims version")
            chain_jti = tuple(str(j) for j in ext.get("chain_jti", []))
            if len(chain_jti) != len(grantors):
                raise InvalidToken("delegation chain and chain_jti disagree")
            task = ext.get("task")
            obj = ext.get("objective_sha256")
            labels = ext.get("labels", [])
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise InvalidToken("labels claim must be a list of strings")
            for name, value in (
                ("iat", payload["iat"]),
                ("nbf", payload["nbf"]),
                ("exp", payload["exp"]),
            ):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InvalidToken(f"claim {name} is not an integer")
            return cls(
                issuer=str(payload["iss"]),
                subject=_parse_id(payload["sub"]),
                audience=audience,
                issued_at=payload["iat"],
                not_before=payload["nbf"],
                expires_at=payload["exp"],
                token_id=str(payload["jti"]),
                grantors=tuple(grantors),
                chain_jti=chain_jti,
                grants=parse_grants(tuple(ext["grants"])),
                task=None if task is None else str(task),
                objective_sha256=None if obj is None else str(obj),
                issued_at_ms=int(ext.get("iat_ms", payload["iat"] * 1000)),
                labels=tuple(labels),
            )
        except InvalidToken:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidToken(f"malformed token claims ({type(e).__name__}: {e})") from e
        except Exception as e:  # BadRequest from SpiffeId / Grants parsing
            raise InvalidToken(f"malformed token claims: {e}") from e

    def summary(self) -> dict[str, Any]:
        """A JSON view with no secret in it (the token itself is never included)."""
        return {
            "spiffe_id": str(self.subject),
            "token_id": self.token_id,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "grants": self.grants.to_list(),
            "task": self.task,
            "objective_sha256": self.objective_sha256,
            "labels": list(self.labels),
            "chain": [
                {"spiffe_id": str(g), "token_id": j}
                for g, j in zip(self.grantors, self.chain_jti, strict=True)
            ],
        }
