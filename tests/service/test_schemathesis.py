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
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.core.failures import FailureGroup

from service.app import create_app
from tests.fakes.openai_upstream import FakeModel, running_upstream
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
    if status >= 400 and f" {CHAT} " in where:
        # The OpenAI-compatible endpoint answers errors in OpenAI's shape.
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not error.get("message") or not error.get("type"):
            return f"{where}: {status} not an OpenAI-style error {body}"
        return None
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


#: schemathesis' own checks, failing the test on any mismatch between the OpenAPI
#: document and an answer (issue 14): the status is documented, the content type and
#: the body match what is documented for it, data the schema allows is not refused as
#: malformed, data it forbids is refused.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.positive_data_acceptance, checks.negative_data_rejection]


def fuzz_one(client: TestClient, strategy: Any, where: str, headers: dict[str, str],
             failures: list[str]) -> Any:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        response = send(client, case, headers)
        problem = check_answer(response, where)
        if problem is None:
            try:
                case.validate_response(response, checks=CHECKS)
            except (AssertionError, FailureGroup) as exc:  # every mismatch is reported
                body = case.body if not isinstance(case.body, bytes) else case.body[:100]
                problem = (f"{where}: {response.status_code} {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:400]} | body {body!r:.200}")
        if problem is not None and len(failures) < 50:
            failures.append(problem)

    return run


MODELS = [f"fz-{i}" for i in range(3)]
CHAT = "/v1/chat/completions"


def _known_candidates(body: Any) -> None:
    if isinstance(body, dict) and isinstance(body.get("candidates"), list):
        body["candidates"] = [MODELS[len(name) % len(MODELS)] if isinstance(name, str)
                              else name for name in body["candidates"]]


def _known_models(case: Any) -> Any:
    body = case.body
    _known_candidates(body)
    if case.operation.path == CHAT and isinstance(body, dict) and isinstance(
            body.get("model"), str):
        # "auto:fz" (the chat tenant's alias of MODELS: the fuzzed admin calls may add
        # models whose upstream fails) or one of MODELS: routed and forwarded.
        body["model"] = ["auto:fz", *MODELS][len(body["model"]) % (len(MODELS) + 1)]
    if isinstance(body, dict) and isinstance(body.get("aliases"), dict):
        for alias in body["aliases"].values():  # PUT /v1/tenants/me/gateway
            _known_candidates(alias)
    if isinstance(body, dict) and isinstance(body.get("baseline_model"), str):
        body["baseline_model"] = MODELS[len(body["baseline_model"]) % len(MODELS)]
    return case


def _with_body(case: Any, body: Any) -> Any:
    case.body = body
    return case


def test_fuzz_every_operation_no_5xx_and_problem_details(fuzz_client):
    # The models' upstream (POST /v1/chat/completions forwards there): a fake on loopback.
    with running_upstream({name: FakeModel("fuzzed") for name in MODELS}) as upstream:
        fuzz_every_operation(fuzz_client, f"{upstream.base_url}/v1")
        # The chat endpoint is in the document, and its valid requests were forwarded.
        assert any(call.path == CHAT for call in upstream.calls())


def fuzz_every_operation(client: TestClient, upstream_url: str) -> None:
    for name in MODELS:
        add_model(client, name, base_url=upstream_url)
    tenant = {"Authorization": create_tenant(client, "fuzz")["Authorization"]}
    # The chat endpoint's own tenant: the fuzzed /v1/tenants/me/* calls (a zero budget
    # with "reject": 429) leave its valid requests to be forwarded.
    chat = {"Authorization": create_tenant(client, "fuzz-chat")["Authorization"]}
    r = client.put("/v1/tenants/me/gateway", headers=chat,
                   json={"aliases": {"fz": {"candidates": MODELS}}})
    assert r.status_code == 200, r.text
    doc = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        headers = ADMIN if operation.path.startswith("/v1/admin") else \
            chat if operation.path == CHAT else tenant
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            where = f"{operation.method.upper()} {operation.path} [{mode.value}]"

            strategy = operation.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE and operation.path == "/v1/admin/state" \
                    and operation.method.upper() == "PUT":
                # A state to import must hold statistics files of this service's
                # featurizer, which no schema can say: the service's own export.
                exported = client.get("/v1/admin/state", headers=ADMIN).json()
                strategy = strategy.map(lambda case, body=exported: _with_body(case, body))
            if mode == GenerationMode.POSITIVE:
                # Candidates and a tenant's baseline_model must be registered models, which
                # the document cannot list (they change at run time): an unknown one is a
                # 422 naming the field.
                strategy = strategy.map(_known_models)
            run = fuzz_one(client, strategy, where, headers, failures)
            try:
                run()
            except Exception as exc:  # e.g. hypothesis.errors.Unsatisfiable
                if type(exc).__name__ != "Unsatisfiable":
                    raise
    assert operations >= 15, operations
    assert failures == [], "\n".join(failures)
    # The tenant key still works: nothing the fuzzer sent broke the service. (The fuzzer
    # may have set a zero budget with "reject", or a baseline: valid settings, put back.)
    r = client.put("/v1/tenants/me/preferences", headers=tenant, json={
        "budget_usd_per_day": None, "budget_usd_per_month": None, "baseline_model": None,
        "weights": {"quality": 1.0, "cost": 0.0, "latency": 0.0}})
    assert r.status_code == 200, r.text
    r = client.post("/v1/decide", json={"query": {"text": "still alive"}}, headers=tenant)
    assert r.status_code == 200, r.text


# ------------------------------------------------------- the document is the truth
def _validator(doc: dict[str, Any], name: str) -> Any:
    # jsonschema_rs: schemathesis' own validator (a dependency of it).
    import jsonschema_rs

    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                               "components": doc["components"]})


def _body_schema_name(doc: dict[str, Any], method: str, path: str) -> str:
    ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"][
        "schema"]["$ref"]
    return ref.rsplit("/", 1)[-1]


@pytest.mark.parametrize(("method", "path", "body", "valid"), [
    ("post", "/v1/decide", {"query": {}}, False),
    ("post", "/v1/decide", {"query": {"text": None, "embedding": None}}, False),
    ("post", "/v1/decide", {"query": {"text": "x", "embedding": [0.0] * 8}}, False),
    ("post", "/v1/decide", {"query": {"embedding": [0.0] * 7}}, False),
    ("post", "/v1/decide", {"query": {"text": "x"}, "preferences": {"quality": 0}}, False),
    ("post", "/v1/decide", {"query": {"text": "x"}, "preferences": {"quality": 0,
                                                                    "cost": 1}}, True),
    ("post", "/v1/decide", {"query": {"text": "x", "embedding": None}}, True),
    ("post", "/v1/feedback", {"decision_id": str(uuid.uuid4())}, False),
    ("post", "/v1/feedback", {"decision_id": str(uuid.uuid4()), "quality": None}, False),
    ("post", "/v1/feedback", {"decision_id": str(uuid.uuid4()), "quality": None,
                              "latency_ms": 3}, True),
    ("post", "/v1/feedback", {"decision_id": str(uuid.uuid4()), "quality": 1,
                              "event_id": "a\u0000b"}, False),
    ("put", "/v1/tenants/me/preferences", {"policy": None}, False),
    ("put", "/v1/tenants/me/preferences", {"weights": None}, False),
    ("put", "/v1/tenants/me/preferences", {"budget_usd_per_day": None}, True),
    ("patch", "/v1/admin/models/{name}", {"enabled": None}, False),
    ("patch", "/v1/admin/models/{name}", {"enabled": 1}, False),
    ("patch", "/v1/admin/models/{name}", {"prior_quality": None}, True),
    ("post", "/v1/admin/tenants", {"name": "x\u0000y"}, False),
])
def test_openapi_body_schema_accepts_exactly_what_the_service_accepts(
        fuzz_client, method, path, body, valid):
    doc = fuzz_client.get("/openapi.json").json()
    validator = _validator(doc, _body_schema_name(doc, method, path))
    assert validator.is_valid(body) is valid, [str(e) for e in validator.iter_errors(body)]
    headers = ADMIN if path.startswith("/v1/admin") else {
        "Authorization": create_tenant(fuzz_client, "doc")["Authorization"]}
    url = path.replace("{name}", add_model(fuzz_client) if "{name}" in path else "")
    status = fuzz_client.request(method.upper(), url, json=body, headers=headers).status_code
    # The service agrees: a body the schema refuses is a 422; one it allows is not
    # refused as malformed (a feedback for an unknown decision is a 404).
    assert (status not in (400, 422)) is valid, status


@pytest.mark.parametrize(("path", "methods"), [
    ("/v1/admin/models", {"GET", "POST"}),
    ("/v1/admin/models/some-model", {"GET", "PATCH", "DELETE"}),
    ("/v1/tenants/me/preferences", {"GET", "PUT"}),
])
def test_unsupported_method_405_allow_lists_every_method(fuzz_client, path, methods):
    r = fuzz_client.request("OPTIONS", path, headers=ADMIN)
    assert r.status_code == 405, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON)
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert methods <= allowed <= methods | {"HEAD"}, allowed


def test_openapi_documents_every_error_status_as_problem_details(fuzz_client):
    doc = fuzz_client.get("/openapi.json").json()
    responses = doc["paths"]["/v1/feedback"]["post"]["responses"]
    for code in ("400", "401", "403", "404", "413", "422", "429", "503"):
        content = responses[code]["content"]
        assert list(content) == [PROBLEM_JSON], (code, content)
        assert content[PROBLEM_JSON]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "409" in doc["paths"]["/v1/admin/models"]["post"]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
