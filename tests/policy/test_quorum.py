"""Quorum grammar and the approver-to-clause assignment."""

from __future__ import annotations

import pytest

from tether.errors import BadRequest
from tether.identity.spiffe import SpiffeId
from tether.policy.quorum import Approver, parse_quorum


def who(kind: str, name: str, *groups: str) -> Approver:
    return Approver(SpiffeId("example.org", kind, name), frozenset(groups))  # type: ignore[arg-type]


ALICE = who("user", "alice", "sre")
BOB = who("user", "bob", "sre")
CAROL = who("user", "carol")
REVIEWER = who("agent", "reviewer", "reviewers")


@pytest.mark.parametrize(
    "text",
    [
        "2 of group:sre",
        "1 of human and 1 of group:reviewers",
        "1 of user:alice",
        "1 of agent:reviewer and 1 of agent",
        "1 of group:sre, allow self",
    ],
)
def test_round_trip(text: str) -> None:
    assert str(parse_quorum(text)) == text
    assert str(parse_quorum("  " + text.replace(" and ", "   and  ") + " ")) == text


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty quorum"),
        ("2 group:sre", "'2 group:sre'"),
        ("0 of human", "'0 of human'"),
        ("51 of human", "1..50"),
        ("1 of robots", "unknown selector 'robots'"),
        ("1 of group:", "'1 of group:'"),
        ("1 of user:a/b", "'1 of user:a/b'"),
        ("1 of human and two of agent", "'two of agent'"),
        ("1 of human and 1 of human", "human twice"),
        ("1 of human and", "'1 of human and'"),
    ],
)
def test_unparsable_quorum_names_the_bad_clause(text: str, names: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_quorum(text)
    assert names in e.value.message


def test_not_a_string_and_too_long() -> None:
    with pytest.raises(BadRequest):
        parse_quorum(None)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="too long"):
        parse_quorum("1 of human and " * 100)
    with pytest.raises(BadRequest, match="too many"):
        parse_quorum(" and ".join(f"1 of user:u{i}" for i in range(9)))


def test_selectors() -> None:
    assert parse_quorum("1 of human").eligible(ALICE)
    assert not parse_quorum("1 of human").eligible(REVIEWER)
    assert parse_quorum("1 of agent").eligible(REVIEWER)
    assert parse_quorum("1 of agent:reviewer").eligible(REVIEWER)
    assert not parse_quorum("1 of user:reviewer").eligible(REVIEWER)
    assert parse_quorum("1 of user:alice").eligible(ALICE)
    assert not parse_quorum("1 of user:alice").eligible(BOB)
    assert parse_quorum("1 of group:sre").eligible(BOB)
    assert not parse_quorum("1 of group:sre").eligible(CAROL)


def test_distinct_approvers() -> None:
    q = parse_quorum("2 of group:sre")
    assert not q.satisfied([ALICE, ALICE])
    assert q.missing([ALICE, ALICE]) == "1 more of group:sre"
    assert q.satisfied([ALICE, BOB])


def test_one_approver_counts_toward_one_clause() -> None:
    q = parse_quorum("1 of human and 1 of group:sre")
    assert not q.satisfied([ALICE])  # alice is human and sre, but counts once
    assert q.satisfied([ALICE, CAROL])


def test_assignment_needs_augmenting_paths() -> None:
    # Greedy order would put alice (human, sre) on "human" and leave sre short; the matching
    # moves her to sre when carol (human only) arrives, whatever the order.
    q = parse_quorum("1 of human and 1 of group:sre")
    for order in ([ALICE, CAROL], [CAROL, ALICE]):
        assert q.satisfied(order)
    q2 = parse_quorum("2 of group:sre and 1 of agent and 1 of human")
    assert not q2.satisfied([ALICE, BOB, REVIEWER])
    assert q2.missing([ALICE, BOB, REVIEWER]) == "1 more of human"
    assert q2.satisfied([CAROL, REVIEWER, BOB, ALICE])
    assert q2.size == 4


def test_allow_self_flag() -> None:
    assert parse_quorum("1 of human, allow self").allow_self
    assert not parse_quorum("1 of human").allow_self
