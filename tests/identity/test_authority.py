"""The authority's delegation rules, against the real store and audit log."""

from __future__ import annotations

import pytest

from tether.errors import (
    AuthenticationError,
    BadRequest,
    DelegationRefused,
    PermissionDenied,
    RecordFailed,
    TokenRevoked,
)
from tether.events import MemoryRecorder
from tether.identity.authority import Authority, objective_digest
from tether.identity.revocation import RevocationList
from tether.server.services import Services


def test_two_hop_delegation_narrows_and_nests_chain(services: Services, admin_token: str) -> None:
    v = services.verifier
    admin = v.verify(admin_token)
    planner = services.authority.delegate(
        admin,
        "planner",
        ["model:gpt-4o*", "tool:search.*", "budget:tokens=5000"],
        ttl=600,
        objective="Write the churn report",
        task="churn-42",
    )
    p = v.verify(planner.token)
    worker = services.authority.delegate(
        p, "worker", ["model:gpt-4o-mini", "tool:search.web"], ttl=300
    )
    w = v.verify(worker.token)
    assert str(w.subject) == "spiffe://example.org/agent/worker"
    assert [str(g) for g in w.grantors] == [
        "spiffe://example.org/user/admin",
        "spiffe://example.org/agent/planner",
    ]
    assert w.chain_jti == (admin.token_id, p.token_id)
    assert w.task == "churn-42"  # inherited from the grantor
    assert w.objective_sha256 == objective_digest("Write the churn report")
    assert w.grants.budget.tokens == 5000
    assert w.expires_at <= p.expires_at


def test_refusals_name_the_problem_and_are_recorded(services: Services, admin_token: str) -> None:
    admin = services.verifier.verify(admin_token)
    p = services.verifier.verify(
        services.authority.delegate(admin, "planner", ["model:gpt-4o"], ttl=600).token
    )
    with pytest.raises(DelegationRefused, match=r"grant model:\* is wider"):
        services.authority.delegate(p, "worker", ["model:*"])
    with pytest.raises(DelegationRefused, match="expiry would be later than the grantor"):
        services.authority.delegate(p, "worker", ["model:gpt-4o"], ttl=3600)
    with pytest.raises(DelegationRefused, match="already appears"):
        services.authority.delegate(p, "planner", ["model:gpt-4o"])
    refused = services.audit.search(type="identity.refused")
    assert len(refused) == 3
    assert "wider" in refused[0]["data"]["reason"]


def test_chain_depth_limit(services: Services, admin_token: str) -> None:
    depth = services.config.max_chain_depth
    claims = services.verifier.verify(admin_token)
    for i in range(depth):
        claims = services.verifier.verify(
            services.authority.delegate(claims, f"a{i}", ["model:*"]).token
        )
    with pytest.raises(DelegationRefused, match=f"limit is {depth}"):
        services.authority.delegate(claims, "too-deep", ["model:*"])


def test_bad_login_is_refused(services: Services) -> None:
    with pytest.raises(AuthenticationError):
        services.authority.login("tether_uc_not-a-real-credential")


def test_revocation_bites_at_once_for_subtree(services: Services, admin_token: str) -> None:
    admin = services.verifier.verify(admin_token)
    p = services.authority.delegate(admin, "planner", ["model:*"], ttl=600)
    w = services.authority.delegate(
        services.verifier.verify(p.token), "worker", ["model:*"], ttl=300
    )
    services.verifier.verify(w.token)  # cached now
    services.authority.revoke(admin, "token", p.claims.token_id, "incident 7")
    with pytest.raises(TokenRevoked, match="grantor token"):
        services.verifier.verify(w.token)
    with pytest.raises(TokenRevoked):
        services.verifier.verify(p.token)
    # a fresh delegation after the incident works
    services.verifier.verify(services.authority.delegate(admin, "planner", ["model:*"]).token)


def test_agents_cannot_revoke_what_they_did_not_delegate(
    services: Services, admin_token: str
) -> None:
    admin = services.verifier.verify(admin_token)
    a = services.verifier.verify(services.authority.delegate(admin, "a", ["model:*"]).token)
    services.authority.delegate(admin, "b", ["model:*"])
    with pytest.raises(PermissionDenied):
        services.authority.revoke(a, "agent", "spiffe://example.org/agent/b")


def test_issuance_fails_closed_when_audit_is_down(services: Services, admin_token: str) -> None:
    rec = MemoryRecorder()
    auth = Authority(services.config, services.keys, services.store, rec, RevocationList())
    admin = services.verifier.verify(admin_token)
    rec.fail = True
    with pytest.raises(RecordFailed):
        auth.delegate(admin, "planner", ["model:*"])


def test_objective_and_task_limits(services: Services, admin_token: str) -> None:
    admin = services.verifier.verify(admin_token)
    with pytest.raises(BadRequest, match="objective"):
        services.authority.delegate(admin, "x", ["model:*"], objective="x" * 20000)
    with pytest.raises(BadRequest, match="task id"):
        services.authority.delegate(admin, "x", ["model:*"], task="bad\ntask")


async def test_async_issuance_fails_closed_and_records_refusals(
    services: Services, admin_token: str
) -> None:
    rec = MemoryRecorder()
    auth = Authority(services.config, services.keys, services.store, rec, RevocationList())
    admin = services.verifier.verify(admin_token)
    issued = await auth.adelegate(admin, "planner", ["model:gpt-4o"], ttl=60)
    assert rec.of_type("identity.issued")[0].data["token_id"] == issued.claims.token_id
    with pytest.raises(DelegationRefused):
        await auth.adelegate(issued.claims, "worker", ["model:*"])
    assert "wider" in rec.of_type("identity.refused")[0].data["reason"]
    rec.fail = True
    with pytest.raises(RecordFailed):
        await auth.adelegate(admin, "planner", ["model:*"])


def test_labels_are_inherited_and_cannot_be_dropped(services: Services, admin_token: str) -> None:
    """Labels put agents in groups; a child that could shed its grantor's label would escape
    the group's limits, so a child keeps every label and may only add."""
    v = services.verifier
    admin = v.verify(admin_token)
    lead = v.verify(
        services.authority.delegate(admin, "lead", ["tool:db.*"], labels=["swarm"]).token
    )
    assert lead.labels == ("swarm",)
    child = v.verify(
        services.authority.delegate(lead, "child", ["tool:db.add_index"], labels=["indexer"]).token
    )
    assert child.labels == ("swarm", "indexer")
    bare = v.verify(services.authority.delegate(lead, "bare", ["tool:db.add_index"]).token)
    assert bare.labels == ("swarm",)
    assert bare.summary()["labels"] == ["swarm"]


@pytest.mark.parametrize("bad", ["Upper", "", "x" * 64, "sp ace", "semi;colon"])
def test_invalid_labels_are_refused(services: Services, admin_token: str, bad: str) -> None:
    admin = services.verifier.verify(admin_token)
    with pytest.raises(BadRequest, match="label"):
        services.authority.delegate(admin, "x", [], labels=[bad])
