"""A lean OpenAI-compatible upstream for the gateway benchmarks: canned bytes, nothing else.

``benchmarks.gateway_overhead --upstream lean`` runs it in its own process in place of
the fake of ``tests/fakes/openai_upstream.py`` (uvicorn + Starlette, which records every
request), for BOTH the direct and the gateway targets: on this 2-core machine the fake,
the load generator and the router share the cores, and the fake's own CPU per request
is part of what the router waits for. A deployment's real upstream runs on another
machine; neither harness is that, the default (the fake) stays the reference figure.

One asyncio :class:`asyncio.Protocol` (uvloop when installed, as uvicorn picks it)
speaking HTTP/1.1 with keep-alive:

* ``POST /v1/chat/completions``: the fake's answers, byte for byte the same JSON shapes
  (:func:`answers`: one ``chat.completion`` body; or, with ``"stream": true``, server-sent
  events in chunked transfer encoding: one ``chat.completion.chunk`` per word, a
  finishing chunk, the usage chunk when ``stream_options.include_usage`` is true, then
  ``data: [DONE]``), built once per model at start-up; the only per-request work is
  parsing the request and reading its JSON body (model, stream, include_usage). The
  completion id and ``created`` are fixed (the fake draws a new id per answer);
* ``GET /v1/models``: the models;
* anything else: 404. A model not configured: 404 ``model_not_found``, as the fake.

No recording, no failures, no latency: for benchmarks only (``python -m
benchmarks.lean_upstream --port 9000 --model fake="Hello there."``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json

from tests.fakes.openai_upstream import sse_chunk

#: The fake's answer shapes (tests/fakes/openai_upstream.py ``_chat`` and ``_stream``).
COMPLETION_ID = "chatcmpl-lean0000000000000000000000000000"
CREATED = 1_700_000_000
PROMPT_TOKENS = 10


def _usage(content: str) -> dict[str, int]:
    completion = len(content.split(" "))
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion}


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\n".encode() + b"server: lean-upstream\r\n"
            b"content-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def answers(name: str, content: str) -> dict[tuple[bool, bool], bytes]:
    """The whole HTTP responses of model ``name`` by (stream, include_usage)."""
    plain = json.dumps({
        "id": COMPLETION_ID, "object": "chat.completion", "created": CREATED,
        "model": name, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": _usage(content)}, separators=(",", ":")).encode()  # as JSONResponse
    out = {(False, False): _response("200 OK", b"application/json", plain)}
    out[(False, True)] = out[(False, False)]

    chunk = functools.partial(sse_chunk, COMPLETION_ID, CREATED, name)

    words = content.split(" ")
    texts = [words[0]] + [" " + w for w in words[1:]]
    events = [chunk({"role": "assistant", "content": t} if i == 0 else {"content": t})
              for i, t in enumerate(texts)] + [chunk({}, finish="stop")]
    head = (b"HTTP/1.1 200 OK\r\nserver: lean-upstream\r\n"
            b"content-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    for usage in (False, True):
        parts = events + ([chunk({}, usage=_usage(content))] if usage else []) \
            + [b"data: [DONE]\n\n"]
        out[(True, usage)] = head + b"".join(
            f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    return out


def _error(status: str, message: str, code: str | None) -> bytes:
    return _response(status, b"application/json", json.dumps({"error": {
        "message": message, "type": "not_found_error" if status.startswith("404")
        else "invalid_request_error", "param": None, "code": code}}).encode())


class LeanUpstream(asyncio.Protocol):
    """One connection: requests parsed from the buffer as they complete (pipelining
    works; keep-alive unless the client sends ``connection: close``)."""

    def __init__(self, models: dict[str, dict[tuple[bool, bool], bytes]],
                 listing: bytes) -> None:
        self.models, self.listing = models, listing
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._send(_error("411 Length Required", "send a content-length", None),
                           close=True)
                return
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            method, path, _ = head[0].split(" ", 2)
            self._send(self._answer(method, path.split("?", 1)[0], body),
                       close=headers.get("connection", "").lower() == "close")

    def _answer(self, method: str, path: str, body: bytes) -> bytes:
        if method == "GET" and path == "/v1/models":
            return self.listing
        if method != "POST" or path != "/v1/chat/completions":
            return _error("404 Not Found", "Not Found", None)
        try:
            request = json.loads(body)
            name = request["model"]
            stream = bool(request.get("stream"))
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error("400 Bad Request",
                          "the body must be a JSON object with a string 'model'", None)
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            return _error("404 Not Found", f"The model '{name}' does not exist",
                          "model_not_found")
        return model[(stream, usage)]

    def _send(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, models: dict[str, str], host: str = "127.0.0.1") -> None:
    canned = {name: answers(name, content) for name, content in models.items()}
    listing = _response("200 OK", b"application/json", json.dumps({
        "object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                    "owned_by": "fake"} for n in models]}).encode())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LeanUpstream(canned, listing), host, port,
                                      backlog=2048)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a lean OpenAI-compatible upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=ANSWER")
    args = parser.parse_args(argv)
    models = {name: answer for name, _, answer in (m.partition("=") for m in args.model)}
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, models))
    else:
        uvloop.run(serve(args.port, models))


if __name__ == "__main__":
    main()
