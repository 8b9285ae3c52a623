"""How far one pass of bandit feedback can go on the llmrouter test split (issue 8, goal 1).

Goal 1 asks for the best single model's test quality (0.5626,
llama-3.1-nemotron-51b-instruct) at no more than half its cost ($0.153 per 1k queries).
This benchmark measures that target for three kinds of router on the same features (the
cached all-MiniLM-L6-v2 embeddings through several maps of
``benchmarks.featuremap_experiment``), each with a ridge head per model on
reward = quality - w x cost, at every cost weight w of a sweep:

* ``full-info``: each model's head is fitted on every train row's outcome of that model
  (9 x 5,608 outcomes). The ceiling of a linear policy on these features; no bandit
  sees this much.
* ``ideal-K``: an idealized explorer that does not adapt to the context but knows which
  models are worth trying. Each train row's model is drawn uniformly from the K models
  of best train quality, chosen with hindsight; each head is fitted on the ~5,608 / K
  outcomes of its model; the test rows are then routed greedily. ``ideal-9`` is uniform
  exploration over every model.
* ``ours-online``: our ``LinUCB`` (defaults) learning online over train then test, one
  pass, bandit feedback, as in ``benchmarks.compare_routers`` (``--online-seeds``).
* ``warm-N+online`` (outside the goal's protocol: what a deployment with an evaluation
  run can do): the same LinUCB warm-started with ``bandit.replay.warm_start`` (what
  ``bandit-router warmstart`` runs) on N random train rows with every model's outcome,
  then online over the other train rows and the test rows (``--warm``, ``--warm-maps``).

A router's operating points over the sweep can be mixed (a share of traffic at each
weight), so its reachable quality at the budget is its (cost, quality) hull's value
there (:func:`benchmarks.compare_routers.quality_at_cost`; the cheapest single model
joins the points, as for AIQ). The goal is met when that value is at least the best
single model's quality. The test split has 500 rows: a paired bootstrap over them
(``--bootstrap`` replicates; the budget, the target and every point recomputed on each
resample) gives a 90% interval for the gap and the share of resamples in which the goal
would be met.

    python -m benchmarks.goal1_ceiling                 # about 5 min on 2 cores
    python -m benchmarks.goal1_ceiling --online-seeds 0 --maps raw --no-write   # 10 s

Writes ``benchmarks/results/goal1_ceiling.json``. Without ``../shared/data`` or the
MiniLM cache it exits with the command that makes them (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bandit import LinUCB
from bandit.replay import ReplayLog, warm_start
from benchmarks.common import print_table, write_results
from benchmarks.compare_routers import (
    Dataset,
    Ours,
    load_llmrouter,
    quality_at_cost,
    run_online,
)

__all__ = ["Family", "ridge_heads", "ideal_allocation", "frontier_gap", "evaluate", "main"]

MAPS = "raw,proto16,proto32,proto64,proto64+raw"
WEIGHTS = "100,150,200,250,300,400"
RIDGE = 1.0  # the policies' default ridge


@dataclass
class Family:
    """One router kind on one feature map: per-row test quality and cost, mean over
    seeds, at every weight of the sweep (arrays (n_weights, n_test))."""

    kind: str
    feature_map: str
    weights: list[float]
    quality: np.ndarray
    cost: np.ndarray

    def points(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.stack([self.cost[:, rows].mean(axis=1), self.quality[:, rows].mean(axis=1)],
                        axis=1)


def ridge_heads(x: np.ndarray, rewards: np.ndarray, arm: np.ndarray | None,
                models: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Head (d+1, K) per model: ridge of its reward on ``x`` plus a bias, on the rows
    where ``arm`` is that model (every row if ``arm`` is None: full information). Models
    outside ``models`` get -inf utility through a bias of -1e9.

    >>> x = np.array([[0.0], [1.0], [0.0], [1.0]])
    >>> r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    >>> theta = ridge_heads(x, r, None, np.array([0, 1]), ridge=1e-9)
    >>> np.round(np.hstack([x, np.ones((4, 1))]) @ theta, 6).tolist()[:2]
    [[1.0, 0.0], [0.0, 1.0]]
    """
    x1 = np.hstack([x, np.ones((x.shape[0], 1))])
    theta = np.zeros((x1.shape[1], rewards.shape[1]))
    theta[-1] = -1e9
    eye = ridge * np.eye(x1.shape[1])
    for j in models:
        rows = slice(None) if arm is None else arm == j
        xa = x1[rows]
        theta[:, j] = np.linalg.solve(xa.T @ xa + eye, xa.T @ rewards[rows, j])
    return theta


def ideal_allocation(n: int, models: np.ndarray, seed: int) -> np.ndarray:
    """A model per row, uniform over ``models`` (independent of the context).

    >>> a = ideal_allocation(9000, np.array([2, 5, 7]), seed=0)
    >>> sorted(set(a.tolist())), bool(abs((a == 5).mean() - 1 / 3) < 0.02)
    ([2, 5, 7], True)
    """
    return models[np.random.default_rng(seed).integers(0, len(models), n)]


def frontier_gap(fam: Family, quality: np.ndarray, cost: np.ndarray, best: int,
                 cheapest: int, rows: np.ndarray | slice = slice(None)) -> float:
    """Reachable quality at half the best single model's cost minus that model's
    quality, on test ``rows`` of the (n_test, K) single-model ``quality``/``cost``.
    NaN when the router cannot get that cheap."""
    q, c = quality[rows], cost[rows]
    anchor = (float(c[:, cheapest].mean()), float(q[:, cheapest].mean()))
    return quality_at_cost(fam.points(rows), 0.5 * float(c[:, best].mean()),
                           anchor) - float(q[:, best].mean())


def evaluate(fam: Family, quality: np.ndarray, cost: np.ndarray, best: int, cheapest: int,
             reps: int, seed: int = 0) -> dict:
    """Point estimate of the goal-1 gap, its 90% paired-bootstrap interval and the
    share of resamples of the test rows in which the goal is met."""
    n = quality.shape[0]
    gap = frontier_gap(fam, quality, cost, best, cheapest)
    rng = np.random.default_rng(seed)
    boot = np.array([frontier_gap(fam, quality, cost, best, cheapest, rng.integers(0, n, n))
                     for _ in range(reps)])
    met = np.nan_to_num(boot, nan=-1.0) >= 0
    pts = fam.points()
    i = int(np.argmax(np.where(pts[:, 0] <= 0.5 * cost[:, best].mean(), pts[:, 1], -1)))
    return {"kind": fam.kind, "map": fam.feature_map,
            "points": [{"w": w, "cost_usd": float(p[0]), "quality": float(p[1])}
                       for w, p in zip(fam.weights, pts, strict=True)],
            "best_point_within_budget": {"w": fam.weights[i], "cost_usd": float(pts[i, 0]),
                                         "quality": float(pts[i, 1])}
            if pts[i, 0] <= 0.5 * cost[:, best].mean() else None,
            "gap": gap, "gap_ci90": [float(np.nanpercentile(boot, 5)),
                                     float(np.nanpercentile(boot, 95))],
            "share_met": float(met.mean())}


def _run(kind: str, x: np.ndarray, ds: Dataset, weights: list[float], seeds: int,
         choose: Callable[[float, int], np.ndarray], feature_map: str) -> Family:
    """Test choices of ``choose(w, seed)`` at every weight, mean over seeds."""
    test = slice(ds.test_start, ds.n)
    n_test = ds.n - ds.test_start
    qs, cs = np.zeros((len(weights), n_test)), np.zeros((len(weights), n_test))
    rows = np.arange(n_test)
    for i, w in enumerate(weights):
        for seed in range(seeds):
            ch = choose(w, seed)
            qs[i] += ds.quality[test][rows, ch] / seeds
            cs[i] += ds.cost[test][rows, ch] / seeds
    return Family(kind, feature_map, weights, qs, cs)


def families(ds: Dataset, x: np.ndarray, feature_map: str, weights: list[float],
             ks: list[int], seeds: int, online_seeds: int,
             warm: Sequence[int] = ()) -> list[Family]:
    n0 = ds.test_start
    x_tr, x_te = x[:n0], x[n0:]
    x1_te = np.hstack([x_te, np.ones((x_te.shape[0], 1))])
    k_all = np.arange(len(ds.arms))
    by_quality = np.argsort(-ds.quality[:n0].mean(axis=0), kind="stable")

    def full(w: float, seed: int) -> np.ndarray:
        theta = ridge_heads(x_tr, ds.rewards(w)[:n0], None, k_all)
        return np.argmax(x1_te @ theta, axis=1)

    out = [_run("full-info", x, ds, weights, 1, full, feature_map)]
    for k in ks:
        top = np.sort(by_quality[:k])

        def ideal(w: float, seed: int, top: np.ndarray = top) -> np.ndarray:
            theta = ridge_heads(x_tr, ds.rewards(w)[:n0], ideal_allocation(n0, top, seed), top)
            return np.argmax(x1_te @ theta, axis=1)

        out.append(_run(f"ideal-{k}", x, ds, weights, seeds, ideal, feature_map))
    if online_seeds:
        mean_cost = ds.cost[:n0].mean(axis=0)

        def online(w: float, seed: int) -> np.ndarray:
            router = Ours(LinUCB, x, ds.arms, mean_cost, seed)
            return run_online(router, ds.quality, ds.cost, np.full(ds.n, w))[n0:]

        out.append(_run("ours-online", x, ds, weights, online_seeds, online, feature_map))
        for n_labelled in warm:
            def warm_online(w: float, seed: int, n_labelled: int = n_labelled) -> np.ndarray:
                return warm_then_online(ds, x, w, n_labelled, seed)

            out.append(_run(f"warm-{n_labelled}+online", x, ds, weights, online_seeds,
                            warm_online, feature_map))
    return out


def warm_then_online(ds: Dataset, x: np.ndarray, w: float, n_labelled: int,
                     seed: int) -> np.ndarray:
    """Test choices of our LinUCB warm-started (``bandit.replay.warm_start``, what
    ``bandit-router warmstart`` runs) on ``n_labelled`` random train rows with every
    model's outcome, then online under bandit feedback over the other train rows, in
    order, and the test rows."""
    n0 = ds.test_start
    labelled = np.sort(np.random.default_rng([seed, n_labelled]).permutation(n0)[:n_labelled])
    order = np.concatenate([np.setdiff1d(np.arange(n0), labelled), np.arange(n0, ds.n)])
    router = Ours(LinUCB, x[order], ds.arms, ds.cost[:n0].mean(axis=0), seed)
    outcomes = np.stack([ds.quality, ds.cost, np.full_like(ds.cost, np.nan)], axis=2)
    warm_start(router.policy, x[labelled], ReplayLog(ds.arms, outcomes[labelled]))
    return run_online(router, ds.quality[order], ds.cost[order],
                      np.full(len(order), w))[-(ds.n - n0):]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.featuremap_experiment import make_map

    parser = argparse.ArgumentParser(prog="python -m benchmarks.goal1_ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", default=MAPS)
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--ideal-k", default="5,9", help="K of the ideal-K allocations")
    parser.add_argument("--seeds", type=int, default=8, help="seeds of the ideal-K draws")
    parser.add_argument("--online-seeds", type=int, default=3,
                        help="seeds of our online LinUCB (0 skips it)")
    parser.add_argument("--warm", default="1000,5000",
                        help="labelled train rows of the warm-N+online runs ('' skips)")
    parser.add_argument("--warm-maps", default="raw", help="maps the warm runs use")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    ds = load_llmrouter(None, minilm=True)
    if "minilm" not in ds.features:
        print("goal1_ceiling needs the MiniLM cache: python -m benchmarks.replay_llmrouter "
              "--featurizers minilm", file=sys.stderr)
        return 2
    weights = [float(v) for v in args.weights.split(",")]
    ks = [int(v) for v in args.ideal_k.split(",") if v]
    test = slice(ds.test_start, ds.n)
    quality, cost = ds.quality[test], ds.cost[test]
    best = int(np.argmax(quality.mean(axis=0)))
    cheapest = int(np.argmin(cost.mean(axis=0)))
    target = {"model": ds.arms[best], "quality": float(quality[:, best].mean()),
              "quality_se": float(quality[:, best].std(ddof=1) / np.sqrt(len(quality))),
              "budget_usd": 0.5 * float(cost[:, best].mean())}
    print(f"goal 1 target: quality >= {target['quality']:.4f} (se {target['quality_se']:.4f}"
          f" over {len(quality)} test rows) at cost <= ${1000 * target['budget_usd']:.4f}/1k",
          file=sys.stderr)
    raw = ds.features["minilm"]
    results, started = [], time.perf_counter()
    for spec in args.maps.split(","):
        x = make_map(spec, raw[:ds.test_start])(raw)
        warm = ([int(v) for v in args.warm.split(",") if v]
                if spec in args.warm_maps.split(",") else [])
        for fam in families(ds, x, spec, weights, ks, args.seeds, args.online_seeds, warm):
            results.append(evaluate(fam, quality, cost, best, cheapest, args.bootstrap))
            row = results[-1]
            print(f"{spec:12s} {fam.kind:12s} gap {row['gap']:+.4f} "
                  f"[{row['gap_ci90'][0]:+.4f}, {row['gap_ci90'][1]:+.4f}] "
                  f"met in {100 * row['share_met']:.0f}% of resamples", file=sys.stderr,
                  flush=True)

    def cell(row: dict) -> str:
        p = row["best_point_within_budget"]
        if p is None:
            return "-"
        return f"{p['quality']:.4f} @ ${1000 * p['cost_usd']:.3f} (w={p['w']:g})"

    print_table(f"Goal 1 on the llmrouter test split: quality >= {target['quality']:.4f} at "
                f"<= ${1000 * target['budget_usd']:.3f}/1k",
                ["map", "router", "quality at budget (hull)", "gap", "90% CI", "met in",
                 "best single point within budget"],
                [[r["map"], r["kind"], f"{r['gap'] + target['quality']:.4f}",
                  f"{r['gap']:+.4f}", f"[{r['gap_ci90'][0]:+.4f}, {r['gap_ci90'][1]:+.4f}]",
                  f"{100 * r['share_met']:.0f}%", cell(r)] for r in results],
                caption="gap = reachable quality at the budget minus the best single "
                        "model's; CI and 'met in' from a paired bootstrap of the test rows")
    if not args.no_write:
        path = write_results("goal1_ceiling", {
            "settings": {"maps": args.maps, "weights": weights, "ideal_k": ks,
                         "seeds": args.seeds, "online_seeds": args.online_seeds,
                         "warm": args.warm, "warm_maps": args.warm_maps,
                         "bootstrap": args.bootstrap, "ridge": RIDGE,
                         "elapsed_s": round(time.perf_counter() - started, 1)},
            "target": target, "results": results}, packages=("numpy",))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
