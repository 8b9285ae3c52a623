"""``bandit-router evaluate``: estimate a candidate policy from logged decisions.

The log comes from the service's database (decisions with their context, propensity and
candidates, joined with their feedback) or from a JSON-lines file, one decision a line:
``{"context": [...], "model": "...", "propensity": 0.93, "outcome": {"quality": 1,
"cost_usd": 0.0004, "latency_ms": 900}, "candidates": ["...", ...]?}``.

The candidate (a policy class with its settings, evaluated under given preferences)
starts empty and learns from each logged outcome after scoring it: the estimate is the
reward it would have averaged on that traffic. IPS, SNIPS and doubly robust estimates
are printed with 95% intervals next to the logged policy's own average reward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bandit import InvalidInputError, LinearThompson, LinUCB, Preferences, SelectiveThompson
from bandit.ope import LoggedDecisions, evaluate_log

POLICIES = {"linucb": LinUCB, "thompson": LinearThompson, "select": SelectiveThompson}


def read_log_file(path: Path) -> LoggedDecisions:
    contexts, arms, props, outcomes, candidates = [], [], [], [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                contexts.append([float(v) for v in row["context"]])
                arms.append(str(row["model"]))
                props.append(float(row["propensity"]))
                outcomes.append(dict(row["outcome"]))
                candidates.append(list(row.get("candidates") or []))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"line {number}", "must be a JSON object with "
                                        "context, model, propensity and outcome",
                                        str(exc)) from None
    if not contexts:
        raise InvalidInputError("LOG", "holds no decisions", str(path))
    dims = {len(c) for c in contexts}
    if len(dims) != 1:
        raise InvalidInputError("context", "every context must have the same length",
                                sorted(dims))
    all_arms = sorted(set(arms) | {c for cs in candidates for c in cs})
    return LoggedDecisions(np.array(contexts), arms, props, outcomes,
                           [cs or all_arms for cs in candidates])


def read_log_database(url: str, tenant: str | None, limit: int | None) -> LoggedDecisions:
    """Decisions with at least one feedback, oldest first; several feedback events of one
    decision are merged (the latest value of each objective wins)."""
    from sqlalchemy import select

    from service.db.engine import make_engine
    from service.db.models import DecisionRow, Feedback

    engine = make_engine(url)
    query = select(DecisionRow).order_by(DecisionRow.created_at, DecisionRow.id)
    if tenant:
        query = query.where(DecisionRow.tenant_id == tenant)
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        decisions = conn.execute(query).mappings().all()
        ids = [d["id"] for d in decisions]
        merged: dict[str, dict[str, float]] = {}
        for chunk in range(0, len(ids), 1000):
            rows = conn.execute(select(Feedback).where(
                Feedback.decision_id.in_(ids[chunk:chunk + 1000])).order_by(Feedback.id))
            for fb in rows.mappings():
                outcome = merged.setdefault(fb["decision_id"], {})
                for key in ("quality", "cost_usd", "latency_ms"):
                    if fb[key] is not None:
                        outcome[key] = fb[key]
    engine.dispose()
    kept = [d for d in decisions if merged.get(d["id"])]
    if not kept:
        raise InvalidInputError("--database-url", "has no decision with feedback", url)
    return LoggedDecisions(
        np.stack([np.frombuffer(d["context"], dtype="<f8") for d in kept]),
        [d["model"] for d in kept], [d["propensity"] for d in kept],
        [merged[d["id"]] for d in kept], [list(d["predictions"]) for d in kept])


def evaluate(
    log: Annotated[Path | None, typer.Option(help="JSON-lines log of decisions",
                                             exists=True, dir_okay=False)] = None,
    database_url: Annotated[str | None, typer.Option(
        help="The service's database (SQLAlchemy URL) to read decisions and feedback from"
    )] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's decisions")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many decisions")] = None,
    policy: Annotated[str, typer.Option(help="Candidate: linucb, thompson or select")] = "linucb",
    preferences: Annotated[str, typer.Option(
        help="Candidate's weights quality=1,cost=W[,latency=V]")] = "quality=1",
    alpha: Annotated[float, typer.Option(help="LinUCB bonus width")] = 0.3,
    scale: Annotated[float, typer.Option(help="Thompson posterior scale")] = 0.5,
    epsilon: Annotated[float | None, typer.Option(help="Candidate's uniform share")] = None,
    seed: Annotated[int, typer.Option(help="Candidate's seed")] = 0,
    clip: Annotated[float | None, typer.Option(help="Cap on importance weights")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here")] = None,
) -> None:
    console = Console()
    try:
        if (log is None) == (database_url is None):
            raise InvalidInputError("--log", "give exactly one of --log and --database-url")
        if policy not in POLICIES:
            raise InvalidInputError("--policy", "allowed: " + ", ".join(POLICIES), policy)
        prefs = Preferences.parse(preferences)
        logged = (read_log_file(log) if log is not None
                  else read_log_database(database_url, tenant, limit))  # type: ignore[arg-type]
        params: dict[str, Any] = {"seed": seed}
        params.update({"alpha": alpha} if policy == "linucb" else {"scale": scale})
        if epsilon is not None:
            params["epsilon"] = epsilon
        candidate = POLICIES[policy](logged.contexts.shape[1], **params)
        for arm in sorted(set(logged.arms) | {c for cs in logged.candidates or [] for c in cs}):
            candidate.add_arm(arm)
        with console.status(f"evaluating {policy} on {len(logged.arms)} decisions"):
            result = evaluate_log(candidate, logged, prefs, learn=True, clip=clip)
    except InvalidInputError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(2) from None
    rewards = logged.rewards(prefs)
    logged_mean = float(np.nanmean(rewards))
    table = Table(title=f"{policy} under {prefs} on {result['rows']} logged decisions "
                        f"({result['skipped']} skipped)")
    for column in ("estimator", "value", "stderr", "95% interval"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for name in ("ips", "snips", "dr"):
        e = result[name]
        table.add_row(name, f"{e.value:.4f}", f"{e.stderr:.4f}", f"[{e.low:.4f}, {e.high:.4f}]")
    table.add_row("logged policy", f"{logged_mean:.4f}", "", "")
    console.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({
            "policy": policy, "preferences": prefs._asdict(), "rows": result["rows"],
            "skipped": result["skipped"], "logged_mean_reward": logged_mean,
            **{name: result[name].as_dict() for name in ("ips", "snips", "dr")}}, indent=2))
        console.print(f"results written to {json_out}")
