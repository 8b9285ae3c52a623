"""µs per ``policy.update()`` of outcomes reported whole and in pieces (issues 16, 19).

The gateway (``/v1/chat/completions``) reports each call's cost and latency when the
response ends and its quality later (a rating or the tenant's default), and feedback
through ``/v1/feedback`` often comes in pieces too. A piece that leaves part of an arm's
head group unreported splits those heads off (``ArmStatistics._split``, once per head
and arm); later updates step the group and the split heads' own inverses. This times
``policy.update`` at d=64 (``--dim``) over 16 arms for each shape of outcome, each on a
fresh policy warmed up with ``--warmup`` updates of that shape (the splits done):

* ``full``: quality, cost and latency together;
* ``no quality``: cost and latency (the gateway's first piece);
* ``quality only``: the rating alone (the gateway's second piece);
* ``latency only``: a failure without usage;
* ``cost+lat / quality``: the gateway's stream, the two pieces alternating per call;

and µs per ``policy.decide`` after the full and the gateway's stream (``decide after``).

LinUCB, LinearThompson and SelectiveThompson (quality model selection: the candidates'
step on each reported quality). µs per update from ``time.process_time`` over
``--updates`` updates, best of ``--repeats``, in a fresh process per tree;
``--against-tree DIR`` (``git archive main | tar -x -C DIR``) runs the base in the same
run, alternating order over ``--rounds`` rounds; medians over rounds.
Writes ``benchmarks/results/update_pieces.json`` (``--out`` to change).

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.update_pieces --against-tree /tmp/base
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("linucb", "thompson", "select")
K_ARMS = 16
_FULL = {"quality": 0.7, "cost_usd": 1e-4, "latency_ms": 3.0}
_COST_LATENCY = {"cost_usd": 1e-4, "latency_ms": 3.0}
_QUALITY = {"quality": 0.7}
# shape -> the outcomes it cycles through
SHAPES = {
    "full": (_FULL,),
    "no quality": (_COST_LATENCY,),
    "quality only": (_QUALITY,),
    "latency only": ({"latency_ms": 3.0},),
    "cost+lat / quality": (_COST_LATENCY, _QUALITY),
}
# The table's rows: µs per update by shape, then per decide (the compiled decide needs
# every arm's heads grouped: after pieces, the numpy path; issue 19's decide, not here).
ROWS = (*SHAPES, "decide after full", "decide after cost+lat / quality")


def profile(dim: int, updates: int, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """µs per update of the tree on ``sys.path`` and per decide after the updates:
    {policy: {row: µs}} (``ROWS``)."""
    import numpy as np

    from bandit import LinearThompson, LinUCB, Preferences, SelectiveThompson

    prefs = Preferences(quality=1.0, cost=20.0, latency=0.1)

    classes = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(warmup + updates, dim)) / np.sqrt(dim)
    out: dict[str, dict[str, float]] = {}
    for key, cls in classes.items():
        out[key] = {}
        for shape, outcomes in SHAPES.items():
            policy = cls(dim, seed=0, drift_delta=None)
            for m in range(K_ARMS):
                policy.add_arm(f"m{m}")
            n_out = len(outcomes)
            # Each arm gets every piece of a call in turn (call i: arm i // n_out).
            for i in range(warmup):
                policy.update(f"m{(i // n_out) % K_ARMS}", xs[i], outcomes[i % n_out],
                              now=0.0)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.process_time()
                for i in range(warmup, warmup + updates):
                    policy.update(f"m{(i // n_out) % K_ARMS}", xs[i], outcomes[i % n_out],
                                  now=0.0)
                best = min(best, (time.process_time() - t0) / updates * 1e6)
            out[key][shape] = best
            if f"decide after {shape}" in ROWS:
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.process_time()
                    for x in xs[:updates]:
                        policy.decide(x, prefs)
                    best = min(best, (time.process_time() - t0) / updates * 1e6)
                out[key][f"decide after {shape}"] = best
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import (
        add_tree_options,
        alternate_trees,
        median_over_rounds,
        print_table,
        write_results,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--updates", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    add_tree_options(parser, "update_pieces")
    args = parser.parse_args(argv)
    trees, samples, load = alternate_trees(ROOT, args, __file__,
                                           [args.dim, args.updates, args.repeats, args.warmup])
    med = median_over_rounds(samples, POLICIES, ROWS)
    headers = ["outcome"]
    for p in POLICIES:
        headers += [f"{p} {t}" for t in trees]
        if "base" in trees:
            headers.append(f"{p} base/this")
    rows = []
    for s in ROWS:
        row = [s]
        for p in POLICIES:
            row += [f"{med[t][p][s]:.1f}" for t in trees]
            if "base" in trees:
                row.append(f"{med['base'][p][s] / med['this'][p][s]:.2f}x")
        rows.append(row)
    print_table(f"update by outcome shape, d={args.dim}, K={K_ARMS} (µs per update or decide, "
                f"best of {args.repeats} x {args.updates:,}, median over rounds)", headers, rows)
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    write_results(args.out, {
        "dim": args.dim, "arms": K_ARMS, "updates": args.updates, "repeats": args.repeats,
        "warmup": args.warmup, "rounds": len(samples["this"]),
        "shapes": {s: list(o) for s, o in SHAPES.items()},
        "trees": {t: str(p) for t, p in trees.items()},
        "load_1min": load, "median_us": med, "samples_us": samples})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
