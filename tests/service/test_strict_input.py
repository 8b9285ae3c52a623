"""Exact input (issue 14, items 3, 4 and 6), on SQLite and PostgreSQL.

* A NUL or another control character in an id or a name is a 422 naming the field, on
  both databases (PostgreSQL answered 500: its text cannot hold NUL), and also while the
  database is unreachable (the feedback was answered ``buffered`` and then dropped).
* JSON types are exact: ``true`` is not a number, ``0``/``1`` are not booleans; every
  refusal changes nothing.
* A request without a valid key is a 401 before its body is looked at (a body that is
  not JSON was a 400).
"""

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
)
from tests.service.test_feedback_buffer import app_client, database_down

CONTROL = ["a\u0000b", "a\u0007b", "a\nb", "a\u007fb", "a\u0085b"]


@pytest.fixture(scope="module")
def tenant(client):
    add_model(client, "strict-" + uuid.uuid4().hex[:6], 0.1, 0.4)
    return create_tenant(client, "strict")


@pytest.mark.parametrize("value", CONTROL)
def test_post_feedback_control_character_in_event_id_422(client, tenant, value):
    d = decide(client, tenant).json()
    r = client.post("/v1/feedback", headers=tenant, json={
        "decision_id": d["decision_id"], "event_id": value, "quality": 0.5})
    assert_problem(r, 422, field="event_id")
    assert client.get(f"/v1/decisions/{d['decision_id']}",
                      headers=tenant).json()["feedback"] == []


@pytest.mark.parametrize("value", CONTROL)
def test_create_tenant_control_character_in_name_422(client, value):
    before = client.get("/v1/admin/tenants", headers=ADMIN).json()
    r = client.post("/v1/admin/tenants", headers=ADMIN, json={"name": value})
    assert_problem(r, 422, field="name")
    assert client.get("/v1/admin/tenants", headers=ADMIN).json() == before


@pytest.mark.parametrize("value", ["m\u0000x", "m\u0001"])
def test_create_model_control_character_in_name_422(client, value):
    r = client.post("/v1/admin/models", headers=ADMIN, json={
        "name": value, "input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0})
    assert_problem(r, 422, field="name")


@pytest.mark.parametrize("value", ["m\u0000x", "m\u0001"])
def test_decide_control_character_in_candidates_422(client, tenant, value):
    r = decide(client, tenant, candidates=[value])
    assert_problem(r, 422, field="candidates.0")


def test_control_character_names_refused_the_same_during_an_outage(new_database_url,
                                                                     tmp_path):
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "o-model")
        tenant = create_tenant(client, "outage")
        d = decide(client, tenant).json()
        assert client.get(f"/v1/decisions/{d['decision_id']}", headers=tenant).status_code \
            == 200
        with database_down(client.app.state.routing.engine):
            r = client.post("/v1/feedback", headers=tenant, json={
                "decision_id": d["decision_id"], "event_id": "x\u0000y", "quality": 0.5})
            assert_problem(r, 422, field="event_id")
            assert client.app.state.routing.feedback_buffered() == 0


# ------------------------------------------------------------------ exact types
@pytest.mark.parametrize(("body", "field"), [
    ({"query": {"embedding": [True] * DIM}}, "query.embedding.0"),
    ({"query": {"embedding": [1] * (DIM - 1) + [False]}}, f"query.embedding.{DIM - 1}"),
    ({"query": {"embedding": ["0.5"] * DIM}}, "query.embedding.0"),
    ({"query": {"text": "x"}, "preferences": {"quality": True}}, "preferences.quality"),
    ({"query": {"text": "x"}, "preferences": {"cost": False}}, "preferences.cost"),
])
def test_decide_boolean_or_string_as_number_422(client, tenant, body, field):
    assert_problem(client.post("/v1/decide", headers=tenant, json=body), 422, field=field)


def test_decide_integers_are_numbers(client, tenant):
    r = client.post("/v1/decide", headers=tenant,
                    json={"query": {"embedding": [1] + [0] * (DIM - 1)}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("extra", "field"), [
    ({"quality": True}, "quality"), ({"quality": 1, "cost_usd": False}, "cost_usd"),
    ({"latency_ms": True}, "latency_ms"), ({"quality": "0.5"}, "quality"),
])
def test_post_feedback_boolean_as_number_422(client, tenant, extra, field):
    d = decide(client, tenant).json()
    r = client.post("/v1/feedback", headers=tenant,
                    json={"decision_id": d["decision_id"], **extra})
    assert_problem(r, 422, field=field)
    assert client.get(f"/v1/decisions/{d['decision_id']}",
                      headers=tenant).json()["feedback"] == []


@pytest.mark.parametrize(("body", "field"), [
    ({"budget_usd_per_day": False}, "budget_usd_per_day"),
    ({"budget_usd_per_month": True}, "budget_usd_per_month"),
    ({"weights": {"quality": True}}, "weights.quality"),
    ({"weights": {"quality": 1, "cost": "0"}}, "weights.cost"),
])
def test_put_preferences_boolean_as_number_422(client, body, field):
    tenant = create_tenant(client, "prefs-" + uuid.uuid4().hex[:6])
    before = client.get("/v1/tenants/me/preferences", headers=tenant).json()
    r = client.put("/v1/tenants/me/preferences", headers=tenant, json=body)
    assert_problem(r, 422, field=field)
    assert client.get("/v1/tenants/me/preferences", headers=tenant).json() == before
    # The next decide is not refused for a budget of 0.0 that was never set.
    assert decide(client, tenant).status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"enabled": 0}, "enabled"), ({"enabled": 1}, "enabled"), ({"enabled": "true"}, "enabled"),
    ({"prior_quality": False}, "prior_quality"), ({"input_price_per_mtok": True},
                                                  "input_price_per_mtok"),
])
def test_model_boolean_and_number_exact_422(client, body, field):
    name = add_model(client)
    before = client.get(f"/v1/admin/models/{name}", headers=ADMIN).json()
    assert_problem(client.patch(f"/v1/admin/models/{name}", headers=ADMIN, json=body), 422,
                   field=field)
    assert client.get(f"/v1/admin/models/{name}", headers=ADMIN).json() == before
    created = client.post("/v1/admin/models", headers=ADMIN, json={
        "name": "exact-" + uuid.uuid4().hex[:6], "input_price_per_mtok": 1,
        "output_price_per_mtok": 2, **body})
    assert_problem(created, 422, field=field)


# ------------------------------------------------------------ auth before body
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/admin/models"), ("POST", "/v1/admin/tenants"), ("POST", "/v1/feedback"),
    ("PUT", "/v1/tenants/me/preferences"), ("PATCH", "/v1/admin/models/x"),
    ("PUT", "/v1/admin/tenants/x/preferences"), ("POST", "/v1/decide"),
])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-key", "Basic abc"])
def test_bad_body_without_valid_key_401(client, method, path, authorization):
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    r = client.request(method, path, content=b"{", headers=headers)
    assert_problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


def test_bad_body_with_valid_key_still_400(client, tenant):
    r = client.post("/v1/feedback", content=b"{", headers={
        **tenant, "content-type": "application/json"})
    assert_problem(r, 400)


def test_wrong_kind_of_key_403_before_body(client, tenant):
    r = client.post("/v1/admin/models", content=b"{", headers={
        "Authorization": tenant["Authorization"], "content-type": "application/json"})
    assert_problem(r, 403)
    r = client.post("/v1/feedback", content=b"{", headers={
        **ADMIN, "content-type": "application/json"})
    assert_problem(r, 403)
