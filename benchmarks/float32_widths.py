"""Accuracy of the float32 inverse copies against float64 (issue 19: "d=384 ... with its
accuracy against float64 stated").

From ``FLOAT32_INVERSE_DIM`` features the compiled decide reads float32 copies of the
inverses (the group's, the selected quality candidates', and the own inverses of heads
split off their group), summing in float64. This feeds 16 arms at ``--dim`` with the
whole outcome (every head grouped) and with the gateway's two pieces (cost+latency, then
quality: heads split), then decides ``--contexts`` contexts with the compiled policy and
with the same statistics on numpy alone in float64 (``ArmStatistics.compiled = False``),
and reports the relative error of each candidate's utility std (the width), the largest
absolute difference of the propensities, and how many choices differ.

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.float32_widths --dim 384
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, Preferences, SelectiveThompson

ROOT = Path(__file__).resolve().parents[1]
K_ARMS = 16
STREAMS = {
    "whole outcomes (grouped)": ({"quality": 0.7, "cost_usd": 1e-4, "latency_ms": 3.0},),
    "cost+lat / quality (split)": ({"cost_usd": 1e-4, "latency_ms": 3.0},
                                   {"quality": 0.7}),
}


def measure(dim: int, warmup: int, contexts: int, seed: int = 0) -> dict:
    prefs = Preferences(quality=1.0, cost=20.0, latency=0.1)
    classes = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}
    rng = np.random.default_rng(seed)
    out: dict = {}
    for key, cls in classes.items():
        for stream, outcomes in STREAMS.items():
            policy = cls(dim, seed=seed, drift_delta=None)
            for m in range(K_ARMS):
                policy.add_arm(f"m{m}")
            n_out = len(outcomes)
            for i in range(warmup):
                x = rng.standard_normal(dim) / np.sqrt(dim)
                # (a random quality, so the arms' noise and widths differ)
                y = dict(outcomes[i % n_out])
                if "quality" in y:
                    y["quality"] = float(rng.random())
                policy.update(f"m{(i // n_out) % K_ARMS}", x, y)
            reference = copy.deepcopy(policy)
            reference._stats.compiled = False  # noqa: SLF001 (numpy, float64)
            rel, dprop, differ = [], 0.0, 0
            for _ in range(contexts):
                x = rng.standard_normal(dim) / np.sqrt(dim)
                a, b = policy.decide(x, prefs), reference.decide(x, prefs)
                differ += a.arm != b.arm
                dprop = max(dprop, abs(a.propensity - b.propensity))
                for name, p in a.predictions.items():
                    want = b.predictions[name].uncertainty
                    rel.append(abs(p.uncertainty - want) / want)
            r = np.asarray(rel)
            out.setdefault(key, {})[stream] = {
                "std_rel_err_median": float(np.median(r)),
                "std_rel_err_p99": float(np.quantile(r, 0.99)),
                "std_rel_err_max": float(r.max()),
                "propensity_abs_diff_max": dprop,
                "choices_differing": int(differ),
                "decisions": contexts,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--warmup", type=int, default=800)
    parser.add_argument("--contexts", type=int, default=200)
    parser.add_argument("--out", default="float32_widths",
                        help="results/<out>.json ('' for none)")
    args = parser.parse_args()
    result = measure(args.dim, args.warmup, args.contexts)
    print(f"d={args.dim}, {K_ARMS} arms, {args.warmup} updates, {args.contexts} decides")
    print(f"{'policy':9} {'stream':28} {'median':>9} {'p99':>9} {'max':>9} "
          f"{'dprop':>9} differ")
    for key, rows in result.items():
        for stream, r in rows.items():
            print(f"{key:9} {stream:28} {r['std_rel_err_median']:9.1e} "
                  f"{r['std_rel_err_p99']:9.1e} {r['std_rel_err_max']:9.1e} "
                  f"{r['propensity_abs_diff_max']:9.1e} {r['choices_differing']}")
    if args.out:
        path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
        path.write_text(json.dumps({"dim": args.dim, "arms": K_ARMS,
                                    "warmup": args.warmup, "contexts": args.contexts,
                                    "result": result}, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
