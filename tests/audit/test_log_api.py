"""``/v1/audit``: a client verifies what the API hands out with nothing but the Merkle maths."""

from __future__ import annotations

import httpx
import pytest

from tether.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from tether.audit.note import NoteVerifier, verify_checkpoint
from tether.events import Event
from tether.server.services import Services


@pytest.fixture
def auth(admin_token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {admin_token}"}


@pytest.fixture
def agent_auth(services: Services, admin_token: str) -> dict[str, str]:
    grantor = services.verifier.verify(admin_token)
    token = services.authority.delegate(grantor, "reader", ["model:gpt-4o"], task="t").token
    return {"authorization": f"Bearer {token}"}


def fill(services: Services, n: int = 6) -> None:
    for i in range(n):
        services.audit.record(
            Event(
                type="llm.invoke",
                actor="spiffe://example.org/agent/a",
                session="s-api",
                decision="allow",
                data={"i": i},
                bodies={"prompt": f"p{i}".encode()},
            )
        )


async def test_checkpoint_vkey_and_inclusion_proof_verify(
    api: httpx.AsyncClient, services: Services, auth: dict[str, str]
) -> None:
    fill(services)
    vkey = (await api.get("/v1/audit/vkey", headers=auth)).text.strip()
    verifier = NoteVerifier.from_vkey(vkey)
    r = await api.get("/v1/audit/checkpoint", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    cp = verify_checkpoint(r.text, verifier, services.config.audit_origin)
    size = cp.size
    entry = (
        await api.get(f"/v1/audit/entries/{size - 1}?proof=true&size={size}", headers=auth)
    ).json()
    data = entry["data"].encode()
    assert entry["leaf_hash"] == leaf_hash(data).hex()
    hashes = [bytes.fromhex(h) for h in entry["proof"]["hashes"]]
    verify_inclusion(leaf_hash(data), size - 1, size, hashes, cp.root_hash)
    p = (await api.get(f"/v1/audit/proof/inclusion?index=0&size={size}", headers=auth)).json()
    verify_inclusion(
        bytes.fromhex(p["leaf_hash"]),
        0,
        size,
        [bytes.fromhex(h) for h in p["hashes"]],
        cp.root_hash,
    )


async def test_consistency_proof(
    api: httpx.AsyncClient, services: Services, auth: dict[str, str]
) -> None:
    fill(services)
    new = services.audit.size()
    c = (await api.get(f"/v1/audit/proof/consistency?old=2&new={new}", headers=auth)).json()
    verify_consistency(
        2,
        new,
        bytes.fromhex(c["old_root"]),
        bytes.fromhex(c["new_root"]),
        [bytes.fromhex(h) for h in c["hashes"]],
    )


async def test_search_sessions_and_bodies(
    api: httpx.AsyncClient, services: Services, auth: dict[str, str]
) -> None:
    fill(services, 3)
    s = (await api.get("/v1/audit/sessions/s-api", headers=auth)).json()
    assert s["count"] == 3 and [e["data"]["i"] for e in s["entries"]] == [0, 1, 2]
    found = (
        await api.get("/v1/audit/search?type=llm.*&limit=2&descending=true", headers=auth)
    ).json()
    assert [e["data"]["i"] for e in found["entries"]] == [2, 1]
    digest = s["entries"][0]["bodies"]["prompt"]
    body = await api.get(f"/v1/audit/bodies/{digest}", headers=auth)
    assert body.content == b"p0"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/audit/entries/999", 404, "not_found"),
        ("/v1/audit/proof/inclusion?index=999", 400, "invalid_request"),
        ("/v1/audit/proof/inclusion?index=-1", 400, "invalid_request"),
        ("/v1/audit/proof/consistency?old=999", 400, "invalid_request"),
        ("/v1/audit/bodies/not-hex", 400, "invalid_request"),
        ("/v1/audit/search?limit=0", 400, "invalid_request"),
    ],
    ids=[
        "bogus_missing_entry",
        "bogus_index_beyond",
        "bogus_negative_index",
        "bogus_old_beyond",
        "bogus_body_name",
        "bogus_limit",
    ],
)
async def test_bad_requests_get_json_errors(
    api: httpx.AsyncClient, auth: dict[str, str], path: str, status: int, code: str
) -> None:
    r = await api.get(path, headers=auth)
    assert r.status_code == status
    assert r.json()["error"] == code and r.json()["error_description"]


async def test_authentication_is_required(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/audit/checkpoint")
    assert r.status_code == 401 and "error" in r.json()


async def test_agents_get_hashes_but_not_contents(
    api: httpx.AsyncClient, services: Services, agent_auth: dict[str, str]
) -> None:
    fill(services, 1)
    assert (await api.get("/v1/audit/checkpoint", headers=agent_auth)).status_code == 200
    assert (
        await api.get("/v1/audit/proof/inclusion?index=0", headers=agent_auth)
    ).status_code == 200
    for path in ("/v1/audit/entries/0", "/v1/audit/search", "/v1/audit/sessions/s-api"):
        r = await api.get(path, headers=agent_auth)
        assert r.status_code == 403 and r.json()["error"] == "permission_denied"
