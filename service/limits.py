"""Request limits: body size, decide's text length and candidates, per-tenant rate,
concurrent requests. One pure ASGI middleware, configured by :class:`~service.config.Settings`.

In the order they are checked:

* **concurrency** (``MAX_CONCURRENT_REQUESTS``, 0 = off): requests beyond this many in
  flight in the process are refused at once with 503 and ``Retry-After``, so a spike is
  shed instead of queued until every caller times out. Health and metrics are exempt.
* **rate** (``RATE_LIMIT_PER_S`` / ``RATE_LIMIT_BURST``, 0 = off): one token bucket per
  tenant, in memory (per replica), refilled at ``RATE_LIMIT_PER_S`` tokens per second
  up to ``RATE_LIMIT_BURST``. Every request with a tenant key takes one token; an empty
  bucket answers 429 with ``Retry-After`` (whole seconds until a token is back). The
  admin key and unknown keys are not limited here (unknown keys are refused with 401
  by the endpoint). Checked before the body is read.
* **body size** (``MAX_BODY_BYTES``): a ``Content-Length`` above it is refused with 413
  before the body is read; a chunked body is counted as it arrives and refused as soon
  as it passes the limit (never buffered beyond it).
* **decide's text and candidates** (``MAX_TEXT_CHARS``, ``MAX_CANDIDATES``): 422 naming
  the field and the limit. ``MAX_TEXT_CHARS`` (default 1,000,000) can be lowered or
  raised (with ``MAX_BODY_BYTES``); whatever its length, a text is featurized from a
  bounded head and tail (``FEATURIZE_CHARS``, service/routes/decide.py). The request
  schema caps candidates at 1,000; the setting can only lower that. The body is parsed
  here only when it is long enough to break a limit (a body of n bytes holds at most n
  characters of text and n / 4 candidates), so ordinary decides are not parsed twice.

Embedding length is checked by the endpoint against ``DIM`` (422 on ``query.embedding``).
Every refusal is a problem-details body (:mod:`service.errors`) and is counted in
``bandit_router_limited_requests_total{reason}``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from prometheus_client import Counter

from service.errors import Problem, problem_response

__all__ = ["LimitsMiddleware", "TokenBuckets"]

_EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DECIDE = "/v1/decide"


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens per second, at most ``burst``.

    >>> buckets = TokenBuckets(rate=2.0, burst=2)
    >>> [buckets.take("t", now=0.0) for _ in range(3)]
    [0.0, 0.0, 0.5]
    >>> buckets.take("t", now=0.5)
    0.0
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        # key -> (tokens, time of that count). Bounded by the number of tenants: only
        # keys of known tenants get a bucket.
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is back."""
        now = time.monotonic() if now is None else now
        tokens, then = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class _Limits:
    """The per-app state, built from the settings at the first request."""

    def __init__(self, app: Any) -> None:
        settings = app.state.settings
        self.max_body = settings.max_body_bytes
        self.max_text = settings.max_text_chars
        self.max_candidates = settings.max_candidates
        # A body shorter than this cannot break the text or candidates limit.
        self.parse_above = min(self.max_text, 4 * self.max_candidates + 3)
        self.max_concurrent = settings.max_concurrent_requests
        self.in_flight = 0
        rate = settings.rate_limit_per_s
        burst = settings.rate_limit_burst or max(1, math.ceil(rate))
        self.buckets = TokenBuckets(rate, burst) if rate > 0 else None
        self.refused = Counter("bandit_router_limited_requests",
                               "Requests refused by a limit (exposed as "
                               "bandit_router_limited_requests_total)", ["reason"],
                               registry=app.state.metrics.registry)


class LimitsMiddleware:
    """Pure ASGI middleware enforcing :mod:`service.limits` (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _EXEMPT:
            await self.app(scope, receive, send)
            return
        fastapi_app = scope["app"]
        limits: _Limits | None = getattr(fastapi_app.state, "limits", None)
        if limits is None:
            limits = fastapi_app.state.limits = _Limits(fastapi_app)
        if limits.max_concurrent and limits.in_flight >= limits.max_concurrent:
            await self._refuse(limits, "concurrency", Problem(
                503, f"more than {limits.max_concurrent} requests in flight; retry shortly",
                slug="overloaded", headers={"Retry-After": "1"}), scope, receive, send)
            return
        limits.in_flight += 1
        try:
            await self._limited(limits, scope, receive, send)
        finally:
            limits.in_flight -= 1

    async def _limited(self, limits: _Limits, scope: dict[str, Any], receive: Any,
                       send: Any) -> None:
        headers = scope["headers"]
        if limits.buckets is not None:
            wait = self._rate(limits, scope["app"], headers)
            if wait:
                retry = max(1, math.ceil(wait))
                await self._refuse(limits, "rate", Problem(
                    429, f"rate limit of {limits.buckets.rate:g} requests/s for this "
                    f"tenant exceeded; retry after {retry} s", slug="rate-limited",
                    headers={"Retry-After": str(retry)}), scope, receive, send)
                return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length = _content_length(headers)
        if length is not None and length > limits.max_body:
            await self._refuse(limits, "body", _too_large(limits.max_body),
                               scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body:
                await self._refuse(limits, "body", _too_large(limits.max_body),
                                   scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"] == _DECIDE and len(body) > limits.parse_above:
            problem = _decide_problem(limits, body)
            if problem is not None:
                await self._refuse(limits, "input", problem, scope, receive, send)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _rate(limits: _Limits, app: Any, headers: list[tuple[bytes, bytes]]) -> float:
        authorization = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if not authorization:
            return 0.0
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return 0.0
        service = getattr(app.state, "routing", None)
        tenant = None if service is None else service.tenant_for_key(key.strip())
        if tenant is None:
            return 0.0
        assert limits.buckets is not None
        return limits.buckets.take(tenant.id)

    @staticmethod
    async def _refuse(limits: _Limits, reason: str, problem: Problem,
                      scope: dict[str, Any], receive: Any, send: Any) -> None:
        limits.refused.labels(reason).inc()
        await problem_response(problem)(scope, receive, send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the request body is larger than {limit} bytes",
                   slug="payload-too-large", title="Payload too large",
                   errors=[{"field": "body", "message": "too large",
                            "allowed": f"at most {limit} bytes"}])


def _decide_problem(limits: _Limits, body: bytes) -> Problem | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # the endpoint answers 400 with its own wording
    if not isinstance(data, dict):
        return None
    query = data.get("query")
    text = query.get("text") if isinstance(query, dict) else None
    if isinstance(text, str) and len(text) > limits.max_text:
        return _invalid("query.text", f"at most {limits.max_text} characters",
                        f"query.text has {len(text)} characters; the limit is "
                        f"{limits.max_text}")
    candidates = data.get("candidates")
    if isinstance(candidates, list) and len(candidates) > limits.max_candidates:
        return _invalid("candidates", f"at most {limits.max_candidates} item(s)",
                        f"candidates has {len(candidates)} items; the limit is "
                        f"{limits.max_candidates}")
    return None


def _invalid(field: str, allowed: str, detail: str) -> Problem:
    return Problem(422, detail, errors=[{"field": field, "message": detail,
                                         "allowed": allowed}])
