"""What forgetting by event time costs per feedback, in the service's learning step.

The service applies each feedback to its two shared policies (LinUCB and
LinearThompson). With ``BANDIT_ROUTER_HALF_LIFE_HOURS`` set, a feedback weighs by its
decision's age (docs/policies.md, "Forgetting and drift"); three ways to learn it are
timed in the same process, alternating, on the same events (10 models, ``--dim``,
decision times spread over three days in random order):

* ``no half-life``: ``update(arm, x, outcome)``, the baseline;
* ``update(time=)``: the weighted rank-one update the service uses;
* ``update_batch(times=)``: the same statistics through an exact refresh per call.

    python -m benchmarks.feedback_forgetting            # ~1 min

Prints the median microseconds per feedback and the ratios to the baseline; writes
``benchmarks/results/feedback_forgetting.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bandit import LinearThompson, LinUCB
from benchmarks.common import print_table, write_results

MODES = ("no half-life", "update(time=)", "update_batch(times=)")


def _policies(dim: int, arms: int, half_life: float | None) -> list:
    out = []
    for cls in (LinUCB, LinearThompson):
        policy = cls(dim, seed=0, half_life_hours=half_life)
        for j in range(arms):
            policy.add_arm(f"m{j}")
        out.append(policy)
    return out


def time_mode(mode: str, x: np.ndarray, times: np.ndarray, arms: int) -> float:
    """Microseconds per feedback (both policies) for one pass over the events."""
    policies = _policies(x.shape[1], arms, None if mode == MODES[0] else 168.0)
    outcome = {"quality": 0.5, "cost_usd": 1e-3}
    started = time.perf_counter()
    for i in range(len(x)):
        arm = f"m{i % arms}"
        for policy in policies:
            if mode == MODES[0]:
                policy.update(arm, x[i], outcome)
            elif mode == MODES[1]:
                policy.update(arm, x[i], outcome, time=float(times[i]))
            else:
                policy.update_batch([arm], x[i:i + 1], [outcome], times=times[i:i + 1])
    return (time.perf_counter() - started) / len(x) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feedback_forgetting",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--arms", type=int, default=10)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.events, args.dim)) / np.sqrt(args.dim)
    times = rng.uniform(0.0, 3 * 86400.0, args.events)
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):  # alternate, so load changes hit every mode alike
        for mode in MODES:
            runs[mode].append(time_mode(mode, x, times, args.arms))
    median = {m: float(np.median(v)) for m, v in runs.items()}
    base = median[MODES[0]]
    print_table(f"Learning one feedback (two policies, {args.arms} models, d={args.dim}; "
                f"median of {args.rounds})", ["mode", "us per feedback", "ratio"],
                [[m, f"{median[m]:.1f}", f"{median[m] / base:.2f}"] for m in MODES])
    if not args.no_write:
        path = write_results("feedback_forgetting", {
            "settings": vars(args), "us_per_feedback": runs, "median_us": median,
            "ratio_to_no_half_life": {m: median[m] / base for m in MODES}},
            packages=("numpy",))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
