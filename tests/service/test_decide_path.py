"""The decide fast path (DecideShortcut) answers like the FastAPI route would."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.routes.decide import DecideShortcut
from tests.service.conftest import add_model, assert_problem, create_tenant, decide, make_settings


def test_decide_shortcut_innermost_documented_and_errors_are_problems(new_database_url):
    app = create_app(make_settings(new_database_url()))
    assert app.user_middleware[-1].cls is DecideShortcut  # inside every other middleware
    with TestClient(app, raise_server_exceptions=False) as client:
        model = add_model(client)
        tenant = create_tenant(client)
        ok = decide(client, tenant, [model])
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        assert ok.headers["x-request-id"]  # the request-id middleware still wraps it
        assert int(ok.headers["content-length"]) == len(ok.content)
        assert set(ok.json()["predictions"][model]) == {
            "quality", "cost_usd", "latency_ms", "utility", "uncertainty", "score",
            "price_usd"}
        assert "/v1/decide" in client.get("/openapi.json").json()["paths"]
        # Not POST: FastAPI's routing answers (405 as a problem).
        assert_problem(client.get("/v1/decide", headers=tenant), 405)
        assert_problem(client.post("/v1/decide", content=b"{", headers=tenant), 400)
        assert_problem(client.post("/v1/decide", json={"query": {}}, headers=tenant), 422)
        assert_problem(client.post("/v1/decide", json={}), 401)

        def broken(requests):
            raise RuntimeError("boom")

        client.app.state.routing.decide_many = broken
        assert_problem(decide(client, tenant, [model]), 500)
        del client.app.state.routing.decide_many
        assert decide(client, tenant, [model]).status_code == 200
