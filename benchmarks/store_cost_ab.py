"""CPU ms per gateway outcome stored (``gateway_overhead.store_cost``: ``feedback_many``
in batches of 1, 25 and 100, SQLite) of this tree against another, alternating rounds,
each tree in its own process (:func:`benchmarks.common.alternate_trees`); medians.

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.store_cost_ab --against-tree DIR --rounds 9
    # writes benchmarks/results/store_cost_ab.json (--out NAME)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 25, 100)


def profile(per_size: int) -> dict[str, float]:
    """CPU ms per stored outcome by batch size, of the tree on ``sys.path``."""
    from benchmarks.gateway_overhead import store_cost

    return {size: statistics.median(values)
            for size, values in store_cost(BATCHES, per_size, 1).items()}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import add_tree_options, alternate_trees, print_table, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-size", type=int, default=300, help="outcomes per batch size")
    add_tree_options(parser, "store_cost_ab")
    args = parser.parse_args(argv)
    trees, samples, load = alternate_trees(ROOT, args, __file__, [args.per_size])
    med = {t: {str(size): statistics.median(run[str(size)] for run in runs)
               for size in BATCHES} for t, runs in samples.items()}
    rows = [[size, *(f"{med[t][str(size)]:.3f}" for t in trees)]
            + ([f"{med['this'][str(size)] / med['base'][str(size)]:.3f}"] if "base" in med else [])
            for size in BATCHES]
    print_table("CPU ms per stored gateway outcome (medians of the rounds)",
                ["batch", *trees, *(["this / base"] if "base" in med else [])], rows,
                caption=f"load (1 min) {min(load):.1f}-{max(load):.1f}")
    write_results(args.out, {
        "per_size": args.per_size, "rounds": len(samples["this"]),
        "trees": {t: str(p) for t, p in trees.items()}, "load_1min": load,
        "median_ms_per_outcome": med, "samples_ms_per_outcome": samples})


if __name__ == "__main__":
    main()
