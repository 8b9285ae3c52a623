"""Text featurizing time per call: the one-pass kernel and the earlier compiled kernel
(versions 2 and 1) against the numpy reference.

The hashing featurizer (:class:`bandit.featurize.HashingFeaturizer`, dim 64, defaults)
featurizes one text per call, as the service does per request, at 64, 500, 2,000 and
10,000 characters. Eight implementations, measured in the same run:

* ``onepass``: ``transform_one`` of version 2 (the default: a sparse projection), which
  runs the one-pass kernel (``_hashing_kernel.featurize_onepass``);
* ``kernel``: the same with the earlier kernel (``_hashing_kernel.featurize_one``), whose
  vectors the one-pass kernel gives bit for bit;
* ``onepass_v1`` and ``kernel_v1``: the same two for version 1 (the 8 MiB Gaussian
  projection), the vectors of deployments that learned before version 2;
* ``v3``: ``transform_one`` of version 3 (opt-in: no list of distinct n-grams, its
  ``log1p(count)`` weights by increments from a keyless counter table, 2 coordinates per
  occurrence; ``_hashing_kernel.featurize_damped``); other vectors, so the table also
  compares v3's cosines with v2's (Spearman and Pearson over random pairs, on generated
  texts and on the prompts, with v1 against v2 beside them for scale);
* ``v4``: ``transform_one`` of version 4 (opt-in: version 3's counting with version 2's
  4 coordinates and normalization, nearly version 2's vectors; the same kernel,
  ``_hashing_kernel.featurize_damped``), compared with v2 as v3 is;
* ``reference``: version 1's ``_reference_transform([text])``, the numpy implementation
  that was ``transform_one`` before the kernel (the same vectors to 1e-12);
* ``sklearn``: scikit-learn's ``HashingVectorizer`` (character 3-5-grams in word
  boundaries, 2^14 features) on the same text, ``transform([text])`` only: no word
  n-grams and no projection to 64 dimensions, so it does less than the others. Skipped
  when scikit-learn is not installed (it comes with the ``bench`` extra's mabwiser).

Texts are real prompts (``llmrouter/test.jsonl`` of the development data, joined and cut
into pieces of each length; 64 distinct pieces per length, cycled, so the projection
rows a text touches are not all hot in the cache) or, without the data, generated
prompt-like texts. Each round times every implementation on every length (the order
alternating between rounds) over ``--target-seconds`` of this thread's CPU time (or of
the wall clock with ``--clock wall``); the table shows the median round.

Fidelity of the two versions (they are different random projections of the same hashed
features): over 3,000 random pairs of 600 prompts, the correlation and RMS difference of
each version's cosine with the exact cosine of the unprojected hashed vectors (what a
projection should preserve).

Also measured, each in a fresh process (median of 3): the start-up cost of the kernel:
``import bandit``, the first ``HashingFeaturizer()`` (imports numba, builds the tables)
and its first call (loads the compiled kernel from numba's cache, or compiles it).

``--against-tree DIR`` (a baseline checkout, e.g. ``git archive main``) adds the
``base`` row: DIR's one-pass kernel (its ``bandit/_hashing_kernel.py``) run by this
tree's ``HashingFeaturizer`` (the Python around the kernel is this tree's), timed in the
same rounds, in the alternating order; its vectors are checked to be this tree's, bit for
bit. The kernel file is copied to a temporary directory and compiled there, in this
process, under a module name of its own: numba's cached machine code calls the jitted
helpers by symbol names made from the module's name, so DIR's own cache (compiled as
``bandit._hashing_kernel``), loaded next to this tree's kernel, ran this tree's helpers
(measured: the "base" then timed as this tree).

``--long`` instead times only the two v2 kernels, called directly (the featurizer
sends texts over ``HashingFeaturizer.ONEPASS_MAX_CHARS`` characters to the earlier
kernel), on texts of 10k to 1M characters: real prompts (pieces of the corpus, repeated
as needed) and repetitive texts (one prompt repeated: few distinct n-grams), 8 different
texts per length, cycled.

Run::

    python -m benchmarks.featurize_speed           # writes results/featurize_speed.json
    python -m benchmarks.featurize_speed --quick   # smoke run, writes nothing
    python -m benchmarks.featurize_speed --long --results-name featurize_speed_long
    python -m benchmarks.featurize_speed --against-tree /tmp/base --results-name NAME
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from bandit.featurize import HashingFeaturizer
from benchmarks.common import REPO_ROOT, data_root, print_table, write_results

LENGTHS = (64, 500, 2_000, 10_000)
LONG_LENGTHS = (10_000, 30_000, 50_000, 100_000, 300_000, 1_000_000)
POOL = 64
GOAL_US_PER_1000_CHARS = 20.0

STARTUP = """
import json, time
t0 = time.perf_counter()
import bandit.featurize
t1 = time.perf_counter()
f = bandit.featurize.HashingFeaturizer()
t2 = time.perf_counter()
f.transform_one("warm up")
t3 = time.perf_counter()
print(json.dumps({"import_bandit_s": t1 - t0, "construct_s": t2 - t1, "first_call_s": t3 - t2}))
"""


def corpus() -> tuple[str, str]:
    """A long real text (the development data's prompts joined), or a generated one."""
    path = data_root() / "llmrouter" / "test.jsonl"
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            return "\n\n".join(json.loads(line)["question"] for line in fh), str(path)
    rng = np.random.default_rng(0)
    words = ("how do i reverse a list in python summarize the attached report translate "
             "this paragraph into german write sql query counting orders per customer "
             "écris un poème sur la pluie 数据库索引是如何工作的 emoji 😀").split()
    return " ".join(rng.choice(words, size=400_000)), "generated"


def pools(text: str) -> dict[int, list[str]]:
    """POOL distinct pieces of ``text`` of each length, from spread-out offsets."""
    out = {}
    for length in LENGTHS:
        starts = np.linspace(0, len(text) - length - 1, POOL).astype(int)
        out[length] = [text[s:s + length] for s in starts]
    return out


def earlier_kernel(version: int) -> HashingFeaturizer:
    """A featurizer running the kernel before the one-pass one (the same vectors)."""
    from bandit import _hashing_kernel

    featurizer = HashingFeaturizer(version=version)
    featurizer._kernel = _hashing_kernel.featurize_one
    return featurizer


def tree_kernel(tree: Path, name: str = "_base_hashing_kernel") -> ModuleType:
    """``tree``'s ``bandit/_hashing_kernel.py`` as the module ``name`` (not ``bandit``'s),
    compiled from a copy in a temporary directory (numba's cache beside it, removed at
    exit): the kernels of a baseline checkout, in this process."""
    source = tree / "bandit" / "_hashing_kernel.py"
    if not source.is_file():
        raise SystemExit(f"--against-tree: no kernel at {source}")
    directory = Path(tempfile.mkdtemp(prefix="featurize_base_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / f"{name}.py"
    shutil.copyfile(source, path)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's compiled code refers to its module by name
    spec.loader.exec_module(module)
    return module


def base_featurizer(tree: Path) -> HashingFeaturizer:
    """This tree's default featurizer running ``tree``'s one-pass kernel and tables."""
    base = tree_kernel(tree)
    featurizer = HashingFeaturizer()
    featurizer._kernel = base.featurize_onepass
    featurizer._long_kernel = base.featurize_one
    featurizer._classes, featurizer._crc32 = base.char_classes(), base.crc32_table()
    return featurizer


def same_bits(a: HashingFeaturizer, b: HashingFeaturizer, texts: list[str]) -> bool:
    """Whether ``a`` and ``b`` give every text the same vector, bit for bit."""
    return all(np.array_equal(a.transform_one(t).view(np.uint64),
                              b.transform_one(t).view(np.uint64)) for t in texts)


def implementations(against: Path | None = None) -> dict[str, Callable[[str], object]]:
    v1 = HashingFeaturizer(version=1)
    impls: dict[str, Callable[[str], object]] = {
        "onepass": HashingFeaturizer(version=2).transform_one,
        "v3": HashingFeaturizer(version=3).transform_one,
        "v4": HashingFeaturizer(version=4).transform_one,
        "kernel": earlier_kernel(2).transform_one,
        "onepass_v1": v1.transform_one,
        "kernel_v1": earlier_kernel(1).transform_one,
        "reference": lambda text: v1._reference_transform([text])[0],
    }
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
    except ImportError:
        print("scikit-learn not installed: no sklearn row", file=sys.stderr)
    else:
        vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5),
                                       n_features=2**14, alternate_sign=True)
        impls["sklearn"] = lambda text: vectorizer.transform([text])
    if against is not None:
        impls["base"] = base_featurizer(against).transform_one
    return impls


def time_per_call(fn: Callable[[str], object], texts: list[str], seconds: float,
                  clock: Callable[[], float]) -> float:
    """Mean seconds per call over at least ``seconds`` (whole passes over ``texts``)."""
    for text in texts[:4]:
        fn(text)
    calls = 0
    start = clock()
    while True:
        for text in texts:
            fn(text)
        calls += len(texts)
        elapsed = clock() - start
        if elapsed >= seconds:
            return elapsed / calls


def fidelity(text: str, n_texts: int = 600, n_pairs: int = 3000) -> dict[str, dict]:
    """Per version: how well its cosines follow the exact hashed-space cosine."""
    texts = [piece for piece in text.split("\n\n") if piece.strip()][:n_texts]
    v1, v2 = HashingFeaturizer(version=1), HashingFeaturizer(version=2)
    v3, v4 = HashingFeaturizer(version=3), HashingFeaturizer(version=4)
    hashed = []
    for t in texts:  # the distinct n-grams' hashes and weights, shared by both versions
        h, w = v1._hashed(t)
        hashed.append(dict(zip(h.tolist(), (w / np.linalg.norm(w)).tolist(), strict=True)))
    pairs = np.random.default_rng(0).integers(0, len(texts), size=(n_pairs, 2))
    exact = np.array([sum(v * hashed[j].get(k, 0.0) for k, v in hashed[i].items())
                      for i, j in pairs])
    out = {}
    for name, f in (("v1", v1), ("v2", v2), ("v3", v3), ("v4", v4)):
        x = f.transform(texts)
        cos = np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])
        out[name] = {"corr_with_exact_cosine": float(np.corrcoef(exact, cos)[0, 1]),
                     "rms_difference": float(np.sqrt(np.mean((cos - exact) ** 2)))}
    return out


def generated_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Prompt-like texts with a known structure and no routing data: each draws its
    words from one or two of 8 topics' vocabularies (made-up words, 40 per topic) and
    a shared vocabulary of function words, 5 to 400 words long; one in four repeats a
    boilerplate sentence 3 to 30 times (what sublinear weights are for)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def word() -> str:
        return "".join(rng.choice(letters, size=rng.integers(2, 10)))

    topics = [[word() for _ in range(40)] for _ in range(8)]
    common = "the a of to and in is for on with that this please".split()
    boilerplate = [" ".join(word() for _ in range(12)) + "." for _ in range(4)]
    texts = []
    for _ in range(n):
        chosen = rng.choice(8, size=rng.integers(1, 3), replace=False)
        length = int(rng.integers(5, 401))
        vocab = [w for t in chosen for w in topics[t]]
        words = [rng.choice(common) if rng.random() < 0.4 else rng.choice(vocab)
                 for _ in range(length)]
        text = " ".join(words)
        if rng.random() < 0.25:
            text += " " + " ".join([boilerplate[rng.integers(4)]] * int(rng.integers(3, 31)))
        texts.append(text)
    return texts


def structure_agreement(texts: list[str], n_pairs: int = 5000) -> dict[str, float]:
    """How v3's similarity structure follows v2's on ``texts``: over random pairs, the
    Spearman (rank) and Pearson correlation of the two versions' cosines and their mean
    absolute difference; beside them the same for v1 against v2, two projections of
    the same weighted n-grams (what two random projections to 64 dimensions agree)."""
    x = {v: HashingFeaturizer(version=v).transform(texts) for v in (1, 2, 3, 4)}
    pairs = np.random.default_rng(1).integers(0, len(texts), size=(n_pairs, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    cos = {v: np.einsum("ij,ij->i", m[pairs[:, 0]], m[pairs[:, 1]]) for v, m in x.items()}

    def ranks(v: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(v)).astype(np.float64)

    out: dict[str, float] = {"pairs": int(len(pairs))}
    for v in (3, 4, 1):
        out[f"spearman_v{v}_v2"] = float(np.corrcoef(ranks(cos[2]), ranks(cos[v]))[0, 1])
        out[f"pearson_v{v}_v2"] = float(np.corrcoef(cos[2], cos[v])[0, 1])
        out[f"mean_abs_difference_v{v}_v2"] = float(np.mean(np.abs(cos[v] - cos[2])))
    return out


def startup(runs: int) -> dict[str, float]:
    """Median over fresh processes of the kernel's start-up steps, in seconds."""
    samples = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=300, check=True)
        samples.append(json.loads(done.stdout))
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def long_texts(text: str, pool: int = 8) -> dict[str, dict[int, list[str]]]:
    """Per kind and length in LONG_LENGTHS, ``pool`` different texts (one text timed
    over and over would let the branch predictor learn it): "real", pieces of the
    corpus (repeated to the length) from spread-out offsets; "repetitive", one prompt of
    the corpus repeated to the length, a different prompt for each text."""
    real = text * (2 * LONG_LENGTHS[-1] // len(text) + 1)
    prompts = [p for p in text.split("\n\n") if len(p.strip()) > 20]
    chosen = [prompts[i] + " " for i in np.linspace(0, len(prompts) - 1, pool).astype(int)]
    out: dict[str, dict[int, list[str]]] = {"real": {}, "repetitive": {}}
    for n in LONG_LENGTHS:
        starts = np.linspace(0, len(real) - n - 1, pool).astype(int)
        out["real"][n] = [real[s:s + n] for s in starts]
        out["repetitive"][n] = [(p * (n // len(p) + 1))[:n] for p in chosen]
    return out


def run_long(args: argparse.Namespace, clock: Callable[[], float]) -> None:
    """The one-pass and the earlier v2 kernel on long texts, each called directly."""
    from bandit import _hashing_kernel

    rounds, seconds = (1, 0.05) if args.quick else (args.rounds, args.target_seconds)
    text, source = corpus()
    texts = long_texts(text)
    impls = {}
    for name, kernel in (("onepass", _hashing_kernel.featurize_onepass),
                         ("kernel", _hashing_kernel.featurize_one)):
        featurizer = HashingFeaturizer()
        featurizer._kernel = featurizer._long_kernel = kernel  # no dispatch on length
        impls[name] = featurizer.transform_one
    cases = [(kind, n) for kind in texts for n in LONG_LENGTHS]
    per_round = {name: {case: [] for case in cases} for name in impls}
    for r in range(rounds):
        names = list(impls) if r % 2 == 0 else list(reversed(impls))
        for kind, n in cases:
            for name in names:
                per_round[name][kind, n].append(
                    time_per_call(impls[name], texts[kind][n], seconds, clock) * 1e3)
    median = {name: {case: statistics.median(v) for case, v in by_case.items()}
              for name, by_case in per_round.items()}
    rows = [[kind, f"{n:,}", f"{median['kernel'][kind, n]:.1f}",
             f"{median['onepass'][kind, n]:.1f}",
             f"{median['kernel'][kind, n] / median['onepass'][kind, n]:.2f}x"]
            for kind, n in cases]
    print_table(f"v2 kernels on long texts, ms ({args.clock} time) per call (median of "
                f"{rounds} round(s); real texts: {source})",
                ["text", "characters", "earlier kernel ms", "one-pass ms",
                 "one-pass speed-up"], rows)
    if not args.quick:
        key = "{}_{}".format
        path = write_results(args.results_name, {
            "settings": {"dim": 64, "lengths": LONG_LENGTHS, "rounds": rounds,
                         "seconds_per_measurement": seconds, "clock": args.clock,
                         "texts": source, "texts_per_case": 8,
                         "repetitive": "one prompt of the corpus, repeated"},
            "ms_per_call": {name: {key(*case): v for case, v in by_case.items()}
                            for name, by_case in median.items()},
            "ms_per_call_per_round": {name: {key(*case): v for case, v in by_case.items()}
                                      for name, by_case in per_round.items()},
            "speedup_onepass_over_kernel": {
                key(*case): median["kernel"][case] / median["onepass"][case]
                for case in cases},
        }, packages=("numpy", "numba", "llvmlite"))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target-seconds", type=float, default=0.3,
                        help="time per (implementation, length) in each round")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this thread's CPU time (time.thread_time), which a "
                             "machine shared with other work inflates far less than the "
                             "wall clock; wall: time.perf_counter")
    parser.add_argument("--quick", action="store_true",
                        help="1 round of 0.05 s, 1 start-up run, no results file")
    parser.add_argument("--results-name", default="featurize_speed", metavar="NAME",
                        help="write results/NAME.json (default: %(default)s)")
    parser.add_argument("--long", action="store_true",
                        help="only the two v2 kernels on 10k-1M-character texts")
    parser.add_argument("--against-tree", type=Path, default=None, metavar="DIR",
                        help="also time DIR's one-pass kernel (a baseline checkout) in "
                             "the same rounds: the base row")
    args = parser.parse_args(argv)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.long:
        run_long(args, clock)
        return
    rounds, seconds = (1, 0.05) if args.quick else (args.rounds, args.target_seconds)

    text, source = corpus()
    texts = pools(text)
    impls = implementations(args.against_tree)
    base_same_bits = None
    if args.against_tree is not None:
        base_same_bits = same_bits(HashingFeaturizer(), base_featurizer(args.against_tree),
                                   [t for pool in texts.values() for t in pool])
        if not base_same_bits:
            print("warning: the base tree's kernel gives other vectors", file=sys.stderr)
    per_round: dict[str, dict[int, list[float]]] = {
        name: {n: [] for n in LENGTHS} for name in impls}
    for r in range(rounds):
        names = list(impls) if r % 2 == 0 else list(reversed(impls))
        for length in LENGTHS:
            for name in names:
                per_round[name][length].append(
                    time_per_call(impls[name], texts[length], seconds, clock) * 1e6)
    median = {name: {n: statistics.median(v) for n, v in by_len.items()}
              for name, by_len in per_round.items()}
    start = startup(1 if args.quick else 3)
    fid = fidelity(text)
    structure = {"generated": structure_agreement(generated_texts()),
                 "corpus": structure_agreement(
                     [p for p in text.split("\n\n") if p.strip()][:600])}

    rows = []
    for length in LENGTHS:
        onepass, kernel = median["onepass"][length], median["kernel"][length]
        onepass_v1, v1 = median["onepass_v1"][length], median["kernel_v1"][length]
        reference = median["reference"][length]
        sk = median.get("sklearn", {}).get(length)
        rows.append([f"{length:,}", f"{reference:.1f}", f"{v1:.1f}", f"{onepass_v1:.1f}",
                     f"{kernel:.1f}", f"{onepass:.1f}", f"{kernel / onepass:.2f}x",
                     f"{onepass / length * 1000:.1f}", f"{median['v3'][length]:.1f}",
                     f"{median['v3'][length] / length * 1000:.1f}",
                     f"{median['v4'][length]:.1f}",
                     f"{median['v4'][length] / length * 1000:.1f}",
                     "" if sk is None else f"{sk:.1f}"])
    long_rate = median["onepass"][2_000] / 2
    v3_rate = median["v3"][2_000] / 2
    v4_rate = median["v4"][2_000] / 2
    # Per round, v2 / v3 (timed next to each other), then the median.
    v3_paired = {n: statistics.median(b / t for b, t in zip(per_round["onepass"][n],
                                                            per_round["v3"][n], strict=True))
                 for n in LENGTHS}
    v4_paired = {n: statistics.median(b / t for b, t in zip(per_round["onepass"][n],
                                                            per_round["v4"][n], strict=True))
                 for n in LENGTHS}
    print_table(f"HashingFeaturizer (dim 64) per text, µs ({args.clock} time) per call "
                f"(median of {rounds} "
                f"round(s); texts: {source})",
                ["characters", "v1 reference µs", "v1 kernel µs", "v1 one-pass µs",
                 "v2 kernel µs", "v2 one-pass µs", "v2 one-pass speed-up",
                 "v2 one-pass µs/1k chars", "v3 µs", "v3 µs/1k chars", "v4 µs",
                 "v4 µs/1k chars", "sklearn µs"], rows,
                caption=f"goal <= {GOAL_US_PER_1000_CHARS:g} µs per 1,000 characters: "
                        f"v2 {long_rate:.1f}, v3 {v3_rate:.1f}, v4 {v4_rate:.1f} at 2,000 "
                        f"characters (speed-up over v2, paired rounds: v3 "
                        + ", ".join(f"{v:.2f}x at {n:,}" for n, v in v3_paired.items())
                        + "; v4 "
                        + ", ".join(f"{v:.2f}x at {n:,}" for n, v in v4_paired.items())
                        + "). Cosines against v2's (Spearman, Pearson, mean |diff|; v3, "
                          "v4, then v1 for scale): "
                        + "; ".join(f"{k} v3 {d['spearman_v3_v2']:.3f}, "
                                    f"{d['pearson_v3_v2']:.3f}, "
                                    f"{d['mean_abs_difference_v3_v2']:.3f}, v4 "
                                    f"{d['spearman_v4_v2']:.3f}, {d['pearson_v4_v2']:.3f}, "
                                    f"{d['mean_abs_difference_v4_v2']:.3f}, v1 "
                                    f"{d['spearman_v1_v2']:.3f}, {d['pearson_v1_v2']:.3f}, "
                                    f"{d['mean_abs_difference_v1_v2']:.3f}"
                                    for k, d in structure.items())
                        + f". Start-up (fresh process, "
                        f"median): import bandit {start['import_bandit_s']:.2f} s, first "
                        f"HashingFeaturizer() {start['construct_s']:.2f} s (numba import, "
                        f"tables), first call {start['first_call_s']:.2f} s. Fidelity "
                        "(correlation with the exact hashed cosine, RMS difference): "
                        + "; ".join(f"{v} {d['corr_with_exact_cosine']:.3f}, "
                                    f"{d['rms_difference']:.3f}" for v, d in fid.items()))
    against = {}
    if "base" in median:
        # Per round, base / this (the two timed next to each other), then the median.
        paired = {n: statistics.median(b / t for b, t in zip(per_round["base"][n],
                                                             per_round["onepass"][n],
                                                             strict=True))
                  for n in LENGTHS}
        print_table(f"v2 one-pass: this tree against {args.against_tree}, µs ({args.clock} "
                    f"time) per call of transform_one (median of {rounds} round(s))",
                    ["characters", "base µs", "this µs", "speed-up (paired rounds)",
                     "base µs/1k chars", "this µs/1k chars"],
                    [[f"{n:,}", f"{median['base'][n]:.1f}", f"{median['onepass'][n]:.1f}",
                      f"{paired[n]:.2f}x", f"{median['base'][n] / n * 1000:.1f}",
                      f"{median['onepass'][n] / n * 1000:.1f}"] for n in LENGTHS],
                    caption=f"the same vectors bit for bit: {base_same_bits}")
        against = {"against_tree": {
            "tree": str(args.against_tree), "same_bits": base_same_bits,
            "speedup_onepass_over_base_paired_rounds": {str(n): v for n, v in paired.items()},
            "base_us_per_1000_chars": {str(n): median["base"][n] / n * 1000
                                       for n in LENGTHS}}}
    if not args.quick:
        path = write_results(args.results_name, {
            "settings": {"dim": 64, "lengths": LENGTHS, "texts_per_length": POOL,
                         "rounds": rounds, "seconds_per_measurement": seconds,
                         "clock": args.clock,
                         "texts": source},
            "us_per_call": {name: {str(n): v for n, v in by_len.items()}
                            for name, by_len in median.items()},
            "us_per_call_per_round": {name: {str(n): v for n, v in by_len.items()}
                                      for name, by_len in per_round.items()},
            "speedup_reference_over_onepass": {
                str(n): median["reference"][n] / median["onepass"][n] for n in LENGTHS},
            "speedup_onepass_over_kernel": {
                str(n): median["kernel"][n] / median["onepass"][n] for n in LENGTHS},
            "speedup_onepass_v1_over_kernel_v1": {
                str(n): median["kernel_v1"][n] / median["onepass_v1"][n] for n in LENGTHS},
            "onepass_us_per_1000_chars": {
                str(n): median["onepass"][n] / n * 1000 for n in LENGTHS},
            "v3_us_per_1000_chars": {str(n): median["v3"][n] / n * 1000 for n in LENGTHS},
            "speedup_v3_over_v2_paired_rounds": {str(n): v for n, v in v3_paired.items()},
            "v4_us_per_1000_chars": {str(n): median["v4"][n] / n * 1000 for n in LENGTHS},
            "speedup_v4_over_v2_paired_rounds": {str(n): v for n, v in v4_paired.items()},
            "v3_structure_against_v2": structure,
            "startup_s": start,
            "fidelity": fid,
            "goals": {"onepass_le_20us_per_1000_chars_at_2000":
                      long_rate <= GOAL_US_PER_1000_CHARS,
                      "v3_le_20us_per_1000_chars_at_2000": v3_rate <= GOAL_US_PER_1000_CHARS,
                      "v4_le_20us_per_1000_chars_at_2000": v4_rate <= GOAL_US_PER_1000_CHARS},
            **against,
        }, packages=("numpy", "numba", "llvmlite", "scikit-learn"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
