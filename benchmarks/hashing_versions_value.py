"""Routing value of hashing version 3 or 4 against version 2, paired by shuffle (issue 19).

``select-ts`` on the ``+hashing-v2`` and ``+hashing-v3`` (``--version 4``: ``+hashing-v4``)
contexts of
``benchmarks.value_learners`` (LLMRouter, MMLU first 3,000 rows, GSM8K), the same 5
shuffles and policy seeds for both versions: per data set the mean difference v3 - v2 (v4 - v2)
over weights and shuffles, and its standard error over the 5 shuffles (each shuffle's
difference averaged over the weights first). ``value_learners`` reports the same passes
unpaired (mean and sd per weight).

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.hashing_versions_value
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.hashing_versions_value --version 4 \
        --out-name value_feat4_paired
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.hashing_versions_value --seeds 1,2,3 \
        --out-name value_v2_seeds_paired

``--seeds``: version 2 with each of those hashing seeds against version 2 with seed 0
(the same shuffles): how far a change of the vectors that keeps their meaning (another
seed of the same definition) moves the paired difference, the scale to read a version's
difference on.
"""

from __future__ import annotations

import argparse
import multiprocessing

import numpy as np

from benchmarks.common import write_results
from benchmarks.value_learners import VALUE_WEIGHTS, _job, _load

SHUFFLES = 5
MMLU_ROWS = 3000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, choices=(3, 4), default=3,
                        help="the version paired with version 2 (default: %(default)s)")
    parser.add_argument("--out-name", default=None, metavar="NAME",
                        help="write results/NAME.json (default: value_feat3_paired for "
                             "version 3, value_v4_paired for 4)")
    parser.add_argument("--seeds", default=None, metavar="S,S",
                        help="instead of a version: version 2 with these hashing seeds, "
                             "each paired with version 2 seed 0")
    args = parser.parse_args(argv)
    if args.seeds:
        news = {f"v2-seed{int(s)}": f"+hashing-v2-seed{int(s)}" for s in args.seeds.split(",")}
        out_name = args.out_name or "value_v2_seeds_paired"
    else:
        news = {f"v{args.version}": f"+hashing-v{args.version}"}
        out_name = args.out_name or ("value_feat3_paired" if args.version == 3
                                     else f"value_v{args.version}_paired")
    contexts = {"v2": "+hashing-v2", **news}
    bases = ("llmrouter", "mmlu", "gsm8k")
    for base in bases:  # before the workers fork: they share what is loaded
        for context in contexts.values():
            _load(base + context, MMLU_ROWS)
    out = {}
    with multiprocessing.Pool(2) as pool:
        for base in bases:
            weights = VALUE_WEIGHTS[base]
            values = {}
            for label, context in contexts.items():
                jobs = [(base + context, "select-ts", w, s, MMLU_ROWS)
                        for w in weights for s in range(SHUFFLES)]
                values[label] = np.array(pool.map(_job, jobs)).reshape(len(weights), SHUFFLES)
            out[base] = {"weights": list(weights),
                         **{label: v.tolist() for label, v in values.items()}}
            for label in news:
                per_shuffle = (values[label] - values["v2"]).mean(axis=0)
                se = float(per_shuffle.std(ddof=1) / np.sqrt(SHUFFLES))
                key = "" if len(news) == 1 else f"{label}_"
                out[base].update({f"{key}diff_mean": float(per_shuffle.mean()),
                                  f"{key}diff_per_shuffle": per_shuffle.tolist(),
                                  f"{key}diff_se": se})
                print(f"{base}: {label} - v2 {per_shuffle.mean():+.4f} (se {se:.4f}; "
                      f"per shuffle {np.round(per_shuffle, 4).tolist()})", flush=True)
    print(f"wrote {write_results(out_name, out)}")


if __name__ == "__main__":
    main()
