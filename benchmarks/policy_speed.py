"""Decide and update time per call of our policies and of three open-source peers.

Same K arms, same dimension d, same stream for everyone: random unit-norm contexts,
and for every (context, arm) a synthetic outcome from a per-arm linear model (quality in
[0, 1] linear in x plus noise, a per-arm cost and latency). Our policies learn the three
objective heads from ``{"quality", "cost_usd", "latency_ms"}``; the peers learn one
scalar, the reward of that outcome under the same preferences (they have no notion of
several objectives). The row "ours LinUCB, quality only" is the peers' setting for us:
one objective (quality) and quality-only preferences. The goals use the three-head rows.

Measured per policy and d (median of 3 repeats, repeats interleaved across policies so
that background load hits everyone alike; N calls chosen so that one measurement takes
``--target-seconds``, after a warm-up of K*30 updates and a calibration run):

* ``decide``: choose an arm for one context;
* ``update``: learn one outcome of a given arm (arms drawn uniformly from the stream);
* ``decide+update``: one event of the online loop, the update on the chosen arm.

And our batched path: ``decide_batch`` of 256 contexts at d=64 -> decisions per second.

The rows "numpy reference" are our policies with the compiled kernels off
(``bandit/_policy_kernel.py``): what the kernels save, in the same run. The start-up
table times fresh processes: the import, the first decide + update with numba's cache
warm and empty, and the embedded service's start-up for scale.

Peers, in their ordinary Python API (input conversion done once, outside the timing,
which favours them):

* river ``bandit.LinUCBDisjoint``: dict contexts; ``pull`` / ``update`` (one Bayesian
  linear regression per arm, Sherman-Morrison update);
* mabwiser ``MAB(arms, LearningPolicy.LinUCB(alpha))``: ``predict`` on a (1, d) array /
  ``partial_fit`` with one event (ridge regression per arm, ``np.linalg.inv`` of A and a
  deep copy of each arm's model on every fit);
* Vowpal Wabbit ``--cb_explore_adf -q sa --epsilon 0.01``: one shared line with the
  context and one line per arm; ``predict`` returns a PMF that we sample, ``learn`` takes
  the chosen line's cost (-reward) and probability. Both include VW's text parsing;
  ``learn`` also runs the reduction's own prediction.

Run::

    python -m benchmarks.policy_speed            # full run, writes results/policy_speed.json
    python -m benchmarks.policy_speed --quick    # smoke run, writes nothing by default
    python -m benchmarks.policy_speed --against-tree /tmp/base 3 --dims 64,384 --peers vw
        # this tree against a checkout of the base (git archive), fresh processes
    python -m benchmarks.policy_speed --against-tree /tmp/base 7 --batch
        # the same for the batched decide_batch table
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bandit import LinearThompson, LinUCB, Preferences, SelectiveThompson
from benchmarks.common import print_table, write_results

K_ARMS = 16
STREAM = 4096  # contexts in the stream, cycled
BATCH = 256
BATCH_DIM = 64
ALPHA = 1.0
PREFS = Preferences(quality=1.0, cost=50.0, latency=0.1)
PACKAGES = ("numpy", "scipy", "numba", "river", "mabwiser", "vowpalwabbit", "rich")

# Goals on decide+update at d=64 (peer time / our time) and on the batched path.
GOALS = {"vw": 3.0, "river": 10.0, "mabwiser": 10.0}
BATCH_GOAL = 200_000.0
# Our policies with goals: LinUCB, LinearThompson, and SelectiveThompson (the default).
OURS = ("linucb", "thompson", "select")


# --------------------------------------------------------------------------- stream
@dataclass
class Stream:
    """Contexts (M, d), uniform arms (M,) for the update-only runs, outcome tables (M, K)."""

    x: np.ndarray
    arms: list[int]
    quality: list[list[float]]
    cost_usd: list[list[float]]
    latency_ms: list[list[float]]
    reward: list[list[float]]

    @classmethod
    def make(cls, dim: int, k: int = K_ARMS, m: int = STREAM, seed: int = 0) -> Stream:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((m, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        theta = rng.standard_normal((k, dim))
        theta *= 0.4 / np.linalg.norm(theta, axis=1, keepdims=True)
        quality = np.clip(0.5 + x @ theta.T + 0.05 * rng.standard_normal((m, k)), 0.0, 1.0)
        price = np.geomspace(1e-4, 1e-2, k)  # USD per request, per arm
        cost = price * np.exp(0.1 * rng.standard_normal((m, k)))
        latency = np.linspace(300.0, 3000.0, k) * np.exp(0.2 * rng.standard_normal((m, k)))
        reward = PREFS.quality * quality - PREFS.cost * cost - PREFS.latency * latency / 1e3
        # Python floats: the per-call code then costs every library the same.
        return cls(x, rng.integers(0, k, m).tolist(), quality.tolist(), cost.tolist(),
                   latency.tolist(), reward.tolist())


# ------------------------------------------------------------------------- adapters
class Adapter:
    """One library behind ``decide(i) -> arm`` and ``update(i, arm)`` on stream row i."""

    label = ""
    key = ""
    update_includes = ""

    def decide(self, i: int) -> int:
        raise NotImplementedError

    def update(self, i: int, arm: int) -> None:
        raise NotImplementedError

    def step(self, i: int) -> None:
        self.update(i, self.decide(i))

    def warm_up(self, n: int) -> None:
        for i in range(n):
            self.update(i % STREAM, i % K_ARMS)


class Ours(Adapter):
    """Our policy with its defaults. ``quality_only`` feeds one objective (the quality
    head) under quality-only preferences: the peers' single-scalar setting."""

    def __init__(self, cls: type, stream: Stream, key: str, label: str,
                 quality_only: bool = False, compiled: bool = True) -> None:
        self.key, self.label = key, label
        heads = "1 head (quality)" if quality_only else "3 heads (quality, cost, latency)"
        self.update_includes = (f"{heads} Sherman-Morrison, sigma^2, ADWIN drift check, "
                                "exact refresh every 1000 updates/arm")
        self.quality_only = quality_only
        self.prefs = Preferences(quality=1.0) if quality_only else PREFS
        self.s = stream
        self.policy = cls(stream.x.shape[1], seed=0)  # defaults: epsilon 0.01, drift on
        # False: the numpy reference of the compiled kernels (bandit/_policy_kernel.py).
        self.policy._stats.compiled = compiled
        self.names = [f"model-{k}" for k in range(K_ARMS)]
        for name in self.names:
            self.policy.add_arm(name)
        self.index = {n: k for k, n in enumerate(self.names)}

    def decide(self, i: int) -> int:
        return self.index[self.policy.decide(self.s.x[i], self.prefs).arm]

    def update(self, i: int, arm: int) -> None:
        s = self.s
        if self.quality_only:
            self.policy.update(self.names[arm], s.x[i], {"quality": s.quality[i][arm]})
            return
        self.policy.update(self.names[arm], s.x[i], {"quality": s.quality[i][arm],
                                                     "cost_usd": s.cost_usd[i][arm],
                                                     "latency_ms": s.latency_ms[i][arm]})


class River(Adapter):
    key, label = "river", "river LinUCBDisjoint"
    update_includes = "1 scalar reward, Bayesian linear regression on dicts (Sherman-Morrison)"

    def __init__(self, stream: Stream) -> None:
        from river import bandit

        self.s = stream
        self.policy = bandit.LinUCBDisjoint(alpha=ALPHA, seed=0)
        self.arm_ids = list(range(K_ARMS))
        names = [f"x{j}" for j in range(stream.x.shape[1])]
        self.contexts = [dict(zip(names, row, strict=True)) for row in stream.x.tolist()]

    def decide(self, i: int) -> int:
        return self.policy.pull(self.arm_ids, context=self.contexts[i])

    def update(self, i: int, arm: int) -> None:
        self.policy.update(arm, self.contexts[i], self.s.reward[i][arm])


class MabWiser(Adapter):
    key, label = "mabwiser", "mabwiser LinUCB"
    update_includes = ("1 scalar reward, partial_fit: A += x x^T, np.linalg.inv(A), "
                       "deep copy of every arm's model")

    def __init__(self, stream: Stream) -> None:
        from mabwiser.mab import MAB, LearningPolicy

        self.s = stream
        self.mab = MAB(list(range(K_ARMS)), LearningPolicy.LinUCB(alpha=ALPHA), seed=0)
        self.rows = [stream.x[i:i + 1] for i in range(STREAM)]  # (1, d) views

    def warm_up(self, n: int) -> None:
        idx = np.arange(n) % STREAM
        arms = np.arange(n) % K_ARMS
        rewards = np.array([self.s.reward[i][a] for i, a in zip(idx, arms, strict=True)])
        self.mab.fit(arms, rewards, self.s.x[idx])  # predict needs a fit first

    def decide(self, i: int) -> int:
        return self.mab.predict(self.rows[i])

    def update(self, i: int, arm: int) -> None:
        self.mab.partial_fit([arm], [self.s.reward[i][arm]], self.rows[i])


class VowpalWabbit(Adapter):
    key, label = "vw", "Vowpal Wabbit cb_explore_adf"
    update_includes = ("1 scalar cost, text parsing of 1 + K lines, MTR reduction "
                       "(predict + learn)")

    def __init__(self, stream: Stream) -> None:
        import vowpalwabbit

        self.s = stream
        self.vw = vowpalwabbit.Workspace("--cb_explore_adf -q sa --epsilon 0.01 --quiet",
                                         enable_logging=False)
        self.shared = ["shared |s " + " ".join(f"{j}:{v:.6g}" for j, v in enumerate(row))
                       for row in stream.x.tolist()]
        self.actions = [f"|a arm{k}" for k in range(K_ARMS)]
        self.rng = random.Random(0)
        self.last_prob = 1.0 / K_ARMS

    def decide(self, i: int) -> int:
        pmf = self.vw.predict([self.shared[i], *self.actions])
        cdf = list(itertools.accumulate(pmf))
        arm = min(bisect.bisect(cdf, self.rng.random() * cdf[-1]), K_ARMS - 1)
        self.last_prob = pmf[arm]
        return arm

    def update(self, i: int, arm: int, prob: float | None = None) -> None:
        lines = [self.shared[i], *self.actions]
        p = self.last_prob if prob is None else prob
        lines[1 + arm] = f"0:{-self.s.reward[i][arm]:.6g}:{p:.6g} {self.actions[arm]}"
        self.vw.learn(lines)

    def warm_up(self, n: int) -> None:
        for i in range(n):
            self.update(i % STREAM, i % K_ARMS, 1.0 / K_ARMS)


# -------------------------------------------------------------------------- timing
class Runner:
    """Times one operation of one adapter; remembers its N and where it is in the stream."""

    def __init__(self, adapter: Adapter, op: str) -> None:
        self.adapter, self.op = adapter, op
        self.cursor = 0
        self.n = 0
        self.samples: list[float] = []
        if op == "decide":
            self.call: Callable[[int], object] = adapter.decide
        elif op == "update":
            arms = adapter.s.arms  # type: ignore[attr-defined]
            if isinstance(adapter, VowpalWabbit):
                # Logged uniform arms: the propensity VW learns with is 1/K.
                self.call = lambda i: adapter.update(i, arms[i], 1.0 / K_ARMS)
            else:
                self.call = lambda i: adapter.update(i, arms[i])
        else:
            self.call = adapter.step

    def run(self, n: int) -> float:
        call = self.call
        start = self.cursor
        gc.disable()  # a collection inside one library's loop is noise, not its cost
        try:
            t0 = time.perf_counter()
            for j in range(start, start + n):
                call(j % STREAM)
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        self.cursor = (start + n) % STREAM
        return elapsed / n

    def calibrate(self, target_s: float, max_n: int) -> None:
        n, spent = 1, 0.0
        while spent < min(0.2, target_s / 5):
            t = time.perf_counter()
            self.run(n)
            spent += time.perf_counter() - t
            n *= 2
        per_call = max(self.run(max(1, n // 4)), 1e-9)
        self.n = int(min(max_n, max(10, target_s / per_call)))


def measure_dim(dim: int, peers: Sequence[str], target_s: float, repeats: int,
                max_n: int, log: Callable[[str], None],
                ours: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Every adapter's three operations at dimension ``dim``; ``ours`` (keys) keeps only
    those of our policies (None: all)."""
    stream = Stream.make(dim)
    adapters: list[Adapter] = [Ours(LinUCB, stream, "linucb", "ours LinUCB"),
                               Ours(LinearThompson, stream, "thompson", "ours LinearThompson"),
                               Ours(SelectiveThompson, stream, "select",
                                    "ours SelectiveThompson (default)"),
                               Ours(LinUCB, stream, "linucb-1head", "ours LinUCB, quality only",
                                    quality_only=True),
                               Ours(LinUCB, stream, "linucb-numpy",
                                    "ours LinUCB, numpy reference", compiled=False),
                               Ours(LinearThompson, stream, "thompson-numpy",
                                    "ours LinearThompson, numpy reference", compiled=False),
                               Ours(SelectiveThompson, stream, "select-numpy",
                                    "ours SelectiveThompson, numpy reference",
                                    compiled=False)]
    if ours is not None:
        adapters = [a for a in adapters if a.key in ours]
    builders = {"river": River, "mabwiser": MabWiser, "vw": VowpalWabbit}
    adapters += [builders[p](stream) for p in peers]
    runners = []
    for adapter in adapters:
        adapter.warm_up(K_ARMS * 30)
        for op in ("decide", "update", "decide+update"):
            runner = Runner(adapter, op)
            runner.calibrate(target_s, max_n)
            runners.append(runner)
        log(f"  d={dim} {adapter.label}: N = "
            + ", ".join(f"{r.op} {r.n}" for r in runners[-3:]))
    for rep in range(repeats):
        for runner in runners:
            runner.samples.append(runner.run(runner.n))
        log(f"  d={dim} repeat {rep + 1}/{repeats} done")
    results = []
    for adapter in adapters:
        mine = [r for r in runners if r.adapter is adapter]
        entry: dict[str, object] = {"policy": adapter.key, "label": adapter.label,
                                    "dim": dim, "arms": K_ARMS,
                                    "update_includes": adapter.update_includes}
        for r in mine:
            entry[r.op] = {"median_us": statistics.median(r.samples) * 1e6,
                           "samples_us": [s * 1e6 for s in r.samples], "n_calls": r.n}
        results.append(entry)
    return results


def measure_batch(target_s: float, repeats: int) -> list[dict[str, object]]:
    stream = Stream.make(BATCH_DIM, seed=1)
    configs = [("linucb", LinUCB, True, True), ("thompson", LinearThompson, True, True),
               ("thompson", LinearThompson, False, True),
               ("select", SelectiveThompson, True, True),
               ("thompson-numpy", LinearThompson, True, False)]
    out = []
    for key, cls, with_prop, compiled in configs:
        adapter = Ours(cls, stream, key, key, compiled=compiled)
        adapter.warm_up(K_ARMS * 30)
        policy = adapter.policy
        batches = [stream.x[i:i + BATCH] for i in range(0, STREAM - BATCH + 1, BATCH)]

        def once(b: int, policy=policy, batches=batches, with_prop=with_prop) -> None:
            policy.decide_batch(batches[b % len(batches)], PREFS, propensities=with_prop)

        per_call = 0.0
        n = 1
        while per_call * n < min(0.2, target_s / 5):
            t = time.perf_counter()
            for b in range(n):
                once(b)
            per_call = (time.perf_counter() - t) / n
            n *= 2
        n = max(5, int(target_s / max(per_call, 1e-9)))
        samples = []
        for _ in range(repeats):
            gc.disable()
            try:
                t = time.perf_counter()
                for b in range(n):
                    once(b)
                samples.append((time.perf_counter() - t) / n)
            finally:
                gc.enable()
        med = statistics.median(samples)
        out.append({"policy": key, "propensities": with_prop, "dim": BATCH_DIM,
                    "arms": K_ARMS, "batch": BATCH, "n_batches": n,
                    "median_ms_per_batch": med * 1e3,
                    "decisions_per_s": BATCH / med,
                    "samples_decisions_per_s": [BATCH / s for s in samples]})
    return out


# One fresh process: import the library, build a 16-arm policy, then its first decide and
# update (where the compiled kernels are loaded from numba's cache, or compiled).
_FIRST_CALLS = """
import time
t0 = time.perf_counter()
import numpy as np
from bandit import LinearThompson, LinUCB, SelectiveThompson
t1 = time.perf_counter()
x = np.full(64, 0.1)
for cls in (LinUCB, LinearThompson, SelectiveThompson):
    p = cls(64, seed=0, drift_delta=None)
    for k in range(16):
        p.add_arm(f"m{k}")
    p._stats.compiled = COMPILED
    p.decide(x)
    p.update("m0", x, {"quality": 1.0, "cost_usd": 0.001, "latency_ms": 900.0})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

# The embedded service's start-up, for scale: import, app, lifespan (registry, writer,
# featurizer warm-up) with a fresh data directory and no database.
_SERVICE_START = """
import os, time
t0 = time.perf_counter()
from starlette.testclient import TestClient
from service.app import create_app
from service.config import Settings
with TestClient(create_app(Settings())) as client:
    client.get("/readyz")
print(time.perf_counter() - t0)
"""


def startup_costs() -> dict[str, float]:
    """Seconds (median of 3 fresh processes) to import the library and to make the first
    decide + update of LinUCB and LinearThompson: compiled kernels from a warm cache,
    from an empty cache (compiled on the spot), the numpy reference; and the embedded
    service's start-up for comparison."""
    def seconds(code: str, env: dict[str, str], repeats: int = 3) -> list[float]:
        runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env={**os.environ, **env}).stdout.split()
                for _ in range(repeats)]
        return [statistics.median(float(r[i]) for r in runs) for i in range(len(runs[0]))]

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = _FIRST_CALLS.replace("COMPILED", "True")
        seconds(warm, {})  # fills the cache if it is empty
        out["import_s"], out["first_calls_warm_cache_s"] = seconds(warm, {})
        cold = []
        for i in range(3):  # an empty cache each time: one process per directory
            cold.append(seconds(warm, {"NUMBA_CACHE_DIR": f"{tmp}/cache{i}"}, 1)[1])
        out["first_calls_cold_cache_s"] = statistics.median(cold)
        out["first_calls_numpy_s"] = seconds(_FIRST_CALLS.replace("COMPILED", "False"),
                                             {})[1]
        out["embedded_service_start_s"] = seconds(_SERVICE_START, {
            "BANDIT_ROUTER_DATA_DIR": tmp, "BANDIT_ROUTER_DATABASE_URL": "",
            "BANDIT_ROUTER_DIM": "64"})[0]
    return out


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[str]:
    """Limit BLAS threads (threadpoolctl) for the whole run; yields what was applied."""
    if n <= 0:
        yield "library default"
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "library default (threadpoolctl not installed)"
        return
    # A pool of BLAS threads on matrices of 65x65 mostly measures thread wake-ups, and on
    # a loaded machine one slow thread stalls the call; a router worker serves one request
    # at a time. The same limit applies to every library timed (VW does not use BLAS).
    with threadpool_limits(limits=n, user_api="blas"):
        yield str(n)


# ------------------------------------------------------------------ against a tree
# One round of one tree in a fresh process: this file's adapters and timing, the tree's
# bandit package (first on the path), our three policies and the peers in that process.
_ROUND = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("policy_speed_round", sys.argv[2])
bench = sys.modules["policy_speed_round"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import bandit
dims, peers = json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {"bandit": bandit.__file__, "per_call": []}
with bench.blas_threads(1):
    if sys.argv[6] == "batch":
        out["batched"] = bench.measure_batch(float(sys.argv[5]), 1)
    for dim in dims:
        out["per_call"] += bench.measure_dim(dim, peers, float(sys.argv[5]), 1, 200_000,
                                             lambda msg: None, bench.OURS)
print(json.dumps(out))
"""


def against_tree(root: Path, rounds: int, dims: Sequence[int], peers: Sequence[str],
                 target_s: float, log: Callable[[str], None],
                 batch: bool = False) -> dict[str, object]:
    """This tree against another checkout of the project (``git archive`` of the base):
    ``rounds`` rounds, each one fresh process per tree in alternating order, every
    process timing our three policies and the peers once (so each ratio to a peer is
    taken within one process). Per (tree, dim, policy, operation): the median over the
    rounds; and the median over rounds of each round's base / this ratio. ``batch``:
    the batched ``decide_batch`` rows instead (``dims`` and ``peers`` empty)."""
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here, "base": root.resolve()}
    samples: dict[str, list[dict]] = {"this": [], "base": []}
    for r in range(rounds):
        for name in (("this", "base") if r % 2 == 0 else ("base", "this")):
            log(f"round {r + 1}/{rounds}: {name} ({trees[name]}) ...")
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
                   "PYTHONPATH": str(trees[name])}
            done = subprocess.run(  # noqa: S603 - our own interpreter and code
                [sys.executable, "-c", _ROUND, str(trees[name]), __file__,
                 json.dumps(list(dims)), json.dumps(list(peers)), str(target_s),
                 "batch" if batch else "per-call"],
                capture_output=True, text=True, check=False, env=env, cwd=trees[name])
            if done.returncode:
                raise RuntimeError(f"{name}: round failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if Path(run["bandit"]).resolve().parents[1] != trees[name]:
                raise RuntimeError(f"{name}: imported bandit from {run['bandit']}")
            samples[name].append({(e["dim"], e["policy"]): e for e in run["per_call"]}
                                 if not batch else
                                 {(e["policy"], e["propensities"]): e for e in run["batched"]})
    if batch:
        return {"base": str(root), "rounds": rounds, "batched": [
            _batch_row(policy, prop, [s[(policy, prop)]["decisions_per_s"]
                                      for s in samples["this"]],
                       [s[(policy, prop)]["decisions_per_s"] for s in samples["base"]])
            for policy, prop in samples["this"][0]]}
    rows = []
    keys = sorted(samples["this"][0], key=lambda k: (k[0], k[1] not in OURS, k[1]))
    for dim, policy in keys:
        for op in ("decide", "update", "decide+update"):
            t = {n: [s[(dim, policy)][op]["median_us"] for s in samples[n]] for n in trees}
            row = {"dim": dim, "policy": policy, "op": op,
                   "this_us": statistics.median(t["this"]),
                   "base_us": statistics.median(t["base"]),
                   "base_over_this": statistics.median(
                       b / a for a, b in zip(t["this"], t["base"], strict=True)),
                   "this_samples_us": t["this"], "base_samples_us": t["base"]}
            for peer in peers:
                if (dim, peer) in samples["this"][0] and policy in OURS:
                    for n in trees:
                        row[f"{peer}_over_{n}"] = statistics.median(
                            s[(dim, peer)][op]["median_us"] / s[(dim, policy)][op]["median_us"]
                            for s in samples[n])
            rows.append(row)
    return {"base": str(root), "rounds": rounds, "rows": rows}


def _batch_row(policy: str, propensities: bool, this: list[float],
               base: list[float]) -> dict[str, object]:
    """One batched configuration over the rounds: medians and the median per-round ratio."""
    return {"policy": policy, "propensities": propensities,
            "this_decisions_per_s": statistics.median(this),
            "base_decisions_per_s": statistics.median(base),
            "this_over_base": statistics.median(a / b for a, b in zip(this, base, strict=True)),
            "this_samples": this, "base_samples": base}


def print_against(result: dict[str, object], peers: Sequence[str]) -> None:
    if "batched" in result:
        print_table(f"decide_batch({BATCH}) d={BATCH_DIM} K={K_ARMS}, decisions/s: this "
                    f"tree against {result['base']}, median of {result['rounds']} rounds "
                    "(fresh processes, alternating order)",
                    ["policy", "propensities", "this", "base", "this/base"],
                    [[r["policy"], "yes" if r["propensities"] else "no",
                      f"{r['this_decisions_per_s']:,.0f}",
                      f"{r['base_decisions_per_s']:,.0f}", f"{r['this_over_base']:.2f}"]
                     for r in result["batched"]])  # type: ignore[union-attr]
        return
    columns = ["d", "policy", "operation", "this µs", "base µs", "base/this"]
    columns += [f"{p}/this, {p}/base" for p in peers]
    table = []
    for row in result["rows"]:  # type: ignore[union-attr]
        cells = [row["dim"], row["policy"], row["op"], _us(row["this_us"]),
                 _us(row["base_us"]), f"{row['base_over_this']:.2f}"]
        cells += [f"{row[f'{p}_over_this']:.2f}x, {row[f'{p}_over_base']:.2f}x"
                  if f"{p}_over_this" in row else "-" for p in peers]
        table.append(cells)
    print_table(f"This tree against {result['base']}: median of {result['rounds']} rounds "
                "(fresh processes, alternating order); ratios per round, then the median",
                columns, table)


# --------------------------------------------------------------------------- report
def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _ratio(peer: float | None, ours: float | None) -> str:
    if peer is None or ours is None or ours <= 0:
        return "-"
    return f"{peer / ours:.1f}x"


def report(results: list[dict[str, object]], batch: list[dict[str, object]],
           dims: Sequence[int]) -> dict[str, object]:
    ops = ("decide", "update", "decide+update")
    rows = []
    for dim in dims:
        here = [r for r in results if r["dim"] == dim]
        ours = [next(r for r in here if r["policy"] == key) for key in OURS]
        for r in here:
            cells: list[object] = [f"{r['label']} (d={dim})"]
            cells += [_us(r[op]["median_us"]) for op in ops]  # type: ignore[index]
            for mine in ours:
                cells.append("" if str(r["policy"]).startswith(OURS) else _ratio(
                    r["decide+update"]["median_us"],  # type: ignore[index]
                    mine["decide+update"]["median_us"]))  # type: ignore[index]
            rows.append(cells)
    print_table(f"Per-call time, µs (median of repeats; K={K_ARMS} arms). Ratios: peer "
                "decide+update time / ours",
                ["policy", "decide", "update", "decide+update", "÷ LinUCB", "÷ Thompson",
                 "÷ Select"],
                rows)

    goals = []
    for dim in (d for d in dims if d == 64):
        here = {r["policy"]: r for r in results if r["dim"] == dim}
        for ours_key in OURS:
            ours_t = here[ours_key]["decide+update"]["median_us"]  # type: ignore[index]
            for peer, goal in GOALS.items():
                if peer not in here:
                    continue
                peer_t = here[peer]["decide+update"]["median_us"]  # type: ignore[index]
                ratio = peer_t / ours_t
                goals.append({"goal": f"{ours_key} decide+update d=64 >= {goal:g}x faster "
                                      f"than {peer}", "value": round(ratio, 2),
                              "met": bool(ratio >= goal)})
    for b in (b for b in batch if not str(b["policy"]).endswith("-numpy")):
        name = b["policy"] + ("" if b["propensities"] else " (no propensities)")
        goals.append({"goal": f"{name} decide_batch({BATCH}) d={BATCH_DIM} >= "
                              f"{BATCH_GOAL:,.0f} decisions/s",
                      "value": round(b["decisions_per_s"]), "met":  # type: ignore[arg-type]
                      bool(b["decisions_per_s"] >= BATCH_GOAL)})  # type: ignore[operator]
    print_table(f"Batched: decide_batch of {BATCH} contexts, d={BATCH_DIM}, K={K_ARMS}",
                ["policy", "propensities", "ms / batch", "decisions / s"],
                [[b["policy"], "yes" if b["propensities"] else "no",
                  f"{b['median_ms_per_batch']:.2f}", f"{b['decisions_per_s']:,.0f}"]
                 for b in batch])
    print_table("Goals", ["goal", "value", "met"],
                [[g["goal"], f"{g['value']:,}", "yes" if g["met"] else "NO"] for g in goals])
    print("What each update includes:")
    seen = set()
    for r in results:
        if r["policy"] not in seen:
            seen.add(r["policy"])
            print(f"  {r['label']}: {r['update_includes']}")
    return {"goals": goals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ~0.05 s per measurement, 1 repeat, no JSON unless "
                             "--write")
    parser.add_argument("--dims", default="64,384",
                        help="comma-separated context dimensions (default 64,384)")
    parser.add_argument("--peers", default="river,mabwiser,vw",
                        help="peers to include (default river,mabwiser,vw; '' for none)")
    parser.add_argument("--target-seconds", type=float, default=None,
                        help="time per measurement (default 1.5, --quick 0.05)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads for every library in the run (default 1: one "
                             "request per worker; 0 leaves the BLAS default)")
    parser.add_argument("--against-tree", nargs=2, metavar=("DIR", "ROUNDS"), default=None,
                        help="time our three policies (and the peers) in this tree and in "
                             "the checkout DIR, ROUNDS rounds of fresh processes in "
                             "alternating order; writes results/policy_speed_against_tree"
                             ".json (nothing else is measured)")
    parser.add_argument("--batch", action="store_true",
                        help="with --against-tree: time decide_batch (the batched table) "
                             "instead of the per-call operations; writes results/"
                             "policy_speed_batch_against_tree.json")
    parser.add_argument("--write", action="store_true",
                        help="write results/policy_speed.json even with --quick")
    args = parser.parse_args(argv)
    try:
        dims = [int(v) for v in args.dims.split(",") if v.strip()]
    except ValueError:
        parser.error("--dims: comma-separated integers, e.g. 64,384")
    if not dims or any(d < 1 for d in dims):
        parser.error("--dims: comma-separated integers >= 1")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(GOALS)
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)}; allowed: {', '.join(GOALS)}")
    target = args.target_seconds or (0.05 if args.quick else 1.5)
    repeats = args.repeats or (1 if args.quick else 3)
    max_n = 2_000 if args.quick else 200_000

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    if args.against_tree is not None:
        rounds = int(args.against_tree[1])
        if args.batch:
            dims, peers = [], []
        result = against_tree(Path(args.against_tree[0]), rounds, dims, peers, target, log,
                              batch=args.batch)
        print_against(result, peers)
        path = write_results("policy_speed_batch_against_tree" if args.batch
                             else "policy_speed_against_tree", {
            "settings": {"arms": K_ARMS, "dims": dims, "target_seconds": target,
                         "blas_threads": 1,
                         "wall_seconds": round(time.time() - started, 1)},
            **result}, packages=PACKAGES)
        print(f"wrote {path}")
        return 0
    results = []
    with blas_threads(args.blas_threads) as blas_note:
        for dim in dims:
            log(f"measuring d={dim} ...")
            results += measure_dim(dim, peers, target, repeats, max_n, log)
        log("measuring decide_batch ...")
        batch = measure_batch(target, repeats)
    log("measuring start-up ...")
    startup = startup_costs()
    summary = report(results, batch, dims)
    print_table("Start-up, seconds (median of 3 fresh processes): first decide + update "
                "of LinUCB, LinearThompson and SelectiveThompson at d=64",
                ["what", "s"], [[k, f"{v:.3f}"] for k, v in startup.items()])
    print("Numbers depend on the machine and its load; see the JSON for both.")
    if not args.quick or args.write:
        path = write_results("policy_speed", {
            "settings": {"arms": K_ARMS, "dims": dims, "stream": STREAM, "alpha": ALPHA,
                         "preferences": PREFS._asdict(), "target_seconds": target,
                         "repeats": repeats, "quick": args.quick,
                         "blas_threads": blas_note,
                         "wall_seconds": round(time.time() - started, 1),
                         "notes": "peer inputs (dicts for river, text lines for VW) are "
                                  "built before timing; our policies are timed on numpy "
                                  "vectors, with their input validation included"},
            "per_call": results, "batched": batch, "startup": startup, **summary},
            packages=PACKAGES)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
