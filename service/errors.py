"""RFC 9457 problem details: the one place where errors become HTTP responses.

Every error the API returns is ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail`` and, for bad input, ``errors: [{field, message, allowed}]``.
Sources mapped here:

* the domain family, :class:`bandit.RoutingError` (:func:`domain_problem`, the one
  table): :class:`bandit.InvalidInputError` (raised by the learning core or by the
  service's own checks) -> 422 naming the field and the allowed values, and the
  service's refusals (:mod:`service.exceptions`) -> 404, 409, 429, 503;
* FastAPI's :class:`~fastapi.exceptions.RequestValidationError` -> 422 (400 when the body
  is not JSON at all);
* :class:`Problem`, raised by the HTTP layer only (authentication, limits, routes) ->
  its status (401, 403, 413...);
* anything else -> 500 with no internals leaked; the process keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bandit import InvalidInputError, RoutingError
from service.exceptions import (
    BudgetExhaustedError,
    ConflictError,
    NotFoundError,
    ServiceError,
    UnavailableError,
)
from service.schemas import NO_CONTROL

__all__ = ["Problem", "problem_response", "domain_problem", "install_error_handlers",
           "PROBLEM_JSON", "document_problems"]

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://bandit-router.dev/problems/"
_TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Payload too large",
    422: "Invalid input",
    429: "Too many requests", 500: "Internal server error", 503: "Service unavailable",
}
_SLUGS = {
    400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
    405: "method-not-allowed", 409: "conflict", 422: "invalid-input",
    429: "too-many-requests", 500: "internal-error", 503: "unavailable",
}
#: What a strict type accepts (service.schemas: numbers and booleans are exact).
_TYPES = {"float_type": "a JSON number (not a boolean, not a string)",
          "int_type": "a JSON integer (not a boolean, not a string)",
          "bool_type": "true or false (not 0/1, not a string)",
          "string_type": "a JSON string",
          "uuid_parsing": "a UUID (a decision_id as POST /v1/decide answered it)",
          "uuid_type": "a UUID (a decision_id as POST /v1/decide answered it)"}
log = logging.getLogger("service.errors")


class Problem(Exception):
    """An error with an HTTP status, raised anywhere in the service."""

    def __init__(self, status: int, detail: str, *, slug: str | None = None,
                 title: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or _SLUGS.get(status, "error")
        self.title = title or _TITLES.get(status, "Error")
        self.errors = errors
        self.headers = headers or {}


def problem_response(problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {"type": _TYPE_BASE + problem.slug, "title": problem.title,
                            "status": problem.status, "detail": problem.detail}
    if problem.errors is not None:
        body["errors"] = problem.errors
    return JSONResponse(body, status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_JSON)


def invalid_input(err: InvalidInputError) -> Problem:
    # The detail names the field; the entry has it apart, so its message does not repeat it.
    message = str(err).removeprefix(f"{err.field}: ")
    return Problem(422, str(err), errors=[{"field": err.field, "message": message,
                                           "allowed": err.allowed}])


#: The service's refusals by class: status (the most specific class listed first).
_DOMAIN_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (NotFoundError, 404), (ConflictError, 409), (BudgetExhaustedError, 429),
    (UnavailableError, 503))


def domain_problem(err: RoutingError) -> Problem:
    """The problem details of a domain error: the one mapping of the family to HTTP."""
    if isinstance(err, InvalidInputError):
        return invalid_input(err)
    status = next((s for cls, s in _DOMAIN_STATUS if isinstance(err, cls)), None)
    if status is None or not isinstance(err, ServiceError):
        # The bare base class: a bug, not the caller's doing.
        log.error("unmapped domain error", exc_info=err)
        return Problem(500, "unexpected error; see the server log")
    errors = None
    if isinstance(err, ConflictError):
        errors = [{"field": err.field, "message": err.reason, "allowed": err.allowed}]
    retry = getattr(err, "retry_after_s", None)
    return Problem(status, err.detail, slug=err.slug, errors=errors,
                   headers=None if retry is None else {"Retry-After": str(retry)})


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _allowed(error: dict[str, Any]) -> str | None:
    ctx = error.get("ctx") or {}
    if "allowed" in ctx:  # our own checks (e.g. tags) say it in their words
        return str(ctx["allowed"])
    if "expected" in ctx:
        return f"one of {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"a number {word} {ctx[key]}"
    unit = "character(s)" if str(error.get("type", "")).startswith("string_") else "item(s)"
    if "min_length" in ctx:
        return f"at least {ctx['min_length']} {unit}"
    if "max_length" in ctx:
        return f"at most {ctx['max_length']} {unit}"
    if "pattern" in ctx:
        if ctx["pattern"] == NO_CONTROL:
            return "a string without control characters (U+0000-U+001F, U+007F-U+009F)"
        return f"a string matching {ctx['pattern']}"
    kind = error.get("type")
    if kind in _TYPES:
        return _TYPES[kind]
    if error.get("type") == "missing":
        return "required"
    if error.get("type") == "extra_forbidden":
        return "no such field"
    return None


def validation_problem(exc: RequestValidationError) -> Problem:
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        return Problem(400, "the request body is not valid JSON",
                       errors=[{"field": "body", "message": "invalid JSON",
                                "allowed": "a JSON object"}])
    # A rule between fields (a model validator, located at the whole body) names in its
    # context the field it blames.
    errors = [{"field": str((e.get("ctx") or {}).get("field")
                            or _field(tuple(e.get("loc", ())))),
               "message": str(e.get("msg", "")), "allowed": _allowed(e)} for e in raw]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return Problem(422, detail, errors=errors)


def _unexpected_response() -> JSONResponse:
    return problem_response(Problem(500, "unexpected error; see the server log"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers. An exception no handler takes is answered by the app's
    middleware (:mod:`service.middleware`), keeping the connection; the ``Exception``
    handler below answers what escapes it (Starlette's server-error middleware)."""

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RoutingError)
    async def _domain(_request: Request, exc: RoutingError) -> JSONResponse:
        return problem_response(domain_problem(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only
            # (GET /v1/admin/models answered "Allow: POST"): name every route's.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(Problem(exc.status_code, str(exc.detail), headers=headers))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # The database is down or unreachable (an outage, a failover): nothing was
        # accepted, so the caller must retry. Decisions never get here (they are served
        # from memory and written by the batched writer); feedback and admin calls do.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    type(exc).__name__)
        return problem_response(Problem(503, "the database is unavailable; nothing was "
                                        "stored, retry later", slug="unavailable",
                                        headers={"Retry-After": "5"}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _unexpected_response()


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts on the request's path."""
    # By asking the router about each method: included routers are not flattened into
    # plain routes, but each answers whether it fully matches a scope.
    routes = request.app.router.routes
    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in routes)]


#: Error statuses an operation may answer, documented in the OpenAPI document with the
#: problem-details body (:func:`document_problems`).
_PROBLEM_SCHEMA = {
    "type": "object", "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"},
        "status": {"type": "integer"}, "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                           "allowed": {}}}}}}


def _statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    # 503: MAX_CONCURRENT_REQUESTS and an unreachable database, anywhere but /healthz.
    if not path.startswith("/v1/"):
        return {"/readyz": {503}, "/metrics": {401, 403}}.get(path, set())
    codes = {401, 403, 422, 429, 503}  # key, kind of key, input, rate limit / budget
    if "requestBody" in operation:
        codes |= {400, 413}  # not JSON, too large
    if "{" in path or path == "/v1/feedback":
        codes.add(404)  # the named model, tenant or decision does not exist
    if (method, path) == ("post", "/v1/admin/models"):
        codes.add(409)  # the name is (or was) used
    if (method, path) == ("post", "/v1/feedback"):
        codes.add(409)  # a second quality for a gateway call (service/quality_defaults.py)
    if path.startswith("/v1/admin/tenants/{"):
        codes.add(409)  # a tenant named by a name that two tenants share
    if path.startswith("/v1/admin/reservations"):
        codes |= {404, 409}  # ?tenant= names no tenant, or a name two tenants share
    if path.startswith("/v1/admin/keys") and method in ("post", "delete"):
        codes.add(409)  # ADMIN_KEY is configured; the last stored key
    if (method, path) == ("put", "/v1/admin/state"):
        codes.add(409)  # distributed mode: the learners own the statistics
    return codes


def document_problems(document: dict[str, Any]) -> dict[str, Any]:
    """Document every error status an operation answers with its
    ``application/problem+json`` body, in place of FastAPI's generic 422."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = _PROBLEM_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    ref = {"$ref": "#/components/schemas/Problem"}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code in sorted(_statuses(path, method, operation)):
                responses[str(code)] = {"description": _TITLES[code],
                                        "content": {PROBLEM_JSON: {"schema": ref}}}
    return document
