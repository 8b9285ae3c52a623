"""What counting the cold start per tag value costs on the decide path.

``SelectiveThompson`` with a tag block (``tag_dims`` 16 after 64 text coordinates, K
models, every context tagged with one of 8 apps), one event of the online loop
(``decide`` + ``update`` of the chosen model) per call, with ``cold_start_by="arm"``
(the cold start counted in total: the policy before the per-tag count) and ``"tags"``
(every model counted per tag: each decision on a tagged request also reads each
model's observations along the request's tags, an inverse of each model's 16 x 16 tag
block once per change of the statistics; the default, ``"added-on-tags"``, pays that
only once a model was added late, and is ``"arm"`` until then). Untagged contexts
(``benchmarks/policy_speed.py``) skip the count.
Rounds alternate between the two; medians of the rounds and their ratio.

    python -m benchmarks.cold_start_speed [--rounds 7] [--calls 2000] [--arms 10]

Writes ``benchmarks/results/cold_start_speed.json`` (``--out-name``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bandit import Preferences, SelectiveThompson
from bandit.featurize import tag_block
from benchmarks.common import add_output_options, print_table, write_results

TEXT, TAGS, APPS = 64, 16, 8


def contexts(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, TEXT))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    blocks = np.array([tag_block({"app": str(a)}, TAGS) for a in range(APPS)])
    return np.hstack([text, blocks[rng.integers(APPS, size=n)]])


def warmed(by: str, arms: int, seed: int) -> SelectiveThompson:
    policy = SelectiveThompson(TEXT + TAGS, seed=seed, tag_dims=TAGS, cold_start_by=by)
    for k in range(arms):
        policy.add_arm(f"m{k}")
    rng = np.random.default_rng(seed)
    for x in contexts(arms * 50, seed + 1):  # every model warm on every app
        for k in range(arms):
            policy.update(f"m{k}", x, {"quality": float(rng.random()), "cost_usd": 1e-3})
    return policy


def one_round(policy: SelectiveThompson, x: np.ndarray, prefs: Preferences) -> float:
    """Microseconds per decide + update."""
    started = time.perf_counter()
    for row in x:
        arm = policy.decide(row, prefs).arm
        policy.update(arm, row, {"quality": 0.5, "cost_usd": 1e-3})
    return (time.perf_counter() - started) / len(x) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--arms", type=int, default=10)
    add_output_options(parser, "cold_start_speed")
    args = parser.parse_args(argv)
    prefs = Preferences(quality=1.0, cost=100.0)
    kinds = ("arm", "tags")
    policies = {by: warmed(by, args.arms, 0) for by in kinds}
    x = contexts(args.calls, 7)
    one_round(policies["arm"], x[:200], prefs)  # warm-up (compiled kernels)
    one_round(policies["tags"], x[:200], prefs)
    times: dict[str, list[float]] = {by: [] for by in kinds}
    for r in range(args.rounds):
        for by in kinds if r % 2 == 0 else kinds[::-1]:
            times[by].append(one_round(policies[by], x, prefs))
    med = {by: statistics.median(times[by]) for by in kinds}
    ratio = med["tags"] / med["arm"]
    print_table(f"decide + update, us per call (K={args.arms}, d={TEXT}+{TAGS} tags, "
                f"median of {args.rounds} rounds)", ["cold_start_by", "us", "ratio"],
                [[by, f"{med[by]:.1f}", f"{med[by] / med['arm']:.2f}"] for by in kinds])
    write_results(args.out_name,
                  {"settings": {"rounds": args.rounds, "calls": args.calls, "arms": args.arms},
                   "us_per_call": {by: round(med[by], 2) for by in kinds},
                   "rounds_us": times, "ratio_tags_over_arm": round(ratio, 3)},
                  results_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
