"""benchmarks/lean_upstream.py answers as the fake of tests/fakes/openai_upstream.py does
(the same JSON and server-sent events but the completion id and ``created``), over
keep-alive connections; and through our router (the gateway benchmark's other target)."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
go = importlib.import_module("benchmarks.gateway_overhead")

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def upstreams():
    with go.upstream_process("fake") as fake, go.upstream_process("lean") as lean:
        yield fake, lean


def _normal(body: Any) -> Any:
    """An answer without what differs by design (the completion id, ``created``)."""
    if isinstance(body, dict):
        return {k: _normal(v) for k, v in body.items() if k not in ("id", "created")}
    return body


def _events(text: str) -> list[Any]:
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    return [e if e == "[DONE]" else _normal(json.loads(e)) for e in events]


@pytest.mark.parametrize("body", [
    {"model": go.MODEL, "messages": MESSAGES},
    {"model": go.MODEL, "messages": MESSAGES, "stream": True},
    {"model": go.MODEL, "messages": MESSAGES, "stream": True,
     "stream_options": {"include_usage": True}},
    {"model": "unknown", "messages": MESSAGES},
], ids=["plain", "stream", "stream-usage", "unknown-model"])
def test_lean_answers_as_the_fake(upstreams, body) -> None:
    answers = []
    for upstream in upstreams:
        with httpx.Client(base_url=upstream.base, timeout=5) as http:
            replies = [http.post("/v1/chat/completions", json=body) for _ in range(3)]
        seen = [(r.status_code, r.headers["content-type"],
                 _events(r.text) if body.get("stream") else _normal(r.json()))
                for r in replies]
        assert seen[1:] == seen[:-1]  # keep-alive: the same again
        answers.append(seen[0])
    assert answers[1] == answers[0]
    if body.get("stream"):
        assert answers[0][2][-1] == "[DONE]"
        assert ("usage" in answers[0][2][-2]) == ("stream_options" in body)


def test_lean_lists_models_and_refuses_what_it_does_not_serve(upstreams) -> None:
    _, lean = upstreams
    with httpx.Client(base_url=lean.base, timeout=5) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [go.MODEL]
        assert http.get("/v1/other").status_code == 404
        assert http.post("/v1/chat/completions", content=b"not json").status_code == 400


def test_router_forwards_to_the_lean_upstream(upstreams, tmp_path) -> None:
    _, lean = upstreams
    with go.router_process(lean.base, tmp_path / "router") as router:
        out = go.measured(router, True, 50.0, 0.5, lean.pid)
        assert out["errors"] == 0, out["errors_by_kind"]
        plain = go.measured(router, False, 50.0, 0.5, lean.pid)
        assert plain["errors"] == 0, plain["errors_by_kind"]
    cpu = out["cpu"]
    assert cpu["router_cpu_ms_per_request"] == pytest.approx(
        cpu["router_loop_cpu_ms_per_request"] + cpu["router_threads_cpu_ms_per_request"])
    assert 0 < cpu["router_loop_busy"] < 1
    for name in ("upstream", "loadgen"):
        assert cpu[f"{name}_cpu_ms_per_request"] >= 0
        assert 0 <= cpu[f"{name}_share_of_cores"] < 1


@pytest.mark.parametrize("loadgen", ["aiohttp", "raw"])
@pytest.mark.parametrize("kind", ["fake", "lean"])
def test_load_generators_measure_the_same(upstreams, loadgen, kind) -> None:
    """Both senders: every request answered, a TTFT per stream, errors by status."""
    upstream = dict(zip(("fake", "lean"), upstreams, strict=True))[kind]
    url = f"{upstream.base}/v1/chat/completions"
    send = go.LOADGENS[loadgen]
    for stream in (False, True):
        out = asyncio.run(send(go.Target("direct", url, {}), stream, 200.0, 0.5))
        assert (out["requests"], out["errors"]) == (100, 0), out["errors_by_kind"]
        assert 0 < out["p50_ms"] <= out["p99_ms"] < 1e3
        if stream:
            assert 0 < out["ttft_p50_ms"] <= out["p50_ms"] + 1e-9
        else:
            assert "ttft_p50_ms" not in out
    out = asyncio.run(send(go.Target("direct", url, {}, model="unknown"), True, 200.0, 0.2))
    assert out["errors_by_kind"] == {"status 404": 40}
