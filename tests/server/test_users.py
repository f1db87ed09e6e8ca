"""Adding users (humans): admin only, credential shown once, never recorded."""

from __future__ import annotations

import httpx

from tether.identity.exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_USER_CREDENTIAL
from tether.server.services import Services


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_admin_adds_a_user_who_can_log_in(
    api: httpx.AsyncClient, admin_token: str, services: Services
) -> None:
    r = await api.post(
        "/v1/users", json={"name": "bob", "grants": ["tool:*"]}, headers=_auth(admin_token)
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["spiffe_id"] == "spiffe://example.org/user/bob"
    credential = doc["credential"]
    r = await api.post(
        "/v1/token",
        data={
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": credential,
            "subject_token_type": TOKEN_TYPE_USER_CREDENTIAL,
        },
    )
    assert r.status_code == 200
    bob = services.verifier.verify(r.json()["access_token"])
    assert str(bob.subject) == "spiffe://example.org/user/bob"
    assert bob.grants.to_list() == ["tool:*"]
    recorded = services.audit.search(type="identity.user_added")
    assert len(recorded) == 1 and credential not in str(recorded)


async def test_only_the_admin_adds_users_and_bad_input_is_refused(
    api: httpx.AsyncClient, admin_token: str, services: Services
) -> None:
    admin = services.verifier.verify(admin_token)
    agent = services.authority.delegate(admin, "helper", ["tool:*"]).token
    r = await api.post("/v1/users", json={"name": "eve"}, headers=_auth(agent))
    assert r.status_code == 403 and r.json()["error"] == "permission_denied"
    bad = [
        ({"name": "../x"}, 400),
        ({"name": "x", "grants": ["tool"]}, 400),
        ({"name": "x", "surprise": 1}, 400),
        ({"name": "admin"}, 400),  # exists
    ]
    for body, status in bad:
        r = await api.post("/v1/users", json=body, headers=_auth(admin_token))
        assert r.status_code == status, (body, r.text)
