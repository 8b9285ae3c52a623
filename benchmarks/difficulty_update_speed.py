"""Time per ``SelectiveThompson(shared_difficulty=True).update``: the difficulty's sums
read off the arms as now (``ArmSums.of``: the per-arm sums, and the D x D totals summed
arm by arm only when a fit is solved again) against the formula it replaced, which
stacked every arm's data matrix into a (K, D, D) copy twice per update (issue 13).

One policy per d (K arms, warmed up with K*20 outcomes), both formulas timed on it in
alternating rounds (ABBA), the median of the rounds per formula; in the same rounds, the
same policy without a shared difficulty (what the difficulty costs). Synthetic contexts
and outcomes: a speed measurement, no data needed.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.difficulty_update_speed
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bandit import SelectiveThompson
from bandit.select import ArmSums
from bandit.stats import ArmStatistics
from benchmarks.common import add_output_options, print_table, write_results


def stacked_arm_sums(cls: type[ArmSums], stats: ArmStatistics,
                     applied: np.ndarray) -> ArmSums:
    """``ArmSums.of`` as first written: every arm's data matrix stacked (K, D, D)."""
    a = np.where(stats.group[:, 0, None, None], stats.s_data, stats.a_data[:, 0])
    b = stats.b_data[:, 0] + a @ applied
    return cls(a.sum(axis=0), b.sum(axis=0), a[:, -1, -1], b[:, -1], a[:, :, -1])


NONE = "no difficulty"
FORMULAS = {"stacked (before)": classmethod(stacked_arm_sums),
            "arm by arm (now)": ArmSums.__dict__["of"]}


def _stream(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / np.sqrt(d)
    quality = np.clip(0.5 + 0.3 * x[:, : d // 2].sum(axis=1), 0.0, 1.0)
    return x, quality


def _time_updates(policy: SelectiveThompson, x: np.ndarray, q: np.ndarray,
                  start: int, n: int) -> float:
    arms = policy.arms
    begin = time.perf_counter()
    for t in range(start, start + n):
        policy.update(arms[t % len(arms)], x[t], {"quality": float(q[t])})
    return (time.perf_counter() - begin) / n


def measure(d: int, k: int, n: int, rounds: int, seed: int = 0) -> dict[str, object]:
    warm = 20 * k
    x, q = _stream(d, warm + 2 * rounds * n, seed)
    policy, plain = (SelectiveThompson(d, seed=seed, shared_difficulty=shared,
                                       drift_delta=None) for shared in (True, False))
    for p in (policy, plain):
        for j in range(k):
            p.add_arm(f"m{j}")
        _time_updates(p, x, q, 0, warm)
    times: dict[str, list[float]] = {name: [] for name in (*FORMULAS, NONE)}
    start = warm
    try:
        for r in range(rounds):
            names = list(FORMULAS) if r % 2 == 0 else list(FORMULAS)[::-1]
            for name in names:
                ArmSums.of = FORMULAS[name]
                times[name].append(_time_updates(policy, x, q, start, n))
                start += n
            times[NONE].append(_time_updates(plain, x, q, start - n, n))
    finally:
        ArmSums.of = FORMULAS["arm by arm (now)"]
    medians = {name: float(np.median(v)) for name, v in times.items()}
    before, now = medians["stacked (before)"], medians["arm by arm (now)"]
    return {"d": d, "arms": k, "updates_per_round": n, "rounds": rounds,
            "ms_per_update": {name: 1e3 * v for name, v in medians.items()},
            "rounds_ms": {name: [1e3 * t for t in v] for name, v in times.items()},
            "speedup": before / now}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 384])
    parser.add_argument("--arms", type=int, default=16)
    parser.add_argument("--updates", type=int, default=200, help="updates per round")
    parser.add_argument("--rounds", type=int, default=10)
    add_output_options(parser, "difficulty_update_speed")
    args = parser.parse_args()
    rows = [measure(d, args.arms, args.updates, args.rounds) for d in args.dims]
    print_table(f"update with shared_difficulty, K={args.arms} (median ms per update)",
                ["d", "stacked (before)", "arm by arm (now)", "before / now", NONE],
                [[r["d"], f"{r['ms_per_update']['stacked (before)']:.3f}",
                  f"{r['ms_per_update']['arm by arm (now)']:.3f}", f"{r['speedup']:.2f}",
                  f"{r['ms_per_update'][NONE]:.3f}"] for r in rows])
    path = write_results(args.out_name, {"results": rows}, results_dir=args.out_dir)
    print(path)


if __name__ == "__main__":
    main()
