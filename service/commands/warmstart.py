"""``bandit-router warmstart``: fit a policy on a labelled log (every model's outcome per
query, the replay format) and write it as a state file (:mod:`service.state_file`, with
the featurizer and dimension it was fitted in), which ``bandit-router state import``
loads into a running service, so that a deployment starts from that prior."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from bandit import InvalidInputError
from bandit.featurize import HASHING_VERSIONS
from bandit.replay import ReplayLog, warm_start
from service.commands.replay import POLICIES, featurize_prompts, read_log
from service.config import DEFAULT_POLICY
from service.state_file import StateFile


def warmstart(
    data: Annotated[Path, typer.Argument(help="Labelled log (replay format, JSON lines)",
                                         exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Where to write the state file (JSON; "
                                      "bandit-router state import loads it)")],
    policy: Annotated[str, typer.Option(
        help="linucb, thompson or select (the service's default: its file also carries "
             "which of each model's nested models predicts it)")] = DEFAULT_POLICY,
    weight: Annotated[float, typer.Option(
        help="How much one labelled row counts, in (0, 1]: below 1 lets live feedback "
             "take over sooner")] = 0.25,
    embeddings: Annotated[Path | None, typer.Option(
        help=".npy with one context row per log line", exists=True, dir_okay=False)] = None,
    featurizer: Annotated[str, typer.Option(help="hashing (default) or minilm")] = "hashing",
    dim: Annotated[int | None, typer.Option(
        help="Context dimension for the featurizer; default the service's for it (64 "
             "hashing, 384 minilm: BANDIT_ROUTER_DIM's default)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the policy")] = 0,
    hashing_version: Annotated[int, typer.Option(
        help="Hashing featurizer version: the service's (BANDIT_ROUTER_HASHING_VERSION; "
             "1 for a deployment that learned with version 1, 3 or 4 for one that "
             "opted in to it)")] = 2,
) -> None:
    console = Console()
    try:
        if policy not in POLICIES:
            raise InvalidInputError("--policy", "allowed: " + ", ".join(POLICIES), policy)
        if hashing_version not in HASHING_VERSIONS:
            raise InvalidInputError("--hashing-version", "allowed: "
                                    + ", ".join(map(str, HASHING_VERSIONS)), hashing_version)
        _, prompts, log = read_log(data)
        spec = f"embeddings:{embeddings.name}" if embeddings is not None else ""
        if embeddings is not None:
            x = np.load(embeddings, allow_pickle=False).astype(np.float64)
            if x.ndim != 2 or x.shape[0] != len(prompts):
                raise InvalidInputError("--embeddings", "must be a 2-D array with one row "
                                        f"per log line ({len(prompts)})", x.shape)
        else:
            x, spec = featurize_prompts(prompts, featurizer, dim, hashing_version)
        fitted = POLICIES[policy](x.shape[1], seed=seed)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"fitting {len(log.arms)} models", total=len(log.arms))
            for j, arm in enumerate(log.arms):  # one arm at a time, for the progress bar
                warm_start(fitted, x, ReplayLog([arm], log.outcomes[:, j:j + 1]),
                           weight=weight)
                bar.update(task, completed=j + 1)
    except InvalidInputError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    policies = {f"shared:{policy}": fitted.to_bytes(derived=False)}
    out.write_text(StateFile(spec, int(x.shape[1]), policies, source="warmstart").dumps())
    console.print(f"{policy} fitted on {len(prompts)} rows x {len(log.arms)} models "
                  f"(weight {weight}) written to {out}; load it with: bandit-router state "
                  f"import {out}")
