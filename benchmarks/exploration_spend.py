"""Where the default policy's loss against the best fixed model is spent (issue 13).

For one online pass (bandit feedback, the same shuffles as ``value_learners``: permutation
seed s + 1) the loss against the best single model in hindsight, R_fixed - R_router,
is split by the model the router chose and by the window of rows it chose it in
(:func:`loss_decomposition`); every cell is in units of the headroom n (R_oracle -
R_fixed), so the cells add up to minus the routing value. Next to it, how often the
chosen model's Thompson draw was above its ceiling (its utility with perfect quality at
its known price): what bounding the draws to the quality range [0, 1] could change. And
what the exploration is worth: the pulls of every other model that the Lai-Robbins bound
says any consistent bandit spends (:func:`justified_pulls`), and the value of a
context-free sampler with and without an oracle of each query's difficulty
(:func:`known_difficulty_floor`).

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.exploration_spend [--shuffles 3]
        [--learners select-ts,select-ts-cold-first]

Writes ``benchmarks/results/exploration_spend.json``. What it found is in
docs/results.md ("Where the exploration is spent").
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

from bandit import SelectiveThompson
from bandit.replay import routing_value
from benchmarks.common import (
    VALUE_WEIGHTS,
    add_output_options,
    print_table,
    shuffle_order,
    write_results,
)
from benchmarks.compare_routers import Dataset, Inputs, Ours, run_online
from benchmarks.value_bounds import thompson_choices
from benchmarks.value_learners import COLD_FIRST, _load

#: Row windows of the decomposition: the start, the cold start, warm-up, the rest.
WINDOWS = ((0, 100), (100, 300), (300, 1000), (1000, 3000), (3000, None))
LEARNERS = {"select-ts": {}, "select-ts-cold-first": COLD_FIRST}


def loss_decomposition(rewards: np.ndarray, choices: np.ndarray,
                       windows: tuple[tuple[int, int | None], ...] = WINDOWS) -> dict:
    """Split R_fixed - R_router by chosen model and window of rows.

    ``loss[j][w]`` = sum over the rows of window w where model j was chosen of
    (reward of the best fixed model - reward of j), over n (R_oracle - R_fixed);
    ``pulls[j][w]`` the number of such rows. The cells add up to -value (NaN without
    headroom). A negative cell is a gain: model j beat the best model on those rows.
    ``justified[j]``: :func:`justified_pulls` of model j on these rewards;
    ``justified_loss`` what those pulls cost at the models' mean gaps (headroom units).

    >>> r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    >>> d = loss_decomposition(r, np.array([1, 1, 0, 0]), ((0, 2), (2, None)))
    >>> d["value"], d["best_model"], d["loss"], d["pulls"]
    (0.0, 0, [[0.0, 0.0], [0.0, 0.0]], [[0, 2], [2, 0]])
    """
    r = np.asarray(rewards, dtype=np.float64)
    ch = np.asarray(choices, dtype=np.intp)
    summary = routing_value(r, ch)
    n, k = r.shape
    best = int(summary["best_model"])
    room = n * (summary["oracle_reward"] - summary["fixed_reward"])
    regret = r[:, best] - r[np.arange(n), ch]
    loss = [[0.0] * len(windows) for _ in range(k)]
    pulls = [[0] * len(windows) for _ in range(k)]
    for w, (start, stop) in enumerate(windows):
        rows = slice(start, stop)
        for j in range(k):
            mine = ch[rows] == j
            pulls[j][w] = int(mine.sum())
            loss[j][w] = round(float(regret[rows][mine].sum() / room), 4) if room > 0 \
                else float("nan")
    justified = justified_pulls(r)
    gaps = r.mean(axis=0).max() - r.mean(axis=0)
    return {"value": summary["value"], "best_model": best, "loss": loss, "pulls": pulls,
            "mean_reward": [round(float(v), 4) for v in r.mean(axis=0)],
            "justified": [round(float(v), 1) for v in justified],
            "justified_loss": round(float(justified @ gaps / room), 4) if room > 0
            else float("nan")}


def justified_pulls(rewards: np.ndarray) -> np.ndarray:
    """(K,) pulls of each model that any consistent bandit must spend on n rows.

    The Lai-Robbins lower bound for Gaussian rewards of unknown variance (Honda and
    Takemura 2014, Burnetas and Katehakis 1996): a policy whose regret grows slower
    than any power of n pulls a model with gap D = mu* - mu_j and reward variance
    s_j^2 at least 2 ln n / ln(1 + D^2 / s_j^2) times (~ 2 s_j^2 ln n / D^2 for a
    small gap), capped at n (a gap too small to find in n rows is not looked for).
    Asymptotic, so a reference, not a bound at this n. 0 for the best model.

    >>> r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    >>> justified_pulls(r).round(2).tolist()
    [0.0, 4.0]
    >>> rng = np.random.default_rng(0)
    >>> q = (rng.random((10000, 3)) < [0.6, 0.5, 0.2]).astype(float)
    >>> justified_pulls(q).round(-1).tolist()  # ~ 2 * 0.25 ln n / 0.1^2 = 460, 2 ln n / ln 2 = 27
    [0.0, 520.0, 30.0]
    """
    r = np.asarray(rewards, dtype=np.float64)
    n = r.shape[0]
    mean = r.mean(axis=0)
    gap = mean.max() - mean
    var = np.maximum(r.var(axis=0), 1e-12)
    with np.errstate(divide="ignore"):
        pulls = 2.0 * np.log(n) / np.log1p(gap * gap / var)
    return np.where(gap > 0, np.minimum(pulls, n), 0.0)


def known_difficulty_floor(ds: Dataset, weight: float, seed: int) -> tuple[float, float]:
    """Routing value of the context-free Thompson sampler (``value_bounds``' exploration
    floor, each model's noise estimated from its outcomes) learning from the models'
    qualities, and learning from the qualities minus each query's mean quality over all
    models plus the overall mean (an oracle of the query's difficulty: the same
    per-query differences between models, less noise per call). The second is about
    the most a shared difficulty component could save on finding the best model; both
    are scored on the true rewards."""
    level = ds.quality.mean(axis=1, keepdims=True)
    out = []
    for quality in (ds.quality, ds.quality - level + level.mean()):
        ch = thompson_choices(quality, ds.cost, ds.cost_estimate, weight, seed,
                              estimate_noise=True)
        out.append(float(routing_value(ds.rewards(weight), ch)["value"]))
    return out[0], out[1]


class _CountingSelect(SelectiveThompson):
    """The default policy, counting decisions whose chosen draw is above its ceiling."""

    name = ""  # not registered: the real ``select`` stays the registry's

    above_ceiling = 0

    def _score(self, utility: np.ndarray, std: np.ndarray,
               ceiling: np.ndarray) -> np.ndarray:
        scores = super()._score(utility, std, ceiling)
        best = np.argmax(scores, axis=1)
        rows = np.arange(len(best))
        self.above_ceiling += int((scores[rows, best] > ceiling[rows, best]).sum())
        return scores


def _job(args: tuple[str, str, float, int]) -> dict:
    name, learner, weight, shuffle = args
    ds = _load(name, 3000)
    if shuffle >= 0:
        ds = ds.permuted(shuffle_order(ds.n, shuffle))
    router = Ours(_CountingSelect, ds.features["hashing"], ds.arms, ds.cost.mean(axis=0),
                  max(shuffle, 0), ds.cost_estimate,
                  tag_dims=Inputs.of(ds, "hashing").tag_dims, **LEARNERS[learner])
    choices = run_online(router, ds.quality, ds.cost, np.full(ds.n, weight))
    out = loss_decomposition(ds.rewards(weight), choices)
    out["above_ceiling"] = router.policy.above_ceiling
    out["context_free"], out["known_difficulty"] = known_difficulty_floor(ds, weight,
                                                                          shuffle)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exploration_spend",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="llmrouter,mmlu,gsm8k")
    parser.add_argument("--learners", default="select-ts,select-ts-cold-first")
    parser.add_argument("--shuffles", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    add_output_options(parser, "exploration_spend")
    args = parser.parse_args(argv)
    learners = args.learners.split(",")
    for learner in learners:
        if learner not in LEARNERS:
            parser.error(f"--learners: unknown {learner!r} (allowed: "
                         f"{', '.join(LEARNERS)})")
    started = time.perf_counter()
    results, rows = [], []
    labels = [f"{a}-{'end' if b is None else b}" for a, b in WINDOWS]
    with multiprocessing.Pool(args.jobs) as pool:
        for name in args.datasets.split(","):
            arms = _load(name, 3000).arms
            for learner in learners:
                for weight in VALUE_WEIGHTS[name]:
                    runs = pool.map(_job, [(name, learner, weight, s)
                                           for s in range(args.shuffles)])
                    loss = np.mean([r["loss"] for r in runs], axis=0)  # (K, windows)
                    pulls = np.mean([r["pulls"] for r in runs], axis=0)
                    justified = np.mean([r["justified"] for r in runs], axis=0)
                    gap = np.mean([max(r["mean_reward"]) - np.array(r["mean_reward"])
                                   for r in runs], axis=0)
                    order = np.argsort(gap)
                    results.append({
                        "dataset": name, "learner": learner, "weight": weight,
                        "value": round(float(np.mean([r["value"] for r in runs])), 4),
                        "windows": labels,
                        "loss_by_window": [round(float(v), 4) for v in loss.sum(axis=0)],
                        "justified_loss": round(float(np.mean(
                            [r["justified_loss"] for r in runs])), 4),
                        "arms": [{"arm": arms[j], "gap": round(float(gap[j]), 4),
                                  "justified_pulls": round(float(justified[j]), 1),
                                  "pulls": [round(float(v), 1) for v in pulls[j]],
                                  "loss": [round(float(v), 4) for v in loss[j]]}
                                 for j in order],
                        "context_free_value": round(float(np.mean(
                            [r["context_free"] for r in runs])), 4),
                        "known_difficulty_value": round(float(np.mean(
                            [r["known_difficulty"] for r in runs])), 4),
                        "above_ceiling_per_run": float(np.mean(
                            [r["above_ceiling"] for r in runs]))})
                    rows.append([name, learner, f"{weight:g}", f"{results[-1]['value']:+.3f}",
                                 *(f"{v:+.3f}" for v in loss.sum(axis=0)),
                                 f"{loss[order[0]].sum():+.3f}",
                                 f"{loss[order[1:3]].sum():+.3f}",
                                 f"{loss[order[3:]].sum():+.3f}",
                                 f"{results[-1]['above_ceiling_per_run']:g}",
                                 f"{pulls[order[1:]].sum():.0f}",
                                 f"{justified[order[1:]].sum():.0f}",
                                 f"{results[-1]['justified_loss']:.3f}",
                                 f"{results[-1]['context_free_value']:+.3f}",
                                 f"{results[-1]['known_difficulty_value']:+.3f}"])
                    print(f"{name} {learner} w={weight:g}: {results[-1]['value']:+.3f} "
                          f"({time.perf_counter() - started:.0f}s)", flush=True)
    print_table("Loss against the best fixed model, in headroom units (mean over "
                "shuffles): by window of rows and by the chosen model's rank",
                ["data", "learner", "w", "value", *labels, "best", "next 2", "rest",
                 "draws > ceiling", "pulls of others", "justified", "justified loss",
                 "context-free", "known difficulty"], rows,
                caption="best / next 2 / rest: models ranked by mean reward at that weight; "
                        "a negative loss is a gain; draws > ceiling per run; justified: "
                        "the Lai-Robbins pulls of the other models (justified_pulls) and "
                        "what they cost; context-free / known difficulty: value of a "
                        "context-free Thompson sampler, learning from quality / from quality "
                        "minus each query's mean over the models (known_difficulty_floor)")
    path = write_results(args.out_name, {
        "what": "loss against the best fixed model by chosen model and window of rows "
                "(headroom units, cells add up to -value), mean over shuffles",
        "shuffles": args.shuffles, "results": results,
        "seconds": round(time.perf_counter() - started, 1)}, results_dir=args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
