"""The identity authority: issues JWT-SVIDs by token exchange, with attenuation at every hop.

Rules a delegation must pass (each refusal names what was wrong, and is recorded):

* the grantor's token verifies (signature, time, audience, trust domain, not revoked);
* every requested grant is within one of the grantor's grants; budgets no larger;
* the expiry is no later than the grantor's, and the TTL no longer than ``max_ttl``;
* the chain is no deeper than ``max_chain_depth`` and never names the same identity twice.

Issuance is recorded *before* the token is returned: if the record cannot be made durable, no
token leaves the authority (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization

from tether.clock import Clock, SystemClock
from tether.config import Config
from tether.errors import (
    AuthenticationError,
    BadRequest,
    DelegationRefused,
    PermissionDenied,
    RecordFailed,
    TetherError,
)
from tether.events import Event, Recorder
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.grants import Grants
from tether.identity.jws import sign_es256
from tether.identity.keys import KeySet
from tether.identity.revocation import Revocation, RevocationKind, RevocationList
from tether.identity.spiffe import IdentityKind, SpiffeId
from tether.identity.x509 import csr_public_key, issue_x509_svid
from tether.store import Store

__all__ = ["ADMIN_GRANTS", "Authority", "IssuedToken"]

ADMIN_GRANTS = ["model:*", "tool:*", "http:*", "egress:*"]
MAX_OBJECTIVE_BYTES = 16 * 1024
MAX_TASK_CHARS = 128


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: TokenClaims

    def __repr__(self) -> str:
        c = self.claims
        return f"IssuedToken(spiffe_id={str(c.subject)!r}, token_id={c.token_id!r})"

    def response(self) -> dict[str, Any]:
        """The RFC 8693 token response, with Tether's extra fields."""
        c = self.claims
        return {
            "access_token": self.token,
            "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_type": "Bearer",
            "expires_in": max(0, c.expires_at - c.issued_at),
            "token": self.token,
            "spiffe_id": str(c.subject),
            "token_id": c.token_id,
            "expires_at": c.expires_at,
            "grants": c.grants.to_list(),
            "task": c.task,
            "objective_sha256": c.objective_sha256,
            "chain": c.summary()["chain"],
        }


@dataclass(frozen=True, slots=True)
class _Issuance:
    """A signed token and its audit event, not yet recorded (so not yet releasable)."""

    issued: IssuedToken
    event: Event
    identity: tuple[str, str, str, int, str | None]  # spiffe_id, kind, name, created_ms, by


REFUSALS = (DelegationRefused, BadRequest, PermissionDenied)


def _refusal(
    error: TetherError, actor: str | None, subject: str | None, data: dict[str, Any]
) -> Event:
    return Event(
        type="identity.refused",
        actor=actor,
        subject=subject,
        session=data.get("task"),
        decision="deny",
        data={**data, "reason": error.message, "error": error.code},
    )


def _delegation_refusal(
    error: TetherError,
    grantor: TokenClaims,
    name: str,
    grants: list[str],
    ttl: float | None,
    task: str | None,
) -> Event:
    request = {"agent": name, "grants": [str(g) for g in grants], "ttl": ttl, "task": task}
    return _refusal(error, str(grantor.subject), None, request)


_LABEL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_LABELS = 16


def _inherit_labels(held: tuple[str, ...], asked: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A child keeps every label of its grantor and may add more: labels put agents in groups,
    and group limits must not be escaped by delegating to a child without the label."""
    if not isinstance(asked, list | tuple) or not all(isinstance(x, str) for x in asked):
        raise BadRequest("labels must be a list of strings")
    for label in asked:
        if not _LABEL.match(label):
            raise BadRequest(
                f"invalid label {label[:40]!r}: lowercase letters, digits, '.', '_' and '-', "
                "at most 63 characters"
            )
    out = tuple(dict.fromkeys((*held, *asked)))
    if len(out) > MAX_LABELS:
        raise BadRequest(f"too many labels ({len(out)} > {MAX_LABELS})")
    return out


def objective_digest(objective: str) -> str:
    return hashlib.sha256(objective.encode()).hexdigest()


class Authority:
    def __init__(
        self,
        config: Config,
        keys: KeySet,
        store: Store,
        recorder: Recorder,
        revocations: RevocationList,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.store = store
        self.recorder = recorder
        self.revocations = revocations
        self.clock = clock or SystemClock()
        self.issuer = f"spiffe://{config.trust_domain}"

    def __repr__(self) -> str:
        return f"Authority(trust_domain={self.config.trust_domain!r})"

    # issuing ----------------------------------------------------------------------------
    def _sign(self, claims: TokenClaims) -> IssuedToken:
        return IssuedToken(
            sign_es256(claims.to_payload(), self.keys.jwt_key, self.keys.jwt_kid), claims
        )

    def _record(self, event: Event) -> None:
        try:
            self.recorder.record(event)
        except RecordFailed:
            raise
        except Exception as e:  # any recorder failure means no durable record: refuse
            raise RecordFailed(f"audit record failed: {type(e).__name__}") from e

    async def _arecord(self, event: Event) -> None:
        try:
            await self.recorder.arecord(event)
        except RecordFailed:
            raise
        except Exception as e:  # any recorder failure means no durable record: refuse
            raise RecordFailed(f"audit record failed: {type(e).__name__}") from e

    def _refuse(
        self, error: TetherError, actor: str | None, subject: str | None, data: dict[str, Any]
    ) -> None:
        """Record a refusal (best effort: the refusal stands even if the log is down)."""
        with contextlib.suppress(Exception):  # the refusal is raised either way
            self.recorder.record(_refusal(error, actor, subject, data))

    def _remember(self, issuance: _Issuance) -> None:
        self.store.ensure_identity(*issuance.identity)

    def login(self, credential: str, ttl: float | None = None) -> IssuedToken:
        """Exchange a local user credential for the user's own JWT-SVID."""
        user = self.store.check_user_credential(credential) if credential else None
        if user is None:
            err = AuthenticationError("unknown or invalid user credential")
            self._refuse(err, None, None, {"grant_type": "user-credential"})
            raise err
        now = self.clock.now()
        subject = SpiffeId(self.config.trust_domain, "user", user.name)
        lifetime = min(ttl or self.config.user_token_ttl, self.config.max_ttl)
        claims = TokenClaims(
            issuer=self.issuer,
            subject=subject,
            audience=(self.config.audience,),
            issued_at=int(now),
            not_before=int(now),
            expires_at=int(now + lifetime),
            token_id=secrets.token_hex(16),
            grantors=(),
            chain_jti=(),
            grants=Grants.parse(user.grants),
            issued_at_ms=int(now * 1000),
        )
        issued = self._sign(claims)
        self._record(
            Event(
                type="identity.issued",
                actor=str(subject),
                subject=str(subject),
                decision="allow",
                data={
                    "token_id": claims.token_id,
                    "expires_at": claims.expires_at,
                    "grants": claims.grants.to_list(),
                    "via": "user-credential",
                    "depth": 0,
                },
            )
        )
        self.store.ensure_identity(str(subject), "user", user.name, int(now * 1000), None)
        return issued

    def delegate(
        self,
        grantor: TokenClaims,
        name: str,
        grants: list[str],
        *,
        ttl: float | None = None,
        task: str | None = None,
        objective: str | None = None,
        kind: IdentityKind = "agent",
        labels: list[str] | tuple[str, ...] = (),
    ) -> IssuedToken:
        """Issue a token for agent ``name`` delegated from ``grantor`` (already verified)."""
        try:
            issuance = self._build_delegation(
                grantor, name, grants, ttl, task, objective, kind, labels
            )
        except REFUSALS as e:
            with contextlib.suppress(Exception):  # the refusal is raised either way
                self.recorder.record(_delegation_refusal(e, grantor, name, grants, ttl, task))
            raise
        self._record(issuance.event)
        self._remember(issuance)
        return issuance.issued

    async def adelegate(
        self,
        grantor: TokenClaims,
        name: str,
        grants: list[str],
        *,
        ttl: float | None = None,
        task: str | None = None,
        objective: str | None = None,
        kind: IdentityKind = "agent",
        labels: list[str] | tuple[str, ...] = (),
    ) -> IssuedToken:
        """:meth:`delegate` for async callers: waits for the durable record without blocking
        the event loop, so concurrent issuances share one group commit."""
        try:
            issuance = self._build_delegation(
                grantor, name, grants, ttl, task, objective, kind, labels
            )
        except REFUSALS as e:
            with contextlib.suppress(Exception):  # the refusal is raised either way
                await self.recorder.arecord(
                    _delegation_refusal(e, grantor, name, grants, ttl, task)
                )
            raise
        await self._arecord(issuance.event)
        if not self.store.is_known(issuance.identity[0]):
            await asyncio.to_thread(self._remember, issuance)
        return issuance.issued

    def _build_delegation(
        self,
        grantor: TokenClaims,
        name: str,
        grants: list[str],
        ttl: float | None,
        task: str | None,
        objective: str | None,
        kind: IdentityKind,
        labels: list[str] | tuple[str, ...] = (),
    ) -> _Issuance:
        """Check every rule and sign; no I/O. The caller records, then returns the token."""
        if kind not in ("agent", "beam"):
            raise BadRequest(f"tokens can be delegated to agents and beams, not {kind}s")
        subject = SpiffeId(self.config.trust_domain, kind, name)
        chain = (*grantor.grantors, grantor.subject)
        if len(chain) > self.config.max_chain_depth:
            raise DelegationRefused(
                f"delegation chain would be {len(chain)} deep; the limit is "
                f"{self.config.max_chain_depth}"
            )
        if subject in chain:
            raise DelegationRefused(f"{subject} already appears in the delegation chain")
        if objective is not None and len(objective.encode()) > MAX_OBJECTIVE_BYTES:
            raise BadRequest(f"objective is longer than {MAX_OBJECTIVE_BYTES} bytes")
        if task is not None and (not task or len(task) > MAX_TASK_CHARS or not task.isprintable()):
            raise BadRequest(f"task id must be 1-{MAX_TASK_CHARS} printable characters")
        if not isinstance(grants, list | tuple) or not all(isinstance(g, str) for g in grants):
            raise BadRequest("grants must be a list of 'KIND:PATTERN' strings")
        granted = parse_grants(tuple(grants)).attenuate(grantor.grants)
        all_labels = _inherit_labels(grantor.labels, labels)

        now = self.clock.now()
        remaining = grantor.expires_at - now
        if ttl is None:
            lifetime = min(self.config.token_ttl, remaining)
        else:
            if ttl <= 0:
                raise BadRequest("ttl must be positive")
            if ttl > self.config.max_ttl:
                raise DelegationRefused(
                    f"ttl {int(ttl)}s is longer than the maximum {int(self.config.max_ttl)}s"
                )
            if now + ttl > grantor.expires_at:
                raise DelegationRefused(
                    "expiry would be later than the grantor's "
                    f"(grantor expires in {int(remaining)}s, asked for {int(ttl)}s)"
                )
            lifetime = ttl
        if lifetime <= 0:
            raise DelegationRefused("the grantor's token has expired")
        claims = TokenClaims(
            issuer=self.issuer,
            subject=subject,
            audience=(self.config.audience,),
            issued_at=int(now),
            not_before=int(now),
            expires_at=min(int(now + lifetime), grantor.expires_at),
            token_id=secrets.token_hex(16),
            grantors=chain,
            chain_jti=(*grantor.chain_jti, grantor.token_id),
            grants=granted,
            task=task if task is not None else (grantor.task or f"task-{secrets.token_hex(6)}"),
            objective_sha256=objective_digest(objective)
            if objective is not None
            else grantor.objective_sha256,
            issued_at_ms=int(now * 1000),
            labels=all_labels,
        )
        event = Event(
            type="identity.issued",
            actor=str(grantor.subject),
            subject=str(subject),
            session=claims.task,
            decision="allow",
            data={
                "token_id": claims.token_id,
                "expires_at": claims.expires_at,
                "grants": claims.grants.to_list(),
                "chain": [str(g) for g in chain],
                "chain_jti": list(claims.chain_jti),
                "depth": claims.depth,
                "objective_sha256": claims.objective_sha256,
                **({"labels": list(all_labels)} if all_labels else {}),
            },
            bodies={"objective": objective.encode()} if objective is not None else {},
        )
        identity = (str(subject), kind, name, int(now * 1000), str(grantor.subject))
        return _Issuance(self._sign(claims), event, identity)

    # revocation -------------------------------------------------------------------------
    def revoke(
        self, by: TokenClaims, kind: RevocationKind, value: str, reason: str = ""
    ) -> Revocation:
        """Revoke a token (and all delegated from it), an agent's tokens, or a whole subtree.

        Users may revoke anything inside their own delegation tree; an agent only what it
        delegated itself. The admin user may revoke anything.
        """
        if kind != "token":
            SpiffeId.parse(value)  # validates
        if not self._may_revoke(by, kind, value):
            err = PermissionDenied(f"{by.subject} may not revoke {kind} {value}")
            self._refuse(err, str(by.subject), value if kind != "token" else None, {"revoke": kind})
            raise err
        now_ms = int(self.clock.now() * 1000)
        self._record(
            Event(
                type="identity.revoked",
                actor=str(by.subject),
                subject=value if kind != "token" else None,
                decision="allow",
                data={"kind": kind, "value": value, "reason": reason, "at_ms": now_ms},
            )
        )
        rev = self.store.add_revocation(kind, value, now_ms, reason, str(by.subject))
        self.revocations.add(rev)
        return rev

    def _is_admin(self, by: TokenClaims) -> bool:
        """The admin user's own token (not anything it delegated)."""
        return (
            by.subject.kind == "user"
            and by.subject.name == self.config.admin_user
            and not by.grantors
        )

    def add_user(self, by: TokenClaims, name: str, grants: list[str]) -> str:
        """Create a user (a human) and return its credential, shown once; only the admin may.
        The user's grants are within the admin's. The record holds no credential."""
        if not self._is_admin(by):
            raise PermissionDenied("only the admin user's own token may add users")
        subject = SpiffeId(self.config.trust_domain, "user", name)  # 400 if malformed
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise BadRequest("grants must be a list of 'KIND:PATTERN' strings")
        granted = parse_grants(tuple(grants)).attenuate(parse_grants(tuple(ADMIN_GRANTS)))
        if self.store.get_user(name) is not None:
            raise BadRequest(f"user {name!r} already exists")
        credential = "tether_uc_" + secrets.token_urlsafe(32)
        now_ms = int(self.clock.now() * 1000)
        self._record(
            Event(
                type="identity.user_added",
                actor=str(by.subject),
                subject=str(subject),
                decision="allow",
                data={"grants": granted.to_list()},
            )
        )
        self.store.add_user(name, credential, granted.to_list(), now_ms)
        self.store.ensure_identity(str(subject), "user", name, now_ms, str(by.subject))
        return credential

    def _may_revoke(self, by: TokenClaims, kind: RevocationKind, value: str) -> bool:
        if self._is_admin(by):
            return True
        if kind == "token":
            # Without a token table we cannot know whose token an id is; only the admin, or the
            # holder revoking its own token, may revoke by id.
            return value == by.token_id
        # An identity may revoke itself, or what it delegated (it is then in their chain).
        # Users own everything they delegated; membership is checked at verification time,
        # so scope the revocation to the caller's own subtree.
        return value == str(by.subject) or self._delegated_by(by.subject, value)

    def _delegated_by(self, grantor: SpiffeId, target: str) -> bool:
        """Is ``target`` below ``grantor`` in the tree of who first delegated to whom?"""
        created_by = {i.spiffe_id: i.created_by for i in self.store.list_identities()}
        seen: set[str] = set()
        node = created_by.get(target)
        while node is not None and node not in seen:
            if node == str(grantor):
                return True
            seen.add(node)
            node = created_by.get(node)
        return False

    # X.509-SVIDs ------------------------------------------------------------------------
    def issue_x509(self, holder: TokenClaims, csr_pem: bytes) -> tuple[bytes, int]:
        """Sign an X.509-SVID for the token holder's own SPIFFE ID from its CSR.

        The certificate expires no later than the token and the configured X.509 TTL.
        Returns (PEM chain: leaf then CA, expiry as epoch seconds).
        """
        public_key = csr_public_key(csr_pem, holder.subject)
        now = self.clock.now()
        not_after = min(int(now + self.config.x509_ttl), holder.expires_at)
        cert = issue_x509_svid(
            self.keys.ca_key,
            self.keys.ca_cert,
            public_key,
            holder.subject,
            datetime.fromtimestamp(int(now) - 30, UTC),
            datetime.fromtimestamp(not_after, UTC),
        )
        self._record(
            Event(
                type="identity.x509_issued",
                actor=str(holder.subject),
                subject=str(holder.subject),
                session=holder.task,
                decision="allow",
                data={
                    "serial": format(cert.serial_number, "x"),
                    "expires_at": not_after,
                    "token_id": holder.token_id,
                },
            )
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.keys.ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        return pem, not_after
