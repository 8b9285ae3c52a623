"""What partitioned learners cost the default policy's model selection (issue 17).

In distributed mode each feedback partition's statistics score ``select``'s candidate
models (per model: its mean alone, + tags, + text) by prequential error, predicting
each event from that partition's share of the events only; the deciders add the
partitions' errors (streams/stats.py). With one partition that equals the embedded
``select`` fed the same events (tests/streams/test_select_stats.py); with P partitions
each prediction comes from ~1/P of the data, so a richer model, which needs more data
to predict well, scores worse than it would in one process.

This replays a bandit-feedback stream (a uniformly random model per row, its logged
quality; the real rows of ``../shared/data``) through P carriers (rows hashed to
partitions, learned in batches of ``--batch`` rows as a learner polls), sums them as a
decider does and reports, against P = 1 (the embedded policy):

* ``flipped``: models whose selected candidate differs;
* ``err_ratio``: the summed prequential error of each candidate relative to P = 1
  (mean over models; > 1: partial statistics predict worse);
* ``heldout_mse``: the rebuilt ``select``'s quality prediction error on the held-out
  last 20% of the rows (each model on its own logged rows), the cost that matters: a
  different selection that predicts as well costs nothing.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.partition_selection
"""

from __future__ import annotations

import argparse

import numpy as np

from bandit import SelectiveThompson
from bandit.featurize import TAG_BLOCK_DIMS
from benchmarks.common import data_root, print_table, write_results
from benchmarks.compare_routers import Dataset, load_llmrouter, load_mmlu
from streams.stats import candidate_settings, new_statistics, recast, sum_statistics


def _stream(ds: Dataset, feature: str, seed: int) -> tuple[list[str], np.ndarray,
                                                            np.ndarray, int]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(ds.n)
    x = ds.features[feature][order]
    pick = rng.integers(len(ds.arms), size=ds.n)
    arms = [ds.arms[k] for k in pick]
    y = np.column_stack([ds.quality[order, pick], ds.cost[order, pick],
                         np.full(ds.n, np.nan)])
    return arms, x, y, int(0.8 * ds.n)


def _decider(arms: list[str], x: np.ndarray, y: np.ndarray, parts: int, batch: int,
             tag_dims: int, seed: int, names: list[str]) -> SelectiveThompson:
    owner = np.random.default_rng(seed + 7).integers(parts, size=len(arms))
    carriers = []
    for p in range(parts):
        idx = np.flatnonzero(owner == p)
        stats = new_statistics(x.shape[1], tag_dims=tag_dims)
        for name in names:
            stats.add_arm(name)
        for start in range(0, len(idx), batch):
            rows = idx[start:start + batch]
            stats.update_batch([arms[i] for i in rows], x[rows], y[rows])
        carriers.append(stats)
    policy = SelectiveThompson(x.shape[1], seed=0, drift_delta=None, tag_dims=tag_dims)
    for name in names:
        policy.add_arm(name)
    total = sum_statistics(carriers, x.shape[1], tag_dims=tag_dims)
    return policy.merge(recast(total, SelectiveThompson, **candidate_settings(policy.config)))


def _heldout_mse(policy: SelectiveThompson, arms: list[str], x: np.ndarray,
                 y: np.ndarray) -> float:
    stats = policy._stats  # noqa: SLF001 - the quality head the decider predicts with
    xb = np.column_stack([x, np.ones(len(x))])
    k = np.array([policy._index[a] for a in arms])  # noqa: SLF001
    q = np.einsum("nd,nd->n", xb, stats.theta[k, 0])
    return float(np.mean((y[:, 0] - q) ** 2))


def run(name: str, feature: str, parts_list: list[int], batch: int, seeds: int) -> list[dict]:
    root = data_root()
    ds = load_llmrouter(root / "llmrouter", minilm=False) if name == "llmrouter" else \
        load_mmlu(root / "routellm" / "mmlu.csv")
    tag_dims = TAG_BLOCK_DIMS if feature.endswith("+tagblock") else 0
    rows = []
    for seed in range(seeds):
        arms, x, y, cut = _stream(ds, feature, seed)
        learn = slice(0, cut)
        policies = {p: _decider(arms[learn], x[learn], y[learn], p, batch, tag_dims, seed,
                                ds.arms) for p in parts_list}
        one = policies[parts_list[0]]
        base_sel, base_err = one._stats.selected(), one._stats.sel_err  # noqa: SLF001
        for p, policy in policies.items():
            stats = policy._stats  # noqa: SLF001
            rows.append({
                "data": name, "feature": feature, "seed": seed, "partitions": p,
                "flipped": int((stats.selected() != base_sel).sum()),
                "models": len(ds.arms),
                "context_models": int((stats.selected() != 0).sum()),
                "err_ratio": float(np.mean(stats.sel_err / base_err)),
                "heldout_mse": _heldout_mse(policy, arms[cut:], x[cut:], y[cut:])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="llmrouter,mmlu")
    parser.add_argument("--features", default="hashing,hashing+tagblock")
    parser.add_argument("--partitions", default="1,2,6")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    parts = [int(p) for p in args.partitions.split(",")]
    if parts[0] != 1:
        raise SystemExit("--partitions: the first must be 1 (the embedded reference)")
    rows = []
    for name in args.datasets.split(","):
        for feature in args.features.split(","):
            rows.extend(run(name, feature, parts, args.batch, args.seeds))
    summary = []
    for key in sorted({(r["data"], r["feature"], r["partitions"]) for r in rows}):
        group = [r for r in rows if (r["data"], r["feature"], r["partitions"]) == key]
        summary.append([*key, f"{np.mean([r['flipped'] for r in group]):.2f}"
                        f" / {group[0]['models']}",
                        f"{np.mean([r['context_models'] for r in group]):.2f}",
                        f"{np.mean([r['err_ratio'] for r in group]):.4f}",
                        f"{np.mean([r['heldout_mse'] for r in group]):.5f}"])
    print_table("select's model selection from P partitions (mean over seeds)",
                ["data", "feature", "P", "flipped", "context models", "err_ratio",
                 "heldout_mse"], summary)
    write_results("partition_selection", {"rows": rows, "batch": args.batch,
                                          "seeds": args.seeds, "partitions": parts})


if __name__ == "__main__":
    main()
