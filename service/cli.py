"""The ``bandit-router`` command line (typer). Each sub-command lives in
``service/commands/<name>.py`` and is registered here."""

from __future__ import annotations

import typer

from service.commands.learn import learn
from service.commands.migrate import migrate
from service.commands.replay import replay
from service.commands.serve import serve

app = typer.Typer(help="Online contextual-bandit router for LLM requests.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _group() -> None:
    """Keeps ``bandit-router <command>`` a group even while one command is registered."""


app.command(help="Replay a log of queries with every model's outcome (bandit feedback).")(replay)
app.command(help="Serve the HTTP API (uvicorn).")(serve)
app.command(help="Apply database migrations.")(migrate)
app.command(help="Run a learner of the distributed mode (Kafka, PostgreSQL).")(learn)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
