"""boundaries.toml: parsing, validation with named bad fixtures, and live reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tether.policy.boundaries import (
    ActionMatcher,
    Boundaries,
    BoundariesError,
    BoundariesFile,
    load_boundaries,
    parse_boundaries,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bad_boundaries"

GOOD = """
[settings]
reservation_ttl = "5m"

[groups.sre]
members = ["spiffe://example.org/user/bob", "spiffe://example.org/user/carol"]
delegated = false

[groups.dbas]
grants = ["tool:db.*"]

[groups.swarm]
labels = ["indexer"]
members = ["spiffe://example.org/agent/indexer-*"]
include = ["dbas"]

[effects]
"db.schema_change" = ["tool.call:db.add_index", "tool.call:db.alter_*"]
"mail.send" = []

[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 3
window = "1h"
on_exceed = "escalate"
quorum = "2 of group:sre"

[limits.swarm-tokens]
group = "swarm"
kind = "budget"
unit = "usd"
amount = "2.50"
window = "1d"

[limits.swarm-rps]
group = "swarm"
kind = "rate"
amount = 100
window = 60
match = ["llm.invoke:gpt-4o*", "tool.call"]

[limits.inflight]
group = "swarm"
kind = "concurrency"
amount = 8
"""


def test_good_file_parses() -> None:
    b = parse_boundaries(GOOD)
    assert set(b.groups) == {"sre", "dbas", "swarm"}
    assert b.groups["sre"].delegated is False
    assert b.reservation_ttl == 300
    lims = {lim.name: lim for lim in b.limits}
    sc = lims["schema-changes"]
    assert (sc.kind, sc.unit, sc.amount, sc.window) == ("budget", "db.schema_change", 3, 3600.0)
    assert sc.on_exceed == "escalate" and sc.quorum == "2 of group:sre"
    assert sc.describe() == "at most 3 db.schema_change per 1h across group swarm"
    assert lims["swarm-tokens"].amount == 2_500_000  # micro-dollars
    assert lims["swarm-rps"].unit == "requests"
    assert lims["swarm-rps"].match == (
        ActionMatcher("llm.invoke", "gpt-4o*"),
        ActionMatcher("tool.call", "*"),
    )
    assert lims["inflight"].window is None and lims["inflight"].unit == "slots"
    assert b.effects["mail.send"] == ()
    assert set(b.limits_by_group) == {"swarm"}


def test_missing_file_is_empty(tmp_path: Path) -> None:
    b = load_boundaries(tmp_path / "boundaries.toml")
    assert not b.groups and not b.limits


BAD: dict[str, tuple[str, ...]] = {
    "negative_amount": ("negative_amount.toml:4 [limits.tokens]", "non-negative integer", "-5"),
    "nonnumeric_amount": ("[limits.rps]", "non-negative integer", "'lots'"),
    "negative_usd": ("[limits.spend]", "non-negative number"),
    "unknown_kind": ("[limits.weird]", "unknown kind 'quota'"),
    "unknown_group": ("[limits.schema]", "unknown group 'swarn'"),
    "zero_window": ("zero_window.toml:4 [limits.rps]", "window must be > 0"),
    "negative_window": ("[limits.rps]", "window must be > 0"),
    "group_cycle": ("group_cycle.toml:1 [groups.a]", "group cycle: a -> b -> c -> a"),
    "self_include": ("[groups.loop]", "group cycle: loop -> loop"),
    "escalate_without_quorum": ("[limits.schema]", "needs a quorum"),
    "bad_quorum": ("[limits.schema]", "invalid quorum 'two of the sre folks'"),
    "quorum_unknown_group": ("[limits.schema]", "unknown group 'sre'"),
    "unknown_unit": ("[limits.schema]", "unknown budget unit 'db.schema_chnage'"),
    "unknown_on_exceed": ("[limits.schema]", "on_exceed must be 'deny' or 'escalate'"),
    "not_toml": ("not_toml.toml", "not valid TOML"),
    "bad_matcher": ("bad_matcher.toml:5 [effects] db.schema_change", "unknown action type"),
    "include_unknown": ("[groups.swarm]", "includes unknown group 'dbas'"),
    "unknown_key": ("[limits.rps]", "unknown key 'windw'"),
    "concurrency_window": ("[limits.inflight]", "no window"),
    "empty_group": ("[groups.nobody]", "no membership rule"),
}


def test_every_bad_fixture_is_covered() -> None:
    assert {p.stem for p in FIXTURES.glob("*.toml")} == set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_fixture_refused_naming_file_and_entry(name: str) -> None:
    with pytest.raises(BoundariesError) as e:
        load_boundaries(FIXTURES / f"{name}.toml")
    text = str(e.value)
    assert f"{name}.toml" in text
    for part in BAD[name]:
        assert part in text, f"{part!r} not in {text!r}"


def test_all_errors_are_reported_at_once() -> None:
    text = GOOD + '\n[limits.bad1]\ngroup = "nope"\nkind = "rate"\namount = 1\nwindow = "1s"\n'
    text += '\n[limits.bad2]\ngroup = "swarm"\nkind = "rate"\namount = -1\nwindow = "1s"\n'
    with pytest.raises(BoundariesError) as e:
        parse_boundaries(text)
    assert len(e.value.errors) == 2


def test_amount_zero_is_allowed_and_bool_is_not() -> None:
    base = '[groups.g]\nlabels = ["x"]\n[limits.l]\ngroup = "g"\nkind = "rate"\nwindow = "1s"\n'
    assert parse_boundaries(base + "amount = 0\n").limits[0].amount == 0
    with pytest.raises(BoundariesError, match="amount must be a number, got True"):
        parse_boundaries(base + "amount = true\n")
    with pytest.raises(BoundariesError, match="non-negative integer"):
        parse_boundaries(base + "amount = 2.5\n")


class FakeMono:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_live_reload_valid_replaces_invalid_keeps(tmp_path: Path) -> None:
    path = tmp_path / "boundaries.toml"
    _write(path, GOOD, 0)
    mono = FakeMono()
    live = BoundariesFile(path, monotonic=mono)
    first = live.current()
    assert "swarm" in first.groups

    # a change is not seen before the check interval has passed (no stat per decision)
    _write(path, GOOD.replace("amount = 8", "amount = 9"), 1)
    mono.t = 0.1
    assert live.current() is first
    mono.t = 0.3
    second = live.current()
    assert second is not first and live.generation == 1
    assert {lim.name: lim.amount for lim in second.limits}["inflight"] == 9

    # an invalid file never replaces the loaded valid one
    _write(path, GOOD.replace("amount = 8", "amount = -8"), 2)
    mono.t = 0.6
    assert live.current() is second
    assert live.last_error is not None and "[limits.inflight]" in live.last_error
    assert live.generation == 1

    # fixing it loads it and clears the error
    _write(path, GOOD.replace("amount = 8", "amount = 7"), 3)
    mono.t = 0.9
    third = live.current()
    assert {lim.name: lim.amount for lim in third.limits}["inflight"] == 7
    assert live.last_error is None and live.generation == 2

    # deleting the file removes every group and limit (an empty config is valid)
    path.unlink()
    mono.t = 1.2
    assert not live.current().groups


def test_first_load_of_an_invalid_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "boundaries.toml"
    path.write_text((FIXTURES / "group_cycle.toml").read_text())
    with pytest.raises(BoundariesError, match="group cycle"):
        BoundariesFile(path)


def test_reload_listener_called(tmp_path: Path) -> None:
    path = tmp_path / "boundaries.toml"
    _write(path, GOOD, 0)
    live = BoundariesFile(path, check_interval=0)
    seen: list[Boundaries] = []
    live.on_reload(seen.append)
    _write(path, GOOD.replace('"5m"', '"6m"'), 1)
    assert live.check() is True
    assert [b.reservation_ttl for b in seen] == [360]
    assert live.check() is False  # unchanged
