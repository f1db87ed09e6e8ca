"""The one result shape every benchmark returns, and the table the runner prints."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table


@dataclass
class Result:
    area: str  # "identity", "audit", ...
    metric: str  # what was measured, e.g. "delegated JWT-SVIDs issued / s"
    value: float  # the median over repeats
    unit: str
    target: str = ""  # the figure, e.g. ">= 5000"
    baseline: str = ""  # a baseline measured side by side, e.g. "raw ECDSA sign 29k/s"
    met: bool | None = None


def median_rate(fn: Callable[[], int], repeats: int = 5) -> float:
    """Run ``fn`` (which returns how many operations it did) ``repeats`` times; median ops/s."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def print_table(results: list[Result]) -> None:
    table = Table(title="Tether benchmarks (medians; this machine, 2 cores)")
    for col in ("area", "metric", "value", "target", "baseline", "met"):
        table.add_column(col)
    for r in results:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        table.add_row(r.area, r.metric, f"{r.value:,.1f} {r.unit}", r.target, r.baseline, met)
    Console(width=160).print(table)
