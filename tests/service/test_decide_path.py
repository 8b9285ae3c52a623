"""POST /v1/decide has one code path, the FastAPI route, answering problem details."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import add_model, assert_problem, create_tenant, decide, make_settings


def test_decide_one_route_documented_and_errors_are_problems(new_database_url):
    app = create_app(make_settings(new_database_url()))
    # One path: the FastAPI route, and no middleware of ours in front of the routing.
    assert "service.routes.decide" not in {m.cls.__module__ for m in app.user_middleware}
    with TestClient(app, raise_server_exceptions=False) as client:
        model = add_model(client)
        tenant = create_tenant(client)
        ok = decide(client, tenant, [model])
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        assert ok.headers["x-request-id"]  # the request-id middleware still wraps it
        assert int(ok.headers["content-length"]) == len(ok.content)
        assert set(ok.json()["predictions"][model]) == {
            "quality", "cost_usd", "latency_ms", "utility", "uncertainty", "score",
            "price_usd"}  # price_usd: main's price-aware decisions (value-learn)
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


def test_app_one_middleware_and_decide_route_first(new_database_url):
    from service.middleware import ServiceMiddleware

    app = create_app(make_settings(new_database_url()))
    # Request id, limits, the key before the body and the 500 answer: one layer, added
    # with the documented add_middleware (no middleware stack of our own).
    assert [m.cls for m in app.user_middleware] == [ServiceMiddleware]
    # The busiest route is the first one the router tries.
    assert app.router.routes[0].path == "/v1/decide"


def test_decide_row_written_by_idle_writer_without_waiting_caller(new_database_url):
    # The writer is not woken per decision (the decide path only queues the row); an
    # idle writer must still find the row on its own, within a few flush intervals.
    import time

    from sqlalchemy import text

    with TestClient(create_app(make_settings(new_database_url()))) as client:
        model = add_model(client)
        tenant = create_tenant(client)
        service = client.app.state.routing
        time.sleep(0.2)  # the writer has gone idle: nothing queued
        decision_id = decide(client, tenant, [model]).json()["decision_id"]
        deadline = time.monotonic() + 5.0
        found = 0
        while time.monotonic() < deadline and not found:
            with service.engine.connect() as conn:
                found = conn.execute(text("SELECT count(*) FROM decisions WHERE id = :i"),
                                     {"i": decision_id}).scalar_one()
            time.sleep(0.01)
        assert found == 1
