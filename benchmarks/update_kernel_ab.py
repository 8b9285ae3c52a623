"""µs per compiled update (``_policy_kernel.update_arm``) of this tree's kernel against
another tree's, in one process on the same statistics (issue 19, d=384).

On a loaded shared machine the per-process benchmarks (``policy_speed``,
``update_pieces``) move by 1.5-2x between processes, more than a change of a few
percent to the update. Here both kernels are imported side by side (the other tree's
``bandit/_policy_kernel.py`` under another module name) and called alternately on the
same policy's arrays: ``--rounds`` rounds of ``--updates`` updates each, arms in random
order, process time, the order of the two kernels alternating per round; medians.

The statistics are this tree's (``ArmStatistics``), fed ``16 x 30`` whole outcomes
(every head grouped), or with ``--pieces`` the gateway's two pieces (cost+latency, then
quality: heads split, own inverses stepped). Each kernel keeps the float32 copies the
tree keeps (the other tree's kernel without the split heads' copy, if it has none).
A kernel that defers the shared data matrices' steps (``pend_x``) is timed with the
round's deferred steps added at its end (``s_data`` read); one that does not store the
shared quality candidate (``same_stale``) leaves it to be copied when read (not timed:
only the numpy paths read it).

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.update_kernel_ab --against-tree DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, SelectiveThompson
from bandit import _policy_kernel as this_kernel
from bandit.stats import _NO_SELECTION, _NU0

K_ARMS = 16
CLASSES = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}


def load_kernel(tree: Path):
    path = tree / "bandit" / "_policy_kernel.py"
    spec = importlib.util.spec_from_file_location("base_policy_kernel", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def updater(kernel, stats):
    """One compiled update of arm k on ``stats`` through ``kernel``."""
    params = inspect.signature(kernel.update_arm.py_func).parameters
    own = "a_inv32" in params
    # A kernel with ``same_stale`` does not store the shared quality candidate (its
    # flags); a kernel without it copies it (then its flags are left unset: stored).
    lazy = "same_stale" in params
    # A kernel with ``pend_x`` defers the shared data matrices' steps (its rows); the
    # matrices are passed as stored (the property adds the deferred steps when read).
    defer = "pend_x" in params

    # The data matrices as stored, for both kernels (this tree's property would add the
    # deferred steps at every call); each round ends by adding them (timed: run()).
    data = getattr(stats, "_s_data", stats.s_data)

    def update(k: int, x: np.ndarray, y: np.ndarray) -> None:
        s = stats
        if not s.selecting:
            sel = _NO_SELECTION if lazy else _NO_SELECTION[:5] + _NO_SELECTION[6:]
        else:
            # The stored array as the kernels read it (not the property, which copies
            # the shared candidate when its flag is set).
            sel = ((s._sel_inv, s.sel_theta, s.sel_err, s._sel, s._q_stale)
                   + ((s._same_stale,) if lazy else ())
                   + (s._kept32("q_inv"), s.shared_candidate))
        args = [k, x, y, 1.0, s.group, s.s_inv, data, s.a_inv, s.a_data, s.theta,
                s.b_data, s.srr, s.weight, s.count, s.lam, s.mu0, s.sigma0, s.sigma2, _NU0,
                s._kept32("s_inv")]
        if own:
            args.append(s._kept32("a_inv"))
        kernel.update_arm(*args, *sel, *(s._deferred() if defer else ()))

    return update


def run(dim: int, updates: int, rounds: int, pieces: bool, base_kernel) -> dict:
    rng = np.random.default_rng(0)
    outcomes = ([{"cost_usd": 1e-4, "latency_ms": 3.0}, {"quality": 0.7}] if pieces
                else [{"quality": 0.7, "cost_usd": 1e-4, "latency_ms": 3.0}])
    ys = [np.array([o.get("quality", np.nan), o.get("cost_usd", np.nan),
                    o.get("latency_ms", np.nan) / 1e3]) for o in outcomes]
    out = {}
    for name, cls in CLASSES.items():
        policy = cls(dim, seed=0, drift_delta=None)
        for m in range(K_ARMS):
            policy.add_arm(f"m{m}")
        for i in range(K_ARMS * 30):
            y = dict(outcomes[i % len(outcomes)])
            if "quality" in y:
                y["quality"] = float(rng.random())
            policy.update(f"m{(i // len(outcomes)) % K_ARMS}", rng.standard_normal(dim)
                          / np.sqrt(dim), y)
        policy.decide(rng.standard_normal(dim) / np.sqrt(dim))  # the copies made
        stats = policy._stats  # noqa: SLF001
        xs = np.c_[rng.standard_normal((64, dim)) / np.sqrt(dim), np.ones(64)]
        arms = rng.integers(0, K_ARMS, updates * rounds)
        kernels = {"this": updater(this_kernel, stats), "base": updater(base_kernel, stats)}
        for update in kernels.values():  # compiled before timing
            update(0, xs[0], ys[-1])
        samples: dict[str, list[float]] = {"this": [], "base": []}
        for r in range(rounds):
            for tree in (("this", "base") if r % 2 == 0 else ("base", "this")):
                update = kernels[tree]
                t0 = time.process_time()
                for i in range(updates):
                    # (the pieces alternate per arm's call, so heads stay as split)
                    update(int(arms[r * updates + i]), xs[i % 64], ys[i % len(ys)])
                stats.s_data  # noqa: B018 (this tree: the round's deferred steps added)
                samples[tree].append((time.process_time() - t0) / updates * 1e6)
        out[name] = {
            "this_us": statistics.median(samples["this"]),
            "base_us": statistics.median(samples["base"]),
            "base_over_this": statistics.median(
                b / a for a, b in zip(samples["this"], samples["base"], strict=True)),
            "this_samples_us": samples["this"], "base_samples_us": samples["base"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against-tree", required=True, type=Path, metavar="DIR")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pieces", action="store_true")
    args = parser.parse_args()
    base = load_kernel(args.against_tree.resolve())
    result = run(args.dim, args.updates, args.rounds, args.pieces, base)
    shape = "cost+lat / quality pieces" if args.pieces else "whole outcomes"
    print(f"update_arm, d={args.dim}, {K_ARMS} arms, {shape}: µs per update, median of "
          f"{args.rounds} rounds x {args.updates}")
    for name, r in result.items():
        print(f"  {name:9} this {r['this_us']:7.1f}  base {r['base_us']:7.1f}  "
              f"base/this {r['base_over_this']:.2f}x")


if __name__ == "__main__":
    main()
