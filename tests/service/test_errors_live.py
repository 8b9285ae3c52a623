"""Unexpected errors over a real socket: a 500 is a problem-details body, the error is
logged, and the client's keep-alive connection survives (a gateway pools connections;
uvicorn closes the connection of a request whose app raised after answering)."""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI, Request

from tests.service.conftest import make_settings
from tests.service.live import live_server


def _add_test_routes(app: FastAPI) -> None:
    async def boom() -> None:
        raise RuntimeError("a bug in a handler")

    async def peer(request: Request) -> dict[str, int]:
        assert request.client is not None
        return {"port": request.client.port}

    app.add_api_route("/test/boom", boom)
    app.add_api_route("/test/peer", peer)


def test_500_problem_keeps_keepalive_connection(tmp_path, caplog):
    settings = make_settings(f"sqlite:///{tmp_path / 'router.db'}")
    with (live_server(settings, prepare=_add_test_routes) as url,
          caplog.at_level(logging.ERROR),
          httpx.Client(base_url=url, timeout=10) as http):
        before = http.get("/test/peer").json()["port"]
        for _ in range(3):
            r = http.get("/test/boom")
            assert r.status_code == 500
            assert r.headers["content-type"] == "application/problem+json"
            assert "a bug in a handler" not in r.text  # no internals leaked
            assert r.headers.get("connection", "").lower() != "close"
        after = http.get("/test/peer").json()["port"]
        # The same TCP connection served every request.
        assert after == before
    assert any("unhandled error on GET /test/boom" in rec.getMessage()
               for rec in caplog.records)
