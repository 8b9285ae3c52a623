"""Prometheus names and values, request ids and JSON logs (SQLite; the API tests cover
both databases)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import ADMIN, add_model, create_tenant, decide, make_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('obs') / 'router.db'}"
    with TestClient(create_app(make_settings(url))) as c:
        yield c


@pytest.fixture(scope="module")
def models(client):
    return [add_model(client, "obs-a", 1.0, 2.0), add_model(client, "obs-b", 0.1, 0.2)]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (fails when absent)."""
    # prometheus_client writes labels sorted by name.
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    match = re.search(pattern, text)
    assert match, f"{name}{{{want}}} not in /metrics"
    return float(match.group(1))


def test_post_feedback_negative_reward_accepted(client, models):
    # A cost weight with a cost-only outcome: the reward is negative. It used to reach a
    # Counter.inc(negative) after the commit and answer 500.
    tenant = create_tenant(client, "negative")
    client.put("/v1/tenants/me/preferences", json={"weights": {"quality": 1, "cost": 100}},
               headers=tenant)
    decision_id = decide(client, tenant, models).json()["decision_id"]
    r = client.post("/v1/feedback", json={"decision_id": decision_id, "cost_usd": 0.01},
                    headers=tenant)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "applied"
    text = client.get("/metrics", headers=ADMIN).text
    assert sample(text, "bandit_router_reward_sum", tenant=tenant["X-Tenant"]) == \
        pytest.approx(-1.0)
    assert sample(text, "bandit_router_reward_count", tenant=tenant["X-Tenant"]) == 1.0


def test_get_metrics_spend_counter_and_budget_gauge(client, models):
    tenant = create_tenant(client, "spender")
    tid = tenant["X-Tenant"]
    client.put("/v1/tenants/me/preferences", json={"budget_usd_per_day": 2.5},
               headers=tenant)
    chosen = []
    for cost in (0.25, 0.5):
        body = decide(client, tenant, models).json()
        decision_id = body["decision_id"]
        chosen.append(body["model"])
        r = client.post("/v1/feedback", json={"decision_id": decision_id, "cost_usd": cost,
                                              "quality": 0.5}, headers=tenant)
        assert r.status_code == 202, r.text
    # A repeat changes nothing, the counter included.
    client.post("/v1/feedback", json={"decision_id": decision_id, "cost_usd": 0.5},
                headers=tenant)
    text = client.get("/metrics", headers=ADMIN).text
    assert sample(text, "bandit_router_spend_usd_total", tenant=tid) == pytest.approx(0.75)
    assert sample(text, "bandit_router_period_spend_usd", tenant=tid, period="day") == \
        pytest.approx(0.75)
    assert sample(text, "bandit_router_budget_usd", tenant=tid, period="day") == \
        pytest.approx(2.5)
    assert f'bandit_router_budget_usd{{period="month",tenant="{tid}"}}' not in text
    assert f'bandit_router_budget_usd{{period="day",tenant="{tid}"}}' in text
    # Per model chosen; a model the policy never chose has no sample.
    for name in models:
        if name in chosen:
            assert sample(text, "bandit_router_decisions_total", model=name,
                          tenant=tid) == chosen.count(name)
        else:
            assert f'bandit_router_decisions_total{{model="{name}",tenant="{tid}"}}' \
                not in text


def test_get_metrics_names_follow_prometheus_conventions(client, models):
    text = client.get("/metrics", headers=ADMIN).text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    for name, kind in types.items():
        assert name.startswith("bandit_router_"), name
        # Counters end in _total; nothing else may (a gauge that resets is not a total).
        assert name.endswith("_total") == (kind == "counter"), f"{kind} {name}"
    assert types["bandit_router_decide_latency_seconds"] == "histogram"
    assert types["bandit_router_reward"] == "summary"
    assert types["bandit_router_spend_usd_total"] == "counter"
    assert types["bandit_router_decisions_total"] == "counter"
    assert types["bandit_router_period_spend_usd"] == "gauge"


def test_decide_request_id_echoed_and_generated(client, models):
    tenant = create_tenant(client, "rid")
    r = decide(client, {**tenant, "X-Request-ID": "gw-1234"}, models)
    assert r.status_code == 200 and r.headers["x-request-id"] == "gw-1234"
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # Not a header to inject into logs: a bad one is replaced.
    bad = client.get("/healthz", headers={"X-Request-ID": "a b" + "x" * 300})
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])


def test_admin_unknown_path_keeps_request_id(client):
    r = client.get("/v1/admin/nope", headers={**ADMIN, "X-Request-ID": "abc"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "abc"


def test_log_access_json_line_has_request_and_decision_id(client, models, caplog):
    import json

    from service.observability import JsonFormatter

    tenant = create_tenant(client, "logged")
    with caplog.at_level("INFO", logger="service.access"):
        r = decide(client, {**tenant, "X-Request-ID": "req-42"}, models)
        decision_id = r.json()["decision_id"]
        fb = client.post("/v1/feedback", json={"decision_id": decision_id, "quality": 1.0},
                         headers={**tenant, "traceparent":
                                  "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert fb.headers["x-request-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    records = [r for r in caplog.records if r.name == "service.access"]
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    decide_line, feedback_line = lines[-2], lines[-1]
    assert decide_line["path"] == "/v1/decide" and decide_line["status"] == 200
    assert decide_line["decision_id"] == decision_id
    assert feedback_line["decision_id"] == decision_id and feedback_line["status"] == 202
    assert decide_line["duration_ms"] >= 0.0 and decide_line["level"] == "INFO"


def test_log_access_off_by_default_logs_nothing(client, caplog):
    with caplog.at_level("WARNING", logger="service.access"):
        client.get("/healthz")
    assert [r for r in caplog.records if r.name == "service.access"] == []


# -------------------------------------------------------------- who may read /metrics
def test_get_metrics_needs_admin_key_or_metrics_token(tmp_path):
    token = "metrics-scraper-token-0123456789"  # noqa: S105 - a test token
    url = f"sqlite:///{tmp_path / 'router.db'}"
    with TestClient(create_app(make_settings(url, metrics_token=token))) as c:
        tenant = create_tenant(c, "curious")
        r = c.get("/metrics")
        assert r.status_code == 401, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "BANDIT_ROUTER_METRICS_PUBLIC" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong-token"}
                     ).status_code == 401
        r = c.get("/metrics", headers={"Authorization": tenant["Authorization"]})
        assert r.status_code == 403, r.text
        assert tenant["X-Tenant"] not in r.text
        for headers in ({"Authorization": f"Bearer {token}"}, ADMIN):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 200, r.text
            assert "bandit_router_decide_latency_seconds" in r.text


def test_get_metrics_public_when_configured(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    with TestClient(create_app(make_settings(url, metrics_public=True))) as c:
        r = c.get("/metrics")
        assert r.status_code == 200, r.text
        assert "bandit_router_decide_latency_seconds" in r.text


def test_get_metrics_explored_counts_each_explored_decision(client, models):
    tenant = create_tenant(client, "explorer")
    tid = tenant["X-Tenant"]
    explored = sum(bool(decide(client, tenant, models).json()["explored"]) for _ in range(40))
    text = client.get("/metrics", headers=ADMIN).text
    name = "bandit_router_explored_decisions_total"
    if explored:
        assert sample(text, name, tenant=tid) == explored
    else:
        assert f'{name}{{tenant="{tid}"}}' not in text


def test_feedback_batch_counted_per_tenant(client, models):
    """A batch of outcomes of two tenants (service.ingest's _account looks each metric's
    child up once per batch): every applied outcome counted, its spend and reward on its
    own tenant."""
    from service.routing import FeedbackItem

    service = client.app.state.routing
    tenants = [create_tenant(client, name) for name in ("batch-a", "batch-b")]
    items = []
    for n, tenant in enumerate(tenants):
        state = service.tenants[tenant["X-Tenant"]]
        for i in range(3 + n):
            decision_id = decide(client, tenant, models).json()["decision_id"]
            items.append(FeedbackItem(state, decision_id, {
                "quality": 0.5, "cost_usd": 0.125 * (i + 1) if i else None}, "gateway"))
    assert service.writer.flush()
    text = client.get("/metrics", headers=ADMIN).text
    # Absent until some feedback was applied (this test alone: none yet).
    before = (sample(text, "bandit_router_feedback_total", status="applied")
              if 'bandit_router_feedback_total{status="applied"}' in text else 0.0)
    assert [r.status for r in service.feedback_many(items)] == ["applied"] * 7
    text = client.get("/metrics", headers=ADMIN).text
    assert sample(text, "bandit_router_feedback_total", status="applied") == before + 7
    for n, tenant in enumerate(tenants):
        tid = tenant["X-Tenant"]
        assert sample(text, "bandit_router_spend_usd_total", tenant=tid) == pytest.approx(
            sum(0.125 * (i + 1) for i in range(1, 3 + n)), abs=1e-12)
        assert sample(text, "bandit_router_reward_count", tenant=tid) == 3 + n
