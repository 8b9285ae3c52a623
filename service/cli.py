"""The ``bandit-router`` command line (typer). Each sub-command lives in
``service/commands/<name>.py`` and is registered here."""

from __future__ import annotations

import typer

from service.commands.admin import (
    admin_keys_app,
    models_app,
    preferences_app,
    reservations_app,
    state_app,
    tenants_app,
    usage,
)
from service.commands.evaluate import evaluate
from service.commands.learn import learn
from service.commands.migrate import migrate
from service.commands.prototypes import fit_prototypes
from service.commands.replay import replay
from service.commands.serve import serve
from service.commands.warmstart import warmstart

app = typer.Typer(help="Online contextual-bandit router for LLM requests.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _group() -> None:
    """Keeps ``bandit-router <command>`` a group even while one command is registered."""


app.command(help="Replay a log of queries with every model's outcome (bandit feedback).")(replay)
app.command(help="Estimate a candidate policy from logged decisions (IPS, SNIPS, DR).")(evaluate)
app.command(help="Fit a policy on a labelled log so a deployment starts from a prior.")(
    warmstart)
app.command(name="fit-prototypes", help="Fit a prototype map on unlabelled prompts "
            "(for BANDIT_ROUTER_PROTOTYPE_MAP).")(fit_prototypes)
app.command(help="Serve the HTTP API (uvicorn).")(serve)
app.command(help="Apply database migrations.")(migrate)
app.command(help="Run a learner of the distributed mode (Kafka, PostgreSQL).")(learn)
app.add_typer(tenants_app, name="tenants")
app.add_typer(models_app, name="models")
app.add_typer(preferences_app, name="preferences")
app.add_typer(admin_keys_app, name="admin-keys")
app.add_typer(reservations_app, name="reservations")
app.add_typer(state_app, name="state")
app.command(help="A tenant's decisions, spend against budget and model shares.")(usage)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
