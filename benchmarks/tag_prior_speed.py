"""What the learned tag prior costs per row: ``select`` with a 16-coordinate tag block,
``tag_prior`` fixed against learned (issue 13; docs/results.md, "A tag prior learned
from the data").

One decide and one update per row (9 models, hashing-like unit text of 64 dims plus the
block, 7 task tags, quality independent of the tag), a fresh policy per round; rounds
alternate the order of the two variants, and the ratio is of the medians. The learned
prior's work is the evidence (a 16 x 16 eigendecomposition per model at each 10% of
weight) and, when the estimate moves 2x, two D x D inverses per model.

Run ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.tag_prior_speed`` (about a minute);
writes ``benchmarks/results/tag_prior_speed.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bandit import Preferences, SelectiveThompson
from bandit.featurize import TAG_BLOCK_DIMS, append_tag_block
from benchmarks.common import add_output_options, print_table, write_results

TEXT_DIM = 64
ARMS = 9
PRIORS = ("fixed", "learned")


def stream(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Contexts (rows, 80) with a tag block, and each model's Bernoulli quality draw."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((rows, TEXT_DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    x = np.stack([append_tag_block(text[i], {"task": f"t{i % 7}"}) for i in range(rows)])
    return x, rng.random((rows, ARMS)) < 0.6


def per_row_us(prior: str, x: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    """Microseconds per decide + update over the stream, and the tag ridge at its end."""
    policy = SelectiveThompson(x.shape[1], seed=0, tag_dims=TAG_BLOCK_DIMS, tag_prior=prior)
    names = [f"m{k}" for k in range(ARMS)]
    for name in names:
        policy.add_arm(name)
    prefs = Preferences(quality=1.0, cost=100.0)
    start = time.perf_counter()
    for i in range(x.shape[0]):
        arm = policy.decide(x[i], prefs).arm
        policy.update(arm, x[i], {"quality": float(good[i, names.index(arm)]),
                                  "cost_usd": 0.001})
    return (time.perf_counter() - start) / x.shape[0] * 1e6, policy.tag_ridge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tag_prior_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows per pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    add_output_options(parser, "tag_prior_speed")
    args = parser.parse_args(argv)
    x, good = stream(args.rows)
    per_row_us("learned", x[:200], good[:200])  # compile the kernels, warm the caches
    times: dict[str, list[float]] = {p: [] for p in PRIORS}
    ridges: dict[str, float] = {}
    for r in range(args.rounds):
        for prior in PRIORS if r % 2 == 0 else PRIORS[::-1]:
            us, ridges[prior] = per_row_us(prior, x, good)
            times[prior].append(us)
    median = {p: float(np.median(v)) for p, v in times.items()}
    ratio = median["learned"] / median["fixed"]
    print_table(f"select, {ARMS} models, d = {TEXT_DIM} + {TAG_BLOCK_DIMS} tag block, "
                f"{args.rows} rows x {args.rounds} rounds",
                ["tag_prior", "median us / row", "rounds", "tag ridge at the end"],
                [[p, f"{median[p]:.0f}", " ".join(f"{v:.0f}" for v in times[p]),
                  f"{ridges[p]:g}"] for p in PRIORS],
                caption=f"learned / fixed: {ratio:.2f}x (goal: within 1.5x)")
    path = write_results(args.out_name, {
        "what": "decide + update per row, select with a tag block, tag_prior fixed vs "
                "learned, alternating rounds, medians",
        "rows": args.rows, "rounds": args.rounds, "us_per_row": times,
        "median_us_per_row": median, "ratio_learned_to_fixed": round(ratio, 3),
        "tag_ridge_at_end": ridges}, results_dir=args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
