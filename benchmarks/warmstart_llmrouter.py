"""Warm start measured: regret over the first 1,000 live decisions, from zero versus from
a policy fitted on a labelled log.

The LLMRouter stream is split: the first ``--labelled`` rows play a labelled benchmark
(every model's outcome known: full information, ``bandit.replay.warm_start``), the rest
is live traffic replayed under bandit feedback. For each policy, weight and seed the table
gives the cumulative regret after 1,000 live decisions and over the whole live stream.

    python -m benchmarks.warmstart_llmrouter [--labelled 3000] [--seeds 3]

Reads ../shared/data/llmrouter (or $BANDIT_ROUTER_DATA, or --log with your own replay
log); writes benchmarks/results/warmstart_llmrouter.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, Preferences
from bandit.featurize import make_featurizer
from bandit.replay import ReplayLog, cumulative_regret, replay, warm_start
from benchmarks.common import print_table, write_results
from benchmarks.replay_llmrouter import load_records, to_log

POLICIES = {"linucb": LinUCB, "thompson": LinearThompson}
PREFS = Preferences(quality=1.0, cost=100.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warmstart_llmrouter",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--labelled", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weights", default="1.0,0.25")
    parser.add_argument("--featurizer", choices=("hashing", "minilm"), default="hashing",
                        help="minilm reads the embeddings cached by replay_llmrouter")
    parser.add_argument("--sample", choices=("first", "random"), default="first",
                        help="labelled rows: the file's first rows (a task mix unlike "
                             "the live rows that follow) or a random sample of the file")
    parser.add_argument("--results-name", default="warmstart_llmrouter")
    args = parser.parse_args(argv)
    records = load_records(args)
    log = to_log(records)
    prompts = [r.get("prompt", "") for r in records]
    if args.featurizer == "minilm":
        from benchmarks.replay_llmrouter import featurize

        x = featurize("minilm", prompts, "llmrouter")  # cached by replay_llmrouter
        if x is None:
            print("no MiniLM embeddings: pip install -e '.[embed]' or run "
                  "python -m benchmarks.replay_llmrouter --featurizers minilm first")
            return 2
    else:
        x = make_featurizer("hashing", 64).transform(prompts)
    cut = args.labelled
    n = len(records)
    settings = [("cold", None)] + [(f"warm w={w}", float(w)) for w in args.weights.split(",")]
    rows, results = [], []
    for policy_name, cls in POLICIES.items():
        for label, weight in settings:
            first, total = [], []
            for seed in range(args.seeds):
                if args.sample == "first":  # the file's first rows: another task mix
                    lab, rest = np.arange(cut), np.arange(cut, n)
                else:  # a random sample of the traffic, the live rows in their order
                    lab = np.sort(np.random.default_rng([seed, cut]).permutation(n)[:cut])
                    rest = np.setdiff1d(np.arange(n), lab)
                live = ReplayLog(log.arms, log.outcomes[rest])
                policy = cls(x.shape[1], seed=seed)
                if weight is not None:
                    warm_start(policy, x[lab], ReplayLog(log.arms, log.outcomes[lab]),
                               weight=weight)
                run = replay(policy, x[rest], live, PREFS)
                curve = cumulative_regret(live, PREFS, run.choices)
                first.append(float(curve[min(999, len(curve) - 1)]))
                total.append(float(curve[-1]))
            results.append({"policy": policy_name, "start": label, "weight": weight,
                            "regret_first_1000": first, "regret_live": total})
            rows.append([policy_name, label, f"{np.mean(first):.1f}", f"{np.mean(total):.1f}"])
    for row in rows:  # gain against the cold start of the same policy
        cold = next(r for r in rows if r[0] == row[0] and r[1] == "cold")
        row.append(f"{1 - float(row[2]) / float(cold[2]):+.0%}")
    print_table(f"Warm start on {cut} labelled rows ({args.sample}), then {n - cut} live "
                f"rows ({args.featurizer}; quality=1,cost=100; mean over {args.seeds} seeds)",
                ["policy", "start", "regret, first 1,000", "regret, all live",
                 "gain, first 1,000"], rows)
    path = write_results(args.results_name, {"labelled_rows": cut,
                                             "featurizer": args.featurizer,
                                             "sample": args.sample,
                                                 "live_rows": n - cut,
                                                 "preferences": PREFS._asdict(),
                                                 "results": results}, packages=("numpy",))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
