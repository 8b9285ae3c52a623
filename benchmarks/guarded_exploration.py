"""Guarded exploration on LLMRouter: does the router ever fall below the baseline by
more than the bound, and what routing value does it keep?

One online pass under bandit feedback (default LinUCB on the hashing featurizer, each
model's mean price as its cost prior, as in ``benchmarks/compare_routers.py``), with
:class:`bandit.conservative.ConservativeGuard` around every decision and the baseline =
the best single model of the stream in hindsight at that cost weight (what a careful
team calls today). Along the stream it records the realized cumulative reward of the
router minus the baseline's on the same rows, against ``-max_loss x`` the baseline's
cumulative reward (the bound; 0 while that is negative), in file order and over
shuffles; the worst excess below the bound (``min_slack``, < 0 = violated) is the
number that matters. Also the routing value, (R_router - R_fixed) / (R_oracle -
R_fixed), guarded and unguarded.

    python -m benchmarks.guarded_exploration                  # 5 weights x (file + 5 shuffles)
    python -m benchmarks.guarded_exploration --quick          # 1 weight, 1 shuffle, no files

Writes ``benchmarks/results/guarded_exploration.json`` and ``docs/guarded_exploration.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bandit import LinUCB, Preferences
from bandit.base import ArmPrior
from bandit.conservative import ConservativeGuard, GuardConfig, GuardState
from benchmarks.common import REPO_ROOT, data_root, print_table, write_results
from benchmarks.compare_routers import load_llmrouter

PLOT = REPO_ROOT / "docs" / "guarded_exploration.png"


def routing_value(reward: np.ndarray, rewards: np.ndarray) -> float:
    """(R_router - R_fixed) / (R_oracle - R_fixed) over the rows given."""
    fixed = rewards.mean(axis=0).max()
    oracle = rewards.max(axis=1).mean()
    return float((reward.mean() - fixed) / (oracle - fixed)) if oracle > fixed else 0.0


def run(x: np.ndarray, quality: np.ndarray, cost: np.ndarray, arms: list[str], w: float,
        baseline: int, max_loss: float | None, seed: int,
        **policy_params: float) -> dict[str, np.ndarray]:
    """One pass; ``max_loss`` None runs the policy unguarded; ``policy_params`` go to
    :class:`LinUCB` (default: its defaults)."""
    policy = LinUCB(x.shape[1], seed=seed, **policy_params)
    for name, c in zip(arms, cost.mean(axis=0), strict=True):
        policy.add_arm(name, ArmPrior(cost_usd=float(c)))
    prefs = Preferences(quality=1.0, cost=w)
    guard = None if max_loss is None else ConservativeGuard(
        GuardConfig(baseline=arms[baseline], max_loss=max_loss))
    state = GuardState()
    n = x.shape[0]
    choices = np.empty(n, dtype=np.intp)
    overridden = np.zeros(n, dtype=bool)
    index = {a: j for j, a in enumerate(arms)}
    for t in range(n):
        if guard is None:
            arm = policy.decide(x[t], prefs).arm
        else:
            choice = guard.decide(policy, x[t], state, prefs)
            arm, overridden[t] = choice.arm, choice.overridden
        j = choices[t] = index[arm]
        q, c = float(quality[t, j]), float(cost[t, j])
        policy.update(arm, x[t], {"quality": q, "cost_usd": c}, now=float(t))
        if guard is not None:
            guard.observe(state, choice.record, prefs.reward(q, c))
    return {"choices": choices, "overridden": overridden, "value_estimate": state.value}


def evaluate(ds, w: float, max_loss: float, orders: list[np.ndarray], seed: int,
             log) -> tuple[dict, list[dict]]:
    rewards_all = ds.rewards(w)
    baseline = int(np.argmax(rewards_all.mean(axis=0)))
    per_order = []
    for o, order in enumerate(orders):
        x, q, c = ds.features["hashing"][order], ds.quality[order], ds.cost[order]
        r = rewards_all[order]
        rows = np.arange(len(order))
        out = {"order": "file" if o == 0 else f"shuffle {o}"}
        for mode, bound in (("guarded", max_loss), ("unguarded", None)):
            res = run(x, q, c, ds.arms, w, baseline, bound, seed + o)
            got = r[rows, res["choices"]]
            gap = np.cumsum(got - r[:, baseline])
            # The guard's own allowance: a fraction of the baseline's cumulative reward
            # where that is positive, none (never behind) while it is not.
            limit = -max_loss * np.maximum(np.cumsum(r[:, baseline]), 0.0)
            slack = gap - limit
            tail = slice(int(0.8 * len(order)), len(order))
            out[mode] = {
                "routing_value": routing_value(got, r),
                "routing_value_last20": routing_value(got[tail], r[tail]),
                "min_slack": float(slack.min()), "min_slack_row": int(slack.argmin()),
                "final_gap": float(gap[-1]), "final_bound": float(limit[-1]),
                "baseline_share": float((res["choices"] == baseline).mean()),
                "overridden_share": float(res["overridden"].mean()),
                "dr_value_estimate": float(res["value_estimate"]),
                "gap_curve": gap, "bound_curve": limit,
            }
        log(f"w={w:g} {out['order']}: guarded value {out['guarded']['routing_value']:+.3f} "
            f"min slack {out['guarded']['min_slack']:+.3f}; unguarded value "
            f"{out['unguarded']['routing_value']:+.3f} min slack "
            f"{out['unguarded']['min_slack']:+.3f}")
        per_order.append(out)
    summary = {"cost_weight": w, "baseline": ds.arms[baseline], "max_exploration_loss": max_loss}
    for mode in ("guarded", "unguarded"):
        vals = [p[mode] for p in per_order]
        summary[mode] = {
            "routing_value_file": vals[0]["routing_value"],
            "routing_value_shuffled_mean": float(np.mean([v["routing_value"] for v in vals[1:]]))
            if len(vals) > 1 else None,
            "min_slack_any_order": float(min(v["min_slack"] for v in vals)),
            "never_below_bound": bool(all(v["min_slack"] >= 0 for v in vals)),
            "baseline_share_mean": float(np.mean([v["baseline_share"] for v in vals])),
        }
    return summary, per_order


def plot(curves: dict[float, list[dict]], max_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted(curves)
    cols = min(3, len(weights))
    rows = -(-len(weights) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    for ax, w in zip(axes.flat, weights, strict=False):
        for o, out in enumerate(curves[w]):
            first = o == 0
            ax.plot(out["unguarded"]["gap_curve"], color="#d9534f", lw=1.0 if first else 0.5,
                    alpha=0.8 if first else 0.3, label="unguarded" if first else None)
            ax.plot(out["guarded"]["bound_curve"], color="k", ls="--", lw=0.8,
                    alpha=1.0 if first else 0.35,
                    label=f"bound: -{max_loss:g} x baseline's reward" if first else None)
            ax.plot(out["guarded"]["gap_curve"], color="#1f5fbf", lw=1.6 if first else 0.7,
                    alpha=1.0 if first else 0.5, label="guarded" if first else None)
        ax.axhline(0, color="#999", lw=0.5)
        ax.set_title(f"cost weight {w:g}", fontsize=10)
        ax.set_xlabel("row of the stream")
        ax.set_ylabel("cum. reward, router - baseline")
        low = min(min(o["guarded"]["gap_curve"].min(), o["guarded"]["bound_curve"].min())
                  for o in curves[w])
        high = max(o["guarded"]["gap_curve"].max() for o in curves[w])
        ax.set_ylim(1.5 * low - 2, max(1.3 * high, 5))
    for ax in list(axes.flat)[len(weights):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("LLMRouter, one online pass, baseline = best single model: router minus "
                 "baseline (thick: file order, thin: 5 shuffles); unguarded runs go far "
                 "below the axis", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guarded_exploration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-weights", default="0,100,300,1000,3000")
    parser.add_argument("--max-loss", type=float, default=0.02)
    parser.add_argument("--shuffles", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.cost_weights, args.shuffles = "100", 1

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = data_root() / "llmrouter"
    if not (root / "train.jsonl").exists():
        log(f"no llmrouter data under {root}; see benchmarks/README.md")
        return 2
    ds = load_llmrouter(root, minilm=False)
    rng = np.random.default_rng(args.seed)
    orders = [np.arange(ds.n)] + [rng.permutation(ds.n) for _ in range(args.shuffles)]
    started = time.perf_counter()
    summaries, curves = [], {}
    for w in (float(v) for v in args.cost_weights.split(",")):
        summary, per_order = evaluate(ds, w, args.max_loss, orders, args.seed, log)
        summaries.append(summary)
        curves[w] = per_order
    rows = [[f"{s['cost_weight']:g}", s["baseline"],
             f"{s['guarded']['routing_value_file']:+.3f}",
             f"{s['guarded']['routing_value_shuffled_mean']:+.3f}"
             if s["guarded"]["routing_value_shuffled_mean"] is not None else "-",
             f"{s['unguarded']['routing_value_file']:+.3f}",
             f"{s['guarded']['min_slack_any_order']:+.2f}",
             f"{s['unguarded']['min_slack_any_order']:+.2f}",
             f"{s['guarded']['baseline_share_mean']:.2f}"] for s in summaries]
    print_table(f"llmrouter, guard max_exploration_loss={args.max_loss:g}, file order + "
                f"{args.shuffles} shuffles",
                ["weight", "baseline", "value guarded (file)", "value guarded (shuf)",
                 "value unguarded (file)", "min slack guarded", "min slack unguarded",
                 "baseline share"], rows)
    if args.quick:
        return 0
    plot(curves, args.max_loss, PLOT)
    per_order = {f"{w:g}": [{"order": o["order"],
                             **{mode: {k: v for k, v in o[mode].items()
                                       if not k.endswith("_curve")}
                                for mode in ("guarded", "unguarded")}}
                            for o in outs] for w, outs in curves.items()}
    payload = {"settings": {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                            "policy": "LinUCB defaults, hashing 64 dims, mean price prior",
                            "guard": "ConservativeGuard defaults (z=2)",
                            "max_exploration_loss": args.max_loss, "shuffles": args.shuffles,
                            "elapsed_s": round(time.perf_counter() - started, 1)},
               "summary": summaries, "per_order": per_order, "plot": str(PLOT.relative_to(
                   REPO_ROOT))}
    path = write_results("guarded_exploration", payload, packages=("numpy", "matplotlib"))
    log(f"results written to {path} and {PLOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
