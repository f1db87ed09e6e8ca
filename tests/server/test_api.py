"""The JSON API end to end over ASGI: token exchange, whoami, revocation, bundle, errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.bad_requests import BAD_REQUESTS, JWT, TOKEN_EXCHANGE
from tether.server.services import Services


def _fill(obj: Any, token: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("{token}", token)
    if isinstance(obj, dict):
        return {k: _fill(v, token) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, token) for v in obj]
    return obj


async def delegate(
    api: httpx.AsyncClient, grantor: str, agent: str, **extra: Any
) -> httpx.Response:
    data = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": grantor,
        "subject_token_type": JWT,
        "agent": agent,
        **extra,
    }
    return await api.post("/v1/token", data=data)


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_bad_input_gets_clear_error(
    api: httpx.AsyncClient, admin_token: str, name: str
) -> None:
    method, path, kwargs, status, code = BAD_REQUESTS[name]
    resp = await api.request(method, path, **_fill(kwargs, admin_token))
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and body["error_description"]
    assert admin_token not in resp.text
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")


async def test_login_and_two_hop_delegation(api: httpx.AsyncClient, admin_credential: str) -> None:
    resp = await api.post(
        "/v1/token",
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": admin_credential,
            "subject_token_type": "urn:tether:params:oauth:token-type:user-credential",
        },
    )
    assert resp.status_code == 200
    user = resp.json()
    assert user["issued_token_type"] == JWT and user["spiffe_id"].endswith("/user/admin")
    assert resp.headers["cache-control"] == "no-store"

    r1 = await delegate(
        api,
        user["token"],
        "planner",
        scope="model:gpt-4o* tool:search.*",
        ttl="20m",
        objective="Summarise incidents",
        task="t-1",
    )
    assert r1.status_code == 200, r1.text
    planner = r1.json()
    assert {"token", "spiffe_id", "expires_at"} <= planner.keys()
    r2 = await delegate(api, planner["token"], "worker", grant=["model:gpt-4o-mini"], ttl="5m")
    assert r2.status_code == 200, r2.text
    who = (
        await api.get("/v1/whoami", headers={"authorization": f"Bearer {r2.json()['token']}"})
    ).json()
    assert [c["spiffe_id"] for c in who["chain"]] == [
        "spiffe://example.org/user/admin",
        "spiffe://example.org/agent/planner",
    ]
    assert who["task"] == "t-1"


@pytest.mark.parametrize(
    ("name", "extra", "match"),
    [
        ("bogus_widened_grants", {"grant": ["model:*"]}, "model:* is wider"),
        (
            "bogus_extended_expiry",
            {"grant": ["model:gpt-4o"], "ttl": "2h"},
            "later than the grantor",
        ),
        (
            "bogus_budget_raise",
            {"grant": ["model:gpt-4o", "budget:tokens=999999"]},
            "budget:tokens",
        ),
    ],
)
async def test_widening_is_refused_with_reason(
    api: httpx.AsyncClient, admin_token: str, name: str, extra: dict[str, Any], match: str
) -> None:
    r = await delegate(
        api, admin_token, "planner", grant=["model:gpt-4o", "budget:tokens=100"], ttl="30m"
    )
    planner = r.json()["token"]
    resp = await delegate(api, planner, "worker", **extra)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_scope"
    assert match in resp.json()["error_description"]


async def test_over_deep_chain_refused(
    api: httpx.AsyncClient, services: Services, admin_token: str
) -> None:
    token = admin_token
    for i in range(services.config.max_chain_depth):
        token = (await delegate(api, token, f"hop{i}", grant=["model:*"])).json()["token"]
    resp = await delegate(api, token, "one-too-many", grant=["model:*"])
    assert resp.status_code == 400 and "deep" in resp.json()["error_description"]


async def test_revoked_token_replayed_is_refused(api: httpx.AsyncClient, admin_token: str) -> None:
    agent = (await delegate(api, admin_token, "courier", grant=["model:*"])).json()
    hdr = {"authorization": f"Bearer {agent['token']}"}
    assert (await api.get("/v1/whoami", headers=hdr)).status_code == 200
    resp = await api.post(
        "/v1/revoke",
        json={"kind": "agent", "value": agent["spiffe_id"], "reason": "test"},
        headers={"authorization": f"Bearer {admin_token}"},
    )
    assert resp.status_code == 200
    replay = await api.get("/v1/whoami", headers=hdr)
    assert replay.status_code == 401 and replay.json()["error"] == "token_revoked"
    again = await delegate(api, agent["token"], "sub", grant=["model:*"])
    assert again.status_code == 400 and "revoked" in again.json()["error_description"]


async def test_bundle_is_spiffe_jwks(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/v1/bundle")).json()
    uses = sorted(k["use"] for k in doc["keys"])
    assert uses == ["jwt-svid", "x509-svid"]
    assert "spiffe_sequence" in doc
    assert all("d" not in k for k in doc["keys"])  # never a private part


async def test_openapi_and_health(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    assert "/v1/token" in schema["paths"] and "/v1/bundle" in schema["paths"]
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = (await api.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["audit_size"] >= 1


async def test_no_token_in_audit_log(
    api: httpx.AsyncClient, services: Services, admin_token: str
) -> None:
    agent = (await delegate(api, admin_token, "quiet", grant=["model:*"], objective="o")).json()
    await api.get("/v1/whoami", headers={"authorization": f"Bearer {agent['token']}"})
    dumped = json.dumps(services.audit.search(limit=1000))
    assert agent["token"] not in dumped and admin_token not in dumped
    assert agent["token"].split(".")[2] not in dumped
