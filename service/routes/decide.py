"""``POST /v1/decide``: choose a model for one query. Never waits on the database.

Served by :class:`DecideShortcut`, a pure ASGI middleware placed innermost (inside
every other middleware: request ids, access log, server errors), in front of FastAPI's
routing: for this one endpoint FastAPI's route matching, exception middleware, exit
stack, request wrapper and dependency solving cost about as much as the decision itself.
The FastAPI route below documents the endpoint in the OpenAPI schema and runs the same
code (:func:`decide_body`); errors go through the app's own exception handlers either
way, so the answers are the same problem details.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from bandit import Preferences
from bandit.base import MAX_ABS_CONTEXT
from bandit.pricing import prompt_tokens
from service.batching import DecideBatcher
from service.config import Settings
from service.deps import tenant_for_authorization
from service.errors import Problem
from service.features import head_and_tail
from service.metrics import Metrics
from service.routing import RoutingService
from service.schemas import DecideRequest, DecideResponse

__all__ = ["router", "decide_body", "DecideShortcut"]

router = APIRouter(prefix="/v1", tags=["routing"])
PATH = "/v1/decide"
_JSON_HEADERS = (b"content-type", b"application/json")
#: How long a decide waits for its row to be committed or spooled when it must
#: (write-through, or an outage) before a 503.
_CONFIRM_S = 10.0


async def decide_body(app: FastAPI, authorization: str | None, raw: bytes) -> bytes:
    """The JSON answer to one decide request (raises what the API turns into errors).

    An async function: the work is in-memory numpy (a fraction of a millisecond),
    cheaper on the event loop than a trip through the thread pool. The caller's key is
    checked first (401 before the body is looked at); the body is validated with
    pydantic-core's JSON parser in one step.
    """
    started = time.perf_counter()
    state = app.state
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
    text = body.query.text
    if text is not None and len(text) > settings.featurize_chars:
        text = head_and_tail(text, settings.featurize_chars)
    if text is not None and settings.featurizer != "hashing":
        # A sentence-embedding model takes milliseconds: off the event loop.
        x = await asyncio.to_thread(service.context_from, text, None, body.tags)
    else:
        x = service.context_from(text, body.query.embedding, body.tags)
    override = None if body.preferences is None else Preferences(
        body.preferences.quality, body.preferences.cost, body.preferences.latency)
    # Decided together with the other decides of this event-loop iteration (one policy
    # call for the batch; see service.batching).
    batcher: DecideBatcher | None = getattr(state, "decide_batcher", None)
    if batcher is None:
        batcher = state.decide_batcher = DecideBatcher(service)
    # The prompt's length prices the request on every candidate before the call.
    tokens = None if body.query.text is None else prompt_tokens(body.query.text)
    pending = await batcher.decide(tenant, x, body.candidates, override, tokens)
    # Stored with the decision: its context already holds them (feedback and replays
    # learn from the stored context); kept to show and to audit.
    pending.row["tags"] = body.tags or None
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


def add_openapi_components(document: dict, settings: Settings) -> dict:
    """Register DecideRequest and the models it references in ``components.schemas``,
    with this service's limits (``DIM``, ``MAX_TEXT_CHARS``, ``MAX_CANDIDATES``): the
    document says what the service accepts."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("DecideRequest", copy.deepcopy(_BODY_SCHEMA))
    for name, schema in _BODY_DEFS.items():
        schemas.setdefault(name, copy.deepcopy(schema))
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


@router.post("/decide", response_model=DecideResponse,
             responses={401: {}, 403: {}, 422: {}, 429: {}, 503: {}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {
                     "$ref": "#/components/schemas/DecideRequest"}}}}})
async def decide(request: Request) -> Response:
    """Choose a model for one query (served by :class:`DecideShortcut` in the app)."""
    content = await decide_body(request.app, request.headers.get("authorization"),
                                await request.body())
    return Response(content, media_type="application/json")


class DecideShortcut:
    """Pure ASGI middleware answering ``POST /v1/decide`` with :func:`decide_body`;
    everything else goes on to the app. An exception the app has a handler for is
    answered by that handler (problem details); any other propagates to the server-error
    middleware (500), as from a route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST"
                or scope.get("root_path")):
            await self.app(scope, receive, send)
            return
        fastapi_app: FastAPI = scope["app"]
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            content = await decide_body(fastapi_app, authorization, b"".join(chunks))
        except Exception as exc:
            handler = _exception_handler(fastapi_app, exc)
            if handler is None:
                raise
            request = Request(scope, receive)
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:
                response = handler(request, exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [_JSON_HEADERS,
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def _exception_handler(app: FastAPI, exc: Exception) -> Any:
    """The handler Starlette's exception middleware would pick (by exception class;
    500/``Exception`` belong to the server-error middleware)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
