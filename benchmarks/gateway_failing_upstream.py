"""How often a gateway still routes to an upstream that always fails (issue 16).

The scenario of tests/gateway/test_chat_completions.py
(``test_upstream_that_keeps_failing_stops_being_chosen``), in process and over many
seeds: two models, "bad" believed better before any feedback (prior quality 0.9) whose
upstream fails every call, and "good" (prior 0.5) that answers every call; no quality is
reported for a success (a tenant without ``success_quality``, most gateway users), a
failure is quality 0 as the gateway posts it; the same request text every time. Each
run makes 25 routed calls; a run "passes" when bad is chosen at most once in the last
15 (the test's bound), and the table shows the share of such runs and the mean number
of bad picks in the last 15, for each policy kind, without and with the gateway's
availability admission (bandit/availability.py).

A second scenario checks that admission does not shut out an upstream that mostly works:
"good" fails 10% of its calls, and the share of decisions it was admitted to is shown.

Run::

    python -m benchmarks.gateway_failing_upstream            # 400 seeds, ~1 min
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


def run(kind: str, seed: int, admission: bool, good_fails: float = 0.0
        ) -> tuple[int, float]:
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
        outcome = {"quality": 0.0} if failed else {"cost_usd": 1e-5}
        policy.update(arm, x, {**outcome, "latency_ms": 3.0 if failed else 300.0})
        availability.record(arm, failed=failed)
    return chosen[-LATE:].count("bad"), good_admitted / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=400)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, results = [], []
    for kind in KINDS:
        for admission in (False, True):
            late = np.array([run(kind, s, admission)[0] for s in range(args.seeds)])
            admitted = np.mean([run(kind, s, admission, good_fails=0.1)[1]
                                for s in range(args.seeds)])
            result = {"policy": kind, "admission": admission, "seeds": args.seeds,
                      "share_within_bound": float(np.mean(late <= 1)),
                      "mean_bad_picks_last_15": float(late.mean()),
                      "good_10pct_failing_admitted_share": float(admitted)}
            results.append(result)
            rows.append([kind, "yes" if admission else "no",
                         f"{result['share_within_bound']:.3f}",
                         f"{result['mean_bad_picks_last_15']:.2f}",
                         f"{admitted:.3f}"])
    print_table("A failing upstream under each policy (25 calls; bound: <= 1 bad pick "
                "in the last 15)", ["policy", "admission", "runs within bound",
                                    "bad picks, last 15", "10%-failing good admitted"],
                rows)
    if not args.no_write:
        write_results("gateway_failing_upstream", {"calls": CALLS, "late": LATE,
                                                   "results": results})


if __name__ == "__main__":
    main()
