"""One online pass over the LLMRouter data (train then test), bandit feedback only.

For each featurizer (hashing, and all-MiniLM-L6-v2 when the ``[embed]`` extra is
installed), each policy (LinUCB, linear Thompson sampling), each cost weight of the sweep
and each seed: mean quality, mean cost, mean reward and cumulative regret against the
per-query oracle of the same reward, next to the best single model and the oracle, over
the whole stream and its last 20%. Costs follow benchmarks/convert_llmrouter.py
(price x (prompt tokens + 256 output tokens)).

    python -m benchmarks.replay_llmrouter [--seeds 3] [--cost-weights 0,100,300,1000]
        [--featurizers hashing,minilm] [--quick]

Reads ``../shared/data/llmrouter`` (or ``$BANDIT_ROUTER_DATA/llmrouter``, or
``--data-dir``); with your own log in the replay format, pass ``--log FILE.jsonl``.
Writes ``benchmarks/results/replay_llmrouter.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, Preferences
from bandit.featurize import make_featurizer
from bandit.replay import ReplayLog, replay
from benchmarks.common import CACHE_DIR, data_root, print_table, write_results
from benchmarks.convert_llmrouter import convert_dir, missing_data_message

POLICIES = {"linucb": LinUCB, "thompson": LinearThompson}
DIMS = {"hashing": 64, "hashing-v1": 64, "minilm": 384}


def load_records(args: argparse.Namespace) -> list[dict]:
    if args.log is not None:
        with args.log.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    data_dir = args.data_dir or data_root() / "llmrouter"
    if not (data_dir / "train.jsonl").exists():
        print(missing_data_message(data_dir), file=sys.stderr)
        raise SystemExit(2)
    return list(convert_dir(data_dir))


def to_log(records: list[dict]) -> ReplayLog:
    arms = list(records[0]["outcomes"])
    out = np.full((len(records), len(arms), 3), np.nan)
    for i, record in enumerate(records):
        for j, arm in enumerate(arms):
            o = record["outcomes"][arm]
            out[i, j] = (o["quality"], o["cost_usd"], o.get("latency_ms", np.nan))
    return ReplayLog(arms, out)


def featurize(name: str, prompts: list[str], cache_key: str) -> np.ndarray | None:
    """Context rows for every prompt; MiniLM embeddings are cached (they take minutes)."""
    cache = CACHE_DIR / f"{cache_key}-{name}.npy"
    if cache.exists():
        x = np.load(cache)
        if x.shape[0] == len(prompts):
            return x
    try:
        # "hashing-v1": the hashing featurizer's version 1 vectors (the default is 2).
        featurizer = (make_featurizer("hashing", DIMS[name], seed=0, hashing_version=1)
                      if name == "hashing-v1" else make_featurizer(name, DIMS[name], seed=0))
        started = time.perf_counter()
        x = featurizer.transform(prompts)
    except ImportError as err:
        print(f"skipping featurizer {name}: {err}", file=sys.stderr)
        return None
    print(f"featurized {len(prompts)} prompts with {name} in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    if not name.startswith("hashing"):
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, x)
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay_llmrouter",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None,
                        help="your own log in the replay format instead of LLMRouter")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cost-weights", default="0,100,300,1000,3000",
                        help="quality points per USD, comma-separated")
    parser.add_argument("--featurizers", default="hashing,minilm",
                        help="of hashing (version 2), hashing-v1, minilm")
    parser.add_argument("--results-name", default="replay_llmrouter",
                        help="results/<name>.json")
    parser.add_argument("--policies", default="linucb,thompson")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 weights, hashing")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.cost_weights, args.featurizers = 1, "0,1000", "hashing"

    records = load_records(args)
    log = to_log(records)
    prompts = [r.get("prompt", "") for r in records]
    weights = [float(w) for w in args.cost_weights.split(",")]
    runs: list[dict] = []
    rows: list[list[object]] = []
    for feat in args.featurizers.split(","):
        x = featurize(feat, prompts, "llmrouter" if args.log is None else args.log.stem)
        if x is None:
            continue
        for weight in weights:
            prefs = Preferences(quality=1.0, cost=weight)
            for policy_name in args.policies.split(","):
                summaries = []
                started = time.perf_counter()
                for seed in range(args.seeds):
                    policy = POLICIES[policy_name](x.shape[1], seed=seed)
                    summaries.append(replay(policy, x, log, prefs).summary)
                elapsed = time.perf_counter() - started
                runs.append({"featurizer": feat, "dim": int(x.shape[1]), "policy": policy_name,
                             "cost_weight": weight, "seeds": args.seeds,
                             "seconds_per_pass": elapsed / args.seeds, "runs": summaries})
                rows.append(_row(feat, policy_name, weight, summaries))
    columns = ["featurizer / policy", "cost w", "quality", "cost $/1k q", "reward",
               "regret", "last20 reward", "best single (reward, q, $/1k)", "oracle reward"]
    print_table("One online pass over LLMRouter train+test (6,108 queries), mean over seeds",
                columns, rows,
                caption="cost $/1k q = mean cost per 1,000 queries; regret = cumulative, "
                        "against the per-query oracle of the same reward")
    path = write_results(args.results_name, {
        "rows": len(records), "arms": log.arms,
        "cost_assumption": "price x (ceil(len(prompt)/4) + 256 output tokens)",
        "results": runs,
    }, packages=("numpy", "river"))
    print(f"results written to {path}")
    return 0


def _row(feat: str, policy: str, weight: float, summaries: list[dict]) -> list[object]:
    def mean(path: tuple[str, ...]) -> float:
        values = []
        for s in summaries:
            node = s
            for key in path:
                node = node[key]
            values.append(node)
        return float(np.mean(values))

    first = summaries[0]["all"]
    best = first["best_model"]
    single = first["models"][best]
    return [f"{feat} / {policy}", f"{weight:g}", f"{mean(('all', 'policy', 'quality')):.4f}",
            f"{1000 * mean(('all', 'policy', 'cost_usd')):.4f}",
            f"{mean(('all', 'policy', 'reward')):.4f}",
            f"{mean(('all', 'policy', 'regret')):.0f}",
            f"{mean(('last_20pct', 'policy', 'reward')):.4f}",
            f"{single['reward']:.4f}, {single['quality']:.3f}, {1000 * single['cost_usd']:.4f}"
            f" ({best})", f"{first['oracle']['reward']:.4f}"]


if __name__ == "__main__":
    raise SystemExit(main())
