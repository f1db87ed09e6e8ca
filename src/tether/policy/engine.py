"""The Cedar policy engine: Tether's :class:`~tether.policy.interfaces.Authorizer`.

Policies are Cedar, validated against the published schema (``tether.cedarschema``), loaded
from the package's ``defaults.cedar`` and then ``<data>/policies/*.cedar`` sorted by file name.
A file ``<data>/policies/defaults.cedar`` replaces the built-in defaults (an empty one removes
them).

Every policy gets an id: its ``@id("...")`` annotation, or ``FILE:LINE`` of its first line.
Errors name ``FILE:LINE`` too: Cedar parses the concatenated set, so the engine splits each file
into its policies itself (a small scanner that knows strings and comments), keeps the line of
each, and maps Cedar's positional ids (``policy0`` ...) back.

Outcomes. Cedar's ``Allow`` is ``allow`` unless a satisfied permit carries
``@escalate("QUORUM")``: then it is ``escalate`` with that quorum (several escalating permits:
every quorum is required, joined with " and "). Cedar's ``Deny`` is ``deny``; a ``forbid``
always wins. ``@reason("...")`` puts its text in the verdict's reasons.

Hot path. The policy set and schema are parsed once per load, and split per action type; per
request, Cedar is handed only the action's policies whose principal and resource scopes can
match and whose context guards hold (:class:`PolicySlicer`: exact, sliced sets cached). The
per-request entity set (the principal with its groups, and the resource) is parsed once per
distinct (principal, groups, resource) and kept in a bounded LRU; the context is serialised per
call; whole verdicts are cached per policy version, entities and context. The stat-based
change check for live reload runs at most once per ``reload_interval`` and costs the other
decisions one monotonic clock read. Any failure inside :meth:`PolicyEngine.authorize` is a
``deny`` naming the failure, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cedarpy
import orjson
from cedarpy import _internal as _cedar

from tether.config import DataDir
from tether.errors import BadRequest, ConfigError
from tether.identity.claims import TokenClaims
from tether.identity.spiffe import SpiffeId
from tether.policy.action import ACTION_TYPES, GRANT_KIND_OF, Action
from tether.policy.interfaces import Verdict
from tether.policy.schema import (
    ACTION_ENTITY,
    CONTEXT_FIELDS,
    GROUP_TYPE,
    KNOWN_ANNOTATIONS,
    PRINCIPAL_TYPES,
    RESOURCE_TYPE_OF,
    defaults_text,
    schema,
    schema_text,
)

__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_RELOAD_INTERVAL",
    "LoadedPolicies",
    "PolicyEngine",
    "PolicyError",
    "PolicyInfo",
    "PolicyProblem",
    "PolicySource",
    "combine_quorums",
    "load_policies",
    "read_policy_dir",
    "read_policy_file",
    "split_policies",
]

log = logging.getLogger(__name__)

DEFAULT_RELOAD_INTERVAL = 0.25
BUILTIN_SOURCE = "tether:defaults.cedar"
DEFAULTS_OVERRIDE = "defaults.cedar"
GRANTS_POLICY_ID = "tether.grants"
FAIL_CLOSED_ID = "tether:fail-closed"
MAX_FILE_BYTES = 1 << 20
MAX_ID_CHARS = 200

Effect = Literal["permit", "forbid"]


# -- errors ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy set, located as precisely as we can."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class PolicyError(ConfigError):
    """A policy set that failed to parse or validate. ``problems`` lists every ``FILE:LINE``."""

    code = "invalid_policy"

    def __init__(self, problems: Sequence[PolicyProblem]) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        head = "invalid policy set" if n == 1 else f"invalid policy set ({n} problems)"
        super().__init__(
            head + ":\n" + "\n".join(f"  {p}" for p in self.problems),
            hint="fix the file and line named; the previous valid set stays in force",
        )


# -- sources and the scanner --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One policy file: ``name`` is how ids and errors name it (e.g. ``10-prod.cedar``)."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class _Chunk:
    line: int  # the line its first character is on (1-based)
    text: str
    complete: bool  # ends with ';'


def split_policies(text: str) -> list[tuple[int, str]]:
    """Split Cedar policy text into ``(line, text)`` per policy, at top-level ``;``.

    Knows string literals (with escapes) and ``//`` comments, the only places a ``;`` can
    appear that does not end a policy. A trailing unterminated policy is returned too.
    """
    return [(c.line, c.text) for c in _chunks(text)]


def _chunks(text: str) -> list[_Chunk]:
    out: list[_Chunk] = []
    i, n, line = 0, len(text), 1
    start = -1
    start_line = 0
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c in " \t\r\f\v":
            i += 1
            continue
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if start < 0:
            start, start_line = i, line
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < n and text[i] == "\n":
                    line += 1
                i += 1
            i += 1
            continue
        if c == ";":
            out.append(_Chunk(start_line, text[start : i + 1], True))
            start = -1
        i += 1
    if start >= 0:
        out.append(_Chunk(start_line, text[start:].rstrip(), False))
    return out


_EOF = "unexpected end of input"


def _locate_parse_error(chunk: _Chunk) -> tuple[int, str]:
    """The line and message of a parse error inside one policy.

    Cedar's messages carry no position here, so: parse growing prefixes of the policy, line by
    line; the first prefix that fails with something other than "unexpected end of input"
    ends on the offending line.
    """
    try:
        cedarpy.PolicySet.from_str(chunk.text)
        whole = ""
    except ValueError as e:
        whole = str(e)
    lines = chunk.text.split("\n")
    dup = re.fullmatch(r"duplicate annotation: @(\w+)", whole)
    if dup:  # point at the second occurrence
        hits = [i for i, ln in enumerate(lines) if re.search(rf"@{dup.group(1)}\b", ln)]
        if len(hits) > 1:
            return chunk.line + hits[1], whole
    for k in range(1, len(lines)):
        try:
            cedarpy.PolicySet.from_str("\n".join(lines[:k]))
        except ValueError as e:
            msg = str(e)
            if msg != _EOF:
                return chunk.line + k - 1, msg
    if whole == _EOF and not chunk.complete:
        return chunk.line, "policy is not terminated with ';' (unexpected end of input)"
    return chunk.line + len(lines) - 1 if whole != _EOF else chunk.line, whole or "parse error"


# -- the loaded set ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One loaded policy."""

    index: int  # Cedar's positional id is f"policy{index}"
    id: str  # @id, else the location
    location: str  # FILE:LINE
    effect: Effect
    annotations: Mapping[str, str]
    text: str

    @property
    def reason(self) -> str | None:
        return self.annotations.get("reason")

    @property
    def escalate(self) -> str | None:
        return self.annotations.get("escalate")

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "location": self.location,
            "effect": self.effect,
            "annotations": dict(self.annotations),
        }


@dataclass(frozen=True, slots=True)
class LoadedPolicies:
    """A parsed, validated policy set: immutable, swapped in whole on reload.

    ``by_action`` holds, per action type, a pre-parsed set of only the policies whose action
    scope can match it (same decisions as the whole set: a policy whose scope excludes the
    action is never satisfied), so a decision pays only for the policies that concern it.
    ``slicers`` cut that set further per request (see :class:`PolicySlicer`);
    their caches live and die with this object, so a reload starts them afresh.
    """

    policy_set: cedarpy.PolicySet
    by_action: Mapping[str, cedarpy.PolicySet]
    policies: tuple[PolicyInfo, ...]
    by_cedar_id: Mapping[str, PolicyInfo]
    version: str
    sources: tuple[str, ...]
    slicers: Mapping[str, PolicySlicer]
    _mirror: dict[str, cedarpy.PolicySet] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.policies)

    def mirror(self, action_type: str) -> cedarpy.PolicySet:
        """The action's policies with every ``forbid`` turned into a ``permit`` (for explain):
        its Allow reasons are every satisfied policy, whatever its effect."""
        got = self._mirror.get(action_type)
        if got is None:
            got = _subset(self.policy_set, action_type, flip=True)
            self._mirror[action_type] = got
        return got


def _applies(scope: Any, action_type: str) -> bool:
    if isinstance(scope, cedarpy.pst.ActionEq):
        return _is_action(scope.entity, action_type)
    if isinstance(scope, cedarpy.pst.ActionIn):
        return any(_is_action(e, action_type) for e in scope.entities)
    return True  # ScopeAny, or anything newer: keep it (never drop a policy that may apply)


def _is_action(uid: Any, action_type: str) -> bool:
    return bool(uid.id == action_type and uid.type.basename == "Action")


def _subset(policy_set: cedarpy.PolicySet, action_type: str, *, flip: bool = False) -> Any:
    tree = policy_set.to_pst()
    keep = {
        pid: (dataclasses.replace(tpl, effect="permit") if flip else tpl)
        for pid, tpl in tree.static_policies.items()
        if _applies(tpl.action, action_type)
    }
    return cedarpy.PolicySet.from_pst(
        cedarpy.pst.PolicySet(templates={}, static_policies=keep, template_links=())
    )


# -- slicing: only the policies that can apply ----------------------------------------------
#
# Cedar's cost is proportional to the number of policies it is handed (~0.6 us each even when
# the scope cannot match), so a decision is evaluated on the action's policies minus those
# that cannot be satisfied by this request, known without evaluating anything that could
# fail. A policy is conjoined, in this order and short-circuiting, from its principal,
# action and resource scopes and then its clauses in source order. So a policy is dropped,
# exactly (it would be neither satisfied nor raise an error, whatever else the request holds):
#
# * when its principal or resource scope cannot match. Scopes are decided from facts the
#   engine itself puts in the entity set: the principal's only ancestors are its groups, the
#   resource's only ancestors are none (or the principal's groups when the resource is the
#   principal itself). A scope the slicer does not classify (a slot, a newer kind) keeps it;
# * when its first clause is a ``when`` whose leftmost conjunct is ``context has ATTR`` and
#   the request's context lacks ATTR (scopes never raise, so nothing is evaluated before that
#   test). The schema makes policies guard every optional context attribute this way.

_Uid = tuple[str, str]  # (entity type, entity id), exactly as Cedar compares them
_SliceKey = tuple[str, str, frozenset[str], str, str]  # ptype, pid, groups, rtype, rid

SLICE_KEY_CACHE_SIZE = 4096
SLICE_POLICY_BUDGET = 20_000  # policies held in cached sliced sets (~4 KB each in Cedar)
MIN_DROPPED = 2  # a slice that saves fewer policies than this is not worth a parsed set


def _uid(uid: Any) -> _Uid:
    return str(uid.type), str(uid.id)


@dataclass(frozen=True, slots=True)
class _ScopeIndex:
    """Which policies' principal (or resource) scope can hold for an entity, by lookups."""

    always: frozenset[str]  # unconstrained, or a scope we do not classify
    eq: Mapping[_Uid, frozenset[str]]  # ``== uid``
    in_: Mapping[_Uid, frozenset[str]]  # ``in uid``: the entity is uid or below it
    is_: Mapping[str, frozenset[str]]  # ``is Type``
    is_in: Mapping[tuple[str, _Uid], frozenset[str]]  # ``is Type in uid``

    @classmethod
    def build(cls, scopes: Mapping[str, Any]) -> _ScopeIndex:
        always: set[str] = set()
        eq: dict[_Uid, set[str]] = {}
        in_: dict[_Uid, set[str]] = {}
        is_: dict[str, set[str]] = {}
        is_in: dict[tuple[str, _Uid], set[str]] = {}
        pst = cedarpy.pst
        for pid, scope in scopes.items():
            if isinstance(scope, pst.ScopeEq) and isinstance(scope.entity, pst.EntityUid):
                eq.setdefault(_uid(scope.entity), set()).add(pid)
            elif isinstance(scope, pst.ScopeIn) and isinstance(scope.entity, pst.EntityUid):
                in_.setdefault(_uid(scope.entity), set()).add(pid)
            elif isinstance(scope, pst.ScopeIs):
                is_.setdefault(str(scope.entity_type), set()).add(pid)
            elif isinstance(scope, pst.ScopeIsIn) and isinstance(scope.entity, pst.EntityUid):
                key = (str(scope.entity_type), _uid(scope.entity))
                is_in.setdefault(key, set()).add(pid)
            else:  # ScopeAny, a slot, or anything newer: it may match, so it stays
                always.add(pid)
        return cls(frozenset(always), _frozen(eq), _frozen(in_), _frozen(is_), _frozen(is_in))

    def matching(self, uid: _Uid, ancestors: Iterable[_Uid]) -> set[str]:
        """The policies whose scope holds for entity ``uid`` with exactly ``ancestors``."""
        out = set(self.always)
        none: frozenset[str] = frozenset()
        etype = uid[0]
        out |= self.eq.get(uid, none)
        out |= self.is_.get(etype, none)
        for a in (uid, *ancestors):  # ``in`` is reflexive
            out |= self.in_.get(a, none)
            out |= self.is_in.get((etype, a), none)
        return out


def _frozen(d: Mapping[Any, set[str]]) -> dict[Any, frozenset[str]]:
    return {k: frozenset(v) for k, v in d.items()}


def _context_guard(tpl: Any) -> str | None:
    """ATTR if ``tpl``'s first clause is ``when { context has ATTR && ... }``, else None."""
    pst = cedarpy.pst
    if not tpl.clauses or not isinstance(tpl.clauses[0], pst.When):
        return None
    expr = tpl.clauses[0].expr
    while isinstance(expr, pst.BinaryOp) and expr.op == "and":
        expr = expr.left  # ``a && b && c`` is ``(a && b) && c``: a is evaluated first
    if (
        isinstance(expr, pst.HasAttr)
        and isinstance(expr.base, pst.Var)
        and expr.base.name == "context"
        and len(expr.attrs) == 1
    ):
        return str(expr.attrs[0])
    return None


_WHOLE = "*"  # in a reads set: the condition uses ``context`` as a whole value


def _context_reads(tpl: Any) -> frozenset[str]:
    """The context attributes ``tpl``'s conditions read (``context.X``, ``context has X``,
    ``context["X"]``), or a set holding ``_WHOLE`` if one uses ``context`` any other way
    (compared, put in a set or record): then every attribute counts. Scopes never read it."""
    pst = cedarpy.pst
    reads: set[str] = set()
    stack: list[tuple[Any, Any]] = [(c, None) for c in tpl.clauses]
    while stack:
        node, parent = stack.pop()
        if isinstance(node, pst.Var):
            if node.name != "context":
                continue
            if isinstance(parent, pst.GetAttr) and parent.base is node:
                reads.add(parent.attr)
            elif isinstance(parent, pst.HasAttr) and parent.base is node and parent.attrs:
                reads.add(parent.attrs[0])
            else:
                reads.add(_WHOLE)
        elif isinstance(node, Mapping):
            stack.extend((v, parent) for v in node.values())
        elif isinstance(node, tuple):
            stack.extend((v, parent) for v in node)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            stack.extend((getattr(node, f.name), node) for f in dataclasses.fields(node))
    return frozenset(reads)


@dataclass(frozen=True, slots=True)
class Plan:
    """How to decide one request (see :meth:`PolicySlicer.plan`): the parsed set to hand
    Cedar, and the context attributes that set reads (``None``: all of them)."""

    policy_set: cedarpy.PolicySet
    reads: tuple[str, ...] | None
    missing: tuple[str, ...]  # the guarded attributes the context lacks (part of the key)


_ERROR_ID = re.compile(r"^error while evaluating policy `(policy\d+)`")
_UNSEEN: Any = object()


class PolicySlicer:
    """One action's policies, cut per request to those that can apply (see above), as a
    pre-parsed Cedar set.

    Two bounded caches: (principal, groups, resource, context attributes missing) -> the ids
    kept (cheap to compute, from indexes), and an LRU of ids kept -> the parsed set. Parsing
    costs ~15 us a policy, so one set serves every request that keeps the same policies (e.g.
    every agent of a group). A kept-id set is parsed the second time it is needed; the first
    time, the whole action set decides (same answer), so a one-off principal never pays a
    parse. Thread-safe: a race builds a set twice, never a wrong one.
    """

    def __init__(
        self,
        whole: cedarpy.PolicySet,
        templates: Mapping[str, Any],
        order: Mapping[str, int],
        *,
        key_cache_size: int = SLICE_KEY_CACHE_SIZE,
        policy_budget: int = SLICE_POLICY_BUDGET,
    ) -> None:
        self.whole = whole
        self._templates = dict(templates)
        self._order = order
        self._all = frozenset(templates)
        self._principal = _ScopeIndex.build({k: t.principal for k, t in templates.items()})
        self._resource = _ScopeIndex.build({k: t.resource for k, t in templates.items()})
        guards: dict[str, set[str]] = {}
        for pid, tpl in templates.items():
            attr = _context_guard(tpl)
            if attr is not None:
                guards.setdefault(attr, set()).add(pid)
        self._guards = _frozen(guards)
        self._guard_attrs = tuple(sorted(guards))
        self._reads = {pid: _context_reads(tpl) for pid, tpl in templates.items()}
        # conditions on the entities alone: settled once per entity set (see ``plan``)
        self._entity_only = frozenset(pid for pid, r in self._reads.items() if not r)
        self._settled: dict[Any, frozenset[str] | None] = {}
        self._flipped: cedarpy.PolicySet | None = None
        self._plans: dict[tuple[Any, tuple[str, ...]], Plan] = {}
        self.settles = 0  # Cedar calls made to settle entity-only policies (tests, bench)
        self._trivial = not guards and self._all == self._principal.always & self._resource.always
        self._keys: OrderedDict[tuple[_SliceKey, tuple[str, ...]], frozenset[str]] = OrderedDict()
        self._key_cache_size = key_cache_size
        self._sets: OrderedDict[frozenset[str], cedarpy.PolicySet] = OrderedDict()
        self._held = 0
        self._budget = policy_budget
        self._seen: set[frozenset[str]] = set()
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self._lock = threading.Lock()
        self.built = 0  # parsed slices (for tests and the bench)

    def __len__(self) -> int:
        return len(self._all)

    @property
    def ids(self) -> frozenset[str]:
        """Every policy of the action (Cedar ids, ``policyN``)."""
        return self._all

    @property
    def held(self) -> int:
        """Policies held in the cached parsed slices (bounded by the policy budget)."""
        return self._held

    def kept(self, key: _SliceKey, context: Container[str]) -> frozenset[str]:
        """The ids of the policies that can apply to a request on ``key`` (principal type
        and id, groups, resource type and id) whose context has the attributes ``context``
        has."""
        if self._trivial:
            return self._all
        missing = tuple([a for a in self._guard_attrs if a not in context])
        # Hits take no lock (a dict read is atomic) and do not reorder: the key cache evicts
        # first in, first out, since recomputing an evicted key costs a few lookups.
        hit = self._keys.get((key, missing))
        if hit is not None:
            return hit
        ptype, pid, groups, rtype, rid = key
        principal: _Uid = (ptype, pid)
        parents = tuple((GROUP_TYPE, g) for g in groups)
        resource: _Uid = (rtype, rid)
        # the resource is its own entity with no parents, unless it is the principal
        r_parents = parents if resource == principal else ()
        can = self._principal.matching(principal, parents)
        can &= self._resource.matching(resource, r_parents)
        for attr in missing:
            can -= self._guards[attr]
        kept = self._all if len(self._all) - len(can) < MIN_DROPPED else frozenset(can)
        with self._lock:
            # one object per distinct kept set, however many keys share it (a group's agents)
            if len(self._interned) >= self._key_cache_size:
                self._interned.clear()
            kept = self._interned.setdefault(kept, kept)
            self._keys[(key, missing)] = kept
            if len(self._keys) > self._key_cache_size:
                self._keys.popitem(last=False)
        return kept

    def _set_of(self, kept: frozenset[str]) -> cedarpy.PolicySet:
        if kept is self._all:
            return self.whole
        got = self._sets.get(kept)
        if got is not None:
            try:  # noqa: SIM105 - the hot path; suppress() costs more than the move
                self._sets.move_to_end(kept)
            except KeyError:  # evicted by another thread meanwhile
                pass
            return got
        with self._lock:
            if kept not in self._seen:  # first sighting: not worth a parse yet
                if len(self._seen) >= self._key_cache_size:
                    self._seen.clear()
                self._seen.add(kept)
                return self.whole
        got = self._build(kept)
        with self._lock:
            self._seen.discard(kept)
            if kept not in self._sets:
                self._sets[kept] = got
                self._held += len(kept)
                while self._held > self._budget and len(self._sets) > 1:
                    _, old = self._sets.popitem(last=False)
                    self._held -= len(old)
        return got

    def plan(
        self,
        entity_key: Any,
        context: Mapping[str, Any],
        request: Mapping[str, Any],
        entities: Any,
    ) -> Plan:
        """The set to decide ``request`` (principal, action, resource; no context) with, on
        ``entities`` (a function of ``entity_key``, whose fields 0, 1, 6, 7, 8 are the slice
        key), and the context attributes it reads. Exact, on top of :meth:`kept`:

        * a policy whose conditions never read the context is satisfied or not, or raises or
          not, by the entities alone. From an entity set's second decision on, those that are
          neither satisfied nor raising are dropped (settled by one Cedar call on them all,
          every one turned into a permit so that every satisfied one is named);
        * Cedar is handed only the context attributes the set's policies read: the others
          cannot change a satisfied policy, an error or a decision.

        Cached per (entity key, guarded attributes missing) once both steps are settled.
        """
        missing = tuple([a for a in self._guard_attrs if a not in context])
        plans = self._plans
        hit = plans.get((entity_key, missing))
        if hit is not None:
            return hit
        k = entity_key
        kept = self.kept((k[0], k[1], k[6], k[7], k[8]), context)
        final = True
        if kept & self._entity_only:
            live = self._settle(entity_key, request, entities)
            if live is None:
                final = False  # first sighting: keep them all (same answer)
            else:
                kept = frozenset((kept - self._entity_only) | (kept & live))
                if kept == self._all:
                    kept = self._all
                else:
                    with self._lock:
                        kept = self._interned.setdefault(kept, kept)
        policy_set = self._set_of(kept)
        if policy_set is self.whole:
            final = final and kept is self._all
            kept = self._all
        reads: set[str] = set()
        for pid in kept:
            reads |= self._reads[pid]
        got = Plan(policy_set, None if _WHOLE in reads else tuple(sorted(reads)), missing)
        if final:
            with self._lock:
                if len(plans) >= self._key_cache_size:
                    plans.clear()
                plans[(entity_key, missing)] = got
        return got

    def _settle(
        self, entity_key: Any, request: Mapping[str, Any], entities: Any
    ) -> frozenset[str] | None:
        """The entity-only policies that are satisfied or raise for this entity set (the
        others are certain to do neither); None the first time a key is seen, so a one-off
        principal costs no extra Cedar call."""
        got = self._settled.get(entity_key, _UNSEEN)
        if got is not None and got is not _UNSEEN:
            return got  # type: ignore[no-any-return]
        if got is _UNSEEN:
            with self._lock:
                if len(self._settled) >= self._key_cache_size:
                    self._settled.clear()
                self._settled[entity_key] = None
            return None
        if self._flipped is None:
            self._flipped = self._build(self._entity_only, flip=True)
        self.settles += 1
        response = orjson.loads(
            _cedar.is_authorized({**request, "context": "{}"}, self._flipped, entities, None, False)
        )
        diag = response.get("diagnostics") or {}
        live = set(diag.get("reason", ()))
        for err in diag.get("errors") or ():
            m = _ERROR_ID.match(str(err))
            if m is None:  # not tied to one policy: keep them all
                live = set(self._entity_only)
                break
            live.add(m.group(1))
        if response.get("decision") not in ("Allow", "Deny"):
            live = set(self._entity_only)
        out = frozenset(live)
        with self._lock:
            self._settled[entity_key] = out
        return out

    def _build(self, kept: frozenset[str], *, flip: bool = False) -> cedarpy.PolicySet:
        # in load order, so Cedar reports errors in the order the whole set would
        ids = sorted(kept, key=self._order.__getitem__)
        tpls = {pid: self._templates[pid] for pid in ids}
        if flip:
            tpls = {pid: dataclasses.replace(t, effect="permit") for pid, t in tpls.items()}
        else:
            self.built += 1
        return cedarpy.PolicySet.from_pst(
            cedarpy.pst.PolicySet(templates={}, static_policies=tpls, template_links=())
        )


def _slicers(
    policy_set: cedarpy.PolicySet, by_action: Mapping[str, Any]
) -> dict[str, PolicySlicer]:
    tree = policy_set.to_pst()
    order = {pid: int(pid.removeprefix("policy")) for pid in tree.static_policies}
    return {
        a: PolicySlicer(
            whole,
            {pid: tpl for pid, tpl in tree.static_policies.items() if _applies(tpl.action, a)},
            order,
        )
        for a, whole in by_action.items()
    }


def _quorum_problem(text: str) -> str | None:
    """Why ``text`` is not a valid quorum expression, or None."""
    if not text.strip():
        return '@escalate needs a quorum, e.g. @escalate("2 of group:sre")'
    try:
        from tether.policy.quorum import parse_quorum
    except ImportError:  # pragma: no cover - quorum.py ships with the engine
        if _QUORUM_FALLBACK.match(text.strip()):
            return None
        return f"invalid quorum {text[:80]!r}"
    try:
        parse_quorum(text)
    except BadRequest as e:
        return f"@escalate: {e.message}"
    return None


_QUORUM_FALLBACK = re.compile(
    r"^\d+ of (group:[\w.:/@-]+|human|agent|user:[\w.-]+|agent:[\w.-]+)"
    r"( and \d+ of (group:[\w.:/@-]+|human|agent|user:[\w.-]+|agent:[\w.-]+))*$"
)


def combine_quorums(quorums: Iterable[str]) -> str:
    """Several escalating permits matched: every quorum is required. Joined with " and "
    (duplicates once); ", allow self" survives only if every part allows it."""
    parts: list[str] = []
    allow_self = True
    any_part = False
    for q in quorums:
        any_part = True
        body, sep, _ = q.partition(",")
        if not (sep and re.fullmatch(r",\s*allow\s+self\s*", q[len(body) :])):
            allow_self = False
        for clause in re.split(r"\s+and\s+", body.strip()):
            if clause and clause not in parts:
                parts.append(clause)
    text = " and ".join(parts)
    return f"{text}, allow self" if any_part and allow_self and text else text


def load_policies(sources: Sequence[PolicySource]) -> LoadedPolicies:
    """Parse and validate ``sources`` as one set. Raises :class:`PolicyError` naming every
    problem's ``FILE:LINE``; never returns a partial set."""
    problems: list[PolicyProblem] = []
    infos: list[PolicyInfo] = []
    texts: list[str] = []
    seen_ids: dict[str, str] = {}
    for src in sources:
        for chunk in _chunks(src.text):
            loc = f"{src.name}:{chunk.line}"
            try:
                tree = cedarpy.policies_to_pst(chunk.text)
            except ValueError:
                at, why = _locate_parse_error(chunk)
                problems.append(PolicyProblem(src.name, at, f"syntax error: {why}"))
                continue
            if tree.templates or tree.template_links:
                problems.append(
                    PolicyProblem(
                        src.name,
                        chunk.line,
                        "templates (?principal / ?resource slots) are not supported",
                    )
                )
                continue
            if len(tree.static_policies) != 1:  # pragma: no cover - the scanner splits at ';'
                problems.append(PolicyProblem(src.name, chunk.line, "expected one policy"))
                continue
            tpl = next(iter(tree.static_policies.values()))
            ann = dict(tpl.annotations)
            bad = _annotation_problems(tpl.effect, ann)
            problems += [PolicyProblem(src.name, chunk.line, m) for m in bad]
            pid = ann.get("id", loc)
            if "id" in ann:
                if not pid.strip() or len(pid) > MAX_ID_CHARS:
                    problems.append(
                        PolicyProblem(src.name, chunk.line, "@id must be 1-200 characters")
                    )
                elif pid in seen_ids:
                    problems.append(
                        PolicyProblem(
                            src.name,
                            chunk.line,
                            f'duplicate @id("{pid}") (also at {seen_ids[pid]})',
                        )
                    )
                seen_ids.setdefault(pid, loc)
            if bad:
                continue
            infos.append(PolicyInfo(len(infos), pid, loc, tpl.effect, ann, chunk.text))
            texts.append(chunk.text)
    if problems:
        raise PolicyError(problems)
    combined = "\n".join(texts)
    by_cedar_id = {f"policy{p.index}": p for p in infos}
    result = cedarpy.validate_policies(combined, schema())
    if not result.validation_passed:
        raise PolicyError(_validation_problems(result.errors, by_cedar_id))
    policy_set = cedarpy.PolicySet.from_str(combined)
    if len(policy_set) != len(infos):  # pragma: no cover - guards the id mapping
        raise PolicyError([PolicyProblem("<policy set>", None, "policy count mismatch")])
    h = hashlib.sha256()
    for part in (schema_text(), *(x for s in sources for x in (s.name, s.text))):
        b = part.encode()
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    by_action = {a: _subset(policy_set, a) for a in ACTION_TYPES}
    return LoadedPolicies(
        policy_set,
        by_action,
        tuple(infos),
        by_cedar_id,
        h.hexdigest(),
        tuple(s.name for s in sources),
        _slicers(policy_set, by_action),
    )


_IDENTITY_TYPE_IN_MSG = re.compile(r"entity type `Tether::(?:User|Agent|Beam|Service)`")


def _validation_problems(
    errors: Iterable[cedarpy.ValidationError], by_cedar_id: Mapping[str, PolicyInfo]
) -> list[PolicyProblem]:
    """Cedar's validation errors located at FILE:LINE. One error reported once per identity
    type (``principal.x`` on four types) is folded into one line."""
    problems: list[PolicyProblem] = []
    seen: set[tuple[str, str]] = set()
    for err in errors:
        info = by_cedar_id.get(err.policy_id)
        msg = err.error
        line: int | None = None
        file = "<policy set>"
        if info is not None:
            file, _, ln = info.location.rpartition(":")
            line = int(ln)
            msg = msg.replace(f"`{err.policy_id}`", f"`{info.id}`")
            msg = msg.removeprefix(f"for policy `{info.id}`, ")
        key = (file + str(line), _IDENTITY_TYPE_IN_MSG.sub("entity type", msg))
        if key in seen:
            continue
        if key[1] != msg:
            msg = key[1].replace("entity type", "the identity types (User, Agent, Beam, Service)")
        seen.add(key)
        problems.append(PolicyProblem(file, line, f"invalid against the schema: {msg}"))
    return problems


def _annotation_problems(effect: str, ann: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for name in ann:
        if name not in KNOWN_ANNOTATIONS:
            known = ", ".join(f"@{k}" for k in sorted(KNOWN_ANNOTATIONS))
            out.append(f"unknown annotation @{name} (known: {known})")
    if "escalate" in ann:
        if effect != "permit":
            out.append("@escalate on a forbid: a forbid always denies, only a permit escalates")
        else:
            why = _quorum_problem(ann["escalate"])
            if why:
                out.append(why)
    return out


def read_policy_dir(
    policy_dir: Path | None, *, builtin_defaults: bool = True
) -> list[PolicySource]:
    """The sources a data dir's policy directory stands for, in load order."""
    files = _policy_files(policy_dir)
    sources: list[PolicySource] = []
    if builtin_defaults and not any(p.name == DEFAULTS_OVERRIDE for p in files):
        sources.append(PolicySource(BUILTIN_SOURCE, defaults_text()))
    sources += [read_policy_file(p) for p in files]
    return sources


def read_policy_file(path: Path, name: str | None = None) -> PolicySource:
    label = name or path.name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError([PolicyProblem(label, None, f"cannot read: {e.strerror}")]) from e
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError([PolicyProblem(label, None, f"larger than {MAX_FILE_BYTES} bytes")])
    try:
        return PolicySource(label, data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError([PolicyProblem(label, line, "not valid UTF-8")]) from e


def _policy_files(policy_dir: Path | None) -> list[Path]:
    if policy_dir is None or not policy_dir.is_dir():
        return []
    return sorted(
        (p for p in policy_dir.iterdir() if p.suffix == ".cedar" and p.is_file()),
        key=lambda p: p.name,
    )


def _fingerprint(policy_dir: Path | None) -> tuple[tuple[str, int, int, int], ...]:
    if policy_dir is None:
        return ()
    try:
        entries = list(os.scandir(policy_dir))
    except FileNotFoundError:
        return ()
    out = []
    for e in entries:
        if e.name.endswith(".cedar"):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            out.append((e.name, st.st_mtime_ns, st.st_size, st.st_ino))
    out.sort()
    return tuple(out)


# -- requests ----------------------------------------------------------------------------


def _host_of(domain: str) -> str:
    host, sep, port = domain.rpartition(":")
    return host if sep and port.isdigit() else domain


def _identity_type(resource: str) -> str:
    try:
        kind = SpiffeId.parse(resource).kind
    except BadRequest as e:
        raise BadRequest(f"resource {resource[:120]!r} is not a SPIFFE ID: {e.message}") from e
    return PRINCIPAL_TYPES[kind]


_EntityKey = tuple[str, str, str, int, str, tuple[str, ...], frozenset[str], str, str]
# policy version, action type, entity key, request context (JSON), token id, granted_by
_VerdictKey = tuple[str, str, _EntityKey, tuple[str, ...], str, str, str]


def _entities_json(key: _EntityKey) -> str:
    ptype, pid, root, depth, task, labels, groups, rtype, rid = key
    ents: list[dict[str, Any]] = [
        {
            "uid": {"type": ptype, "id": pid},
            "attrs": {"name": pid, "root": root, "depth": depth, "task": task, "labels": labels},
            "parents": [{"type": GROUP_TYPE, "id": g} for g in sorted(groups)],
        }
    ]
    if (rtype, rid) != (ptype, pid):
        attrs: dict[str, Any] = {"name": rid}
        if rtype.endswith("::HttpService"):
            attrs["service"] = rid.partition("/")[0]
        elif rtype.endswith("::Domain"):
            attrs["host"] = _host_of(rid)
        elif rtype in _IDENTITY_TYPES:
            # a delegatee or a new beam: it will sit one hop below the principal, same root
            attrs.update(root=root, depth=depth + 1, task=task, labels=())
        ents.append({"uid": {"type": rtype, "id": rid}, "attrs": attrs, "parents": []})
    return orjson.dumps(ents).decode()


_IDENTITY_TYPES = frozenset(PRINCIPAL_TYPES.values())


def _make_entities_cache(size: int) -> Callable[[_EntityKey], tuple[Any, dict[str, Any]]]:
    @lru_cache(maxsize=size)
    def entities(key: _EntityKey) -> tuple[Any, dict[str, Any]]:
        """The parsed entity set, and the request's principal and resource uids."""
        return _cedar.Entities.from_json_str(_entities_json(key)), {
            "principal": {"type": key[0], "id": key[1]},
            "resource": {"type": key[7], "id": key[8]},
        }

    return entities


_LONG_MIN, _LONG_MAX = -(2**63), 2**63


def _coerce_context(ctx: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Copy the schema's context attributes from ``ctx`` into ``out``, checked against their
    types (``BadRequest`` naming the first that is wrong); a set of strings is sorted."""
    for k, v in ctx.items():
        typ = CONTEXT_FIELDS.get(k)
        if typ is None:
            continue  # not in the schema: Cedar never sees it
        t = type(v)  # exact types first: the common case costs one comparison
        if typ == "Long":
            ok = (t is int or (isinstance(v, int) and t is not bool)) and (
                _LONG_MIN <= v < _LONG_MAX
            )
        elif typ == "Bool":
            ok = t is bool
        elif typ == "String":
            ok = t is str or isinstance(v, str)
        elif isinstance(v, list | tuple | set | frozenset) and all(isinstance(x, str) for x in v):
            v = sorted(set(v)) if v else []
            ok = True
        else:
            ok = False
        if not ok:
            raise BadRequest(f"context.{k} must be a {typ}, got {type(v).__name__}")
        out[k] = v


# -- the engine --------------------------------------------------------------------------


class PolicyEngine:
    """Cedar policies -> allow / deny / escalate. Implements :class:`Authorizer`.

    Construct with :meth:`from_data_dir` (``<data>/policies``, live reload) or with explicit
    ``sources`` (tests, ``tether policy validate FILE``). Raises :class:`PolicyError` if the
    initial set is invalid; later reloads never replace a valid set with an invalid one.
    """

    def __init__(
        self,
        policy_dir: Path | None = None,
        *,
        sources: Sequence[PolicySource] | None = None,
        builtin_defaults: bool = True,
        reload_interval: float | None = DEFAULT_RELOAD_INTERVAL,
        entity_cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy_dir = policy_dir
        self.builtin_defaults = builtin_defaults
        self._fixed_sources = None if sources is None else list(sources)
        self._interval = reload_interval if policy_dir is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._entities = _make_entities_cache(entity_cache_size)
        self._verdicts: dict[_VerdictKey, Verdict] = {}
        self._verdicts_max = entity_cache_size
        self._shapes: dict[tuple[Any, ...], Verdict] = {}
        self.last_error: PolicyError | None = None
        self.reloads = 0
        self._fp = _fingerprint(policy_dir)
        self._loaded = load_policies(self._sources())
        self._next_check = time.monotonic() + (self._interval or 0.0)

    @classmethod
    def from_data_dir(cls, data: DataDir | Path, **kwargs: Any) -> PolicyEngine:
        root = data if isinstance(data, DataDir) else DataDir(data)
        return cls(root.policies, **kwargs)

    # -- the loaded set ----------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def loaded(self) -> LoadedPolicies:
        return self._loaded

    @property
    def policies(self) -> tuple[PolicyInfo, ...]:
        return self._loaded.policies

    def _sources(self) -> list[PolicySource]:
        if self._fixed_sources is not None:
            extra = (
                [PolicySource(BUILTIN_SOURCE, defaults_text())]
                if self.builtin_defaults
                and not any(s.name == DEFAULTS_OVERRIDE for s in self._fixed_sources)
                else []
            )
            return extra + self._fixed_sources
        return read_policy_dir(self.policy_dir, builtin_defaults=self.builtin_defaults)

    def reload(self) -> bool:
        """Re-read the policy directory now. Returns True if a new set was loaded.

        On an invalid set: the loaded set stays in force, :attr:`last_error` holds the
        error, and it is raised.
        """
        with self._lock:
            return self._reload_locked(force=True)

    def _reload_locked(self, *, force: bool) -> bool:
        fp = _fingerprint(self.policy_dir)
        if not force and fp == self._fp:
            return False
        self._fp = fp
        try:
            new = load_policies(self._sources())
        except PolicyError as e:
            if self.last_error is None or str(self.last_error) != str(e):
                log.warning("policy reload refused; keeping version %s: %s", self.version[:12], e)
            self.last_error = e
            raise
        self.last_error = None
        if new.version == self._loaded.version:
            return False
        self._loaded = new
        self.reloads += 1
        log.info("policies reloaded: %d policies, version %s", len(new), new.version[:12])
        return True

    def check_for_changes(self) -> bool:
        """The live-reload check: stat the directory, reload if anything changed."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is at it; decide with the current set
        try:
            return self._reload_locked(force=False)
        except PolicyError:
            return False
        finally:
            self._next_check = time.monotonic() + (self._interval or 0.0)
            self._lock.release()

    # -- deciding ----------------------------------------------------------------------

    def authorize(
        self, action: Action, groups: frozenset[str], *, granted: bool | None = None
    ) -> Verdict:
        """Decide ``action`` for a principal in ``groups``. Never raises."""
        if self._interval is not None and time.monotonic() >= self._next_check:
            self.check_for_changes()
        loaded = self._loaded
        try:
            slicer = loaded.slicers.get(action.type)
            if slicer is None:
                raise BadRequest(f"unknown action type {action.type!r}")
            key, ctx = self._key_and_context(action, groups, granted)
            entities, uids = self._entities(key)
            request = {**uids, "action": {"type": ACTION_ENTITY, "id": action.type}}
            plan = slicer.plan(key, ctx, request, entities)
            reads = plan.reads
            if reads is not None:  # only what the policies read (exact: see ``plan``)
                ctx = {a: ctx[a] for a in reads if a in ctx}
            context = orjson.dumps(ctx).decode()
            # A verdict is a pure function of the policy set, the entities (a function of
            # ``key``) and the context the plan reads, so repeated calls reuse it until a
            # reload, also when they differ in attributes no policy reads.
            memo = (
                loaded.version,
                action.type,
                key,
                plan.missing,
                context,
                # the reason text names the token's matching grant, and a JIT grant
                action.principal.token_id,
                str(action.context.get("granted_by", "")),
            )
            cached = self._verdicts.get(memo)
            if cached is not None:
                return cached
            request["context"] = context
            response: dict[str, Any] = orjson.loads(
                _cedar.is_authorized(request, plan.policy_set, entities, None, False)
            )
            verdict = self._verdict_of(loaded, action, response)
            self._remember(memo, verdict)
            return verdict
        except Exception as e:  # fail closed
            msg = e.message if isinstance(e, BadRequest) else f"{type(e).__name__}: {e}"
            return Verdict(
                "deny",
                (f"policy evaluation failed ({msg}); denied (fail closed)",),
                (FAIL_CLOSED_ID,),
                loaded.version,
            )

    def _remember(self, memo: _VerdictKey, verdict: Verdict) -> None:
        cache = self._verdicts
        if len(cache) >= self._verdicts_max:
            # full: start afresh (cheaper per decision than keeping an LRU order; a verdict
            # costs one Cedar call to have again)
            cache.clear()
        cache[memo] = verdict

    def _request(
        self, action: Action, groups: frozenset[str], granted: bool | None
    ) -> tuple[dict[str, Any], Any]:
        request, entities, _, _ = self._request_parts(action, groups, granted)
        return request, entities

    def _request_parts(
        self, action: Action, groups: frozenset[str], granted: bool | None
    ) -> tuple[dict[str, Any], Any, _EntityKey, dict[str, Any]]:
        """The Cedar request with the whole context, the entities handle, the entities'
        cache key, the context (for explain, tests and the bench; ``authorize`` hands Cedar
        only what its plan reads)."""
        key, ctx = self._key_and_context(action, groups, granted)
        entities, uids = self._entities(key)
        request = {
            **uids,
            "action": {"type": ACTION_ENTITY, "id": action.type},
            "context": orjson.dumps(ctx).decode(),
        }
        return request, entities, key, ctx

    def _key_and_context(
        self, action: Action, groups: frozenset[str], granted: bool | None
    ) -> tuple[_EntityKey, dict[str, Any]]:
        """The entities' cache key, and the whole context (checked against the schema)."""
        claims: TokenClaims = action.principal
        subject = claims.subject
        atype = action.type
        rtype = RESOURCE_TYPE_OF.get(atype)
        if rtype is None:
            if atype != "identity.delegate":
                raise BadRequest(f"unknown action type {atype!r}")
            rtype = _identity_type(action.resource)
        key: _EntityKey = (
            PRINCIPAL_TYPES[subject.kind],
            str(subject),
            str(claims.root),
            len(claims.grantors),
            claims.task or "",
            tuple(getattr(claims, "labels", ())),
            groups,
            rtype,
            action.resource,
        )
        ctx: dict[str, Any] = {}
        if action.effects and "effects" not in action.context:
            ctx["effects"] = sorted(action.effects)
        if action.cost.tokens and "estimated_tokens" not in action.context:
            ctx["estimated_tokens"] = action.cost.tokens
        if action.context:
            _coerce_context(action.context, ctx)
        if granted is not None:
            ctx["granted"] = bool(granted)
        elif "granted" not in ctx:
            ctx["granted"] = action.granted
        ctx["hour"] = int(self._clock() // 3600) % 24  # time.gmtime(...).tm_hour, cheaper
        return key, ctx

    def _verdict_of(
        self, loaded: LoadedPolicies, action: Action, response: dict[str, Any]
    ) -> Verdict:
        """:meth:`_verdict`, reused across requests with the same Cedar outcome: most
        decisions differ in their context, not in which policies were satisfied. The key
        holds everything :meth:`_verdict` reads."""
        diag = response.get("diagnostics") or {}
        shape = (
            loaded.version,
            response.get("decision"),
            tuple(diag.get("reason", ())),
            tuple(diag.get("errors") or ()),
            action.type,
            action.resource,
            # the permit reason names the token's matching grant: a token's grants are fixed
            action.principal.token_id,
            action.context.get("granted_by"),
        )
        cache = self._shapes
        got = cache.get(shape)
        if got is None:
            got = self._verdict(loaded, action, response)
            if len(cache) >= self._verdicts_max:
                cache.clear()
            cache[shape] = got
        return got

    def _verdict(self, loaded: LoadedPolicies, action: Action, response: dict[str, Any]) -> Verdict:
        diag = response.get("diagnostics") or {}
        by_id = loaded.by_cedar_id
        hits = sorted((by_id[r] for r in diag.get("reason", ())), key=lambda p: p.index)
        errors = diag.get("errors") or ()
        decision = response.get("decision")
        if errors and decision == "Allow":
            # A forbid that errored might have denied: fail closed rather than skip it.
            bad = [p for p in loaded.policies if p.effect == "forbid" and _named_in(p, errors)]
            if bad:
                return Verdict(
                    "deny",
                    tuple(
                        f"forbid {p.id} could not be evaluated; denied (fail closed)" for p in bad
                    )
                    + tuple(_rename_ids(str(e), loaded) for e in errors),
                    tuple(p.id for p in bad),
                    loaded.version,
                )
        if decision == "Allow":
            escalating = [p for p in hits if p.escalate is not None]
            if escalating:
                quorum = combine_quorums(p.escalate or "" for p in escalating)
                return Verdict(
                    "escalate",
                    tuple(
                        f"escalation required by {p.id} ({p.escalate})"
                        + (f": {p.reason}" if p.reason else "")
                        for p in escalating
                    ),
                    tuple(p.id for p in escalating),
                    loaded.version,
                    quorum,
                )
            return Verdict(
                "allow",
                tuple(self._permit_reason(p, action) for p in hits),
                tuple(p.id for p in hits),
                loaded.version,
            )
        if hits:
            return Verdict(
                "deny",
                tuple(f"forbidden by {p.id}" + (f": {p.reason}" if p.reason else "") for p in hits),
                tuple(p.id for p in hits),
                loaded.version,
            )
        rtype = RESOURCE_TYPE_OF.get(action.type) or _identity_type(action.resource)
        reasons = [
            f"no policy permits {action.type} on {rtype.rpartition('::')[2]}::"
            f'"{action.resource}" (default deny)'
        ]
        kind = GRANT_KIND_OF.get(action.type)
        if kind is not None and not action.granted:
            reasons.append(f"the token holds no {kind} grant matching {action.resource!r}")
        return Verdict("deny", tuple(reasons), (), loaded.version)

    @staticmethod
    def _permit_reason(p: PolicyInfo, action: Action) -> str:
        if p.reason:
            return f"{p.reason} ({p.id})" if p.id != GRANTS_POLICY_ID else p.reason
        if p.id == GRANTS_POLICY_ID:
            kind = GRANT_KIND_OF.get(action.type)
            if kind is not None:
                for g in action.principal.grants.of_kind(kind):
                    if g.matches(action.resource):
                        return f"permitted by token grant {g}"
            if action.context.get("granted_by") == "jit":
                return "permitted by a just-in-time grant"
            return "permitted by grant (granted by the caller)"
        return f"permitted by {p.id}"

    # -- explaining --------------------------------------------------------------------

    def explain(
        self, action: Action, groups: frozenset[str], *, granted: bool | None = None
    ) -> dict[str, Any]:
        """Every policy the action satisfies (permits and forbids, with their locations,
        annotations and reasons), evaluation errors, and the final verdict."""
        loaded = self._loaded
        verdict = self.authorize(action, groups, granted=granted)
        out: dict[str, Any] = {
            "action": action.summary(),
            "groups": sorted(groups),
            "verdict": {
                "outcome": verdict.outcome,
                "reasons": list(verdict.reasons),
                "policies": list(verdict.policies),
                "quorum": verdict.quorum,
                "policy_version": verdict.policy_version,
            },
            "policy_count": len(loaded),
            "sources": list(loaded.sources),
            "satisfied": [],
            "errors": [],
        }
        try:
            request, entities = self._request(action, groups, granted)
        except Exception as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
            return out
        out["request"] = {
            "principal": request["principal"],
            "action": request["action"],
            "resource": request["resource"],
            "context": orjson.loads(request["context"]),
            "entities": orjson.loads(str(entities)),
        }
        response = orjson.loads(
            _cedar.is_authorized(request, loaded.mirror(action.type), entities, None, False)
        )
        diag = response.get("diagnostics") or {}
        determining = set(verdict.policies)
        for p in sorted(
            (loaded.by_cedar_id[r] for r in diag.get("reason", ())), key=lambda p: p.index
        ):
            doc = p.summary()
            doc["reason"] = p.reason
            doc["escalate"] = p.escalate
            doc["determining"] = p.id in determining
            out["satisfied"].append(doc)
        for problem in diag.get("errors") or ():
            out["errors"].append(_rename_ids(str(problem), loaded))
        return out


def _named_in(p: PolicyInfo, errors: Iterable[Any]) -> bool:
    tag = f"`policy{p.index}`"
    return any(tag in str(e) for e in errors)


def _rename_ids(text: str, loaded: LoadedPolicies) -> str:
    return re.sub(
        r"`(policy\d+)`",
        lambda m: (
            f"`{loaded.by_cedar_id[m.group(1)].id}`"
            if m.group(1) in loaded.by_cedar_id
            else m.group(0)
        ),
        text,
    )
