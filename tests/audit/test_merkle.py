"""RFC 9162 Merkle tree: ranges, proofs and the incremental builder against a naive reference."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pytest

from tether.audit.merkle import (
    EMPTY_ROOT,
    Node,
    TreeBuilder,
    assemble,
    consistency_ranges,
    fold,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    range_nodes,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from tether.errors import StoreError, VerificationFailed

MAX_SIZE = 70


# --- the RFC 9162 section 2.1 definitions, transcribed literally (recursive, slow, obvious) ---


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [ref_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], b), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def ref_proof(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, leaves, True)


LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(MAX_SIZE)]


def all_nodes(leaves: Sequence[bytes]) -> dict[Node, bytes]:
    """Every complete node of the tree over ``leaves``, computed from the reference MTH."""
    nodes: dict[Node, bytes] = {}
    level = 0
    while (1 << level) <= len(leaves):
        width = 1 << level
        for index in range(len(leaves) // width):
            nodes[(level, index)] = ref_mth(leaves[index * width : (index + 1) * width])
        level += 1
    return nodes


NODES = all_nodes(LEAVES)


def store(nodes: Mapping[Node, bytes]) -> tuple[list[Sequence[Node]], object]:
    calls: list[Sequence[Node]] = []

    def get(wanted: Sequence[Node]) -> Mapping[Node, bytes]:
        calls.append(list(wanted))
        return {n: nodes[n] for n in wanted if n in nodes}

    return calls, get


# --- hashing and known vectors ---


def test_empty_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaves([]) == EMPTY_ROOT
    assert TreeBuilder().root() == EMPTY_ROOT
    assert fold([]) == EMPTY_ROOT


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    # RFC 6962 / 9162 leaf hash of the empty string.
    assert (
        leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert leaf_hash(a + b) != node_hash(a, b)


def test_known_root_of_the_rfc6962_test_tree() -> None:
    # The 8-leaf tree used by the CT test suites (certificate-transparency-go, transparency-dev).
    data = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    leaves = [leaf_hash(d) for d in data]
    builder = TreeBuilder()
    for n in range(1, 9):
        builder.append(leaves[n - 1])
        assert root_from_leaves(leaves[:n]).hex() == roots[n - 1]
        assert builder.root().hex() == roots[n - 1]


# --- ranges and proofs against the reference, every index / pair up to MAX_SIZE ---


def test_root_from_leaves_matches_reference() -> None:
    for n in range(MAX_SIZE + 1):
        assert root_from_leaves(LEAVES[:n]) == ref_mth(LEAVES[:n])


def test_range_nodes_tile_the_range_and_fold_to_its_mth() -> None:
    for size in range(MAX_SIZE + 1):
        nodes = range_nodes(0, size)
        covered = [i for level, index in nodes for i in range(index << level, (index + 1) << level)]
        assert covered == list(range(size))
        assert [lvl for lvl, _ in nodes] == sorted((lvl for lvl, _ in nodes), reverse=True)
        assert fold([NODES[n] for n in nodes]) == ref_mth(LEAVES[:size])


def test_range_nodes_refuses_ranges_that_are_not_mth_subtrees() -> None:
    for start, end in [(1, 3), (2, 5), (4, 9), (-1, 2), (5, 4)]:
        with pytest.raises(ValueError):
            range_nodes(start, end)


def test_inclusion_proofs_match_reference_path_for_every_index() -> None:
    for size in range(1, MAX_SIZE + 1):
        root = ref_mth(LEAVES[:size])
        for index in range(size):
            ranges = inclusion_ranges(index, size)
            proof = [fold([NODES[n] for n in range_nodes(s, e)]) for s, e in ranges]
            assert proof == ref_path(index, LEAVES[:size]), (index, size)
            verify_inclusion(LEAVES[index], index, size, proof, root)


def test_consistency_proofs_match_reference_proof_for_every_pair() -> None:
    roots = [ref_mth(LEAVES[:n]) for n in range(MAX_SIZE + 1)]
    for new in range(1, MAX_SIZE + 1):
        for old in range(1, new + 1):
            ranges = consistency_ranges(old, new)
            proof = [fold([NODES[n] for n in range_nodes(s, e)]) for s, e in ranges]
            assert proof == ref_proof(old, LEAVES[:new]), (old, new)
            verify_consistency(old, new, roots[old], roots[new], proof)


def test_consistency_from_the_empty_tree_needs_no_proof() -> None:
    assert consistency_ranges(0, 5) == []
    verify_consistency(0, 5, EMPTY_ROOT, ref_mth(LEAVES[:5]), [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(VerificationFailed):
        verify_consistency(0, 5, LEAVES[0], ref_mth(LEAVES[:5]), [])


def test_assemble_makes_one_store_call_and_builds_the_proof() -> None:
    size, index = 67, 41
    calls, get = store(NODES)
    proof = assemble(inclusion_ranges(index, size), get)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert len(set(calls[0])) == len(calls[0])
    assert proof == ref_path(index, LEAVES[:size])

    calls, get = store(NODES)
    proof = assemble(consistency_ranges(13, size), get)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert proof == ref_proof(13, LEAVES[:size])


def test_assemble_reports_a_store_missing_a_node() -> None:
    partial = dict(NODES)
    del partial[(0, 40)]
    _, get = store(partial)
    with pytest.raises(StoreError, match=r"\(0, 40\)"):
        assemble(inclusion_ranges(41, 67), get)  # type: ignore[arg-type]


def test_ranges_refuse_impossible_arguments() -> None:
    with pytest.raises(ValueError):
        inclusion_ranges(5, 5)
    with pytest.raises(ValueError):
        inclusion_ranges(-1, 5)
    with pytest.raises(ValueError):
        consistency_ranges(6, 5)


# --- tampering ---


def _inclusion(index: int, size: int) -> tuple[list[bytes], bytes]:
    return ref_path(index, LEAVES[:size]), ref_mth(LEAVES[:size])


@pytest.mark.parametrize(("index", "size"), [(0, 2), (5, 7), (12, 13), (31, 64), (40, 67)])
def test_tampered_inclusion_proofs_are_rejected(index: int, size: int) -> None:
    proof, root = _inclusion(index, size)
    leaf = LEAVES[index]
    verify_inclusion(leaf, index, size, proof, root)

    for i in range(len(proof)):
        for byte in (0, 31):
            bad = list(proof)
            flipped = bytearray(bad[i])
            flipped[byte] ^= 0x01
            bad[i] = bytes(flipped)
            with pytest.raises(VerificationFailed):
                verify_inclusion(leaf, index, size, bad, root)
    with pytest.raises(VerificationFailed):
        verify_inclusion(leaf, index ^ 1, size, proof, root)  # wrong index
    with pytest.raises(VerificationFailed):
        verify_inclusion(LEAVES[index + 1 if index + 1 < size else 0], index, size, proof, root)
    with pytest.raises(VerificationFailed, match="expected"):
        verify_inclusion(leaf, index, size, proof[:-1], root)  # truncated
    with pytest.raises(VerificationFailed, match="expected"):
        verify_inclusion(leaf, index, size, [*proof, proof[0]], root)  # extended
    with pytest.raises(VerificationFailed):
        verify_inclusion(leaf, index, 2 * size, proof, root)  # wrong size
    with pytest.raises(VerificationFailed):
        verify_inclusion(leaf, index, size, proof, ref_mth(LEAVES[: size - 1]))  # wrong root


def test_inclusion_rejects_malformed_input() -> None:
    proof, root = _inclusion(3, 10)
    with pytest.raises(VerificationFailed, match="outside"):
        verify_inclusion(LEAVES[3], 10, 10, proof, root)
    with pytest.raises(VerificationFailed, match="outside"):
        verify_inclusion(LEAVES[3], -1, 10, proof, root)
    with pytest.raises(VerificationFailed, match="outside"):
        verify_inclusion(LEAVES[0], 0, 0, [], EMPTY_ROOT)
    with pytest.raises(VerificationFailed, match="bytes"):
        verify_inclusion(b"entry 3", 3, 10, proof, root)  # raw data instead of a leaf hash
    with pytest.raises(VerificationFailed, match="bytes"):
        verify_inclusion(LEAVES[3], 3, 10, [proof[0][:31], *proof[1:]], root)
    with pytest.raises(VerificationFailed, match="bytes"):
        verify_inclusion(LEAVES[3], 3, 10, proof, root[:16])


@pytest.mark.parametrize(("old", "new"), [(1, 2), (3, 7), (4, 8), (6, 8), (13, 67), (32, 70)])
def test_tampered_consistency_proofs_are_rejected(old: int, new: int) -> None:
    proof = ref_proof(old, LEAVES[:new])
    old_root, new_root = ref_mth(LEAVES[:old]), ref_mth(LEAVES[:new])
    verify_consistency(old, new, old_root, new_root, proof)

    for i in range(len(proof)):
        bad = list(proof)
        flipped = bytearray(bad[i])
        flipped[7] ^= 0x80
        bad[i] = bytes(flipped)
        with pytest.raises(VerificationFailed):
            verify_consistency(old, new, old_root, new_root, bad)
    with pytest.raises(VerificationFailed):
        verify_consistency(old, new, new_root, new_root, proof)  # wrong old root
    with pytest.raises(VerificationFailed):
        verify_consistency(old, new, old_root, old_root, proof)  # wrong new root
    with pytest.raises(VerificationFailed, match="expected"):
        verify_consistency(old, new, old_root, new_root, proof[:-1])  # truncated
    with pytest.raises(VerificationFailed, match="expected"):
        verify_consistency(old, new, old_root, new_root, [*proof, proof[0]])  # extended
    if old > 1:
        with pytest.raises(VerificationFailed):
            verify_consistency(old - 1, new, old_root, new_root, proof)


def test_consistency_rejects_malformed_input() -> None:
    root5, root9 = ref_mth(LEAVES[:5]), ref_mth(LEAVES[:9])
    with pytest.raises(VerificationFailed, match="no consistency"):
        verify_consistency(9, 5, root9, root5, [])
    with pytest.raises(VerificationFailed, match="no consistency"):
        verify_consistency(-1, 5, root9, root5, [])
    with pytest.raises(VerificationFailed, match="same tree size"):
        verify_consistency(5, 5, root5, root9, [])
    with pytest.raises(VerificationFailed, match="expected"):
        verify_consistency(5, 5, root5, root5, [root5])
    with pytest.raises(VerificationFailed, match="expected"):
        verify_consistency(5, 9, root5, root9, [])
    with pytest.raises(VerificationFailed, match="bytes"):
        verify_consistency(5, 9, root5[:4], root9, ref_proof(5, LEAVES[:9]))


# --- the incremental builder ---


def test_builder_emits_every_node_once_with_reference_hashes() -> None:
    builder = TreeBuilder()
    seen: dict[Node, bytes] = {}
    for i, leaf in enumerate(LEAVES):
        created = builder.append(leaf)
        assert created[0] == ((0, i), leaf)
        assert [lvl for (lvl, _), _ in created] == list(range(len(created)))
        for node, h in created:
            assert node not in seen
            seen[node] = h
        assert builder.size == i + 1
        assert builder.root() == ref_mth(LEAVES[: i + 1])
        assert builder.frontier == tuple(seen[n] for n in range_nodes(0, i + 1))
    assert seen == NODES


def test_builder_resumes_from_a_persisted_frontier() -> None:
    for size in range(MAX_SIZE):
        frontier = [NODES[n] for n in range_nodes(0, size)]
        builder = TreeBuilder(size, frontier)
        assert builder.root() == ref_mth(LEAVES[:size])
        for leaf in LEAVES[size:]:
            builder.append(leaf)
        assert builder.root() == ref_mth(LEAVES)


def test_builder_refuses_an_inconsistent_frontier_or_a_non_hash_leaf() -> None:
    with pytest.raises(ValueError):
        TreeBuilder(3, [LEAVES[0]])
    with pytest.raises(ValueError):
        TreeBuilder(1, [b"short"])
    with pytest.raises(ValueError):
        TreeBuilder(-1)
    with pytest.raises(ValueError):
        TreeBuilder().append(b"raw entry bytes")
