"""Request limits: body size, decide's text length and candidates, per-tenant rate,
concurrent requests, configured by :class:`~service.config.Settings` and checked by the
app's one middleware (:mod:`service.middleware`).

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

from service.errors import Problem

__all__ = ["Limits", "TokenBuckets", "EXEMPT", "BODY_METHODS"]

#: Paths no limit applies to (health and metrics).
EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
#: Methods whose body is read (and counted) before the route.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
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


class Limits:
    """The per-app state and checks, built from the settings at the first request; run
    by :class:`service.middleware.ServiceMiddleware` (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        settings = app.state.settings
        self.app = app
        self.max_body = settings.max_body_bytes
        self.max_text = settings.max_text_chars
        self.max_candidates = settings.max_candidates
        # A body shorter than this cannot break the text or candidates limit.
        self.parse_above = min(self.max_text, 4 * self.max_candidates + 3)
        self.max_concurrent = settings.max_concurrent_requests
        #: Requests admitted and not answered yet (the middleware counts them).
        self.in_flight = 0
        rate = settings.rate_limit_per_s
        burst = settings.rate_limit_burst or max(1, math.ceil(rate))
        self.buckets = TokenBuckets(rate, burst) if rate > 0 else None
        self.refused = Counter("bandit_router_limited_requests",
                               "Requests refused by a limit (exposed as "
                               "bandit_router_limited_requests_total)", ["reason"],
                               registry=app.state.metrics.registry)

    def admit(self, scope: dict[str, Any]) -> Problem | None:
        """The concurrency and rate limits, checked before the body is read."""
        if self.max_concurrent and self.in_flight >= self.max_concurrent:
            return self._refuse("concurrency", Problem(
                503, f"more than {self.max_concurrent} requests in flight; retry shortly",
                slug="overloaded", headers={"Retry-After": "1"}))
        if self.buckets is not None:
            wait = self._rate(scope["headers"])
            if wait:
                retry = max(1, math.ceil(wait))
                return self._refuse("rate", Problem(
                    429, f"rate limit of {self.buckets.rate:g} requests/s for this "
                    f"tenant exceeded; retry after {retry} s", slug="rate-limited",
                    headers={"Retry-After": str(retry)}))
        return None

    async def read_body(self, scope: dict[str, Any],
                        receive: Any) -> tuple[Problem | None, bytes | None]:
        """Read the body within ``MAX_BODY_BYTES`` and check decide's limits: (a refusal
        or None, the body; None when the caller disconnected)."""
        length = _content_length(scope["headers"])
        if length is not None and length > self.max_body:
            return self._refuse("body", _too_large(self.max_body)), b""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._refuse("body", _too_large(self.max_body)), b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"] == _DECIDE and len(body) > self.parse_above:
            problem = _decide_problem(self, body)
            if problem is not None:
                return self._refuse("input", problem), body
        return None, body

    def _rate(self, headers: list[tuple[bytes, bytes]]) -> float:
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
        service = getattr(self.app.state, "routing", None)
        tenant = None if service is None else service.tenant_for_key(key.strip())
        if tenant is None:
            return 0.0
        assert self.buckets is not None
        return self.buckets.take(tenant.id)

    def _refuse(self, reason: str, problem: Problem) -> Problem:
        self.refused.labels(reason).inc()
        return problem


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


def _decide_problem(limits: Limits, body: bytes) -> Problem | None:
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
