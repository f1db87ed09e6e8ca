"""Which groups an identity belongs to: :class:`Groups`, the :class:`GroupIndex` of the core.

Membership rules (``[groups.NAME]`` in ``boundaries.toml``); a token is in a group when *any*
rule matches:

``labels``   the token carries one of these labels (``TokenClaims.labels``; the authority
             copies a grantor's labels into every token it delegates, so a child inherits them)
``grants``   the token holds a grant whose text (``tool:db.add_index``) the pattern matches
             (``tool:db.*``). A broader grant (``tool:*``) is *not* matched by a narrower
             pattern: list it too if broad holders belong
``roots``    the delegation chain starts at one of these SPIFFE IDs (patterns): every token
             delegated from ``alice``, at any depth, is in a group with ``roots = [alice]``
``members``  SPIFFE ID patterns matched against the holder *and every grantor in its chain*:
             an agent delegated by ``indexer-3`` acts for it and counts in its groups, so
             delegating never escapes a group limit
``include``  every member of the named groups (nested; cycles are refused at load)

``delegated = false`` makes a group hold only undelegated tokens (a person's or service's own
token): use it for groups that approve (``quorum = "2 of group:sre"``), so an agent an SRE
delegated is not a second SRE.

``groups_of`` is memoised per token id (a token's claims never change) in a bounded cache
that a reload of the file empties.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase

from tether.identity.claims import TokenClaims
from tether.policy.boundaries import Boundaries, BoundariesSource

__all__ = ["Groups", "compile_groups"]

DEFAULT_CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class _Compiled:
    boundaries: Boundaries
    by_label: dict[str, frozenset[str]]
    grant_rules: tuple[tuple[str, str], ...]  # (pattern, group)
    root_exact: dict[str, frozenset[str]]
    root_patterns: tuple[tuple[str, str], ...]
    member_exact: dict[str, frozenset[str]]
    member_patterns: tuple[tuple[str, str], ...]
    closure: dict[str, frozenset[str]]  # group -> itself and every group that includes it
    holder_only: frozenset[str]  # delegated = false
    cache: dict[str, frozenset[str]]  # token id -> groups, for this config only

    def groups_of(self, claims: TokenClaims) -> frozenset[str]:
        direct: set[str] = set()
        for label in claims.labels:
            direct |= self.by_label.get(label, frozenset())
        if self.grant_rules:
            texts = [str(g) for g in claims.grants.items]
            for pattern, group in self.grant_rules:
                if group not in direct and any(fnmatchcase(t, pattern) for t in texts):
                    direct.add(group)
        if self.root_exact or self.root_patterns:
            root = str(claims.root)
            direct |= self.root_exact.get(root, frozenset())
            for pattern, group in self.root_patterns:
                if fnmatchcase(root, pattern):
                    direct.add(group)
        if self.member_exact or self.member_patterns:
            chain = [str(claims.subject), *(str(g) for g in claims.grantors)]
            for ident in chain:
                direct |= self.member_exact.get(ident, frozenset())
            for pattern, group in self.member_patterns:
                if group not in direct and any(fnmatchcase(i, pattern) for i in chain):
                    direct.add(group)
        out: set[str] = set()
        for g in direct:
            out |= self.closure[g]
        if claims.grantors and self.holder_only:
            out -= self.holder_only
        return frozenset(out)


def _add(index: dict[str, set[str]], key: str, group: str) -> None:
    index.setdefault(key, set()).add(group)


def compile_groups(b: Boundaries) -> _Compiled:
    by_label: dict[str, set[str]] = {}
    root_exact: dict[str, set[str]] = {}
    member_exact: dict[str, set[str]] = {}
    grant_rules: list[tuple[str, str]] = []
    root_patterns: list[tuple[str, str]] = []
    member_patterns: list[tuple[str, str]] = []
    for g in b.groups.values():
        for label in g.labels:
            _add(by_label, label, g.name)
        grant_rules += [(p, g.name) for p in g.grants]
        for p in g.roots:
            if "*" in p:
                root_patterns.append((p, g.name))
            else:
                _add(root_exact, p, g.name)
        for p in g.members:
            if "*" in p:
                member_patterns.append((p, g.name))
            else:
                _add(member_exact, p, g.name)
    # includers[x] = groups that list x in include; closure = transitive includers + self.
    includers: dict[str, set[str]] = {name: set() for name in b.groups}
    for g in b.groups.values():
        for inc in g.include:
            includers[inc].add(g.name)
    closure: dict[str, frozenset[str]] = {}
    for name in b.groups:
        seen = {name}
        todo = [name]
        while todo:
            for up in includers[todo.pop()]:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        closure[name] = frozenset(seen)
    return _Compiled(
        boundaries=b,
        by_label={k: frozenset(v) for k, v in by_label.items()},
        grant_rules=tuple(grant_rules),
        root_exact={k: frozenset(v) for k, v in root_exact.items()},
        root_patterns=tuple(root_patterns),
        member_exact={k: frozenset(v) for k, v in member_exact.items()},
        member_patterns=tuple(member_patterns),
        closure=closure,
        holder_only=frozenset(g.name for g in b.groups.values() if not g.delegated),
        cache={},
    )


class Groups:
    """``GroupIndex`` over a boundaries source (a :class:`BoundariesFile` for live reload,
    or a fixed :class:`Boundaries`)."""

    def __init__(self, source: BoundariesSource, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._source = source
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._compiled = compile_groups(source.current())

    def __repr__(self) -> str:
        return f"Groups({len(self._compiled.boundaries.groups)} groups)"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._source.current().groups)

    def _compiled_now(self) -> _Compiled:
        b = self._source.current()
        c = self._compiled
        if c.boundaries is not b:
            with self._lock:
                if self._compiled.boundaries is not b:
                    self._compiled = compile_groups(b)
                c = self._compiled
        return c

    def groups_of(self, claims: TokenClaims) -> frozenset[str]:
        c = self._compiled_now()
        cache = c.cache
        key = claims.token_id
        hit = cache.get(key)
        if hit is not None:
            return hit
        out = c.groups_of(claims)
        if not key:  # unsigned test claims without an id: never cache
            return out
        if len(cache) >= self._cache_size:
            # evict the oldest entry (dicts keep insertion order); another thread may race
            # us to it, hence pop with a default
            with contextlib.suppress(StopIteration, RuntimeError):
                cache.pop(next(iter(cache)), None)
        cache[key] = out
        return out
