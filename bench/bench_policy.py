"""Cedar policy decisions through :class:`PolicyEngine.authorize` and :meth:`DecisionCore.decide`,
next to the raw cedarpy floor measured in the same round.

Policy sets (every one ends with 100 policies, or 1):

* 1 policy (the grants permit);
* 100 spread: 97 policies spread evenly over the six action types, each action getting the
  same mix, plus the three defaults (a real set: a decision concerns one action);
* 100 same: 100 policies that all concern the decided action (the worst case).

The mix per action: group-scoped forbids (``principal in Group``), forbids on a principal label
(entity-only conditions), forbids on the context, escalating permits on the context.

Rows per set, each p50 and p99 over single calls:

* verdict-cache hit: the same action again (what a retried call costs; not a real decision);
* verdict miss, cached entities: four principals recurring, the context different on every
  call in an attribute policies read (``estimated_tokens``), so Cedar evaluates every time:
  the realistic decision, and the one the issue's target (p50 <= 50 us with 100 policies
  loaded) is judged on, on the spread set (the same target shown on the worst case says how
  far that is);
* context new only in attributes no policy reads (``max_tokens``): the engine hands Cedar only
  the attributes the policies read, so such a decision reuses the verdict (exact);
* cold entities: a new principal (and token) every call, so the entity set is built and
  parsed too.

Every action is an ``llm.invoke`` as the LLM gateway builds it: context ``max_tokens``,
``stream``, ``tools``, ``estimated_tokens`` (no declared effects), the estimate as its cost.

Plus the whole decision (authorize + boundaries) through ``DecisionCore.decide`` with the
verdict cache missing, on a real data dir (Cedar engine, groups and limits from
``boundaries.toml``, the SQLite limiter, the approval desk): once when no group limit counts the
action, once when a rate limit does (a reservation in SQLite, which has its own target in
bench_limits).

Baseline: ``cedarpy.is_authorized`` with pre-parsed PolicySet and Entities handles on the whole
set (the figure DESIGN.md quotes, ~40 us), measured in the same round. One more row is Cedar's
own floor, no Tether code: cedarpy's internal call on a 1-policy set with pre-parsed handles
(what any decision costs at least; it also shows how loaded the machine was). The machine is shared,
so every figure is the median over ``ROUNDS`` rounds, the rows of a round interleaved with its
own baseline; the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cedarpy
from cedarpy import _internal as _cedar

from bench._table import Result
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import ACTION_TYPES, Action, Cost
from tether.policy.core import DecisionCore
from tether.policy.engine import PolicyEngine

TD = "example.org"
ROUNDS = 5
N = 4_000  # timed calls per row per round
WARM = 500
RECURRING = 4  # principals in the "cached entities" rows
GROUPS = frozenset({"swarm"})
GRANT_PERMIT = (
    '@id("grants")\npermit (principal, action == Tether::Action::"llm.invoke", resource)\n'
    "when { context.granted };\n"
)
TARGET_US = 50.0
TARGET = f"<= {TARGET_US:.0f} us"
WORST = f"{TARGET} (worst case)"
BOUNDARIES = """
[groups.swarm]
labels = ["swarm"]

[effects]
"db.schema_change" = ["tool.call:db.add_index"]

[limits.schema-changes]
group = "swarm"
kind = "budget"
unit = "db.schema_change"
amount = 3
window = "1h"

[limits.mini-rate]
group = "swarm"
kind = "rate"
amount = 1000000000
window = "1h"
match = ["llm.invoke:gpt-4o-mini"]
"""


def _claims(name: str, token: int = 0) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(f"spiffe://{TD}/agent/{name}"),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id=f"{token:032x}",
        grantors=(SpiffeId.parse(f"spiffe://{TD}/user/alice"),),
        chain_jti=("a" * 32,),
        grants=parse_grants(("model:gpt-4o*", "tool:search.*")),
        task="bench",
        labels=("swarm",),
    )


def _policy(i: int, action: str, kind: int) -> str:
    a = f'Tether::Action::"{action}"'
    if kind == 0:
        return (
            f'@reason("group {i} is read-only")\n'
            f'forbid (principal in Tether::Group::"team-{i}", action == {a}, resource);\n'
        )
    if kind == 1:
        return (
            f"forbid (principal, action == {a}, resource)\n"
            f'when {{ principal.labels.contains("frozen-{i}") }};\n'
        )
    if kind == 2:
        return (
            f"forbid (principal, action == {a}, resource)\n"
            "when { context has estimated_tokens && "
            f"context.estimated_tokens > {100_000 + i} }};\n"
        )
    return (
        f'@escalate("1 of human")\n'
        f"permit (principal, action == {a}, resource)\n"
        f'when {{ context has effects && context.effects.contains("effect-{i}") }};\n'
    )


def spread_policies() -> list[str]:
    """97 policies over the six action types; each action gets the four kinds in turn."""
    n = len(ACTION_TYPES)
    return [_policy(i, ACTION_TYPES[i % n], (i // n) % 4) for i in range(97)]


def same_policies() -> list[str]:
    return [_policy(i, "llm.invoke", i % 4) for i in range(99)]


def _samples(
    fn: Callable[[], object], n: int, after: Callable[[object], None] | None = None
) -> list[float]:
    """Sorted single-call latencies in us; ``after`` runs untimed on each result."""
    for _ in range(WARM):
        got = fn()
        if after is not None:
            after(got)
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        got = fn()
        out.append((clock() - t) / 1000)
        if after is not None:
            after(got)
    out.sort()
    return out


def _p50(s: list[float]) -> float:
    return s[len(s) // 2]


def _p99(s: list[float]) -> float:
    return s[int(len(s) * 0.99)]


def _engine(root: Path, name: str, texts: list[str], defaults: bool) -> PolicyEngine:
    d = root / name
    d.mkdir()
    (d / "50-bench.cedar").write_text("\n".join(texts))
    return PolicyEngine(d, builtin_defaults=defaults, reload_interval=0.25)


def _raw(engine: PolicyEngine, action: Action) -> Callable[[], object]:
    """The floor: the public cedarpy call with pre-parsed handles on the whole set."""
    request, entities = engine._request(action, GROUPS, None)
    public_entities = cedarpy.Entities.from_json_str(str(entities))
    req = {**request, "context": json.loads(request["context"])}  # the public API's dict form
    policy_set = engine.loaded.policy_set

    def raw() -> object:
        return cedarpy.is_authorized(req, policy_set, public_entities)

    return raw


def _evaluated(engine: PolicyEngine, action: Action) -> str:
    """How many policies, and which context attributes, Cedar is handed for the recurring
    principals' decision once their plan is settled."""
    total = len(engine.loaded.by_action[action.type])
    for i in range(3):  # whole set, then the slice, then the settled plan
        engine.authorize(_llm(action.principal, action.resource, 90_001 + i), GROUPS)
    key, ctx = engine._key_and_context(action, GROUPS, None)
    entities, uids = engine._entities(key)
    request = {**uids, "action": {"type": "Tether::Action", "id": action.type}}
    plan = engine.loaded.slicers[action.type].plan(key, ctx, request, entities)
    reads = "all" if plan.reads is None else ", ".join(plan.reads)
    return (
        f"Cedar evaluates {len(plan.policy_set)} of {total} {action.type} policies; "
        f"context: {reads}"
    )


def _llm(claims: TokenClaims, model: str, i: int, *, unread: bool = False) -> Action:
    """An llm.invoke as the LLM gateway builds it (the context keys it sends, the estimate
    as the cost). ``i`` makes the decision new: it sets ``estimated_tokens``, which the
    sets' context forbids read, so Cedar must evaluate again; with ``unread`` only
    ``max_tokens`` changes, which no policy reads (the engine reuses the verdict)."""
    est = 300 if unread else 1 + i % 90_000  # always under the forbids' 100,000
    return Action(
        "llm.invoke",
        claims,
        model,
        arguments={"model": model, "tools": []},
        context={"max_tokens": i, "stream": False, "tools": [], "estimated_tokens": est},
        cost=Cost(tokens=est),
    )


@dataclass
class _Row:
    label: str
    fn: Callable[[int], Callable[[], object]]  # a fresh timed callable for n calls
    raw: Callable[[], object]
    share: int = 1  # time N // share calls (for the slow rows)
    target: str = ""  # the target column; met is judged wherever one is shown
    note: str = ""
    after: Callable[[object], None] | None = None
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    raws: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _decide_fn(core: DecisionCore, actions: Iterator[Action]) -> Callable[[], object]:
    return lambda: core.decide(next(actions))


class _Counter:
    """Unique ints across rounds, so no verdict or principal repeats between rounds."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, k: int) -> int:
        self.n += k
        return self.n - k


def _engine_rows(label: str, engine: PolicyEngine, counter: _Counter, target: str) -> list[_Row]:
    recurring = [_claims(f"bot{i}", i) for i in range(RECURRING)]
    first = _llm(recurring[0], "gpt-4o", 256)
    assert engine.authorize(first, GROUPS).outcome == "allow", label
    raw = _raw(engine, first)

    def hit(n: int) -> Callable[[], object]:
        return lambda: engine.authorize(first, GROUPS)

    def miss(n: int) -> Callable[[], object]:
        base = counter.take(n + WARM)
        acts = iter([_llm(recurring[i % RECURRING], "gpt-4o", base + i) for i in range(n + WARM)])
        return lambda: engine.authorize(next(acts), GROUPS)

    def unread(n: int) -> Callable[[], object]:
        base = counter.take(n + WARM)
        acts = iter(
            [
                _llm(recurring[i % RECURRING], "gpt-4o", base + i, unread=True)
                for i in range(n + WARM)
            ]
        )
        return lambda: engine.authorize(next(acts), GROUPS)

    def cold(n: int) -> Callable[[], object]:
        base = counter.take(n + WARM)
        acts = iter(
            [
                _llm(_claims(f"a{base + i}", 1_000_000 + base + i), "gpt-4o", 256)
                for i in range(n + WARM)
            ]
        )
        return lambda: engine.authorize(next(acts), GROUPS)

    floor: list[_Row] = []
    if len(engine.policies) == 1:
        request, entities = engine._request(first, GROUPS, None)
        one = engine.loaded.policy_set

        def internal(n: int) -> Callable[[], object]:
            return lambda: _cedar.is_authorized(request, one, entities, None, False)

        floor.append(
            _Row("Cedar's own floor (1 policy, pre-parsed, no Tether code)", internal, raw)
        )
    return [
        *floor,
        _Row(f"{label}, verdict-cache hit (not a real decision)", hit, raw),
        _Row(
            f"{label}, verdict miss, cached entities",
            miss,
            raw,
            target=target,
            note=_evaluated(engine, first),
        ),
        _Row(
            f"{label}, context new only in attributes no policy reads (verdict reused)",
            unread,
            raw,
        ),
        _Row(f"{label}, verdict miss, cold entities (new principal each call)", cold, raw),
    ]


def _core_rows(root: Path, counter: _Counter) -> tuple[list[_Row], Callable[[], None]]:
    from tether.server.services import Services, init_data_dir

    home = root / "home"
    init_data_dir(home, TD)
    (home / "policies" / "50-bench.cedar").write_text("\n".join(spread_policies()))
    (home / "policies" / "boundaries.toml").write_text(BOUNDARIES)
    services = Services(home)
    core = services.core
    recurring = [_claims(f"bot{i}", i) for i in range(RECURRING)]
    probe = _llm(recurring[0], "gpt-4o", 1)
    assert core.decide(probe).allowed
    mini = core.decide(_llm(recurring[0], "gpt-4o-mini", 1))
    assert mini.allowed and mini.reservation is not None, mini
    core.settle(mini, None)
    raw = _raw(services.policy, probe)

    def make(model: str, n: int) -> Iterator[Action]:
        base = counter.take(n + WARM)
        return iter([_llm(recurring[i % RECURRING], model, base + i) for i in range(n + WARM)])

    def plain(n: int) -> Callable[[], object]:
        return _decide_fn(core, make("gpt-4o", n))

    def limited(n: int) -> Callable[[], object]:
        return _decide_fn(core, make("gpt-4o-mini", n))

    rows = [
        _Row(
            "DecisionCore.decide, 100 spread, verdict miss, cached entities, no limit applies",
            plain,
            raw,
            target=TARGET,
            note="authorize + boundaries (groups, limits checked)",
        ),
        _Row(
            "DecisionCore.decide, 100 spread, verdict miss, a rate limit reserves (SQLite)",
            limited,
            raw,
            share=4,
            note="incl. a group-limit reservation (its own target: bench_limits)",
            after=lambda d: core.settle(d, None),  # type: ignore[arg-type]
        ),
    ]
    return rows, services.close


def run() -> list[Result]:
    counter = _Counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        engines = [
            ("1 policy", _engine(root, "one", [GRANT_PERMIT], defaults=False), ""),
            ("100 spread", _engine(root, "spread", spread_policies(), defaults=True), TARGET),
            (
                "100 same (worst case: all on the decided action)",
                _engine(root, "same", [GRANT_PERMIT, *same_policies()], defaults=False),
                WORST,
            ),
        ]
        rows: list[_Row] = []
        for label, engine, target in engines:
            assert len(engine.policies) in (1, 100), (label, len(engine.policies))
            rows += _engine_rows(label, engine, counter, target)
        core_rows, close = _core_rows(root, counter)
        rows += core_rows
        try:
            for _ in range(ROUNDS):
                for row in rows:
                    n = N // row.share
                    raw = _p50(_samples(row.raw, n))
                    s = _samples(row.fn(n), n, row.after)
                    row.p50s.append(_p50(s))
                    row.p99s.append(_p99(s))
                    row.raws.append(raw)
                    row.ratios.append(_p50(s) / raw)
        finally:
            close()
    out: list[Result] = []
    for row in rows:
        p50 = statistics.median(row.p50s)
        p99 = statistics.median(row.p99s)
        ratio = statistics.median(row.ratios)
        raw = statistics.median(row.raws)
        note = f"; {row.note}" if row.note else ""
        out.append(
            Result(
                "policy",
                f"{row.label}: p50 (p99 {p99:.1f} us)",
                p50,
                "us",
                row.target,
                f"raw cedarpy whole set p50 {raw:.1f} us; ratio {ratio:.2f}{note}",
                (p50 <= TARGET_US) if row.target else None,
            )
        )
    return out


if __name__ == "__main__":
    from bench._table import print_table

    print_table(run())
