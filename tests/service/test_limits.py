"""Request limits (service/limits.py): body size 413, decide's text length and candidates
422 naming the field and the limit, embedding dimension 422, per-tenant rate 429 with
Retry-After, concurrency 503; all from settings. The limits do not touch the database,
so these run on SQLite only."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from service.limits import TokenBuckets
from tests.service.conftest import (
    ADMIN,
    DIM,
    add_model,
    assert_problem,
    create_tenant,
    decide,
    embedding,
    make_settings,
)


@pytest.fixture
def make_client(tmp_path) -> Iterator:
    clients: list[TestClient] = []

    def _make(**overrides: object) -> TestClient:
        url = f"sqlite:///{tmp_path / f'limits{len(clients)}.db'}"
        c = TestClient(create_app(make_settings(url, **overrides)))
        c.__enter__()
        clients.append(c)
        return c

    yield _make
    for c in clients:
        c.__exit__(None, None, None)


def tenant_header(client: TestClient, name: str = "lim") -> dict[str, str]:
    h = create_tenant(client, name)
    return {"Authorization": h["Authorization"]}


# ------------------------------------------------------------------- body size
def test_post_body_over_limit_is_413_before_reading(make_client):
    client = make_client(max_body_bytes=2048)
    add_model(client, "b-m1")
    h = tenant_header(client)
    big = {"query": {"text": "x" * 3000}}
    body = assert_problem(client.post("/v1/decide", json=big, headers=h), 413,
                          field="body", detail_contains="2048 bytes")
    assert body["errors"][0]["allowed"] == "at most 2048 bytes"
    # Every endpoint with a body, admin included.
    assert_problem(client.post("/v1/admin/tenants", json={"name": "y" * 3000},
                               headers=ADMIN), 413)
    assert_problem(client.put("/v1/tenants/me/preferences", content=b" " * 4096,
                              headers={**h, "Content-Type": "application/json"}), 413)
    assert decide(client, h).status_code == 200


def test_chunked_body_over_limit_is_413(make_client):
    client = make_client(max_body_bytes=2048)
    add_model(client, "c-m1")
    h = tenant_header(client)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"query": {"text": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}}'

    r = client.post("/v1/decide", content=chunks(),
                    headers={**h, "Content-Type": "application/json"})
    assert_problem(r, 413, field="body")
    assert r.headers.get("x-request-id")


def test_refusals_counted_in_metrics(make_client):
    client = make_client(max_body_bytes=1024)
    assert_problem(client.post("/v1/admin/tenants", json={"name": "z" * 2000},
                               headers=ADMIN), 413)
    text = client.get("/metrics", headers=ADMIN).text
    assert 'bandit_router_limited_requests_total{reason="body"} 1.0' in text


# ------------------------------------------------------ decide's input limits
def test_decide_text_over_limit_is_422_naming_field_and_limit(make_client):
    client = make_client(max_text_chars=50)
    add_model(client, "t-m1")
    h = tenant_header(client)
    r = client.post("/v1/decide", json={"query": {"text": "é" * 51}}, headers=h)
    body = assert_problem(r, 422, field="query.text", detail_contains="limit is 50")
    assert body["errors"][0]["allowed"] == "at most 50 characters"
    ok = client.post("/v1/decide", json={"query": {"text": "é" * 50}}, headers=h)
    assert ok.status_code == 200, ok.text


def test_decide_text_past_old_cap_accepted_by_default(make_client):
    """The schema no longer caps query.text at 100,000 characters: MAX_TEXT_CHARS does."""
    client = make_client()
    add_model(client, "t-m2")
    h = tenant_header(client)
    r = client.post("/v1/decide", json={"query": {"text": "a" * 300_000}}, headers=h)
    assert r.status_code == 200, r.text


def test_decide_text_limit_raised_past_body_default(make_client):
    client = make_client(max_text_chars=3_000_000, max_body_bytes=4_000_000)
    add_model(client, "t-m3")
    h = tenant_header(client)
    r = client.post("/v1/decide", json={"query": {"text": "b" * 2_000_000}}, headers=h)
    assert r.status_code == 200, r.text
    over = client.post("/v1/decide", json={"query": {"text": "b" * 3_000_001}}, headers=h)
    assert_problem(over, 422, field="query.text", detail_contains="limit is 3000000")


def test_decide_long_text_featurized_from_head_and_tail(make_client):
    client = make_client(featurize_chars=1000)
    names = [add_model(client, "ht-a"), add_model(client, "ht-b", 3.0, 15.0)]
    h = tenant_header(client)
    head, tail = "why is the sky blue " * 30, " answer in one line" * 30

    def predictions(text: str) -> dict:
        r = client.post("/v1/decide", json={"query": {"text": text}, "candidates": names},
                        headers=h)
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    def score_of(text: str) -> list[float]:
        return [predictions(text)[n]["uncertainty"] for n in names]

    # Learn something first so that contexts give different predictions.
    decision = client.post("/v1/decide", json={"query": {"text": head}}, headers=h).json()
    client.post("/v1/feedback", json={"decision_id": decision["decision_id"],
                                      "quality": 1.0}, headers=h)
    a = head + "x" * 50_000 + tail
    b = head + "y z " * 20_000 + tail  # another middle: same head and tail
    c = head + "x" * 50_000 + " and now something else entirely" * 20  # another tail
    assert score_of(a) == score_of(b)
    assert score_of(a) != score_of(c)
    assert score_of(a) == score_of(head[:500] + "\n" + tail[-500:])


def test_decide_candidates_over_limit_is_422_naming_field_and_limit(make_client):
    client = make_client(max_candidates=2)
    names = [add_model(client, f"k-m{i}") for i in range(3)]
    h = tenant_header(client)
    r = decide(client, h, candidates=names)
    body = assert_problem(r, 422, field="candidates", detail_contains="limit is 2")
    assert body["errors"][0]["allowed"] == "at most 2 item(s)"
    assert decide(client, h, candidates=names[:2]).status_code == 200


def test_decide_candidates_over_schema_cap_is_422(make_client):
    client = make_client()
    add_model(client, "k-x")
    h = tenant_header(client)
    r = decide(client, h, candidates=[f"m{i}" for i in range(1001)])
    assert_problem(r, 422, field="candidates")


@pytest.mark.parametrize("length", [DIM - 1, DIM + 1, 0])
def test_decide_embedding_wrong_dimension_is_422(make_client, length):
    client = make_client()
    add_model(client, "e-m1")
    h = tenant_header(client)
    r = client.post("/v1/decide", json={"query": {"embedding": [0.1] * length}}, headers=h)
    assert_problem(r, 422, field="query.embedding")


def test_limit_settings_candidates_cap_text_both_ways():
    with pytest.raises(ValidationError, match="max_candidates"):
        Settings(max_candidates=1001)
    # Issue 18: the text limit is a setting both ways (it was capped at 100,000).
    assert Settings(max_text_chars=5_000_000).max_text_chars == 5_000_000
    with pytest.raises(ValidationError, match="max_text_chars"):
        Settings(max_text_chars=0)


def test_limit_settings_from_environment(monkeypatch):
    monkeypatch.setenv("BANDIT_ROUTER_RATE_LIMIT_PER_S", "12.5")
    monkeypatch.setenv("BANDIT_ROUTER_MAX_BODY_BYTES", "4096")
    s = Settings()
    assert (s.rate_limit_per_s, s.max_body_bytes) == (12.5, 4096)


# ------------------------------------------------------------------- rate limit
def test_rate_limit_per_tenant_is_429_with_retry_after(make_client):
    client = make_client(rate_limit_per_s=1.0, rate_limit_burst=3)
    add_model(client, "r-m1")
    a, b = tenant_header(client, "ra"), tenant_header(client, "rb")
    statuses = [decide(client, a, seed=i).status_code for i in range(3)]
    assert statuses == [200, 200, 200]
    r = decide(client, a, seed=9)
    body = assert_problem(r, 429, detail_contains="1 requests/s")
    assert int(r.headers["retry-after"]) >= 1
    assert body["type"].endswith("/rate-limited")
    # Other endpoints of the same tenant share the bucket; nothing was decided.
    assert_problem(client.get("/v1/tenants/me/usage", headers=a), 429)
    # Another tenant, the admin and health checks are not limited by A's bucket.
    assert decide(client, b).status_code == 200
    assert client.get("/v1/admin/tenants", headers=ADMIN).status_code == 200
    assert client.get("/healthz").status_code == 200
    time.sleep(1.05)
    assert decide(client, a).status_code == 200


def test_rate_limit_off_by_default(make_client):
    client = make_client()
    add_model(client, "r-m2")
    h = tenant_header(client)
    assert all(decide(client, h, seed=i).status_code == 200 for i in range(30))


def test_token_buckets_refill_and_retry_after():
    buckets = TokenBuckets(rate=10.0, burst=5)
    assert [buckets.take("t", now=0.0) for _ in range(5)] == [0.0] * 5
    assert buckets.take("t", now=0.0) == pytest.approx(0.1)
    assert buckets.take("t", now=0.1) == 0.0
    assert buckets.take("u", now=0.1) == 0.0  # separate bucket per key
    # Idle time refills up to the burst, never beyond.
    assert [buckets.take("t", now=100.0) for _ in range(6)].count(0.0) == 5


# ------------------------------------------------------------------ concurrency
def test_requests_beyond_max_concurrent_are_503(make_client):
    client = make_client(max_concurrent_requests=4)
    add_model(client, "q-m1")
    h = tenant_header(client)
    assert decide(client, h).status_code == 200  # builds the per-app limits state
    limits = client.app.state.limits
    limits.in_flight = 4  # four requests "in flight"
    try:
        r = client.post("/v1/decide", json={"query": {"embedding": embedding(0)}},
                        headers=h)
        assert_problem(r, 503, detail_contains="in flight")
        assert r.headers["retry-after"] == "1"
        assert client.get("/readyz").status_code == 200  # health is exempt
    finally:
        limits.in_flight = 0
    assert decide(client, h).status_code == 200
