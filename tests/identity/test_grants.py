from decimal import Decimal

import pytest

from tether.errors import BadRequest, DelegationRefused
from tether.identity.grants import Grant, Grants
from tether.identity.spiffe import SpiffeId


@pytest.mark.parametrize(
    ("child", "parent", "within"),
    [
        ("gpt-4o", "gpt-4o", True),
        ("gpt-4o-mini", "gpt-4o*", True),
        ("gpt-4o*", "gpt-4*", True),
        ("*", "gpt-4*", False),
        ("gpt-4*", "gpt-4o*", False),
        ("a*", "a*b", False),
        ("*a*", "*a", False),
        ("x.search", "*", True),
        ("claude-*", "gpt-*", False),
    ],
)
def test_pattern_containment_is_sound(child: str, parent: str, within: bool) -> None:
    assert Grant("model", child).within(Grant("model", parent)) is within


def test_kinds_never_cross() -> None:
    assert not Grant("tool", "x").within(Grant("model", "*"))


def test_attenuate_names_offending_grant() -> None:
    parent = Grants.parse(["model:gpt-4*", "tool:search.*"])
    with pytest.raises(DelegationRefused, match=r"tool:\* is wider"):
        Grants.parse(["model:gpt-4o", "tool:*"]).attenuate(parent)


def test_budget_inherits_and_cannot_grow() -> None:
    parent = Grants.parse(["model:*", "budget:tokens=1000", "budget:usd=2.50"])
    child = Grants.parse(["model:gpt-4o"]).attenuate(parent)
    assert child.budget.tokens == 1000 and child.budget.usd == Decimal("2.50")
    assert "budget:tokens=1000" in child.to_list()
    with pytest.raises(DelegationRefused, match="budget:tokens=5000"):
        Grants.parse(["model:gpt-4o", "budget:tokens=5000"]).attenuate(parent)
    smaller = Grants.parse(["model:gpt-4o", "budget:tokens=10"]).attenuate(parent)
    assert smaller.budget.tokens == 10


@pytest.mark.parametrize(
    "bad",
    [
        "model",
        "weapon:*",
        "model:",
        "model:a b",
        "model:[abc]",
        "model:?",
        "budget:tokens=-1",
        "budget:usd=NaN",
        "budget:cows=3",
        "budget:tokens=x",
        42,
    ],
)
def test_bad_grants_are_refused_clearly(bad: object) -> None:
    with pytest.raises(BadRequest):
        Grants.parse([bad])  # type: ignore[list-item]


def test_allows_concrete_values() -> None:
    g = Grants.parse(["egress:*.github.com", "model:gpt-4o*"])
    assert g.allows("egress", "api.github.com")
    assert not g.allows("egress", "github.com.evil.io")
    assert g.allows("model", "gpt-4o-mini") and not g.allows("model", "o1")


def test_spiffe_ids_validate() -> None:
    sid = SpiffeId.parse("spiffe://example.org/agent/planner")
    assert (sid.trust_domain, sid.kind, sid.name) == ("example.org", "agent", "planner")
    assert str(sid) == "spiffe://example.org/agent/planner"
    for bad in [
        "https://example.org/agent/x",
        "spiffe://example.org/robot/x",
        "spiffe://Example.org/agent/x",
        "spiffe://example.org/agent/a/b",
        "spiffe://example.org/agent/..",
        "spiffe://example.org/agent/",
    ]:
        with pytest.raises(BadRequest):
            SpiffeId.parse(bad)


def test_egress_grant_without_port_covers_every_port_of_the_host() -> None:
    g = Grants.parse(["egress:api.github.com", "egress:pypi.org:443"])
    assert g.allows("egress", "api.github.com:443") and g.allows("egress", "api.github.com:22")
    assert g.allows("egress", "pypi.org:443") and not g.allows("egress", "pypi.org:80")
    assert not g.allows("egress", "api.github.com.evil.io:443")
    assert not g.allows("egress", "evil.io:api.github.com")  # the port must be a number
    assert not Grants.parse(["tool:db"]).allows("tool", "db:1")  # only egress has ports


def test_egress_grant_with_a_port_lies_within_the_host_grant() -> None:
    (host,) = Grants.parse(["egress:*.github.com"]).items
    (one,) = Grants.parse(["egress:api.github.com:443"]).items
    (anyport,) = Grants.parse(["egress:api.github.com:*"]).items
    (odd,) = Grants.parse(["egress:api.github.com:x"]).items
    (evil,) = Grants.parse(["egress:evil.io:443"]).items
    assert one.within(host) and anyport.within(host)
    assert not odd.within(host) and not evil.within(host) and not host.within(one)


def test_http_grant_without_a_path_covers_the_whole_service() -> None:
    g = Grants.parse(["http:crm", "http:billing/invoices/*"])
    assert g.allows("http", "crm/customers/42") and g.allows("http", "crm/")
    assert not g.allows("http", "crmx/customers") and not g.allows("http", "billing/refunds/1")
    assert g.allows("http", "billing/invoices/7")
    (svc,) = Grants.parse(["http:crm"]).items
    (path,) = Grants.parse(["http:crm/customers/*"]).items
    assert path.within(svc) and not svc.within(path)
