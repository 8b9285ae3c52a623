"""What a new user meets in the README and docs/ (docs14's walk-through), on SQLite.

- docs/litellm.md registers LiteLLM's deployments under their ``litellm_params.model``
  (``openai/gpt-4o-mini``): a name with a slash, which the registry accepts, must be
  reachable by ``GET/PATCH/DELETE /v1/admin/models/{name}`` (``bandit-router models
  disable openai/gpt-4o-mini`` answered 404 "Not Found").
- A feedback whose ``decision_id`` is not a UUID names the field and what is allowed.
"""

from __future__ import annotations

import pytest

from tests.service.conftest import ADMIN, add_model, assert_problem, create_tenant, decide


@pytest.fixture(scope="module")
def backend() -> str:
    return "sqlite"


def test_model_named_with_a_slash_is_managed_by_name(client):
    name = add_model(client, "openai/gpt-4o-mini", 0.15, 0.6)
    r = client.get(f"/v1/admin/models/{name}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name
    r = client.patch(f"/v1/admin/models/{name}", json={"enabled": False}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name and r.json()["enabled"] is False
    # Percent-encoded, as a client that quotes the name sends it: the same model.
    r = client.patch("/v1/admin/models/openai%2Fgpt-4o-mini", json={"enabled": True},
                     headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is True
    tenant = create_tenant(client, "slash")
    assert decide(client, tenant, [name]).json()["model"] == name
    assert client.delete(f"/v1/admin/models/{name}", headers=ADMIN).status_code == 204
    assert_problem(client.get(f"/v1/admin/models/{name}", headers=ADMIN), 404)
    # An unknown name with a slash is the registry's 404, not the router's.
    body = assert_problem(client.get("/v1/admin/models/openai/nope", headers=ADMIN), 404)
    assert "nope" in body["detail"]


def test_feedback_with_a_malformed_decision_id_says_what_is_allowed(client):
    tenant = create_tenant(client, "malformed")
    r = client.post("/v1/feedback", json={"decision_id": "nope", "quality": 0.5},
                    headers=tenant)
    body = assert_problem(r, 422, field="decision_id")
    allowed = body["errors"][0]["allowed"]
    assert allowed is not None and "UUID" in allowed, body


@pytest.mark.parametrize(("body", "field", "allowed_names"), [
    # docs/api.md: "`failed` needs `quality` and refuses `default_quality` (422 naming
    # `failed`)"; it was named "body", with no allowed values.
    ({"failed": True}, "failed", "quality"),
    ({"failed": True, "quality": 0.0, "default_quality": 0.5}, "failed", "default_quality"),
    ({"quality": 0.5, "default_quality": 0.5}, "default_quality", "quality"),
    ({"input_tokens": 10}, "output_tokens", "input_tokens"),
    ({}, "body", "cost_usd"),
])
def test_feedback_that_breaks_a_rule_between_fields_names_the_field_and_what_is_allowed(
        client, body, field, allowed_names):
    tenant = create_tenant(client, f"rules-{field}-{len(body)}")
    name = add_model(client)
    decision_id = decide(client, tenant, [name]).json()["decision_id"]
    r = client.post("/v1/feedback", json={"decision_id": decision_id, **body}, headers=tenant)
    problem = assert_problem(r, 422, field=field)
    error = problem["errors"][0]
    assert error["field"] == field, problem
    assert error["allowed"] is not None and allowed_names in error["allowed"], problem
    assert not error["message"].startswith("Value error"), problem
