"""``POST /v1/decide``: choose a model for one query. Never waits on the database."""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from bandit import Preferences
from service.batching import DecideBatcher
from service.config import Settings
from service.deps import authenticate_tenant
from service.errors import Problem
from service.metrics import Metrics
from service.routing import RoutingService
from service.schemas import DecideRequest, DecideResponse

router = APIRouter(prefix="/v1", tags=["routing"])


# An async route: the work is in-memory numpy (a fraction of a millisecond), cheaper on
# the event loop than a trip through the thread pool.
#
# No dependency injection on this route: FastAPI resolving five dependencies took a third
# of a decision's time. It calls the same function as ``TenantDep`` (so a caller without
# a valid key gets 401 before its body is looked at), then validates the body with
# pydantic-core's JSON parser in one step.
@router.post("/decide", response_model=DecideResponse,
             responses={401: {}, 403: {}, 422: {}, 429: {}, 503: {}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": DecideRequest.model_json_schema()}}}})
async def decide(request: Request) -> Response:
    started = time.perf_counter()
    service: RoutingService = request.app.state.routing
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    tenant = authenticate_tenant(request, service)
    try:
        body = DecideRequest.model_validate_json(await request.body())
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
    batcher: DecideBatcher | None = getattr(request.app.state, "decide_batcher", None)
    if batcher is None:
        batcher = request.app.state.decide_batcher = DecideBatcher(service)
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
    # The body is built from floats and strings we control: skip FastAPI's re-validation
    # through the response model (kept above for the OpenAPI schema) and encode with
    # orjson; together they were a third of the time of a decision.
    # The predictions were encoded once for the stored row: reused as they are.
    answer = {**pending.response,
              "predictions": orjson.Fragment(pending.row["predictions_json"])}
    return Response(orjson.dumps(answer), media_type="application/json")
