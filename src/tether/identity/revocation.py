"""Revocations, and the rule that decides whether a token is revoked.

Three kinds, each a single row however many tokens it kills:

``token``    the token with this id, and every token delegated from it (its id is in their
             ``chain_jti``): authority flows from the grantor's token, so it dies with it.
``agent``    every token issued to this SPIFFE ID up to the moment of revocation.
``subtree``  every token issued up to that moment whose holder *or any grantor* is this SPIFFE
             ID: everything a user or agent delegated, however deep.

Tokens issued after an ``agent`` or ``subtree`` revocation are unaffected, so an agent can be
re-delegated once the incident is over. The check is a handful of set lookups, cheap enough to
run on every cached verification.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tether.identity.claims import TokenClaims

__all__ = ["Revocation", "RevocationKind", "RevocationList"]

RevocationKind = Literal["token", "agent", "subtree"]
REVOCATION_KINDS: tuple[RevocationKind, ...] = ("token", "agent", "subtree")


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: RevocationKind
    value: str  # a token id for "token", a SPIFFE ID otherwise
    at_ms: int
    reason: str = ""
    seq: int = 0  # the store's sequence number; pollers fetch rows with a higher one


class RevocationList:
    """The revocations a verifier knows of. Thread-safe; ``generation`` grows on every change."""

    def __init__(self, revocations: Iterable[Revocation] = ()) -> None:
        self._lock = threading.Lock()
        self._tokens: set[str] = set()
        self._agents: dict[str, int] = {}
        self._subtrees: dict[str, int] = {}
        self.generation = 0
        self.last_seq = 0
        self.add_all(revocations)

    def add_all(self, revocations: Iterable[Revocation]) -> None:
        with self._lock:
            for r in revocations:
                if r.kind == "token":
                    self._tokens.add(r.value)
                elif r.kind == "agent":
                    self._agents[r.value] = max(self._agents.get(r.value, 0), r.at_ms)
                else:
                    self._subtrees[r.value] = max(self._subtrees.get(r.value, 0), r.at_ms)
                self.last_seq = max(self.last_seq, r.seq)
                self.generation += 1

    def add(self, revocation: Revocation) -> None:
        self.add_all((revocation,))

    def reason(self, claims: TokenClaims) -> str | None:
        """Why ``claims`` is revoked, or ``None`` if it is not."""
        if self._tokens:
            if claims.token_id in self._tokens:
                return f"token {claims.token_id} was revoked"
            for jti in claims.chain_jti:
                if jti in self._tokens:
                    return f"grantor token {jti} was revoked"
        sub = str(claims.subject)
        if self._agents:
            at = self._agents.get(sub)
            if at is not None and claims.issued_at_ms <= at:
                return f"all tokens of {sub} issued before the revocation were revoked"
        if self._subtrees:
            for ident in (sub, *map(str, claims.grantors)):
                at = self._subtrees.get(ident)
                if at is not None and claims.issued_at_ms <= at:
                    return f"everything delegated by {ident} before the revocation was revoked"
        return None
