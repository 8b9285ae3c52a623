"""Request ids and structured (JSON) logs.

:class:`RequestIdMiddleware` gives every HTTP request an id: the caller's
``X-Request-ID`` when it is a sane token, else the trace id of a W3C ``traceparent``
header, else a new random one. The id is 32 lowercase hex digits when generated, the
format of an OpenTelemetry trace id, so a gateway can use one for the other. It is
echoed in the ``X-Request-ID`` response header, available to any code through
:func:`current_request_id`, and stamped on every log line by :class:`JsonFormatter`.

When the ``service.access`` logger is enabled for INFO (``bandit-router serve`` with
JSON logs, the default), each request also logs one line with its method, path, status,
duration and, for decide and feedback, the ``decision_id``::

    {"ts": "2026-03-01T10:00:00.123Z", "level": "INFO", "logger": "service.access",
     "msg": "request", "request_id": "4bf92f3577b34da6a3ce929d0e0e4736",
     "method": "POST", "path": "/v1/decide", "status": 200, "duration_ms": 0.41,
     "decision_id": "0d5c...", "client": "10.0.0.7"}

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which costs a task and
a stream per request on the decide path); when access logs are off it only reads one
header and adds one.

>>> _sane("gw-123"), _sane("bad id"), _sane("x" * 200)
('gw-123', None, None)
>>> _from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
'4bf92f3577b34da6a3ce929d0e0e4736'
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from service.ids import random_hex

__all__ = ["RequestIdMiddleware", "JsonFormatter", "configure_logging", "current_request_id"]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bandit_router_request_id", default=None)
_TOKEN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_DECISION_PATHS = frozenset({"/v1/decide", "/v1/feedback"})
# Bodies of decide/feedback are a few KB; never buffer more than this for a log line.
_MAX_CAPTURE = 64 * 1024
access_log = logging.getLogger("service.access")


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return _request_id.get()


def _sane(value: str | None) -> str | None:
    # Only printable tokens: the id goes into log lines and response headers.
    return value if value is not None and _TOKEN.fullmatch(value) else None


def _from_traceparent(value: str | None) -> str | None:
    match = _TRACEPARENT.fullmatch(value.strip()) if value else None
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def _decision_id(body: bytes) -> str | None:
    try:
        value = orjson.loads(body).get("decision_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """ASGI middleware: request id in, out, in the context and in the access log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        raw = headers.get(b"x-request-id")
        rid = _sane(raw.decode("latin-1") if raw else None)
        if rid is None:
            parent = headers.get(b"traceparent")
            rid = _from_traceparent(parent.decode("latin-1") if parent else None)
        rid = rid or random_hex()  # no system call per request (service.ids)
        token = _request_id.set(rid)
        logging_on = access_log.isEnabledFor(logging.INFO)
        capture = logging_on and scope.get("path") in _DECISION_PATHS
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500}
        request_body = bytearray()
        response_body = bytearray()
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def receive_wrapper() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and len(request_body) < _MAX_CAPTURE:
                request_body.extend(message.get("body", b""))
            return message

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            elif (capture and message["type"] == "http.response.body"
                  and len(response_body) < _MAX_CAPTURE):
                response_body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_wrapper if capture else receive, send_wrapper)
        finally:
            if logging_on:
                fields: dict[str, Any] = {
                    "method": scope.get("method"), "path": scope.get("path"),
                    "status": state["status"],
                    "duration_ms": round((time.perf_counter() - started) * 1000.0, 3)}
                if capture:
                    decision = (_decision_id(bytes(response_body))
                                if scope.get("path") == "/v1/decide"
                                else _decision_id(bytes(request_body)))
                    if decision:
                        fields["decision_id"] = decision
                client = scope.get("client")
                if client:
                    fields["client"] = client[0]
                access_log.info("request", extra={"fields": fields})
            _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, the record's
    ``extra={"fields": {...}}`` and, for errors, the traceback as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        rid = _request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the service's loggers and uvicorn's (``serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
