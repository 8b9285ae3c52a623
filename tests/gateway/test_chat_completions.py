"""POST /v1/chat/completions with the official openai SDK against the real service (on
SQLite and PostgreSQL) in front of a fake OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import FakeModel
from tests.gateway.conftest import KEY_ENV, TIMEOUT_S, UPSTREAM_KEY, Router

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a contextual bandit?"}]


def sdk(router: Router, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.base_url}/v1", api_key=key, max_retries=0)


def cost(input_price: float, output_price: float, prompt: int, completion: int) -> float:
    return (input_price * prompt + output_price * completion) / 1e6


def test_create_chat_completion_auto_passes_answer_and_posts_outcome(router: Router) -> None:
    name = router.add_model(input_price=2.0, output_price=8.0, upstream_model="vendor/x-1",
                            answer=FakeModel("A bandit that sees features.", prompt_tokens=21,
                                             completion_tokens=6))
    key = router.tenant()
    # Only this model has an upstream among this tenant's candidates: pin it by alias.
    assert router.http.put("/v1/tenants/me/gateway", json={"aliases": {
        "one": {"candidates": [name]}}}, headers={"Authorization": f"Bearer {key}"}
    ).status_code == 200
    raw = sdk(router, key).chat.completions.with_raw_response.create(
        model="auto:one", messages=MESSAGES)
    reply = raw.parse()
    assert reply.choices[0].message.content == "A bandit that sees features."
    assert reply.model == name  # the registered name, not the upstream's
    assert reply.usage.prompt_tokens == 21 and reply.usage.completion_tokens == 6
    assert raw.headers["x-router-model"] == name
    decision_id = raw.headers["x-router-decision-id"]
    sent = router.upstream.calls("vendor/x-1")[-1]
    assert sent.body["messages"] == MESSAGES
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    decision = router.decision(key, decision_id)
    assert decision["model"] == name
    (fb,) = decision["feedback"]
    assert fb["event_id"] == "gateway"
    assert fb["cost_usd"] == pytest.approx(cost(2.0, 8.0, 21, 6), rel=1e-9)
    assert 0.0 < fb["latency_ms"] < 5000.0
    assert fb["quality"] is None  # no success_quality set: the client posts it later
    # The quality later: another event of the same decision, not a duplicate.
    r = router.http.post("/v1/feedback", json={"decision_id": decision_id, "quality": 0.8},
                         headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
    assert [f["quality"] for f in router.decision(key, decision_id, feedback=2)["feedback"]
            ] == [None, 0.8]


def test_upstream_cookie_is_not_sent_on_later_calls(router: Router) -> None:
    # The pooled client serves every tenant: an upstream's cookie must not ride along.
    # By host name: a cookie jar would ignore the cookies of an IP address.
    name = router.add_model(answer=FakeModel("Cookie.", set_cookie="lb=tenant-a; Path=/"),
                            base_url=router.upstream.base_url.replace("127.0.0.1",
                                                                      "localhost") + "/v1")
    for _ in range(2):
        assert sdk(router, router.tenant()).chat.completions.create(
            model=name, messages=MESSAGES).choices[0].message.content == "Cookie."
    first, second = router.upstream.calls(name)[-2:]
    assert "cookie" not in first.headers and "cookie" not in second.headers


def test_create_chat_completion_stream_passes_chunks_and_measures_ttft(
        router: Router) -> None:
    name = router.add_model(input_price=1.0, output_price=3.0, answer=FakeModel(
        "one two three four", prompt_tokens=9, latency_s=0.3, chunk_delay_s=0.5))
    key = router.tenant()
    stream = sdk(router, key).chat.completions.with_raw_response.create(
        model=name, messages=MESSAGES, stream=True)
    decision_id = stream.headers["x-router-decision-id"]
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert all(c.model == name for c in chunks)
    # The client did not ask for the usage: the router asked for it, and kept it.
    assert all(c.choices for c in chunks)
    assert router.upstream.calls(name)[-1].body["stream_options"] == {"include_usage": True}
    decision = router.decision(key, decision_id)
    assert decision["propensity"] == 1.0  # a named model: no routing, still logged
    (fb,) = decision["feedback"]
    # Latency of a stream = time to its first chunk: the 0.3 s, not the 1.8 s total
    # (chunks 0.5 s apart, so that a loaded machine's delay of the first chunk is
    # still told from the second's 0.8 s: at 0.05 s apart, CI's load once gave 495 ms).
    assert 300.0 <= fb["latency_ms"] < 800.0
    assert fb["cost_usd"] == pytest.approx(cost(1.0, 3.0, 9, 4), rel=1e-9)
    # On /metrics: the time to the first chunk (0.3 s) and the whole call (1.8 s).
    assert router.metric("bandit_router_gateway_ttft_seconds_count", model=name) == 1
    assert 0.3 <= router.metric("bandit_router_gateway_ttft_seconds_sum", model=name) < 0.8
    total = router.metric("bandit_router_gateway_upstream_latency_seconds_sum", model=name)
    assert 1.8 <= total < 4.0


def test_create_chat_completion_async_plain_and_stream(router: Router) -> None:
    name = router.add_model(answer=FakeModel("Async works fine.", prompt_tokens=5))
    key = router.tenant()

    async def run() -> tuple[str, str, list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{router.base_url}/v1", api_key=key,
                                    max_retries=0)
        async with client:
            plain = await client.chat.completions.create(model=name, messages=MESSAGES)
            parts, usage = [], None
            stream = await client.chat.completions.create(
                model=name, messages=MESSAGES, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                parts.extend(c.delta.content or "" for c in chunk.choices)
                usage = chunk.usage or usage
            assert usage is not None and usage.prompt_tokens == 5  # asked for: passed on
            return plain.choices[0].message.content, plain.model, parts

    content, model, parts = asyncio.run(run())
    assert (content, model) == ("Async works fine.", name)
    assert "".join(parts) == "Async works fine."


def test_client_disconnect_mid_stream_cancels_upstream_request(router: Router) -> None:
    name = router.add_model(answer=FakeModel(" ".join(["word"] * 50), chunk_delay_s=0.1))
    key = router.tenant()
    before = len(router.upstream.stream_ends)
    with httpx.Client(base_url=router.base_url, timeout=10) as http, http.stream(
            "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": name, "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # 50 chunks at 0.1 s would take 5 s; the upstream sees the cancellation long before.
    deadline = time.monotonic() + 3.0
    while len(router.upstream.stream_ends) == before:
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        time.sleep(0.02)
    assert router.upstream.stream_ends[before:] == [(name, "cancelled")]


def test_upstream_that_keeps_failing_stops_being_chosen(router: Router) -> None:
    # "bad" is believed better before any feedback (prior quality 0.9 against 0.5).
    bad = router.add_model(answer=FakeModel(status=503), prior_quality=0.9)
    good = router.add_model(answer=FakeModel("fine"), prior_quality=0.5)
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    assert router.http.put("/v1/tenants/me/gateway", json={"aliases": {
        "pair": {"candidates": [bad, good]}}}, headers=auth).status_code == 200
    chosen = []
    for _ in range(25):
        r = router.http.post("/v1/chat/completions", headers=auth,
                             json={"model": "auto:pair", "messages": MESSAGES})
        assert "x-router-model" in r.headers, (r.status_code, r.text)
        model = r.headers["x-router-model"]
        chosen.append(model)
        if model == bad:
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "upstream_error"
            assert "503" in r.json()["error"]["message"]
            fb = router.decision(key, r.headers["x-router-decision-id"])["feedback"]
            # No success_quality: the failure counts against the upstream's
            # availability, not as a quality (tests/gateway/test_quality_bias.py).
            assert fb[0]["quality"] is None and fb[0]["latency_ms"] is not None
        else:
            assert r.status_code == 200, r.text
            router.decision(key, r.headers["x-router-decision-id"])
    assert chosen[0] == bad
    assert chosen[-15:].count(bad) <= 1, chosen  # only the policy's bounded exploration


def test_failing_upstream_is_still_called_when_no_other_is_left(router: Router) -> None:
    # Availability leaves a failing model out of a decision only in favour of others:
    # alone in its alias, or named by the client, every request still reaches it.
    bad = router.add_model(answer=FakeModel(status=503))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    assert router.http.put("/v1/tenants/me/gateway", json={"aliases": {
        "solo": {"candidates": [bad]}}}, headers=auth).status_code == 200
    for model in ["auto:solo"] * 6 + [bad] * 3:
        r = router.http.post("/v1/chat/completions", headers=auth,
                             json={"model": model, "messages": MESSAGES})
        assert r.status_code == 502 and r.headers["x-router-model"] == bad, r.text
    assert len(router.upstream.calls(bad)) == 9


def test_fallback_tries_next_best_model_each_attempt_a_decision(router: Router) -> None:
    bad = router.add_model(answer=FakeModel(status=500), prior_quality=0.95)
    good = router.add_model(answer=FakeModel("from the fallback"), prior_quality=0.2)
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    r = router.http.put("/v1/tenants/me/gateway", headers=auth, json={
        "aliases": {"pair": {"candidates": [bad, good]}}, "fallback_attempts": 1,
        "success_quality": 1.0, "quality_wait_seconds": 0})
    assert r.status_code == 200 and r.json()["fallback_attempts"] == 1, r.text
    reply = sdk(router, key).chat.completions.with_raw_response.create(
        model="auto:pair", messages=MESSAGES)
    assert reply.parse().choices[0].message.content == "from the fallback"
    assert reply.headers["x-router-model"] == good
    # The tenant's success quality: its own event, learned once the wait (0) is over.
    decision = router.decision(key, reply.headers["x-router-decision-id"], feedback=2)
    fb = {f["event_id"]: f for f in decision["feedback"]}
    assert fb["gateway-default"]["quality"] == 1.0 and fb["gateway"]["quality"] is None
    failed = router.upstream.calls(bad)
    assert len(failed) == 1 and len(router.upstream.calls(good)) == 1
    assert router.metric("bandit_router_gateway_fallbacks_total", model=bad) == 1
    assert router.metric("bandit_router_gateway_upstream_errors_total", model=bad,
                         kind="upstream_error") == 1
    assert router.metric("bandit_router_gateway_fallbacks_total", model=good) == 0


def test_upstream_timeout_gives_documented_504(router: Router) -> None:
    name = router.add_model(answer=FakeModel(hang=True))
    key = router.tenant()
    # With a success quality the router reports failures as quality 0 too.
    assert router.http.put("/v1/tenants/me/gateway", json={"success_quality": 1.0},
                           headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with pytest.raises(openai.APIStatusError) as info:
        sdk(router, key).chat.completions.create(model=name, messages=MESSAGES)
    err = info.value
    assert err.status_code == 504
    assert err.body["code"] == "upstream_timeout" and err.body["type"] == "timeout_error"
    assert f"{TIMEOUT_S:g} s" in err.body["message"]
    decision_id = err.response.headers["x-router-decision-id"]
    (fb,) = router.decision(key, decision_id)["feedback"]
    assert fb["quality"] == 0.0 and fb["latency_ms"] >= TIMEOUT_S * 1000 * 0.9
    assert router.metric("bandit_router_gateway_upstream_errors_total", model=name,
                         kind="upstream_timeout") == 1


def test_upstream_refused_and_rate_limited_map_to_errors(router: Router) -> None:
    from tests.fakes.openai_upstream import refused_base_url

    refused = router.add_model(base_url=f"{refused_base_url()}/v1")
    limited = router.add_model(answer=FakeModel(status=429, retry_after_s=7))
    key = router.tenant()
    client = sdk(router, key)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=refused, messages=MESSAGES)
    assert info.value.status_code == 502 and info.value.body["code"] == "upstream_unreachable"
    with pytest.raises(openai.RateLimitError) as limited_info:
        client.chat.completions.create(model=limited, messages=MESSAGES)
    assert limited_info.value.body["code"] == "upstream_rate_limited"
    assert limited_info.value.response.headers["retry-after"] == "7"


def test_upstream_key_never_in_logs_or_answers(router: Router,
                                               caplog: pytest.LogCaptureFixture) -> None:
    name = router.add_model(answer=FakeModel("ok"))
    bad_key = router.add_model(answer=FakeModel(status=401))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    caplog.set_level(logging.DEBUG)
    answers = [router.http.post("/v1/chat/completions", headers=auth,
                                json={"model": m, "messages": MESSAGES, "stream": s})
               for m in (name, bad_key) for s in (False, True)]
    answers += [router.http.get(f"/v1/admin/models/{name}", headers=ADMIN_HEADERS),
                router.http.get("/v1/admin/models", headers=ADMIN_HEADERS),
                router.http.get("/", headers=ADMIN_HEADERS)]
    assert [a.status_code for a in answers] == [200, 200, 502, 502, 200, 200, 200]
    assert router.http.get(f"/v1/admin/models/{name}", headers=ADMIN_HEADERS
                           ).json()["api_key_env"] == KEY_ENV
    assert f"(key: ${KEY_ENV})" in answers[-1].text  # the status page: the name only
    assert router.upstream.calls(name)[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    for answer in answers:
        assert UPSTREAM_KEY not in answer.text
        assert UPSTREAM_KEY not in str(answer.headers)
    assert caplog.records, "nothing was logged: the check would be empty"
    assert UPSTREAM_KEY not in caplog.text


ADMIN_HEADERS = {"Authorization": "Bearer bra_test-admin-key-0123456789abcdefghijklmnopqrstuvwxyz"}


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"messages": MESSAGES}, 400, "model"),
    ({"model": "auto"}, 400, "messages"),
    ({"model": "auto", "messages": []}, 400, "messages"),
    ({"model": "auto", "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "auto", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ({"model": "auto", "messages": MESSAGES, "metadata": {"app": 3}}, 400, "metadata.app"),
    ({"model": "auto", "messages": MESSAGES, "metadata": ["app"]}, 400, "metadata"),
    ({"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
    ({"model": "auto:nope", "messages": MESSAGES}, 404, "model"),
])
def test_bad_request_gives_openai_error_naming_field(router: Router, body: dict,
                                                    status: int, param: str) -> None:
    router.add_model()
    key = router.tenant()
    before = len(router.upstream.calls())
    r = router.http.post("/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert "x-router-decision-id" not in r.headers  # nothing decided
    assert len(router.upstream.calls()) == before  # nothing forwarded


def test_bad_key_and_bad_tags_and_bad_model_settings_are_refused(router: Router) -> None:
    r = router.http.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                         headers={"Authorization": "Bearer brt_nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    key = router.tenant()
    r = router.http.post("/v1/chat/completions", json={"model": "auto", "messages": MESSAGES},
                         headers={"Authorization": f"Bearer {key}", "x-router-tags": "app"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-router-tags"
    for field, value in (("api_key_env", "NOT-A-NAME"), ("base_url", "ftp://x"),
                         ("upstream_model", "")):
        r = router.http.post("/v1/admin/models", headers=ADMIN_HEADERS, json={
            "name": "refused-model", "input_price_per_mtok": 1, "output_price_per_mtok": 1,
            field: value})
        assert r.status_code == 422, r.text
        assert field in [e["field"] for e in r.json()["errors"]]
    r = router.http.put("/v1/tenants/me/gateway", headers={"Authorization": f"Bearer {key}"},
                        json={"aliases": {"x": {"candidates": ["no-such-model"]}}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "aliases.x.candidates"
    r = router.http.put("/v1/tenants/me/gateway", headers={"Authorization": f"Bearer {key}"},
                        json={"fallback_attempts": 9})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "fallback_attempts"


def test_system_prompt_metadata_and_header_become_the_decisions_tags(router: Router) -> None:
    name = router.add_model()
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    assert router.http.put("/v1/tenants/me/gateway", json={"aliases": {
        "one": {"candidates": [name]}}}, headers=auth).status_code == 200
    r = router.http.post("/v1/chat/completions", headers={**auth, "x-router-tags":
                                                          "task=code,app=header-wins"},
                         json={"model": "auto:one", "messages": MESSAGES,
                               "metadata": {"app": "faq", "team": "blue"}})
    assert r.status_code == 200, r.text
    decision = router.decision(key, r.headers["x-router-decision-id"])
    digest = hashlib.blake2b(b"Be brief.", digest_size=6).hexdigest()
    assert decision["tags"] == {"app": "header-wins", "team": "blue", "task": "code",
                                "system_prompt": digest}
    assert router.upstream.calls(name)[-1].body["metadata"] == {"app": "faq",
                                                                "team": "blue"}
    # Another system prompt, another tag; a conversation without user text is routed on
    # the text it has.
    r = router.http.post("/v1/chat/completions", headers=auth, json={
        "model": "auto:one", "messages": [{"role": "system", "content": "Summarize."}]})
    assert r.status_code == 200, r.text
    decision = router.decision(key, r.headers["x-router-decision-id"])
    assert decision["tags"] == {
        "system_prompt": hashlib.blake2b(b"Summarize.", digest_size=6).hexdigest()}
