"""Runs every benchmark module (``bench/bench_*.py``, each with ``run() -> list[Result]``).

python -m bench              all of them
python -m bench identity     only the modules whose name contains "identity"
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from bench._table import Result, print_table


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    results: list[Result] = []
    for mod in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not mod.name.startswith("bench_") or (argv and not any(a in mod.name for a in argv)):
            continue
        print(f"running {mod.name} ...", file=sys.stderr, flush=True)
        results += importlib.import_module(f"bench.{mod.name}").run()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
