"""The approvals and JIT grant API over ASGI, with real tokens, store and audit log."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tether.clock import ManualClock
from tether.identity.claims import TokenClaims
from tether.policy.action import Action
from tether.policy.approvals import Approvals
from tether.policy.jit import JitGrants
from tether.server.app import create_app
from tether.server.routes_approvals import approvals_router
from tether.server.services import Services
from tether.store.approvals import ApprovalStore


@dataclass
class World:
    api: httpx.AsyncClient
    desk: Approvals
    clock: ManualClock
    services: Services
    admin: str
    bob: str
    worker: str
    outsider: str

    def claims(self, token: str) -> TokenClaims:
        return self.services.verifier.verify(token)

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def approval_store(services: Services) -> Iterator[ApprovalStore]:
    store = ApprovalStore(services.data_dir.db_path)
    yield store
    store.close()


@pytest.fixture
async def world(
    services: Services, admin_token: str, approval_store: ApprovalStore
) -> AsyncIterator[World]:
    clock = ManualClock(time.time())
    desk = Approvals(approval_store, services.audit, clock=clock, poll_interval=0.01)
    app = create_app(services)
    app.include_router(approvals_router())
    app.state.approvals = desk
    app.state.jit = JitGrants(desk)
    services.store.add_user("bob", "tether_uc_bob-credential", ["tool:*"], 0)
    bob = services.authority.login("tether_uc_bob-credential").token
    admin = services.verifier.verify(admin_token)
    worker = services.authority.delegate(admin, "worker", ["tool:db.*"], task="t-1").token
    outsider = services.authority.delegate(services.verifier.verify(bob), "other", ["tool:x"]).token
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tether") as api:
        yield World(api, desk, clock, services, admin_token, bob, worker, outsider)


def escalate(w: World, quorum: str = "1 of human") -> str:
    action = Action("tool.call", w.claims(w.worker), "db.schema_change", {"sql": "CREATE INDEX"})
    return w.desk.open(action, ("schema changes need a human",), quorum, "v1")


def err(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and body["error_description"]
    return str(body["error_description"])


async def test_list_show_approve(world: World) -> None:
    w = world
    rid = escalate(w)
    resp = await w.api.get("/v1/approvals", params={"state": "pending"}, headers=w.auth(w.bob))
    assert resp.status_code == 200, resp.text
    [item] = resp.json()["approvals"]
    assert item["id"] == rid and item["missing"] == "1 more of human"
    assert item["summary"]["arguments"] == {"sql": "CREATE INDEX"}

    # the admin delegated the worker: refused
    resp = await w.api.post(f"/v1/approvals/{rid}/approve", headers=w.auth(w.admin))
    assert "delegated the requester" in err(resp, 403, "permission_denied")

    resp = await w.api.post(
        f"/v1/approvals/{rid}/approve",
        json={"uses": 2, "comment": "ok for today"},
        headers=w.auth(w.bob),
    )
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["state"] == "approved" and doc["uses"] == 2 and "valid_until_ms" in doc
    assert doc["votes"][0]["comment"] == "ok for today"

    resp = await w.api.post(f"/v1/approvals/{rid}/approve", headers=w.auth(w.bob))
    assert "already approved" in err(resp, 409, "conflict")
    resp = await w.api.post(
        f"/v1/approvals/{rid}/deny", json={"reason": "late"}, headers=w.auth(w.bob)
    )
    err(resp, 409, "conflict")

    resp = await w.api.get(f"/v1/approvals/{rid}", headers=w.auth(w.admin))
    assert resp.status_code == 200 and resp.json()["state"] == "approved"


async def test_deny_and_bad_bodies(world: World) -> None:
    w = world
    rid = escalate(w)
    resp = await w.api.post(f"/v1/approvals/{rid}/deny", json={}, headers=w.auth(w.bob))
    err(resp, 400, "invalid_request")
    resp = await w.api.post(f"/v1/approvals/{rid}/approve", json={"uses": 0}, headers=w.auth(w.bob))
    err(resp, 400, "invalid_request")
    resp = await w.api.post(
        f"/v1/approvals/{rid}/deny", json={"reason": "freeze"}, headers=w.auth(w.bob)
    )
    assert resp.status_code == 200 and resp.json()["state"] == "denied"
    resp = await w.api.get("/v1/approvals", params={"state": "bogus"}, headers=w.auth(w.bob))
    err(resp, 400, "invalid_request")


async def test_outside_quorum_and_unknown(world: World) -> None:
    w = world
    rid = escalate(w, "1 of user:carol")
    resp = await w.api.post(f"/v1/approvals/{rid}/approve", headers=w.auth(w.bob))
    assert "not in the quorum" in err(resp, 403, "permission_denied")
    for path in ("/v1/approvals/apr_0123456789abcdef", "/v1/approvals/not-an-id"):
        err(await w.api.get(path, headers=w.auth(w.bob)), 404, "not_found")
    resp = await w.api.post("/v1/approvals/apr_00/approve", headers=w.auth(w.bob))
    err(resp, 404, "not_found")
    err(await w.api.get("/v1/approvals"), 401, "unauthenticated")


async def test_visibility(world: World) -> None:
    w = world
    rid = escalate(w)
    # the requester sees its own request; an agent outside the quorum does not
    resp = await w.api.get("/v1/approvals", headers=w.auth(w.worker))
    assert [a["id"] for a in resp.json()["approvals"]] == [rid]
    resp = await w.api.get("/v1/approvals", headers=w.auth(w.outsider))
    assert resp.json()["approvals"] == []
    err(await w.api.get(f"/v1/approvals/{rid}", headers=w.auth(w.outsider)), 404, "not_found")


async def test_expired_is_409(world: World) -> None:
    w = world
    rid = escalate(w)
    w.clock.advance(3600)
    resp = await w.api.post(f"/v1/approvals/{rid}/approve", headers=w.auth(w.bob))
    assert "expired" in err(resp, 409, "conflict")
    resp = await w.api.get(f"/v1/approvals/{rid}", headers=w.auth(w.bob))
    assert resp.json()["state"] == "expired"


async def test_jit_request_approve_active(world: World) -> None:
    w = world
    resp = await w.api.post(
        "/v1/grants/requests",
        json={"grants": ["tool:db.migrate"], "reason": "hotfix", "ttl": "30m"},
        headers=w.auth(w.worker),
    )
    assert resp.status_code == 200, resp.text
    req = resp.json()
    assert req["id"].startswith("jit_") and req["state"] == "pending" and req["task"] == "t-1"

    resp = await w.api.post(f"/v1/approvals/{req['id']}/approve", headers=w.auth(w.worker))
    assert "its own request" in err(resp, 403, "permission_denied")
    resp = await w.api.post(f"/v1/approvals/{req['id']}/approve", headers=w.auth(w.bob))
    assert resp.json()["state"] == "approved"

    resp = await w.api.get("/v1/grants/requests", headers=w.auth(w.worker))
    doc = resp.json()
    assert doc["active_grants"] == ["tool:db.migrate"]
    assert [r["id"] for r in doc["requests"]] == [req["id"]]

    # asking again for what is in force reuses the approved request
    resp = await w.api.post(
        "/v1/grants/requests",
        json={"grants": ["tool:db.migrate"], "reason": "again", "ttl": 600},
        headers=w.auth(w.worker),
    )
    assert resp.json()["id"] == req["id"] and resp.json()["state"] == "approved"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"grants": ["budget:tokens=-1"], "reason": "x", "ttl": "5m"}, "non-negative"),
        ({"grants": ["nonsense"], "reason": "x", "ttl": "5m"}, "KIND:PATTERN"),
        ({"grants": [], "reason": "x", "ttl": "5m"}, "grants"),
        ({"grants": ["tool:x"], "reason": "x", "ttl": "forever"}, "invalid ttl"),
        ({"grants": ["tool:x"], "reason": "x", "ttl": "5m", "task": "t-9"}, "bound to task"),
        ({"grants": ["tool:x"], "ttl": "5m"}, "reason"),
    ],
)
async def test_jit_bad_requests(world: World, body: dict[str, object], match: str) -> None:
    resp = await world.api.post("/v1/grants/requests", json=body, headers=world.auth(world.worker))
    assert match in err(resp, 400, "invalid_request")
