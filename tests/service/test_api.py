"""API tests over SQLite and PostgreSQL: auth, the model registry, decide, feedback,
tenancy, preferences, errors as problem details, health and metrics."""

from __future__ import annotations

import uuid

import pytest

from tests.service.conftest import (
    ADMIN,
    DIM,
    add_model,
    assert_problem,
    create_tenant,
    decide,
    embedding,
)


@pytest.fixture(scope="module")
def models(client):
    """Two models every test in the module can name as candidates."""
    return [add_model(client, "cheap-" + uuid.uuid4().hex[:6], 0.1, 0.4),
            add_model(client, "strong-" + uuid.uuid4().hex[:6], 3.0, 15.0,
                      prior_quality=0.9)]


# ------------------------------------------------------------------------ auth
def test_decide_missing_key_401(client, models):
    r = client.post("/v1/decide", json={"query": {"embedding": embedding()}})
    assert_problem(r, 401, detail_contains="Authorization")
    assert r.headers["www-authenticate"] == "Bearer"


def test_decide_unknown_key_401(client, models):
    r = decide(client, {"Authorization": "Bearer brt_nope"}, models)
    assert_problem(r, 401, detail_contains="unknown API key")


def test_create_model_tenant_key_403(client):
    tenant = create_tenant(client)
    r = client.post("/v1/admin/models", json={"name": "x", "input_price_per_mtok": 1,
                                              "output_price_per_mtok": 1}, headers=tenant)
    assert_problem(r, 403, detail_contains="admin key")


def test_decide_admin_key_403(client, models):
    assert_problem(decide(client, ADMIN, models), 403, detail_contains="tenant API key")


# --------------------------------------------------------------------- models
def test_create_model_duplicate_name_409(client, models):
    r = client.post("/v1/admin/models", json={"name": models[0], "input_price_per_mtok": 1,
                                              "output_price_per_mtok": 1}, headers=ADMIN)
    assert_problem(r, 409, field="name")


def test_create_model_negative_price_422(client):
    r = client.post("/v1/admin/models", json={"name": "neg", "input_price_per_mtok": -1,
                                              "output_price_per_mtok": 1}, headers=ADMIN)
    body = assert_problem(r, 422, field="input_price_per_mtok")
    assert body["errors"][0]["allowed"] == "a number >= 0.0"


def test_get_model_price_based_prior(client, models):
    r = client.get(f"/v1/admin/models/{models[1]}", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    # 500 input + 300 output tokens at 3 and 15 USD per million.
    assert body["prior_cost_usd"] == pytest.approx(0.006, rel=1e-12)
    assert body["prior_quality"] == 0.9 and body["enabled"] is True


def test_update_model_disabled_never_chosen(client, models):
    tenant = create_tenant(client)
    off = add_model(client)
    r = client.patch(f"/v1/admin/models/{off}", json={"enabled": False}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["enabled"] is False
    chosen = {decide(client, tenant, seed=i).json()["model"] for i in range(40)}
    assert off not in chosen
    r = decide(client, tenant, [off])
    assert_problem(r, 422, field="candidates", detail_contains="disabled")
    # Listed with enabled ones, a disabled model is left out of the candidates.
    body = decide(client, tenant, [off, models[0]]).json()
    assert body["model"] == models[0] and set(body["predictions"]) == {models[0]}


def test_delete_model_keeps_history(client):
    tenant = create_tenant(client)
    gone = add_model(client)
    d = decide(client, tenant, [gone]).json()
    assert d["model"] == gone
    assert client.delete(f"/v1/admin/models/{gone}", headers=ADMIN).status_code == 204
    assert_problem(decide(client, tenant, [gone]), 422, field="candidates",
                   detail_contains="unknown model")
    assert_problem(client.get(f"/v1/admin/models/{gone}", headers=ADMIN), 404)
    listed = client.get("/v1/admin/models?include_deleted=true", headers=ADMIN).json()
    assert any(m["name"] == gone and m["deleted"] for m in listed)
    assert gone not in [m["name"] for m in client.get("/v1/admin/models",
                                                      headers=ADMIN).json()]
    # The decision is still there: its feedback is stored (the arm learns nothing more).
    r = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 1.0},
                    headers=tenant)
    assert r.status_code == 202 and r.json()["status"] == "applied"


def test_create_model_explored_from_next_decision(client, models):
    tenant = create_tenant(client)
    new = add_model(client)
    body = decide(client, tenant, [*models, new]).json()
    assert new in body["predictions"]


# --------------------------------------------------------------------- decide
def test_decide_returns_decision(client, models):
    tenant = create_tenant(client)
    r = decide(client, tenant, models)
    assert r.status_code == 200, r.text
    body = r.json()
    uuid.UUID(body["decision_id"])
    assert body["model"] in models
    assert 0.0 < body["propensity"] <= 1.0
    assert set(body["predictions"]) == set(models)
    for p in body["predictions"].values():
        assert {"quality", "cost_usd", "latency_ms", "score", "uncertainty"} <= set(p)
    assert body["policy"] == "select" and body["scope"] == "shared"
    assert isinstance(body["policy_version"], int)


def test_decide_text_query(client, models):
    tenant = create_tenant(client)
    r = client.post("/v1/decide", json={"query": {"text": "summarize this contract"},
                                        "candidates": models}, headers=tenant)
    assert r.status_code == 200 and r.json()["model"] in models


@pytest.mark.parametrize(("body", "field", "status"), [
    ({"query": {"embedding": [0.1] * (DIM - 1)}}, "query.embedding", 422),
    ({"query": {"embedding": [0.1] * (DIM + 3)}}, "query.embedding", 422),
    ({"query": {"embedding": [0.1] * DIM}, "candidates": []}, "candidates", 422),
    ({"query": {"embedding": [0.1] * DIM}, "candidates": ["no-such-model"]}, "candidates",
     422),
    ({"query": {"embedding": [0.1] * DIM}, "preferences": {"cost": -1}}, "preferences.cost",
     422),
    ({"query": {"embedding": [0.1] * DIM}, "preferences": {"quality": 0}}, "preferences",
     422),
    ({"query": {}}, "query", 422),
    ({"query": {"text": "a", "embedding": [0.1] * DIM}}, "query", 422),
    ({"query": {"embedding": [0.1] * DIM}, "surprise": 1}, "surprise", 422),
])
def test_decide_bad_input_names_field(client, models, body, field, status):
    tenant = create_tenant(client)
    r = client.post("/v1/decide", json=body, headers=tenant)
    assert_problem(r, status, field=field)


def test_decide_nan_embedding_422(client, models):
    tenant = create_tenant(client)
    raw = '{"query": {"embedding": [NaN' + ", 0.1" * (DIM - 1) + "]}}"
    r = client.post("/v1/decide", content=raw, headers={**tenant,
                                                       "content-type": "application/json"})
    body = assert_problem(r, 422)
    assert body["errors"][0]["field"].startswith("query.embedding")


def test_decide_invalid_json_400(client, models):
    tenant = create_tenant(client)
    r = client.post("/v1/decide", content="{nope", headers={**tenant,
                                                           "content-type": "application/json"})
    assert_problem(r, 400, field="body")


def test_decide_unknown_model_lists_allowed(client, models):
    tenant = create_tenant(client)
    body = assert_problem(decide(client, tenant, ["no-such-model"]), 422, field="candidates")
    assert models[0] in body["errors"][0]["allowed"]
    # The field is named once: in "field", and at the head of the detail.
    assert body["errors"][0]["message"].startswith("unknown model")
    assert body["detail"].startswith("candidates: unknown model")


def test_create_tenant_empty_name_allowed_in_characters(client):
    body = assert_problem(client.post("/v1/admin/tenants", json={"name": ""}, headers=ADMIN),
                          422, field="name")
    assert body["errors"][0]["allowed"] == "at least 1 character(s)"


def test_decide_keeps_serving_after_errors(client, models):
    tenant = create_tenant(client)
    for _ in range(3):
        assert decide(client, tenant, ["nope"]).status_code == 422
    assert decide(client, tenant, models).status_code == 200


# ------------------------------------------------------------------- feedback
def test_post_feedback_applied_then_duplicate(client, models):
    tenant = create_tenant(client)
    d = decide(client, tenant, models).json()
    body = {"decision_id": d["decision_id"], "quality": 0.7, "cost_usd": 0.002,
            "latency_ms": 800}
    first = client.post("/v1/feedback", json=body, headers=tenant)
    assert first.status_code == 202 and first.json()["status"] == "applied"
    again = client.post("/v1/feedback", json=body, headers=tenant)
    assert again.status_code == 202 and again.json()["status"] == "duplicate"


def test_post_feedback_event_ids_exactly_once(client, models):
    tenant = create_tenant(client)
    d = decide(client, tenant, models).json()["decision_id"]
    statuses = [client.post("/v1/feedback", json={"decision_id": d, "quality": 1.0,
                                                  "event_id": e}, headers=tenant)
                .json()["status"] for e in ("a", "b", "a", "b", "c")]
    assert statuses == ["applied", "applied", "duplicate", "duplicate", "applied"]


def test_post_feedback_duplicate_changes_nothing(client, models):
    tenant = create_tenant(client)
    d = decide(client, tenant, models, seed=3).json()
    body = {"decision_id": d["decision_id"], "quality": 1.0, "event_id": "e1"}
    assert client.post("/v1/feedback", json=body, headers=tenant).json()["status"] == "applied"
    service = client.app.state.routing
    version = service.shared["linucb"].version
    assert client.post("/v1/feedback", json=body,
                       headers=tenant).json()["status"] == "duplicate"
    assert service.shared["linucb"].version == version


def test_post_feedback_other_tenant_404_like_unknown(client, models):
    owner, other = create_tenant(client, "owner"), create_tenant(client, "other")
    d = decide(client, owner, models).json()["decision_id"]
    foreign = client.post("/v1/feedback", json={"decision_id": d, "quality": 1.0},
                          headers=other)
    unknown_id = str(uuid.uuid4())
    unknown = client.post("/v1/feedback", json={"decision_id": unknown_id, "quality": 1.0},
                          headers=other)
    a, b = assert_problem(foreign, 404), assert_problem(unknown, 404)
    assert {k: v for k, v in a.items() if k != "detail"} == \
        {k: v for k, v in b.items() if k != "detail"}
    assert a["detail"].replace(d, "ID") == b["detail"].replace(unknown_id, "ID")
    # The owner's feedback is unaffected by the other tenant's attempt.
    r = client.post("/v1/feedback", json={"decision_id": d, "quality": 1.0}, headers=owner)
    assert r.json()["status"] == "applied"


@pytest.mark.parametrize(("extra", "field"), [
    ({"cost_usd": -0.5}, "cost_usd"),
    ({"quality": 1.5}, "quality"),
    ({"latency_ms": -1}, "latency_ms"),
    ({}, "body"),
])
def test_post_feedback_bad_outcome_422(client, models, extra, field):
    tenant = create_tenant(client)
    d = decide(client, tenant, models).json()["decision_id"]
    r = client.post("/v1/feedback", json={"decision_id": d, **extra}, headers=tenant)
    if field == "body":
        body = assert_problem(r, 422)
        assert "at least one of quality" in body["detail"]
    else:
        assert_problem(r, 422, field=field)


def test_post_feedback_bad_decision_id_422(client, models):
    tenant = create_tenant(client)
    r = client.post("/v1/feedback", json={"decision_id": "not-a-uuid", "quality": 1},
                    headers=tenant)
    assert_problem(r, 422, field="decision_id")


def test_post_feedback_before_decision_flushed(client, models, monkeypatch):
    """Feedback racing the decision writer waits for the row instead of a 404."""
    import time

    tenant = create_tenant(client)
    writer = client.app.state.routing.writer
    original = writer._write

    def slow_write(batch):
        time.sleep(0.3)
        original(batch)

    monkeypatch.setattr(writer, "_write", slow_write)
    d = decide(client, tenant, models).json()["decision_id"]
    assert writer.is_pending(d)
    r = client.post("/v1/feedback", json={"decision_id": d, "quality": 0.5}, headers=tenant)
    assert r.status_code == 202 and r.json()["status"] == "applied"


def test_post_feedback_learns(client, models):
    """Feedback moves the shared policy's prediction toward the reported quality."""
    tenant = create_tenant(client)
    before = decide(client, tenant, models, seed=11).json()
    m = before["model"]
    for _ in range(5):
        d = decide(client, tenant, [m], seed=11).json()["decision_id"]
        client.post("/v1/feedback", json={"decision_id": d, "quality": 0.05}, headers=tenant)
    after = decide(client, tenant, [m], seed=11).json()
    q0, q1 = before["predictions"][m]["quality"], after["predictions"][m]["quality"]
    assert q1 < q0 - 0.1, (q0, q1)


# ---------------------------------------------------------------- preferences
def test_put_preferences_applies_to_next_decision(client, models):
    tenant = create_tenant(client)
    r = client.get("/v1/tenants/me/preferences", headers=tenant)
    assert r.status_code == 200
    assert r.json()["weights"] == {"quality": 1.0, "cost": 0.0, "latency": 0.0}
    assert r.json()["policy"] == "select" and r.json()["scope"] == "shared"
    r = client.put("/v1/tenants/me/preferences", json={
        "weights": {"quality": 1.0, "cost": 1000.0, "latency": 0.0}, "policy": "thompson"},
        headers=tenant)
    assert r.status_code == 200 and r.json()["policy"] == "thompson"
    body = decide(client, tenant, models).json()
    assert body["policy"] == "thompson"
    # With cost worth 1000 quality points per USD, every utility is the quality head
    # minus 1000 times the predicted cost.
    for p in body["predictions"].values():
        assert p["utility"] == pytest.approx(p["quality"] - 1000.0 * p["cost_usd"], abs=1e-9)


def test_put_preferences_select_policy_decides_with_it(client, models):
    tenant = create_tenant(client)
    r = client.put("/v1/tenants/me/preferences", json={"policy": "select"}, headers=tenant)
    assert r.status_code == 200 and r.json()["policy"] == "select"
    body = decide(client, tenant, models).json()
    assert body["policy"] == "select"
    assert 0.0 < body["propensity"] <= 1.0
    r = client.put("/v1/tenants/me/preferences", json={"policy": "selective"}, headers=tenant)
    assert r.status_code == 422
    assert "policy" in r.text and "select" in r.text


def test_put_preferences_bad_values_422(client):
    tenant = create_tenant(client)
    for body, field in (({"policy": "greedy"}, "policy"), ({"scope": "team"}, "scope"),
                        ({"budget_usd_per_day": -1}, "budget_usd_per_day"),
                        ({"on_budget_exhausted": "panic"}, "on_budget_exhausted"),
                        ('{"weights": {"quality": Infinity}}', "weights.quality")):
        if isinstance(body, str):  # httpx refuses to encode infinity itself
            r = client.put("/v1/tenants/me/preferences", content=body,
                           headers={**tenant, "content-type": "application/json"})
        else:
            r = client.put("/v1/tenants/me/preferences", json=body, headers=tenant)
        problem = assert_problem(r, 422, field=field)
        if field == "policy":
            assert "linucb" in problem["errors"][0]["allowed"]


def test_put_preferences_isolated_scope(client, models):
    """An isolated tenant learns only from its own feedback; shared ones from everyone's."""
    iso, other = create_tenant(client, "iso"), create_tenant(client, "other")
    r = client.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=iso)
    assert r.status_code == 200 and r.json()["scope"] == "isolated"
    m = models[0]
    start = decide(client, iso, [m], seed=5).json()
    assert start["scope"] == "isolated"
    for _ in range(4):
        d = decide(client, other, [m], seed=5).json()["decision_id"]
        client.post("/v1/feedback", json={"decision_id": d, "quality": 0.0}, headers=other)
    unchanged = decide(client, iso, [m], seed=5).json()
    assert unchanged["predictions"][m]["quality"] == pytest.approx(
        start["predictions"][m]["quality"], abs=1e-12)
    for _ in range(4):
        d = decide(client, iso, [m], seed=5).json()["decision_id"]
        client.post("/v1/feedback", json={"decision_id": d, "quality": 0.0}, headers=iso)
    learned = decide(client, iso, [m], seed=5).json()
    assert learned["predictions"][m]["quality"] < start["predictions"][m]["quality"] - 0.1


# ---------------------------------------------------------------------- usage
def test_get_usage_counts_own_decisions(client, models):
    tenant, other = create_tenant(client), create_tenant(client)
    for i in range(3):
        assert decide(client, tenant, models, seed=i).status_code == 200
    decide(client, other, models)
    r = client.get("/v1/tenants/me/usage", headers=tenant)
    assert r.status_code == 200
    body = r.json()
    assert body["decisions_today"] == 3 and body["decisions_month"] == 3
    assert sum(body["model_share_month"].values()) == pytest.approx(1.0)
    assert body["spend_usd_today"] > 0


# --------------------------------------------------------------------- health
def test_get_healthz_and_readyz_ok(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_get_metrics_counts_decisions(client, models):
    tenant = create_tenant(client)
    model = decide(client, tenant, models).json()["model"]
    text = client.get("/metrics", headers=ADMIN).text
    assert (f'bandit_router_decisions_total{{model="{model}",tenant="{tenant["X-Tenant"]}"}}'
            ' 1.0') in text
    assert "bandit_router_decide_latency_seconds_bucket" in text
    assert "bandit_router_spend_usd" in text


def test_decide_bad_body_without_key_401(client):
    r = client.post("/v1/decide", content="{nope", headers={"content-type": "application/json"})
    assert_problem(r, 401)


def test_get_openapi_documents_decide_body(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/decide"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/DecideRequest"
    decide_request = schema["components"]["schemas"]["DecideRequest"]
    assert "query" in decide_request["properties"]
    # Its own references resolve from the document root (client generators follow them).
    query_ref = decide_request["properties"]["query"]["$ref"]
    assert query_ref.split("/")[-1] in schema["components"]["schemas"]


def test_put_preferences_isolated_rebuilds_own_history(client, models):
    """Switching to isolated keeps what the tenant's own feedback taught, and nothing
    from other tenants' feedback."""
    own, other = create_tenant(client, "own"), create_tenant(client, "noise")
    m = models[1]
    for i in range(4):
        d = decide(client, own, [m], seed=40 + i).json()["decision_id"]
        client.post("/v1/feedback", json={"decision_id": d, "quality": 0.0}, headers=own)
        d = decide(client, other, [m], seed=40 + i).json()["decision_id"]
        client.post("/v1/feedback", json={"decision_id": d, "quality": 1.0}, headers=other)
    client.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=own)
    service = client.app.state.routing
    pair = service.isolated[own["X-Tenant"]]
    for policy in pair.values():
        assert policy.observations(m)["quality"] == 4
    probe = decide(client, own, [m], seed=40).json()["predictions"][m]["quality"]
    assert probe < 0.3


def test_get_decision_own_with_feedback_other_404(client, models):
    owner, other = create_tenant(client, "owner"), create_tenant(client, "reader")
    d = decide(client, owner, models).json()
    client.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.6,
                                      "event_id": "thumbs"}, headers=owner)
    r = client.get(f"/v1/decisions/{d['decision_id']}", headers=owner)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == d["model"] and body["propensity"] == d["propensity"]
    assert set(body["predictions"]) == set(models)
    assert [f["event_id"] for f in body["feedback"]] == ["thumbs"]
    assert body["feedback"][0]["quality"] == 0.6
    foreign = client.get(f"/v1/decisions/{d['decision_id']}", headers=other)
    unknown_id = str(uuid.uuid4())
    unknown = client.get(f"/v1/decisions/{unknown_id}", headers=other)
    a, b = assert_problem(foreign, 404), assert_problem(unknown, 404)
    assert a["detail"].replace(d["decision_id"], "ID") == b["detail"].replace(unknown_id, "ID")
    assert a["type"] == b["type"] and a["title"] == b["title"]
