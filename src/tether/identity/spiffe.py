"""SPIFFE IDs as Tether uses them: ``spiffe://<td>/{user,agent,beam,service}/<name>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from tether.errors import BadRequest

__all__ = ["KINDS", "IdentityKind", "SpiffeId"]

IdentityKind = Literal["user", "agent", "beam", "service"]
KINDS: tuple[IdentityKind, ...] = ("user", "agent", "beam", "service")

_TD = re.compile(r"^[a-z0-9._-]{1,255}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated Tether SPIFFE ID. An invalid one cannot be constructed."""

    trust_domain: str
    kind: IdentityKind
    name: str

    def __post_init__(self) -> None:
        if not _TD.match(self.trust_domain) or ".." in self.trust_domain:
            raise BadRequest(f"invalid trust domain {self.trust_domain!r}")
        if self.kind not in KINDS:
            raise BadRequest(f"invalid identity kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not _NAME.match(self.name) or self.name in (".", ".."):
            raise BadRequest(
                f"invalid {self.kind} name {self.name!r}: 1-128 of letters, digits, '.', '_', '-'"
            )

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not isinstance(uri, str) or not uri.startswith("spiffe://"):
            raise BadRequest(f"not a SPIFFE ID: {str(uri)[:80]!r}")
        rest = uri[len("spiffe://") :]
        parts = rest.split("/")
        if len(parts) != 3:
            raise BadRequest(f"not a Tether SPIFFE ID (spiffe://TD/KIND/NAME): {uri[:120]!r}")
        td, kind, name = parts
        return cls(td, cast(IdentityKind, kind), name)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def trust_domain_id(self) -> str:
        return f"spiffe://{self.trust_domain}"
