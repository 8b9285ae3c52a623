"""What routing value is within reach: the full-information ceiling of each featurizer
and the exploration floor of bandit feedback.

Issue 13 asks a one-pass bandit for a routing value >= 0 at every cost weight and a mean
>= +0.10 on LLMRouter. Two references bound what any such router can earn:

* **Full-information ceiling.** A ridge regression of every model's quality on the
  context, cross-fitted (5 folds: each row is predicted by a fit that never saw it) and
  fitted on *every* model's outcome of every training row, routes each row to
  argmax(predicted quality - w x price estimate). No bandit sees that much: it sees one
  model's outcome per row. The best ridge of {1, 10, 100} is kept, so the ceiling is
  optimistic on purpose. Compared across featurizers (hashing at 64, 256 and 1,024
  dimensions; the default is 64) it says how much of the room the context can explain.
* **Exploration floor.** A context-free Thompson sampler over the models (Gaussian
  posterior on each model's mean quality, the price known), one online pass, mean over
  5 shuffles: what finding the best fixed model costs under bandit feedback alone, with
  no context to gain from.
* **Task oracle** (LLMRouter only: rows carry a task cluster): the best model per task
  in hindsight, from :func:`bandit.replay.routing_value`.

Run ``python -m benchmarks.value_bounds`` (about a minute; reads ``../shared/data``, or
``$BANDIT_ROUTER_DATA``: point it at a directory holding ``llmrouter/`` and ``routellm/``
in the layout of ``../shared/data/README.md`` to measure on your own logs). Writes
``benchmarks/results/value_bounds.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bandit.hierarchy import ArmLevels
from bandit.replay import routing_value
from benchmarks.common import (
    VALUE_WEIGHTS,
    add_output_options,
    data_root,
    print_table,
    shuffle_order,
    write_results,
)
from benchmarks.compare_routers import Dataset, _hashing, load_gsm8k, load_llmrouter, load_mmlu

RIDGES = (1.0, 10.0, 100.0)
FOLDS = 5
SHUFFLES = 5


def cross_fitted_quality(x: np.ndarray, quality: np.ndarray, ridge: float,
                         seed: int = 0) -> np.ndarray:
    """(n, K) out-of-fold ridge predictions of every model's quality (intercept almost
    free, context coefficients pulled toward 0 by ``ridge``)."""
    n, dim = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    penalty = ridge * np.diag(np.r_[np.ones(dim), 1e-2])
    folds = np.random.default_rng(seed).integers(0, FOLDS, n)
    out = np.empty_like(quality)
    for f in range(FOLDS):
        train, test = folds != f, folds == f
        theta = np.linalg.solve(xb[train].T @ xb[train] + penalty, xb[train].T @ quality[train])
        out[test] = xb[test] @ theta
    return out


def cross_fitted_cost(ds: Dataset, seed: int = 0) -> np.ndarray:
    """(n, K) price estimate x each model's observed / estimated cost ratio on the other
    folds (what the policies' price correction learns)."""
    folds = np.random.default_rng(seed).integers(0, FOLDS, ds.n)
    out = np.empty_like(ds.cost)
    for f in range(FOLDS):
        train, test = folds != f, folds == f
        ratio = ds.cost[train].sum(axis=0) / ds.cost_estimate[train].sum(axis=0)
        out[test] = ds.cost_estimate[test] * ratio
    return out


def full_information_value(ds: Dataset, x: np.ndarray) -> dict[str, object]:
    """Best-ridge full-information value per weight (and the ridge it took)."""
    best: dict[str, object] = {}
    cost = cross_fitted_cost(ds)
    for ridge in RIDGES:
        pred = cross_fitted_quality(x, ds.quality, ridge)
        values = [routing_value(ds.rewards(w), np.argmax(pred - w * cost, axis=1))["value"]
                  for w in VALUE_WEIGHTS[ds.name]]
        if not best or np.mean(values) > np.mean(best["values"]):
            best = {"ridge": ridge, "values": [round(v, 4) for v in values],
                    "mean": round(float(np.mean(values)), 4)}
    return best


def thompson_choices(quality: np.ndarray, cost: np.ndarray, estimate: np.ndarray,
                     weight: float, seed: int, levels: ArmLevels | None = None,
                     estimate_noise: bool = False) -> np.ndarray:
    """One pass of a context-free Gaussian Thompson sampler (prior: one pseudo-observation
    at quality 0.5, noise variance 0.25, optimism capped at quality 1); the cost is the
    price estimate times the observed / estimated ratio of the model's past calls.
    ``levels``: instead, the prior across models of :mod:`bandit.hierarchy` (features:
    each model's mean price estimate), one joint draw of every model's level.
    ``estimate_noise``: each model's noise variance is estimated from its outcomes (the
    prior 0.25 worth 2 of them, as :mod:`bandit.stats` does) instead of fixed at 0.25."""
    rng = np.random.default_rng(seed)
    n, k = quality.shape
    sums, counts = (np.full(k, 0.5), np.ones(k)) if levels is None else (np.zeros(k),
                                                                          np.zeros(k))
    squares = np.full(k, 0.25)  # sum of squares of the prior pseudo-observation
    price_feature = estimate.mean(axis=0)
    spent, estimated = np.ones(k), np.ones(k)
    choices = np.empty(n, dtype=np.intp)
    for t in range(n):
        if levels is None:
            noise = 0.25
            if estimate_noise:  # residual sum of squares about the mean, prior worth 2
                noise = (0.5 + squares - sums * sums / counts) / (counts + 1.0)
            sample = sums / counts + np.sqrt(noise / counts) * rng.standard_normal(k)
        else:
            sample = levels.sample(rng, price_feature, sums, counts)
        price = estimate[t] * spent / estimated
        arm = int(np.argmax(np.minimum(sample, 1.0) - weight * price))
        choices[t] = arm
        sums[arm] += quality[t, arm]
        squares[arm] += quality[t, arm] ** 2
        counts[arm] += 1
        spent[arm] += cost[t, arm] / max(estimate[t, arm], 1e-12)
        estimated[arm] += 1
    return choices


def exploration_floor(ds: Dataset) -> list[float]:
    out = []
    for w in VALUE_WEIGHTS[ds.name]:
        values = []
        for s in range(SHUFFLES):
            perm = shuffle_order(ds.n, s)
            ch = thompson_choices(ds.quality[perm], ds.cost[perm], ds.cost_estimate[perm], w, s)
            values.append(routing_value(ds.rewards(w)[perm], ch)["value"])
        out.append(round(float(np.mean(values)), 4))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.value_bounds",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="llmrouter,mmlu,gsm8k")
    parser.add_argument("--dims", default="64,256,1024",
                        help="hashing dimensions compared on LLMRouter (default 64,256,1024)")
    add_output_options(parser, "value_bounds")
    args = parser.parse_args(argv)
    root = data_root()
    started = time.perf_counter()
    results: list[dict] = []
    rows: list[tuple[str, str, list[float]]] = []
    for name in args.datasets.split(","):
        if name == "llmrouter":
            from benchmarks.replay_llmrouter import load_records

            ds = load_llmrouter(root / "llmrouter", minilm=False)
            records = load_records(argparse.Namespace(log=None, data_dir=root / "llmrouter"))
            prompts = [r.get("prompt", "") for r in records]
            tasks = np.array([str(r.get("task", "")) for r in records])
            features = {f"hashing-{d}": (ds.features["hashing"] if d == 64
                                          else _hashing(prompts, d))
                        for d in (int(v) for v in args.dims.split(","))}
        elif name == "mmlu":
            ds = load_mmlu(root / "routellm" / "mmlu.csv")
            features, tasks = {"hashing-64": ds.features["hashing"]}, None
        elif name == "gsm8k":
            ds = load_gsm8k(root / "routellm" / "gsm8k_responses.csv")
            features, tasks = {"hashing-64": ds.features["hashing"]}, None
        else:
            parser.error(f"--datasets: unknown data set {name!r} (llmrouter, mmlu, gsm8k)")
        weights = VALUE_WEIGHTS[name]
        entry: dict[str, object] = {"dataset": name, "rows": ds.n, "models": len(ds.arms),
                                    "weights": list(weights), "full_information": {}}
        for feat, x in features.items():
            fi = full_information_value(ds, x)
            entry["full_information"][feat] = fi
            rows.append((name, f"full information, {feat} (ridge {fi['ridge']:g})",
                         fi["values"]))
        floor = exploration_floor(ds)
        entry["exploration_floor"] = floor
        rows.append((name, "context-free Thompson, one pass (bandit feedback)", floor))
        if tasks is not None:
            known = tasks != "-1"
            task_values = [routing_value(ds.rewards(w)[known],
                                         np.zeros(int(known.sum()), dtype=np.intp),
                                         groups=tasks[known])["task_oracle_value"]
                           for w in weights]
            entry["task_oracle_on_labelled_rows"] = task_values
            rows.append((name, "task oracle (best model per task, hindsight)", task_values))
        results.append(entry)
        print(f"{name}: done ({time.perf_counter() - started:.0f}s)", flush=True)
    width = max(len(VALUE_WEIGHTS[n]) for n in args.datasets.split(","))
    print_table("Routing value within reach (0 = best fixed model, 1 = per-query oracle)",
                ["data", "reference", *(f"w{i}" for i in range(width)), "mean"],
                [[name, ref, *(f"{v:+.3f}" for v in vals), *[""] * (width - len(vals)),
                  f"{np.mean(vals):+.3f}"] for name, ref, vals in rows],
                caption="weights: llmrouter 0/100/300/1000/3000, mmlu and gsm8k 0/10/30/100")
    path = write_results(args.out_name, {
        "what": "full-information ceiling per featurizer (5-fold cross-fitted ridge, best "
                "of ridges 1/10/100), context-free Thompson one-pass floor (mean of 5 "
                "shuffles), task oracle",
        "results": results, "seconds": round(time.perf_counter() - started, 1)},
        results_dir=args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
