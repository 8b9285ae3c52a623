"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis, in-process ASGI).

Every operation of ``/openapi.json`` gets schema-conforming (positive) and
schema-violating (negative) requests, with a tenant key on tenant endpoints and the
admin key on admin ones. Checked for every answer: no 5xx; every 4xx is an RFC 9457
problem-details body whose ``status`` equals the HTTP status. Examples are bounded
(``EXAMPLES`` per operation and mode, derandomized) so the module runs in well under a
minute. SQLite only: what is fuzzed here is validation and error mapping, not storage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from service.app import create_app
from tests.service.conftest import ADMIN, PROBLEM_JSON, add_model, create_tenant, make_settings

EXAMPLES = 25
BASE = "http://testserver"


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    with TestClient(create_app(make_settings(url)), raise_server_exceptions=False) as c:
        yield c


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolves(doc: dict[str, Any], ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    node: Any = doc
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_openapi_every_ref_resolves(fuzz_client):
    doc = fuzz_client.get("/openapi.json").json()
    dangling = sorted({r for r in _refs(doc) if not _resolves(doc, r)})
    assert dangling == []


@pytest.mark.parametrize("field", ["policy", "scope", "on_budget_exhausted"])
def test_put_preferences_explicit_null_is_422(fuzz_client, field):
    tenant = {"Authorization": create_tenant(fuzz_client, f"null-{field}")["Authorization"]}
    r = fuzz_client.put("/v1/tenants/me/preferences", json={field: None}, headers=tenant)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("field", ["input_price_per_mtok", "output_price_per_mtok",
                                   "enabled"])
def test_patch_model_explicit_null_is_422(fuzz_client, field):
    name = add_model(fuzz_client)
    r = fuzz_client.patch(f"/v1/admin/models/{name}", json={field: None}, headers=ADMIN)
    assert r.status_code == 422, r.text


def test_create_model_overflowing_price_keeps_routing(tmp_path):
    url = f"sqlite:///{tmp_path / 'overflow.db'}"
    with TestClient(create_app(make_settings(url))) as client:
        add_model(client, "ok-model")
        tenant = {"Authorization": create_tenant(client, "overflow")["Authorization"]}
        assert client.post("/v1/decide", json={"query": {"text": "before"}},
                           headers=tenant).status_code == 200
        client.post("/v1/admin/models", json={"name": "overflow-price",
                                              "input_price_per_mtok": 1.0,
                                              "output_price_per_mtok": 1.5e308},
                    headers=ADMIN)
        r = client.post("/v1/decide", json={"query": {"text": "after"}}, headers=tenant)
        assert r.status_code == 200, r.text


def check_answer(response, where: str) -> str | None:
    """None when the answer is acceptable, else a one-line description."""
    status = response.status_code
    if status >= 500:
        return f"{where}: {status} {response.text[:200]}"
    if status >= 400:
        if not response.headers.get("content-type", "").startswith(PROBLEM_JSON):
            return f"{where}: {status} not problem+json ({response.headers.get('content-type')})"
        body = response.json()
        missing = [k for k in ("type", "title", "status", "detail") if k not in body]
        if missing or body["status"] != status:
            return f"{where}: {status} bad problem body {body}"
    return None


def send(client: TestClient, case: Any, headers: dict[str, str]) -> Any:
    kwargs = case.as_transport_kwargs(base_url=BASE, headers=headers)
    method = kwargs.pop("method")
    url = kwargs.pop("url")
    request: dict[str, Any] = {"headers": kwargs.pop("headers", None),
                               "params": kwargs.pop("params", None)}
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs.pop("json"), allow_nan=True)
        request["headers"] = {**(request["headers"] or {}),
                              "Content-Type": "application/json"}
    elif kwargs.get("data") is not None:
        data = kwargs.pop("data")
        request["content"] = data if isinstance(data, (bytes, str)) else json.dumps(data)
    return client.request(method, url, **request)


def fuzz_one(client: TestClient, strategy: Any, where: str, headers: dict[str, str],
             failures: list[str]) -> Any:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        problem = check_answer(send(client, case, headers), where)
        if problem is not None and len(failures) < 50:
            failures.append(problem)

    return run


def test_fuzz_every_operation_no_5xx_and_problem_details(fuzz_client):
    client = fuzz_client
    for i in range(3):
        add_model(client, f"fz-{i}")
    tenant = {"Authorization": create_tenant(client, "fuzz")["Authorization"]}
    doc = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        headers = ADMIN if operation.path.startswith("/v1/admin") else tenant
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            where = f"{operation.method.upper()} {operation.path} [{mode.value}]"

            run = fuzz_one(client, operation.as_strategy(generation_mode=mode), where,
                           headers, failures)
            try:
                run()
            except Exception as exc:  # e.g. hypothesis.errors.Unsatisfiable
                if type(exc).__name__ != "Unsatisfiable":
                    raise
    assert operations >= 15, operations
    assert failures == [], "\n".join(failures)
    # The tenant key still works: nothing the fuzzer sent broke the service.
    r = client.post("/v1/decide", json={"query": {"text": "still alive"}}, headers=tenant)
    assert r.status_code == 200, r.text
