"""``POST /v1/chat/completions``: route an OpenAI chat completion and forward it.

Per request:

1. The tenant key (``Authorization: Bearer``, what the OpenAI SDKs send) is checked
   before the body is read; the body is checked as far as routing needs
   (:mod:`service.gateway.chat`).
2. ``model`` picks the route (:func:`resolve`): ``"auto"`` decides among every enabled
   model with an upstream with the tenant's preferences; ``"auto:<alias>"`` with the
   alias's weights and candidates (tenant setting); a registered model's name is that
   model, still logged as a decision (propensity 1).
3. The decision is made and logged as any decide (``decide_pending``: the last user
   message's text as the query, the ``x-router-tags`` header as tags), then the body is
   forwarded to the chosen model's upstream with ``model`` replaced by its upstream name.
4. The answer goes back as the upstream sent it, with ``model`` naming the registered
   model and the headers ``x-router-model`` and ``x-router-decision-id``; a stream is
   passed on event by event as it arrives.
5. The outcome is posted by the router (:mod:`service.gateway.feedback`): latency (for a
   stream, the time to its first chunk), the cost of the upstream's ``usage`` at the
   registry's prices, and, when the tenant set ``success_quality``, 0 for a failure
   (timeout, 5xx, 429, refused connection) and that quality for a success, provisional:
   learned after the tenant's ``quality_wait_seconds`` unless the client's own quality
   (``POST /v1/feedback``) replaces it (:mod:`service.quality_defaults`); without it no
   quality either way (:func:`_quality` says why). With ``fallback_attempts`` the next
   best of the remaining candidates is tried, each attempt its own decision.
6. Every call's success or failure also feeds the upstream's availability
   (:mod:`bandit.availability`): a model whose upstream is drawn down (Thompson sampling
   on its recent success rate) is left out of the candidates of ``"auto"`` decisions,
   so a model that keeps failing stops being chosen even when no quality is reported
   for the successes of the others.

A client that disconnects cancels the work at once (a task watches for the ASGI
``http.disconnect``), which closes the upstream request. Errors are OpenAI-style
(:mod:`service.gateway.errors`).

An ASGI endpoint (as ``POST /v1/decide``): no FastAPI request/response objects or
dependency solving on the path the overhead benchmark measures.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from bandit import Preferences
from bandit.base import MAX_COST_USD
from service.db import models as m
from service.deps import tenant_for_authorization
from service.gateway.chat import (
    TAGS_HEADER,
    ChatRequest,
    merged_tags,
    parse_chat,
    tags_of_header,
)
from service.gateway.errors import GatewayError, error_headers, from_exception, send_json
from service.gateway.settings import TenantGateway
from service.gateway.upstream import (
    CALL_ERRORS,
    CALLER_FAULTS,
    Target,
    UpstreamFailure,
    failure_of_exception,
    failure_of_status,
    target_of,
)
from service.quality_defaults import Recorded
from service.routes.decide import decide_pending
from service.routing import ModelState, RoutingService, TenantState

__all__ = ["ChatCompletionsEndpoint", "Route", "resolve", "PATH"]

log = logging.getLogger("service.gateway")

PATH = "/v1/chat/completions"
AUTO = "auto"
_TAGS = TAGS_HEADER.encode()
#: The end of a server-sent event: a blank line.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]


class Route(NamedTuple):
    candidates: list[str]
    override: Preferences | None
    #: A model named by the client: no fallback to another.
    fixed: bool


def resolve(name: str, service: RoutingService, settings: TenantGateway) -> Route:
    """The candidates and preferences ``model: name`` routes with (see module docstring)."""
    models = service.models
    routable = [n for n, s in models.items() if s.enabled and s.base_url]
    if name == AUTO or name.startswith(AUTO + ":"):
        override, candidates = None, routable
        if name != AUTO:
            alias = settings.aliases.get(name[len(AUTO) + 1:])
            if alias is None:
                known = ", ".join(f"auto:{a}" for a in settings.aliases) or "none"
                raise GatewayError(404, f"model {name!r}: no such alias for this tenant "
                                   f"(its aliases: {known}; PUT /v1/tenants/me/gateway "
                                   "defines them)", code="model_not_found", param="model")
            override = alias.weights
            if alias.candidates is not None:
                candidates = [n for n in alias.candidates if n in routable]
        if not candidates:
            raise GatewayError(503, "no enabled model has an upstream to route "
                               f"{name!r} to; an admin sets a model's base_url "
                               "(PATCH /v1/admin/models/{name})", code="no_upstream")
        return Route(candidates, override, False)
    state = models.get(name)
    if state is None:
        raise GatewayError(404, f"model {name!r} is not registered; use 'auto', an "
                           f"'auto:<alias>' or one of: {', '.join(routable) or '(none)'}",
                           code="model_not_found", param="model")
    if not (state.enabled and state.base_url):
        why = "is disabled" if not state.enabled else "has no upstream (base_url)"
        raise GatewayError(400, f"model: {name!r} {why}; allowed: 'auto' or one of: "
                           f"{', '.join(routable) or '(none)'}", code="model_not_routable",
                           param="model")
    return Route([name], None, True)


def _cost(model: ModelState, usage: Any) -> float | None:
    """The call's cost from the upstream's ``usage`` and the registry's prices."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (type(prompt) is int and type(completion) is int) or min(  # not bools
            prompt, completion) < 0:
        return None
    # bandit.pricing.request_cost's formula, without its checks (9 us a call): the
    # counts are checked above, the prices were when the model was registered.
    cost = round((model.input_price_per_mtok * prompt
                  + model.output_price_per_mtok * completion) / 1e6, 15)
    # As POST /v1/feedback refuses it: beyond what the statistics accept, unknown.
    return cost if cost <= MAX_COST_USD else None


@dataclass
class _Attempt:
    """What one forwarded call observed (read after it ends, even if cancelled)."""

    name: str
    decision_id: str
    headers: list[tuple[bytes, bytes]]
    started: float = 0.0
    latency_s: float | None = None  # to the whole answer, or a stream's first chunk
    usage: Any = None
    failed: bool = False
    succeeded: bool = False
    #: The failure's kind (its code), for the metrics.
    kind: str | None = None


def _quality(attempt: _Attempt, settings: TenantGateway) -> float | None:
    """The quality the router reports for a call: both sides or neither.

    A failure is quality 0 only when a success is reported too (``success_quality``
    set). Otherwise the learner would hear every failure and only the successes a client
    rates later, and a model that fails 2% of its calls would look worse than it is
    (its mean heard quality pulled towards 0 by the unrated successes it never hears
    of). Without ``success_quality`` a failure goes to the upstream's availability only
    (``UpstreamAvailability``), and the quality statistics hold what clients rate.
    """
    if attempt.succeeded:
        return settings.success_quality
    if attempt.failed and settings.success_quality is not None:
        return 0.0
    return None


def _default(tenant: TenantState, attempt: _Attempt, settings: TenantGateway,
             quality: float | None) -> Recorded | None:
    """What is recorded of the router's quality (:mod:`service.quality_defaults`): a
    success's is provisional (due after the tenant's wait), a failure's 0 final."""
    if quality is None:
        return None
    due = (m.utcnow() + timedelta(seconds=settings.quality_wait_seconds)
           if attempt.succeeded else None)
    return Recorded(tenant.id, attempt.decision_id, quality, due)


class _Exchange:
    """One request to the endpoint: the state it needs and whether the answer started."""

    def __init__(self, state: Any, tenant: TenantState, chat: ChatRequest,
                 tags: dict[str, str] | None, send: Send, started: float) -> None:
        self.state = state
        self.service: RoutingService = state.routing
        self.gateway = state.gateway
        self.tenant = tenant
        self.chat = chat
        self.tags = tags
        self.send = send
        self.started = started
        self.answering = False  # the response has started: no error status any more

    async def serve(self) -> None:
        settings: TenantGateway = self.gateway.settings.get(self.tenant.id)
        route = resolve(self.chat.model, self.service, settings)
        text = self.chat.text
        tried: list[str] = []
        failure: tuple[UpstreamFailure, list[tuple[bytes, bytes]]] | None = None
        for _ in range(1 if route.fixed else 1 + settings.fallback_attempts):
            candidates = [c for c in route.candidates if c not in tried]
            if not candidates:
                break
            if not route.fixed:
                # Upstreams drawn down (failing) are left out; all stay if all are.
                candidates = self.gateway.availability.admitted(candidates)
            pending = await decide_pending(self.state, self.tenant, text, None, self.tags,
                                           candidates, route.override, self.started)
            name, decision_id = pending.response["model"], pending.response["decision_id"]
            tried.append(name)
            attempt = _Attempt(name, decision_id, [(b"x-router-model", name.encode()),
                                                   (b"x-router-decision-id",
                                                    decision_id.encode())])
            try:
                await self._forward(attempt)
                return
            except UpstreamFailure as exc:
                attempt.failed, attempt.kind = True, exc.code
                failure = (exc, attempt.headers)
                log.info("decision %s: %s", decision_id, exc.message)
            finally:
                self._report(attempt, settings)
            if len(tried) < len(route.candidates) and len(tried) <= settings.fallback_attempts:
                self.gateway.metrics.fallbacks_of(name).inc()
        assert failure is not None
        exc, headers = failure
        await send_json(self.send, exc.status, exc.body(), [*headers, *error_headers(exc)])

    def _report(self, attempt: _Attempt, settings: TenantGateway) -> None:
        if attempt.latency_s is None and not attempt.failed:
            return  # never reached the upstream, or cancelled before the first byte
        metrics = self.gateway.metrics
        if attempt.failed or attempt.succeeded:
            self.gateway.availability.record(attempt.name, failed=attempt.failed)
        if attempt.failed:
            metrics.errors_of(attempt.name, attempt.kind or "upstream_error").inc()
        elif attempt.succeeded:
            metrics.latency_of(attempt.name).observe(time.perf_counter() - attempt.started)
            if self.chat.stream and attempt.latency_s is not None:
                metrics.ttft_of(attempt.name).observe(attempt.latency_s)
        model = self.service.models.get(attempt.name)
        cost = None
        if model is not None and attempt.usage is not None:
            try:
                cost = _cost(model, attempt.usage)
            except OverflowError:  # an absurd usage (10**400 tokens): the cost is unknown
                cost = None
        quality = _quality(attempt, settings)
        default = _default(self.tenant, attempt, settings, quality)
        latency_ms = None if attempt.latency_s is None else attempt.latency_s * 1e3
        self.gateway.feedback.report(
            self.tenant, attempt.decision_id,
            quality=None if attempt.succeeded else quality,  # a success's: its default
            cost_usd=cost, latency_ms=latency_ms, default=default)

    async def _forward(self, attempt: _Attempt) -> None:
        model = self.service.models.get(attempt.name)
        if model is None or not model.base_url:  # removed since the decision
            raise UpstreamFailure(502, f"model {attempt.name!r} has no upstream any more",
                                  code="upstream_error")
        target = target_of(model)
        body = dict(self.chat.body, model=target.model)
        if self.chat.stream and not self.chat.include_usage:
            # Asked for, to price the call; the usage chunk is not passed on.
            body["stream_options"] = {**(body.get("stream_options") or {}),
                                      "include_usage": True}
        attempt.started = time.perf_counter()
        try:
            response = await self.gateway.client.post(target.url, data=orjson.dumps(body),
                                                      headers=target.headers)
        except CALL_ERRORS as exc:
            raise self._failed(attempt, exc) from None
        ok = 200 <= response.status < 300
        answer = b""
        try:
            if not ok or not self.chat.stream:
                try:
                    content = await response.read()
                except CALL_ERRORS as exc:
                    raise self._failed(attempt, exc) from None
            if not ok:
                if response.status in CALLER_FAULTS:
                    # The request's fault, not the model's: passed on as it is, and no
                    # outcome is reported.
                    await send_json(self.send, response.status, content, attempt.headers)
                    return
                attempt.latency_s = time.perf_counter() - attempt.started
                raise failure_of_status(attempt.name, response.status, content,
                                        response.headers.get("retry-after"))
            if self.chat.stream:
                await self._stream(attempt, target, response)
            else:
                answer = self._plain(attempt, content)
        finally:
            response.release()  # back to the pool; closed if not read to the end
        # The last send after the upstream response is closed: once the answer is
        # complete, nothing is awaited that a disconnect could cancel.
        if self.chat.stream:
            await self.send({"type": "http.response.body", "body": b""})
        else:
            await send_json(self.send, 200, answer, attempt.headers)

    def _failed(self, attempt: _Attempt, exc: BaseException) -> UpstreamFailure:
        attempt.latency_s = time.perf_counter() - attempt.started
        return failure_of_exception(attempt.name, exc, self.gateway.timeout_s)

    @staticmethod
    def _plain(attempt: _Attempt, content: bytes) -> bytes:
        attempt.latency_s = time.perf_counter() - attempt.started
        try:
            data = orjson.loads(content)
            if not isinstance(data, dict):
                raise TypeError
        except (orjson.JSONDecodeError, TypeError):
            raise UpstreamFailure(502, f"the upstream of model {attempt.name!r} answered "
                                  "something that is not a chat completion",
                                  code="upstream_error") from None
        data["model"] = attempt.name
        attempt.usage = data.get("usage")
        attempt.succeeded = True
        return orjson.dumps(data)

    async def _stream(self, attempt: _Attempt, target: Target,
                      response: aiohttp.ClientResponse) -> None:
        """Pass the events on as they complete (what arrived together, sent together);
        an event's bytes unchanged unless ``model`` is renamed or the usage is taken."""
        send = self.send
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_SSE_HEADERS, *attempt.headers]})
        self.answering = True
        rename = target.model != attempt.name
        strip_usage = not self.chat.include_usage
        rest = b""
        try:
            async for data in response.content.iter_any():
                data = rest + data
                # Without a CR only "\n\n" ends an event: bytes.split, 4x the regex's pace.
                *events, rest = data.split(b"\n\n") if b"\r" not in data else \
                    _EVENT_END.split(data)
                out = b"".join([self._event(attempt, e, rename, strip_usage)
                                for e in events])
                if out:
                    await send({"type": "http.response.body", "body": out,
                                "more_body": True})
            if rest.strip():
                out = self._event(attempt, rest.strip(b"\r\n"), rename, strip_usage)
                if out:
                    await send({"type": "http.response.body", "body": out,
                                "more_body": True})
            attempt.succeeded = True
        except CALL_ERRORS as exc:
            # Mid-stream: the status is sent, so the error is an event (the OpenAI SDKs
            # raise on a chunk with "error"), and the outcome a failure.
            failure = failure_of_exception(attempt.name, exc, self.gateway.timeout_s)
            attempt.failed, attempt.kind = True, failure.code
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + failure.body() + b"\n\n"})

    @classmethod
    def _event(cls, attempt: _Attempt, event: bytes, rename: bool, strip_usage: bool
               ) -> bytes:
        """One server-sent event, to send (b"": dropped)."""
        if attempt.latency_s is None and b"data:" in event and b"[DONE]" not in event:
            attempt.latency_s = time.perf_counter() - attempt.started
        if rename or b'"usage"' in event:
            lines = []
            for line in event.splitlines():
                if line.startswith(b"data:"):
                    line, drop = cls._chunk(attempt, line, rename, strip_usage)
                    if drop:
                        return b""
                lines.append(line)
            event = b"\n".join(lines)
        return event + b"\n\n"

    @staticmethod
    def _chunk(attempt: _Attempt, line: bytes, rename: bool, strip_usage: bool
               ) -> tuple[bytes, bool]:
        """One ``data:`` line with ``model`` renamed and the usage taken (and removed
        when the client did not ask for it); True: drop the event (the usage chunk)."""
        payload = line[5:]
        if not payload.lstrip().startswith(b"{"):
            return line, False  # not an object ("[DONE]"): no failed parse to pay for
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return line, False
        if not isinstance(chunk, dict):
            return line, False
        if chunk.get("usage"):
            attempt.usage = chunk["usage"]
        if strip_usage and "usage" in chunk:
            if not chunk.get("choices"):
                return line, True
            del chunk["usage"]
        if rename:
            chunk["model"] = attempt.name
        return b"data: " + orjson.dumps(chunk), False


async def _until_disconnect(receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work``; cancel it as soon as the client disconnects (which closes its
    upstream request: ``_forward`` closes the response in ``finally``)."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await work()
    except asyncio.CancelledError:
        if not disconnected:
            raise
        task.uncancel()  # our own cancellation: the request simply ends
    finally:
        watcher.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class ChatCompletionsEndpoint:
    """The route's ASGI app (see the module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state = scope["app"].state
        authorization = tags = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == _TAGS:
                tags = value.decode("latin-1")
        exchange: _Exchange | None = None
        try:
            tenant = tenant_for_authorization(authorization, state.routing)
            raw = await _read_body(receive)
            if raw is None:
                return  # the caller is gone: nothing decided
            chat = parse_chat(raw)
            exchange = _Exchange(state, tenant, chat, merged_tags(chat, tags_of_header(tags)),
                                 send, started)
            await _until_disconnect(receive, exchange.serve)
        except Exception as exc:
            err = from_exception(exc)
            if err is None or (exchange is not None and exchange.answering):
                raise
            await send_json(send, err.status, err.body(), error_headers(err))
