"""JWT-SVID crypto rates: ES256 signing, cold and cached verification, with baselines.

Baselines are measured side by side on the same bytes: raw ``cryptography`` ECDSA P-256
sign/verify (the floor any Python ES256 implementation sits on) and PyJWT's ``jwt.decode``.
The verifier runs with a revocation list holding 1,000 revoked tokens and 20 agent/subtree
revocations, so the per-call revocation check is not the trivial empty case.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench._table import Result, median_rate
from tether.identity.bundle import build_bundle, parse_bundle
from tether.identity.claims import TokenClaims
from tether.identity.grants import Grants
from tether.identity.jws import sign_es256, verify_es256
from tether.identity.keys import KeySet, jwk_thumbprint
from tether.identity.revocation import Revocation, RevocationList
from tether.identity.spiffe import SpiffeId
from tether.identity.verifier import Verifier

TD = "example.org"
AUDIENCE = "tether"
COLD_TOKENS = 2_000
CACHED_CALLS = 200_000


def _keyset() -> KeySet:
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tether.identity.x509 import make_ca_cert

    jwt_key = ec.generate_private_key(ec.SECP256R1())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    return KeySet(
        jwt_key=jwt_key,
        jwt_kid=jwk_thumbprint(jwt_key.public_key()),
        ca_key=ca_key,
        ca_cert=make_ca_cert(ca_key, TD, datetime.now(UTC)),
        note_key=Ed25519PrivateKey.generate(),
        note_name=f"{TD}/tether/audit",
    )


def _payload(now: float) -> dict[str, Any]:
    """A realistic two-hop delegated token: alice -> planner -> researcher."""
    claims = TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId(TD, "agent", "researcher"),
        audience=(AUDIENCE,),
        issued_at=int(now),
        not_before=int(now),
        expires_at=int(now) + 1800,
        token_id=secrets.token_hex(16),
        grantors=(SpiffeId(TD, "user", "alice"), SpiffeId(TD, "agent", "planner")),
        chain_jti=(secrets.token_hex(16), secrets.token_hex(16)),
        grants=Grants.parse(
            ["model:gpt-4o*", "tool:search.*", "http:billing/invoices/*", "budget:tokens=20000"]
        ),
        task="churn-report-42",
        objective_sha256=hashlib.sha256(b"write the churn report").hexdigest(),
        issued_at_ms=int(now * 1000),
    )
    return claims.to_payload()


def _revocations(now: float) -> RevocationList:
    at = int(now * 1000) - 60_000
    revs = [Revocation("token", secrets.token_hex(16), at) for _ in range(1000)]
    revs += [Revocation("agent", f"spiffe://{TD}/agent/old-{i}", at) for i in range(10)]
    revs += [Revocation("subtree", f"spiffe://{TD}/user/gone-{i}", at) for i in range(10)]
    return RevocationList(revs)


def run() -> list[Result]:
    keys = _keyset()
    now = time.time()
    payload = _payload(now)
    bundle = parse_bundle(build_bundle(keys), TD)
    revocations = _revocations(now)
    token = sign_es256(payload, keys.jwt_key, keys.jwt_kid)
    h, p, _ = token.split(".")
    signing_input = f"{h}.{p}".encode()
    public = keys.jwt_key.public_key()
    ecdsa = ec.ECDSA(hashes.SHA256())
    der = keys.jwt_key.sign(signing_input, ecdsa)
    tokens = [sign_es256(_payload(now), keys.jwt_key, keys.jwt_kid) for _ in range(COLD_TOKENS)]
    n = 2_000

    def sign() -> int:
        for _ in range(n):
            sign_es256(payload, keys.jwt_key, keys.jwt_kid)
        return n

    def raw_sign() -> int:
        for _ in range(n):
            keys.jwt_key.sign(signing_input, ecdsa)
        return n

    def raw_verify() -> int:
        for _ in range(n):
            public.verify(der, signing_input, ecdsa)
        return n

    def jws_verify() -> int:
        for t in tokens:
            verify_es256(t, bundle.jwt_keys)
        return len(tokens)

    def cold() -> int:
        verifier = Verifier(bundle, audience=AUDIENCE, revocations=revocations)
        for t in tokens:  # all distinct: every call misses the cache
            verifier.verify(t)
        return len(tokens)

    def cold_two_threads() -> int:
        # cryptography releases the GIL while it verifies, so a threaded gateway uses both cores
        verifier = Verifier(bundle, audience=AUDIENCE, revocations=revocations)
        halves = [tokens[0::2], tokens[1::2]]
        threads = [
            threading.Thread(target=lambda ts=ts: [verifier.verify(t) for t in ts]) for ts in halves
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return len(tokens)

    def pyjwt_decode() -> int:
        for t in tokens:
            jwt.decode(t, public, algorithms=["ES256"], audience=AUDIENCE)
        return len(tokens)

    warm = Verifier(bundle, audience=AUDIENCE, revocations=revocations)
    hot = tokens[:1000]
    for t in hot:
        warm.verify(t)

    def cached() -> int:
        verify = warm.verify
        for _ in range(CACHED_CALLS // len(hot)):
            for t in hot:
                verify(t)
        return CACHED_CALLS

    sign_rate = median_rate(sign)
    raw_sign_rate = median_rate(raw_sign)
    raw_verify_rate = median_rate(raw_verify)
    jws_rate = median_rate(jws_verify)
    cold_rate = median_rate(cold)
    cold2_rate = median_rate(cold_two_threads)
    pyjwt_rate = median_rate(pyjwt_decode)
    cached_rate = median_rate(cached)
    return [
        Result(
            "identity",
            "ES256 JWT-SVID sign (delegated payload) / s",
            sign_rate,
            "/s",
            target=">= 20,000 (<= 50 us)",
            baseline=f"raw ECDSA sign {raw_sign_rate:,.0f}/s",
            met=sign_rate >= 20_000,
        ),
        Result(
            "identity",
            "verify_es256 (signature + shape only) / s",
            jws_rate,
            "/s",
            target=">= 10,000 (<= 100 us)",
            baseline=f"raw ECDSA verify {raw_verify_rate:,.0f}/s",
            met=jws_rate >= 10_000,
        ),
        Result(
            "identity",
            "Verifier.verify cold (distinct tokens) / s",
            cold_rate,
            "/s",
            target=">= 8,000",
            baseline=f"PyJWT decode {pyjwt_rate:,.0f}/s; raw verify {raw_verify_rate:,.0f}/s",
            met=cold_rate >= 8_000,
        ),
        Result(
            "identity",
            "Verifier.verify cold, 2 threads (distinct tokens) / s",
            cold2_rate,
            "/s",
            baseline=f"1 thread {cold_rate:,.0f}/s (informational: GIL-bound claim parsing)",
        ),
        Result(
            "identity",
            "Verifier.verify cached / s",
            cached_rate,
            "/s",
            target=">= 200,000",
            baseline=f"PyJWT decode (no cache) {pyjwt_rate:,.0f}/s",
            met=cached_rate >= 200_000,
        ),
    ]


if __name__ == "__main__":
    from bench._table import print_table

    print_table(run())
