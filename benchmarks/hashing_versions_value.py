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
    args = parser.parse_args(argv)
    new = args.version
    out_name = args.out_name or ("value_feat3_paired" if new == 3 else f"value_v{new}_paired")
    bases = ("llmrouter", "mmlu", "gsm8k")
    for base in bases:  # before the workers fork: they share what is loaded
        for v in (2, new):
            _load(f"{base}+hashing-v{v}", MMLU_ROWS)
    out = {}
    with multiprocessing.Pool(2) as pool:
        for base in bases:
            weights = VALUE_WEIGHTS[base]
            values = {}
            for v in (2, new):
                jobs = [(f"{base}+hashing-v{v}", "select-ts", w, s, MMLU_ROWS)
                        for w in weights for s in range(SHUFFLES)]
                values[v] = np.array(pool.map(_job, jobs)).reshape(len(weights), SHUFFLES)
            per_shuffle = (values[new] - values[2]).mean(axis=0)
            out[base] = {"weights": list(weights), "v2": values[2].tolist(),
                         f"v{new}": values[new].tolist(),
                         "diff_mean": float(per_shuffle.mean()),
                         "diff_per_shuffle": per_shuffle.tolist(),
                         "diff_se": float(per_shuffle.std(ddof=1) / np.sqrt(SHUFFLES))}
            print(f"{base}: v{new} - v2 {per_shuffle.mean():+.4f} (se {out[base]['diff_se']:.4f}; "
                  f"per shuffle {np.round(per_shuffle, 4).tolist()})", flush=True)
    print(f"wrote {write_results(out_name, out)}")


if __name__ == "__main__":
    main()
