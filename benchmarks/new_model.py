"""How fast a model added mid-stream wins the traffic it is best for.

Construction (synthetic, on the real LLMRouter rows; stated plainly because the data has
no model that appears mid-stream): the 9 models are replayed in a shuffled order
(bandit feedback, price estimates as in ``compare_routers``). At row ``--add-at``
(default 3,000) a tenth model, ``specialist``, is registered. On one task cluster
(``--cluster``, default 1 of the train split's ``cluster_id``) it scores, per query, the
better of the two strongest models (llama-3.1-nemotron-51b and
llama-3.3-nemotron-super-49b): a fine-tune that is at least as good as the best model on
its task and never worse. On every other query it scores what the weakest model
(llama3-chatqa-1.5-8b) scores: useless outside its task. It is priced like the small
models ($0.2 / $0.2 per Mtok), so it is the best choice on its cluster at every cost
weight, and one of the worst elsewhere.

Two contexts (``--featurizers``): ``hashing``, the text alone, and ``hashing+tagblock``,
the text plus each row's ``cluster_id`` as a request tag in its own block
(:func:`bandit.featurize.append_tag_block`; the policy has ``tag_dims`` and
``tag_ridge``), what a gateway that knows the app or route of a request passes.

Reported per context, cost weight and order seed: the specialist's share of its cluster's
queries in windows of that cluster's queries after it was added (0-100, 100-200,
200-300, 300-600), its share of the other clusters' queries, and the routing value
(:func:`bandit.replay.routing_value`) of the whole run against the 10-model oracle.
The goal (issue 13): >= 50% of the cluster's traffic within 300 of its queries, i.e. in
the 200-300 window.

    python -m benchmarks.new_model [--policy select] [--seeds 3] [--cost-weights 0,300]
        [--shared-ridge 1] [--arm-prior hierarchy --out-name new_model_hierarchy]
        [--cold-start-share 1 --out-name new_model_select_cold_first]
        [--shared-difficulty both --out-name new_model_difficulty]
        [--cold-start-by arm,tags,context --out-name new_model_cold_start]

``--policy`` is the policy kind replayed: ``select`` (the default policy of ``serve`` and
``replay``, :class:`bandit.SelectiveThompson`) or ``linucb`` (the previous default).
``--shared-difficulty`` (``select`` only): ``off`` (the default), ``on``
(``SelectiveThompson(shared_difficulty=True)``: every model, the specialist from its
first call, learns its quality net of a query difficulty shared by all of them) or
``both`` (each run without and then with it, in the same process).
``--cold-start-by`` (comma-separated; default the policy's default): the policy's
``cold_start_by``, each value a run on the same order: ``added-on-tags`` (the default:
per tag value for a model added after the policy started learning, the specialist
here), ``arm`` (a new model's cold start counted in total), ``tags`` (also per tag value,
for every model), ``new-on-tags`` (per tag value for a model newer than the tag only) or
``context`` (also along the whole context's direction).
Writes ``benchmarks/results/new_model_select.json`` (``select``) or ``new_model.json``
(``linucb``), or ``--out-name``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np

from bandit import LinUCB, Preferences, SelectiveThompson
from bandit.base import ArmPrior
from bandit.replay import routing_value
from benchmarks.common import add_output_options, data_root, print_table, write_results
from benchmarks.compare_routers import TAG_RIDGE, Inputs, load_llmrouter

STRONG = ("llama-3.1-nemotron-51b-instruct", "llama-3.3-nemotron-super-49b-v1")
WEAK = "llama3-chatqa-1.5-8b"
SMALL_PRICE_OF = "llama-3.1-8b-instruct"  # $0.2 / $0.2 per Mtok
WINDOWS = ((0, 100), (100, 200), (200, 300), (300, 600))
POLICIES = {"select": SelectiveThompson, "linucb": LinUCB}


def clusters(root) -> np.ndarray:
    """The train split's cluster_id per row of the llmrouter replay (-1 for test rows)."""
    out = []
    for split in ("train", "test"):
        with (root / "llmrouter" / f"{split}.jsonl").open(encoding="utf-8") as fh:
            out += [-1 if json.loads(line).get("cluster_id") is None
                    else int(json.loads(line)["cluster_id"]) for line in fh if line.strip()]
    return np.array(out)


def run(quality: np.ndarray, cost: np.ndarray, x: np.ndarray, arms: list[str], add_at: int,
        weight: float, seed: int, policy_kind: str = "select",
        **config: object) -> np.ndarray:
    """One pass of ``policy_kind`` (``POLICIES``); the last arm exists from row
    ``add_at`` on. Returns the choices."""
    policy = POLICIES[policy_kind](x.shape[1], seed=seed, **config)
    k = len(arms)
    for j in range(k - 1):
        policy.add_arm(arms[j], ArmPrior(cost_usd=float(cost[:, j].mean())))
    prefs = Preferences(quality=1.0, cost=weight)
    choices = np.empty(len(quality), dtype=np.intp)
    live = k - 1
    for t in range(len(quality)):
        if t == add_at:
            policy.add_arm(arms[-1], ArmPrior(cost_usd=float(cost[:, -1].mean())))
            live = k
        batch = policy.decide_batch(x[t], prefs, arms[:live], cost_estimate=cost[t, :live],
                                    propensities=False)
        j = int(batch.choices[0])
        choices[t] = j
        policy.update(arms[j], x[t], {"quality": float(quality[t, j]),
                                      "cost_usd": float(cost[t, j])},
                      now=float(t), cost_estimate=float(cost[t, j]))
    return choices


def span_pulls(choices: np.ndarray, target: np.ndarray, add_at: int, n: int,
               specialist: int) -> dict[str, int]:
    """The specialist's calls from ``add_at`` up to its cluster's ``n``-th
    query after it: on its cluster and on the others in the same rows."""
    rows = np.arange(len(choices)) >= add_at
    own = np.flatnonzero(rows & target)
    if len(own) > n:
        rows &= np.arange(len(choices)) < own[n]
    spec = choices == specialist
    return {"own_cluster": int((spec & rows & target).sum()),
            "other_clusters": int((spec & rows & ~target).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.new_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="select", choices=tuple(POLICIES),
                        help="policy kind replayed (default select, the default policy)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cost-weights", default="0,300")
    parser.add_argument("--add-at", type=int, default=3000)
    parser.add_argument("--cluster", type=int, default=1)
    parser.add_argument("--featurizers", default="hashing,hashing+tagblock")
    parser.add_argument("--tag-ridge", type=float, default=TAG_RIDGE)
    parser.add_argument("--shared-ridge", type=float, default=None,
                        help="the policy's shared_ridge (default: its default, None)")
    parser.add_argument("--cold-start-share", type=float, default=None,
                        help="the policy's cold_start_share (default: its default, 0.1; "
                             "1: a new model's first 10 calls come before the main branch)")
    parser.add_argument("--arm-prior", default="declared", choices=("declared", "hierarchy"),
                        help="PolicyConfig.arm_prior: where the specialist's quality prior "
                             "comes from (hierarchy: predicted from its price and the "
                             "other models' feedback, bandit.hierarchy)")
    parser.add_argument("--shared-difficulty", default="off", choices=("off", "on", "both"),
                        help="select's shared_difficulty: off (default), on, or both "
                             "(each run without, then with)")
    parser.add_argument("--cold-start-by", default=None,
                        help="comma-separated values of the policy's cold_start_by "
                             "(added-on-tags, arm, tags, new-on-tags, context), each a "
                             "run (default: its default)")
    add_output_options(parser, None, "results file name (default new_model_select for "
                                     "select, new_model for linucb)")
    args = parser.parse_args(argv)
    if args.shared_difficulty != "off" and args.policy != "select":
        parser.error("--shared-difficulty: only with --policy select")
    difficulty = {"off": [False], "on": [True], "both": [False, True]}[args.shared_difficulty]
    cold_by = [None] if args.cold_start_by is None else args.cold_start_by.split(",")
    root = data_root()
    ds = load_llmrouter(root / "llmrouter", minilm=False)
    cl = clusters(root)
    idx = {a: j for j, a in enumerate(ds.arms)}
    target = cl == args.cluster
    spec_q = np.where(target, ds.quality[:, [idx[s] for s in STRONG]].max(axis=1),
                      ds.quality[:, idx[WEAK]])
    quality = np.column_stack([ds.quality, spec_q])
    cost = np.column_stack([ds.cost, ds.cost[:, idx[SMALL_PRICE_OF]]])
    arms = [*ds.arms, "specialist"]
    rows, results = [], []
    started = time.perf_counter()
    for feat, w, seed, diff, by in itertools.product(
            args.featurizers.split(","), [float(v) for v in args.cost_weights.split(",")],
            range(args.seeds), difficulty, cold_by):
        label = (f"{feat}+difficulty" if diff else feat) + (f" by={by}" if by else "")
        inputs = Inputs.of(ds, feat)
        config: dict[str, object] = {"shared_ridge": args.shared_ridge,
                                     "arm_prior": args.arm_prior}
        if args.cold_start_share is not None:
            config["cold_start_share"] = args.cold_start_share
        if diff:
            config["shared_difficulty"] = True
        if by is not None:
            config["cold_start_by"] = by
        if inputs.tag_dims:
            config.update(tag_dims=inputs.tag_dims, tag_ridge=args.tag_ridge)
        perm = np.random.default_rng(seed).permutation(ds.n)
        ch = run(quality[perm], cost[perm], inputs.x[perm], arms, args.add_at, w, seed,
                 args.policy, **config)
        after = np.arange(ds.n) >= args.add_at
        mine = ch[after & target[perm]] == len(arms) - 1
        shares = {f"{a}-{b}": round(float(mine[a:b].mean()), 3) if len(mine) > a
                  else None for a, b in WINDOWS}
        others = float((ch[after & ~target[perm]] == len(arms) - 1).mean())
        r = (quality - w * cost)[perm]
        value = routing_value(r[args.add_at:], ch[args.add_at:])["value"]
        results.append({"featurizer": label, "cost_weight": w, "seed": seed,
                        "cluster_share": shares,
                        "specialist_pulls_first_300": span_pulls(
                            ch, target[perm], args.add_at, 300, len(arms) - 1),
                        "other_share": round(others, 4),
                        "cluster_queries_after_add": int(len(mine)),
                        "value_after_add": value})
        rows.append([label, f"{w:g}", str(seed), *(f"{v:.0%}" if v is not None else "-"
                                            for v in shares.values()),
                     f"{others:.1%}", f"{value:+.3f}"])
        print(f"{label} w={w:g} seed={seed}: {shares} other {others:.1%} value {value:+.3f}",
              file=sys.stderr, flush=True)
    print_table(f"specialist added at row {args.add_at}: its share of cluster "
                f"{args.cluster}'s queries after it was added",
                ["context", "w", "seed", *(f"{a}-{b}" for a, b in WINDOWS), "other clusters",
                 "value after add"], rows)
    met: dict[str, list[bool]] = {}
    for r in results:
        share = r["cluster_share"]["200-300"]
        met.setdefault(r["featurizer"], []).append(share is not None and share >= 0.5)
    payload = {"settings": {"add_at": args.add_at, "cluster": args.cluster,
                            "seeds": args.seeds,
                            "policy": f"{args.policy} defaults",
                            "shared_ridge": args.shared_ridge, "tag_ridge": args.tag_ridge,
                            "arm_prior": args.arm_prior,
                            "cold_start_share": args.cold_start_share,
                            "shared_difficulty": args.shared_difficulty,
                            "cold_start_by": args.cold_start_by,
                            "construction": __doc__.split("\n\n")[1].replace("\n", " "),
                            "elapsed_s": round(time.perf_counter() - started, 1)},
               "goal_met_runs": {f: f"{sum(m)} of {len(m)}" for f, m in met.items()},
               "results": results}
    out_name = args.out_name or ("new_model" if args.policy == "linucb"
                                 else f"new_model_{args.policy}")
    write_results(out_name, payload,
                  results_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
