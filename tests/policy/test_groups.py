"""Group membership: labels, grants, delegation roots, SPIFFE ID patterns along the chain,
nested groups, holder-only groups, memoisation and reload."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.boundaries import BoundariesFile, parse_boundaries
from tether.policy.groups import Groups

TD = "example.org"
_ids = itertools.count()


def claims(
    sub: str,
    *,
    chain: tuple[str, ...] = (),
    grants: tuple[str, ...] = (),
    labels: tuple[str, ...] = (),
    jti: str | None = None,
) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(f"spiffe://{TD}/{sub}"),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id=jti if jti is not None else f"t{next(_ids)}",
        grantors=tuple(SpiffeId.parse(f"spiffe://{TD}/{g}") for g in chain),
        chain_jti=tuple(f"c{i}" for i in range(len(chain))),
        grants=parse_grants(grants),
        labels=labels,
    )


CONFIG = f"""
[groups.indexers]
labels = ["indexer"]

[groups.db-writers]
grants = ["tool:db.*"]

[groups.alice-team]
roots = ["spiffe://{TD}/user/alice"]

[groups.named]
members = ["spiffe://{TD}/agent/indexer-*"]

[groups.swarm]
include = ["indexers", "named"]

[groups.everyone]
include = ["swarm", "db-writers"]

[groups.sre]
members = ["spiffe://{TD}/user/bob"]
delegated = false
"""


def idx(text: str = CONFIG) -> Groups:
    return Groups(parse_boundaries(text))


def test_by_label_and_nested_includes() -> None:
    g = idx().groups_of(claims("agent/x", labels=("indexer",)))
    assert g == {"indexers", "swarm", "everyone"}


def test_by_grant_pattern_matches_grant_text() -> None:
    g = idx()
    assert g.groups_of(claims("agent/x", grants=("tool:db.add_index",))) == {
        "db-writers",
        "everyone",
    }
    # a narrower pattern does not match a broader grant's text
    assert g.groups_of(claims("agent/x", grants=("tool:*",))) == frozenset()
    assert g.groups_of(claims("agent/x", grants=("model:gpt-4o",))) == frozenset()


def test_by_root_at_any_depth() -> None:
    g = idx()
    assert g.groups_of(claims("user/alice")) == {"alice-team"}
    child = claims("agent/helper", chain=("user/alice", "agent/planner"))
    assert "alice-team" in g.groups_of(child)
    assert g.groups_of(claims("agent/helper", chain=("user/carol",))) == frozenset()


def test_members_match_holder_or_anyone_in_the_chain() -> None:
    g = idx()
    assert "named" in g.groups_of(claims("agent/indexer-7"))
    # a child delegated by indexer-7 acts for it: delegating does not escape the group
    child = claims("agent/sub", chain=("user/alice", "agent/indexer-7"))
    assert {"named", "swarm", "everyone", "alice-team"} <= g.groups_of(child)
    assert "named" not in g.groups_of(claims("agent/reindexer"))


def test_holder_only_group_excludes_delegated_tokens() -> None:
    g = idx()
    assert g.groups_of(claims("user/bob")) == {"sre"}
    assert "sre" not in g.groups_of(claims("agent/bots-helper", chain=("user/bob",)))


def test_memoised_per_token_id_and_bounded() -> None:
    g = Groups(parse_boundaries(CONFIG), cache_size=4)
    c = claims("agent/x", labels=("indexer",), jti="same")
    first = g.groups_of(c)
    assert g.groups_of(c) is first
    for _ in range(20):
        g.groups_of(claims("agent/y", labels=("indexer",)))
    assert len(g._compiled.cache) <= 4


def test_reload_changes_membership(tmp_path: Path) -> None:
    path = tmp_path / "boundaries.toml"
    path.write_text(CONFIG)
    live = BoundariesFile(path, check_interval=0)
    g = Groups(live)
    c = claims("agent/x", labels=("indexer",), jti="fixed")
    assert "swarm" in g.groups_of(c)
    path.write_text(CONFIG.replace('include = ["indexers", "named"]', 'include = ["named"]'))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "swarm" not in g.groups_of(c)  # cache emptied by the reload


def test_no_groups() -> None:
    assert idx("").groups_of(claims("agent/x", labels=("indexer",))) == frozenset()
