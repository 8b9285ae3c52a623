"""Convert the LLMRouter data set into the replay format the benchmarks read.

Input (``<data-dir>`` = ``llmrouter/`` of the data root, see ``benchmarks/README.md``):

* ``train.jsonl`` / ``test.jsonl``: one ``{"question", "scores": {model: 0..1},
  "cluster_id"}`` per line;
* ``models.json``: ``{model: {"input_price_per_mtok", "output_price_per_mtok", ...}}``.

Output, one JSON object a line, train rows first, then test rows::

    {"id": "llmrouter-train-000000", "prompt": "...",
     "outcomes": {model: {"quality": q, "cost_usd": c}}, "split": "train"}

Cost assumption. The data has scores but no token counts, so the cost of one query on
one model is estimated as::

    cost_usd = (input_price_per_mtok * prompt_tokens
                + output_price_per_mtok * output_tokens) / 1e6
    prompt_tokens = ceil(len(prompt) / 4)      # the usual ~4 characters per token
    output_tokens = 256                        # --output-tokens, the same for every model

so costs differ across queries only through the prompt length, and across models only
through the price. Real answers vary in length by model and task; a replay on these costs
measures routing under *price-proportional* costs, not the true bills.

Rows. The set of models is the set scored in the first row read; every model in it must
have a price in ``models.json``. A row that lacks a score for one of those models, or
whose score is null, not a number or outside [0, 1], is an error (:class:`ConversionError`
naming the file, line and model) unless ``skip_incomplete`` (``--skip-incomplete``) is
set, in which case the row is left out and counted. The LLMRouter files have no such
rows; the rule is for other dumps in the same layout.

Usage::

    python -m benchmarks.convert_llmrouter \\
        --data-dir ../shared/data/llmrouter --out benchmarks/.cache/llmrouter.jsonl \\
        [--output-tokens 256] [--skip-incomplete]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bandit.pricing import CHARS_PER_TOKEN, prompt_tokens, request_cost
from benchmarks.common import CACHE_DIR, DATA_ENV_VAR, data_root

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_OUTPUT_TOKENS",
    "SPLITS",
    "ConversionError",
    "ConversionStats",
    "Price",
    "load_prices",
    "estimate_prompt_tokens",
    "query_cost_usd",
    "convert_rows",
    "convert_dir",
    "write_jsonl",
    "main",
]

#: Assumed length of every answer, in tokens (``--output-tokens``).
DEFAULT_OUTPUT_TOKENS = 256
#: Splits in output order.
SPLITS = ("train", "test")


class ConversionError(ValueError):
    """The input does not follow the LLMRouter layout; the message says where."""


class Price(NamedTuple):
    """USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float


@dataclass
class ConversionStats:
    """What a conversion read and wrote."""

    models: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def _price(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ConversionError(f"{where}: must be a finite number >= 0 (got {value!r})")
    return float(value)


def load_prices(path: Path) -> dict[str, Price]:
    """Read ``models.json`` into ``{model: Price}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: must be an object mapping model names to prices")
    prices = {}
    for model, entry in raw.items():
        if not isinstance(entry, dict):
            raise ConversionError(f"{path}: {model}: must be an object with the prices")
        prices[model] = Price(
            _price(entry.get("input_price_per_mtok"), f"{path}: {model}.input_price_per_mtok"),
            _price(entry.get("output_price_per_mtok"),
                   f"{path}: {model}.output_price_per_mtok"))
    return prices


def estimate_prompt_tokens(prompt: str) -> int:
    """``ceil(len(prompt) / 4)``: the usual ~4 characters per token
    (:func:`bandit.pricing.prompt_tokens`).

    >>> estimate_prompt_tokens("What is 2 + 2?")
    4
    """
    return prompt_tokens(prompt)


def query_cost_usd(price: Price, prompt_tokens: int, output_tokens: int) -> float:
    """Estimated USD cost of one query.

    >>> query_cost_usd(Price(0.2, 0.2), prompt_tokens=4, output_tokens=256)
    5.2e-05
    """
    return request_cost(price.input_per_mtok, price.output_per_mtok, prompt_tokens,
                        output_tokens)


def _score(scores: Mapping[str, object], model: str) -> float | None:
    value = scores.get(model)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return None
    return float(value)


def convert_rows(lines: Iterable[str], split: str, prices: Mapping[str, Price], *,
                 output_tokens: int = DEFAULT_OUTPUT_TOKENS, models: list[str] | None = None,
                 skip_incomplete: bool = False, source: str = "<rows>",
                 stats: ConversionStats | None = None) -> Iterator[dict[str, object]]:
    """Convert the JSON lines of one split into replay records.

    ``models`` fixes the model set; when None (or empty) it is taken from the first row
    and stored into the list passed, so the next split is checked against the same set.
    Blank lines are ignored; ids are ``llmrouter-<split>-<line number - 1>``.
    """
    if output_tokens < 0:
        raise ConversionError(f"output_tokens: must be >= 0 (got {output_tokens})")
    stats = ConversionStats() if stats is None else stats
    if models is None:
        models = []
    stats.rows.setdefault(split, 0)
    stats.skipped.setdefault(split, 0)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{where}: not valid JSON ({exc})") from None
        prompt = row.get("question") if isinstance(row, dict) else None
        scores = row.get("scores") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not isinstance(scores, dict):
            raise ConversionError(f"{where}: needs a string 'question' and an object 'scores'")
        if not models:
            unpriced = sorted(m for m in scores if m not in prices)
            if unpriced:
                raise ConversionError(f"{where}: no price in models.json for "
                                      + ", ".join(unpriced))
            models.extend(sorted(scores))
            stats.models = list(models)
        extra = sorted(set(scores) - set(models))
        if extra:
            raise ConversionError(f"{where}: scores models not in the first row: "
                                  + ", ".join(extra))
        qualities = {m: _score(scores, m) for m in models}
        missing = [m for m, q in qualities.items() if q is None]
        if missing:
            if skip_incomplete:
                stats.skipped[split] += 1
                continue
            raise ConversionError(
                f"{where}: scores.{missing[0]}: must be a number in [0, 1] (got "
                f"{scores.get(missing[0], 'nothing')!r}); use --skip-incomplete to leave "
                "such rows out")
        tokens = estimate_prompt_tokens(prompt)
        outcomes = {m: {"quality": qualities[m],
                        "cost_usd": query_cost_usd(prices[m], tokens, output_tokens),
                        "input_tokens": tokens, "output_tokens": output_tokens}
                    for m in models}
        stats.rows[split] += 1
        record = {"id": f"llmrouter-{split}-{line_no - 1:06d}", "prompt": prompt,
                  "outcomes": outcomes, "split": split,
                  "prices": {m: {"input_price_per_mtok": prices[m].input_per_mtok,
                                 "output_price_per_mtok": prices[m].output_per_mtok}
                             for m in models}}
        if row.get("cluster_id") is not None:
            record["task"] = str(row["cluster_id"])
        yield record


def convert_dir(data_dir: Path, *, output_tokens: int = DEFAULT_OUTPUT_TOKENS,
                skip_incomplete: bool = False,
                stats: ConversionStats | None = None) -> Iterator[dict[str, object]]:
    """Replay records of ``<data_dir>/train.jsonl`` then ``test.jsonl``."""
    data_dir = Path(data_dir)
    prices = load_prices(data_dir / "models.json")
    stats = ConversionStats() if stats is None else stats
    models: list[str] = []
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        with path.open(encoding="utf-8") as lines:
            yield from convert_rows(lines, split, prices, output_tokens=output_tokens,
                                    models=models, skip_incomplete=skip_incomplete,
                                    source=str(path), stats=stats)


def write_jsonl(records: Iterable[Mapping[str, object]], out: Path) -> int:
    """Write records one per line (atomically: a temporary file, then a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def missing_data_message(data_dir: Path) -> str:
    return (
        f"No LLMRouter data at {data_dir} (need train.jsonl, test.jsonl, models.json).\n"
        f"  * Point at a copy: --data-dir /path/to/llmrouter, or set {DATA_ENV_VAR} to the\n"
        "    directory that holds llmrouter/.\n"
        "  * Or use your own log: skip this converter and write the log directly in the\n"
        "    replay format, one JSON object a line:\n"
        '      {"id": "q1", "prompt": "...", "outcomes": {"model-a": {"quality": 0.8,\n'
        '       "cost_usd": 0.0004}, "model-b": {...}}, "split": "train"}\n'
        "    (quality in [0, 1], cost in USD; every model you want to route between, for\n"
        "    every row; train rows first, then test). See benchmarks/README.md."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.convert_llmrouter",
        description="Convert LLMRouter train/test.jsonl + models.json to the replay format.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"the llmrouter/ directory (default: ${DATA_ENV_VAR}/llmrouter "
                             "or ../shared/data/llmrouter next to the repository)")
    parser.add_argument("--out", type=Path, default=CACHE_DIR / "llmrouter.jsonl",
                        help="output JSON lines (default: benchmarks/.cache/llmrouter.jsonl)")
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                        help="assumed answer length in tokens, for every model and query "
                             f"(default: {DEFAULT_OUTPUT_TOKENS})")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="leave out rows with a missing or invalid score instead of "
                             "failing")
    args = parser.parse_args(argv)
    if args.output_tokens < 0:
        parser.error("--output-tokens: must be >= 0")
    data_dir = args.data_dir if args.data_dir is not None else data_root() / "llmrouter"
    needed = [data_dir / name for name in ("train.jsonl", "test.jsonl", "models.json")]
    if not all(p.is_file() for p in needed):
        print(missing_data_message(data_dir), file=sys.stderr)
        return 2
    stats = ConversionStats()
    try:
        count = write_jsonl(convert_dir(data_dir, output_tokens=args.output_tokens,
                                        skip_incomplete=args.skip_incomplete, stats=stats),
                            args.out)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{split} {n}" for split, n in stats.rows.items())
    skipped = sum(stats.skipped.values())
    print(f"wrote {count} rows ({rows}; {skipped} skipped) for {len(stats.models)} models "
          f"to {args.out}\ncost = (input price * ceil(len(prompt)/{CHARS_PER_TOKEN}) + output "
          f"price * {args.output_tokens}) / 1e6 USD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
