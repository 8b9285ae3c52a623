"""A fake OpenAI-compatible upstream on a loopback socket, for tests and benchmarks.

It speaks just enough of the OpenAI wire format for a gateway in front of it (LiteLLM
proxy, our own routing endpoint) to be driven by the official ``openai`` SDK:

- ``POST /v1/chat/completions``: a canned answer per model, as one JSON body or, with
  ``"stream": true``, as server-sent events (one ``chat.completion.chunk`` per word, then
  a finishing chunk, then, when ``stream_options.include_usage`` is true, a chunk with
  empty ``choices`` and the ``usage``, then ``data: [DONE]``);
- ``GET /v1/models``: the configured models.

Per model (:class:`FakeModel`): the answer text, the token usage it reports, a latency
before the answer (``latency_s``; for a stream, the time to the first token), a delay
between chunks, and an injected failure: an HTTP status with an OpenAI-style error body
(500, 503, 429 with ``Retry-After``, ...) or a hang (the request is accepted and never
answered, so the caller's timeout fires). Failures can be limited to the next ``n``
requests (``fail_times``). A model that is not configured answers 404
``model_not_found``, as OpenAI does. "Connection refused" needs no server at all:
:func:`refused_base_url` gives a loopback URL nothing listens on.

Every request is recorded (:attr:`FakeUpstream.requests`: method, path, headers, JSON
body), so a test can assert which model was called with which key and parameters.

Examples
--------
In a test (the ``fake_upstream`` fixture of ``tests/conftest.py`` does the same)::

    with running_upstream({"cheap": FakeModel("Hi there.", completion_tokens=3)}) as up:
        client = openai.OpenAI(base_url=up.base_url + "/v1", api_key="sk-fake")
        reply = client.chat.completions.create(model="cheap", messages=[...])
        assert reply.choices[0].message.content == "Hi there."
        assert up.requests[-1].headers["authorization"] == "Bearer sk-fake"
        up.set("cheap", status=503)           # from now on: 503 service unavailable
        up.set("cheap", hang=True)            # from now on: never answers

The answer a model gives, as the SDK would assemble it (no server needed):

>>> FakeModel("One two three.", prompt_tokens=7).usage()
{'prompt_tokens': 7, 'completion_tokens': 3, 'total_tokens': 10}
>>> [c for c in FakeModel("One two three.").chunks()]
['One', ' two', ' three.']
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.loopback import serve_asgi

__all__ = ["FakeModel", "RecordedRequest", "FakeUpstream", "running_upstream", "free_port",
           "refused_base_url"]

# OpenAI's error "type" per status (what the SDK and LiteLLM map to exception classes).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
                502: "server_error", 503: "server_error"}


@dataclass(frozen=True)
class FakeModel:
    """What one model answers. Frozen: change it with :meth:`FakeUpstream.set`.

    ``completion_tokens`` defaults to the number of words of ``content`` (one chunk per
    word when streaming). ``status`` (an HTTP error status) or ``hang`` make the request
    fail instead; ``fail_times`` limits that to the next n requests (None: all).
    """

    content: str = "Hello from the fake upstream."
    prompt_tokens: int = 10
    completion_tokens: int | None = None
    latency_s: float = 0.0
    chunk_delay_s: float = 0.0
    status: int | None = None
    retry_after_s: int | None = None
    hang: bool = False
    fail_times: int | None = None
    #: A ``Set-Cookie`` header on a plain answer (a provider's load-balancer cookie).
    set_cookie: str | None = None

    def chunks(self) -> list[str]:
        words = self.content.split(" ")
        return [words[0]] + [" " + w for w in words[1:]]

    def usage(self) -> dict[str, int]:
        completion = (self.completion_tokens if self.completion_tokens is not None
                      else len(self.chunks()))
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    @property
    def failing(self) -> bool:
        return (self.status is not None or self.hang) and self.fail_times != 0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it; header names are lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    received_at: float


@dataclass
class FakeUpstream:
    """The fake's state: its models and the requests it received (see module docstring).

    Safe to change from the test's thread while the server runs in its own.
    """

    models: dict[str, FakeModel] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    #: How each stream ended, in order: (model, "completed" or "cancelled": the client
    #: went away before the last chunk, which a gateway must pass on to its upstream).
    stream_ends: list[tuple[str, str]] = field(default_factory=list)
    base_url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def set(self, name: str, model: FakeModel | None = None, **changes: Any) -> FakeModel:
        """Add or replace model ``name`` (``model``), or change fields of it (``changes``)."""
        with self._lock:
            current = model or self.models.get(name) or FakeModel()
            self.models[name] = dataclasses.replace(current, **changes)
            return self.models[name]

    def calls(self, model: str | None = None) -> list[RecordedRequest]:
        """The chat-completion requests received (for ``model`` only, when given)."""
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/chat/completions"
                    and (model is None or (isinstance(r.body, dict)
                                           and r.body.get("model") == model))]

    # ------------------------------------------------------------- the app
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])

    def _record(self, request: Request, body: Any) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(request.method, request.url.path,
                                                 dict(request.headers), body, time.time()))

    def _take(self, name: str) -> FakeModel | None:
        """The model's behaviour for this request, consuming one limited failure."""
        with self._lock:
            model = self.models.get(name)
            if model is not None and model.failing and model.fail_times is not None:
                self.models[name] = dataclasses.replace(model, fail_times=model.fail_times - 1)
            return model

    async def _models(self, request: Request) -> Response:
        self._record(request, None)
        with self._lock:
            names = list(self.models)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]})

    async def _chat(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        self._record(request, body)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "the body must be a JSON object with a string 'model'")
        model = self._take(body["model"])
        if model is None:
            return _error(404, f"The model '{body['model']}' does not exist",
                          code="model_not_found")
        if model.failing:
            if model.hang:
                await self._hang()
            headers = ({"retry-after": str(model.retry_after_s)}
                       if model.retry_after_s is not None else None)
            return _error(model.status or 500, f"injected failure of {body['model']}",
                          headers=headers)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(completion_id, body["model"], model, include_usage),
                media_type="text/event-stream")
        await asyncio.sleep(model.latency_s)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": model.content}}],
            "usage": model.usage()},
            headers={"set-cookie": model.set_cookie} if model.set_cookie else None)

    async def _hang(self) -> None:
        # Until the server stops: the caller's timeout is what ends the request. Polling
        # a flag (not one long sleep) lets shutdown release hung requests at once.
        while not self._stopping.is_set():
            await asyncio.sleep(0.05)

    async def _stream(self, completion_id: str, name: str, model: FakeModel,
                      include_usage: bool) -> AsyncIterator[bytes]:
        chunk = functools.partial(sse_chunk, completion_id, int(time.time()), name)

        end = "cancelled"
        try:
            await asyncio.sleep(model.latency_s)  # the time to the first token
            for i, text in enumerate(model.chunks()):
                if i and model.chunk_delay_s:
                    await asyncio.sleep(model.chunk_delay_s)
                delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
                yield chunk(delta)
            yield chunk({}, finish="stop")
            if include_usage:
                yield chunk({}, usage=model.usage())
            yield b"data: [DONE]\n\n"
            end = "completed"
        finally:
            with self._lock:
                self.stream_ends.append((name, end))


def sse_chunk(completion_id: str, created: int, name: str, delta: dict[str, Any],
              finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    """One server-sent event of a streamed answer (the usage chunk: empty ``choices``)."""
    payload: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion.chunk", "created": created,
        "model": name, "system_fingerprint": "fp_fake",
        "choices": [] if usage else [{"index": 0, "delta": delta,
                                      "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n".encode()


def _error(status: int, message: str, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message,
                                   "type": _ERROR_TYPES.get(status, "server_error"),
                                   "param": None, "code": code}},
                        status_code=status, headers=headers)


@contextmanager
def running_upstream(models: Mapping[str, FakeModel] | None = None,
                     timeout_s: float = 30.0) -> Iterator[FakeUpstream]:
    """Serve a :class:`FakeUpstream` on 127.0.0.1 (a free port) in a thread; yields it
    with ``base_url`` set (``http://127.0.0.1:<port>``; the API is under ``/v1``)."""
    upstream = FakeUpstream(models=dict(models or {}))
    # A short graceful shutdown: hung requests end once _stopping is set.
    with serve_asgi(upstream.app(), "fake-upstream", timeout_s, lifespan="off",
                    timeout_graceful_shutdown=1) as base_url:
        upstream.base_url = base_url
        try:
            yield upstream
        finally:
            upstream._stopping.set()  # release hung requests before the server stops


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_base_url() -> str:
    """A loopback base URL that refuses connections (nothing listens on the port)."""
    return f"http://127.0.0.1:{free_port()}"


def main(argv: list[str] | None = None) -> None:
    """Serve the fake in the foreground (benchmarks run it in its own process, so that
    it does not share a GIL with the load generator)::

        python -m tests.fakes.openai_upstream --port 9000 --model fake="Hello there."
    """
    import argparse

    parser = argparse.ArgumentParser(description="a fake OpenAI-compatible upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=ANSWER",
                        help="a model and its canned answer (repeatable)")
    parser.add_argument("--latency-s", type=float, default=0.0,
                        help="every model's latency before the answer / first token")
    args = parser.parse_args(argv)
    upstream = FakeUpstream(models={
        name: FakeModel(answer, latency_s=args.latency_s)
        for name, _, answer in (m.partition("=") for m in args.model)})
    uvicorn.run(upstream.app(), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
