"""A model registered on a service whose policies have started learning is marked
added late in every policy (``cold_start_by="added-on-tags"``, the default), through
the same ``add_arm`` as the library; models there before any feedback are not."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import add_model, create_tenant, make_settings


def late_arms(client: TestClient) -> set[tuple[str, ...]]:
    return {tuple(p.late_arms) for p in client.app.state.routing.policies.all_policies()
            .values()}


def test_model_registered_while_learning_is_late_and_stays_so(new_database_url):
    settings = make_settings(new_database_url(), dim=64)
    with TestClient(create_app(settings)) as c:
        add_model(c, "late-a")
        add_model(c, "late-b")
        tenant = create_tenant(c)
        assert late_arms(c) == {()}
        d = c.post("/v1/decide", json={"query": {"text": "a question"}},
                   headers=tenant).json()
        r = c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.9},
                   headers=tenant)
        assert r.status_code < 300, r.text
        c.app.state.routing.writer.flush(timeout=5.0)
        add_model(c, "late-c")
        assert late_arms(c) == {("late-c",)}
    # A restart (the checkpoint, then the feedback after it) keeps it.
    with TestClient(create_app(settings)) as c:
        assert late_arms(c) == {("late-c",)}
