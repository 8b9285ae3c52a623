"""``bandit-router migrate``: apply (or revert) database migrations."""

from __future__ import annotations

import typer


def migrate(revision: str = typer.Argument("head", help="Target revision."),
            downgrade: bool = typer.Option(False, "--downgrade",
                                           help="Go down to REVISION (e.g. 'base').")) -> None:
    """Apply the alembic migrations to BANDIT_ROUTER_DATABASE_URL (default: the SQLite file
    in BANDIT_ROUTER_DATA_DIR)."""
    from sqlalchemy.engine import make_url

    from service.config import Settings
    from service.db import engine

    url = Settings().resolved_database_url()
    if downgrade:
        engine.downgrade(url, revision)
    else:
        engine.upgrade(url, revision)
    shown = make_url(url).render_as_string(hide_password=True)
    typer.echo(f"{'downgraded' if downgrade else 'upgraded'} {shown} to {revision}")
