"""Helpers shared by the benchmarks: where the data is, where results go, tables.

The development data (``../shared/data`` next to the repository, see
``benchmarks/README.md``) is never part of the repository; ``BANDIT_ROUTER_DATA``
points the benchmarks at another copy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DATA_ENV_VAR",
    "REPO_ROOT",
    "RESULTS_DIR",
    "CACHE_DIR",
    "data_root",
    "code_version",
    "machine_info",
    "write_results",
    "add_output_options",
    "print_table",
    "VALUE_WEIGHTS",
    "shuffle_order",
]

#: Environment variable naming the data root (the directory that holds ``llmrouter/``).
DATA_ENV_VAR = "BANDIT_ROUTER_DATA"

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Derived files (converted logs); gitignored.
CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
#: The cost weights w (reward = quality - w x cost in USD) at which the routing-value
#: benchmarks (value_bounds, value_ceiling, value_learners, exploration_spend) measure
#: each data set.
VALUE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "llmrouter": (0.0, 100.0, 300.0, 1000.0, 3000.0),
    "mmlu": (0.0, 10.0, 30.0, 100.0), "gsm8k": (0.0, 10.0, 30.0, 100.0)}


def data_root() -> Path:
    """The data root: ``$BANDIT_ROUTER_DATA`` if set, else ``<repo>/../shared/data``."""
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ()) -> dict[str, object]:
    """What the numbers depend on: interpreter, numpy and its BLAS, CPUs, load, time."""
    import numpy as np

    info: dict[str, object] = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        info["cpus_usable"] = None
    try:
        # Load average at the time of writing: numbers taken on a busy machine are noisy.
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["loadavg_1_5_15"] = None
    try:
        from threadpoolctl import threadpool_info

        # The pools' default sizes; a benchmark that limits them says so in its settings.
        info["blas_pools_default"] = [{k: pool.get(k) for k in ("internal_api", "version",
                                                  "num_threads", "architecture")}
                        for pool in threadpool_info()]
    except ImportError:
        info["blas_pools_default"] = None
    info["packages"] = {name: _version(name) for name in packages}
    return info


def code_version() -> dict[str, object]:
    """The commit measured, and whether the learning core differed from it."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "bandit")
    return {"commit": git("rev-parse", "HEAD"),
            "bandit_modified": None if status is None else bool(status)}


def write_results(name: str, payload: Mapping[str, object],
                  packages: Sequence[str] = (), results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` with the payload and :func:`machine_info`."""
    out_dir = RESULTS_DIR if results_dir is None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    document = {"benchmark": name, "code": code_version(), "machine": machine_info(packages),
                **payload}
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def shuffle_order(n: int, shuffle: int) -> np.ndarray:
    """The row order of shuffle ``shuffle`` (0, 1, ...) of ``n`` rows: the permutation of
    seed ``shuffle + 1`` (the router of that pass takes seed ``shuffle``), the same in
    every benchmark that replays shuffles; the file order is the unshuffled stream.

    >>> import numpy as np
    >>> shuffle_order(5, 0).tolist() == np.random.default_rng(1).permutation(5).tolist()
    True
    """
    import numpy as np

    return np.random.default_rng(shuffle + 1).permutation(n)


def add_output_options(parser: argparse.ArgumentParser, name: str | None,
                       name_help: str | None = None) -> None:
    """``--out-dir DIR`` and ``--out-name NAME``: where :func:`write_results` writes
    (``DIR/NAME.json``; default ``benchmarks/results/<name>.json``). ``--name`` is kept,
    hidden, as an older spelling of ``--out-name`` (commands in earlier results)."""
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results directory (default benchmarks/results)")
    parser.add_argument("--out-name", default=name,
                        help=name_help or f"results file name (default {name})")
    parser.add_argument("--name", dest="out_name", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                caption: str | None = None) -> None:
    """Print a table (rich); numbers are right-aligned, everything is shown as given."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(width=max(120, len(columns) * 14)).print(table)


def profile_in_tree(tree: Path, script: str, args: Sequence[object]) -> object:
    """``profile(*args)`` of the benchmark module ``script`` (a file path), run in a
    fresh process importing ``bandit`` from the checkout ``tree`` (a baseline of
    ``--against-tree``); its JSON answer. Fails if ``bandit`` came from elsewhere."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "import importlib.util as u; "
            "spec = u.spec_from_file_location('profiled', sys.argv[2]); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
            "import bandit; "
            "print(json.dumps({'bandit': bandit.__file__, "
            "'table': m.profile(*json.loads(sys.argv[3]))}))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    done = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code, str(tree), script, json.dumps(list(args))],
        capture_output=True, text=True, check=False, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"{tree}: failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(run["bandit"]).resolve().parents[1] != tree.resolve():
        raise RuntimeError(f"{tree}: imported bandit from {run['bandit']}")
    return run["table"]


def add_tree_options(parser: argparse.ArgumentParser, out: str) -> None:
    """``--against-tree DIR`` (a baseline checkout, e.g. ``git archive main``), its
    ``--rounds`` and ``--out NAME`` (``results/<NAME>.json``) of
    :func:`alternate_trees`'s benchmarks."""
    parser.add_argument("--against-tree", type=Path, default=None, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per tree with --against-tree (default 3)")
    parser.add_argument("--out", default=out, help="results/<OUT>.json")


def alternate_trees(root: Path, args: argparse.Namespace, script: str,
                    profile_args: Sequence[object]
                    ) -> tuple[dict[str, Path], dict[str, list], list[float]]:
    """:func:`profile_in_tree` for this tree (``root``) and, with ``--against-tree``
    (:func:`add_tree_options`), the base, ``--rounds`` times in alternating order (one
    round with a single tree): the trees by name ("this", "base"), the samples by tree
    and the 1-minute load average before and after each run."""
    trees = {"this": root}
    if args.against_tree is not None:
        trees["base"] = args.against_tree
    samples: dict[str, list] = {t: [] for t in trees}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds if len(trees) > 1 else 1):
        for t in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            print(f"round {r + 1}: {t} ...", file=sys.stderr)
            samples[t].append(profile_in_tree(trees[t], script, profile_args))
            load.append(os.getloadavg()[0])
    return trees, samples, load


def median_over_rounds(samples: Mapping[str, list], policies: Sequence[str],
                       keys: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """The median over :func:`alternate_trees`'s rounds of each tree's
    ``sample[policy][key]``: ``{tree: {policy: {key: median}}}``."""
    return {t: {p: {k: statistics.median(run[p][k] for run in runs) for k in keys}
                for p in policies} for t, runs in samples.items()}
