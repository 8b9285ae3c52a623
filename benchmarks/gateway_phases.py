"""Where the time of one ``POST /v1/chat/completions`` goes inside the router.

Imported by the router process that ``python -m benchmarks.gateway_overhead --phases``
starts (never by the service): it wraps the functions of each phase of a request with a
timer, in this benchmark's process only, and writes what it measured to the JSON file
named by ``GATEWAY_PHASES_OUT`` on ``SIGUSR1`` (the benchmark sends it after a phase of
load; the timings of earlier signals are cleared, so each dump covers one load phase).

For each phase: the wall time (p50 / p99 / mean) and the CPU time of the thread that ran
it (``time.thread_time``). For a synchronous phase the two differ only by waiting for a
core or for the GIL (the background threads that store decisions and outcomes hold it
while they run Python code); for an asynchronous one the CPU time also counts whatever
else the event loop ran meanwhile, so only its wall time is read.

Phases (the module docstring of ``service.gateway.endpoint`` numbers the steps):

* ``asgi``: the whole app call (uvicorn's parse excluded), middleware included;
* ``endpoint``: the route's own call (key check, body, decide, forward, answer);
* ``parse``: the body checked as far as routing needs (``parse_chat``);
* ``decide``: context, decision, queued for the writer (``decide_pending``), of which
  ``context`` (featurizing the text) and ``policy`` (the batch's ``decide_many``);
* ``upstream_headers``: the forwarded request sent until the upstream's status line and
  headers (connection from the pool, send, the upstream's own time, first byte);
* ``upstream_body``: the rest of a plain answer read;
* ``answer``: the answer written to the client (plain), ``report``: the outcome queued;
* ``bg_outcomes`` / ``bg_decisions`` (background threads, per batch): the outcomes and
  the decisions stored.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp.client
import aiohttp.client_reqrep

import service.gateway.endpoint as endpoint
import service.gateway.feedback as feedback
import service.routing as routing
import service.writer as writer

__all__ = ["wrap_app"]

_WALL: dict[str, list[float]] = collections.defaultdict(list)
_CPU: dict[str, list[float]] = collections.defaultdict(list)


def _record(name: str, wall: float, cpu: float) -> None:
    _WALL[name].append(wall)
    _CPU[name].append(cpu)


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def sync(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(name, time.perf_counter() - wall, time.thread_time() - cpu)

    @functools.wraps(fn)
    async def asynchronous(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return await fn(*args, **kwargs)
        finally:
            _record(name, time.perf_counter() - wall, time.thread_time() - cpu)

    return asynchronous if inspect.iscoroutinefunction(fn) else sync


class wrap_app:  # noqa: N801 - used as the function it replaces
    """``app`` with its whole call timed (``asgi``); a class, so that uvicorn sees an
    ASGI 3 app (not a factory)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                _record("asgi", time.perf_counter() - wall, time.thread_time() - cpu)


def _summary() -> dict[str, dict[str, float]]:
    out = {}
    for name, walls in _WALL.items():
        w, c = sorted(walls), sorted(_CPU[name])
        n = len(w)
        out[name] = {"n": n, "wall_p50_ms": 1e3 * w[n // 2],
                     "wall_p99_ms": 1e3 * w[min(n - 1, int(n * 0.99))],
                     "wall_mean_ms": 1e3 * sum(w) / n, "cpu_p50_ms": 1e3 * c[n // 2],
                     "cpu_mean_ms": 1e3 * sum(c) / n}
    return out


def _dump(*_: Any) -> None:
    summary = _summary()
    _WALL.clear()
    _CPU.clear()
    path = os.environ["GATEWAY_PHASES_OUT"]
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(path + ".tmp", path)


endpoint.ChatCompletionsEndpoint.__call__ = _timed(  # type: ignore[method-assign]
    "endpoint", endpoint.ChatCompletionsEndpoint.__call__)
endpoint.parse_chat = _timed("parse", endpoint.parse_chat)
endpoint.decide_pending = _timed("decide", endpoint.decide_pending)
endpoint.send_json = _timed("answer", endpoint.send_json)
endpoint._Exchange._report = _timed("report", endpoint._Exchange._report)  # type: ignore[method-assign]  # noqa: SLF001
routing.RoutingService.context_from = _timed(  # type: ignore[method-assign]
    "context", routing.RoutingService.context_from)
routing.RoutingService.decide_many = _timed(  # type: ignore[method-assign]
    "policy", routing.RoutingService.decide_many)
aiohttp.client.ClientSession._request = _timed(  # type: ignore[method-assign]  # noqa: SLF001
    "upstream_headers", aiohttp.client.ClientSession._request)  # noqa: SLF001
aiohttp.client_reqrep.ClientResponse.read = _timed(  # type: ignore[method-assign]
    "upstream_body", aiohttp.client_reqrep.ClientResponse.read)
feedback.FeedbackSender._post = _timed("bg_outcomes", feedback.FeedbackSender._post)  # type: ignore[method-assign]  # noqa: SLF001
writer.DecisionWriter._write_batch = _timed(  # type: ignore[method-assign]
    "bg_decisions", writer.DecisionWriter._write_batch)  # noqa: SLF001
signal.signal(signal.SIGUSR1, _dump)
