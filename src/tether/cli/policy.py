"""``tether policy``: validate, test and explain Cedar policies, offline from the data dir.

    tether policy validate [FILE...]          the data dir's set (or these files), FILE:LINE errors
    tether policy test CASES.toml             run policy test cases, nonzero exit on a failure
    tether policy explain --principal ... --action ... --resource ...
                                              which policies an action satisfies, and the verdict

No server is needed: the commands load ``<data dir>/policies`` exactly as the server does. The
test file format is documented in ``docs/policy.md`` (TOML, one ``[[case]]`` per action).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether.config import DataDir, resolve_data_dir
from tether.errors import BadRequest, TetherError
from tether.identity.claims import TokenClaims, parse_grants
from tether.identity.spiffe import SpiffeId
from tether.policy.action import ACTION_TYPES, Action, Cost
from tether.policy.engine import (
    BUILTIN_SOURCE,
    PolicyEngine,
    PolicyError,
    PolicySource,
    load_policies,
    read_policy_dir,
    read_policy_file,
)
from tether.policy.schema import defaults_text

__all__ = ["CaseResult", "PolicyCase", "build_action", "policy_app", "run_cases"]

policy_app = typer.Typer(
    help="Validate, test and explain Cedar policies (offline, from the data dir).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="TETHER_HOME", help="Data directory (default ~/.tether)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_STYLE = {"allow": "green", "deny": "bold red", "escalate": "yellow"}
OUTCOMES = ("allow", "deny", "escalate")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except TetherError as e:
        err.print(f"[bold red]error:[/] {escape(e.diagnostics())}")
        raise typer.Exit(1) from None


def _policy_dir(data_dir: Path | None) -> Path:
    return DataDir(resolve_data_dir(data_dir)).policies


_SYNTHETIC_JTI = "policy-test"

# -- building actions -----------------------------------------------------------------------


def _claims(
    principal: str,
    *,
    chain: Sequence[str] = (),
    grants: Sequence[str] = (),
    task: str | None = None,
    labels: Sequence[str] = (),
) -> TokenClaims:
    subject = SpiffeId.parse(principal)
    return TokenClaims(
        issuer=subject.trust_domain_id,
        subject=subject,
        audience=("tether",),
        issued_at=0,
        not_before=0,
        expires_at=2**40,
        token_id=_SYNTHETIC_JTI,
        grantors=tuple(SpiffeId.parse(c) for c in chain),
        chain_jti=tuple(f"policy-test-{i}" for i in range(len(chain))),
        grants=parse_grants(tuple(grants)),
        task=task or None,
        labels=tuple(labels),
    )


def build_action(
    *,
    principal: str,
    action: str,
    resource: str,
    chain: Sequence[str] = (),
    grants: Sequence[str] = (),
    task: str | None = None,
    labels: Sequence[str] = (),
    context: Mapping[str, Any] | None = None,
    effects: Mapping[str, int] | None = None,
    tokens: int = 0,
) -> Action:
    """An :class:`Action` as an enforcement point would build it. Raises BadRequest."""
    if action not in ACTION_TYPES:
        raise BadRequest(f"unknown action {action!r} (one of {', '.join(ACTION_TYPES)})")
    return Action(
        action,
        _claims(principal, chain=chain, grants=grants, task=task, labels=labels),
        resource,
        context=dict(context or {}),
        effects=dict(effects or {}),
        cost=Cost(tokens=tokens, usd=Decimal(0)),
    )


# -- test cases -----------------------------------------------------------------------------

_CASE_KEYS = frozenset(
    {
        "name",
        "principal",
        "chain",
        "grants",
        "task",
        "labels",
        "groups",
        "action",
        "resource",
        "context",
        "effects",
        "tokens",
        "granted",
        "hour",
        "expect",
        "quorum",
        "policies",
        "reason",
    }
)


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    action: Action
    groups: frozenset[str]
    expect: str
    granted: bool | None = None
    hour: int | None = None
    quorum: str | None = None
    policies: tuple[str, ...] | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    outcome: str
    reasons: tuple[str, ...]
    policies: tuple[str, ...]
    quorum: str | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def _strs(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what} must be a list of strings")
    return list(value)


def parse_cases(text: str, source: str = "cases") -> list[PolicyCase]:
    """Parse a policy test file (TOML). Raises BadRequest naming the case."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadRequest(f"{source}: {e}") from e
    defaults = doc.get("defaults", {})
    cases = doc.get("case", [])
    if not isinstance(defaults, dict) or not isinstance(cases, list) or not cases:
        raise BadRequest(f"{source}: expected [defaults] and at least one [[case]]")
    out: list[PolicyCase] = []
    for i, raw in enumerate(cases, 1):
        if not isinstance(raw, dict):
            raise BadRequest(f"{source}: case {i} is not a table")
        c = {**defaults, **raw}
        label = f"{source}: case {i} ({c.get('name', 'unnamed')})"
        try:
            unknown = set(c) - _CASE_KEYS
            if unknown:
                raise BadRequest(f"unknown keys {', '.join(sorted(unknown))}")
            for key in ("principal", "action", "resource", "expect"):
                if not isinstance(c.get(key), str):
                    raise BadRequest(f"{key} is required (a string)")
            if c["expect"] not in OUTCOMES:
                raise BadRequest(f"expect must be one of {', '.join(OUTCOMES)}")
            effects = c.get("effects", {})
            if not isinstance(effects, dict) or not all(
                isinstance(v, int) for v in effects.values()
            ):
                raise BadRequest("effects must be a table of integers")
            context = c.get("context", {})
            if not isinstance(context, dict):
                raise BadRequest("context must be a table")
            hour = c.get("hour")
            if hour is not None and (not isinstance(hour, int) or not 0 <= hour <= 23):
                raise BadRequest("hour must be 0-23")
            granted = c.get("granted")
            if granted is not None and not isinstance(granted, bool):
                raise BadRequest("granted must be true or false")
            action = build_action(
                principal=c["principal"],
                action=c["action"],
                resource=c["resource"],
                chain=_strs(c.get("chain", []), "chain"),
                grants=_strs(c.get("grants", []), "grants"),
                task=c.get("task"),
                labels=_strs(c.get("labels", []), "labels"),
                context=context,
                effects=effects,
                tokens=int(c.get("tokens", 0)),
            )
            policies = c.get("policies")
            out.append(
                PolicyCase(
                    name=str(c.get("name", f"case {i}")),
                    action=action,
                    groups=frozenset(_strs(c.get("groups", []), "groups")),
                    expect=c["expect"],
                    granted=granted,
                    hour=hour,
                    quorum=c.get("quorum"),
                    policies=None if policies is None else tuple(_strs(policies, "policies")),
                    reason=c.get("reason"),
                )
            )
        except TetherError as e:
            raise BadRequest(f"{label}: {e.message}") from e
    return out


class _CaseClock:
    def __init__(self) -> None:
        self.fixed: float | None = None

    def __call__(self) -> float:
        import time

        return time.time() if self.fixed is None else self.fixed


def run_cases(policy_dir: Path | None, cases: Sequence[PolicyCase]) -> list[CaseResult]:
    """Decide every case against the policies in ``policy_dir``. Raises PolicyError."""
    clock = _CaseClock()
    engine = PolicyEngine(policy_dir, reload_interval=None, clock=clock)
    results: list[CaseResult] = []
    for case in cases:
        clock.fixed = (
            None if case.hour is None else float(calendar.timegm((2030, 1, 1, case.hour, 0, 0)))
        )
        v = engine.authorize(case.action, case.groups, granted=case.granted)
        failures: list[str] = []
        if v.outcome != case.expect:
            failures.append(f"expected {case.expect}, got {v.outcome}")
        if case.quorum is not None and v.quorum != case.quorum:
            failures.append(f"expected quorum {case.quorum!r}, got {v.quorum!r}")
        if case.policies is not None and tuple(v.policies) != case.policies:
            failures.append(f"expected policies {list(case.policies)}, got {list(v.policies)}")
        if case.reason is not None and not any(case.reason in r for r in v.reasons):
            failures.append(f"no reason mentions {case.reason!r}")
        results.append(
            CaseResult(case, v.outcome, v.reasons, v.policies, v.quorum, tuple(failures))
        )
    return results


# -- commands -------------------------------------------------------------------------------


def _problem_lines(e: PolicyError, base: Path | None) -> list[str]:
    lines = []
    for p in e.problems:
        where = p.file
        if base is not None and p.file != BUILTIN_SOURCE and not Path(p.file).is_absolute():
            where = str(base / p.file)
        lines.append(f"{where}:{p.line}: {p.message}" if p.line else f"{where}: {p.message}")
    return lines


@policy_app.command()
def validate(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Policy files to validate instead of the data dir's set."),
    ] = None,
    data_dir: DataDirOpt = None,
    no_defaults: Annotated[
        bool, typer.Option("--no-defaults", help="Leave the built-in defaults out.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Parse and validate policies against Tether's schema; errors name FILE:LINE (exit 1)."""
    base: Path | None = None
    try:
        if files:
            builtin = [] if no_defaults else [PolicySource(BUILTIN_SOURCE, defaults_text())]
            sources = builtin + [read_policy_file(f, str(f)) for f in files]
        else:
            base = _policy_dir(data_dir)
            sources = read_policy_dir(base, builtin_defaults=not no_defaults)
        loaded = load_policies(sources)
    except PolicyError as e:
        if as_json:
            doc = {
                "ok": False,
                "problems": [
                    {"file": p.file, "line": p.line, "message": p.message} for p in e.problems
                ],
            }
            out.print_json(json.dumps(doc))
        else:
            for line in _problem_lines(e, base):
                err.print(f"[bold red]error:[/] {escape(line)}")
            err.print(f"{len(e.problems)} problem(s); the set would be refused")
        raise typer.Exit(1) from None
    if as_json:
        doc = {
            "ok": True,
            "version": loaded.version,
            "sources": list(loaded.sources),
            "policies": [p.summary() for p in loaded.policies],
        }
        out.print_json(json.dumps(doc))
        return
    out.print(
        f"[green]ok[/]: {len(loaded)} policies from {len(loaded.sources)} file(s), "
        f"version {loaded.version[:16]}"
    )
    for name in loaded.sources:
        out.print(f"  {escape(name)}")


@policy_app.command("test")
def test_cmd(
    cases_file: Annotated[Path, typer.Argument(help="TOML file of [[case]] tables.")],
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run policy test cases against the data dir's policies; exit 1 if any case fails."""
    with _errors():
        try:
            text = cases_file.read_text(encoding="utf-8")
        except OSError as e:
            raise BadRequest(f"cannot read {cases_file}: {e.strerror}") from e
        cases = parse_cases(text, str(cases_file))
        results = run_cases(_policy_dir(data_dir), cases)
    failed = [r for r in results if not r.passed]
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "passed": len(results) - len(failed),
                    "failed": len(failed),
                    "cases": [
                        {
                            "name": r.case.name,
                            "expect": r.case.expect,
                            "outcome": r.outcome,
                            "passed": r.passed,
                            "failures": list(r.failures),
                            "reasons": list(r.reasons),
                            "policies": list(r.policies),
                            "quorum": r.quorum,
                        }
                        for r in results
                    ],
                }
            )
        )
    else:
        t = Table(title=f"policy tests: {cases_file.name}")
        for col in ("", "case", "expect", "got", "detail"):
            t.add_column(col)
        for r in results:
            mark = "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]"
            detail = "; ".join(r.failures) if r.failures else "; ".join(r.reasons)
            t.add_row(
                mark,
                escape(r.case.name),
                r.case.expect,
                f"[{_STYLE[r.outcome]}]{r.outcome}[/]",
                escape(detail),
            )
        out.print(t)
        out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def _context_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@policy_app.command()
def explain(
    principal: Annotated[str, typer.Option("--principal", help="SPIFFE ID of the principal.")],
    action: Annotated[str, typer.Option("--action", help=", ".join(ACTION_TYPES))],
    resource: Annotated[str, typer.Option("--resource", help="Model, tool, service, domain.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Group (repeat).")] = None,
    grant: Annotated[
        list[str] | None, typer.Option("--grant", help="Token grant, e.g. model:gpt-4o* (repeat).")
    ] = None,
    chain: Annotated[
        list[str] | None,
        typer.Option("--chain", help="Grantor SPIFFE IDs, root first (repeat)."),
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="The token's task.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="Label (repeat).")] = None,
    context: Annotated[
        list[str] | None,
        typer.Option("--context", help='k=v; v is JSON if it parses (2000, true, ["a"]).'),
    ] = None,
    effect: Annotated[
        list[str] | None, typer.Option("--effect", help="Side-effect kind (repeat).")
    ] = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show which policies an action satisfies, which decided, and the verdict."""
    with _errors():
        ctx: dict[str, Any] = {}
        for item in context or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BadRequest(f"--context {item!r}: expected KEY=VALUE")
            ctx[key] = _context_value(value)
        act = build_action(
            principal=principal,
            action=action,
            resource=resource,
            chain=chain or [],
            grants=grant or [],
            task=task,
            labels=label or [],
            context=ctx,
            effects={e: 1 for e in effect or []},
        )
        engine = PolicyEngine(_policy_dir(data_dir), reload_interval=None)
        doc = engine.explain(act, frozenset(group or []))
    if as_json:
        out.print_json(json.dumps(doc, default=str))
        return
    v = doc["verdict"]
    style = _STYLE.get(v["outcome"], "")
    out.print(
        f"verdict: [{style}]{v['outcome']}[/]" + (f"  quorum: {v['quorum']}" if v["quorum"] else "")
    )
    for r in v["reasons"]:
        out.print(f"  {escape(r)}")
    out.print(f"[dim]policy version {v['policy_version'][:16]}, {doc['policy_count']} policies[/]")
    t = Table(title="satisfied policies")
    for col in ("policy", "location", "effect", "decided", "escalate / reason"):
        t.add_column(col, overflow="fold")
    for s in doc["satisfied"]:
        shown = ("escalate", "reason")
        ann = " ".join(f"@{k}({json.dumps(v)})" for k, v in s["annotations"].items() if k in shown)
        t.add_row(
            escape(s["id"]),
            escape(s["location"]),
            s["effect"],
            "yes" if s["determining"] else "",
            escape(ann),
        )
    if doc["satisfied"]:
        out.print(t)
    else:
        out.print("no policy is satisfied (default deny)")
    for e in doc["errors"]:
        out.print(f"[red]evaluation error:[/] {escape(e)}")
