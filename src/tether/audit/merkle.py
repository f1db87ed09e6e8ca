"""The RFC 9162 (Certificate Transparency v2) section 2.1 Merkle tree, as pure functions.

No I/O here: the store persists what :class:`TreeBuilder` hands it and answers the node
look-ups :func:`assemble` asks for; everything else is arithmetic on ranges.

Vocabulary:

* a *leaf* is the RFC 9162 leaf hash ``SHA-256(0x00 || data)`` (32 bytes), never raw data;
* a :data:`Node` ``(level, index)`` is the complete aligned subtree over leaves
  ``[index * 2**level, (index + 1) * 2**level)``; level 0 nodes are leaf hashes;
* a *range* ``(start, end)`` is a half-open run of leaves whose MTH a proof needs. The ranges
  RFC 9162 proofs use always start on a multiple of a power of two at least as large as the range,
  so each is the concatenation of a few complete nodes (:func:`range_nodes`) and its MTH is their
  right fold (:func:`fold`). That is what lets a store answer any proof with one batched node query.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

from tether.errors import StoreError, VerificationFailed

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Node",
    "TreeBuilder",
    "assemble",
    "consistency_ranges",
    "fold",
    "inclusion_ranges",
    "leaf_hash",
    "node_hash",
    "range_nodes",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]

Node = tuple[int, int]
"""``(level, index)``: the subtree over leaves ``[index << level, (index + 1) << level)``."""

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()
"""MTH of the empty tree: ``e3b0c442...``."""

_sha256 = hashlib.sha256
_NODE_PREFIX = b"\x01"
_LEAF_STATE = hashlib.sha256(b"\x00")  # copied per leaf: cheaper than concatenating a long entry


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash a leaf is known by in the tree."""
    h = _LEAF_STATE.copy()
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: an interior node."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``): where MTH splits."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(start: int, end: int) -> list[Node]:
    """The complete aligned subtrees, largest first, whose concatenation is ``[start, end)``.

    Defined for the ranges RFC 9162 proofs and MTH splits produce: ``start`` must be a multiple of
    a power of two that is at least ``end - start`` (``start == 0`` always qualifies). The sizes are
    then the binary digits of ``end - start``, from the most significant down.
    """
    length = end - start
    if start < 0 or length < 0:
        raise ValueError(f"invalid leaf range [{start}, {end})")
    if length and start % (1 << (length - 1).bit_length()):
        raise ValueError(f"leaf range [{start}, {end}) is not aligned as an MTH subtree")
    nodes: list[Node] = []
    pos = start
    for level in range(length.bit_length() - 1, -1, -1):
        if length >> level & 1:
            nodes.append((level, pos >> level))
            pos += 1 << level
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The MTH of a range from the hashes of its :func:`range_nodes`, in the same order.

    MTH splits a range at its largest power of two, which is exactly its first node, so the
    MTH is the right fold ``node_hash(h0, node_hash(h1, ... node_hash(h[-2], h[-1])))``.
    An empty range has the empty tree's hash.
    """
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = _sha256(_NODE_PREFIX + h + acc).digest()
    return acc


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """The reference MTH over all ``leaf_hashes``, computed level by level (no recursion).

    Pairing neighbours on each level and carrying an odd last node up unchanged builds the
    same left-balanced tree as RFC 9162's split at the largest power of two.
    """
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    sha, prefix = _sha256, _NODE_PREFIX
    while len(level) > 1:
        nxt = [sha(prefix + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The ranges whose MTHs form the RFC 9162 PATH(index, D[size]), bottom-up in proof order."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    top_down: list[tuple[int, int]] = []
    lo, n, m = 0, size, index
    while n > 1:
        k = _split(n)
        if m < k:
            top_down.append((lo + k, lo + n))
            n = k
        else:
            top_down.append((lo, lo + k))
            lo, n, m = lo + k, n - k, m - k
    top_down.reverse()
    return top_down


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The ranges whose MTHs form the RFC 9162 PROOF(old_size, D[new_size]) (section 2.1.4).

    Empty when ``old_size`` is 0 or equal to ``new_size``: nothing needs proving.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    trailing: list[tuple[int, int]] = []
    lo, n, m, whole = 0, new_size, old_size, True
    while m != n:
        k = _split(n)
        if m <= k:
            trailing.append((lo + k, lo + n))
            n = k
        else:
            trailing.append((lo, lo + k))
            lo, n, m, whole = lo + k, n - k, m - k, False
    # SUBPROOF(m, D[m], b): nothing if the old tree is this whole subtree, else its MTH.
    ranges = [] if whole else [(lo, lo + n)]
    ranges.extend(reversed(trailing))
    return ranges


def assemble(
    ranges: Sequence[tuple[int, int]],
    get: Callable[[Sequence[Node]], Mapping[Node, bytes]],
) -> list[bytes]:
    """Build a proof from its ranges with exactly one call to ``get`` for every node it needs.

    ``get`` is the store's batched look-up; a node it does not return is a broken store, not a
    bad proof, so it raises :class:`~tether.errors.StoreError`.
    """
    per_range = [range_nodes(s, e) for s, e in ranges]
    wanted = list(dict.fromkeys(n for nodes in per_range for n in nodes))
    found = get(wanted)
    try:
        return [fold([found[n] for n in nodes]) for nodes in per_range]
    except KeyError as e:
        raise StoreError(f"Merkle node {e.args[0]} is missing from the store") from e


class TreeBuilder:
    """The writer's incremental tree: append leaves, get every node that completes.

    Holds only the frontier, the hashes of :func:`range_nodes(0, size) <range_nodes>` (one per set
    bit of ``size``, largest first), so memory is O(log size) and an append costs O(1) amortised.
    """

    __slots__ = ("_frontier", "_size")

    def __init__(self, size: int = 0, frontier: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError("tree size cannot be negative")
        if len(frontier) != size.bit_count():
            raise ValueError(
                f"a tree of size {size} has {size.bit_count()} frontier hashes, got {len(frontier)}"
            )
        if any(len(h) != HASH_SIZE for h in frontier):
            raise ValueError("frontier hashes must be 32 bytes")
        self._size = size
        self._frontier = [bytes(h) for h in frontier]

    @property
    def size(self) -> int:
        return self._size

    @property
    def frontier(self) -> tuple[bytes, ...]:
        return tuple(self._frontier)

    def append(self, leaf: bytes) -> list[tuple[Node, bytes]]:
        """Append a leaf hash; return the leaf node and each parent it completes, bottom-up."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("append takes a 32-byte leaf hash (see leaf_hash)")
        old = self._size
        h = bytes(leaf)
        created: list[tuple[Node, bytes]] = [((0, old), h)]
        frontier = self._frontier
        level = 0
        # Each trailing 1 bit of the old size is a complete subtree that the new leaf pairs with.
        while old >> level & 1:
            h = _sha256(_NODE_PREFIX + frontier.pop() + h).digest()
            level += 1
            created.append(((level, old >> level), h))
        frontier.append(h)
        self._size = old + 1
        return created

    def root(self) -> bytes:
        """The MTH of the current tree."""
        return fold(self._frontier)

    def __repr__(self) -> str:
        return f"TreeBuilder(size={self._size})"


def _check_hash(what: str, h: bytes) -> None:
    if len(h) != HASH_SIZE:
        raise VerificationFailed(f"{what} is {len(h)} bytes, expected {HASH_SIZE}")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf hash ``leaf`` is entry ``index`` of the tree of ``size`` with ``root``.

    The RFC 9162 section 2.1.3.2 algorithm. Returns nothing; raises
    :class:`~tether.errors.VerificationFailed` on any mismatch or malformed input.
    """
    if not 0 <= index < size:
        raise VerificationFailed(
            f"leaf index {index} is outside a tree of size {size}", index=index
        )
    _check_hash("leaf hash", leaf)
    _check_hash("root hash", root)
    for i, p in enumerate(proof):
        _check_hash(f"inclusion proof element {i}", p)
    expected = len(inclusion_ranges(index, size))
    if len(proof) != expected:
        raise VerificationFailed(
            f"inclusion proof for leaf {index} in a tree of size {size} has {len(proof)} "
            f"hashes, expected {expected}",
            index=index,
        )
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise VerificationFailed("inclusion proof is too long", index=index)
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationFailed("inclusion proof is too short", index=index)
    if r != root:
        raise VerificationFailed(
            f"leaf {index} is not included in the tree of size {size} with this root", index=index
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (``new_size``, ``new_root``) extends (``old_size``, ``old_root``).

    The RFC 9162 section 2.1.4.2 algorithm, plus the two trivial cases it leaves out: equal sizes
    need an empty proof and equal roots; an empty old tree needs an empty proof and the empty root.
    Returns nothing; raises :class:`~tether.errors.VerificationFailed`.
    """
    if not 0 <= old_size <= new_size:
        raise VerificationFailed(f"no consistency from tree size {old_size} to {new_size}")
    _check_hash("old root hash", old_root)
    _check_hash("new root hash", new_root)
    for i, c in enumerate(proof):
        _check_hash(f"consistency proof element {i}", c)
    expected = len(consistency_ranges(old_size, new_size))
    if len(proof) != expected:
        raise VerificationFailed(
            f"consistency proof from size {old_size} to {new_size} has {len(proof)} hashes, "
            f"expected {expected}"
        )
    if old_size == 0:
        if old_root != EMPTY_ROOT:
            raise VerificationFailed("a tree of size 0 must have the empty root")
        return
    if old_size == new_size:
        if old_root != new_root:
            raise VerificationFailed(f"two different roots for the same tree size {old_size}")
        return

    path = list(proof)
    if old_size & (old_size - 1) == 0:  # the old tree is a complete subtree: its root is implied
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationFailed("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationFailed("consistency proof is too short")
    if fr != old_root:
        raise VerificationFailed(
            f"consistency proof does not reproduce the root of size {old_size}"
        )
    if sr != new_root:
        raise VerificationFailed(
            f"consistency proof does not reproduce the root of size {new_size}"
        )
