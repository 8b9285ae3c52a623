"""Request ids and structured (JSON) logs.

The app's middleware (:mod:`service.middleware`) gives every HTTP request an id
(:func:`request_id_of`): the caller's
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

When access logs are off the middleware only reads the headers and adds one.

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

__all__ = ["JsonFormatter", "configure_logging", "current_request_id", "request_id_of",
           "set_request_id", "reset_request_id", "log_request", "access_log",
           "DECISION_PATHS", "MAX_CAPTURE"]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bandit_router_request_id", default=None)
_TOKEN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
#: Paths whose access log line names the decision (read from the bodies).
DECISION_PATHS = frozenset({"/v1/decide", "/v1/feedback"})
#: Bodies of decide/feedback are a few KB; never buffer more than this for a log line.
MAX_CAPTURE = 64 * 1024
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


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """A request's id from its headers (the module docstring's rule)."""
    raw = parent = None
    for name, value in headers:
        if name == b"x-request-id":
            raw = value
        elif name == b"traceparent":
            parent = value
    rid = _sane(raw.decode("latin-1") if raw else None)
    if rid is None:
        rid = _from_traceparent(parent.decode("latin-1") if parent else None)
    return rid or random_hex()  # no system call per request (service.ids)


def set_request_id(rid: str) -> contextvars.Token[str | None]:
    """Make ``rid`` the current request's id (:func:`current_request_id`, log lines)."""
    return _request_id.set(rid)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def log_request(scope: dict[str, Any], status: int, started: float, request_body: bytes,
                response_body: bytes) -> None:
    """The access log line of one answered request (``service.access``, INFO)."""
    fields: dict[str, Any] = {
        "method": scope.get("method"), "path": scope.get("path"), "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3)}
    path = scope.get("path")
    if path in DECISION_PATHS:
        decision = _decision_id(response_body if path == "/v1/decide" else request_body)
        if decision:
            fields["decision_id"] = decision
    client = scope.get("client")
    if client:
        fields["client"] = client[0]
    access_log.info("request", extra={"fields": fields})


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
