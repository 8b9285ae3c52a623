"""``POST /v1/decide``: choose a model for one query. Never waits on the database.

One route, one code path, inside the whole app: every middleware, FastAPI's exception
middleware and the app's exception handlers (:mod:`service.errors`) see it as any other
route. The route is Starlette's, with an ASGI endpoint (:class:`DecideEndpoint`), the
lighter of the framework's two kinds. Profiled in-process (cProfile over ASGI calls),
FastAPI's ``APIRoute`` added about a fifth to a decide's CPU time: its request handler's
telemetry hooks, dependency solving and exit stacks, a ``Request`` and a ``Response``
object, a second exception wrapper, and the included-router layers of the match; all
for a body it does not parse (pydantic-core validates the raw bytes once, see
:func:`decide_body`) and an answer it does not serialize (orjson, with the predictions
encoded once for the stored row). What remains, the app's middleware, FastAPI's
exception middleware and the router's match, is the price of being a route. What
FastAPI's route would have given, the OpenAPI operation, is added to the document by
:func:`add_openapi` (FastAPI's documented way to extend the schema).
"""

from __future__ import annotations

import asyncio
import copy
import time
from http import HTTPStatus
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bandit import Preferences
from bandit.base import MAX_ABS_CONTEXT
from bandit.pricing import prompt_tokens
from service.batching import DecideBatcher
from service.config import Settings
from service.deps import tenant_for_authorization
from service.errors import Problem
from service.features import head_and_tail
from service.metrics import Metrics
from service.routing import PendingDecision, RoutingService, TenantState
from service.schemas import DecideRequest, DecideResponse

__all__ = ["route", "add_openapi", "decide_body", "decide_pending", "DecideEndpoint"]

PATH = "/v1/decide"
_JSON = (b"content-type", b"application/json")
#: How long a decide waits for its row to be committed or spooled when it must
#: (write-through, or an outage) before a 503.
_CONFIRM_S = 10.0


async def decide_pending(state: Any, tenant: TenantState, text: str | None,
                         embedding: list[float] | None, tags: dict[str, str] | None,
                         candidates: list[str] | None, override: Preferences | None,
                         started: float) -> PendingDecision:
    """Decide for one query and queue the decision for storage (waiting for it to be
    durable when the writer must confirm): what ``POST /v1/decide`` and
    ``POST /v1/chat/completions`` (service/gateway) share. ``started`` is the request's
    ``perf_counter()`` (the backpressure wait is bounded from it)."""
    service: RoutingService = state.routing
    settings: Settings = state.settings
    full_text = text
    if text is not None and len(text) > settings.featurize_chars:
        text = head_and_tail(text, settings.featurize_chars)
    if text is not None and settings.featurizer != "hashing":
        # A sentence-embedding model takes milliseconds: off the event loop.
        x = await asyncio.to_thread(service.context_from, text, None, tags)
    else:
        x = service.context_from(text, embedding, tags)
    # Decided together with the other decides of this event-loop iteration (one policy
    # call for the batch; see service.batching).
    batcher: DecideBatcher | None = getattr(state, "decide_batcher", None)
    if batcher is None:
        batcher = state.decide_batcher = DecideBatcher(service)
    # The prompt's length prices the request on every candidate before the call.
    tokens = None if full_text is None else prompt_tokens(full_text)
    pending = await batcher.decide(tenant, x, candidates, override, tokens)
    # Stored with the decision: its context already holds them (feedback and replays
    # learn from the stored context); kept to show and to audit.
    pending.row["tags"] = tags or None
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
    writer = service.writer
    if writer.must_confirm():
        # Write-through, or an outage (the writer is spooling): answered only once the
        # row is committed to the database or to the local spool (service/writer.py).
        decision_id = pending.row["id"]
        if not await asyncio.to_thread(writer.wait_durable, decision_id, _CONFIRM_S):
            if writer.withdraw(decision_id):
                service.abandon(pending)
            raise Problem(503, "the decision could not be stored or spooled in time; "
                          "retry shortly", slug="backpressure", headers={"Retry-After": "1"})
    return pending


async def decide_body(state: Any, authorization: str | None, raw: bytes) -> bytes:
    """The JSON answer to one decide request (raises what the API turns into errors).

    An async function: the work is in-memory numpy (a fraction of a millisecond),
    cheaper on the event loop than a trip through the thread pool. The caller's key is
    checked first (401 before the body is looked at); the body is validated with
    pydantic-core's JSON parser in one step.
    """
    started = time.perf_counter()
    service: RoutingService = state.routing
    metrics: Metrics = state.metrics
    tenant = tenant_for_authorization(authorization, service)
    try:
        body = DecideRequest.model_validate_json(raw)
    except ValidationError as exc:
        # Same locations as FastAPI's own body validation: ("body", field, ...).
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors(include_url=False)]) from None
    pending = await decide_pending(state, tenant, body.query.text, body.query.embedding,
                                   body.tags, body.candidates,
                                   None if body.preferences is None else Preferences(
                                       body.preferences.quality, body.preferences.cost,
                                       body.preferences.latency), started)
    metrics.decide_latency.observe(time.perf_counter() - started)
    # The body is built from floats and strings we control: no re-validation through the
    # response model (DecideResponse documents it); orjson, and the predictions encoded
    # once for the stored row are reused as they are.
    answer = {**pending.response,
              "predictions": orjson.Fragment(pending.row["predictions_json"])}
    return orjson.dumps(answer)


class DecideEndpoint:
    """The route's ASGI app: the raw body and the ``Authorization`` header in,
    :func:`decide_body`'s bytes out; an exception goes up to the app's handlers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the caller is gone: nothing decided, nothing reserved
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        content = await decide_body(scope["app"].state, authorization, b"".join(chunks))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [_JSON, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def route() -> Route:
    """``POST /v1/decide`` served by :class:`DecideEndpoint`; the app factory passes it in
    FastAPI's ``routes`` argument, so it is the first route the router tries (the
    busiest path, matched before the documentation pages and the included routers)."""
    return Route(PATH, DecideEndpoint(), methods=["POST"], include_in_schema=False)


def _schema(model: type[BaseModel], mode: str) -> tuple[dict, dict]:
    """A model's JSON schema with references that resolve from the document root (client
    generators and schemathesis follow them), and the models it references."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                     mode=mode)  # type: ignore[arg-type]
    return schema, schema.pop("$defs", {})


_REQUEST = _schema(DecideRequest, "validation")
_RESPONSE = _schema(DecideResponse, "serialization")
_OPERATION = {
    "tags": ["routing"], "summary": "Decide", "description": "Choose a model for one query.",
    "operationId": "decide_v1_decide_post",
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/DecideRequest"}}}},
    "responses": {
        "200": {"description": "Successful Response", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/DecideResponse"}}}},
        **{str(status): {"description": HTTPStatus(status).phrase}
           for status in (401, 403, 422, 429, 503)}},
}


def add_openapi(document: dict, settings: Settings) -> dict:
    """Document the route: its operation, and the request and response models (and the
    models they reference) in ``components.schemas``, with this service's limits
    (``DIM``, ``MAX_TEXT_CHARS``, ``MAX_CANDIDATES``): the document says what the
    service accepts."""
    document["paths"] = {PATH: {"post": copy.deepcopy(_OPERATION)},
                         **document.get("paths", {})}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, (schema, defs) in (("DecideRequest", _REQUEST), ("DecideResponse", _RESPONSE)):
        schemas.setdefault(name, copy.deepcopy(schema))
        for ref, sub in defs.items():
            schemas.setdefault(ref, copy.deepcopy(sub))
    query = schemas["Query"]["properties"]
    for branch in query["embedding"]["anyOf"]:
        if branch.get("type") == "array":
            branch.update(minItems=settings.dim, maxItems=settings.dim)
            branch["items"].update(minimum=-MAX_ABS_CONTEXT, maximum=MAX_ABS_CONTEXT)
    for branch in query["text"]["anyOf"]:
        if branch.get("type") == "string":
            branch["maxLength"] = settings.max_text_chars
    for branch in schemas["DecideRequest"]["properties"]["candidates"]["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = settings.max_candidates
    return document
