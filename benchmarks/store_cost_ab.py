"""CPU ms per gateway outcome stored (``gateway_overhead.store_cost``: ``feedback_many``
in batches of 1, 25 and 100, SQLite) of this tree against another, alternating rounds,
each tree in its own process (its own ``service`` package); medians. Round 0 of each is
a warm-up (numba's cache), not counted.

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.store_cost_ab --against-tree DIR --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODE = ("import json; from benchmarks.gateway_overhead import store_cost; "
        "print(json.dumps(store_cost((1, 25, 100), 300, 1)))")


def one_round(tree: Path) -> dict[str, list[float]]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=tree, capture_output=True,
                         text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against-tree", required=True, type=Path, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    trees = {"other": args.against_tree.resolve(), "this": ROOT}
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for r in range(args.rounds + 1):
        order = list(trees.items()) if r % 2 else list(reversed(trees.items()))
        for name, tree in order:
            result = one_round(tree)
            if r:
                for size, values in result.items():
                    runs[name].setdefault(size, []).extend(values)
    for size in runs["other"]:
        other, this = np.median(runs["other"][size]), np.median(runs["this"][size])
        print(f"batch {size:>3}: other {other:.3f} ms/outcome, this {this:.3f} ms/outcome, "
              f"ratio {this / other:.3f}")


if __name__ == "__main__":
    main()
