"""Fixtures for fault tests: a private PostgreSQL cluster that a test may stop and start,
and the service on a loopback socket with its app object at hand.

The shared test server (``ops/postgres.sh``, port 55432) is used by other test runs at
the same time and is never stopped here: each module gets its own cluster, started by
the same script with ``BANDIT_PG_PORT`` (a free port) and ``BANDIT_PG_DATA`` (a fresh
directory under /tmp, traversable by the ``postgres`` user when run as root).

Every test under ``tests/faults/`` is marked ``integration``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of our own (ops/postgres.sh with its own port and data)."""

    port: int
    data: Path

    def _run(self, command: str) -> str:
        env = {**os.environ, "BANDIT_PG_PORT": str(self.port), "BANDIT_PG_DATA": str(self.data),
               "BANDIT_PG_DATABASE": "bandit_fault"}
        result = subprocess.run(["bash", str(ROOT / "ops" / "postgres.sh"), command], env=env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"ops/postgres.sh {command} (port {self.port}) failed: "
                        f"{result.stdout[-1000:]} {result.stderr[-2000:]}", pytrace=False)
        return result.stdout.strip()

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/bandit_fault"


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        pytest.fail("PostgreSQL server binaries are missing: run `bash ops/postgres.sh start` "
                    "once (it installs them) or `bash ops/test.sh`", pytrace=False)
    parent = Path(tempfile.mkdtemp(prefix="bandit-pgfault-", dir="/tmp"))
    parent.chmod(0o755)  # the postgres user must traverse it when we run as root
    pg = PrivatePostgres(port=free_port(), data=parent / "pg")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(parent, ignore_errors=True)


@contextmanager
def serve(settings: Settings, timeout_s: float = 60.0) -> Iterator[tuple[str, FastAPI]]:
    """The app on a free loopback port (uvicorn in a thread): (base URL, app)."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="fault-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail("the service did not start; see the log above", pytrace=False)
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout_s)
