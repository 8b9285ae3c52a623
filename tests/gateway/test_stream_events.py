"""A stream's events are passed on whatever their line ends and however the network
cuts them (``_Exchange._stream``): the same bytes out for LF, CRLF and CR events, for an
event cut across reads, and for ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from service.gateway.endpoint import _Attempt, _Exchange
from service.gateway.upstream import Target


def _chunk(content: str | None = None, usage: dict[str, int] | None = None) -> str:
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "up",
                       "choices": [] if usage else [{"index": 0, "delta": {
                           "content": content}, "finish_reason": None}],
                       **({"usage": usage} if usage else {})})


EVENTS = [f"data: {_chunk('Hello')}", ": a comment", f"data: {_chunk(' world')}",
          f"data: {_chunk(usage={'prompt_tokens': 3, 'completion_tokens': 2})}",
          "data: [DONE]"]


def _passed_on(raw: bytes, cut: int) -> tuple[bytes, Any]:
    """What the client receives of an upstream stream ``raw`` read ``cut`` bytes at a
    time, and the usage taken from it."""
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    async def iter_any() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), cut):
            yield raw[i:i + cut]

    exchange = object.__new__(_Exchange)
    exchange.send = send
    exchange.chat = SimpleNamespace(include_usage=False)
    exchange.gateway = SimpleNamespace(timeout_s=1.0)
    exchange.answering = False
    attempt = _Attempt("model-0", "d1", [])
    response = SimpleNamespace(content=SimpleNamespace(iter_any=iter_any))
    asyncio.run(exchange._stream(attempt, Target("http://x", "up", {}), response))  # type: ignore[arg-type]
    assert attempt.succeeded
    return b"".join(sent), attempt.usage


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("cut", [1, 7, 10_000])
def test_events_passed_on_the_same_whatever_their_line_ends_and_cuts(end: str,
                                                                     cut: int) -> None:
    raw = "".join(e + end + end for e in EVENTS).encode()
    out, usage = _passed_on(raw, cut)
    events = out.decode().split("\n\n")
    assert events[-1] == ""
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1] if e.startswith("data: {")]
    # Renamed, the usage chunk dropped (not asked for) and its usage taken.
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["Hello", " world"]
    assert {c["model"] for c in chunks} == {"model-0"}
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert events[:-1] == [events[0], ": a comment", events[2], "data: [DONE]"]
