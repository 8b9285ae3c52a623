"""Request tags: refused when malformed (422 naming tags), stored with the decision,
hashed into its context (untagged contexts unchanged), and learned from."""

from __future__ import annotations

import numpy as np
import pytest

from bandit.featurize import tag_vector
from service.client import RouterClient
from tests.service.conftest import (
    DIM,
    add_model,
    assert_problem,
    create_tenant,
    embedding,
    stored_decision,
)
from tests.service.live import live_server


@pytest.fixture(scope="module")
def models(client) -> list[str]:
    return [add_model(client, "tag-a", 1.0, 1.0), add_model(client, "tag-b", 1.0, 1.0)]


def _decide(client, tenant, tags=None, seed=0, **extra):
    body = {"query": {"embedding": embedding(seed)}, **extra}
    if tags is not None:
        body["tags"] = tags
    return client.post("/v1/decide", json=body, headers=tenant)


@pytest.mark.parametrize(("tags", "says"), [
    ({"app": 3}, "tags.app"),
    ({"app": ""}, "tags.app"),
    ({"app": "x" * 129}, "128"),
    ({"bad key": "x"}, "tags key"),
    ({f"k{i}": "v" for i in range(17)}, "at most 16"),
    (["app"], "object"),
    ({"app": {"nested": "x"}}, "tags.app"),
])
def test_decide_bad_tags_422_names_tags(client, models, tags, says):
    tenant = create_tenant(client, "tags-bad")
    before = client.app.state.routing.metrics.decisions.labels("tag-a", tenant["X-Tenant"])
    count = before._value.get()
    r = _decide(client, tenant, tags)
    body = assert_problem(r, 422, "tags")
    assert says in body["detail"], body["detail"]
    error = next(e for e in body["errors"] if e["field"] == "tags")
    assert error["allowed"], error
    assert before._value.get() == count  # nothing decided


def test_decide_tags_stored_and_hashed_into_context(client, models):
    tenant = create_tenant(client, "tags-stored")
    tags = {"app": "support-bot", "task": "code"}
    tagged = _decide(client, tenant, tags, seed=4).json()
    plain = _decide(client, tenant, seed=4).json()
    row = stored_decision(client, tagged["decision_id"])
    plain_row = stored_decision(client, plain["decision_id"])
    assert row.tags == tags and plain_row.tags is None
    x = np.frombuffer(plain_row.context, dtype=np.float64)
    # Untagged: exactly the embedding, as before tags existed.
    assert np.array_equal(x, np.asarray(embedding(4)))
    np.testing.assert_allclose(np.frombuffer(row.context, dtype=np.float64),
                               x + tag_vector(tags, DIM), rtol=0, atol=1e-12)
    r = client.get(f"/v1/decisions/{tagged['decision_id']}", headers=tenant)
    assert r.status_code == 200 and r.json()["tags"] == tags


def test_decide_routes_by_tags_once_they_carry_the_signal(client, models):
    tenant = create_tenant(client, "tags-learned")
    best = {"search": "tag-a", "support": "tag-b"}
    # 100 rounds: the default context ridge (100) shrinks what the context coordinates
    # (tags included) explain until they have about as many observations.
    for _ in range(100):
        for app, good in best.items():
            for model in models:
                d = _decide(client, tenant, {"app": app}, seed=0, candidates=[model]).json()
                r = client.post("/v1/feedback", json={
                    "decision_id": d["decision_id"],
                    "quality": 0.9 if model == good else 0.2}, headers=tenant)
                assert r.status_code == 202, r.text
    # The same query text (embedding), two apps: routed to each app's best model.
    for app, good in best.items():
        answers = [_decide(client, tenant, {"app": app}, seed=0).json() for _ in range(10)]
        assert sum(a["model"] == good for a in answers) >= 8, (app, answers)
        p = answers[0]["predictions"]
        other = next(n for n in models if n != good)
        assert p[good]["utility"] > p[other]["utility"] + 0.3


def test_client_decide_sends_tags(client, models):
    tenant = create_tenant(client, "tags-client")
    # The typed client (httpx) over a real socket: the app served by uvicorn on loopback,
    # on the same database (TestClient's transport may belong to another httpx, httpx2,
    # which the openai SDK brings in).
    with live_server(client.app.state.settings) as base, RouterClient(
            base, tenant["Authorization"].removeprefix("Bearer ")) as router:
        decision = router.decide(embedding=embedding(1), tags={"app": "bot"})
        stored = router.decision(decision.decision_id)
    assert stored["tags"] == {"app": "bot"}
