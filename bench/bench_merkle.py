"""Audit core: RFC 9162 tree hashing, proof assembly and verification, canonical JSON.

Each figure is a median over repeats, next to the raw ``hashlib`` (or reference) cost of the
same work measured in the same run, so the table shows what the tree logic adds.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import rfc8785

from bench._table import Result
from tether.audit.canonical import canonical_json
from tether.audit.merkle import (
    Node,
    TreeBuilder,
    assemble,
    consistency_ranges,
    inclusion_ranges,
    leaf_hash,
    root_from_leaves,
    verify_inclusion,
)

N = 1_000_000
ENTRY_BYTES = 300
AREA = "audit"
NODE_INPUT = b"\x01" + bytes(64)  # the size of every interior node's hash input


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _per_call_us(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
    def loop() -> None:
        for _ in range(calls):
            fn()

    return _median_seconds(loop, repeats) / calls * 1e6


def _event() -> dict[str, Any]:
    return {
        "index": 123456,
        "time": 1_800_000_000_123,
        "type": "llm.invoke",
        "actor": "spiffe://example.org/agent/researcher",
        "subject": None,
        "session": "task-7f3a",
        "decision": "allow",
        "data": {
            "model": "gpt-4o-mini",
            "tokens": {"prompt": 812, "completion": 164},
            "tool": "search",
            "args": {"q": "caf\u00e9 prices in Z\u00fcrich", "n": 5},
        },
        "bodies": {"prompt": "ab" * 32, "response": "cd" * 32},
    }


def _hashing(results: list[Result]) -> list[bytes]:
    """Leaf hashing of 1M entries and the root over them; returns the leaf hashes."""
    entries = [os.urandom(ENTRY_BYTES) for _ in range(N)]
    sha = hashlib.sha256
    t_leaf = _median_seconds(lambda: [leaf_hash(e) for e in entries], 3)
    t_raw = _median_seconds(lambda: [sha(e).digest() for e in entries], 3)
    results.append(
        Result(
            AREA,
            f"leaf hashes of 1M {ENTRY_BYTES}-byte entries",
            t_leaf * 1e3,
            "ms",
            baseline=f"raw sha256 of the same bytes {t_raw * 1e3:,.0f} ms",
        )
    )
    leaves = [leaf_hash(e) for e in entries]

    t_root = _median_seconds(lambda: root_from_leaves(leaves), 3)
    t_raw_nodes = _median_seconds(lambda: [sha(NODE_INPUT).digest() for _ in range(N - 1)], 3)
    results.append(
        Result(
            AREA,
            "root_from_leaves over 1M leaf hashes",
            t_root * 1e3,
            "ms",
            target="a few seconds",
            baseline=f"raw sha256 of 999,999 65-byte inputs {t_raw_nodes * 1e3:,.0f} ms",
            met=t_root < 5,
        )
    )
    return leaves


def _tree(results: list[Result], leaves: list[bytes]) -> None:
    """The writer's appends, then proof assembly and verification at size 1M."""
    rng = random.Random(9162)
    sha = hashlib.sha256
    nodes: dict[Node, bytes] = {}

    def build() -> TreeBuilder:
        nodes.clear()
        builder = TreeBuilder()
        for leaf in leaves:
            for node, h in builder.append(leaf):
                nodes[node] = h
        return builder

    t_build = _median_seconds(build, 3)
    t_raw_nodes = _median_seconds(lambda: [sha(NODE_INPUT).digest() for _ in range(N - 1)], 1)
    builder = build()
    root = builder.root()
    assert root == root_from_leaves(leaves)
    results.append(
        Result(
            AREA,
            "TreeBuilder appends (all nodes kept in a dict)",
            N / t_build,
            "leaves/s",
            # An append does one node hash on average: N - 1 interior nodes over N appends.
            baseline=f"raw sha256 of the same node inputs {N / t_raw_nodes:,.0f}/s",
        )
    )

    def get(wanted: Sequence[Node]) -> Mapping[Node, bytes]:
        return {n: nodes[n] for n in wanted}

    raw20 = _per_call_us(lambda: [sha(NODE_INPUT).digest() for _ in range(20)], 2000)
    indices = [rng.randrange(N) for _ in range(2000)]
    it = iter(indices * 100)
    incl_us = _per_call_us(lambda: assemble(inclusion_ranges(next(it), N), get), 2000)
    results.append(
        Result(
            AREA,
            "inclusion proof assembly at size 1M (one batched get)",
            incl_us,
            "us",
            target="<= 1000 us",
            baseline=f"20 raw sha256 {raw20:.1f} us",
            met=incl_us <= 1000,
        )
    )
    olds = iter([rng.randrange(1, N) for _ in range(2000)] * 100)
    cons_us = _per_call_us(lambda: assemble(consistency_ranges(next(olds), N), get), 2000)
    results.append(
        Result(
            AREA,
            "consistency proof assembly to size 1M (one batched get)",
            cons_us,
            "us",
            baseline=f"20 raw sha256 {raw20:.1f} us",
        )
    )

    proofs = [(i, assemble(inclusion_ranges(i, N), get)) for i in indices[:200]]
    it_proof = iter(proofs * 100)

    def verify_one() -> None:
        i, proof = next(it_proof)
        verify_inclusion(leaves[i], i, N, proof, root)

    ver_us = _per_call_us(verify_one, 200)
    results.append(
        Result(
            AREA,
            "verify_inclusion at size 1M (20 hashes)",
            ver_us,
            "us",
            baseline=f"20 raw sha256 {raw20:.1f} us",
        )
    )


def _canonical(results: list[Result]) -> None:
    event = _event()
    fast_us = _per_call_us(lambda: canonical_json(event), 20000)
    ref_us = _per_call_us(lambda: rfc8785.dumps(event), 2000)
    results.append(
        Result(
            AREA,
            "canonical_json of a typical event (orjson fast path)",
            fast_us,
            "us",
            baseline=f"rfc8785.dumps {ref_us:.1f} us",
            met=fast_us < ref_us,
        )
    )


def run() -> list[Result]:
    results: list[Result] = []
    _tree(results, _hashing(results))
    _canonical(results)
    return results
