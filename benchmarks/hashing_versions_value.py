"""Routing value of hashing version 3 against version 2, paired by shuffle (issue 19).

``select-ts`` on the ``+hashing-v2`` and ``+hashing-v3`` contexts of
``benchmarks.value_learners`` (LLMRouter, MMLU first 3,000 rows, GSM8K), the same 5
shuffles and policy seeds for both versions: per data set the mean difference v3 - v2
over weights and shuffles, and its standard error over the 5 shuffles (each shuffle's
difference averaged over the weights first). ``value_learners`` reports the same passes
unpaired (mean and sd per weight).

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.hashing_versions_value
"""

from __future__ import annotations

import multiprocessing

import numpy as np

from benchmarks.common import write_results
from benchmarks.value_learners import VALUE_WEIGHTS, _job, _load

SHUFFLES = 5
MMLU_ROWS = 3000


def main() -> None:
    bases = ("llmrouter", "mmlu", "gsm8k")
    for base in bases:  # before the workers fork: they share what is loaded
        for v in (2, 3):
            _load(f"{base}+hashing-v{v}", MMLU_ROWS)
    out = {}
    with multiprocessing.Pool(2) as pool:
        for base in bases:
            weights = VALUE_WEIGHTS[base]
            values = {}
            for v in (2, 3):
                jobs = [(f"{base}+hashing-v{v}", "select-ts", w, s, MMLU_ROWS)
                        for w in weights for s in range(SHUFFLES)]
                values[v] = np.array(pool.map(_job, jobs)).reshape(len(weights), SHUFFLES)
            per_shuffle = (values[3] - values[2]).mean(axis=0)
            out[base] = {"weights": list(weights), "v2": values[2].tolist(),
                         "v3": values[3].tolist(), "diff_mean": float(per_shuffle.mean()),
                         "diff_per_shuffle": per_shuffle.tolist(),
                         "diff_se": float(per_shuffle.std(ddof=1) / np.sqrt(SHUFFLES))}
            print(f"{base}: v3 - v2 {per_shuffle.mean():+.4f} (se {out[base]['diff_se']:.4f}; "
                  f"per shuffle {np.round(per_shuffle, 4).tolist()})", flush=True)
    print(f"wrote {write_results('value_feat3_paired', out)}")


if __name__ == "__main__":
    main()
