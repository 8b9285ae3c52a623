"""Errors of ``POST /v1/chat/completions`` in OpenAI's shape.

The OpenAI SDKs (and every gateway that speaks their wire format) read an error as
``{"error": {"message", "type", "param", "code"}}`` and pick the exception class from the
HTTP status, so this endpoint answers in that shape, not in the problem details of the
rest of the API. The status table (docs/api.md, "Errors of the OpenAI-compatible
endpoint") is :data:`STATUSES`; the service's own refusals (:class:`~service.errors.Problem`,
the domain family) are translated by :func:`from_exception`, keeping their status.

>>> err = GatewayError(404, "model 'x' is not registered", code="model_not_found",
...                    param="model")
>>> orjson.loads(err.body())["error"]["type"], err.status
('not_found_error', 404)
"""

from __future__ import annotations

import orjson
from starlette.types import Send

from bandit import InvalidInputError, RoutingError
from service.errors import Problem, domain_problem

__all__ = ["GatewayError", "STATUSES", "TYPES", "from_exception", "send_json",
           "error_headers"]

#: OpenAI's error ``type`` per status (what the SDKs map to exception classes).
TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
          503: "service_unavailable", 504: "timeout_error"}

#: Every status the endpoint answers with an error, and why (documented in docs/api.md).
STATUSES = {
    400: "the request is not a chat completion the router can route (param names the field)",
    401: "missing or unknown tenant key", 403: "the admin key instead of a tenant key",
    404: "model names neither 'auto', one of the tenant's 'auto:<alias>' nor a "
         "registered model (code model_not_found)",
    413: "body larger than BANDIT_ROUTER_MAX_BODY_BYTES",
    429: "tenant rate limit or budget spent (reject), or the upstream's own 429 "
         "(code upstream_rate_limited, its Retry-After passed on)",
    502: "the upstream failed: 5xx, refused connection, an error about its key or model, "
         "or an answer that is not a chat completion (code upstream_error / "
         "upstream_unreachable)",
    503: "no enabled model has an upstream, or the decision log is behind",
    504: "the upstream sent nothing for BANDIT_ROUTER_UPSTREAM_TIMEOUT_S "
         "(code upstream_timeout)",
}


class GatewayError(Exception):
    """An error answer of the endpoint (status, OpenAI-style body, headers)."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message,
                                       "type": TYPES.get(self.status, "server_error"),
                                       "param": self.param, "code": self.code}})


def from_exception(exc: Exception) -> GatewayError | None:
    """The OpenAI-style error of a refusal the service raised (same status and
    message), or None for an unexpected error (the app's handlers answer 500)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RoutingError):
        field = exc.field if isinstance(exc, InvalidInputError) else None
        exc = domain_problem(exc)
        if exc.status == 422:  # a bad field of the request: OpenAI says 400
            return GatewayError(400, exc.detail, param=field, code="invalid_value")
    if isinstance(exc, Problem):
        return GatewayError(exc.status, exc.detail, code=exc.slug, headers=exc.headers)
    return None


async def send_json(send: Send, status: int, body: bytes,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """One whole JSON answer."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def error_headers(err: GatewayError) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
