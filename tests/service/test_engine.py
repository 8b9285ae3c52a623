"""Engine settings that reach the real database connection."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from service.db.engine import PG_CONNECT_DEFAULTS, make_engine


def test_postgres_connections_time_out_and_probe_keepalive(new_database_url):
    url = new_database_url()
    if make_url(url).get_backend_name() != "postgresql":
        pytest.skip("libpq parameters: PostgreSQL only")
    engine = make_engine(url + "?connect_timeout=7")
    try:
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()
    finally:
        engine.dispose()
    # What libpq actually uses: the URL's value wins, the defaults fill the rest.
    assert params["connect_timeout"] == "7"
    for key in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                "tcp_user_timeout"):
        assert params[key] == str(PG_CONNECT_DEFAULTS[key]), key
