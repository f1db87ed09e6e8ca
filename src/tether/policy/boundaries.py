"""``<data>/policies/boundaries.toml``: groups, group limits and effect kinds; validated, live.

The file (documented with examples in ``docs/boundaries.md``)::

    [settings]
    reservation_ttl = "10m"          # an unsettled reservation is final after this long

    [groups.swarm]                   # membership: any criterion matches (OR)
    labels  = ["indexer"]            # the token carries one of these labels
    grants  = ["tool:db.*"]          # the token holds a grant this pattern matches (as text)
    roots   = ["spiffe://td/user/alice"]        # the delegation chain starts here
    members = ["spiffe://td/agent/indexer-*"]   # the holder or anyone in its chain
    include = ["dbas"]               # every member of these groups (nested, acyclic)
    delegated = true                 # false: delegated tokens are never members

    [effects]                        # effect kind -> the actions that have it
    "db.schema_change" = ["tool.call:db.add_index", "tool.call:db.alter_*"]

    [limits.schema-changes]
    group     = "swarm"
    kind      = "budget"             # rate | concurrency | budget
    unit      = "db.schema_change"   # budget only: tokens | usd | requests | an effect kind
    amount    = 3
    window    = "1h"                 # rate and budget: a sliding window
    match     = ["tool.call:db.*"]   # optional: only these actions (default: all)
    on_exceed = "escalate"           # deny | escalate
    quorum    = "2 of group:sre"     # escalate only, required

Every refusal names the file, the line of the entry's table header when it can be found, and
the entry (``boundaries.toml:14 [limits.schema-changes]: window must be > 0``).

:class:`BoundariesFile` keeps the loaded config and re-reads the file when its ``stat``
signature changes, looking at most every 250 ms (never a syscall per decision). An invalid
file never replaces the loaded valid one: the old config stays in force and ``last_error``
says why the new one was refused. Nothing else here does I/O.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, cast

from tether.errors import ConfigError
from tether.policy.action import ACTION_TYPES

__all__ = [
    "BASE_UNITS",
    "DEFAULT_RESERVATION_TTL",
    "LIMIT_KINDS",
    "USD_SCALE",
    "ActionMatcher",
    "Boundaries",
    "BoundariesError",
    "BoundariesFile",
    "BoundariesSource",
    "GroupDef",
    "LimitDef",
    "LimitKind",
    "load_boundaries",
    "parse_boundaries",
    "usd_units",
]

log = logging.getLogger(__name__)

LimitKind = Literal["rate", "concurrency", "budget"]
LIMIT_KINDS: tuple[LimitKind, ...] = ("rate", "concurrency", "budget")
BASE_UNITS = ("tokens", "usd", "requests")
DEFAULT_RESERVATION_TTL = 600.0
USD_SCALE = Decimal(1_000_000)  # amounts in USD are kept as integer micro-dollars

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_LIMIT_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")
_EFFECT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL = re.compile(r"^[A-Za-z0-9._:/@=+-]{1,128}$")
_ID_PATTERN = re.compile(r"^spiffe://[A-Za-z0-9._*/-]{1,400}$")
_GRANT_PATTERN = re.compile(r"^[a-z]+:[A-Za-z0-9._:/@+*=-]{1,200}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_GROUP_KEYS = {"labels", "grants", "roots", "members", "include", "delegated", "description"}
_LIMIT_KEYS = {
    "group",
    "kind",
    "unit",
    "amount",
    "window",
    "match",
    "on_exceed",
    "quorum",
    "description",
}
_TOP_KEYS = {"settings", "groups", "limits", "effects"}
_SETTINGS_KEYS = {"reservation_ttl"}


class BoundariesError(ConfigError):
    """boundaries.toml is invalid; ``errors`` lists every problem found, each naming the
    file and the entry."""

    code = "invalid_boundaries"

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def usd_units(value: Decimal, *, up: bool) -> int:
    """USD -> integer micro-dollars (rounded up for what is spent, down for caps)."""
    return int((value * USD_SCALE).to_integral_value(ROUND_CEILING if up else ROUND_FLOOR))


# -- parts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionMatcher:
    """``TYPE:RESOURCE_GLOB`` (``tool.call:db.alter_*``), ``TYPE`` (any resource) or ``*``."""

    type: str
    resource: str = "*"

    @classmethod
    def parse(cls, text: str) -> ActionMatcher:
        if not isinstance(text, str) or not text or len(text) > 300:
            raise ValueError(f"action matcher must be a string 'TYPE:RESOURCE', got {text!r}")
        type_, sep, resource = text.partition(":")
        if type_ != "*" and type_ not in ACTION_TYPES:
            raise ValueError(
                f"unknown action type {type_!r} in {text!r} (one of {', '.join(ACTION_TYPES)}, *)"
            )
        if sep and not resource:
            raise ValueError(f"empty resource pattern in {text!r}")
        return cls(type_, resource if sep else "*")

    def matches(self, action_type: str, resource: str) -> bool:
        return (self.type == "*" or self.type == action_type) and (
            self.resource == "*" or fnmatchcase(resource, self.resource)
        )

    def __str__(self) -> str:
        return f"{self.type}:{self.resource}"


@dataclass(frozen=True, slots=True)
class GroupDef:
    name: str
    labels: tuple[str, ...] = ()
    grants: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    delegated: bool = True


@dataclass(frozen=True, slots=True)
class LimitDef:
    """One group limit. ``amount`` and every charge are integers in the limit's unit
    (``usd`` in micro-dollars); ``window`` is seconds (``None`` for concurrency)."""

    name: str
    group: str
    kind: LimitKind
    unit: str  # "requests" (rate), "slots" (concurrency), tokens|usd|requests|<effect> (budget)
    amount: int
    window: float | None
    match: tuple[ActionMatcher, ...] = ()
    on_exceed: Literal["deny", "escalate"] = "deny"
    quorum: str | None = None

    def applies_to(self, action_type: str, resource: str) -> bool:
        return not self.match or any(m.matches(action_type, resource) for m in self.match)

    def show_amount(self, value: int) -> str:
        if self.unit == "usd":
            places = 2 if value % 10_000 == 0 else 6
            return f"${Decimal(value) / USD_SCALE:.{places}f}"
        return str(value)

    def describe(self) -> str:
        """``at most 3 db.schema_change per 1h across group swarm``."""
        if self.kind == "concurrency":
            what = f"at most {self.amount} in flight"
        elif self.unit == "usd":
            what = f"at most {self.show_amount(self.amount)} USD"
        else:
            what = f"at most {self.amount} {self.unit}"
        per = f" per {_show_seconds(self.window)}" if self.window is not None else ""
        return f"{what}{per} across group {self.group}"


def _show_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


_MATCH_MEMO = 4096  # (action type, resource, groups) answers kept per boundaries file


@dataclass(frozen=True)
class Boundaries:
    """One validated boundaries file. Immutable: a reload builds a new one."""

    groups: Mapping[str, GroupDef] = field(default_factory=dict)
    limits: tuple[LimitDef, ...] = ()
    effects: Mapping[str, tuple[ActionMatcher, ...]] = field(default_factory=dict)
    reservation_ttl: float = DEFAULT_RESERVATION_TTL
    source: str = "<empty>"
    digest: str = ""
    limits_by_group: Mapping[str, tuple[LimitDef, ...]] = field(default_factory=dict)
    # matching() answers: pattern matching per decision would cost more than the rest of it
    _memo: dict[tuple[str, str, frozenset[str]], tuple[tuple[LimitDef, ...], tuple[str, ...]]] = (
        field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    )

    def __post_init__(self) -> None:
        by: dict[str, list[LimitDef]] = {}
        for lim in self.limits:
            by.setdefault(lim.group, []).append(lim)
        object.__setattr__(
            self, "limits_by_group", MappingProxyType({g: tuple(v) for g, v in by.items()})
        )

    # A Boundaries is its own (static) source.
    def current(self) -> Boundaries:
        return self

    def matching(
        self, action_type: str, resource: str, groups: frozenset[str]
    ) -> tuple[tuple[LimitDef, ...], tuple[str, ...]]:
        """The limits of ``groups`` whose ``match`` takes this action, and the configured
        effect kinds whose matchers match it (remembered, bounded)."""
        key = (action_type, resource, groups)
        got = self._memo.get(key)
        if got is None:
            lims = tuple(
                lim
                for g in sorted(groups)
                for lim in self.limits_by_group.get(g, ())
                if lim.applies_to(action_type, resource)
            )
            kinds = tuple(
                kind
                for kind, matchers in self.effects.items()
                if any(m.matches(action_type, resource) for m in matchers)
            )
            got = (lims, kinds)
            if len(self._memo) >= _MATCH_MEMO:
                self._memo.clear()
            self._memo[key] = got
        return got


class BoundariesSource(Protocol):
    def current(self) -> Boundaries: ...


# -- parsing ---------------------------------------------------------------------------------


def _header_line(text: str, section: str, name: str) -> int | None:
    pat = re.compile(
        rf'^[ \t]*\[\s*{re.escape(section)}\s*\.\s*(?:"{re.escape(name)}"|\'{re.escape(name)}\''
        rf"|{re.escape(name)})\s*\]",
        re.MULTILINE,
    )
    m = pat.search(text)
    return None if m is None else text.count("\n", 0, m.start()) + 1


def _key_line(text: str, section: str, key: str) -> int | None:
    m = re.search(rf"^[ \t]*\[\s*{re.escape(section)}\s*\]", text, re.MULTILINE)
    if m is None:
        return None
    k = re.compile(
        rf'^[ \t]*(?:"{re.escape(key)}"|\'{re.escape(key)}\'|{re.escape(key)})\s*=', re.MULTILINE
    )
    km = k.search(text, m.end())
    return None if km is None else text.count("\n", 0, km.start()) + 1


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration such as '1h' or a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        s = value.strip().lower()
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            seconds, pos = 0.0, 0
            while pos < len(s):
                m = _DURATION.match(s, pos)
                if m is None:
                    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 1h)")
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos = m.end()
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"must be > 0, got {value!r}")
    return seconds


def _str_list(value: Any, what: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise ValueError(f"{what} must be a list of strings")
    for v in value:
        if not isinstance(v, str) or not pattern.match(v):
            raise ValueError(f"invalid {what} entry {v!r}")
    return tuple(value)


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.name = Path(source).name if source else "boundaries.toml"
        self.errors: list[str] = []

    def err(self, section: str, entry: str | None, message: str, *, key: bool = False) -> None:
        line: int | None = None
        label = f"[{section}]"
        if entry is not None:
            line = (
                _key_line(self.text, section, entry)
                if key
                else _header_line(self.text, section, entry)
            )
            label = f"[{section}] {entry}" if key else f"[{section}.{entry}]"
        where = f"{self.name}:{line}" if line else self.name
        self.errors.append(f"{where} {label}: {message}")

    def parse(self) -> Boundaries:
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise BoundariesError([f"{self.name}: not valid TOML: {e}"]) from e
        for k in doc:
            if k not in _TOP_KEYS:
                known = ", ".join(sorted(_TOP_KEYS))
                self.errors.append(f"{self.name}: unknown top-level key {k!r} (one of {known})")
        ttl = self._settings(doc.get("settings", {}))
        groups = self._groups(doc.get("groups", {}))
        effects = self._effects(doc.get("effects", {}))
        limits = self._limits(doc.get("limits", {}), groups, effects)
        if self.errors:
            raise BoundariesError(self.errors)
        return Boundaries(
            groups=MappingProxyType(groups),
            limits=tuple(limits),
            effects=MappingProxyType(effects),
            reservation_ttl=ttl,
            source=self.source,
            digest=hashlib.sha256(self.text.encode()).hexdigest(),
        )

    def _settings(self, raw: Any) -> float:
        if not isinstance(raw, dict):
            self.err("settings", None, "must be a table")
            return DEFAULT_RESERVATION_TTL
        for k in raw:
            if k not in _SETTINGS_KEYS:
                self.err("settings", k, "unknown setting", key=True)
        if "reservation_ttl" not in raw:
            return DEFAULT_RESERVATION_TTL
        try:
            return _duration(raw["reservation_ttl"])
        except ValueError as e:
            self.err("settings", "reservation_ttl", str(e), key=True)
            return DEFAULT_RESERVATION_TTL

    def _groups(self, raw: Any) -> dict[str, GroupDef]:
        if not isinstance(raw, dict):
            self.err("groups", None, "must be a table of groups")
            return {}
        out: dict[str, GroupDef] = {}
        for name, body in raw.items():
            if not _NAME.match(name):
                self.err("groups", name, "invalid group name (letters, digits, . _ -)")
                continue
            if not isinstance(body, dict):
                self.err("groups", name, "must be a table")
                continue
            bad = [k for k in body if k not in _GROUP_KEYS]
            if bad:
                self.err(
                    "groups",
                    name,
                    f"unknown key {bad[0]!r} (one of {', '.join(sorted(_GROUP_KEYS))})",
                )
                continue
            try:
                delegated = body.get("delegated", True)
                if not isinstance(delegated, bool):
                    raise ValueError("delegated must be true or false")
                g = GroupDef(
                    name=name,
                    labels=_str_list(body.get("labels", []), "labels", _LABEL),
                    grants=_str_list(body.get("grants", []), "grants", _GRANT_PATTERN),
                    roots=_str_list(body.get("roots", []), "roots", _ID_PATTERN),
                    members=_str_list(body.get("members", []), "members", _ID_PATTERN),
                    include=_str_list(body.get("include", []), "include", _NAME),
                    delegated=delegated,
                )
            except ValueError as e:
                self.err("groups", name, str(e))
                continue
            if not (g.labels or g.grants or g.roots or g.members or g.include):
                self.err(
                    "groups",
                    name,
                    "has no membership rule (labels, grants, roots, members or include)",
                )
                continue
            out[name] = g
        for g in out.values():
            for inc in g.include:
                if inc not in out and inc in raw:
                    continue  # that group is invalid itself; already reported
                if inc not in out:
                    self.err("groups", g.name, f"includes unknown group {inc!r}")
        self._cycles(out)
        return out

    def _cycles(self, groups: dict[str, GroupDef]) -> None:
        state: dict[str, int] = {}  # 1 visiting, 2 done
        reported: set[frozenset[str]] = set()

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            path.append(name)
            for inc in groups[name].include:
                if inc not in groups:
                    continue
                if state.get(inc) == 1:
                    cycle = [*path[path.index(inc) :], inc]
                    key = frozenset(cycle)
                    if key not in reported:
                        reported.add(key)
                        self.err(
                            "groups",
                            cycle[0],
                            f"group cycle: {' -> '.join(cycle)} (include must not loop)",
                        )
                elif state.get(inc) is None:
                    visit(inc, path)
            path.pop()
            state[name] = 2

        for name in sorted(groups):
            if state.get(name) is None:
                visit(name, [])

    def _effects(self, raw: Any) -> dict[str, tuple[ActionMatcher, ...]]:
        if not isinstance(raw, dict):
            self.err("effects", None, "must be a table of effect kind = [action matchers]")
            return {}
        out: dict[str, tuple[ActionMatcher, ...]] = {}
        for kind, matchers in raw.items():
            if not _EFFECT.match(kind) or kind in BASE_UNITS or kind == "slots":
                self.err(
                    "effects",
                    kind,
                    "invalid effect kind (lowercase letters, digits, . _ -; not tokens, usd, "
                    "requests or slots)",
                    key=True,
                )
                continue
            if isinstance(matchers, str) or not isinstance(matchers, list):
                self.err("effects", kind, "must be a list of 'TYPE:RESOURCE' matchers", key=True)
                continue
            try:
                out[kind] = tuple(ActionMatcher.parse(m) for m in matchers)
            except ValueError as e:
                self.err("effects", kind, str(e), key=True)
        return out

    def _limits(
        self,
        raw: Any,
        groups: dict[str, GroupDef],
        effects: dict[str, tuple[ActionMatcher, ...]],
    ) -> list[LimitDef]:
        if not isinstance(raw, dict):
            self.err("limits", None, "must be a table of named limits ([limits.NAME])")
            return []
        out: list[LimitDef] = []
        for name, body in raw.items():
            if not _LIMIT_NAME.match(name):
                self.err("limits", name, "invalid limit name (letters, digits, . _ / -)")
                continue
            if not isinstance(body, dict):
                self.err("limits", name, "must be a table")
                continue
            try:
                out.append(self._limit(name, body, groups, effects))
            except ValueError as e:
                self.err("limits", name, str(e))
        return out

    def _limit(
        self,
        name: str,
        body: dict[str, Any],
        groups: dict[str, GroupDef],
        effects: dict[str, tuple[ActionMatcher, ...]],
    ) -> LimitDef:
        bad = [k for k in body if k not in _LIMIT_KEYS]
        if bad:
            raise ValueError(f"unknown key {bad[0]!r} (one of {', '.join(sorted(_LIMIT_KEYS))})")
        group = body.get("group")
        if not isinstance(group, str):
            raise ValueError("group is required (the group this limit applies to)")
        if group not in groups:
            raise ValueError(f"unknown group {group!r}")
        kind = body.get("kind")
        if kind not in LIMIT_KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(LIMIT_KINDS)})")
        kind = cast(LimitKind, kind)
        unit = body.get("unit")
        if kind == "budget":
            if unit not in BASE_UNITS and unit not in effects:
                raise ValueError(
                    f"unknown budget unit {unit!r} (tokens, usd, requests, or an effect kind "
                    "declared in [effects])"
                )
        elif unit is not None:
            raise ValueError(f"unit applies to budgets only ({kind} counts requests)")
        else:
            unit = "requests" if kind == "rate" else "slots"
        amount = self._amount(body.get("amount"), unit)
        window: float | None = None
        if kind == "concurrency":
            if "window" in body:
                raise ValueError("a concurrency limit has no window")
        else:
            if "window" not in body:
                raise ValueError(f"window is required for a {kind} limit (e.g. '1h')")
            try:
                window = _duration(body["window"])
            except ValueError as e:
                raise ValueError(f"window {e}") from e
        match: tuple[ActionMatcher, ...] = ()
        if "match" in body:
            raw_match = body["match"]
            if isinstance(raw_match, str) or not isinstance(raw_match, list) or not raw_match:
                raise ValueError("match must be a non-empty list of 'TYPE:RESOURCE' matchers")
            match = tuple(ActionMatcher.parse(m) for m in raw_match)
        on_exceed = body.get("on_exceed", "deny")
        if on_exceed not in ("deny", "escalate"):
            raise ValueError(f"on_exceed must be 'deny' or 'escalate', got {on_exceed!r}")
        quorum = body.get("quorum")
        if on_exceed == "escalate":
            if quorum is None:
                raise ValueError("on_exceed = 'escalate' needs a quorum (e.g. '2 of group:sre')")
            quorum = _check_quorum(quorum, groups)
        elif quorum is not None:
            raise ValueError("quorum applies only with on_exceed = 'escalate'")
        return LimitDef(
            name=name,
            group=group,
            kind=kind,
            unit=unit,
            amount=amount,
            window=window,
            match=match,
            on_exceed=on_exceed,
            quorum=quorum,
        )

    @staticmethod
    def _amount(value: Any, unit: str) -> int:
        if value is None:
            raise ValueError("amount is required")
        if isinstance(value, bool):
            raise ValueError(f"amount must be a number, got {value!r}")
        if unit == "usd":
            if not isinstance(value, int | float | str):
                raise ValueError(f"amount must be a number of USD, got {value!r}")
            try:
                d = Decimal(str(value))
            except InvalidOperation as e:
                raise ValueError(f"amount must be a number of USD, got {value!r}") from e
            if not d.is_finite() or d < 0:
                raise ValueError(f"amount must be a non-negative number, got {value!r}")
            return usd_units(d, up=False)
        if not isinstance(value, int):
            raise ValueError(f"amount must be a non-negative integer, got {value!r}")
        if value < 0:
            raise ValueError(f"amount must be a non-negative integer, got {value!r}")
        return value


_QUORUM_FALLBACK = re.compile(
    r"^\s*\d+\s+of\s+\S+(\s+and\s+\d+\s+of\s+\S+)*(,\s*allow\s+self)?\s*$"
)


def _check_quorum(quorum: Any, groups: Mapping[str, GroupDef]) -> str:
    if not isinstance(quorum, str):
        raise ValueError(f"quorum must be a string such as '2 of group:sre', got {quorum!r}")
    try:
        from tether.policy.quorum import parse_quorum
    except ImportError:  # pragma: no cover - quorum.py is another part; keep a fallback
        if not _QUORUM_FALLBACK.match(quorum):
            raise ValueError(f"invalid quorum {quorum!r}: expected 'N of SELECTOR'") from None
        names = re.findall(r"group:(\S+)", quorum)
        text = quorum.strip()
    else:
        try:
            q = parse_quorum(quorum)
        except Exception as e:
            raise ValueError(f"invalid quorum {quorum!r}: {e}") from e
        names = [c.name for c in q.clauses if c.kind == "group"]
        text = str(q)
    for n in names:
        if n not in groups:
            raise ValueError(f"quorum {quorum!r} names unknown group {n!r}")
    return text


def parse_boundaries(text: str, source: str = "boundaries.toml") -> Boundaries:
    """Parse and validate; raises :class:`BoundariesError` listing every problem."""
    return _Parser(text, source).parse()


def load_boundaries(path: Path) -> Boundaries:
    """Load ``path``; a missing file is an empty config (no groups, no limits)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Boundaries(source=str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise BoundariesError([f"{path.name}: cannot read: {e}"]) from e
    return parse_boundaries(text, str(path))


# -- live reload -----------------------------------------------------------------------------

_Sig = tuple[int, int, int, int] | None


def _signature(path: Path) -> _Sig:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class BoundariesFile:
    """The live boundaries config of one data directory.

    ``current()`` is what every decision calls: it returns the loaded :class:`Boundaries` and,
    at most every ``check_interval`` seconds, ``stat``s the file; when the signature changed it
    re-reads and validates it. A valid file replaces the config (``generation`` increments,
    listeners are called); an invalid one is logged, kept in ``last_error``, and the old
    config stays in force. A missing file is an empty config (deleting the file removes every
    group and limit). The first load raises :class:`BoundariesError` (nothing to fall back on).
    """

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = 0.25,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._sig = _signature(self.path)
        self._current = load_boundaries(self.path)
        self._next_check = monotonic() + check_interval
        self.generation = 0
        self.last_error: str | None = None
        self._listeners: list[Callable[[Boundaries], None]] = []

    def __repr__(self) -> str:
        return f"BoundariesFile({str(self.path)!r}, generation={self.generation})"

    def on_reload(self, fn: Callable[[Boundaries], None]) -> None:
        self._listeners.append(fn)

    def current(self) -> Boundaries:
        if self._monotonic() >= self._next_check:
            self.check()
        return self._current

    def check(self) -> bool:
        """Stat now; reload if the file changed. True when a new config took effect."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is checking; use the current config meanwhile
        try:
            self._next_check = self._monotonic() + self.check_interval
            sig = _signature(self.path)
            if sig == self._sig:
                return False
            self._sig = sig
            try:
                new = load_boundaries(self.path)
            except BoundariesError as e:
                self.last_error = str(e)
                log.warning("boundaries not reloaded, keeping the loaded config: %s", e)
                return False
            self._current = new
            self.generation += 1
            self.last_error = None
            for fn in self._listeners:
                try:
                    fn(new)
                except Exception:
                    log.exception("boundaries reload listener failed")
            return True
        finally:
            self._lock.release()
