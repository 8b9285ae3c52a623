"""How much routing value can a linear router on these features earn at all?

Full information, no exploration: for each of 5 shuffles of the llmrouter rows, one ridge
regression per model of its reward on the features of the first 80% of the rows (every
model's outcome on every row is used), then the argmax on the last 20%; the routing value
(:func:`bandit.replay.routing_value`) of those choices, mean and sd over the shuffles,
per cost weight and ridge strength (on the context coefficients; the intercept is free).
This is an upper reference for an online bandit on the same features, which sees one
outcome per row and pays for its exploration. Features: the hashing featurizer (64
dims), and the same with each row's ``cluster_id`` as a request tag (``hashing+tags``;
the 500 test rows have no cluster_id and stay untagged).

    python -m benchmarks.value_ceiling        # ~10 s; writes results/value_ceiling.json
"""

from __future__ import annotations

import argparse

import numpy as np

from bandit.replay import routing_value
from benchmarks.common import (
    VALUE_WEIGHTS,
    data_root,
    print_table,
    shuffle_order,
    write_results,
)
from benchmarks.compare_routers import load_llmrouter

RIDGES = (1.0, 10.0, 100.0, 1000.0)


def ceiling(x: np.ndarray, rewards: np.ndarray, ridge: float, shuffles: int,
            train_share: float = 0.8) -> list[float]:
    """Held-out routing value of a full-information ridge router, one per shuffle."""
    xb = np.c_[x, np.ones(len(x))]
    penalty = ridge * np.diag(np.r_[np.ones(x.shape[1]), 0.0]) + 1e-9 * np.eye(xb.shape[1])
    out = []
    for s in range(shuffles):
        perm = shuffle_order(len(x), s)
        cut = int(round(len(x) * train_share))
        train, test = perm[:cut], perm[cut:]
        theta = np.linalg.solve(xb[train].T @ xb[train] + penalty,
                                xb[train].T @ rewards[train])
        choices = np.argmax(xb[test] @ theta, axis=1)
        out.append(routing_value(rewards[test], choices)["value"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.value_ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shuffles", type=int, default=5)
    args = parser.parse_args(argv)
    ds = load_llmrouter(data_root() / "llmrouter", minilm=False)
    rows, results = [], []
    for feat in ("hashing", "hashing+tags"):
        if feat not in ds.features:
            continue
        for w in VALUE_WEIGHTS["llmrouter"]:
            r = ds.rewards(w)
            cells = []
            for ridge in RIDGES:
                vals = ceiling(ds.features[feat], r, ridge, args.shuffles)
                results.append({"features": feat, "w": w, "ridge": ridge,
                                "value_mean": round(float(np.mean(vals)), 4),
                                "value_sd": round(float(np.std(vals)), 4)})
                cells.append(f"{np.mean(vals):+.3f} ({np.std(vals):.3f})")
            rows.append([feat, f"{w:g}", *cells])
    print_table("full-information linear router, held-out routing value (sd over shuffles)",
                ["features", "w", *[f"ridge {r:g}" for r in RIDGES]], rows)
    path = write_results("value_ceiling", {"settings": {"shuffles": args.shuffles,
                                                        "train_share": 0.8},
                                           "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
