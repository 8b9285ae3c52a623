"""``bandit-router replay``: one online pass of a policy over a log with every model's
outcome, the policy seeing only the outcome of the model it chose."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bandit import InvalidInputError, LinearThompson, LinUCB, Preferences
from bandit.replay import ReplayLog
from bandit.replay import replay as run_replay
from service.config import Settings, default_dim
from service.features import head_and_tail

POLICIES = {"linucb": LinUCB, "thompson": LinearThompson}


def read_log(path: Path) -> tuple[list[str], list[str], ReplayLog]:
    """Read the replay format: one JSON object a line,
    ``{"id", "prompt", "outcomes": {model: {"quality", "cost_usd", "latency_ms"?}}}``."""
    ids: list[str] = []
    prompts: list[str] = []
    rows: list[np.ndarray] = []
    arms: list[str] | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                outcomes = record["outcomes"]
                prompt = record.get("prompt", "")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"line {number}", "must be a JSON object with "
                                        "'outcomes' (and 'prompt' unless --embeddings)",
                                        str(exc)) from None
            if arms is None:
                arms = list(outcomes)
            if set(outcomes) != set(arms):
                raise InvalidInputError(f"line {number}.outcomes",
                                        "must name the same models as line 1: "
                                        + ", ".join(arms), sorted(outcomes))
            rows.append(np.array([[_number(outcomes[a], key, number, a)
                                   for key in ("quality", "cost_usd", "latency_ms")]
                                  for a in arms]))
            ids.append(str(record.get("id", number)))
            prompts.append(prompt if isinstance(prompt, str) else "")
    if not rows or arms is None:
        raise InvalidInputError("DATA", "holds no rows", str(path))
    return ids, prompts, ReplayLog(arms, np.stack(rows))


def _number(outcome: Any, key: str, line: int, arm: str) -> float:
    value = outcome.get(key) if isinstance(outcome, dict) else None
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"line {line}.outcomes.{arm}.{key}", "must be a number",
                                value)
    return float(value)


def replay(
    data: Annotated[Path, typer.Argument(help="Replay log (JSON lines), see docs.",
                                         exists=True, dir_okay=False)],
    policy: Annotated[str, typer.Option(help="linucb or thompson")] = "linucb",
    preferences: Annotated[str, typer.Option(
        help="Weights: quality=1,cost=W[,latency=V] (cost per USD, latency per second)"
    )] = "quality=1,cost=0",
    seed: Annotated[int, typer.Option(help="Seed of the policy's random generator")] = 0,
    embeddings: Annotated[Path | None, typer.Option(
        help=".npy file with one context row per log line, instead of featurizing prompts",
        exists=True, dir_okay=False)] = None,
    featurizer: Annotated[str, typer.Option(help="hashing (default) or minilm")] = "hashing",
    dim: Annotated[int | None, typer.Option(
        help="Context dimension for the featurizer; default the service's for it (64 "
             "hashing, 384 minilm: BANDIT_ROUTER_DIM's default)")] = None,
    alpha: Annotated[float, typer.Option(help="LinUCB bonus width")] = 0.3,
    batch_size: Annotated[int, typer.Option(help="Decisions per feedback round")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here")] = None,
) -> None:
    console = Console()
    try:
        if policy not in POLICIES:
            raise InvalidInputError("--policy", "allowed: " + ", ".join(POLICIES), policy)
        prefs = Preferences.parse(preferences)
        _, prompts, log = read_log(data)
        if embeddings is not None:
            x = np.load(embeddings, allow_pickle=False).astype(np.float64)
            if x.ndim != 2 or x.shape[0] != len(prompts):
                raise InvalidInputError("--embeddings", f"must be a 2-D array with one row "
                                        f"per log line ({len(prompts)})", x.shape)
        else:
            x, _spec = featurize_prompts(prompts, featurizer, dim)
        params: dict[str, Any] = {"seed": seed}
        if policy == "linucb":
            params["alpha"] = alpha
        learner = POLICIES[policy](x.shape[1], **params)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"replaying {len(prompts)} rows", total=len(prompts))
            run = run_replay(learner, x, log, prefs, batch_size=batch_size,
                             progress=lambda done: bar.update(task, completed=done))
    except InvalidInputError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    result = {"data": str(data), "policy": policy, "seed": seed,
              "featurizer": "embeddings" if embeddings else featurizer, "dim": int(x.shape[1]),
              **run.summary}
    for key, window in run.summary.items():
        if isinstance(window, dict) and "policy" in window:
            console.print(render_table(f"{policy} — {key} ({window['rows']} rows)", window))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"results written to {json_out}")


def featurize_prompts(prompts: list[str], featurizer: str,
                      dim: int | None) -> tuple[np.ndarray, str]:
    """Contexts of logged prompts, built as the service builds a decide's (featurizer seed
    0 = ``FEATURIZER_SEED``'s default; a long prompt from its head and tail,
    ``FEATURIZE_CHARS``'s default; ``dim`` None = ``DIM``'s default for the featurizer),
    so that what is fitted here fits the service; and the featurizer's spec."""
    from bandit.featurize import make_featurizer

    keep = Settings.model_fields["featurize_chars"].default
    built = make_featurizer(featurizer, default_dim(featurizer) if dim is None else dim,
                            seed=0)
    return built.transform([head_and_tail(p, keep) for p in prompts]), built.spec


def render_table(title: str, window: dict) -> Table:
    table = Table(title=title)
    for column in ("router", "quality", "cost $", "reward", "regret", "share"):
        table.add_column(column, justify="left" if column == "router" else "right")

    def row(name: str, s: dict, share: str = "") -> None:
        table.add_row(name, f"{s['quality']:.4f}", f"{s['cost_usd']:.6f}",
                      f"{s['reward']:.4f}", f"{s.get('regret', float('nan')):.1f}", share)

    row("policy", window["policy"])
    row("oracle", window["oracle"])
    for name, s in sorted(window["models"].items(), key=lambda kv: -kv[1]["reward"]):
        row(name, s, f"{window['share'][name]:.1%}")
    return table
