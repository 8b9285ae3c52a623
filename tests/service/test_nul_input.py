"""NUL and other control characters in every string a caller sends, on SQLite and on
PostgreSQL (whose text cannot hold NUL: an INSERT of one fails, and in a batched writer
it would take the batch's other, acknowledged rows with it).

* What is stored as text (ids, names, the upstream's URL) refuses control characters:
  a 422 naming the field, nothing stored (the base URL answered 500 on PostgreSQL and was
  stored on SQLite).
* What is only context or is stored as JSON accepts any character: the query text (hashed,
  never stored) and tag values (JSON-escaped as ``\\u0000`` in a ``json`` column). A
  decision with NUL in a tag value is stored together with its batch-mates, exactly.
* A path naming a model or tenant with NUL is a 404, never a 500.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import models as m
from tests.service.conftest import ADMIN, add_model, assert_problem, create_tenant, decide

CONTROL = ["a\u0000b", "a\u0007b", "a\u007fb", "a\u0085b"]


@pytest.fixture(scope="module")
def tenant(client):
    add_model(client, "nul-" + uuid.uuid4().hex[:6], 0.1, 0.4)
    return create_tenant(client, "nul")


@pytest.mark.parametrize("value", CONTROL)
def test_create_model_control_character_in_base_url_422(client, value):
    name = "bu-" + uuid.uuid4().hex[:6]
    r = client.post("/v1/admin/models", headers=ADMIN, json={
        "name": name, "input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0,
        "base_url": f"https://{value}.example/v1"})
    assert_problem(r, 422, field="base_url")
    assert_problem(client.get(f"/v1/admin/models/{name}", headers=ADMIN), 404)


@pytest.mark.parametrize("value", CONTROL)
def test_patch_model_control_character_in_base_url_422(client, value):
    name = add_model(client, base_url="https://up.example/v1")
    r = client.patch(f"/v1/admin/models/{name}", headers=ADMIN,
                     json={"base_url": f"https://{value}.example/v1"})
    assert_problem(r, 422, field="base_url")
    assert client.get(f"/v1/admin/models/{name}",
                      headers=ADMIN).json()["base_url"] == "https://up.example/v1"


def test_decide_nul_in_query_text_is_only_context_200(client, tenant):
    r = client.post("/v1/decide", headers=tenant, json={"query": {"text": "hi\u0000there"}})
    assert r.status_code == 200, r.text
    got = client.get(f"/v1/decisions/{r.json()['decision_id']}", headers=tenant)
    assert got.status_code == 200, got.text


def test_decide_control_characters_in_tag_values_stored_with_the_batch(client, tenant):
    values = ["plain", *CONTROL, "\u0000", "last"]
    ids = []
    for value in values:
        r = decide(client, tenant, tags={"app": value})
        assert r.status_code == 200, r.text
        ids.append(r.json()["decision_id"])
    routing = client.app.state.routing
    assert routing.writer.flush(), "the decision writer did not drain"
    with Session(routing.engine) as session:
        stored = dict(session.execute(select(m.DecisionRow.id, m.DecisionRow.tags)
                                      .where(m.DecisionRow.id.in_(ids))).all())
    assert {i: stored.get(i) for i in ids} == {
        i: {"app": v} for i, v in zip(ids, values, strict=True)}
    for i, value in zip(ids, values, strict=True):
        got = client.get(f"/v1/decisions/{i}", headers=tenant)
        assert got.status_code == 200 and got.json()["tags"] == {"app": value}, got.text


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/admin/models/a%00b", None),
    ("PATCH", "/v1/admin/models/a%00b", {"enabled": False}),
    ("DELETE", "/v1/admin/models/a%00b", None),
    ("GET", "/v1/admin/tenants/a%00b/preferences", None),
    ("PUT", "/v1/admin/tenants/a%00b/preferences", {"policy": "linucb"}),
    ("GET", "/v1/admin/tenants/a%00b/usage", None),
    ("POST", "/v1/admin/tenants/a%00b/rotate-key", None),
    ("POST", "/v1/admin/reservations/release", {"tenant": "a\u0000b"}),
])
def test_nul_in_a_model_or_tenant_reference_404(client, method, path, body):
    r = client.request(method, path, headers=ADMIN, json=body)
    assert_problem(r, 404, detail_contains="does not exist")


# A lone UTF-16 surrogate (JSON "\ud800") is no Unicode text: PostgreSQL's json input
# refuses it and psycopg cannot encode it. Refused at parsing, before anything is stored.
@pytest.mark.parametrize("body", [
    '{"query": {"text": "a\\ud800b"}}',
    '{"query": {"text": "x"}, "tags": {"app": "a\\udc00"}}',
])
def test_decide_lone_surrogate_400(client, tenant, body):
    r = client.post("/v1/decide", content=body.encode(),
                    headers={**tenant, "content-type": "application/json"})
    assert_problem(r, 400, field="body", detail_contains="not valid JSON")


def test_create_tenant_lone_surrogate_in_name_422(client):
    before = client.get("/v1/admin/tenants", headers=ADMIN).json()
    r = client.post("/v1/admin/tenants", content=b'{"name": "a\\ud800b"}',
                    headers={**ADMIN, "content-type": "application/json"})
    assert_problem(r, 422, field="name")
    assert client.get("/v1/admin/tenants", headers=ADMIN).json() == before
