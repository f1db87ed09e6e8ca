"""The Cedar policy engine: real cedarpy, real policy files in a temporary data dir."""

from __future__ import annotations

import calendar
import dataclasses
import re
from pathlib import Path

import pytest

from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy import engine as engine_mod
from tether.policy.action import Action, Cost
from tether.policy.engine import (
    BUILTIN_SOURCE,
    PolicyEngine,
    PolicyError,
    PolicySource,
    combine_quorums,
    load_policies,
    read_policy_file,
    split_policies,
)
from tether.policy.schema import CONTEXT_FIELDS, REQUIRED_CONTEXT

TD = "example.org"
ALICE = f"spiffe://{TD}/user/alice"
BOT = f"spiffe://{TD}/agent/bot"
FIXTURES = Path(__file__).parent / "fixtures" / "bad_policies"


def claims(
    subject: str = BOT,
    grants: tuple[str, ...] = ("model:gpt-4o*", "tool:search.*"),
    chain: tuple[str, ...] = (ALICE,),
    task: str | None = "report-42",
    labels: tuple[str, ...] = (),
) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(subject),
        audience=("tether",),
        issued_at=1_800_000_000,
        not_before=1_800_000_000,
        expires_at=1_800_003_600,
        token_id="t" * 32,
        grantors=tuple(SpiffeId.parse(c) for c in chain),
        chain_jti=tuple(f"j{i}" for i in range(len(chain))),
        grants=parse_grants(grants),
        task=task,
        labels=labels,
    )


def act(
    type_: str = "llm.invoke",
    resource: str = "gpt-4o",
    *,
    who: TokenClaims | None = None,
    context: dict[str, object] | None = None,
    effects: dict[str, int] | None = None,
    cost: Cost | None = None,
) -> Action:
    return Action(
        type_,
        who or claims(),
        resource,
        context=context or {},
        effects=effects or {},
        cost=cost or Cost(),
    )


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "policies"
    d.mkdir(parents=True)
    return d


def write(pdir: Path, name: str, text: str) -> Path:
    path = pdir / name
    path.write_text(text)
    return path


def engine(pdir: Path, **kw: object) -> PolicyEngine:
    kw.setdefault("reload_interval", 3600.0)
    return PolicyEngine(pdir, **kw)  # type: ignore[arg-type]


NONE: frozenset[str] = frozenset()

# -- default posture -----------------------------------------------------------------------


def test_defaults_permit_what_the_grants_allow(pdir: Path) -> None:
    e = engine(pdir)
    v = e.authorize(act(resource="gpt-4o-mini"), NONE)
    assert v.outcome == "allow"
    assert v.reasons == ("permitted by token grant model:gpt-4o*",)
    assert v.policies == ("tether.grants",)
    assert v.policy_version == e.version and len(e.version) == 64


def test_default_deny_names_the_action_and_the_missing_grant(pdir: Path) -> None:
    v = engine(pdir).authorize(act("tool.call", "shell.exec"), NONE)
    assert v.outcome == "deny"
    assert v.reasons[0] == 'no policy permits tool.call on Tool::"shell.exec" (default deny)'
    assert "no tool grant" in v.reasons[1]
    assert v.policies == ()


def test_delegation_and_beam_creation_are_permitted_by_default(pdir: Path) -> None:
    e = engine(pdir)
    v = e.authorize(act("identity.delegate", f"spiffe://{TD}/agent/helper"), NONE)
    assert (v.outcome, v.policies) == ("allow", ("tether.delegate",))
    v = e.authorize(act("beam.create", f"spiffe://{TD}/beam/b1"), NONE)
    assert (v.outcome, v.policies) == ("allow", ("tether.beam.create",))


def test_delegation_to_something_that_is_not_an_identity_is_denied(pdir: Path) -> None:
    v = engine(pdir).authorize(act("identity.delegate", "not-a-spiffe-id"), NONE)
    assert v.outcome == "deny"
    assert "not a SPIFFE ID" in v.reasons[0] and "fail closed" in v.reasons[0]


def test_granted_override_and_jit_context(pdir: Path) -> None:
    e = engine(pdir)
    ungranted = act("tool.call", "db.migrate")
    assert e.authorize(ungranted, NONE).outcome == "deny"
    assert e.authorize(ungranted, NONE, granted=True).outcome == "allow"
    jit = act("tool.call", "db.migrate", context={"granted": True, "granted_by": "jit"})
    v = e.authorize(jit, NONE)
    assert v.outcome == "allow" and v.reasons == ("permitted by a just-in-time grant",)
    # the override wins over the context
    assert e.authorize(jit, NONE, granted=False).outcome == "deny"


def test_unknown_action_type_is_denied(pdir: Path) -> None:
    v = engine(pdir).authorize(act("db.drop", "x"), NONE)
    assert v.outcome == "deny" and "unknown action type" in v.reasons[0]


# -- the data dir's policies ------------------------------------------------------------------


def test_forbid_wins_and_names_file_line_and_reason(pdir: Path) -> None:
    write(
        pdir,
        "10-prod.cedar",
        "// production guard\n\n"
        '@reason("agents more than one hop from a human may not call tools")\n'
        'forbid (principal is Tether::Agent, action == Tether::Action::"tool.call", resource)\n'
        "when { principal.depth > 1 };\n",
    )
    e = engine(pdir)
    deep = claims(chain=(ALICE, f"spiffe://{TD}/agent/planner"))
    v = e.authorize(act("tool.call", "search.web", who=deep), NONE)
    assert v.outcome == "deny"
    assert v.policies == ("10-prod.cedar:3",)
    assert v.reasons == (
        "forbidden by 10-prod.cedar:3: agents more than one hop from a human may not call tools",
    )
    assert e.authorize(act("tool.call", "search.web"), NONE).outcome == "allow"


def test_policy_ids_are_file_line_across_files_or_their_id_annotation(pdir: Path) -> None:
    write(
        pdir,
        "20-b.cedar",
        '\n\n\n\nforbid (principal, action, resource) when { principal.task == "x" };\n',
    )
    write(
        pdir,
        "10-a.cedar",
        '@id("no-x-task")\nforbid (principal, action, resource) when { principal.task == "x" };\n',
    )
    e = engine(pdir)
    assert [p.id for p in e.policies if not p.location.startswith(BUILTIN_SOURCE)] == [
        "no-x-task",
        "20-b.cedar:5",
    ]
    v = e.authorize(act(who=claims(task="x")), NONE)
    assert v.outcome == "deny" and v.policies == ("no-x-task", "20-b.cedar:5")


def test_groups_labels_root_and_task_reach_the_policies(pdir: Path) -> None:
    write(
        pdir,
        "10-groups.cedar",
        'forbid (principal in Tether::Group::"quarantine", action, resource);\n'
        'forbid (principal, action, resource) when { principal.labels.contains("frozen") };\n'
        'permit (principal, action == Tether::Action::"tool.call", resource)\n'
        f'when {{ principal.root == "{ALICE}" && principal.task == "ops" }};\n',
    )
    e = engine(pdir)
    assert e.authorize(act(), frozenset({"quarantine"})).outcome == "deny"
    # the same principal in other groups: the entity cache is keyed by the groups too
    assert e.authorize(act(), frozenset({"swarm"})).outcome == "allow"
    assert e.authorize(act(who=claims(labels=("frozen",))), NONE).outcome == "deny"
    v = e.authorize(act("tool.call", "anything", who=claims(task="ops")), NONE)
    assert v.outcome == "allow" and v.policies == ("10-groups.cedar:3",)


def test_resource_attributes(pdir: Path) -> None:
    write(
        pdir,
        "10-res.cedar",
        'permit (principal, action == Tether::Action::"http.request", resource)\n'
        'when { resource.service == "billing" && context has method && context.method == "GET" };\n'
        'permit (principal, action == Tether::Action::"egress.connect", resource)\n'
        'when { resource.host like "*.github.com" };\n'
        'forbid (principal, action == Tether::Action::"llm.invoke", resource)\n'
        'when { resource.name like "*-preview" };\n',
    )
    e = engine(pdir)
    assert (
        e.authorize(
            act("http.request", "billing/invoices/1", context={"method": "GET"}), NONE
        ).outcome
        == "allow"
    )
    assert (
        e.authorize(
            act("http.request", "billing/invoices/1", context={"method": "POST"}), NONE
        ).outcome
        == "deny"
    )
    assert e.authorize(act("egress.connect", "api.github.com:443"), NONE).outcome == "allow"
    assert e.authorize(act("egress.connect", "github.com.evil.io:443"), NONE).outcome == "deny"
    assert e.authorize(act(resource="gpt-4o-preview"), NONE).outcome == "deny"


# -- context ------------------------------------------------------------------------------


def test_typed_context_fields_and_unknown_keys_dropped(pdir: Path) -> None:
    write(
        pdir,
        "10-ctx.cedar",
        '@reason("too many tokens")\n'
        'forbid (principal, action == Tether::Action::"llm.invoke", resource)\n'
        "when { context has max_tokens && context.max_tokens > 4000 };\n",
    )
    e = engine(pdir)
    ok = act(context={"max_tokens": 100, "temperature": 0.2, "nested": {"a": [1]}})
    assert e.authorize(ok, NONE).outcome == "allow"  # unknown keys do not crash
    v = e.authorize(act(context={"max_tokens": 9000, "vendor_extra": "x"}), NONE)
    assert v.outcome == "deny" and v.reasons == ("forbidden by 10-ctx.cedar:1: too many tokens",)


def test_a_badly_typed_context_field_denies_naming_it(pdir: Path) -> None:
    v = engine(pdir).authorize(act(context={"max_tokens": "lots"}), NONE)
    assert v.outcome == "deny"
    assert "context.max_tokens must be a Long" in v.reasons[0]
    assert v.policies == ("tether:fail-closed",)


def test_effects_and_estimated_tokens_come_from_the_action(pdir: Path) -> None:
    write(
        pdir,
        "10-effects.cedar",
        "forbid (principal, action, resource)\n"
        'when { context has effects && context.effects.contains("db.drop") };\n'
        "forbid (principal, action, resource)\n"
        "when { context has estimated_tokens && context.estimated_tokens > 50000 };\n",
    )
    e = engine(pdir)
    assert e.authorize(act("tool.call", "search.x", effects={"db.drop": 1}), NONE).outcome == "deny"
    assert e.authorize(act(cost=Cost(tokens=60000)), NONE).outcome == "deny"
    assert e.authorize(act(cost=Cost(tokens=600)), NONE).outcome == "allow"


def test_hour_is_the_utc_hour_of_the_clock(pdir: Path) -> None:
    write(
        pdir,
        "10-hours.cedar",
        '@reason("no tool calls at night")\n'
        'forbid (principal, action == Tether::Action::"tool.call", resource)\n'
        "when { context.hour < 6 };\n",
    )
    night = calendar.timegm((2027, 1, 5, 3, 0, 0))
    day = calendar.timegm((2027, 1, 5, 13, 0, 0))
    assert (
        engine(pdir, clock=lambda: night).authorize(act("tool.call", "search.a"), NONE).outcome
        == "deny"
    )
    assert (
        engine(pdir, clock=lambda: day).authorize(act("tool.call", "search.a"), NONE).outcome
        == "allow"
    )


def test_every_schema_context_field_is_declared_with_the_engines_type(pdir: Path) -> None:
    literal = {"Bool": "true", "Long": "1", "String": '"x"', "Set<String>": '["x"]'}
    conds = []
    for name, typ in CONTEXT_FIELDS.items():
        guard = "" if name in REQUIRED_CONTEXT else f"context has {name} && "
        conds.append(f"({guard}context.{name} == {literal[typ]})")
    text = "forbid (principal, action, resource) when { " + " || ".join(conds) + " };\n"
    load_policies([PolicySource("all-fields.cedar", text)])  # validates against the schema


# -- escalation ---------------------------------------------------------------------------

SWARM = """\
@escalate("2 of group:sre")
@reason("schema changes by the swarm need two SREs")
permit (principal in Tether::Group::"swarm", action == Tether::Action::"tool.call", resource)
when { context.granted && context has effects && context.effects.contains("db.schema_change") };
"""


def test_escalating_permit_escalates_with_its_quorum(pdir: Path) -> None:
    write(pdir, "30-swarm.cedar", SWARM)
    e = engine(pdir)
    a = act("tool.call", "search.db", effects={"db.schema_change": 1})
    v = e.authorize(a, frozenset({"swarm"}))
    assert v.outcome == "escalate"
    assert v.quorum == "2 of group:sre"
    assert v.policies == ("30-swarm.cedar:1",)
    assert v.reasons == (
        "escalation required by 30-swarm.cedar:1 (2 of group:sre): "
        "schema changes by the swarm need two SREs",
    )
    # outside the group, or without the effect: the plain grant permit decides
    assert e.authorize(a, NONE).outcome == "allow"
    assert e.authorize(act("tool.call", "search.db"), frozenset({"swarm"})).outcome == "allow"


def test_forbid_beats_escalation(pdir: Path) -> None:
    write(pdir, "30-swarm.cedar", SWARM)
    write(
        pdir,
        "40-freeze.cedar",
        'forbid (principal, action == Tether::Action::"tool.call", resource)\n'
        'when { principal.labels.contains("frozen") };\n',
    )
    e = engine(pdir)
    a = act(
        "tool.call", "search.db", who=claims(labels=("frozen",)), effects={"db.schema_change": 1}
    )
    v = e.authorize(a, frozenset({"swarm"}))
    assert v.outcome == "deny" and v.policies == ("40-freeze.cedar:1",) and v.quorum is None


def test_several_escalations_require_every_quorum(pdir: Path) -> None:
    write(pdir, "30-swarm.cedar", SWARM)
    write(
        pdir,
        "31-human.cedar",
        '@escalate("1 of human")\n'
        'permit (principal, action == Tether::Action::"tool.call", resource)\n'
        'when { resource.name like "search.db*" };\n',
    )
    v = engine(pdir).authorize(
        act("tool.call", "search.db", effects={"db.schema_change": 1}), frozenset({"swarm"})
    )
    assert v.outcome == "escalate"
    assert v.quorum == "2 of group:sre and 1 of human"
    assert v.policies == ("30-swarm.cedar:1", "31-human.cedar:1")
    assert len(v.reasons) == 2


def test_combine_quorums() -> None:
    assert combine_quorums(["2 of group:sre"]) == "2 of group:sre"
    assert combine_quorums(["2 of group:sre", "1 of human and 2 of group:sre"]) == (
        "2 of group:sre and 1 of human"
    )
    assert (
        combine_quorums(["1 of user:bob, allow self", "1 of human"])
        == "1 of user:bob and 1 of human"
    )
    assert combine_quorums(["1 of user:bob, allow self", "1 of human, allow self"]) == (
        "1 of user:bob and 1 of human, allow self"
    )


# -- bad policies -------------------------------------------------------------------------


def _expectation(path: Path) -> tuple[int, str]:
    head = path.read_text().splitlines()[:2]
    line = int(re.fullmatch(r"// expect-line: (\d+)", head[0]).group(1))  # type: ignore[union-attr]
    text = re.fullmatch(r"// expect: (.+)", head[1]).group(1)  # type: ignore[union-attr]
    return line, text


BAD = sorted(FIXTURES.glob("*.cedar"))


def test_there_is_a_fixture_for_each_kind_of_bad_policy() -> None:
    names = {p.stem for p in BAD}
    assert {
        "syntax_error",
        "unknown_attribute",
        "unknown_entity_type",
        "escalate_on_forbid",
        "bad_quorum",
        "duplicate_escalate",
        "unknown_annotation",
        "duplicate_id",
    } <= names


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_policy_is_refused_naming_file_and_line(path: Path) -> None:
    line, text = _expectation(path)
    with pytest.raises(PolicyError) as info:
        load_policies([read_policy_file(path)])
    problems = info.value.problems
    assert problems[0].file == path.name and problems[0].line == line, problems
    assert any(text in p.message for p in problems), problems
    assert f"{path.name}:{line}: " in str(info.value)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_live_reload_keeps_the_valid_set(pdir: Path, path: Path) -> None:
    write(
        pdir,
        "10-ok.cedar",
        '@reason("bots may not use previews")\n'
        'forbid (principal, action, resource) when { principal.task == "preview" };\n',
    )
    e = engine(pdir, reload_interval=0.0)
    version = e.version
    ids = [p.id for p in e.policies]
    (pdir / path.name).write_text(path.read_text())
    v = e.authorize(act(who=claims(task="preview")), NONE)  # the live check runs, refuses
    assert v.outcome == "deny" and v.policies == ("10-ok.cedar:1",)
    assert e.version == version and [p.id for p in e.policies] == ids
    assert e.last_error is not None and path.name in str(e.last_error)
    with pytest.raises(PolicyError):
        e.reload()
    assert e.version == version
    (pdir / path.name).unlink()
    assert e.authorize(act(), NONE).outcome == "allow"
    assert e.last_error is None and e.version == version


def test_invalid_initial_set_refuses_to_start(pdir: Path) -> None:
    write(pdir, "10-bad.cedar", "permit (principal, action, resource) when { principal.nope };\n")
    with pytest.raises(PolicyError, match=r"10-bad\.cedar:1"):
        engine(pdir)


def test_errors_in_several_files_are_all_reported(pdir: Path) -> None:
    write(pdir, "10-a.cedar", "permit (principal, action, resource) when { principal.nope };\n")
    write(pdir, "20-b.cedar", '\n\n@escalte("1 of human")\npermit (principal, action, resource);\n')
    with pytest.raises(PolicyError) as info:
        engine(pdir)
    where = {(p.file, p.line) for p in info.value.problems}
    assert ("20-b.cedar", 3) in where  # annotation problems are found before validation
    write(pdir, "20-b.cedar", "permit (principal, action, resource);\n")
    with pytest.raises(PolicyError) as info:
        engine(pdir)
    assert {(p.file, p.line) for p in info.value.problems} == {("10-a.cedar", 1)}


def test_non_utf8_file_is_refused_with_its_line(pdir: Path) -> None:
    (pdir / "10-bin.cedar").write_bytes(b"// ok\n// \xff\n")
    with pytest.raises(PolicyError, match=r"10-bin\.cedar:2: not valid UTF-8"):
        engine(pdir)


# -- live reload and defaults ---------------------------------------------------------------


def test_live_reload_picks_up_a_new_file(pdir: Path) -> None:
    e = engine(pdir, reload_interval=0.0)
    before = e.version
    assert e.authorize(act(), NONE).outcome == "allow"
    write(
        pdir,
        "50-stop.cedar",
        'forbid (principal, action == Tether::Action::"llm.invoke", resource);\n',
    )
    v = e.authorize(act(), NONE)
    assert v.outcome == "deny" and v.policies == ("50-stop.cedar:1",)
    assert e.version != before and e.reloads == 1
    (pdir / "50-stop.cedar").unlink()
    assert e.authorize(act(), NONE).outcome == "allow"
    assert e.version == before


def test_changes_wait_for_the_interval_or_an_explicit_reload(pdir: Path) -> None:
    e = engine(pdir, reload_interval=3600.0)
    write(
        pdir,
        "50-stop.cedar",
        'forbid (principal, action == Tether::Action::"llm.invoke", resource);\n',
    )
    assert e.authorize(act(), NONE).outcome == "allow"  # not checked yet
    assert e.reload() is True
    assert e.authorize(act(), NONE).outcome == "deny"
    assert e.reload() is False  # nothing changed


def test_a_policies_defaults_file_replaces_the_builtin_defaults(pdir: Path) -> None:
    write(pdir, "defaults.cedar", "// no defaults: nothing is permitted unless a policy says so\n")
    e = engine(pdir)
    assert BUILTIN_SOURCE not in e.loaded.sources
    v = e.authorize(act(), NONE)
    assert v.outcome == "deny" and "default deny" in v.reasons[0]
    assert e.authorize(act("identity.delegate", f"spiffe://{TD}/agent/x"), NONE).outcome == "deny"


def test_builtin_defaults_can_be_switched_off(pdir: Path) -> None:
    e = engine(pdir, builtin_defaults=False)
    assert e.policies == () and e.authorize(act(), NONE).outcome == "deny"


def test_no_policy_directory_means_defaults_only(tmp_path: Path) -> None:
    e = PolicyEngine(tmp_path / "missing")
    assert [p.id for p in e.policies] == ["tether.grants", "tether.delegate", "tether.beam.create"]


def test_version_is_a_digest_of_the_policy_texts(pdir: Path) -> None:
    a = PolicyEngine(
        sources=[
            PolicySource(
                "x.cedar", "forbid (principal, action, resource) when { principal.depth > 9 };"
            )
        ]
    )
    b = PolicyEngine(
        sources=[
            PolicySource(
                "x.cedar", "forbid (principal, action, resource) when { principal.depth > 9 };"
            )
        ]
    )
    c = PolicyEngine(
        sources=[
            PolicySource(
                "x.cedar", "forbid (principal, action, resource) when { principal.depth > 8 };"
            )
        ]
    )
    assert a.version == b.version != c.version


# -- fail closed --------------------------------------------------------------------------


def test_an_exception_inside_cedar_denies_naming_it(
    pdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine(pdir)

    def boom(*args: object) -> str:
        raise RuntimeError("cedar exploded")

    monkeypatch.setattr(engine_mod._cedar, "is_authorized", boom)
    v = e.authorize(act(), NONE)
    assert v.outcome == "deny"
    assert v.reasons == (
        "policy evaluation failed (RuntimeError: cedar exploded); denied (fail closed)",
    )


def test_a_forbid_that_fails_to_evaluate_denies(pdir: Path) -> None:
    # validates (Long arithmetic), but overflows at run time for depth >= 2
    write(
        pdir,
        "10-overflow.cedar",
        "forbid (principal, action, resource)\n"
        "when { principal.depth * 9223372036854775807 < 0 };\n",
    )
    e = engine(pdir)
    assert e.authorize(act(who=claims(chain=())), NONE).outcome == "allow"  # depth 0: no error
    deep = claims(chain=(ALICE, f"spiffe://{TD}/agent/planner"))
    v = e.authorize(act(who=deep), NONE)
    assert v.outcome == "deny" and v.policies == ("10-overflow.cedar:1",)
    assert "could not be evaluated" in v.reasons[0]
    assert "10-overflow.cedar:1" in v.reasons[1] and "policy0" not in v.reasons[1]


# -- explain ------------------------------------------------------------------------------


def test_explain_lists_every_satisfied_policy(pdir: Path) -> None:
    write(pdir, "30-swarm.cedar", SWARM)
    write(
        pdir,
        "40-ro.cedar",
        '@reason("read only today")\n'
        'forbid (principal in Tether::Group::"swarm", action == Tether::Action::"tool.call",'
        " resource);\n",
    )
    e = engine(pdir)
    doc = e.explain(
        act("tool.call", "search.db", effects={"db.schema_change": 1}), frozenset({"swarm"})
    )
    assert doc["verdict"]["outcome"] == "deny"
    got = {s["id"]: s for s in doc["satisfied"]}
    assert set(got) == {"tether.grants", "30-swarm.cedar:1", "40-ro.cedar:1"}
    assert got["40-ro.cedar:1"]["determining"] and got["40-ro.cedar:1"]["effect"] == "forbid"
    assert got["40-ro.cedar:1"]["reason"] == "read only today"
    assert got["30-swarm.cedar:1"]["escalate"] == "2 of group:sre"
    assert not got["30-swarm.cedar:1"]["determining"]
    assert got["tether.grants"]["location"] == f"{BUILTIN_SOURCE}:7"
    assert doc["request"]["context"]["effects"] == ["db.schema_change"]
    principal = doc["request"]["principal"]
    (ent,) = [e for e in doc["request"]["entities"] if e["uid"] == principal]
    assert ent["parents"] == [{"type": "Tether::Group", "id": "swarm"}]


# -- the scanner --------------------------------------------------------------------------


def test_split_policies_knows_strings_and_comments() -> None:
    text = (
        "// a comment; with a semicolon\n"
        '@reason("a; b \\" c")\n'
        'permit (principal, action, resource) when { principal.task == ";" };\n'
        "\n"
        "forbid (principal, action, resource); // trailing; comment\n"
    )
    parts = split_policies(text)
    assert [line for line, _ in parts] == [2, 5]
    assert parts[0][1].endswith('== ";" };')


def test_the_documented_examples_are_valid() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "policy.md").read_text()
    block = re.search(r"## Examples\n\n```cedar\n(.*?)```", doc, re.S)
    assert block is not None
    loaded = load_policies([PolicySource("examples.cedar", block.group(1))])
    assert len(loaded) == 6


# -- the verdict cache -----------------------------------------------------------------------


def test_a_repeated_decision_is_reused_until_the_policies_change(pdir: Path) -> None:
    e = engine(pdir, reload_interval=0.0)
    calls = 0
    real = engine_mod._cedar.is_authorized

    def counting(request: dict[str, object], *a: object) -> object:
        nonlocal calls
        # decisions, not the calls that settle the policies reading no context (context {})
        calls += request["context"] != "{}"
        return real(request, *a)

    engine_mod._cedar.is_authorized = counting  # type: ignore[assignment]
    try:
        first = e.authorize(act(), NONE)
        assert e.authorize(act(), NONE) == first and first.outcome == "allow"
        assert calls == 1  # the same principal, resource and context: Cedar ran once
        assert e.authorize(act(context={"max_tokens": 5}), NONE).outcome == "allow"
        assert calls == 1  # no policy reads max_tokens: the same decision
        forbid = 'forbid (principal, action, resource == Tether::Model::"gpt-4o");\n'
        write(pdir, "10-no.cedar", forbid)
        assert e.authorize(act(), NONE).outcome == "deny"  # a reload is never served stale
        assert calls == 2
        cap = (
            'forbid (principal, action, resource == Tether::Model::"gpt-4o-mini") '
            "when { context has max_tokens && context.max_tokens > 100 };\n"
        )
        write(pdir, "20-cap.cedar", cap)
        small = e.authorize(act(resource="gpt-4o-mini", context={"max_tokens": 5}), NONE)
        assert small.outcome == "allow" and calls == 3
        big = e.authorize(act(resource="gpt-4o-mini", context={"max_tokens": 500}), NONE)
        assert big.outcome == "deny" and calls == 4  # a context a policy reads: decided again
        again = e.authorize(
            act(resource="gpt-4o-mini", context={"max_tokens": 5, "stream": True}), NONE
        )
        assert again == small and calls == 4  # differs only in what no policy reads
    finally:
        engine_mod._cedar.is_authorized = real  # type: ignore[assignment]


def test_cached_reasons_name_each_tokens_own_grant(pdir: Path) -> None:
    e = engine(pdir)
    wide = claims(grants=("model:gpt-*",))
    narrow = dataclasses.replace(claims(grants=("model:gpt-4o",)), token_id="n" * 32)
    assert e.authorize(act(who=wide), NONE).reasons == ("permitted by token grant model:gpt-*",)
    assert e.authorize(act(who=narrow), NONE).reasons == ("permitted by token grant model:gpt-4o",)
