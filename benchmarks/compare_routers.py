"""Our routers against what a user would pick instead, on real per-query outcomes.

Two data sets, each replayed as one online pass under bandit feedback (a router sees
only the outcome of the model it chose):

* ``llmrouter``: 9 models, 5,608 train rows then 500 test rows in the file's order;
  costs are price x (ceil(len(prompt)/4) + 256 output tokens), as in
  ``benchmarks/convert_llmrouter.py``;
* ``mmlu`` (RouteLLM): GPT-4-1106 (strong) against Mixtral-8x7B (weak), 14,042 MMLU
  questions; quality = correct (0/1); cost = in-price x ceil(len(prompt)/4) + out-price
  x ``--mmlu-output-tokens`` (default 256, the same fixed assumption as llmrouter; an
  MMLU answer can be one letter, a chatty one is longer: the ratio of the two models'
  costs, about 30x, hardly depends on it). Prices: GPT-4 $10 / $30 per Mtok in/out,
  Mixtral $0.6 / $0.6. The file is sorted by subject, so the rows are shuffled once
  (permutation seed 0); by default the first 6,000 shuffled rows are replayed
  (``--mmlu-rows 0`` for all) and their last 20% play the test split.

Routers in the same run, for every cost weight w of the sweep (reward = quality -
w x cost_usd, the same for everyone) and every seed:

* ours: ``LinUCB`` (alpha 0.3, epsilon 0.01) and ``LinearThompson`` (scale 0.5), their
  defaults, on the hashing featurizer (64 dims) and, for llmrouter, on the cached
  all-MiniLM-L6-v2 embeddings (384 dims; ``benchmarks/.cache/llmrouter-minilm.npy``,
  written by ``benchmarks.replay_llmrouter``) and on those embeddings through a
  :class:`bandit.featurize.PrototypeMap` (``minilm-proto``: soft assignment to 64
  spherical k-means prototypes of the train prompts, fitted without outcomes; 64 dims),
  and, with ``--featurizers hashing+tags``, on the hashing features with each row's
  ``cluster_id`` (llmrouter) or ``subject`` (mmlu) passed as a request tag, hashed into
  the text's coordinates by :func:`bandit.featurize.with_tags` (the service's default),
  or, with ``hashing+tagblock``, in their own block after them
  (:func:`bandit.featurize.append_tag_block`, ``BANDIT_ROUTER_TAG_BLOCK``; our policies
  get ``tag_dims`` and ``--tag-ridge``).
  They learn quality and cost heads from
  ``{"quality", "cost_usd"}`` and know each model's mean price as a prior (a router
  knows the price list);
* peers on the same contexts, learning the scalar reward (cost = -reward for VW):
  river ``LinUCBDisjoint`` (alpha 0.3), mabwiser ``LinUCB`` (alpha 0.3; it needs a
  first ``fit``, so its first K decisions are one forced pull of each model), Vowpal
  Wabbit ``--cb_explore_adf -q sa --epsilon 0.01``. Peers run on the hashing features
  only by default (mabwiser at d=384 takes ~1 min per pass; ``--peers-minilm``);
* context-free epsilon-greedy (epsilon 0.05, running mean reward per model), uniform
  random, every single model, and the per-query oracle (exact: every outcome is known);
* a full-information kNN router fitted offline on the train split (it sees every
  model's outcome of every train prompt): a model's predicted reward is its mean reward
  over the ``--knn-k`` most similar train prompts by cosine on the same features; it
  is scored on the test split only.

Reported per router and weight, mean over seeds, on the test split (after the online
pass over train) and over the whole stream: mean quality, mean cost, mean reward,
regret (sum over the window of oracle reward minus the router's), and AIQ, RouterBench's
area under the quality-versus-cost curve (:func:`aiq`).

    python -m benchmarks.compare_routers                      # default, < 10 min
    python -m benchmarks.compare_routers --seeds 5 --cost-weights 0,30,100,300,1000,3000
    python -m benchmarks.compare_routers --quick              # smoke run, writes nothing

Writes ``benchmarks/results/compare_routers.json`` and ``compare_routers.md``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, Preferences
from bandit.base import ArmPrior, PolicyConfig
from bandit.replay import routing_value
from benchmarks.common import (
    CACHE_DIR,
    RESULTS_DIR,
    data_root,
    print_table,
    shuffle_order,
    write_results,
)

__all__ = ["Dataset", "aiq", "knn_choices", "knn_scores", "run_online", "make_router",
           "load_llmrouter", "load_mmlu", "main", "quality_at_cost"]

ALPHA = 0.3
EPS_GREEDY = 0.05
KNN_K = 25
# bandit.featurize.PrototypeMap on MiniLM: K spherical k-means prototypes of the train
# prompts' embeddings (prompts only, no outcomes), softmax temperature, raw vector kept.
PROTO_K = 64
PROTO_TEMPERATURE = 0.05
PROTO_INCLUDE_BASE = False
PACKAGES = ("numpy", "river", "mabwiser", "vowpalwabbit", "matplotlib")
# USD per million tokens (data/README.md): (input, output).
MMLU_PRICES = {"gpt4": (10.0, 30.0), "mixtral": (0.6, 0.6)}
ONLINE = ("ours-linucb", "ours-linucb-shared", "ours-linucb-main", "ours-linucb-mean",
          "ours-linucb-v1",
          "ours-thompson",
          "river-linucb",
          "mabwiser-linucb", "vw-cb-adf", "eps-greedy")
OURS = ("ours-linucb", "ours-thompson")
PEERS = ("river-linucb", "mabwiser-linucb", "vw-cb-adf")
#: The policy settings before issue 13 (the ``ours-linucb-v1`` router).
OLD_DEFAULTS = {"alpha": 0.3, "bounded_optimism": False, "context_ridge": 1.0,
                "shared_ridge": None, "exploration": "context"}
#: The opt-in shared configuration of the first issue-13 sweep (``ours-linucb-shared``).
SHARED = {"shared_ridge": 1.0, "alpha": 0.0, "exploration": "context"}
#: LinUCB's defaults on main before the second issue-13 round (``ours-linucb-main``):
#: price estimate, bounded optimism, context ridge 100, every arm alone, alpha 0.3 on
#: the context's predictive uncertainty.
MAIN_DEFAULTS = {"alpha": 0.3, "shared_ridge": None, "exploration": "context"}
#: LinUCB (alpha 0.3) with the shared component and its bonus on the arms' mean
#: uncertainty (``ours-linucb-mean``): opt-in, a deterministic logger (see
#: bandit/linucb.py).
LINUCB_MEAN = {"shared_ridge": 1.0, "exploration": "mean"}
#: Share of the stream, at its end, of the "last 20%" value window.
TAIL = 0.2
#: Our policies' ``tag_ridge`` on the ``hashing+tagblock`` contexts (their default).
TAG_RIDGE = PolicyConfig.tag_ridge
#: ... and their ``tag_ridges`` (candidates of the quality head's model selection).
TAG_RIDGES: tuple[float, ...] | None = PolicyConfig.tag_ridges


# ----------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Every model's quality and cost on every row, contexts per featurizer."""

    name: str
    arms: list[str]
    quality: np.ndarray  # (n, K)
    cost: np.ndarray  # (n, K) USD
    test_start: int
    features: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)
    # (n, K) USD a router can know before the call: declared price x (prompt tokens +
    # expected output tokens). None: the realized cost is exactly that estimate.
    estimate: np.ndarray | None = None
    # Each row's prompt (what a featurizer reads), when the loader keeps them.
    prompts: list[str] | None = None

    @property
    def n(self) -> int:
        return self.quality.shape[0]

    @property
    def cost_estimate(self) -> np.ndarray:
        return self.cost if self.estimate is None else self.estimate

    def permuted(self, perm: np.ndarray) -> Dataset:
        """The same rows in another order (the test split is then only a window)."""
        return Dataset(self.name, self.arms, self.quality[perm], self.cost[perm],
                       self.test_start, {k: v[perm] for k, v in self.features.items()},
                       self.notes, None if self.estimate is None else self.estimate[perm],
                       None if self.prompts is None else [self.prompts[i] for i in perm])

    def head(self, rows: int) -> Dataset:
        """The first ``rows`` rows, the last 20% of them as the test split."""
        return Dataset(self.name, self.arms, self.quality[:rows], self.cost[:rows],
                       int(round(rows * 0.8)), {k: v[:rows] for k, v in self.features.items()},
                       {**self.notes, "rows_used": f"first {rows} rows"},
                       None if self.estimate is None else self.estimate[:rows],
                       None if self.prompts is None else self.prompts[:rows])

    def rewards(self, weight: float | np.ndarray) -> np.ndarray:
        w = np.asarray(weight, dtype=np.float64)
        return self.quality - (w[:, None] if w.ndim else w) * self.cost


def _hashing(prompts: Sequence[str], dim: int = 64) -> np.ndarray:
    from bandit.featurize import make_featurizer

    return make_featurizer("hashing", dim, seed=0).transform(list(prompts))


def load_llmrouter(data_dir: Path | None, minilm: bool = True) -> Dataset:
    from benchmarks.replay_llmrouter import load_records, to_log

    records = load_records(argparse.Namespace(log=None, data_dir=data_dir))
    log = to_log(records)
    prompts = [r.get("prompt", "") for r in records]
    test_start = next(i for i, r in enumerate(records) if r.get("split") == "test")
    ds = Dataset("llmrouter", list(log.arms), log.outcomes[:, :, 0].copy(),
                 log.outcomes[:, :, 1].copy(), test_start,
                 notes={"cost_assumption": "price x (ceil(len(prompt)/4) + 256 output "
                                           "tokens), benchmarks/convert_llmrouter.py",
                        "order": "file order: train rows, then test rows"},
                 prompts=prompts)
    ds.features["hashing"] = _hashing(prompts)
    # The "with tags" scenario: each row's task cluster passed as a request tag
    # (``tags={"task": cluster_id}``); rows without one (the test split has no
    # cluster_id) stay untagged.
    add_tag_features(ds, [{"task": str(r["task"])} if r.get("task") is not None else None
                          for r in records])
    cache = CACHE_DIR / "llmrouter-minilm.npy"
    if minilm:
        if cache.exists() and np.load(cache, mmap_mode="r").shape[0] == ds.n:
            ds.features["minilm"] = np.asarray(np.load(cache), dtype=np.float64)
            ds.features["minilm-proto"] = prototype_features(ds.features["minilm"],
                                                             test_start)
        else:
            print(f"no MiniLM cache at {cache} (python -m benchmarks.replay_llmrouter "
                  "--featurizers minilm writes it): hashing only", file=sys.stderr)
    return ds


def add_tag_features(ds: Dataset, tags: Sequence[dict[str, str] | None]) -> None:
    """The two ways a request's tags enter the hashing context, if any row has tags:
    ``hashing+tags``, hashed into the text's coordinates (:func:`bandit.featurize.
    with_tags`, tags-v1), and ``hashing+tagblock``, their own block appended
    (:func:`bandit.featurize.append_tag_block`; the policy gets ``tag_dims``)."""
    if not any(tags):
        return
    from bandit.featurize import append_tag_block, with_tags

    x = ds.features["hashing"]
    ds.features["hashing+tags"] = np.stack([with_tags(row, t)
                                            for row, t in zip(x, tags, strict=True)])
    ds.features["hashing+tagblock"] = np.stack([append_tag_block(row, t)
                                                for row, t in zip(x, tags, strict=True)])


def prototype_features(x: np.ndarray, fit_rows: int, k: int = PROTO_K,
                       temperature: float = PROTO_TEMPERATURE,
                       include_base: bool = PROTO_INCLUDE_BASE) -> np.ndarray:
    """``x`` through a :class:`bandit.featurize.PrototypeMap` fitted on its first
    ``fit_rows`` rows (the train prompts; the map never sees an outcome)."""
    from bandit.featurize import PrototypeMap

    pmap = PrototypeMap.fit(x[:fit_rows], k, temperature=temperature,
                            include_base=include_base, seed=0)
    return pmap.transform(x)


def load_mmlu(path: Path, output_tokens: int = 256, test_share: float = 0.2) -> Dataset:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    perm = np.random.default_rng(0).permutation(len(rows))
    rows = [rows[i] for i in perm]
    arms = ["gpt4", "mixtral"]
    cols = {"gpt4": "gpt4_1106_correct", "mixtral": "mixtral_8x7b_correct"}
    quality = np.array([[float(r[cols[a]] == "True") for a in arms] for r in rows])
    tokens = np.array([math.ceil(len(r["prompt"]) / 4) for r in rows], dtype=np.float64)
    cost = np.stack([(MMLU_PRICES[a][0] * tokens + MMLU_PRICES[a][1] * output_tokens) / 1e6
                     for a in arms], axis=1)
    ds = Dataset("mmlu", arms, quality, cost, int(round(len(rows) * (1 - test_share))),
                 notes={"cost_assumption": f"in-price x ceil(len(prompt)/4) + out-price x "
                                           f"{output_tokens} output tokens; GPT-4 $10/$30, "
                                           "Mixtral $0.6/$0.6 per Mtok",
                        "order": "shuffled once (seed 0); last 20% = test"},
                 prompts=[r["prompt"] for r in rows])
    ds.features["hashing"] = _hashing(ds.prompts)
    add_tag_features(ds, [{"subject": r["subject"]} for r in rows])
    return ds


def load_gsm8k(path: Path, output_tokens: int = 256, test_share: float = 0.2) -> Dataset:
    """RouteLLM's GSM8K: both models' correctness and their actual responses, in file
    order. The realized cost prices each model's own response (ceil(len/4) tokens); the
    router's estimate assumes ``output_tokens``, so its price correction has work to do."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    arms = ["gpt4", "mixtral"]
    cols = {"gpt4": "gpt-4-1106-preview", "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1"}
    quality = np.array([[float(r[cols[a]] == "True") for a in arms] for r in rows])
    tokens = np.array([math.ceil(len(r["prompt"]) / 4) for r in rows], dtype=np.float64)
    out = np.array([[math.ceil(len(r[cols[a] + "_response"]) / 4) for a in arms]
                    for r in rows], dtype=np.float64)
    price_in = np.array([MMLU_PRICES[a][0] for a in arms])
    price_out = np.array([MMLU_PRICES[a][1] for a in arms])
    cost = (price_in * tokens[:, None] + price_out * out) / 1e6
    estimate = (price_in * tokens[:, None] + price_out * output_tokens) / 1e6
    ds = Dataset("gsm8k", arms, quality, cost, int(round(len(rows) * (1 - test_share))),
                 notes={"cost_assumption": "in-price x ceil(len(prompt)/4) + out-price x "
                                           "ceil(len(response)/4) of each model's own "
                                           "response; the routers' estimate assumes "
                                           f"{output_tokens} output tokens",
                        "order": "file order; last 20% = test"},
                 estimate=estimate, prompts=[r["prompt"] for r in rows])
    ds.features["hashing"] = _hashing(ds.prompts)
    return ds


# -------------------------------------------------------------------------- routers
class Router:
    """One online router: ``decide(t, prefs) -> model index``, then ``learn``."""

    def decide(self, t: int, prefs: Preferences) -> int:
        raise NotImplementedError

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        raise NotImplementedError


class Ours(Router):
    """Our policy with its defaults; it knows each request's price estimate (declared
    price x tokens), as the service passes it on every decide."""

    def __init__(self, cls: type, x: np.ndarray, arms: list[str], mean_cost: np.ndarray,
                 seed: int, estimate: np.ndarray | None = None, **config: object) -> None:
        self.x, self.arms, self.estimate = x, arms, estimate
        self.policy = cls(x.shape[1], seed=seed, **config)
        for name, c in zip(arms, mean_cost, strict=True):
            self.policy.add_arm(name, ArmPrior(cost_usd=float(c)))

    def decide(self, t: int, prefs: Preferences) -> int:
        est = None if self.estimate is None else self.estimate[t]
        batch = self.policy.decide_batch(self.x[t], prefs, cost_estimate=est,
                                         propensities=False)
        return int(batch.choices[0])

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        est = None if self.estimate is None else float(self.estimate[t, arm])
        self.policy.update(self.arms[arm], self.x[t], {"quality": quality, "cost_usd": cost},
                           now=float(t), cost_estimate=est)


class River(Router):
    def __init__(self, contexts: list[dict], k: int, seed: int) -> None:
        from river import bandit

        self.contexts = contexts
        self.arm_ids = list(range(k))
        self.policy = bandit.LinUCBDisjoint(alpha=ALPHA, seed=seed)

    def decide(self, t: int, prefs: Preferences) -> int:
        return int(self.policy.pull(self.arm_ids, context=self.contexts[t]))

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        self.policy.update(arm, self.contexts[t], reward)


class MabWiser(Router):
    def __init__(self, x: np.ndarray, k: int, seed: int) -> None:
        from mabwiser.mab import MAB, LearningPolicy

        self.x, self.k = x, k
        self.mab = MAB(list(range(k)), LearningPolicy.LinUCB(alpha=ALPHA), seed=seed)
        self.first: list[tuple[int, int, float]] = []

    def decide(self, t: int, prefs: Preferences) -> int:
        if len(self.first) < self.k:  # predict() needs a fit: one forced pull per model
            return len(self.first)
        return int(self.mab.predict(self.x[t:t + 1]))

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        if len(self.first) < self.k:
            self.first.append((t, arm, reward))
            if len(self.first) == self.k:
                rows, arms, rewards = zip(*self.first, strict=True)
                self.mab.fit(list(arms), list(rewards), self.x[list(rows)])
            return
        self.mab.partial_fit([arm], [reward], self.x[t:t + 1])


class VowpalWabbit(Router):
    def __init__(self, shared: list[str], k: int, seed: int) -> None:
        import vowpalwabbit

        self.shared = shared
        self.actions = [f"|a arm{j}" for j in range(k)]
        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf -q sa --epsilon 0.01 --random_seed {seed} --quiet",
            enable_logging=False)
        self.rng = np.random.default_rng(seed)
        self.prob = 1.0 / k

    def decide(self, t: int, prefs: Preferences) -> int:
        pmf = self.vw.predict([self.shared[t], *self.actions])
        cdf = list(itertools.accumulate(pmf))
        arm = min(bisect.bisect(cdf, self.rng.random() * cdf[-1]), len(pmf) - 1)
        self.prob = pmf[arm]
        return arm

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        lines = [self.shared[t], *self.actions]
        lines[1 + arm] = f"0:{-reward:.6g}:{self.prob:.6g} {self.actions[arm]}"
        self.vw.learn(lines)

    def close(self) -> None:
        self.vw.finish()


class EpsGreedy(Router):
    """Context-free: the running mean reward of each model, epsilon uniform exploration."""

    def __init__(self, k: int, seed: int, epsilon: float = EPS_GREEDY) -> None:
        self.sums, self.counts = np.zeros(k), np.zeros(k)
        self.rng = np.random.default_rng(seed)
        self.epsilon = epsilon

    def decide(self, t: int, prefs: Preferences) -> int:
        untried = np.flatnonzero(self.counts == 0)
        if untried.size:
            return int(untried[0])
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(0, len(self.counts)))
        return int(np.argmax(self.sums / self.counts))

    def learn(self, t: int, arm: int, quality: float, cost: float, reward: float) -> None:
        self.sums[arm] += reward
        self.counts[arm] += 1


@dataclass
class Inputs:
    """Per (dataset, featurizer) inputs converted once for every router."""

    x: np.ndarray
    contexts: list[dict] | None = None
    shared: list[str] | None = None
    # Width of the tag block at the end of x (our policies' ``tag_dims``); 0: none.
    tag_dims: int = 0

    @classmethod
    def of(cls, ds: Dataset, feat: str) -> Inputs:
        from bandit.featurize import TAG_BLOCK_DIMS

        return cls(ds.features[feat], tag_dims=TAG_BLOCK_DIMS if feat.endswith("+tagblock")
                   else 0)

    def river_contexts(self) -> list[dict]:
        if self.contexts is None:
            names = [f"x{j}" for j in range(self.x.shape[1])]
            self.contexts = [dict(zip(names, row, strict=True)) for row in self.x.tolist()]
        return self.contexts

    def vw_shared(self) -> list[str]:
        if self.shared is None:
            self.shared = ["shared |s " + " ".join(f"{j}:{v:.6g}" for j, v in enumerate(row)
                                                   if v != 0.0)
                           for row in self.x.tolist()]
        return self.shared


def make_router(name: str, inputs: Inputs, ds: Dataset, seed: int) -> Router:
    k = len(ds.arms)
    mean_cost = ds.cost.mean(axis=0)
    if name.startswith("ours-"):
        return _ours(name, inputs, ds, seed, mean_cost)
    if name == "river-linucb":
        return River(inputs.river_contexts(), k, seed)
    if name == "mabwiser-linucb":
        return MabWiser(inputs.x, k, seed)
    if name == "vw-cb-adf":
        return VowpalWabbit(inputs.vw_shared(), k, seed)
    if name == "eps-greedy":
        return EpsGreedy(k, seed)
    raise ValueError(f"unknown router {name!r}")


def _ours(name: str, inputs: Inputs, ds: Dataset, seed: int, mean_cost: np.ndarray) -> Ours:
    # A tag block at the end of the contexts: the policy gives it its own ridge.
    block = ({"tag_dims": inputs.tag_dims, "tag_ridge": TAG_RIDGE, "tag_ridges": TAG_RIDGES}
             if inputs.tag_dims else {})
    if name == "ours-linucb":
        return Ours(LinUCB, inputs.x, ds.arms, mean_cost, seed, ds.cost_estimate, **block)
    if name == "ours-thompson":
        return Ours(LinearThompson, inputs.x, ds.arms, mean_cost, seed, ds.cost_estimate, **block)
    if name == "ours-linucb-shared":
        return Ours(LinUCB, inputs.x, ds.arms, mean_cost, seed, ds.cost_estimate, **block,
                    **SHARED)
    if name == "ours-linucb-main":
        return Ours(LinUCB, inputs.x, ds.arms, mean_cost, seed, ds.cost_estimate, **block,
                    **MAIN_DEFAULTS)
    if name == "ours-linucb-mean":
        return Ours(LinUCB, inputs.x, ds.arms, mean_cost, seed, ds.cost_estimate, **block,
                    **LINUCB_MEAN)
    if name == "ours-linucb-v1":
        # The defaults before issue 13: no price estimate, unbounded optimism, every
        # arm alone, context coefficients as free as the intercept.
        return Ours(LinUCB, inputs.x, ds.arms, mean_cost, seed, None, **block,
                    **OLD_DEFAULTS)
    raise ValueError(f"unknown router {name!r}")


def run_online(router: Router, quality: np.ndarray, cost: np.ndarray,
               weights: np.ndarray) -> np.ndarray:
    """One pass, bandit feedback: row t's cost weight is ``weights[t]`` (it may change
    mid-stream; the same router object carries on). Returns the choices."""
    n = quality.shape[0]
    choices = np.empty(n, dtype=np.intp)
    prefs_of: dict[float, Preferences] = {}
    for t in range(n):
        w = float(weights[t])
        prefs = prefs_of.get(w)
        if prefs is None:
            prefs = prefs_of[w] = Preferences(quality=1.0, cost=w)
        arm = router.decide(t, prefs)
        choices[t] = arm
        q, c = float(quality[t, arm]), float(cost[t, arm])
        router.learn(t, arm, q, c, q - w * c)
    if hasattr(router, "close"):
        router.close()
    return choices


# ---------------------------------------------------------------- full-information kNN
def knn_scores(x_train: np.ndarray, r_train: np.ndarray, x_test: np.ndarray,
               k: int = KNN_K, block: int = 1024) -> np.ndarray:
    """Each model's predicted reward on each test row: its mean reward over the ``k``
    train rows most similar by cosine. Rows of zero norm have similarity 0 to all."""
    def unit(a: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, norms, out=np.zeros_like(a, dtype=np.float64), where=norms > 0)

    tr, te = unit(np.asarray(x_train, dtype=np.float64)), unit(np.asarray(x_test,
                                                                          dtype=np.float64))
    k = min(k, tr.shape[0])
    out = np.empty((te.shape[0], r_train.shape[1]))
    for s in range(0, te.shape[0], block):
        sim = te[s:s + block] @ tr.T
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[s:s + block] = r_train[nearest].mean(axis=1)
    return out


def knn_choices(x_train: np.ndarray, r_train: np.ndarray, x_test: np.ndarray,
                k: int = KNN_K) -> np.ndarray:
    """The kNN router's choice on each test row (ties go to the first model).

    >>> x = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> r = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> knn_choices(x, r, np.array([[0.9, 0.1], [0.2, 0.8]]), k=1).tolist()
    [0, 1]
    """
    return np.argmax(knn_scores(x_train, r_train, x_test, k), axis=1)


# ------------------------------------------------------------------------------ AIQ
def nondecreasing_hull(points: np.ndarray) -> np.ndarray:
    """The upper convex hull of (cost, quality) points, cut where quality stops rising.

    Points sorted by cost; beyond the hull's best-quality point a router can always
    spend less than it may, so the curve stays flat there (see :func:`aiq`).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]
    hull: list[np.ndarray] = []
    for p in pts:
        if hull and p[0] == hull[-1][0]:
            continue  # same cost, lower quality (sorted by quality descending)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point if it lies on or below the chord (not upper-convex)
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    h = np.array(hull)
    best = int(np.argmax(h[:, 1]))
    return h[:best + 1]


def aiq(points: np.ndarray, c_min: float, c_max: float,
        anchor: tuple[float, float] | None = None) -> float:
    """RouterBench's AIQ of one router from its (cost, quality) points across the sweep.

    The points' non-decreasing convex hull, linearly interpolated, integrated over
    [c_min, c_max] (the cheapest and the most expensive single model's mean cost) and
    divided by c_max - c_min: the router's mean best reachable quality over that budget
    range. Beyond its best-quality point the curve stays at that quality. ``anchor``, the
    cheapest single model's (cost, quality), joins the points: any router can send a
    share of its traffic to that model, and the convex hull is exactly the set of such
    mixtures (RouterBench's argument for the hull), so no router is scored 0 just because
    the sweep did not push it that cheap. Without an anchor the curve is 0 below the
    router's cheapest point.

    >>> aiq(np.array([[1.0, 0.5]]), 0.0, 2.0)   # one point: flat from cost 1 to 2
    0.25
    >>> round(aiq(np.array([[0.0, 0.2], [2.0, 0.6], [1.0, 0.3]]), 0.0, 2.0), 6)
    0.4
    >>> round(aiq(np.array([[1.0, 0.5]]), 0.0, 2.0, anchor=(0.0, 0.1)), 6)
    0.4
    """
    if not c_max > c_min:
        raise ValueError("c_max must exceed c_min")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if anchor is not None:
        pts = np.vstack([pts, np.asarray(anchor, dtype=np.float64)[None, :]])
    h = nondecreasing_hull(pts)
    xs = np.concatenate([h[:, 0], [max(c_max, h[-1, 0])]])
    ys = np.concatenate([h[:, 1], [h[-1, 1]]])
    grid_lo, grid_hi = max(c_min, xs[0]), c_max
    if grid_hi <= grid_lo:
        return 0.0
    # exact integral of a piecewise-linear curve over [grid_lo, grid_hi]
    knots = np.unique(np.concatenate([[grid_lo, grid_hi],
                                      xs[(xs > grid_lo) & (xs < grid_hi)]]))
    vals = np.interp(knots, xs, ys)
    area = float(np.sum((knots[1:] - knots[:-1]) * (vals[1:] + vals[:-1]) / 2))
    return area / (c_max - c_min)


def quality_at_cost(points: np.ndarray, budget: float,
                    anchor: tuple[float, float] | None = None) -> float:
    """The best mean quality a router reaches at mean cost <= ``budget``.

    A router run at two cost weights can be mixed (a share of traffic at each), so
    every point of its (cost, quality) points' non-decreasing convex hull is reachable,
    as in :func:`aiq`; ``anchor`` (the cheapest single model) joins them. NaN when even
    the cheapest point costs more than ``budget``.

    >>> quality_at_cost(np.array([[1.0, 0.5], [3.0, 0.7]]), 2.0)
    0.6
    >>> quality_at_cost(np.array([[1.0, 0.5], [3.0, 0.7]]), 5.0)
    0.7
    >>> quality_at_cost(np.array([[1.0, 0.5]]), 0.5)
    nan
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if anchor is not None:
        pts = np.vstack([pts, np.asarray(anchor, dtype=np.float64)[None, :]])
    h = nondecreasing_hull(pts)
    if budget < h[0, 0]:
        return float("nan")
    return round(float(np.interp(budget, h[:, 0], h[:, 1])), 12)


# ---------------------------------------------------------------------------- metrics
def window_stats(ds: Dataset, weight: float, choices: np.ndarray, rows: slice) -> dict:
    r = ds.rewards(weight)[rows]
    ch = choices if len(choices) == r.shape[0] else choices[rows]
    idx = np.arange(len(ch))
    regret = r.max(axis=1) - r[idx, ch]
    return {"quality": float(ds.quality[rows][idx, ch].mean()),
            "cost_usd": float(ds.cost[rows][idx, ch].mean()),
            "reward": float(r[idx, ch].mean()),
            "regret": float(regret.sum()),
            "share": (np.bincount(ch, minlength=len(ds.arms)) / len(ch)).tolist()}


def _mean_stats(runs: list[dict]) -> dict:
    out = {key: float(np.mean([s[key] for s in runs]))
           for key in ("quality", "cost_usd", "reward", "regret")}
    out["reward_sd"] = float(np.std([s["reward"] for s in runs]))
    out["share"] = np.mean([s["share"] for s in runs], axis=0).round(4).tolist()
    return out


@dataclass
class Result:
    dataset: str
    router: str
    featurizer: str | None
    weight: float
    test: dict
    all: dict | None
    seeds: int
    seconds: float
    curve: list[float] | None = None
    value: dict | None = None

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "router": self.router, "featurizer": self.featurizer,
                "cost_weight": self.weight, "seeds": self.seeds,
                "seconds_per_pass": round(self.seconds, 3), "value": self.value,
                "test": self.test, "all": self.all, "regret_curve": self.curve}


def label(res: Result | dict) -> str:
    d = res if isinstance(res, dict) else res.as_dict()
    f = d["featurizer"]
    return d["router"] + (f" [{f}]" if f else "")


CURVE_POINTS = 120


def stream_value(rewards: np.ndarray, choices: np.ndarray) -> tuple[float, float]:
    """Routing value (:func:`bandit.replay.routing_value`) over the whole stream and
    over its last ``TAIL`` share."""
    tail = int(round(len(choices) * (1 - TAIL)))
    return (routing_value(rewards, choices)["value"],
            routing_value(rewards[tail:], choices[tail:])["value"])


def value_summary(file_runs: list[tuple[float, float]],
                  shuffled_runs: list[tuple[float, float]]) -> dict:
    """Mean (and spread over shuffles) of the routing value, whole stream and tail."""
    def stats(runs: list[tuple[float, float]]) -> dict | None:
        if not runs:
            return None
        a = np.array(runs, dtype=np.float64)
        return {"all": round(float(a[:, 0].mean()), 4), "all_sd": round(float(a[:, 0].std()), 4),
                "last_20pct": round(float(a[:, 1].mean()), 4),
                "last_20pct_sd": round(float(a[:, 1].std()), 4), "runs": len(runs)}

    return {"file_order": stats(file_runs), "shuffled": stats(shuffled_runs)}


def evaluate(ds: Dataset, weights: Sequence[float], seeds: int, online: Sequence[str],
             featurizers: Sequence[str], peer_featurizers: Sequence[str], knn_k: int,
             log: Callable[[str], None], curve_weight: float | None = None,
             shuffles: int = 0) -> list[Result]:
    out: list[Result] = []
    test = slice(ds.test_start, ds.n)
    whole = slice(0, ds.n)
    step = max(1, ds.n // CURVE_POINTS)

    def curve(weight: float, runs: list[np.ndarray]) -> list[float] | None:
        if curve_weight is None or weight != curve_weight:
            return None
        r = ds.rewards(weight)
        idx = np.arange(ds.n)
        c = np.mean([np.cumsum(r.max(axis=1) - r[idx, ch]) for ch in runs], axis=0)
        return [round(float(v), 3) for v in c[step - 1::step]]

    for weight in weights:
        r = ds.rewards(weight)
        fixed = {f"single:{a}": np.full(ds.n, j) for j, a in enumerate(ds.arms)}
        # ties (many rows score 0 or 1 on several models) go to the cheaper model
        fixed["oracle"] = np.argmax(r - 1e-9 * ds.cost, axis=1)
        for name, ch in fixed.items():
            out.append(Result(ds.name, name, None, weight, window_stats(ds, weight, ch, test),
                              window_stats(ds, weight, ch, whole), 1, 0.0, curve(weight, [ch]),
                              value_summary([stream_value(r, ch)], [])))
        rand = [np.random.default_rng(s).integers(0, len(ds.arms), ds.n) for s in range(seeds)]
        out.append(Result(ds.name, "random", None, weight,
                          _mean_stats([window_stats(ds, weight, c, test) for c in rand]),
                          _mean_stats([window_stats(ds, weight, c, whole) for c in rand]),
                          seeds, 0.0, curve(weight, rand),
                          value_summary([stream_value(r, c) for c in rand], [])))
        for feat in featurizers:
            x = ds.features[feat]
            t0 = time.perf_counter()
            ch = knn_choices(x[:ds.test_start], r[:ds.test_start], x[test], knn_k)
            out.append(Result(ds.name, f"knn-full-info(k={knn_k})", feat, weight,
                              window_stats(ds, weight, ch, test), None, 1,
                              time.perf_counter() - t0))
        for feat in featurizers:
            inputs = Inputs.of(ds, feat)
            for name in online:
                if name in PEERS and feat not in peer_featurizers:
                    continue
                if name == "eps-greedy" and feat != featurizers[0]:
                    continue  # context-free: once
                runs = []
                t0 = time.perf_counter()
                for seed in range(seeds):
                    router = make_router(name, inputs, ds, seed)
                    runs.append(run_online(router, ds.quality, ds.cost,
                                           np.full(ds.n, weight)))
                secs = (time.perf_counter() - t0) / seeds
                shuffled = []
                for s in range(shuffles):
                    # Shuffle s: permutation seed s + 1, router seed s (the file order
                    # is the unshuffled stream, reported apart).
                    perm = shuffle_order(ds.n, s)
                    dsp = ds.permuted(perm)
                    router = make_router(name, Inputs.of(dsp, feat), dsp, s)
                    ch = run_online(router, dsp.quality, dsp.cost, np.full(ds.n, weight))
                    shuffled.append(stream_value(r[perm], ch))
                res = Result(ds.name, name, None if name == "eps-greedy" else feat, weight,
                             _mean_stats([window_stats(ds, weight, c, test) for c in runs]),
                             _mean_stats([window_stats(ds, weight, c, whole) for c in runs]),
                             seeds, secs, curve(weight, runs),
                             value_summary([stream_value(r, c) for c in runs], shuffled))
                out.append(res)
                v = res.value or {}
                sh = v.get("shuffled") or {}
                log(f"  {ds.name} w={weight:g} {label(res):32s} value file "
                    f"{v['file_order']['all']:+.3f} shuffled {sh.get('all', float('nan')):+.3f}"
                    f"  test reward {res.test['reward']:.4f}  ({secs:.1f}s/pass)")
    return out


def add_aiq(results: list[Result], ds: Dataset) -> dict[str, dict[str, float]]:
    """AIQ per router label, on the test split and on the whole stream."""
    out: dict[str, dict[str, float]] = {}
    for window, rows in (("test", slice(ds.test_start, ds.n)), ("all", slice(0, ds.n))):
        single_cost = ds.cost[rows].mean(axis=0)
        c_min, c_max = float(single_cost.min()), float(single_cost.max())
        cheapest = int(np.argmin(single_cost))
        anchor = (c_min, float(ds.quality[rows][:, cheapest].mean()))
        by: dict[str, list[tuple[float, float]]] = {}
        for res in results:
            stats = getattr(res, window)
            if stats is None:
                continue
            by.setdefault(label(res), []).append((stats["cost_usd"], stats["quality"]))
        for name, pts in by.items():
            out.setdefault(name, {})[window] = round(aiq(np.array(pts), c_min, c_max,
                                                         anchor), 5)
    return out


# ----------------------------------------------------------------------------- report
def goal_check(results: list[Result], ds: Dataset, goal_weight: float) -> dict:
    """The issue's goals on the llmrouter test split."""
    at = [r for r in results if r.weight == goal_weight]
    test = slice(ds.test_start, ds.n)
    q_single = ds.quality[test].mean(axis=0)
    c_single = ds.cost[test].mean(axis=0)
    best = int(np.argmax(q_single))
    ours = [r for r in at if r.router in OURS]
    best_ours = max(ours, key=lambda r: r.test["reward"])
    knn = max((r for r in at if r.router.startswith("knn")), key=lambda r: r.test["reward"])
    oracle = next(r for r in at if r.router == "oracle")
    goal1 = {
        "cost_weight": goal_weight,
        "best_single_model": ds.arms[best],
        "best_single_quality": float(q_single[best]),
        "best_single_cost_usd": float(c_single[best]),
        "oracle_cost_usd": oracle.test["cost_usd"],
        "oracle_cost_over_best_single": oracle.test["cost_usd"] / float(c_single[best]),
        "best_ours": label(best_ours),
        "best_ours_quality": best_ours.test["quality"],
        "best_ours_cost_usd": best_ours.test["cost_usd"],
        "best_ours_reward": best_ours.test["reward"],
        "knn": label(knn), "knn_reward": knn.test["reward"],
        "quality_met": best_ours.test["quality"] >= q_single[best],
        "half_cost_met": best_ours.test["cost_usd"] <= 0.5 * c_single[best],
        "reward_within_10pct_of_knn": best_ours.test["reward"] >= 0.9 * knn.test["reward"],
    }
    # Which weight the goal means: the oracle's test cost over the best single model's
    # at every weight of the sweep (ties to the cheaper model), and at w=0 with ties
    # broken at random (a quality-only oracle indifferent to cost).
    ratios = {}
    for w in sorted({r.weight for r in results}):
        oc = next(r for r in results if r.weight == w and r.router == "oracle")
        ratios[f"{w:g}"] = round(oc.test["cost_usd"] / float(c_single[best]), 4)
    q_test, cost_test = ds.quality[test], ds.cost[test]
    tied = np.isclose(q_test, q_test.max(axis=1, keepdims=True), rtol=0.0, atol=1e-12)
    ratios["0 (random ties)"] = round(float(((tied * cost_test).sum(axis=1)
                                             / tied.sum(axis=1)).mean())
                                      / float(c_single[best]), 4)
    goal1["oracle_cost_over_best_single_by_weight"] = ratios
    # Any of our runs, at any weight, meeting the quality-at-half-cost part?
    goal1["any_weight_quality_at_half_cost"] = [
        {"router": label(r), "cost_weight": r.weight, "quality": r.test["quality"],
         "cost_usd": r.test["cost_usd"]}
        for r in results if r.router in OURS and r.test["quality"] >= q_single[best]
        and r.test["cost_usd"] <= 0.5 * c_single[best]]
    goal2 = []
    for w in sorted({r.weight for r in results}):
        here = [r for r in results if r.weight == w]
        feats = {r.featurizer for r in here if r.router in PEERS}
        for feat in sorted(f for f in feats if f):
            ours_best = max((r for r in here if r.router in OURS and r.featurizer == feat),
                            key=lambda r: r.test["reward"])
            peer_best = max((r for r in here if r.router in PEERS and r.featurizer == feat),
                            key=lambda r: r.test["reward"])
            ours_all = max((r for r in here if r.router in OURS and r.featurizer == feat),
                           key=lambda r: r.all["reward"])
            peer_all = max((r for r in here if r.router in PEERS and r.featurizer == feat),
                           key=lambda r: r.all["reward"])
            goal2.append({"cost_weight": w, "featurizer": feat,
                          "ours": label(ours_best), "ours_test_reward": ours_best.test["reward"],
                          "best_peer": label(peer_best),
                          "peer_test_reward": peer_best.test["reward"],
                          "ahead_test": ours_best.test["reward"] > peer_best.test["reward"],
                          "ours_all_reward": ours_all.all["reward"],
                          "peer_all_reward": peer_all.all["reward"],
                          "best_peer_all": label(peer_all),
                          "ahead_all": ours_all.all["reward"] > peer_all.all["reward"]})
    return {"goal_1": goal1, "goal_2": goal2}


def _fmt_rows(results: list[Result], aiqs: dict, window: str) -> list[list[str]]:
    rows = []
    for res in sorted(results, key=lambda r: -getattr(r, window)["reward"]
                      if getattr(r, window) else 0):
        stats = getattr(res, window)
        if stats is None:
            continue
        sd = stats.get("reward_sd")
        rows.append([label(res), f"{stats['quality']:.4f}", f"{1000 * stats['cost_usd']:.4f}",
                     f"{stats['reward']:.4f}" + (f" ± {sd:.4f}" if sd else ""),
                     f"{stats['regret']:.1f}",
                     f"{aiqs.get(label(res), {}).get(window, float('nan')):.4f}"])
    return rows


VALUE_COLUMNS = ["data set", "router", "w", "file: all", "file: last 20%",
                 "shuffled: all (± sd)", "shuffled: last 20% (± sd)"]


def _online(results: list[Result]) -> list[Result]:
    return [r for r in results if r.value is not None and r.router in ONLINE]


def value_rows(results: list[Result]) -> list[list[str]]:
    """One row per data set, online router and weight: the routing value table."""
    def cell(v: dict | None, key: str) -> str:
        if not v:
            return ""
        sd = v.get(key + "_sd") if v.get("runs", 1) > 1 else None
        return f"{v[key]:+.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    rows = []
    for r in _online(results):
        f, sh = r.value["file_order"], r.value["shuffled"]
        rows.append([r.dataset, label(r), f"{r.weight:g}", cell(f, "all"),
                     cell(f, "last_20pct"), cell(sh, "all"), cell(sh, "last_20pct")])
    return rows


def value_table(results: list[Result]) -> dict:
    """{data set: {router: {weight: value summary}}} plus each router's sweep means."""
    out: dict[str, dict] = {}
    for r in _online(results):
        out.setdefault(r.dataset, {}).setdefault(label(r), {})[f"{r.weight:g}"] = r.value
    for routers in out.values():
        for by_weight in routers.values():
            sweep = [v for k, v in by_weight.items() if not k.startswith("mean")]
            for order in ("file_order", "shuffled"):
                vals = [v[order]["all"] for v in sweep if v.get(order)]
                if vals:
                    by_weight[f"mean_{order}"] = round(float(np.mean(vals)), 4)
    return out


COLUMNS = ["router", "quality", "cost $/1k q", "reward (± sd over seeds)", "regret",
           "AIQ"]


def markdown(document: dict, results: list[Result], aiqs: dict[str, dict],
             weights: dict[str, float]) -> str:
    lines = ["# compare_routers: results", "",
             "Generated by `"
             + " ".join(["python -m benchmarks.compare_routers",
                         document["settings"]["argv"]]).strip() + "`; "
             f"seeds {document['settings']['seeds']}, commit "
             f"`{(document.get('code') or {}).get('commit') or '?'}`.", "",
             "reward = quality - w x cost_usd; regret = sum over the window of the per-query "
             "oracle's reward minus the router's; AIQ = RouterBench's area under the "
             "non-decreasing convex hull of the router's (cost, quality) points over the "
             "sweep plus the cheapest single model's point (mixing with it is always "
             "possible), normalised over [cheapest, most expensive single model]. "
             "kNN is offline, full information, scored on test only.", "",
             "## Routing value", "",
             "(R_router - R_best single model in hindsight) / (R_oracle - R_best single), "
             "same rows, same weight: 0 = no better than the best fixed model, 1 = the "
             "per-query oracle. File order: mean over seeds; shuffled: mean ± sd over "
             f"{document['settings'].get('shuffles', 0)} shuffles.", "",
             "| " + " | ".join(VALUE_COLUMNS) + " |", "|" + "---|" * len(VALUE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in value_rows(results)]
    lines.append("")

    def table(rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out + [""]

    for name, w in weights.items():
        here = [r for r in results if r.dataset == name and r.weight == w]
        if not here:
            continue
        ds_aiq = aiqs[name]
        lines += [f"## {name}: test split, cost weight {w:g}", ""]
        lines += table(_fmt_rows(here, ds_aiq, "test"))
        lines += [f"## {name}: whole stream, cost weight {w:g}", ""]
        lines += table(_fmt_rows(here, ds_aiq, "all"))
        sweep = sorted({r.weight for r in results if r.dataset == name})
        routers = [label(r) for r in results if r.dataset == name and r.weight == sweep[0]]
        lines += [f"## {name}: test reward at every cost weight (mean over seeds)", "",
                  "| router | " + " | ".join(f"w={v:g}" for v in sweep) + " | AIQ test |",
                  "|" + "---|" * (len(sweep) + 2)]
        for lab in routers:
            cells = []
            for v in sweep:
                m = [r for r in results if r.dataset == name and r.weight == v
                     and label(r) == lab]
                cells.append(f"{m[0].test['reward']:.4f}" if m else "")
            lines.append(f"| {lab} | " + " | ".join(cells)
                         + f" | {ds_aiq.get(lab, {}).get('test', float('nan')):.4f} |")
        lines.append("")
    goals = document.get("goals")
    if goals:
        g1 = goals["goal_1"]
        lines += ["## Issue 8 goals (llmrouter test split)", "",
                  f"Goal weight w={g1['cost_weight']:g}: oracle cost = "
                  f"{g1['oracle_cost_over_best_single']:.2f} x the best single model's "
                  f"({g1['best_single_model']}, quality {g1['best_single_quality']:.4f}, "
                  f"${1000 * g1['best_single_cost_usd']:.4f}/1k). Oracle cost over the "
                  "best single model's by weight: "
                  + ", ".join(f"w={k}: {v:.2f}" for k, v in
                              g1.get("oracle_cost_over_best_single_by_weight", {}).items())
                  + ".", "",
                  f"- best of ours: {g1['best_ours']}: quality {g1['best_ours_quality']:.4f} "
                  f"(>= best single: {g1['quality_met']}), cost "
                  f"${1000 * g1['best_ours_cost_usd']:.4f}/1k (<= half: {g1['half_cost_met']}),"
                  f" reward {g1['best_ours_reward']:.4f} vs {g1['knn']} "
                  f"{g1['knn_reward']:.4f} (within 10%: {g1['reward_within_10pct_of_knn']})",
                  "", "| w | features | ours (best) | test reward | best peer | test reward "
                  "| ahead (test) | ahead (whole stream) |", "|---|---|---|---|---|---|---|---|"]
        for g in goals["goal_2"]:
            lines.append(f"| {g['cost_weight']:g} | {g['featurizer']} | {g['ours']} | "
                         f"{g['ours_test_reward']:.4f} | {g['best_peer']} | "
                         f"{g['peer_test_reward']:.4f} | {g['ahead_test']} | "
                         f"{g['ahead_all']} ({g['ours_all_reward']:.4f} vs "
                         f"{g['peer_all_reward']:.4f}) |")
        lines.append("")
    return "\n".join(lines)


def _plain(obj: object) -> object:
    """numpy scalars (np.bool_ from comparisons, np.float64) as plain JSON values."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def main(argv: list[str] | None = None) -> int:
    global ALPHA, TAG_RIDGE, TAG_RIDGES  # noqa: PLW0603 - read by the routers; one value per run
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_routers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="directory holding llmrouter/ and routellm/")
    parser.add_argument("--datasets", default="llmrouter,mmlu,gsm8k")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shuffles", type=int, default=5,
                        help="online passes over shuffled rows per router and weight, "
                             "beside the file-order passes (routing value only)")
    parser.add_argument("--cost-weights", default="0,100,300,1000,3000",
                        help="llmrouter sweep, quality points per USD")
    parser.add_argument("--mmlu-cost-weights", default="0,10,30,100",
                        help="mmlu sweep (GPT-4 costs ~$0.008 per query, 30x Mixtral)")
    parser.add_argument("--goal-weight", type=float, default=100.0)
    parser.add_argument("--mmlu-goal-weight", type=float, default=30.0)
    parser.add_argument("--gsm8k-cost-weights", default="0,10,30,100",
                        help="gsm8k sweep (same two models and prices as mmlu)")
    parser.add_argument("--mmlu-output-tokens", type=int, default=256)
    parser.add_argument("--mmlu-rows", type=int, default=6000,
                        help="first rows of the shuffled file (0 = all 14,042)")
    parser.add_argument("--routers", default=",".join(ONLINE))
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--featurizers", default=None,
                        help="comma-separated subset of hashing,minilm,hashing+tags,"
                             "hashing+tagblock (default: all there but the two tag "
                             "scenarios: llmrouter's cluster_id, mmlu's subject as a "
                             "request tag, in the text's coordinates or in their own block)")
    parser.add_argument("--tag-ridge", type=float, default=TAG_RIDGE,
                        help="our policies' tag_ridge on hashing+tagblock")
    parser.add_argument("--tag-ridges", default=None,
                        help="our policies' tag_ridges on hashing+tagblock (comma-"
                             "separated candidates, e.g. 1,1e6: tags per arm where they "
                             "predict)")
    parser.add_argument("--peers-minilm", action="store_true",
                        help="also run the peers on MiniLM (slow: mabwiser ~1 min/pass)")
    parser.add_argument("--knn-k", type=int, default=KNN_K)
    parser.add_argument("--peer-alpha", type=float, default=ALPHA,
                        help="alpha of river's and mabwiser's LinUCB (a sensitivity check)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 weights, hashing, 1,500 mmlu rows; writes nothing")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    ALPHA = args.peer_alpha
    TAG_RIDGE = args.tag_ridge
    TAG_RIDGES = (None if args.tag_ridges is None
                  else tuple(float(v) for v in args.tag_ridges.split(",")))
    if args.quick:
        args.seeds, args.cost_weights, args.mmlu_cost_weights = 1, "0,100", "0,30"
        args.gsm8k_cost_weights, args.shuffles = "0,30", 1
        args.no_minilm = True

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = args.data_root or data_root()
    online = [r for r in args.routers.split(",") if r]
    all_results: list[Result] = []
    aiqs: dict[str, dict] = {}
    datasets: dict[str, dict] = {}
    goals = None
    goal_weights: dict[str, float] = {}
    started = time.perf_counter()
    for name in args.datasets.split(","):
        if name == "llmrouter":
            if not (root / "llmrouter" / "train.jsonl").exists():
                log(f"no llmrouter data under {root}: skipped")
                continue
            ds = load_llmrouter(root / "llmrouter", minilm=not args.no_minilm)
            weights = [float(w) for w in args.cost_weights.split(",")]
            goal_w = args.goal_weight if args.goal_weight in weights else weights[-1]
        elif name == "mmlu":
            path = root / "routellm" / "mmlu.csv"
            if not path.exists():
                log(f"no {path}: skipped")
                continue
            ds = load_mmlu(path, args.mmlu_output_tokens)
            rows = 1500 if args.quick else args.mmlu_rows
            if 0 < rows < ds.n:
                ds = ds.head(rows)
            weights = [float(w) for w in args.mmlu_cost_weights.split(",")]
            goal_w = args.mmlu_goal_weight if args.mmlu_goal_weight in weights else weights[-1]
        elif name == "gsm8k":
            path = root / "routellm" / "gsm8k_responses.csv"
            if not path.exists():
                log(f"no {path}: skipped")
                continue
            ds = load_gsm8k(path, args.mmlu_output_tokens)
            weights = [float(w) for w in args.gsm8k_cost_weights.split(",")]
            goal_w = args.mmlu_goal_weight if args.mmlu_goal_weight in weights else weights[-1]
        else:
            parser.error(f"unknown dataset {name!r}")
        feats = [f for f in ds.features
                 if (f in args.featurizers.split(",") if args.featurizers is not None
                     else "+" not in f)]
        if not feats:
            log(f"{ds.name}: none of the featurizers {args.featurizers}: skipped")
            continue
        peer_feats = feats if args.peers_minilm else ["hashing"]
        log(f"{ds.name}: {ds.n} rows, {len(ds.arms)} models, test from row {ds.test_start}, "
            f"features {feats}")
        res = evaluate(ds, weights, args.seeds, online, feats, peer_feats, args.knn_k, log,
                       curve_weight=goal_w, shuffles=args.shuffles)
        all_results += res
        aiqs[ds.name] = add_aiq(res, ds)
        goal_weights[ds.name] = goal_w
        test = slice(ds.test_start, ds.n)
        datasets[ds.name] = {"rows": ds.n, "test_start": ds.test_start, "arms": ds.arms,
                             "cost_weights": weights, "goal_weight": goal_w, **ds.notes,
                             "single_test": {a: {"quality": float(ds.quality[test, j].mean()),
                                                 "cost_usd": float(ds.cost[test, j].mean())}
                                             for j, a in enumerate(ds.arms)},
                             "curve_every_rows": max(1, ds.n // CURVE_POINTS)}
        if ds.name == "llmrouter" and {r.router for r in res} >= {*OURS, *PEERS}:
            goals = goal_check(res, ds, goal_w)
        for window in ("test", "all"):
            here = [r for r in res if r.weight == goal_w and getattr(r, window)]
            print_table(f"{ds.name}, {window}, cost weight {goal_w:g}, mean over "
                        f"{args.seeds} seeds", COLUMNS, _fmt_rows(here, aiqs[ds.name], window))
    if not all_results:
        log("no data found; see benchmarks/README.md")
        return 2
    print_table("routing value (0 = best single model in hindsight, 1 = per-query oracle)",
                VALUE_COLUMNS, value_rows(all_results))
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f}s")
    settings = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                "seeds": args.seeds, "alpha_linucb_peers": ALPHA,
                "eps_greedy_epsilon": EPS_GREEDY, "knn_k": args.knn_k,
                "ours": "defaults of bandit.LinUCB / LinearThompson, with the price "
                        "estimate; ours-linucb-v1: " + repr(OLD_DEFAULTS),
                "shuffles": args.shuffles, "tag_ridge_on_tagblock": TAG_RIDGE,
                "tag_ridges_on_tagblock": TAG_RIDGES,
                "elapsed_s": round(elapsed, 1)}
    payload = {"settings": settings, "datasets": datasets,
               "value": value_table(all_results), "goals": goals, "aiq": aiqs,
               "results": [r.as_dict() for r in all_results]}
    if args.quick and args.out_dir is None:
        return 0
    payload = _plain(payload)
    path = write_results("compare_routers", payload, packages=PACKAGES,
                         results_dir=args.out_dir)
    import json

    document = json.loads(path.read_text())
    md = markdown(document, all_results, aiqs, goal_weights)
    md_path = (args.out_dir or RESULTS_DIR) / "compare_routers.md"
    md_path.write_text(md + "\n")
    log(f"results written to {path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
