"""``POST /v1/decide``: choose a model for one query. Never waits on the database.

One FastAPI route, one code path. What made FastAPI's route cost about as much as the
decision was not its routing but what it does with a declared body and response model:
``json.loads`` then a second validation pass over the Python objects, then the
answer validated again through the response model and encoded by the standard ``json``
module. Here the route takes the raw body, validates it once with pydantic-core's JSON
parser, and returns the orjson bytes as a plain :class:`~fastapi.Response` (FastAPI
returns a ``Response`` as it is, skipping the response model, which stays for the
OpenAPI document). Errors are exceptions mapped to problem details by the app's handlers
(:mod:`service.errors`), like every other route's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from bandit import Preferences
from service.batching import DecideBatcher
from service.config import Settings
from service.deps import tenant_for_authorization
from service.errors import Problem
from service.metrics import Metrics
from service.routing import RoutingService
from service.schemas import DecideRequest, DecideResponse

__all__ = ["install", "decide_body", "add_openapi_components"]


async def decide_body(state: Any, authorization: str | None, raw: bytes) -> bytes:
    """The JSON answer to one decide request (raises what the API turns into errors).

    An async function: the work is in-memory numpy (a fraction of a millisecond),
    cheaper on the event loop than a trip through the thread pool. The caller's key is
    checked first (401 before the body is looked at); the body is validated with
    pydantic-core's JSON parser in one step.
    """
    started = time.perf_counter()
    service: RoutingService = state.routing
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    tenant = tenant_for_authorization(authorization, service)
    try:
        body = DecideRequest.model_validate_json(raw)
    except ValidationError as exc:
        # Same locations as FastAPI's own body validation: ("body", field, ...).
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors(include_url=False)]) from None
    if body.query.text is not None and settings.featurizer != "hashing":
        # A sentence-embedding model takes milliseconds: off the event loop.
        x = await asyncio.to_thread(service.context_from, body.query.text, None)
    else:
        x = service.context_from(body.query.text, body.query.embedding)
    override = None if body.preferences is None else Preferences(
        body.preferences.quality, body.preferences.cost, body.preferences.latency)
    # Decided together with the other decides of this event-loop iteration (one policy
    # call for the batch; see service.batching).
    batcher: DecideBatcher | None = getattr(state, "decide_batcher", None)
    if batcher is None:
        batcher = state.decide_batcher = DecideBatcher(service)
    pending = await batcher.decide(tenant, x, body.candidates, override)
    if not service.enqueue(pending):
        # Backpressure: the writer is behind. Wait a little for room, then refuse
        # loudly; a decision is never answered without being queued for storage.
        deadline = started + settings.decision_enqueue_timeout_s
        while not service.enqueue(pending):
            if time.perf_counter() >= deadline:
                service.abandon(pending)
                raise Problem(503, "the decision log is behind; retry shortly",
                              slug="backpressure", headers={"Retry-After": "1"})
            await asyncio.sleep(0.005)
    metrics.decide_latency.observe(time.perf_counter() - started)
    # The body is built from floats and strings we control: no re-validation through the
    # response model (kept below for the OpenAPI schema); orjson, and the predictions
    # encoded once for the stored row are reused as they are.
    answer = {**pending.response,
              "predictions": orjson.Fragment(pending.row["predictions_json"])}
    return orjson.dumps(answer)


# The body is validated by hand (one pydantic-core call, see decide_body), so FastAPI
# does not know its model: the schema goes into components here, with references that
# resolve from the document root (client generators and schemathesis follow them).
_BODY_SCHEMA = DecideRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_BODY_DEFS = _BODY_SCHEMA.pop("$defs", {})


def add_openapi_components(document: dict) -> dict:
    """Register DecideRequest and the models it references in ``components.schemas``."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("DecideRequest", _BODY_SCHEMA)
    for name, schema in _BODY_DEFS.items():
        schemas.setdefault(name, schema)
    return document


async def decide(request: Request) -> Response:
    """Choose a model for one query."""
    content = await decide_body(request.app.state, request.headers.get("authorization"),
                                await request.body())
    return Response(content, media_type="application/json")


def install(app: FastAPI) -> None:
    """Add the route to the app's own router, ahead of the included routers: an
    ``APIRouter`` included in the app is matched through FastAPI's included-router
    layers (a scope key set and restored per candidate, a second match inside the
    router), which cost about a quarter of a decide's time (profiled); a route of the
    app itself is one match."""
    app.add_api_route(
        "/v1/decide", decide, methods=["POST"], tags=["routing"],
        response_model=DecideResponse, responses={401: {}, 403: {}, 422: {}, 429: {}, 503: {}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/DecideRequest"}}}}})
