"""Per-request slicing of the policy set never changes a decision.

The engine hands Cedar only the action's policies that can apply to the request
(``PolicySlicer``): principal and resource scopes that can match, and a leading
``when { context has ATTR && ...`` guard whose attribute the context has. The differential test
generates many policy sets (``==``, ``in Group``, ``is``, ``is ... in``, unconstrained scopes;
conditions on principal attributes and context, guarded and not, several clauses, some that
raise at run time; forbids; permits with ``@escalate``) and many requests, and checks that the
verdict (outcome, reasons, policy ids, quorum) from the slice is the verdict Cedar gives on the
whole set, every time. The focused tests pin each scope kind and each guard shape.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cedarpy import _internal as _cedar

from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import ACTION_TYPES, Action, Cost
from tether.policy.engine import (
    LoadedPolicies,
    PolicyEngine,
    PolicyError,
    PolicySlicer,
    PolicySource,
    load_policies,
)
from tether.policy.interfaces import Verdict

TD = "example.org"
NS = "Tether"
KINDS = ("agent", "user", "beam", "service")
NAMES = ("a1", "a2", "a3")
GROUPS = ("g1", "g2", "g3")
LABELS = ("l1", "l2")
TASKS = ("", "t1", "t2")
SHARED = "shared"  # one resource id for several action types
MODELS = ("gpt-4o", "gpt-4o-mini", "claude", SHARED)
GRANT_SETS = (
    ("model:gpt-4o*", "tool:search.*", "http:*"),
    ("model:*", "tool:db.*", "egress:*"),
    (),
)
EFFECTS = ("db.schema_change", "mail.send")
TOOLS = ("db.add_index", "search.web", SHARED)
SERVICES = ("billing/invoices/1", "crm/x")
DOMAINS = ("api.github.com:443", "example.com:80")
TYPE_OF = {"agent": "Agent", "user": "User", "beam": "Beam", "service": "Service"}
RESOURCE_TYPE = {
    "llm.invoke": "Model",
    "tool.call": "Tool",
    "http.request": "HttpService",
    "egress.connect": "Domain",
    "beam.create": "Beam",
}
RESOURCES = {
    "llm.invoke": MODELS,
    "tool.call": TOOLS,
    "http.request": SERVICES,
    "egress.connect": DOMAINS,
}


def spiffe(kind: str, name: str) -> str:
    return f"spiffe://{TD}/{kind}/{name}"


def claims(
    kind: str = "agent",
    name: str = "a1",
    labels: tuple[str, ...] = (),
    task: str = "",
    depth: int = 1,
    grants: int = 0,
) -> TokenClaims:
    chain = tuple(SpiffeId.parse(spiffe("user", f"root{i}")) for i in range(depth))
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(spiffe(kind, name)),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id=f"{kind}-{name}-{depth}-{task}-{'.'.join(labels)}-{grants}".ljust(32, "x"),
        grantors=chain,
        chain_jti=tuple(f"j{i}" for i in range(depth)),
        grants=parse_grants(GRANT_SETS[grants]),
        task=task or None,
        labels=labels,
    )


# -- the reference: Cedar on the whole set -------------------------------------------------


def whole_set_verdict(engine: PolicyEngine, action: Action, groups: frozenset[str]) -> Verdict:
    """What the engine answers when Cedar sees every loaded policy (no slicing at all)."""
    loaded = engine.loaded
    request, entities = engine._request(action, groups, None)
    response = orjson.loads(_cedar.is_authorized(request, loaded.policy_set, entities, None, False))
    return engine._verdict(loaded, action, response)


def kept_ids(engine: PolicyEngine, action: Action, groups: frozenset[str]) -> frozenset[str]:
    """The ids of the policies the engine hands Cedar for this request."""
    _, _, key, ctx = engine._request_parts(action, groups, None)
    slicer = engine.loaded.slicers[action.type]
    return slicer.kept((key[0], key[1], key[6], key[7], key[8]), ctx)


def sliced_verdict(
    engine: PolicyEngine,
    action: Action,
    groups: frozenset[str],
    parsed: dict[tuple[int, frozenset[str]], Any],
) -> Verdict:
    """The verdict Cedar gives on exactly the slice the engine would hand it (``parsed``
    keeps the slices this test has parsed)."""
    loaded = engine.loaded
    slicer = loaded.slicers[action.type]
    kept = kept_ids(engine, action, groups)
    if kept == slicer.ids:
        policy_set = slicer.whole
    else:
        policy_set = parsed.get((id(slicer), kept))
        if policy_set is None:
            policy_set = parsed[(id(slicer), kept)] = slicer._build(kept)
    request, entities = engine._request(action, groups, None)
    response = orjson.loads(_cedar.is_authorized(request, policy_set, entities, None, False))
    return engine._verdict(loaded, action, response)


# -- generated policy sets ---------------------------------------------------------------


def _uid(kind: str, name: str) -> str:
    return f'{NS}::{TYPE_OF[kind]}::"{spiffe(kind, name)}"'


def _principal_scope(rng: random.Random) -> str:
    k = rng.choice(KINDS)
    n = rng.choice(NAMES)
    g = rng.choice(GROUPS)
    return rng.choice(
        [
            "principal",
            "principal",
            f"principal == {_uid(k, n)}",
            f'principal in {NS}::Group::"{g}"',
            f"principal in {_uid(k, n)}",
            f"principal is {NS}::{TYPE_OF[k]}",
            f'principal is {NS}::{TYPE_OF[k]} in {NS}::Group::"{g}"',
            f"principal is {NS}::{TYPE_OF[k]} in {_uid(k, n)}",
        ]
    )


def _action_and_resource(rng: random.Random) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.15:
        return "action", "resource"
    if roll < 0.25:
        two = rng.sample(list(RESOURCES), 2)
        acts = ", ".join(f'{NS}::Action::"{a}"' for a in two)
        return f"action in [{acts}]", "resource"
    atype = rng.choice(ACTION_TYPES)
    action = f'action == {NS}::Action::"{atype}"'
    if atype == "identity.delegate":
        k, n, g = rng.choice(KINDS), rng.choice(NAMES), rng.choice(GROUPS)
        resource = rng.choice(
            [
                "resource",
                f"resource == {_uid(k, n)}",
                f'resource in {NS}::Group::"{g}"',
                f"resource is {NS}::{TYPE_OF[k]}",
                f'resource is {NS}::{TYPE_OF[k]} in {NS}::Group::"{g}"',
                f"resource in {_uid(k, n)}",
            ]
        )
        return action, resource
    rtype = RESOURCE_TYPE[atype]
    rid = rng.choice(RESOURCES.get(atype, ("b1", "b2", SHARED)))
    resource = rng.choice(
        [
            "resource",
            f'resource == {NS}::{rtype}::"{rid}"',
            f'resource in {NS}::{rtype}::"{rid}"',
            f"resource is {NS}::{rtype}",
        ]
    )
    return action, resource


def _condition(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "",
            f'when {{ principal.labels.contains("{rng.choice(LABELS)}") }}',
            f'unless {{ principal.task == "{rng.choice(TASKS)}" }}',
            f"when {{ principal.depth > {rng.randint(0, 2)} }}",
            "when { context.granted }",
            f"when {{ context has max_tokens && context.max_tokens > {rng.choice((10, 500))} }}",
            f'when {{ context has effects && context.effects.contains("{rng.choice(EFFECTS)}") }}',
            "when { context has estimated_tokens && context.estimated_tokens > 50 "
            "&& principal.depth < 2 }",
            "when { context has stream }",
            "when { context has tools && context.tools.isEmpty() }",
            # not guards (the attribute test is not first, or not a `when`): never dropped
            "unless { context has max_tokens && context.max_tokens > 10 }",
            "when { (context has stream || principal.depth > 0) && context.granted }",
            "when { context.granted && context has max_tokens }",
            # a guard, then a clause that raises: the guard is evaluated first
            "when { context has effects } when { principal.depth + 9223372036854775807 > 0 }",
            # a clause that raises, then a guard: it raises whatever the context holds
            "when { principal.depth + 9223372036854775807 > 0 } when { context has effects }",
            "when { principal.depth + 9223372036854775807 > 0 && context has effects }",
            f"when {{ context.hour >= {rng.randint(0, 23)} }}",
            f'when {{ principal in {NS}::Group::"{rng.choice(GROUPS)}" }}',
            f'when {{ resource.name like "*{rng.choice(("4o", "db", "a1"))}*" }}',
            # these raise at run time (integer overflow): fail-closed territory for a forbid
            "when { context has max_tokens && context.max_tokens * 4611686018427387904 > 1 }",
            "when { principal.depth + 9223372036854775807 > 0 }",
        ]
    )


def _policy(rng: random.Random, i: int) -> str:
    effect = rng.choice(("permit", "permit", "forbid"))
    ann = [f'@id("p{i}")']
    if effect == "permit" and rng.random() < 0.3:
        ann.append(f'@escalate("{rng.randint(1, 2)} of group:{rng.choice(GROUPS)}")')
    if rng.random() < 0.3:
        ann.append(f'@reason("reason {i}")')
    action, resource = _action_and_resource(rng)
    head = f"{effect} ({_principal_scope(rng)}, {action}, {resource})"
    # one policy per line, so a validation error's line names the policy to drop
    return " ".join([*ann, head, _condition(rng)]).strip() + ";"


def generated_set(rng: random.Random, n: int) -> list[str]:
    """``n`` random policies, minus those the schema refuses (an impossible scope)."""
    lines = [_policy(rng, i) for i in range(n)]
    while True:
        try:
            load_policies([PolicySource("gen.cedar", "\n".join(lines))])
            return lines
        except PolicyError as e:
            bad = {p.line for p in e.problems}
            assert bad and None not in bad, e
            lines = [ln for i, ln in enumerate(lines, 1) if i not in bad]


@dataclass(frozen=True)
class Request:
    action: Action
    groups: frozenset[str]


def generated_requests(rng: random.Random, n: int) -> Iterator[Request]:
    for _ in range(n):
        kind, name = rng.choice(KINDS), rng.choice(NAMES)
        who = claims(
            kind,
            name,
            labels=tuple(sorted(rng.sample(LABELS, rng.randint(0, 2)))),
            task=rng.choice(TASKS),
            depth=rng.randint(0, 2),
            grants=rng.randrange(len(GRANT_SETS)),
        )
        groups = frozenset(rng.sample(GROUPS, rng.randint(0, 2)))
        atype = rng.choice(ACTION_TYPES)
        if atype == "identity.delegate":
            # sometimes the principal itself: then the resource's ancestors are its groups
            k, nm = (kind, name) if rng.random() < 0.4 else (rng.choice(KINDS), rng.choice(NAMES))
            resource = spiffe(k, nm)
        else:
            resource = rng.choice(RESOURCES.get(atype, ("b1", "b2", SHARED)))
        ctx: dict[str, Any] = {}
        if rng.random() < 0.6:
            ctx["max_tokens"] = rng.choice((5, 100, 1000))
        if rng.random() < 0.3:
            ctx["stream"] = rng.random() < 0.5
        if rng.random() < 0.3:
            ctx["tools"] = rng.sample(TOOLS, rng.randint(0, 2))
        roll = rng.random()
        if roll < 0.15:  # what the core passes when a just-in-time grant covers it
            ctx.update(granted=True, granted_by="jit")
        elif roll < 0.25:  # a caller that decided the grant itself
            ctx["granted"] = True
        effects = {e: 1 for e in EFFECTS if rng.random() < 0.25}  # the engine adds context.effects
        cost = Cost(tokens=rng.choice((0, 0, 40, 4000)))  # ... and context.estimated_tokens
        yield Request(Action(atype, who, resource, context=ctx, effects=effects, cost=cost), groups)


# -- the differential test ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_sliced_decisions_equal_whole_set_decisions(seed: int) -> None:
    rng = random.Random(seed)
    checked = sliced = settled = 0
    outcomes: set[str] = set()
    parsed: dict[tuple[int, frozenset[str]], Any] = {}
    for _ in range(10):
        lines = generated_set(rng, rng.randint(8, 40))
        now = rng.uniform(1.7e9, 1.8e9)  # a fixed clock: context.hour is the same every call
        engine = PolicyEngine(
            sources=[PolicySource("gen.cedar", "\n".join(lines))],
            builtin_defaults=rng.random() < 0.5,
            reload_interval=None,
            clock=lambda now=now: now,  # type: ignore[misc]
        )
        for req in generated_requests(rng, 40):
            whole = whole_set_verdict(engine, req.action, req.groups)
            # exactly the slice Cedar is handed ...
            got = sliced_verdict(engine, req.action, req.groups, parsed)
            assert got == whole, (lines, req)
            # ... and the engine end to end, twice (the second builds and uses the slice)
            assert engine.authorize(req.action, req.groups) == whole, (lines, req)
            again = dataclasses.replace(req.action, context={**req.action.context, "stream": True})
            assert engine.authorize(again, req.groups) == whole_set_verdict(
                engine, again, req.groups
            )
            # ... and a third time, on the settled plan (entity-only policies settled,
            # the context cut to what the plan's policies read), with a context no decision
            # has seen (it misses the verdict cache)
            third = dataclasses.replace(
                req.action, context={**req.action.context, "max_tokens": 7 + checked}
            )
            assert engine.authorize(third, req.groups) == whole_set_verdict(
                engine, third, req.groups
            ), (lines, third)
            slicer = engine.loaded.slicers[req.action.type]
            settled += slicer.settles
            checked += 1
            sliced += len(kept_ids(engine, req.action, req.groups)) < len(slicer)
            outcomes.add(whole.outcome)
            if whole.reasons and "fail closed" in whole.reasons[0]:
                outcomes.add("fail-closed")
    # the generator really exercises slicing, settling and every outcome
    assert sliced > checked // 3, (sliced, checked)
    assert settled > 0
    assert {"allow", "deny", "escalate"} <= outcomes


def test_the_generator_makes_runtime_errors_and_fail_closed_denials() -> None:
    """Guards the differential test: it covers forbids that raise, whose fail-closed handling
    must see the same errors on the slice as on the whole set."""
    rng = random.Random(1234)
    seen = 0
    for _ in range(20):
        engine = PolicyEngine(
            sources=[PolicySource("gen.cedar", "\n".join(generated_set(rng, 30)))],
            builtin_defaults=True,
            reload_interval=None,
        )
        for req in generated_requests(rng, 30):
            v = engine.authorize(req.action, req.groups)
            seen += any("could not be evaluated" in r for r in v.reasons)
    assert seen > 0


# -- focused: each scope kind ------------------------------------------------------------

BOT = _uid("agent", "a1")
OTHER = _uid("agent", "a2")
USER_A1 = _uid("user", "a1")
LLM = f'{NS}::Action::"llm.invoke"'
DELEGATE = f'{NS}::Action::"identity.delegate"'


@dataclass(frozen=True)
class ScopeCase:
    policy: str
    who: TokenClaims
    groups: frozenset[str]
    action: str
    resource: str
    kept: bool  # does the slice keep the policy (can its scope match)?


def _case(
    scope: str,
    kept: bool,
    *,
    who: TokenClaims | None = None,
    groups: tuple[str, ...] = (),
    action: str = "llm.invoke",
    resource: str = "gpt-4o",
) -> ScopeCase:
    policy = f'@id("under-test") forbid ({scope});'
    return ScopeCase(policy, who or claims(), frozenset(groups), action, resource, kept)


SCOPE_CASES: dict[str, ScopeCase] = {
    "unconstrained": _case(f"principal, action == {LLM}, resource", True),
    "principal == this agent": _case(f"principal == {BOT}, action, resource", True),
    "principal == another agent": _case(f"principal == {OTHER}, action, resource", False),
    "principal == same name, other type": _case(f"principal == {USER_A1}, action, resource", False),
    "principal in a group it is in": _case(
        f'principal in {NS}::Group::"g1", action, resource', True, groups=("g1",)
    ),
    "principal in a group it is not in": _case(
        f'principal in {NS}::Group::"g2", action, resource', False, groups=("g1",)
    ),
    "principal in itself (in is reflexive)": _case(f"principal in {BOT}, action, resource", True),
    "principal in another agent": _case(f"principal in {OTHER}, action, resource", False),
    "principal is its type": _case(f"principal is {NS}::Agent, action, resource", True),
    "principal is another type": _case(f"principal is {NS}::User, action, resource", False),
    "principal is its type in its group": _case(
        f'principal is {NS}::Agent in {NS}::Group::"g1", action, resource', True, groups=("g1",)
    ),
    "principal is its type in another group": _case(
        f'principal is {NS}::Agent in {NS}::Group::"g2", action, resource', False, groups=("g1",)
    ),
    "principal is another type in its group": _case(
        f'principal is {NS}::User in {NS}::Group::"g1", action, resource', False, groups=("g1",)
    ),
    "resource == this model": _case(f'principal, action, resource == {NS}::Model::"gpt-4o"', True),
    "resource == another model": _case(
        f'principal, action, resource == {NS}::Model::"claude"', False
    ),
    "resource in itself": _case(f'principal, action, resource in {NS}::Model::"gpt-4o"', True),
    "resource is its type": _case(f"principal, action == {LLM}, resource is {NS}::Model", True),
    "resource is another type": _case(f"principal, action, resource is {NS}::Tool", False),
    "delegate to self, resource in the principal's group": _case(
        f'principal, action == {DELEGATE}, resource in {NS}::Group::"g1"',
        True,
        groups=("g1",),
        action="identity.delegate",
        resource=spiffe("agent", "a1"),
    ),
    "delegate to another, resource in the principal's group": _case(
        f'principal, action == {DELEGATE}, resource in {NS}::Group::"g1"',
        False,
        groups=("g1",),
        action="identity.delegate",
        resource=spiffe("agent", "a2"),
    ),
    "delegate, resource == the delegatee": _case(
        f"principal, action == {DELEGATE}, resource == {OTHER}",
        True,
        action="identity.delegate",
        resource=spiffe("agent", "a2"),
    ),
    "delegate, resource is a Beam, delegatee an Agent": _case(
        f"principal, action == {DELEGATE}, resource is {NS}::Beam",
        False,
        action="identity.delegate",
        resource=spiffe("agent", "a2"),
    ),
}

PERMIT_ALL = "permit (principal, action, resource);"


@pytest.mark.parametrize("case", SCOPE_CASES.values(), ids=SCOPE_CASES.keys())
def test_each_scope_kind_is_kept_exactly_when_it_can_match(case: ScopeCase) -> None:
    # unconstrained permits around it, and two forbids for nobody (always sliced away, so
    # the slice is worth parsing whether or not the policy under test goes too)
    filler = [f'@id("filler-{i}") {PERMIT_ALL}' for i in range(20)] + [
        f'@id("nobody-{i}") forbid (principal == {_uid("agent", "nobody")}, action, resource);'
        for i in range(2)
    ]
    engine = PolicyEngine(
        sources=[PolicySource("t.cedar", "\n".join([case.policy, *filler]))],
        builtin_defaults=False,
        reload_interval=None,
    )
    action = Action(case.action, case.who, case.resource)
    under_test = next(p for p in engine.policies if p.id == "under-test")
    kept = kept_ids(engine, action, case.groups)
    assert (f"policy{under_test.index}" in kept) is case.kept
    # and the forbid decides exactly when it is kept: the slice never hides a match
    verdict = engine.authorize(action, case.groups)
    assert verdict == whole_set_verdict(engine, action, case.groups)
    assert (verdict.outcome == "deny") is case.kept
    assert ("under-test" in verdict.policies) is case.kept


# -- focused: each context-guard shape ---------------------------------------------------


@dataclass(frozen=True)
class GuardCase:
    condition: str
    context: dict[str, Any]
    kept: bool  # does the slice keep the policy?
    denies: bool  # does the forbid decide (satisfied, or raising: fail closed)?
    effects: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0


RAISES = "principal.depth + 9223372036854775807 > 0"

GUARD_CASES: dict[str, GuardCase] = {
    "guard, attribute present": GuardCase(
        "when { context has max_tokens && context.max_tokens > 10 }", {"max_tokens": 99}, True, True
    ),
    "guard, attribute absent": GuardCase(
        "when { context has max_tokens && context.max_tokens > 10 }", {}, False, False
    ),
    "guard alone, absent": GuardCase("when { context has stream }", {}, False, False),
    "guard alone, present (false is still present)": GuardCase(
        "when { context has stream }", {"stream": False}, True, True
    ),
    "guard on effects the engine adds": GuardCase(
        'when { context has effects && context.effects.contains("db.schema_change") }',
        {},
        True,
        True,
        effects={"db.schema_change": 1},
    ),
    "guard on effects, none declared": GuardCase(
        'when { context has effects && context.effects.contains("db.schema_change") }',
        {},
        False,
        False,
    ),
    "guard on the estimated tokens the engine adds": GuardCase(
        "when { context has estimated_tokens }", {}, True, True, tokens=10
    ),
    "unless guard, absent": GuardCase("unless { context has max_tokens }", {}, True, True),
    "guard second in the conjunction, absent": GuardCase(
        "when { context.granted && context has max_tokens }", {}, True, False
    ),
    "guard in a disjunction, absent": GuardCase(
        "when { context has max_tokens || context.granted }", {}, True, True
    ),
    "guard in the second clause, absent": GuardCase(
        "when { context.granted } when { context has max_tokens }", {}, True, False
    ),
    "guard then a raising clause, absent": GuardCase(
        f"when {{ context has stream }} when {{ {RAISES} }}", {}, False, False
    ),
    "guard then a raising clause, present": GuardCase(
        f"when {{ context has stream }} when {{ {RAISES} }}", {"stream": True}, True, True
    ),
    "raising clause then guard, absent": GuardCase(
        f"when {{ {RAISES} }} when {{ context has stream }}", {}, True, True
    ),
    "raising conjunct then guard, absent": GuardCase(
        f"when {{ {RAISES} && context has stream }}", {}, True, True
    ),
}


@pytest.mark.parametrize("case", GUARD_CASES.values(), ids=GUARD_CASES.keys())
def test_each_context_guard_shape_is_dropped_exactly_when_it_cannot_apply(
    case: GuardCase,
) -> None:
    filler = [f'@id("filler-{i}") {PERMIT_ALL}' for i in range(20)] + [
        f'@id("nobody-{i}") forbid (principal == {_uid("agent", "nobody")}, action, resource);'
        for i in range(2)
    ]
    policy = f'@id("under-test") forbid (principal, action == {LLM}, resource) {case.condition};'
    engine = _engine_of("\n".join([policy, *filler]))
    action = Action(
        "llm.invoke",
        claims(),
        "gpt-4o",
        context=case.context,
        effects=case.effects,
        cost=Cost(tokens=case.tokens),
    )
    under_test = next(p for p in engine.policies if p.id == "under-test")
    assert (f"policy{under_test.index}" in kept_ids(engine, action, frozenset())) is case.kept
    for _ in range(2):  # the second decision uses the parsed slice
        verdict = engine.authorize(dataclasses.replace(action, arguments={"n": _}), frozenset())
        assert verdict == whole_set_verdict(engine, action, frozenset())
        assert (verdict.outcome == "deny") is case.denies
        assert ("under-test" in verdict.policies) is case.denies


# -- focused: behaviour around the slices --------------------------------------------------


def _engine_of(text: str, **kwargs: Any) -> PolicyEngine:
    return PolicyEngine(
        sources=[PolicySource("t.cedar", text)],
        builtin_defaults=False,
        reload_interval=None,
        **kwargs,
    )


def _group_forbids(n: int) -> list[str]:
    return [
        f'@id("team-{i}") forbid (principal in {NS}::Group::"team-{i}", action == {LLM}, resource);'
        for i in range(n)
    ]


GRANTS = f'@id("grants") permit (principal, action == {LLM}, resource) when {{ context.granted }};'


def test_a_one_off_principal_never_pays_for_a_parse_and_a_recurring_slice_is_parsed_once() -> None:
    engine = _engine_of("\n".join([GRANTS, *_group_forbids(10)]))
    slicer = engine.loaded.slicers["llm.invoke"]
    first = Action("llm.invoke", claims("agent", "a1"), "gpt-4o")
    assert engine.authorize(first, frozenset()).outcome == "allow"
    assert slicer.built == 0  # decided on the whole action set
    for i, name in enumerate(("a2", "a3", "a1", "a2")):
        act = Action("llm.invoke", claims("agent", name), "gpt-4o", context={"max_tokens": i})
        assert engine.authorize(act, frozenset()).outcome == "allow"
    # every one of them keeps the same policies (only the grants permit): one parsed slice
    assert slicer.built == 1
    team = engine.authorize(first, frozenset({"team-3"}))
    assert team.outcome == "deny" and team.policies == ("team-3",)


def test_reasons_and_ids_name_only_policies_that_applied() -> None:
    text = "\n".join(
        [
            GRANTS,
            *_group_forbids(5),
            f'@id("esc") @escalate("1 of group:sre") @reason("big model") '
            f'permit (principal in {NS}::Group::"swarm", action == {LLM}, '
            f'resource == {NS}::Model::"gpt-4o");',
            f'@id("only-other") @escalate("2 of human") permit (principal == {OTHER}, '
            f"action == {LLM}, resource);",
        ]
    )
    engine = _engine_of(text)
    swarm = frozenset({"swarm"})
    for i in range(3):  # the first decision uses the whole set, the later ones the slice
        act = Action("llm.invoke", claims(), "gpt-4o", context={"max_tokens": i})
        v = engine.authorize(act, swarm)
        assert v == whole_set_verdict(engine, act, swarm)
        assert v.outcome == "escalate" and v.quorum == "1 of group:sre"
        assert v.policies == ("esc",)
        assert v.reasons == ("escalation required by esc (1 of group:sre): big model",)
    assert engine.loaded.slicers["llm.invoke"].built == 1


def test_a_forbid_that_raises_still_denies_when_its_scope_matches_and_is_skipped_otherwise() -> (
    None
):
    raising = (
        f'@id("boom") forbid (principal in {NS}::Group::"g1", action == {LLM}, resource) '
        "when { principal.depth + 9223372036854775807 > 0 };"
    )
    engine = _engine_of("\n".join([GRANTS, raising, *_group_forbids(4)]))
    for i in range(3):
        act = Action("llm.invoke", claims(), "gpt-4o", context={"max_tokens": i})
        inside = engine.authorize(act, frozenset({"g1"}))
        assert inside == whole_set_verdict(engine, act, frozenset({"g1"}))
        assert inside.outcome == "deny" and inside.policies == ("boom",)
        assert "could not be evaluated" in inside.reasons[0]
        outside = engine.authorize(act, frozenset({"g2"}))
        assert outside == whole_set_verdict(engine, act, frozenset({"g2"}))
        assert outside.outcome == "allow"


def test_a_reload_slices_the_new_set(tmp_path: Path) -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir()
    f = pdir / "10.cedar"
    f.write_text("\n".join([GRANTS, *_group_forbids(4)]))
    engine = PolicyEngine(pdir, builtin_defaults=False, reload_interval=None)
    for i in range(3):
        act = Action("llm.invoke", claims(), "gpt-4o", context={"max_tokens": i})
        assert engine.authorize(act, frozenset({"g1"})).outcome == "allow"
    old = engine.loaded.slicers["llm.invoke"]
    assert old.built == 1
    f.write_text(
        "\n".join(
            [
                GRANTS,
                *_group_forbids(4),
                f'@id("g1-frozen") forbid (principal in {NS}::Group::"g1", action, resource);',
            ]
        )
    )
    assert engine.reload()
    assert engine.loaded.slicers["llm.invoke"] is not old
    for i in range(3):
        act = Action("llm.invoke", claims(), "gpt-4o", context={"max_tokens": i})
        v = engine.authorize(act, frozenset({"g1"}))
        assert v.outcome == "deny" and v.policies == ("g1-frozen",)


def test_cached_slices_stay_within_the_policy_budget() -> None:
    # one forbid per agent: each agent's slice is different
    per_agent = [
        f'@id("only-{n}") forbid (principal == {_uid("agent", n)}, action == {LLM}, resource);'
        for n in (f"x{i}" for i in range(30))
    ]
    loaded = load_policies([PolicySource("t.cedar", "\n".join([GRANTS, *per_agent]))])
    whole = loaded.by_action["llm.invoke"]
    tree = whole.to_pst().static_policies
    order = {pid: int(pid.removeprefix("policy")) for pid in tree}
    slicer = PolicySlicer(whole, tree, order, policy_budget=10)
    for i in range(30):
        key = ("Tether::Agent", spiffe("agent", f"x{i}"), frozenset(), "Tether::Model", "m")
        for _ in range(2):
            ps = slicer._set_of(slicer.kept(key, {"granted": True, "hour": 1}))
        assert len(ps) == 2  # the grants permit and this agent's forbid
        assert slicer.held <= 10
    assert slicer.built == 30


def test_threads_deciding_at_once_get_the_whole_set_answers() -> None:
    rng = random.Random(99)
    engine = PolicyEngine(
        sources=[PolicySource("gen.cedar", "\n".join(generated_set(rng, 40)))],
        builtin_defaults=True,
        reload_interval=None,
    )
    requests = list(generated_requests(rng, 60))
    expected = [whole_set_verdict(engine, r.action, r.groups) for r in requests]
    failures: list[str] = []

    def worker(offset: int) -> None:
        for k in range(len(requests)):
            i = (k + offset) % len(requests)
            got = engine.authorize(requests[i].action, requests[i].groups)
            if got != expected[i]:
                failures.append(f"{requests[i]}: {got} != {expected[i]}")

    threads = [threading.Thread(target=worker, args=(o * 15,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_loaded_policies_carry_a_slicer_per_action() -> None:
    loaded: LoadedPolicies = load_policies([PolicySource("t.cedar", GRANTS)])
    assert set(loaded.slicers) == set(ACTION_TYPES)
    assert len(loaded.slicers["llm.invoke"]) == 1 and len(loaded.slicers["tool.call"]) == 0


def test_many_principals_share_one_kept_set_and_the_key_cache_stays_bounded() -> None:
    loaded = load_policies([PolicySource("t.cedar", "\n".join([GRANTS, *_group_forbids(5)]))])
    whole = loaded.by_action["llm.invoke"]
    tree = whole.to_pst().static_policies
    order = {pid: int(pid.removeprefix("policy")) for pid in tree}
    slicer = PolicySlicer(whole, tree, order, key_cache_size=50)
    ctx = {"granted": True, "hour": 1}
    kept = [
        slicer.kept(
            ("Tether::Agent", spiffe("agent", f"x{i}"), frozenset({"swarm"}), "Tether::Model", "m"),
            ctx,
        )
        for i in range(200)
    ]
    assert all(k is kept[0] for k in kept[:50])  # one object, not one per principal
    assert all(k == kept[0] for k in kept) and len(kept[0]) == 1  # the grants permit
    assert len(slicer._keys) <= 50


# -- settling policies on the entities alone, and cutting the context --------------------


def _plan_of(engine: PolicyEngine, action: Action, groups: frozenset[str]) -> Any:
    key, ctx = engine._key_and_context(action, groups, None)
    entities, uids = engine._entities(key)
    request = {**uids, "action": {"type": "Tether::Action", "id": action.type}}
    return engine.loaded.slicers[action.type].plan(key, ctx, request, entities)


def test_policies_on_the_entities_alone_are_settled_once_per_entity_set() -> None:
    frozen = [
        f'@id("frozen-{i}") forbid (principal, action == {LLM}, resource) '
        f'when {{ principal.labels.contains("f{i}") }};'
        for i in range(6)
    ]
    engine = _engine_of("\n".join([GRANTS, *frozen]))
    slicer = engine.loaded.slicers["llm.invoke"]
    calm = claims("agent", "a1", labels=("l1",))
    hot = claims("agent", "a2", labels=("f3",))
    none: frozenset[str] = frozenset()
    for i in range(4):
        ok = Action("llm.invoke", calm, "gpt-4o", context={"max_tokens": i})
        assert engine.authorize(ok, none) == whole_set_verdict(engine, ok, none)
        assert engine.authorize(ok, none).outcome == "allow"
        bad = Action("llm.invoke", hot, "gpt-4o", context={"max_tokens": i})
        v = engine.authorize(bad, none)
        assert v == whole_set_verdict(engine, bad, none)
        assert v.outcome == "deny" and v.policies == ("frozen-3",)
    # one Cedar call per entity set, from its second decision on (a one-off pays none)
    assert slicer.settles == 2
    once = Action("llm.invoke", claims("agent", "a3"), "gpt-4o")
    engine.authorize(once, none)
    assert slicer.settles == 2
    # Cedar is then handed the grants permit alone, or with the one forbid that holds
    assert len(_plan_of(engine, Action("llm.invoke", calm, "gpt-4o"), none).policy_set) == 1
    assert len(_plan_of(engine, Action("llm.invoke", hot, "gpt-4o"), none).policy_set) == 2


def test_cedar_is_handed_only_the_context_attributes_the_policies_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tether.policy.engine as engine_mod

    cap = (
        f'@id("cap") forbid (principal, action == {LLM}, resource) '
        "when { context has max_tokens && context.max_tokens > 100 };"
    )
    odd = [
        f'@id("odd-{i}") forbid (principal == {OTHER}, action == {LLM}, resource) '
        f'when {{ {{"c": context}}.c has max_tokens && {{"c": context}}.c.max_tokens > {i} }};'
        for i in (1000, 2000)
    ]
    engine = _engine_of("\n".join([GRANTS, cap, *odd]), clock=lambda: 7200.0)
    seen: list[dict[str, Any]] = []
    real = engine_mod._cedar.is_authorized

    def spy(request: dict[str, Any], *a: Any) -> Any:
        seen.append(orjson.loads(request["context"]))
        return real(request, *a)

    monkeypatch.setattr(engine_mod._cedar, "is_authorized", spy)
    ctx = {"max_tokens": 5, "stream": True, "tools": ["x"]}
    for i in range(3):  # whole set, then the slice, then the settled plan
        a1 = Action("llm.invoke", claims("agent", "a1"), "gpt-4o", context={**ctx, "n": i})
        assert engine.authorize(a1, frozenset()).outcome == "allow"
    assert seen[-1] == {"granted": True, "max_tokens": 5}
    assert _plan_of(engine, a1, frozenset()).reads == ("granted", "max_tokens")
    # a policy that uses the context as a whole value: every attribute goes to Cedar
    a2 = Action("llm.invoke", claims("agent", "a2"), "gpt-4o", context=ctx)
    assert engine.authorize(a2, frozenset()).outcome == "allow"
    assert seen[-1] == {"granted": True, "hour": 2, **ctx}
    assert _plan_of(engine, a2, frozenset()).reads is None
