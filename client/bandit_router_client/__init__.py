"""A typed Python client of the bandit-router HTTP API (sync and async, on httpx).

:class:`RouterClient` and :class:`AsyncRouterClient` have the same methods; the async
one returns coroutines. Every error the service answers (RFC 9457 problem details) is
raised as one exception type, :class:`RouterError`, carrying ``status``, ``type``,
``title``, ``detail`` and ``errors``.

Retries: 429 and 503 are retried with exponential backoff and full jitter, at most
``max_attempts`` attempts in all. A ``Retry-After`` header is honoured (the wait is at
least what the server asked); one longer than ``max_retry_wait_s`` is not waited for and
the error is raised at once (a spent daily budget answers ``Retry-After: 3600``: the
caller should hear it now, not in an hour). A connection that could not be opened is
retried too (nothing reached the server); a timeout after the request was sent is
retried only for requests that are safe to repeat (GET, PUT, and feedback with an
``event_id``, which the service applies exactly once).

Examples
--------
Route one request end to end (``call_llm`` is yours; it returns the text and the cost)::

    from bandit_router_client import RouterClient

    def call_llm(model: str) -> dict:
        reply = my_gateway.complete(model=model, prompt=prompt)
        return {"output": reply.text, "cost_usd": reply.cost_usd}

    with RouterClient("http://127.0.0.1:8000", api_key="brt_...") as router:
        routed = router.route(prompt, call_llm)       # decide, call, time it, feedback
        print(routed.model, routed.output, routed.latency_ms)
        routed.send_quality(0.9)                      # later: the user's thumbs-up

The retry wait (no randomness with ``jitter=False``):

>>> policy = RetryPolicy(backoff_s=0.5, jitter=False)
>>> [policy.wait(attempt, None) for attempt in (1, 2, 3)]
[0.5, 1.0, 2.0]
>>> policy.wait(1, "4")   # Retry-After: 4 seconds
4.0
>>> policy.wait(1, "3600") is None   # longer than max_retry_wait_s: give up now
True
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import math
import random
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

__all__ = [
    "RouterError", "RetryPolicy", "Prediction", "DecideResult", "FeedbackResult", "Weights",
    "TenantPreferences", "Usage", "Model", "Tenant", "TenantCreated", "RouteResult",
    "AsyncRouteResult", "RouterClient", "AsyncRouterClient", "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 10.0
_RETRY_STATUSES = frozenset({429, 503})
T = TypeVar("T")


# ===================================================================== errors
class RouterError(Exception):
    """An error answered by the service (problem details) or a transport failure.

    ``status`` is the HTTP status (0 for a transport failure: no answer at all);
    ``type``, ``title``, ``detail`` and ``errors`` (``[{field, message, allowed}]``) are
    the problem-details members; ``retry_after`` the server's ``Retry-After`` in seconds.
    """

    def __init__(self, status: int, detail: str, *, type: str = "about:blank",  # noqa: A002
                 title: str = "", errors: list[dict[str, Any]] | None = None,
                 retry_after: float | None = None, attempts: int = 1) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after
        self.attempts = attempts

    @property
    def fields(self) -> list[str]:
        """The names of the fields the service complained about."""
        return [str(e.get("field")) for e in self.errors]

    @classmethod
    def from_response(cls, response: httpx.Response, attempts: int = 1) -> RouterError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"detail": response.text[:500] or response.reason_phrase}
        return cls(response.status_code, str(body.get("detail", "")),
                   type=str(body.get("type", "about:blank")),
                   title=str(body.get("title", response.reason_phrase)),
                   errors=body.get("errors") or [],
                   retry_after=_retry_after_seconds(response.headers.get("retry-after")),
                   attempts=attempts)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """How 429/503 answers and connection failures are retried.

    ``max_attempts`` counts the first try. The n-th retry waits a uniform random time in
    ``[0, min(max_backoff_s, backoff_s * 2**(n-1))]`` (full jitter: many clients backing
    off from the same overload do not come back in step), and never less than the
    server's ``Retry-After``.
    """

    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_retry_wait_s: float = 30.0
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1 (got {self.max_attempts})")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_wait_s < 0:
            raise ValueError("backoff_s, max_backoff_s, max_retry_wait_s: must be >= 0")

    def wait(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retry number ``attempt`` (1-based); None: do not retry."""
        server = _retry_after_seconds(retry_after)
        if server is not None and server > self.max_retry_wait_s:
            return None
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0 ** (attempt - 1))
        backoff = self.rng.uniform(0.0, ceiling) if self.jitter else ceiling
        return max(backoff, server or 0.0)


# ===================================================================== results
@dataclass(frozen=True)
class Prediction:
    quality: float
    cost_usd: float
    latency_ms: float
    utility: float
    uncertainty: float
    score: float | None
    # The request's cost from the registry's prices before the call (None: an older
    # service that did not send it).
    price_usd: float | None = None


@dataclass(frozen=True)
class DecideResult:
    """The answer of ``POST /v1/decide``: call ``model``, then report with ``decision_id``.

    Named ``Decision`` before 0.1.1 (that name still works, with a DeprecationWarning).
    """

    decision_id: str
    model: str
    propensity: float
    explored: bool
    predictions: dict[str, Prediction]
    policy: str
    policy_version: int
    scope: str
    budget_limited: bool = False

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> DecideResult:
        return cls(decision_id=body["decision_id"], model=body["model"],
                   propensity=float(body["propensity"]), explored=bool(body["explored"]),
                   predictions={k: Prediction(**v) for k, v in body["predictions"].items()},
                   policy=body["policy"], policy_version=int(body["policy_version"]),
                   scope=body["scope"], budget_limited=bool(body.get("budget_limited")))


@dataclass(frozen=True)
class FeedbackResult:
    """``applied`` (learned now), ``duplicate`` (seen before), ``buffered`` (the
    service's database is unreachable: kept on the service's disk and applied when it is
    back; do not resend) or ``queued`` (distributed mode: on the Kafka topic, the
    learners apply it)."""

    status: str
    decision_id: str
    event_id: str | None


@dataclass(frozen=True)
class Weights:
    quality: float = 1.0
    cost: float = 0.0
    latency: float = 0.0


@dataclass(frozen=True)
class TenantPreferences:
    weights: Weights
    policy: str
    scope: str
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_budget_exhausted: str
    baseline_model: str | None = None
    max_exploration_loss: float = 0.02

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> TenantPreferences:
        return cls(weights=Weights(**body["weights"]), policy=body["policy"],
                   scope=body["scope"], budget_usd_per_day=body["budget_usd_per_day"],
                   budget_usd_per_month=body["budget_usd_per_month"],
                   on_budget_exhausted=body["on_budget_exhausted"],
                   baseline_model=body.get("baseline_model"),
                   max_exploration_loss=body.get("max_exploration_loss", 0.02))


@dataclass(frozen=True)
class Usage:
    tenant_id: str
    spend_usd_today: float
    spend_usd_month: float
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    decisions_today: int
    decisions_month: int
    model_share_month: dict[str, float]


@dataclass(frozen=True)
class Model:
    name: str
    input_price_per_mtok: float
    output_price_per_mtok: float
    enabled: bool
    prior_quality: float | None
    prior_cost_usd: float
    deleted: bool = False
    #: Where the router's POST /v1/chat/completions forwards this model's requests, and
    #: the NAME of the environment variable (of the router) holding the upstream's key.
    base_url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None


@dataclass(frozen=True)
class TenantCreated:
    """A new tenant; ``api_key`` is shown in this answer only."""

    id: str
    name: str
    api_key: str


@dataclass(frozen=True)
class Tenant:
    """A tenant as the admin sees it (no key: only its digest is stored)."""

    id: str
    name: str
    policy: str
    scope: str
    weights: Weights
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_budget_exhausted: str
    spend_usd_today: float
    spend_usd_month: float
    created_at: str
    baseline_model: str | None = None
    max_exploration_loss: float = 0.02

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Tenant:
        values = dict(body)
        values["weights"] = Weights(**body["weights"])
        return cls(**values)


def _cost_of(result: Any) -> float | None:
    """The ``route()`` protocol: the cost is ``result["cost_usd"]`` (a mapping) or
    ``result.cost_usd`` (an object); absent or None means "not known"."""
    if isinstance(result, Mapping):
        value = result.get("cost_usd")
    else:
        value = getattr(result, "cost_usd", None)
    return None if value is None else float(value)


def _output_of(result: Any) -> Any:
    if isinstance(result, Mapping) and "output" in result:
        return result["output"]
    return getattr(result, "output", result)


@dataclass
class _Routed:
    """What both clients' ``route()`` answer: the decision, the function's output and
    what was measured."""

    decision: DecideResult
    result: Any
    latency_ms: float
    cost_usd: float | None
    feedback: FeedbackResult | None

    @property
    def model(self) -> str:
        return self.decision.model

    @property
    def output(self) -> Any:
        """``result["output"]`` / ``result.output`` when present, else the result itself."""
        return _output_of(self.result)

    @staticmethod
    def _quality_event(event_id: str | None) -> str:
        return event_id or f"quality-{uuid.uuid4()}"


@dataclass
class RouteResult(_Routed):
    """What ``route()`` did: the decision, the function's output, what was measured, and
    a handle to report the quality later (:meth:`send_quality`)."""

    _client: RouterClient = field(repr=False)

    def send_quality(self, quality: float, *, event_id: str | None = None) -> FeedbackResult:
        """Report the quality (0..1) once it is known, as a separate feedback event."""
        return self._client.feedback(self.decision.decision_id, quality=quality,
                                     event_id=self._quality_event(event_id))


@dataclass
class AsyncRouteResult(_Routed):
    """:class:`RouteResult` of :class:`AsyncRouterClient` (``send_quality`` is awaited)."""

    _client: AsyncRouterClient = field(repr=False)

    async def send_quality(self, quality: float, *,
                           event_id: str | None = None) -> FeedbackResult:
        return await self._client.feedback(self.decision.decision_id, quality=quality,
                                           event_id=self._quality_event(event_id))


# ===================================================================== requests
@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call: the request, whether it may be repeated, and how to parse it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, Any] | None = None
    key: str | None = None  # overrides the client's key (admin calls with an admin key)
    idempotent: bool = False


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _weights(value: Weights | Mapping[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, Weights):
        return {"quality": value.quality, "cost": value.cost, "latency": value.latency}
    return dict(value)


class _Api:
    """Builds every call once for both clients: the sync and async classes differ only
    in how they send a :class:`_Call` (and sleep between retries)."""

    def __init__(self, admin_key: str | None) -> None:
        self.admin_key = admin_key

    def _admin(self) -> str | None:
        return self.admin_key

    # --------------------------------------------------------- tenant endpoints
    def decide(self, query: str | None = None, *, embedding: list[float] | None = None,
               candidates: list[str] | None = None,
               preferences: Weights | Mapping[str, float] | None = None,
               tags: Mapping[str, str] | None = None) -> _Call[DecideResult]:
        if (query is None) == (embedding is None):
            raise ValueError("give exactly one of query (text) or embedding")
        q = {"text": query} if query is not None else {"embedding": list(embedding or [])}
        body = _drop_none({"query": q, "candidates": candidates,
                           "preferences": _weights(preferences),
                           "tags": None if tags is None else dict(tags)})
        return _Call("POST", "/v1/decide", lambda r: DecideResult.from_json(r.json()), json=body)

    def feedback(self, decision_id: str, *, quality: float | None = None,
                 cost_usd: float | None = None, latency_ms: float | None = None,
                 event_id: str | None = None,
                 default_quality: float | None = None,
                 failed: bool = False) -> _Call[FeedbackResult]:
        body = _drop_none({"decision_id": decision_id, "quality": quality,
                           "cost_usd": cost_usd, "latency_ms": latency_ms,
                           "event_id": event_id, "default_quality": default_quality,
                           "failed": failed or None})
        return _Call("POST", "/v1/feedback", lambda r: FeedbackResult(
            r.json()["status"], r.json()["decision_id"], r.json().get("event_id")),
            json=body, idempotent=event_id is not None)

    def decision(self, decision_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/decisions/{decision_id}", lambda r: r.json(),
                     idempotent=True)

    def get_preferences(self, tenant_id: str | None = None) -> _Call[TenantPreferences]:
        path, key = self._tenant_path(tenant_id, "preferences")
        return _Call("GET", path, lambda r: TenantPreferences.from_json(r.json()), key=key,
                     idempotent=True)

    def put_preferences(self, tenant_id: str | None = None, *,
                        weights: Weights | Mapping[str, float] | None = None,
                        **changes: Any) -> _Call[TenantPreferences]:
        """``changes``: policy, scope, budget_usd_per_day, budget_usd_per_month,
        on_budget_exhausted, baseline_model, max_exploration_loss; an explicit None
        budget clears it, an explicit None baseline_model turns the guard off."""
        allowed = {"policy", "scope", "budget_usd_per_day", "budget_usd_per_month",
                   "on_budget_exhausted", "baseline_model", "max_exploration_loss"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown preference field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}")
        body: dict[str, Any] = dict(changes)
        if weights is not None:
            body["weights"] = _weights(weights)
        path, key = self._tenant_path(tenant_id, "preferences")
        return _Call("PUT", path, lambda r: TenantPreferences.from_json(r.json()), json=body,
                     key=key, idempotent=True)

    def usage(self, tenant_id: str | None = None) -> _Call[Usage]:
        path, key = self._tenant_path(tenant_id, "usage")
        return _Call("GET", path, lambda r: Usage(**r.json()), key=key, idempotent=True)

    def _tenant_path(self, tenant_id: str | None, leaf: str) -> tuple[str, str | None]:
        # A tenant reads its own (tenant key); the admin names the tenant (admin key).
        if tenant_id is None:
            return f"/v1/tenants/me/{leaf}", None
        return f"/v1/admin/tenants/{quote(tenant_id, safe='')}/{leaf}", self._admin()

    # ---------------------------------------------------------- admin endpoints
    def create_tenant(self, name: str) -> _Call[TenantCreated]:
        return _Call("POST", "/v1/admin/tenants", lambda r: TenantCreated(**r.json()),
                     json={"name": name}, key=self._admin())

    def list_tenants(self) -> _Call[list[Tenant]]:
        return _Call("GET", "/v1/admin/tenants",
                     lambda r: [Tenant.from_json(t) for t in r.json()], key=self._admin(),
                     idempotent=True)

    def rotate_tenant_key(self, tenant_id: str) -> _Call[TenantCreated]:
        return _Call("POST", f"/v1/admin/tenants/{quote(tenant_id, safe='')}/rotate-key",
                     lambda r: TenantCreated(**r.json()), key=self._admin())

    def add_model(self, name: str, input_price_per_mtok: float, output_price_per_mtok: float,
                  *, enabled: bool = True, prior_quality: float | None = None,
                  base_url: str | None = None, upstream_model: str | None = None,
                  api_key_env: str | None = None) -> _Call[Model]:
        body = _drop_none({"name": name, "input_price_per_mtok": input_price_per_mtok,
                           "output_price_per_mtok": output_price_per_mtok,
                           "enabled": enabled, "prior_quality": prior_quality,
                           "base_url": base_url, "upstream_model": upstream_model,
                           "api_key_env": api_key_env})
        return _Call("POST", "/v1/admin/models", lambda r: Model(**r.json()), json=body,
                     key=self._admin())

    def list_models(self, include_deleted: bool = False) -> _Call[list[Model]]:
        return _Call("GET", "/v1/admin/models", lambda r: [Model(**m) for m in r.json()],
                     params={"include_deleted": str(include_deleted).lower()},
                     key=self._admin(), idempotent=True)

    def update_model(self, name: str, **changes: Any) -> _Call[Model]:
        """``changes``: input_price_per_mtok, output_price_per_mtok, enabled, prior_quality."""
        return _Call("PATCH", f"/v1/admin/models/{quote(name, safe='')}",
                     lambda r: Model(**r.json()), json=changes, key=self._admin(),
                     idempotent=True)

    def delete_model(self, name: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/admin/models/{quote(name, safe='')}", lambda r: None,
                     key=self._admin(), idempotent=True)


class _Base:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None,
                 timeout: float | httpx.Timeout, retry: RetryPolicy | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._api = _Api(admin_key if admin_key is not None else api_key)

    def _headers(self, call: _Call[Any], request_id: str | None) -> dict[str, str]:
        key = call.key if call.key is not None else self.api_key
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _plan(self, call: _Call[Any], attempt: int, response: httpx.Response | None,
              exc: Exception | None) -> float | None:
        """Seconds to wait before the next attempt, or None to stop here."""
        if attempt >= self.retry.max_attempts:
            return None
        if exc is not None:
            # A connection never opened reached nobody: always safe to repeat.
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or call.idempotent:
                return self.retry.wait(attempt, None)
            return None
        assert response is not None
        if response.status_code in _RETRY_STATUSES:
            return self.retry.wait(attempt, response.headers.get("retry-after"))
        return None

    @staticmethod
    def _finish(call: _Call[T], response: httpx.Response, attempts: int) -> T:
        if response.status_code >= 400:
            raise RouterError.from_response(response, attempts)
        return call.parse(response)

    @staticmethod
    def _transport_error(exc: Exception, attempts: int) -> RouterError:
        return RouterError(0, f"{type(exc).__name__}: {exc}", title="transport error",
                           attempts=attempts)


# ===================================================================== sync client
class RouterClient(_Base):
    """Synchronous client. One instance per process is enough (it pools connections).

    Parameters
    ----------
    base_url : str
        The service, e.g. ``http://127.0.0.1:8000``.
    api_key : str, optional
        A tenant key (decide, feedback, the tenant's own preferences and usage) or the
        admin key (admin calls).
    admin_key : str, optional
        The admin key, when the same client also makes admin calls with a tenant key.
    timeout : float or httpx.Timeout
        Per request (connect, read, write, pool), seconds.
    retry : RetryPolicy, optional
    transport : httpx.BaseTransport, optional
        For tests or special networking (an ASGI app, a proxy).
    """

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 admin_key: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(base_url, api_key, admin_key, timeout, retry)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._sleep = sleep

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T], request_id: str | None = None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(call.method, call.path, json=call.json,
                                              params=call.params,
                                              headers=self._headers(call, request_id))
            except httpx.TransportError as exc:
                wait = self._plan(call, attempt, None, exc)
                if wait is None:
                    raise self._transport_error(exc, attempt) from exc
            else:
                wait = self._plan(call, attempt, response, None)
                if wait is None:
                    return self._finish(call, response, attempt)
            self._sleep(wait)

    # --------------------------------------------------------------- routing
    def decide(self, query: str | None = None, *, embedding: list[float] | None = None,
               candidates: list[str] | None = None,
               preferences: Weights | Mapping[str, float] | None = None,
               request_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> DecideResult:
        """Which model to call for this query (text, or an embedding of the service's
        ``dim``); ``candidates`` restricts the choice, ``preferences`` overrides the
        tenant's weights for this decision, ``tags`` (e.g. ``{"app": "support-bot"}``)
        say where the request comes from and join the context."""
        return self._send(self._api.decide(query, embedding=embedding, candidates=candidates,
                                           preferences=preferences, tags=tags), request_id)

    def feedback(self, decision_id: str, *, quality: float | None = None,
                 cost_usd: float | None = None, latency_ms: float | None = None,
                 event_id: str | None = None,
                 default_quality: float | None = None,
                 failed: bool = False) -> FeedbackResult:
        """Report an outcome (any of quality 0..1, cost in USD, latency in ms). With an
        ``event_id`` a repeat is a no-op (``duplicate``) and the call is retried safely.
        ``default_quality`` (a gateway's, instead of ``quality``) is learned after the
        tenant's ``quality_wait_seconds`` unless a quality replaces it. ``failed`` (a
        gateway's, with ``quality``): the call failed; its quality is final (a later
        quality for the decision is refused with 409)."""
        return self._send(self._api.feedback(decision_id, quality=quality, cost_usd=cost_usd,
                                             latency_ms=latency_ms, event_id=event_id,
                                             default_quality=default_quality, failed=failed))

    def decision(self, decision_id: str) -> dict[str, Any]:
        """One of the tenant's decisions with its feedback (raw JSON)."""
        return self._send(self._api.decision(decision_id))

    def admin_request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None) -> Any:
        """An operator endpoint that has no method here (admin keys, reservations, learned
        state: docs/api.md), with the admin key: its JSON answer (None when empty).
        GET and DELETE are retried as idempotent."""
        return self._send(_Call(method, path, lambda r: r.json() if r.content else None,
                                json=json, params=params, key=self._api._admin(),
                                idempotent=method in ("GET", "DELETE")))

    def route(self, query: str | None, call_llm: Callable[[str], Any], *,
              embedding: list[float] | None = None, candidates: list[str] | None = None,
              preferences: Weights | Mapping[str, float] | None = None,
              quality: Callable[[Any], float | None] | None = None) -> RouteResult:
        """Decide, call ``call_llm(model)``, time it, and post the feedback.

        The protocol of ``call_llm``: it takes the model name and returns anything; when
        that is a mapping with a ``"cost_usd"`` key or an object with a ``cost_usd``
        attribute, that cost (USD) is reported. ``quality(result)`` (optional) gives a
        score in 0..1 now; otherwise report it later with
        :meth:`RouteResult.send_quality`. The latency is measured here, around the call.

        If ``call_llm`` raises, nothing is reported and the exception propagates: a
        failed call says nothing about the model's quality that the caller would not
        rather decide itself (it can call :meth:`feedback` with ``quality=0``).
        """
        decision = self.decide(query, embedding=embedding, candidates=candidates,
                               preferences=preferences)
        started = time.perf_counter()
        result = call_llm(decision.model)
        latency_ms = (time.perf_counter() - started) * 1000.0
        cost = _cost_of(result)
        score = quality(result) if quality is not None else None
        fb = self.feedback(decision.decision_id, quality=score, cost_usd=cost,
                           latency_ms=latency_ms, event_id=f"route-{uuid.uuid4()}")
        return RouteResult(decision, result, latency_ms, cost, fb, self)

    # --------------------------------------------------- tenant's own settings
    def get_preferences(self, tenant_id: str | None = None) -> TenantPreferences:
        """The calling tenant's preferences, or (admin key) those of ``tenant_id``."""
        return self._send(self._api.get_preferences(tenant_id))

    def put_preferences(self, tenant_id: str | None = None, *,
                        weights: Weights | Mapping[str, float] | None = None,
                        **changes: Any) -> TenantPreferences:
        """Change only the fields given; an explicit ``None`` budget clears it."""
        return self._send(self._api.put_preferences(tenant_id, weights=weights, **changes))

    def usage(self, tenant_id: str | None = None) -> Usage:
        return self._send(self._api.usage(tenant_id))

    # ------------------------------------------------------------------ admin
    def create_tenant(self, name: str) -> TenantCreated:
        return self._send(self._api.create_tenant(name))

    def list_tenants(self) -> list[Tenant]:
        return self._send(self._api.list_tenants())

    def rotate_tenant_key(self, tenant_id: str) -> TenantCreated:
        """A new key for the tenant; the old one stops working at once on this replica."""
        return self._send(self._api.rotate_tenant_key(tenant_id))

    def add_model(self, name: str, input_price_per_mtok: float, output_price_per_mtok: float,
                  *, enabled: bool = True, prior_quality: float | None = None,
                  **upstream: str | None) -> Model:
        """Register a model; ``upstream``: ``base_url``, ``upstream_model``, ``api_key_env``
        (where the router's ``POST /v1/chat/completions`` forwards it)."""
        return self._send(self._api.add_model(name, input_price_per_mtok,
                                              output_price_per_mtok, enabled=enabled,
                                              prior_quality=prior_quality, **upstream))

    def list_models(self, include_deleted: bool = False) -> list[Model]:
        return self._send(self._api.list_models(include_deleted))

    def update_model(self, name: str, **changes: Any) -> Model:
        return self._send(self._api.update_model(name, **changes))

    def delete_model(self, name: str) -> None:
        self._send(self._api.delete_model(name))


# ==================================================================== async client
class AsyncRouterClient(_Base):
    """Asynchronous twin of :class:`RouterClient` (same parameters, awaited methods);
    ``route()`` accepts a plain or an ``async`` ``call_llm``."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 admin_key: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(base_url, api_key, admin_key, timeout, retry)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       transport=transport)
        self._sleep = sleep

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T], request_id: str | None = None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(call.method, call.path, json=call.json,
                                                    params=call.params,
                                                    headers=self._headers(call, request_id))
            except httpx.TransportError as exc:
                wait = self._plan(call, attempt, None, exc)
                if wait is None:
                    raise self._transport_error(exc, attempt) from exc
            else:
                wait = self._plan(call, attempt, response, None)
                if wait is None:
                    return self._finish(call, response, attempt)
            await self._sleep(wait)

    async def decide(self, query: str | None = None, *, embedding: list[float] | None = None,
                     candidates: list[str] | None = None,
                     preferences: Weights | Mapping[str, float] | None = None,
                     request_id: str | None = None,
                     tags: Mapping[str, str] | None = None) -> DecideResult:
        return await self._send(self._api.decide(query, embedding=embedding,
                                                 candidates=candidates,
                                                 preferences=preferences, tags=tags),
                                request_id)

    async def feedback(self, decision_id: str, *, quality: float | None = None,
                       cost_usd: float | None = None, latency_ms: float | None = None,
                       event_id: str | None = None,
                       default_quality: float | None = None,
                       failed: bool = False) -> FeedbackResult:
        return await self._send(self._api.feedback(decision_id, quality=quality,
                                                   cost_usd=cost_usd, latency_ms=latency_ms,
                                                   event_id=event_id,
                                                   default_quality=default_quality,
                                                   failed=failed))

    async def decision(self, decision_id: str) -> dict[str, Any]:
        return await self._send(self._api.decision(decision_id))

    async def route(self, query: str | None, call_llm: Callable[[str], Any], *,
                    embedding: list[float] | None = None, candidates: list[str] | None = None,
                    preferences: Weights | Mapping[str, float] | None = None,
                    quality: Callable[[Any], float | None] | None = None) -> AsyncRouteResult:
        """As :meth:`RouterClient.route`; ``call_llm`` may be ``async``."""
        decision = await self.decide(query, embedding=embedding, candidates=candidates,
                                     preferences=preferences)
        started = time.perf_counter()
        result = call_llm(decision.model)
        if inspect.isawaitable(result):
            result = await result
        latency_ms = (time.perf_counter() - started) * 1000.0
        cost = _cost_of(result)
        score = quality(result) if quality is not None else None
        fb = await self.feedback(decision.decision_id, quality=score, cost_usd=cost,
                                 latency_ms=latency_ms, event_id=f"route-{uuid.uuid4()}")
        return AsyncRouteResult(decision, result, latency_ms, cost, fb, self)

    async def get_preferences(self, tenant_id: str | None = None) -> TenantPreferences:
        return await self._send(self._api.get_preferences(tenant_id))

    async def put_preferences(self, tenant_id: str | None = None, *,
                              weights: Weights | Mapping[str, float] | None = None,
                              **changes: Any) -> TenantPreferences:
        return await self._send(self._api.put_preferences(tenant_id, weights=weights,
                                                          **changes))

    async def usage(self, tenant_id: str | None = None) -> Usage:
        return await self._send(self._api.usage(tenant_id))

    async def create_tenant(self, name: str) -> TenantCreated:
        return await self._send(self._api.create_tenant(name))

    async def list_tenants(self) -> list[Tenant]:
        return await self._send(self._api.list_tenants())

    async def rotate_tenant_key(self, tenant_id: str) -> TenantCreated:
        return await self._send(self._api.rotate_tenant_key(tenant_id))

    async def add_model(self, name: str, input_price_per_mtok: float,
                        output_price_per_mtok: float, *, enabled: bool = True,
                        prior_quality: float | None = None,
                        **upstream: str | None) -> Model:
        return await self._send(self._api.add_model(name, input_price_per_mtok,
                                                    output_price_per_mtok, enabled=enabled,
                                                    prior_quality=prior_quality, **upstream))

    async def list_models(self, include_deleted: bool = False) -> list[Model]:
        return await self._send(self._api.list_models(include_deleted))

    async def update_model(self, name: str, **changes: Any) -> Model:
        return await self._send(self._api.update_model(name, **changes))

    async def delete_model(self, name: str) -> None:
        await self._send(self._api.delete_model(name))


def __getattr__(name: str) -> Any:
    """The deprecated names (module attributes looked up lazily, PEP 562)."""
    if name == "Decision":
        warnings.warn("bandit_router_client.Decision is now DecideResult (one class named "
                      "Decision is the learning library's); the old name will go",
                      DeprecationWarning, stacklevel=2)
        return DecideResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
