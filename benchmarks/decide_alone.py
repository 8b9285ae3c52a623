"""Where one ``decide()`` spends its time, per part (issue 19: decide alone <= 20 µs at
d=64, K=16).

The benchmark's own policies (``benchmarks/policy_speed.py``: its stream, warm-up of
K*30 updates and preferences), LinUCB, LinearThompson and SelectiveThompson (the
default). Each part is timed with ``time.process_time`` over ``--calls`` calls (20,000
by default), best of ``--repeats`` (5), the parts interleaved within each repeat:

* ``policy.decide``: the whole call, a :class:`bandit.Decision` out;
* ``_decide_fused``: the compiled decide without the Decision object;
* ``compiled kernel``: the kernel alone, called from Python with the arguments of one
  real call (captured once): its argument handling (unboxing) and arithmetic;
* ``context check and copy``: ``Policy._features``;
* ``preferences``: ``Preferences._weights`` (its check and the head weights);
* ``random draws``: what the decide draws from the policy's generator (Thompson's 16
  normals, then epsilon's uniform), on a new generator of the same kind.

``--against-tree DIR``: the same table for the checkout DIR (``git archive`` of the
base) in a fresh process, in alternating order with this tree's (``--rounds``), medians.
Writes ``benchmarks/results/decide_alone.json`` (``--out`` to change).

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.decide_alone --against-tree /tmp/base
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("linucb", "thompson", "select")
PARTS = ("policy.decide", "_decide_fused", "compiled kernel", "context check and copy",
         "preferences", "random draws")


def _best_us(fns: dict[str, Callable[[], None]], calls: int,
             repeats: int) -> dict[str, float]:
    """µs per call of each function, best of ``repeats`` (interleaved)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.process_time() - t0) / calls * 1e6)
    return best


def _parts(cls: type, stream: object, key: str) -> dict[str, Callable[[], object]]:
    """The timed parts of one policy, warmed up as ``policy_speed`` does."""
    from bandit import _policy_kernel as kernel
    from benchmarks.policy_speed import K_ARMS, Ours

    ours = Ours(cls, stream, key, key)
    ours.warm_up(K_ARMS * 30)
    policy, prefs, x = ours.policy, ours.prefs, stream.x[7]
    # One real call's kernel and arguments (whatever the tree's kernel is named; only
    # the outermost one is replaced: a compiled caller must still see the kernel).
    name = next(n for n in ("decide_one", "decide_rows") if hasattr(kernel, n))
    original, captured = getattr(kernel, name), []

    def capture(*args: object) -> object:
        captured.append(args)
        return original(*args)

    setattr(kernel, name, capture)
    try:
        policy.decide(x, prefs)
    finally:
        setattr(kernel, name, original)
    args = captured[0]
    rng = np.random.Generator(type(policy._rng.bit_generator)())
    eps = policy.config.epsilon
    thompson = key != "linucb"

    def draws() -> None:
        if thompson:
            rng.standard_normal((1, K_ARMS))
        rng.random() < eps  # noqa: B015 - the draw is what is timed

    return {
        "policy.decide": lambda: policy.decide(x, prefs),
        "_decide_fused": lambda: policy._decide_fused(x, prefs, None, True, None, one=True),
        "compiled kernel": lambda: original(*args),
        "context check and copy": lambda: policy._features(x),
        "preferences": prefs._weights,
        "random draws": draws,
    }


def profile(dim: int, calls: int, repeats: int) -> dict[str, dict[str, float]]:
    """The per-part table of the tree on ``sys.path`` (µs per call)."""
    from bandit import LinearThompson, LinUCB, SelectiveThompson
    from benchmarks.policy_speed import Stream

    classes = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}
    stream = Stream.make(dim)
    return {key: _best_us(_parts(cls, stream, key), calls, repeats)
            for key, cls in classes.items()}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import (
        add_tree_options,
        alternate_trees,
        median_over_rounds,
        print_table,
        write_results,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    add_tree_options(parser, "decide_alone")
    args = parser.parse_args(argv)
    trees, samples, load = alternate_trees(ROOT, args, __file__,
                                           [args.dim, args.calls, args.repeats])
    med = median_over_rounds(samples, POLICIES, PARTS)
    headers = ["part"]
    for p in POLICIES:
        headers += [f"{p} {t}" for t in trees]
    rows = [[part] + [f"{med[t][p][part]:.2f}" for p in POLICIES for t in trees]
            for part in PARTS]
    print_table(f"decide alone, d={args.dim}, K=16 (µs per call, best of {args.repeats} x "
                f"{args.calls:,} calls, median over rounds)", headers, rows)
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    write_results(args.out, {
        "dim": args.dim, "calls": args.calls, "repeats": args.repeats,
        "rounds": len(samples["this"]), "trees": {t: str(p) for t, p in trees.items()},
        "load_1min": load, "median_us": med, "samples_us": samples})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
