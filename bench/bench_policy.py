"""Cedar policy decisions through :class:`PolicyEngine.authorize`, next to the raw cedarpy floor.

Measured per decision (p50 / p99 over single calls):

* 1 policy, and 100 policies spread over the six action types (how a real set looks: the
  engine pre-splits the set per action, so a decision only pays for the policies that concern
  its action), and 100 policies that all concern the decided action (the worst case);
* cached entities (the same principal and resource again: the LRU hit the hot path sees) and
  cold entities (a new principal every call: the entity set is built and parsed);
* the raw floor: ``cedarpy.is_authorized`` with pre-parsed PolicySet and Entities handles on
  the whole set, the figure DESIGN.md quotes (~40 us).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cedarpy

from bench._table import Result
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import ACTION_TYPES, Action
from tether.policy.engine import PolicyEngine

TD = "example.org"
N = 20_000
WARM = 2_000
GRANT_PERMIT = (
    '@id("grants")\npermit (principal, action == Tether::Action::"llm.invoke", resource)\n'
    "when { context.granted };\n"
)


def _claims(name: str) -> TokenClaims:
    return TokenClaims(
        issuer=f"spiffe://{TD}",
        subject=SpiffeId.parse(f"spiffe://{TD}/agent/{name}"),
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id="b" * 32,
        grantors=(SpiffeId.parse(f"spiffe://{TD}/user/alice"),),
        chain_jti=("a" * 32,),
        grants=parse_grants(("model:gpt-4o*", "tool:search.*")),
        task="bench",
    )


def _policy(i: int, action: str) -> str:
    """A realistic mix: group-scoped forbids, label and context conditions, escalations."""
    a = f'Tether::Action::"{action}"'
    kind = i % 4
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


def _latency(fn: Callable[[], object], n: int = N) -> tuple[float, float]:
    for _ in range(WARM):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fn()
        samples.append(clock() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def _engine(root: Path, name: str, texts: list[str], defaults: bool) -> PolicyEngine:
    d = root / name
    d.mkdir()
    (d / "50-bench.cedar").write_text("\n".join(texts))
    return PolicyEngine(d, builtin_defaults=defaults, reload_interval=0.25)


def _raw_floor(engine: PolicyEngine, action: Action) -> tuple[float, float]:
    request, entities = engine._request(action, frozenset({"swarm"}), None)
    public_entities = cedarpy.Entities.from_json_str(str(entities))
    req = {**request, "context": json.loads(request["context"])}  # the public API's dict form
    policy_set = engine.loaded.policy_set

    def raw() -> object:
        return cedarpy.is_authorized(req, policy_set, public_entities)

    return _latency(raw)


def run() -> list[Result]:
    results: list[Result] = []
    action = Action("llm.invoke", _claims("bot"), "gpt-4o", context={"max_tokens": 256})
    groups = frozenset({"swarm"})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spread = [_policy(i, ACTION_TYPES[i % len(ACTION_TYPES)]) for i in range(97)]
        same = [_policy(i, "llm.invoke") for i in range(99)]
        setups = [
            ("1 policy", _engine(root, "one", [GRANT_PERMIT], defaults=False)),
            ("100 policies over 6 actions", _engine(root, "spread", spread, defaults=True)),
            (
                "100 policies, all on llm.invoke",
                _engine(root, "same", [GRANT_PERMIT, *same], False),
            ),
        ]
        for label, engine in setups:
            assert len(engine.policies) in (1, 100), (label, len(engine.policies))
            assert engine.authorize(action, groups).outcome == "allow"
            p50, p99 = _latency(lambda e=engine: e.authorize(action, groups))  # type: ignore[misc]
            raw50, raw99 = _raw_floor(engine, action)
            cold_actions = [
                Action("llm.invoke", _claims(f"a{i}"), "gpt-4o", context={"max_tokens": 256})
                for i in range(N + WARM)
            ]
            c50, c99 = _latency(
                lambda e=engine, it=iter(cold_actions): e.authorize(next(it), groups)  # type: ignore[misc]
            )
            target = "<= 50 us" if label != "1 policy" else ""
            results += [
                Result(
                    "policy",
                    f"decision p50, {label}, cached entities",
                    p50,
                    "us",
                    target,
                    f"raw cedarpy pre-parsed (whole set) p50 {raw50:.1f} us; "
                    f"ratio {p50 / raw50:.2f}",
                    (p50 <= 50) if target else None,
                ),
                Result(
                    "policy",
                    f"decision p99, {label}, cached entities",
                    p99,
                    "us",
                    "",
                    f"raw p99 {raw99:.1f} us",
                ),
                Result(
                    "policy",
                    f"decision p50, {label}, cold entities (new principal each call)",
                    c50,
                    "us",
                    "",
                    f"p99 {c99:.1f} us",
                ),
            ]
    return results


if __name__ == "__main__":
    from bench._table import print_table

    print_table(run())
