"""``bandit-router learn``: one learner of the distributed mode (docs/streams.md)."""

from __future__ import annotations

import logging

import typer


def learn(metrics_port: int = typer.Option(None, help="Port of /metrics (default: "
                                           "BANDIT_ROUTER_LEARNER_METRICS_PORT, 9464; 0 = "
                                           "none)."),
          create_topics: bool = typer.Option(True, help="Create missing topics first."),
          log_level: str = typer.Option("info", help="Logging level.")) -> None:
    """Consume the feedback topic in the learners' group and apply it exactly once.

    Settings come from BANDIT_ROUTER_* variables: KAFKA_BOOTSTRAP and a PostgreSQL
    DATABASE_URL are required. SIGTERM finishes the batch, writes it and exits."""
    from dataclasses import replace

    from service.config import Settings
    from service.db.engine import upgrade
    from service.distributed import streams_config
    from streams.learner import Learner, run_until_signalled

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    url = settings.database_url
    if not settings.kafka_bootstrap or not url or not url.startswith("postgresql"):
        raise typer.BadParameter("set BANDIT_ROUTER_KAFKA_BOOTSTRAP and a PostgreSQL "
                                 "BANDIT_ROUTER_DATABASE_URL (postgresql+psycopg://...)")
    config = streams_config(settings)
    if metrics_port is not None:
        config = replace(config, metrics_port=metrics_port).validated()
    if settings.run_migrations:
        upgrade(url)
    run_until_signalled(Learner(config, url), create_topics=create_topics)
