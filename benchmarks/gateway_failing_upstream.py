"""How often a gateway still routes to an upstream that always fails, and whether a model
that fails now and then is judged fairly (issue 16).

1. The scenario of tests/gateway/test_chat_completions.py
   (``test_upstream_that_keeps_failing_stops_being_chosen``), in process and over many
   seeds: two models, "bad" believed better before any feedback (prior quality 0.9)
   whose upstream fails every call, and "good" (prior 0.5) that answers every call; no
   quality is reported for a success (a tenant without ``success_quality``, most gateway
   users); the same request text every time. Each run makes 25 routed calls; a run
   "passes" when bad is chosen at most once in the last 15 (the test's bound). Rows:
   without and with the availability admission (bandit/availability.py), and with a
   failure reported as quality 0 (the contract up to eae1995) or as no quality (the
   gateway's contract now: a quality for both sides or neither).
   Also: the share of decisions a "good" that fails 10% of its calls was admitted to.
2. The scenario of tests/gateway/test_quality_bias.py, routed by the policy: "good" is
   rated 0.9 and fails 1 call in 4, "fair" is rated 0.6 and never fails, clients rate 1
   success in 3 (seeded draws). The share of the last 50 of 150 calls routed to good,
   with failures reported as quality 0 or not (admission on).

Run::

    python -m benchmarks.gateway_failing_upstream            # 400 seeds, ~2 min
    python -m benchmarks.gateway_failing_upstream --seeds 50 --no-write
"""

from __future__ import annotations

import argparse

import numpy as np

from bandit import ArmPrior, LinearThompson, LinUCB, SelectiveThompson
from bandit.availability import UpstreamAvailability
from benchmarks.common import print_table, write_results

KINDS = {"select": SelectiveThompson, "thompson": LinearThompson, "linucb": LinUCB}
CALLS, LATE = 25, 15


def run(kind: str, seed: int, admission: bool, good_fails: float = 0.0,
        failure_zero: bool = True) -> tuple[int, float]:
    """(bad picks in the last LATE calls, share of decisions good was admitted to)."""
    policy = KINDS[kind](dim=8, seed=seed)
    policy.add_arm("bad", ArmPrior(quality=0.9))
    policy.add_arm("good", ArmPrior(quality=0.5))
    availability = UpstreamAvailability(seed=seed + 10_000)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(8)
    chosen, good_admitted = [], 0
    for _ in range(CALLS):
        candidates = availability.admitted(["bad", "good"]) if admission else ["bad",
                                                                                 "good"]
        good_admitted += "good" in candidates
        arm = policy.decide(x, candidates=candidates).arm
        chosen.append(arm)
        failed = arm == "bad" or rng.random() < good_fails
        outcome = ({"quality": 0.0} if failure_zero else {}) if failed else {
            "cost_usd": 1e-5}
        policy.update(arm, x, {**outcome, "latency_ms": 3.0 if failed else 300.0})
        availability.record(arm, failed=failed)
    return chosen[-LATE:].count("bad"), good_admitted / CALLS


def rated(kind: str, seed: int, failure_zero: bool, calls: int = 150,
          late: int = 50) -> float:
    """Scenario 2: the share of the last ``late`` calls routed to "good"."""
    policy = KINDS[kind](dim=8, seed=seed)
    for arm in ("good", "fair"):
        policy.add_arm(arm)
    availability = UpstreamAvailability(seed=seed + 10_000)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(8)
    chosen = []
    for _ in range(calls):
        arm = policy.decide(x, candidates=availability.admitted(["good", "fair"])).arm
        chosen.append(arm)
        failed = arm == "good" and rng.random() < 0.25
        outcome: dict[str, float] = {"latency_ms": 300.0, "cost_usd": 1e-5}
        if failed and failure_zero:
            outcome["quality"] = 0.0
        elif not failed and rng.random() < 1 / 3:
            outcome["quality"] = 0.9 if arm == "good" else 0.6
        policy.update(arm, x, outcome)
        availability.record(arm, failed=failed)
    return chosen[-late:].count("good") / late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=400)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, results = [], []
    seeds = range(args.seeds)
    for kind in KINDS:
        for admission, failure_zero in ((False, True), (True, True), (True, False)):
            late = np.array([run(kind, s, admission, failure_zero=failure_zero)[0]
                             for s in seeds])
            admitted = np.mean([run(kind, s, admission, good_fails=0.1,
                                    failure_zero=failure_zero)[1] for s in seeds])
            result = {"policy": kind, "admission": admission, "failure_quality_0":
                      failure_zero, "seeds": args.seeds,
                      "share_within_bound": float(np.mean(late <= 1)),
                      "mean_bad_picks_last_15": float(late.mean()),
                      "good_10pct_failing_admitted_share": float(admitted)}
            results.append(result)
            rows.append([kind, "yes" if admission else "no", "0" if failure_zero else "none",
                         f"{result['share_within_bound']:.3f}",
                         f"{result['mean_bad_picks_last_15']:.2f}",
                         f"{admitted:.3f}"])
    print_table("1. A failing upstream under each policy (25 calls; bound: <= 1 bad pick "
                "in the last 15)", ["policy", "admission", "failure quality",
                                    "runs within bound", "bad picks, last 15",
                                    "10%-failing good admitted"], rows)
    bias_rows, bias = [], []
    for kind in KINDS:
        for failure_zero in (True, False):
            share = float(np.mean([rated(kind, s, failure_zero) for s in seeds]))
            bias.append({"policy": kind, "failure_quality_0": failure_zero,
                         "seeds": args.seeds, "good_share_last_50": share})
            bias_rows.append([kind, "0" if failure_zero else "none", f"{share:.3f}"])
    print_table("2. good (rated 0.9, fails 1 in 4) against fair (rated 0.6); 1 success "
                "in 3 rated", ["policy", "failure quality", "good's share, last 50 of 150"],
                bias_rows)
    if not args.no_write:
        write_results("gateway_failing_upstream", {"calls": CALLS, "late": LATE,
                                                   "results": results,
                                                   "partial_ratings": bias})


if __name__ == "__main__":
    main()
