"""Fast experiment loop for feature maps on the llmrouter replay (issue 8, goal 1).

One online pass of our LinUCB under bandit feedback, scored on a window, 3 seeds, for
several feature maps of the cached all-MiniLM-L6-v2 embeddings (see
``benchmarks/compare_routers.py`` for the data, costs and protocol). Feature maps are
fitted on prompts only (no outcomes): unlabelled prompts are available to a deployment.

Two windows:

* ``--split val`` (the default for choosing settings): the stream is the train split
  only: 1,000 random train rows (seed 0) are held out and replayed after the other
  4,608, and scored; maps are fitted on the 4,608 prompts. (``--split tail``: the last
  1,000 train rows instead; the file is ordered and its tail is one easy task mix where
  the best single model scores 0.87, so it says little about the test split.)
* ``--split test``: train then test, scored on the 500 test rows (the issue's window);
  maps are fitted on the train prompts.

    python -m benchmarks.featuremap_experiment --split val --maps raw,proto64
    python -m benchmarks.featuremap_experiment --split test --maps raw,proto64 --weights 100

``--full-info`` also fits a ridge per model on every outcome of the fitting rows (the
ceiling of a linear model on those features). Prints a table; writes nothing unless
``--out FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB
from bandit.featurize import PrototypeMap
from benchmarks.compare_routers import Ours, load_llmrouter, run_online

VAL_TAIL = 1000


class SharedResidual(Ours):
    """Experiment (idea b): a shared ridge head learns E[quality | x] from every arm's
    feedback (query difficulty); each arm's quality head learns only its deviation
    (q - s(x) + 1) / 2, so its prior (0.5 = no deviation) shrinks it toward the shared
    head. The shared term is the same for every arm, so it cancels in the choice; the
    quality weight 2 undoes the halving."""

    def __init__(self, *args, ridge: float = 1.0, **kw) -> None:
        super().__init__(*args, **kw)
        d = self.x.shape[1] + 1
        self.a_inv = np.eye(d) / ridge
        self.b = np.zeros(d)

    def _shared(self, t: int) -> float:
        z = np.append(self.x[t], 1.0)
        return float(z @ (self.a_inv @ self.b))

    def decide(self, t, prefs):
        from bandit import Preferences
        return super().decide(t, Preferences(quality=2.0 * prefs.quality, cost=prefs.cost))

    def learn(self, t, arm, quality, cost, reward):
        dev = min(1.0, max(0.0, (quality - self._shared(t) + 1.0) / 2.0))
        self.policy.update(self.arms[arm], self.x[t], {"quality": dev, "cost_usd": cost},
                           now=float(t))
        z = np.append(self.x[t], 1.0)
        az = self.a_inv @ z
        self.a_inv -= np.outer(az, az) / (1.0 + z @ az)
        self.b += quality * z


def make_map(spec: str, fit_rows: np.ndarray):
    """``raw``, ``protoK[tT][+raw]`` (K prototypes, temperature T, default 0.05)."""
    if spec == "raw":
        return lambda x: x
    if spec.startswith("pca"):  # pcaK: top-K principal directions, rows re-normalized
        k = int(spec[3:])
        mean = fit_rows.mean(axis=0)
        _, _, vt = np.linalg.svd(fit_rows - mean, full_matrices=False)

        def pca(x: np.ndarray) -> np.ndarray:
            z = (x - mean) @ vt[:k].T
            return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return pca
    assert spec.startswith("proto"), spec
    body = spec[5:]
    concat = body.endswith("+raw")
    body = body.removesuffix("+raw")
    k, _, temp = body.partition("t")
    pm = PrototypeMap.fit(fit_rows, int(k), temperature=float(temp) if temp else 0.05,
                          include_base=concat, seed=0)
    return pm.transform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.featuremap_experiment")
    parser.add_argument("--split", choices=("val", "tail", "test"), default="val")
    parser.add_argument("--maps", default="raw,proto64")
    parser.add_argument("--weights", default="100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policy", default="linucb")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--ridge", type=float, default=None)
    parser.add_argument("--full-info", action="store_true")
    parser.add_argument("--param", action="append", default=[],
                        help="policy parameter key=value (e.g. drift_delta=none)")
    parser.add_argument("--shared", action="store_true", help="idea (b): SharedResidual")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    ds = load_llmrouter(None, minilm=True)
    x_all = ds.features["minilm"]
    if args.split in ("val", "tail"):
        n = ds.test_start
        if args.split == "val":  # 1,000 random train rows held out, replayed at the end
            held = np.sort(np.random.default_rng(0).permutation(n)[:VAL_TAIL])
            order = np.concatenate([np.setdiff1d(np.arange(n), held), held])
            ds.quality, ds.cost = ds.quality[:n][order], ds.cost[:n][order]
            x_all = x_all[:n][order]
        fit = slice(0, n - VAL_TAIL)
        window = slice(n - VAL_TAIL, n)
    else:
        n = ds.n
        fit = slice(0, ds.test_start)
        window = slice(ds.test_start, ds.n)
    q, c = ds.quality[:n], ds.cost[:n]
    mean_cost = ds.cost[fit].mean(axis=0)
    qs, cs = q[window].mean(axis=0), c[window].mean(axis=0)
    best = int(np.argmax(qs))
    print(f"{args.split}: window rows {window.start}-{window.stop}; best single "
          f"{ds.arms[best]} quality {qs[best]:.4f} cost ${1000 * cs[best]:.4f}/1k",
          file=sys.stderr)
    cls = {"linucb": LinUCB, "thompson": LinearThompson}[args.policy]
    params = {}
    if args.alpha is not None:
        params["alpha" if args.policy == "linucb" else "scale"] = args.alpha
    if args.ridge is not None:
        params["ridge"] = args.ridge
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = None if value.lower() == "none" else (
            int(value) if value.isdigit() else float(value))
    rows = []
    for spec in args.maps.split(","):
        fmap = make_map(spec, x_all[fit])
        x = fmap(x_all[:n])
        for w in (float(v) for v in args.weights.split(",")):
            r = q - w * c
            idx = np.arange(window.stop - window.start)
            if args.full_info:
                from benchmarks.compare_routers import knn_choices
                ch = knn_choices(x_all[fit], r[fit], x_all[window])
                if spec == args.maps.split(",")[0]:
                    print(f"kNN full-info (k=25, raw) w={w:g}: quality "
                          f"{q[window][idx, ch].mean():.4f} cost "
                          f"{1000 * c[window][idx, ch].mean():.4f} reward "
                          f"{r[window][idx, ch].mean():.4f}", flush=True)
                xf = np.hstack([x[fit], np.ones((fit.stop - fit.start, 1))])
                xw = np.hstack([x[window], np.ones((len(idx), 1))])
                lam = 1.0 if args.ridge is None else args.ridge
                theta = np.linalg.solve(xf.T @ xf + lam * np.eye(xf.shape[1]), xf.T @ r[fit])
                ch = np.argmax(xw @ theta, axis=1)
                rows.append({"map": spec, "w": w, "mode": "full-info ridge", "dim": x.shape[1],
                             "quality": float(q[window][idx, ch].mean()),
                             "cost": float(c[window][idx, ch].mean()),
                             "reward": float(r[window][idx, ch].mean()), "sd": 0.0})
            stats = []
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                router = (SharedResidual if args.shared else Ours)(cls, x, ds.arms,
                                                                  mean_cost, seed)
                if params:
                    router.policy = cls(x.shape[1], seed=seed, **params)
                    from bandit.base import ArmPrior
                    for name, cc in zip(ds.arms, mean_cost, strict=True):
                        router.policy.add_arm(name, ArmPrior(cost_usd=float(cc)))
                ch = run_online(router, q, c, np.full(n, w))[window]
                stats.append((q[window][idx, ch].mean(), c[window][idx, ch].mean(),
                              r[window][idx, ch].mean()))
            s = np.array(stats)
            mode = f"online {args.policy}" + ("+shared" if args.shared else "")
            rows.append({"map": spec, "w": w, "mode": mode, "dim": x.shape[1],
                         "quality": float(s[:, 0].mean()), "cost": float(s[:, 1].mean()),
                         "reward": float(s[:, 2].mean()), "sd": float(s[:, 2].std()),
                         "q_sd": float(s[:, 0].std()),
                         "s_per_pass": (time.perf_counter() - t0) / args.seeds})
            for row in rows[-2 if args.full_info else -1:]:
                print(f"{row['map']:18s} w={w:5g} {row['mode']:16s} d={row['dim']:4d} "
                      f"quality {row['quality']:.4f} cost {1000 * row['cost']:.4f} "
                      f"reward {row['reward']:.4f} ± {row['sd']:.4f} "
                      f"({row.get('s_per_pass', 0):.0f}s/pass)", flush=True)
    if args.out:
        from benchmarks.common import code_version
        doc = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
               "code": code_version(), "split": args.split,
               "window": [window.start, window.stop],
               "best_single": {"model": ds.arms[best], "quality": float(qs[best]),
                               "cost_usd": float(cs[best])},
               "policy": args.policy, "params": params, "shared": args.shared,
               "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
