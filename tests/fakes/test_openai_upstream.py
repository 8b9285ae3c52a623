"""The fake OpenAI-compatible upstream, driven by the official ``openai`` SDK: what the
gateway tests rely on it to do (answers, streams with usage, errors, hangs, records)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.fakes.openai_upstream import FakeModel, refused_base_url

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def upstream(fake_upstream):  # the suite-wide fixture of tests/conftest.py
    return fake_upstream


@pytest.fixture
def client(upstream):
    with openai.OpenAI(base_url=upstream.base_url + "/v1", api_key="sk-fake-key",
                       max_retries=0, timeout=5.0) as c:
        yield c


def test_complete_plain_returns_canned_answer_and_usage(upstream, client):
    upstream.set("plain", FakeModel("Hello there, friend.", prompt_tokens=12))
    reply = client.chat.completions.create(model="plain", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello there, friend."
    assert reply.model == "plain"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (12, 3, 15)
    recorded = upstream.calls("plain")[-1]
    assert recorded.headers["authorization"] == "Bearer sk-fake-key"
    assert recorded.body["messages"] == MESSAGES


def test_complete_stream_sends_chunks_then_usage(upstream, client):
    upstream.set("streamer", FakeModel("One two three four.", completion_tokens=9))
    stream = client.chat.completions.create(model="streamer", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert [t for t in texts if t] == ["One", " two", " three", " four."]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == 10


def test_complete_stream_without_include_usage_sends_no_usage(upstream, client):
    upstream.set("streamer2", FakeModel("a b"))
    chunks = list(client.chat.completions.create(model="streamer2", messages=MESSAGES,
                                                 stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_complete_stream_latency_delays_first_token(upstream, client):
    upstream.set("slow", FakeModel("x y", latency_s=0.3))
    started = time.perf_counter()
    stream = client.chat.completions.create(model="slow", messages=MESSAGES, stream=True)
    next(iter(stream))
    assert time.perf_counter() - started >= 0.3
    stream.close()


@pytest.mark.parametrize(("status", "error"), [
    (500, openai.InternalServerError), (503, openai.InternalServerError),
    (429, openai.RateLimitError)])
def test_complete_injected_status_raises_sdk_error(upstream, client, status, error):
    upstream.set(f"bad-{status}", status=status, retry_after_s=1)
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=f"bad-{status}", messages=MESSAGES)
    assert caught.value.status_code == status
    assert "injected failure" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "1"


def test_complete_fail_times_fails_then_recovers(upstream, client):
    upstream.set("flaky", status=503, fail_times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="flaky", messages=MESSAGES)
    reply = client.chat.completions.create(model="flaky", messages=MESSAGES)
    assert reply.choices[0].message.content == FakeModel().content


def test_complete_hang_times_out_client(upstream):
    upstream.set("hung", hang=True)
    with openai.OpenAI(base_url=upstream.base_url + "/v1", api_key="k", max_retries=0,
                       timeout=0.5) as c, pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model="hung", messages=MESSAGES)


def test_complete_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_list_models_names_configured_models(upstream, client):
    upstream.set("listed")
    assert "listed" in {m.id for m in client.models.list()}


def test_refused_base_url_refuses_connection():
    with openai.OpenAI(base_url=refused_base_url() + "/v1", api_key="k", max_retries=0,
                       timeout=2.0) as c, pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model="any", messages=MESSAGES)
