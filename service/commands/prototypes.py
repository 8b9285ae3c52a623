"""``bandit-router fit-prototypes``: fit a prototype map on a sample of unlabelled prompts
and write it, for ``BANDIT_ROUTER_PROTOTYPE_MAP`` (service/README.md).

Input: one prompt a line. ``--format jsonl`` reads JSON objects with a ``prompt`` (or,
failing that, ``text``) string, as in the replay format; ``--format text`` takes each
line as a prompt (no newlines inside a prompt). ``auto`` (default) is ``jsonl`` for a
``.jsonl``, ``.ndjson`` or ``.json`` file and ``text`` otherwise. Blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from bandit import InvalidInputError

FORMATS = ("auto", "jsonl", "text")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def read_prompts(path: Path, fmt: str) -> list[str]:
    """The prompts of ``path`` (see the module docstring for the formats)."""
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in _JSONL_SUFFIXES else "text"
    prompts: list[str] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if fmt == "text":
                    prompts.append(line.rstrip("\r\n"))
                    continue
                try:
                    record = json.loads(line)
                    prompt = record.get("prompt", record.get("text"))
                except (json.JSONDecodeError, AttributeError) as exc:
                    raise InvalidInputError(
                        f"PROMPTS line {number}", "must be a JSON object with a 'prompt' or "
                        "'text' string (or use --format text)", str(exc)) from None
                if not isinstance(prompt, str):
                    raise InvalidInputError(
                        f"PROMPTS line {number}", "must have a 'prompt' or 'text' string",
                        type(prompt).__name__)
                prompts.append(prompt)
    except UnicodeDecodeError as exc:
        raise InvalidInputError("PROMPTS", "must be UTF-8 text", str(exc)) from None
    return prompts


def fit_prototypes(
    prompts_file: Annotated[Path, typer.Argument(
        metavar="PROMPTS", help="Unlabelled prompts: JSON lines with 'prompt' or 'text', "
        "or plain text, one prompt a line", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Where to write the map (JSON)")],
    k: Annotated[int, typer.Option(help="Number of prototypes (the policies' dimension "
                                         "without --include-base)")] = 64,
    temperature: Annotated[float, typer.Option(
        help="Softmax temperature of the soft assignment, in [1e-4, 1e3]")] = 0.05,
    include_base: Annotated[bool, typer.Option(
        help="Keep the featurizer's vector next to the prototypes (dim = k + --dim)")
    ] = False,
    mix: Annotated[float, typer.Option(
        help="With --include-base: weight of the prototype part, in (0, 1)")] = 0.5,
    featurizer: Annotated[str, typer.Option(
        help="hashing (default) or minilm: the service's BANDIT_ROUTER_FEATURIZER")
    ] = "hashing",
    dim: Annotated[int, typer.Option(
        help="Featurizer dimension: the service's BANDIT_ROUTER_DIM")] = 64,
    featurizer_seed: Annotated[int, typer.Option(
        help="The service's BANDIT_ROUTER_FEATURIZER_SEED")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the k-means++ initialization")] = 0,
    hashing_version: Annotated[int, typer.Option(
        help="Hashing featurizer version: the service's (BANDIT_ROUTER_HASHING_VERSION; "
             "1 for a deployment that learned with version 1, 3 or 4 for one that "
             "opted in to it)")] = 2,
    fmt: Annotated[str, typer.Option("--format", help="auto, jsonl or text")] = "auto",
) -> None:
    """Fit the prototypes (spherical k-means, no outcomes needed) and write the map."""
    from bandit.featurize import FEATURIZERS, HASHING_VERSIONS, PrototypeMap, make_featurizer

    console = Console()
    try:
        if fmt not in FORMATS:
            raise InvalidInputError("--format", "allowed: " + ", ".join(FORMATS), fmt)
        if featurizer not in FEATURIZERS:
            raise InvalidInputError("--featurizer", "allowed: " + ", ".join(FEATURIZERS),
                                    featurizer)
        if hashing_version not in HASHING_VERSIONS:
            raise InvalidInputError("--hashing-version", "allowed: "
                                    + ", ".join(map(str, HASHING_VERSIONS)), hashing_version)
        if not 1 <= dim <= 4096:  # BANDIT_ROUTER_DIM's range
            raise InvalidInputError("--dim", "must be an integer in [1, 4096]", dim)
        if not 1e-4 <= temperature <= 1e3:
            raise InvalidInputError("--temperature", "must be a number in [1e-4, 1e3]",
                                    temperature)
        if not 0 < mix < 1:
            raise InvalidInputError("--mix", "must be a number in (0, 1)", mix)
        if k < 1:
            raise InvalidInputError("--k", "must be an integer >= 1", k)
        prompts = read_prompts(prompts_file, fmt)
        try:
            base = make_featurizer(featurizer, dim, seed=featurizer_seed,
                                   hashing_version=hashing_version)
        except ImportError as exc:  # minilm without the [embed] extra
            raise InvalidInputError("--featurizer", "minilm needs the [embed] extra "
                                    "(torch); hashing needs nothing", str(exc)) from None
        x = base.transform(prompts)
        usable = int((np.linalg.norm(x, axis=1) > 0).sum())  # empty prompts carry nothing
        if k > usable:
            raise InvalidInputError("--k", f"must be at most the number of non-empty "
                                    f"prompts in PROMPTS ({usable})", k)
        fitted = PrototypeMap.fit(x, k, temperature=temperature, include_base=include_base,
                                  mix=mix, seed=seed)
    except InvalidInputError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    fitted.save(str(out))
    console.print(f"{fitted.k} prototypes fitted on {usable} prompts ({featurizer}, dim "
                  f"{dim}) written to {out}: set BANDIT_ROUTER_PROTOTYPE_MAP={out} with "
                  f"BANDIT_ROUTER_FEATURIZER={featurizer} BANDIT_ROUTER_DIM={dim}; the "
                  f"policies' dimension becomes {fitted.dim}")
