"""The figures of docs/results.md (matplotlib, Agg, PNG in docs/).

* ``frontier.png``: quality versus cost of every router across the cost-weight sweep
  (test split), from ``benchmarks/results/compare_routers.json``;
* ``regret.png``: cumulative regret over the stream at the goal cost weight, from the
  same file;
* ``preference_change.png``: share of traffic per model over time on llmrouter for a
  tenant whose cost weight goes from 0 to 1000 half way (the same router object carries
  on; ours get new ``Preferences``, the peers a new reward);
* ``drift.png``: llmrouter at cost weight 0 where the best model's quality drops to
  0.2 x its value for the second half of the stream; rolling regret per query against
  the oracle of the drifted data, and the drifted model's share of traffic.

The two scenarios are run here (hashing features, ``--seeds`` seeds, about 10 s per
seed and scenario); their summaries are printed and written to
``benchmarks/results/compare_routers_scenarios.json``.

    python -m benchmarks.plots [--seeds 3] [--only frontier,regret,preference,drift]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import REPO_ROOT, RESULTS_DIR, data_root, print_table, write_results  # noqa: E402
from benchmarks.compare_routers import (  # noqa: E402
    ONLINE,
    Dataset,
    Inputs,
    load_llmrouter,
    make_router,
    run_online,
)

DOCS = REPO_ROOT / "docs"
STYLE = {
    "ours-linucb": ("#d62728", "-", "o"),
    "ours-thompson": ("#ff7f0e", "-", "s"),
    "river-linucb": ("#1f77b4", "--", "^"),
    "mabwiser-linucb": ("#9467bd", "--", "v"),
    "vw-cb-adf": ("#2ca02c", "--", "D"),
    "eps-greedy": ("#8c564b", ":", "P"),
    "random": ("#7f7f7f", ":", "x"),
    "oracle": ("#000000", "-", "*"),
    "knn": ("#17becf", "-.", "h"),
}
PRETTY = {
    "ours-linucb": "ours LinUCB", "ours-thompson": "ours LinearThompson",
    "river-linucb": "river LinUCBDisjoint", "mabwiser-linucb": "mabwiser LinUCB",
    "vw-cb-adf": "VW cb_explore_adf", "eps-greedy": "epsilon-greedy (no context)",
    "random": "random", "oracle": "per-query oracle",
}


def _pretty(router: str, feat: str | None) -> str:
    base = PRETTY.get(router, "kNN full-info" if router.startswith("knn") else router)
    return base + (f" [{feat}]" if feat else "")


MINILM_COLORS = {"ours-linucb": "#7a0000", "ours-thompson": "#a05a00", "knn": "#0b5563"}
# MiniLM through the prototype map (bandit.featurize.PrototypeMap)
PROTO_COLORS = {"ours-linucb": "#e377c2", "ours-thompson": "#bcbd22", "knn": "#393b79"}


def _style(router: str, feat: str | None) -> tuple[str, str, str]:
    key = "knn" if router.startswith("knn") else router
    color, ls, marker = STYLE[key]
    if feat == "minilm":
        color = MINILM_COLORS.get(key, color)
        ls = (0, (1, 1)) if key == "knn" else "-."
    elif feat is not None and feat.startswith("minilm-proto"):
        color = PROTO_COLORS.get(key, color)
        ls = (0, (3, 1, 1, 1)) if key == "knn" else "-"
    return color, ls, marker


def _draw_frontier(ax: plt.Axes, res: list[dict], annotate: bool) -> None:
    groups: dict[tuple[str, str | None], list[dict]] = {}
    for r in res:
        groups.setdefault((r["router"], r["featurizer"]), []).append(r)
    singles_done = False
    for (router, feat), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["cost_weight"])
        cost = [1000 * r["test"]["cost_usd"] for r in rs]
        qual = [r["test"]["quality"] for r in rs]
        if router.startswith("single:"):
            ax.scatter(cost[:1], qual[:1], marker="o", s=36, facecolors="none",
                       edgecolors="#444444", zorder=3,
                       label=None if singles_done else "single models")
            ax.annotate(router.split(":", 1)[1], (cost[0], qual[0]), fontsize=7,
                        xytext=(4, -3), textcoords="offset points", color="#444444")
            singles_done = True
            continue
        color, ls, marker = _style(router, feat)
        ax.plot(cost, qual, color=color, linestyle=ls, marker=marker, markersize=6,
                linewidth=1.6, label=_pretty(router, feat))
        if annotate and router == "ours-linucb" and feat in ("minilm", "hashing",
                                                              "minilm-proto"):
            for r, c, q in ((rs[0], cost[0], qual[0]), (rs[-1], cost[-1], qual[-1])):
                ax.annotate(f"w={r['cost_weight']:g}", (c, q), fontsize=7,
                            xytext=(4, 4), textcoords="offset points", color=color)
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)


def plot_frontier(doc: dict, out: Path) -> None:
    """Top row: everything; bottom row: zoomed on the learned routers."""
    names = [n for n in ("llmrouter", "mmlu") if n in doc["datasets"]]
    fig, axes = plt.subplots(2, len(names), figsize=(7.5 * len(names), 11), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 3]})
    for col, name in enumerate(names):
        res = [r for r in doc["results"] if r["dataset"] == name]
        full, zoom = axes[0][col], axes[1][col]
        _draw_frontier(full, res, annotate=False)
        _draw_frontier(zoom, res, annotate=True)
        learned = [r["test"]["quality"] for r in res
                   if not r["router"].startswith(("single:", "oracle", "random"))]
        pad = 0.1 * (max(learned) - min(learned))
        zoom.set_ylim(min(learned) - pad, max(learned) + pad)
        full.set_title(f"{name}: quality vs cost over the cost-weight sweep (test split)",
                       fontsize=10)
        zoom.set_title(f"{name}: zoom on the learned routers (w = cost weight; "
                       "cost falls as w rises)", fontsize=10)
        for ax in (full, zoom):
            ax.set_ylabel("mean quality (test split)")
        zoom.set_xlabel("mean cost per 1,000 queries (USD, log scale)")
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_regret(doc: dict, out: Path) -> None:
    names = [n for n in ("llmrouter", "mmlu") if n in doc["datasets"]]
    fig, axes = plt.subplots(1, len(names), figsize=(7.5 * len(names), 5.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        meta = doc["datasets"][name]
        w, every = meta["goal_weight"], meta["curve_every_rows"]
        res = [r for r in doc["results"] if r["dataset"] == name and r["cost_weight"] == w
               and r.get("regret_curve")]
        singles = [r for r in res if r["router"].startswith("single:")]
        best = min(singles, key=lambda r: r["regret_curve"][-1])
        for r in res:
            router, feat = r["router"], r["featurizer"]
            if router.startswith("single:") and r is not best:
                continue
            curve = np.array(r["regret_curve"])
            rows = every * np.arange(1, len(curve) + 1)
            if r is best:
                ax.plot(rows, curve, color="#444444", linestyle=(0, (5, 2)), linewidth=1.4,
                        label="best single model (named in the title)")
                continue
            color, ls, _ = _style(router, feat)
            ax.plot(rows, curve, color=color, linestyle=ls, linewidth=1.6,
                    label=_pretty(router, feat))
        ax.axvline(meta["test_start"], color="#999999", linewidth=0.8)
        ax.text(meta["test_start"], ax.get_ylim()[1] * 0.97, " test split", fontsize=8,
                va="top", color="#666666")
        ax.set_xlabel("queries")
        ax.set_ylabel("cumulative regret against the per-query oracle")
        ax.set_title(f"{name}: cumulative regret, cost weight {w:g} (mean over seeds)\n"
                     f"best single model: {best['router'].split(':', 1)[1]}", fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)


def _runs(ds: Dataset, quality: np.ndarray, weights: np.ndarray, seeds: int,
          routers: list[str]) -> dict[str, list[np.ndarray]]:
    inputs = Inputs(ds.features["hashing"])
    out: dict[str, list[np.ndarray]] = {}
    for name in routers:
        out[name] = [run_online(make_router(name, inputs, ds, seed), quality, ds.cost,
                                weights) for seed in range(seeds)]
        print(f"  {name}: {seeds} runs", file=sys.stderr, flush=True)
    return out


def preference_change(ds: Dataset, seeds: int, out: Path, high: float = 1000.0) -> dict:
    n = ds.n
    half = n // 2
    weights = np.where(np.arange(n) < half, 0.0, high)
    r = ds.quality - weights[:, None] * ds.cost
    routers = list(ONLINE)
    runs = _runs(ds, ds.quality, weights, seeds, routers)
    runs["oracle"] = [np.argmax(r - 1e-9 * ds.cost, axis=1)]
    bins = 200
    edges = np.arange(0, n + 1, bins)
    k = len(ds.arms)
    colors = plt.get_cmap("tab10")(np.arange(k))
    panels = ["oracle", *routers]
    price = ds.cost.mean(axis=0) / ds.cost.mean(axis=0).min()
    model_labels = [f"{a} ({p:.1f}x)" for a, p in zip(ds.arms, price, strict=True)]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), sharex=True, sharey=True)
    summary = {}
    for ax, name in zip(axes.flat, panels, strict=False):
        share = np.zeros((len(edges) - 1, k))
        for ch in runs[name]:
            for b in range(len(edges) - 1):
                share[b] += np.bincount(ch[edges[b]:edges[b + 1]], minlength=k) / bins
        share /= len(runs[name])
        mids = (edges[:-1] + edges[1:]) / 2
        ax.stackplot(mids, share.T, colors=colors, labels=model_labels, alpha=0.9)
        ax.axvline(half, color="black", linewidth=1.2, linestyle="--")
        ax.set_title(_pretty(name, None), fontsize=10)
        ax.set_xlim(0, n)
        ax.set_ylim(0, 1)
        idx = np.arange(n)
        cost_after = [float(ds.cost[idx, ch][half:half + 500].mean()) for ch in runs[name]]
        rew = [float(r[idx, ch][half:half + 500].mean()) for ch in runs[name]]
        summary[name] = {"cost_usd_first_500_after": float(np.mean(cost_after)),
                         "reward_first_500_after": float(np.mean(rew)),
                         "reward_second_half": float(np.mean(
                             [r[idx, ch][half:].mean() for ch in runs[name]])),
                         "share_expensive_first_500_after": float(np.mean(
                             [(ds.cost[idx, ch][half:half + 500]
                               > 2 * ds.cost[half:half + 500].min(axis=1)).mean()
                              for ch in runs[name]]))}
    for ax in axes[1]:
        ax.set_xlabel("queries (cost weight 0 -> 1000 at the dashed line)")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of traffic (bins of 200)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    spare = axes.flat[len(panels)]  # the eighth panel holds the legend
    spare.axis("off")
    spare.legend(handles, labels, loc="center", fontsize=9, frameon=False,
                 title="model (mean cost relative to the cheapest)")
    fig.suptitle("llmrouter: share of traffic per model when the tenant's cost weight goes "
                 f"from 0 to {high:g} half way (same router object; mean over {seeds} seeds)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return summary


def drift(ds: Dataset, seeds: int, out: Path, weight: float = 0.0,
          factor: float = 0.2, window: int = 300) -> dict:
    """The best model of the first half (by reward) keeps ``factor`` of its quality in
    the second half. Plotted against the oracle of the drifted data (the task mix itself
    changes along the stream, so raw reward would mix both effects)."""
    n = ds.n
    half = n // 2
    weights = np.full(n, weight)
    before = ds.quality[:half] - weight * ds.cost[:half]
    victim = int(np.argmax(before.mean(axis=0)))
    quality = ds.quality.copy()
    quality[half:, victim] *= factor
    r = quality - weight * ds.cost
    routers = list(ONLINE)
    runs = _runs(ds, quality, weights, seeds, routers)
    oracle = np.argmax(r - 1e-9 * ds.cost, axis=1)
    best_row = r[np.arange(n), oracle]
    after = r[half:].mean(axis=0)
    best_after = int(np.argmax(after))
    idx = np.arange(n)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    kernel = np.ones(window) / window
    xs = np.arange(window, n + 1)
    summary = {}
    for name in routers:
        rew = np.mean([r[idx, ch] for ch in runs[name]], axis=0)
        share = np.mean([(ch == victim).astype(float) for ch in runs[name]], axis=0)
        color, ls, _ = _style(name, None)
        top.plot(xs, np.convolve(best_row - rew, kernel, mode="valid"), color=color,
                 linestyle=ls, linewidth=1.5, label=_pretty(name, None))
        bottom.plot(xs, np.convolve(share, kernel, mode="valid"), color=color, linestyle=ls,
                    linewidth=1.5)
        victim_share = [float((ch[half:half + 500] == victim).mean()) for ch in runs[name]]
        summary[name] = {"regret_per_query_before": float((best_row - rew)[:half].mean()),
                         "regret_per_query_first_500_after":
                             float((best_row - rew)[half:half + 500].mean()),
                         "regret_per_query_last_1000": float((best_row - rew)[-1000:].mean()),
                         "victim_share_last_500_before":
                             float(np.mean([(ch[half - 500:half] == victim).mean()
                                            for ch in runs[name]])),
                         "victim_share_first_500_after": float(np.mean(victim_share)),
                         "rows_until_victim_share_below_10pct": _rows_until(
                             runs[name], victim, half)}
    for j, style in ((victim, (0, (5, 2))), (best_after, (0, (1, 2)))):
        top.plot(xs, np.convolve(best_row - r[:, j], kernel, mode="valid"), color="#444444",
                 linestyle=style, linewidth=1.1, label=f"single {ds.arms[j]}")
    for ax in (top, bottom):
        ax.axvline(half, color="black", linewidth=1.0, linestyle="--")
        ax.grid(True, alpha=0.3)
    top.text(half, top.get_ylim()[1], f" {ds.arms[victim]}: quality x{factor:g} from here",
             va="top", fontsize=9)
    top.set_ylabel(f"regret per query (oracle - router),\nrolling mean over {window}")
    bottom.set_ylabel(f"share of traffic to\n{ds.arms[victim]}")
    bottom.set_xlabel("queries")
    top.set_title(f"llmrouter drift: the best model's quality drops to {factor:g}x at the "
                  f"middle (cost weight {weight:g}, mean over {seeds} seeds); lower is better",
                  fontsize=10)
    top.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"victim": ds.arms[victim], "best_after": ds.arms[best_after],
            "cost_weight": weight, "routers": summary}


def _rows_until(runs: list[np.ndarray], victim: int, half: int, window: int = 200,
                share: float = 0.1) -> float | None:
    """Rows after the drift until the drifted model's share over the next ``window``
    rows falls below ``share`` (mean over seeds; None if it never does)."""
    found = []
    for ch in runs:
        hit = (ch[half:] == victim).astype(float)
        roll = np.convolve(hit, np.ones(window) / window, mode="valid")
        below = np.flatnonzero(roll < share)
        if below.size == 0:
            return None
        found.append(int(below[0]))
    return float(np.mean(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="frontier,regret,preference,drift")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "compare_routers.json")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    DOCS.mkdir(exist_ok=True)
    if only & {"frontier", "regret"}:
        doc = json.loads(args.results.read_text())
        if "frontier" in only:
            plot_frontier(doc, DOCS / "frontier.png")
        if "regret" in only:
            plot_regret(doc, DOCS / "regret.png")
    scenarios = {}
    if only & {"preference", "drift"}:
        ds = load_llmrouter(data_root() / "llmrouter", minilm=False)
        if "preference" in only:
            summary = preference_change(ds, args.seeds, DOCS / "preference_change.png")
            scenarios["preference_change"] = {"cost_weight": [0, 1000], "routers": summary}
            print_table("Preference change at the middle (w 0 -> 1000)",
                        ["router", "cost $/1k, first 500 after", "reward, first 500 after",
                         "reward, 2nd half"],
                        [[k, f"{1000 * v['cost_usd_first_500_after']:.4f}",
                          f"{v['reward_first_500_after']:.4f}",
                          f"{v['reward_second_half']:.4f}"] for k, v in summary.items()])
        if "drift" in only:
            summary = drift(ds, args.seeds, DOCS / "drift.png")
            scenarios["drift"] = {"factor": 0.2, **summary}
            print_table(f"Drift: {summary['victim']} quality x0.2 at the middle (w=0)",
                        ["router", "regret/q before", "regret/q first 500 after",
                         "regret/q last 1000", "victim share last 500 before",
                         "victim share first 500 after", "rows until victim share < 10%"],
                        [[k, f"{v['regret_per_query_before']:.4f}",
                          f"{v['regret_per_query_first_500_after']:.4f}",
                          f"{v['regret_per_query_last_1000']:.4f}",
                          f"{v['victim_share_last_500_before']:.3f}",
                          f"{v['victim_share_first_500_after']:.3f}",
                          v["rows_until_victim_share_below_10pct"]]
                         for k, v in summary["routers"].items()])
        path = write_results("compare_routers_scenarios", {"seeds": args.seeds, **scenarios},
                             packages=("numpy", "river", "mabwiser", "vowpalwabbit"))
        print(f"scenario summaries written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
