"""The offline JWT-SVID verifier every enforcement point uses: no call to the authority.

``Verifier.verify(token)`` returns the token's :class:`TokenClaims` or raises
:class:`~tether.errors.InvalidToken` (or its subclasses ``TokenExpired``, ``TokenRevoked``).
Checks, in order:

1. shape, size and ES256 signature against the trust bundle's ``jwt-svid`` keys (``jws``);
2. the claims parse (``TokenClaims.from_payload``: chain and ``chain_jti`` agree, types hold);
3. issuer is ``spiffe://<td>``; the holder and every grantor in the chain are in ``<td>``;
4. ``aud`` contains this verifier's audience;
5. time: ``nbf <= now + leeway`` and ``now < exp + leeway``;
6. revocation: the token, any grantor token in its chain, the holder, or any grantor.

Cache: a verified token's claims are kept, keyed by the token string, until the token expires
or the cache is full (the oldest entry goes first). A hit skips steps 1-4, which depend only on
the token and the bundle, and repeats 5 and 6 on every call, so an expiry or a revocation bites
at once, including for a token replayed after it was revoked. Failures are never cached: a bad
token costs a full check each time, which is what an attacker would pay anyway, and nothing an
attacker sends can evict more than one entry per well-signed token. Replacing the bundle
empties the cache, so a key withdrawn from the bundle stops verifying at once.
"""

from __future__ import annotations

import threading

from tether.clock import Clock, SystemClock
from tether.errors import InvalidToken, TokenExpired, TokenRevoked
from tether.identity.bundle import TrustBundle
from tether.identity.claims import TokenClaims
from tether.identity.jws import verify_es256
from tether.identity.revocation import RevocationList

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_LEEWAY", "Verifier"]

DEFAULT_LEEWAY = 5
DEFAULT_CACHE_SIZE = 100_000


class Verifier:
    """Verifies Tether JWT-SVIDs offline against a trust bundle. Thread-safe."""

    def __init__(
        self,
        bundle: TrustBundle,
        *,
        audience: str,
        revocations: RevocationList,
        clock: Clock = SystemClock(),
        leeway: int = DEFAULT_LEEWAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if leeway < 0 or cache_size < 0:
            raise ValueError("leeway and cache_size must be non-negative")
        self.audience = audience
        self.revocations = revocations
        self.clock = clock
        self.leeway = leeway
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._cache: dict[str, TokenClaims] = {}
        self._epoch = 0  # bumped by update_bundle, under the lock
        self._set_bundle(bundle)

    def __repr__(self) -> str:
        return (
            f"Verifier(trust_domain={self._trust_domain!r}, audience={self.audience!r}, "
            f"cached={len(self._cache)})"
        )

    def _set_bundle(self, bundle: TrustBundle) -> None:
        self._bundle = bundle
        self._keys = dict(bundle.jwt_keys)  # a private copy: the caller's dict may change
        self._trust_domain = bundle.trust_domain
        self._issuer = f"spiffe://{bundle.trust_domain}"

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    def update_bundle(self, bundle: TrustBundle) -> None:
        """Trust ``bundle`` from now on; tokens verified under the old one are checked again."""
        with self._lock:
            self._set_bundle(bundle)
            self._epoch += 1
            self._cache.clear()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def verify(self, token: str) -> TokenClaims:
        """The verified claims of ``token``. Raises InvalidToken, TokenExpired or TokenRevoked."""
        if not isinstance(token, str):  # before the cache: a list is not even hashable
            raise InvalidToken("malformed token: not a string")
        claims = self._cache.get(token)
        if claims is not None:
            self._check_current(claims, token)
            return claims
        epoch = self._epoch
        claims = self._verify_cold(token)
        self._check_current(claims, None)
        self._remember(token, claims, epoch)
        return claims

    def _verify_cold(self, token: str) -> TokenClaims:
        claims = TokenClaims.from_payload(verify_es256(token, self._keys))
        td = self._trust_domain
        if claims.issuer != self._issuer:
            if claims.issuer.startswith("spiffe://"):
                raise InvalidToken(
                    f"token issued by foreign trust domain {claims.issuer[9:120]!r} "
                    f"(this verifier trusts {td!r})"
                )
            raise InvalidToken(f"token issuer {claims.issuer[:120]!r} is not trust domain {td!r}")
        if claims.subject.trust_domain != td:
            raise InvalidToken(
                f"token is for foreign trust domain {claims.subject.trust_domain!r} "
                f"(this verifier trusts {td!r})"
            )
        for grantor in claims.grantors:
            if grantor.trust_domain != td:
                raise InvalidToken(
                    f"delegation chain includes foreign trust domain {grantor.trust_domain!r} "
                    f"(this verifier trusts {td!r})"
                )
        if self.audience not in claims.audience:
            shown = ", ".join(a[:60] for a in claims.audience[:4]) or "none"
            raise InvalidToken(f"token audience ({shown}) does not include {self.audience!r}")
        return claims

    def _check_current(self, claims: TokenClaims, cached_as: str | None) -> None:
        """The checks that change with time: validity window and revocation."""
        now = self.clock.now()
        if claims.not_before > now + self.leeway:
            raise InvalidToken(f"token {claims.token_id[:64]} is not yet valid")
        if now >= claims.expires_at + self.leeway:
            if cached_as is not None:
                with self._lock:
                    self._cache.pop(cached_as, None)
            raise TokenExpired(f"token {claims.token_id[:64]} has expired")
        reason = self.revocations.reason(claims)
        if reason is not None:
            raise TokenRevoked(f"token revoked: {reason}")

    def _remember(self, token: str, claims: TokenClaims, epoch: int) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            if epoch != self._epoch:  # the bundle changed while we verified: do not cache
                return
            cache = self._cache
            while len(cache) >= self.cache_size:
                del cache[next(iter(cache))]  # dicts keep insertion order: oldest first
            cache[token] = claims
