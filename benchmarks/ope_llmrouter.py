"""Off-policy evaluation validated on real routing data, where the truth is known.

A logging policy (LinUCB, epsilon 0.1, quality=1,cost=100) routes one online pass over
the LLMRouter stream and logs its propensities (bandit feedback only). Candidate
policies (Thompson sampling, LinUCB with a wider bonus, LinUCB with another cost weight)
are then estimated from that log with IPS, SNIPS and doubly robust estimators, each
candidate learning from the logged outcomes as it goes. Because the data hold every
model's outcome, the candidate's true value on that traffic is exact:
mean over rows of sum_a pi_t(a | x_t) r(x_t, a). Over several seeds the table reports
estimate against truth, the error, and how often the 95% interval covered the truth.

    python -m benchmarks.ope_llmrouter [--seeds 5] [--rows 6108] [--quick]

Reads ../shared/data/llmrouter (or $BANDIT_ROUTER_DATA, or --log with your own replay
log); writes benchmarks/results/ope_llmrouter.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bandit import ArmPrior, LinearThompson, LinUCB, Preferences
from bandit.featurize import make_featurizer
from bandit.ope import LoggedDecisions, evaluate_log
from bandit.replay import ReplayLog
from benchmarks.common import print_table, write_results
from benchmarks.replay_llmrouter import load_records, to_log

LOGGING_PREFS = Preferences(quality=1.0, cost=100.0)
CANDIDATES = {
    "thompson": (lambda d, s: LinearThompson(d, seed=s), LOGGING_PREFS),
    "linucb alpha=1": (lambda d, s: LinUCB(d, seed=s, alpha=1.0), LOGGING_PREFS),
    "linucb cost=1000": (lambda d, s: LinUCB(d, seed=s), Preferences(quality=1.0, cost=1000.0)),
}


def log_traffic(x: np.ndarray, log: ReplayLog, seed: int) -> LoggedDecisions:
    """The logging policy's online pass: what a production log would hold."""
    logger = LinUCB(x.shape[1], seed=seed, epsilon=0.1)
    for j, arm in enumerate(log.arms):
        logger.add_arm(arm, ArmPrior(cost_usd=float(log.outcomes[:, j, 1].mean())))
    arms, props, outcomes = [], [], []
    for t in range(x.shape[0]):
        decision = logger.decide(x[t], LOGGING_PREFS)
        j = log.arms.index(decision.arm)
        outcome = {"quality": float(log.outcomes[t, j, 0]),
                   "cost_usd": float(log.outcomes[t, j, 1])}
        logger.update(decision.arm, x[t], outcome)
        arms.append(decision.arm)
        props.append(decision.propensity)
        outcomes.append(outcome)
    return LoggedDecisions(x, arms, props, outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ope_llmrouter",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None,
                        help="your own log in the replay format instead of LLMRouter")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=None, help="first N rows only")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1,500 rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rows = 2, 1500
    records = load_records(args)[: args.rows]
    log = to_log(records)
    x = make_featurizer("hashing", 64).transform([r.get("prompt", "") for r in records])
    runs: list[dict] = []
    for seed in range(args.seeds):
        started = time.perf_counter()
        logged = log_traffic(x, log, seed)
        for name, (make, prefs) in CANDIDATES.items():
            rewards = log.rewards(prefs)  # (n, K): every model's reward on every row
            truth_terms: list[float] = []

            def on_row(i: int, names: list[str], probs: np.ndarray,
                       rewards: np.ndarray = rewards, terms: list[float] = truth_terms) -> None:
                cols = [log.arms.index(n) for n in names]
                terms.append(float(probs @ rewards[i, cols]))

            candidate = make(x.shape[1], seed + 100)
            for j, arm in enumerate(log.arms):
                candidate.add_arm(arm, ArmPrior(cost_usd=float(log.outcomes[:, j, 1].mean())))
            result = evaluate_log(candidate, logged, prefs, learn=True, on_row=on_row)
            truth = float(np.mean(truth_terms))
            runs.append({"seed": seed, "candidate": name, "truth": truth,
                         **{k: result[k].as_dict() for k in ("ips", "snips", "dr")}})
        print(f"seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)
    rows = []
    summary = {}
    for name in CANDIDATES:
        mine = [r for r in runs if r["candidate"] == name]
        truth = np.mean([r["truth"] for r in mine])
        entry = {"truth_mean": float(truth)}
        cells = [name, f"{truth:.4f}"]
        for est in ("ips", "snips", "dr"):
            errors = [r[est]["value"] - r["truth"] for r in mine]
            covered = sum(r[est]["low"] <= r["truth"] <= r[est]["high"] for r in mine)
            stderr = np.mean([r[est]["stderr"] for r in mine])
            entry[est] = {"mean_abs_error": float(np.mean(np.abs(errors))),
                          "mean_error": float(np.mean(errors)),
                          "mean_stderr": float(stderr), "coverage": covered / len(mine)}
            cells.append(f"{np.mean(np.abs(errors)):.4f} ±{stderr:.4f} ({covered}/{len(mine)})")
        summary[name] = entry
        rows.append(cells)
    print_table(f"Off-policy estimates vs truth, LLMRouter ({len(records)} rows, "
                f"{args.seeds} seeds; logging: LinUCB eps=0.1, quality=1,cost=100)",
                ["candidate", "true value", "IPS |err| ±se (covered)",
                 "SNIPS |err| ±se (covered)", "DR |err| ±se (covered)"], rows,
                caption="|err| = mean absolute error of the estimate; ±se = mean standard "
                        "error; covered = seeds whose 95% interval held the truth")
    path = write_results("ope_llmrouter", {"rows": len(records), "seeds": args.seeds,
                                           "summary": summary, "runs": runs},
                         packages=("numpy",))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
