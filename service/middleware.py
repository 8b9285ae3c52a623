"""The app's one middleware: what every HTTP request passes through before its route.

One pure ASGI middleware (:class:`ServiceMiddleware`, added with ``app.add_middleware``)
runs the steps in this order, each written where its subject lives:

1. the request id and the access log line (:mod:`service.observability`);
2. the limits: concurrency, rate, body size, decide's text and candidates
   (:mod:`service.limits`);
3. the key before the body (:func:`service.deps.authentication_problem`): a ``/v1/``
   request without a valid key of the right kind is answered 401 / 403 before its body
   is read;
4. the route; an exception it lets through (none of the app's exception handlers took
   it) is answered with the 500 problem here, before Starlette's
   ``ServerErrorMiddleware``: that one answers and then re-raises, and uvicorn closes the
   connection of any request whose app raised, so a gateway's pooled keep-alive
   connection would be lost on every 500.

Why one and not four: each ASGI middleware wraps ``send`` (and often ``receive``) in a
closure and adds a coroutine frame to every message of every request; profiled under
load, the four layers' frames were ~5% of a text decide's CPU. One layer wraps ``send``
once (the id header, the status, the "response started" flag and the access log's
capture all in one function) and ``receive`` only when the limits read the body.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import authentication_problem
from service.errors import Problem, problem_response
from service.limits import BODY_METHODS, EXEMPT, Limits
from service.observability import (
    DECISION_PATHS,
    MAX_CAPTURE,
    access_log,
    log_request,
    request_id_of,
    reset_request_id,
    set_request_id,
)

__all__ = ["ServiceMiddleware"]

log = logging.getLogger("service.errors")


class ServiceMiddleware:
    """ASGI middleware: request id, limits, authentication first, 500 answered (above)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        token = set_request_id(rid)
        logging_on = access_log.isEnabledFor(logging.INFO)
        capture = logging_on and scope["path"] in DECISION_PATHS
        started = time.perf_counter()
        status = 500
        response_started = False
        response_body = bytearray()
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            elif (capture and message["type"] == "http.response.body"
                  and len(response_body) < MAX_CAPTURE):
                response_body.extend(message.get("body", b""))
            await send(message)

        seen: dict[str, bytes] = {}  # the request body, once the limits have read it
        try:
            await self._limited(scope, receive, send_with_id, seen)
        except Exception:
            if response_started:
                raise  # half an answer is out: only closing the connection is left
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await problem_response(Problem(500, "unexpected error; see the server log"))(
                scope, receive, send_with_id)
        finally:
            if logging_on:
                log_request(scope, status, started, seen.get("body", b"") if capture else b"",
                            bytes(response_body))
            reset_request_id(token)

    async def _limited(self, scope: Scope, receive: Receive, send: Send,
                       seen: dict[str, bytes]) -> None:
        """Limits, then authentication, then the route; ``seen["body"]``: the request
        body, when the limits read it."""
        if scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        limits: Limits | None = getattr(app.state, "limits", None)
        if limits is None:
            limits = app.state.limits = Limits(app)
        problem = limits.admit(scope)
        if problem is not None:
            await problem_response(problem)(scope, receive, send)
            return
        limits.in_flight += 1
        try:
            if scope["method"] not in BODY_METHODS:
                await self._authenticated(scope, receive, send)
                return
            problem, body = await limits.read_body(scope, receive)
            if body is None:
                return  # the caller is gone
            seen["body"] = body
            if problem is not None:
                await problem_response(problem)(scope, receive, send)
                return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self._authenticated(scope, replay, send)
        finally:
            limits.in_flight -= 1

    async def _authenticated(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = authentication_problem(scope)
        if problem is not None:
            await problem_response(problem)(scope, receive, send)
            return
        await self.app(scope, receive, send)
