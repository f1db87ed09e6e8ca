"""The paper's swarm scenario, end to end with every real part.

Fifty agents in one group each try to add an index. Each is individually authorised (its token
grants ``tool:db.add_index``), but the group may make at most 3 schema changes an hour; past
that, the limit escalates to "2 of group:sre". Three go through, the other 47 escalate; two
SREs approve one of them, which then goes through once; the audit log shows all of it.

Real parts: Cedar policies from the data dir, boundaries.toml, the SQLite limiter, the approval
desk and its API, the audit log.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tether.identity.claims import TokenClaims
from tether.policy.action import Action, Decision
from tether.server.services import Services

BOUNDARIES = """
[groups.swarm]
labels = ["swarm"]

[groups.sre]
members = ["spiffe://example.org/user/bob", "spiffe://example.org/user/carol"]
delegated = false

[effects]
"db.schema_change" = ["tool.call:db.add_index"]

[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 3
window = "1h"
on_exceed = "escalate"
quorum = "2 of group:sre"
"""

# A forbid in Cedar beside the limit: nobody touches the billing database, approval or not.
POLICY = """
@id("no-billing-schema")
@reason("schema changes to the billing database are never allowed")
forbid(principal, action == Tether::Action::"tool.call", resource == Tether::Tool::"db.add_index")
when { principal.task == "billing" };
"""


def _user(services: Services, name: str) -> str:
    credential = f"tether_uc_test_{name}_credential_0123456789"
    services.store.add_user(name, credential, ["tool:*", "model:*"], 0)
    return services.authority.login(credential).token


def _index(agent: TokenClaims, i: int) -> Action:
    return Action(
        "tool.call", agent, "db.add_index", arguments={"table": "orders", "column": f"c{i}"}
    )


async def _decide_and_record(services: Services, action: Action) -> Decision:
    decision = await services.core.adecide(action)
    await services.audit.arecord(services.core.event(action, decision))
    return decision


@pytest.fixture
def swarm_home(home: Path) -> Path:
    (home / "policies" / "boundaries.toml").write_text(BOUNDARIES)
    (home / "policies" / "20-billing.cedar").write_text(POLICY)
    return home


async def test_fifty_agents_three_pass_the_rest_escalate_and_a_quorum_lets_one_more(
    swarm_home: Path, services: Services, api: httpx.AsyncClient
) -> None:
    alice = services.verifier.verify(_user(services, "alice"))
    bob, carol = _user(services, "bob"), _user(services, "carol")
    agents = [
        services.verifier.verify(
            services.authority.delegate(
                alice, f"indexer-{i}", ["tool:db.add_index"], labels=["swarm"]
            ).token
        )
        for i in range(50)
    ]
    actions = [_index(a, i) for i, a in enumerate(agents)]

    decisions = await asyncio.gather(*(_decide_and_record(services, a) for a in actions))

    outcomes = Counter(d.outcome for d in decisions)
    assert outcomes == {"allow": 3, "escalate": 47}
    escalated = [(a, d) for a, d in zip(actions, decisions, strict=True) if d.outcome == "escalate"]
    for _, d in escalated:
        assert d.quorum == "2 of group:sre" and d.approval
        assert any("schema-changes" in r for r in d.reasons)
    assert services.limiter.usage("schema-changes") == 3

    # The agent retrying without an approval escalates again, against the same request.
    action, first = escalated[0]
    again = await services.core.adecide(action)
    assert again.outcome == "escalate" and again.approval == first.approval

    # alice delegated the swarm: she may not approve for it, nor is she an SRE.
    path = f"/v1/approvals/{first.approval}/approve"
    r = await api.post(path, json={}, headers={"Authorization": f"Bearer {alice.token_id}"})
    assert r.status_code == 401  # a token id is not a token
    alice_token = _user_token(services, "alice")
    r = await api.post(path, json={}, headers={"Authorization": f"Bearer {alice_token}"})
    assert r.status_code == 403, r.text

    # One SRE is not a quorum; the second completes it.
    r = await api.post(path, json={"comment": "ok"}, headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "pending"
    assert (await services.core.adecide(action)).outcome == "escalate"
    r = await api.post(path, json={}, headers={"Authorization": f"Bearer {carol}"})
    assert r.status_code == 200 and r.json()["state"] == "approved", r.text

    # Now exactly that action goes through, once; the same call for another column does not.
    through = await _decide_and_record(services, action)
    assert through.allowed and through.approval
    assert services.limiter.usage("schema-changes") == 4
    other = _index(action.principal, 999)
    assert (await services.core.adecide(other)).outcome == "escalate"
    replay = await services.core.adecide(action)
    assert replay.outcome == "escalate"  # the approval was for one use

    # Policy still comes first: a forbid denies before any limit is counted or approval asked.
    billing = services.verifier.verify(
        services.authority.delegate(
            alice, "indexer-billing", ["tool:db.add_index"], labels=["swarm"], task="billing"
        ).token
    )
    denied = await services.core.adecide(_index(billing, 0))
    assert denied.outcome == "deny" and "no-billing-schema" in denied.policies
    assert "never allowed" in " ".join(denied.reasons)
    assert services.limiter.usage("schema-changes") == 4

    # The audit log shows all of it: 51 decisions, the request, both votes, the use.
    entries = services.audit.search(type="tool.call", limit=1000)
    assert Counter(e["decision"] for e in entries) == {"allow": 4, "escalate": 47}
    approval_events = Counter(e["type"] for e in services.audit.search(type="approval.*"))
    assert approval_events["approval.requested"] >= 47
    assert approval_events["approval.granted"] == 2
    assert approval_events["approval.approved"] == 1
    assert approval_events["approval.used"] == 1


def _user_token(services: Services, name: str) -> str:
    return services.authority.login(f"tether_uc_test_{name}_credential_0123456789").token
