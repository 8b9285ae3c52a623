"""The plug-in inside a real LiteLLM Proxy process, with real parts all along the path:

    openai SDK -> LiteLLM proxy (our plug-in) -> fake OpenAI-compatible upstream
                        \\-> our service (embedded mode, SQLite, loopback socket)

What a LiteLLM user relies on: the answer passes through unchanged; every routed call has
a decision in the router with its feedback (LiteLLM's cost, the call's latency); a
deployment whose upstream keeps failing stops being chosen; an upstream error reaches the
client as LiteLLM's error and the learner as a failure; the router's tenant key appears
in none of LiteLLM's logs, answers or upstream requests.

Skips (saying why) without the ``[litellm]`` extra (``ops/test.sh`` installs it). One
proxy per module: it takes ~30 s to start on an idle 2-core machine.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.bandit_router_litellm.proxy import (
    MASTER_KEY,
    decision_with_feedback,
    learn_defaults_at_once,
    require_proxy,
    running_proxy,
)

require_proxy()

import openai  # noqa: E402

from service.client import RouterClient, RouterError  # noqa: E402
from service.exceptions import UnavailableError  # noqa: E402
from tests.fakes.openai_upstream import FakeModel, running_upstream  # noqa: E402
from tests.service.conftest import ADMIN_KEY, make_settings  # noqa: E402
from tests.service.live import live_server  # noqa: E402

UPSTREAM_KEY = "sk-upstream-fake-0123456789"
# Prices LiteLLM computes response_cost with (USD per token), per upstream model.
PRICES = {"cheap": (1e-6, 2e-6), "strong": (5e-6, 2e-5), "flaky": (1e-6, 2e-6),
          "broken": (1e-6, 2e-6), "hung": (1e-6, 2e-6)}
ANSWERS = {
    "cheap": FakeModel("The cheap model answers briefly.", prompt_tokens=20,
                       completion_tokens=5, latency_s=0.05),
    "strong": FakeModel("The strong model answers with care and detail.",
                        prompt_tokens=20, completion_tokens=8, latency_s=0.05),
    "flaky": FakeModel("flaky answer", status=503),
    "broken": FakeModel("never seen", status=500),
    "hung": FakeModel("never seen", hang=True),
}
GROUPS = {"bandit-router/auto": ["cheap", "strong"],
          "bandit-router/learn": ["flaky", "strong"],
          "bandit-router/broken": ["broken"],
          "bandit-router/hung": ["hung"]}


def _deployment(group: str, name: str, api_base: str) -> dict:
    params = {"model": f"openai/{name}", "api_base": api_base,
              "api_key": "os.environ/FAKE_UPSTREAM_KEY"}
    if name == "hung":
        params["timeout"] = 1  # seconds: LiteLLM's timeout is the error under test
    return {"model_name": group, "litellm_params": params,
            "model_info": {"input_cost_per_token": PRICES[name][0],
                           "output_cost_per_token": PRICES[name][1]}}


@pytest.fixture(scope="module")
def upstream():
    with running_upstream(ANSWERS) as up:
        yield up


@pytest.fixture(scope="module")
def router_app(tmp_path_factory):
    """The service's base URL, a tenant key and its app; the deployments registered as
    models."""
    url = f"sqlite:///{tmp_path_factory.mktemp('router') / 'router.db'}"
    apps: list = []
    with live_server(make_settings(url, featurizer="hashing"), prepare=apps.append) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            tenant = admin.create_tenant(f"litellm-{uuid.uuid4().hex[:6]}")
            for name, (inp, out) in PRICES.items():
                # flaky is believed better than strong before any feedback.
                admin.add_model(f"openai/{name}", inp * 1e6, out * 1e6,
                                prior_quality=0.9 if name == "flaky" else None)
        learn_defaults_at_once(base, tenant.api_key)
        yield base, tenant.api_key, apps[0]


@pytest.fixture(scope="module")
def router(router_app):
    """The service's base URL and a tenant key."""
    return router_app[:2]


@pytest.fixture(scope="module")
def proxy(upstream, router, tmp_path_factory):
    base, key = router
    api_base = upstream.base_url + "/v1"
    model_list = [_deployment(g, n, api_base) for g, names in GROUPS.items() for n in names]
    model_list.append({"model_name": "direct", "litellm_params": {
        "model": "openai/cheap", "api_base": api_base,
        "api_key": "os.environ/FAKE_UPSTREAM_KEY"}})
    config = {
        "model_list": model_list,
        # Our learner, not LiteLLM's cooldown or retries, must be what steers away from
        # a failing deployment (docs/litellm.md says why).
        "router_settings": {"plugins": ["bandit_router_litellm.router"],
                            "num_retries": 0, "disable_cooldowns": True},
        "litellm_settings": {"callbacks": ["bandit_router_litellm.router"]},
        "general_settings": {"master_key": MASTER_KEY},
    }
    env = {"BANDIT_ROUTER_URL": base, "BANDIT_ROUTER_API_KEY": key,
           "BANDIT_ROUTER_LITELLM_GROUPS": ",".join(GROUPS),
           # The machine is shared and loaded: the default 2 s would fail open at times.
           "BANDIT_ROUTER_LITELLM_TIMEOUT_S": "20",
           "FAKE_UPSTREAM_KEY": UPSTREAM_KEY,
           # The most talkative log LiteLLM has: the key check reads all of it.
           "LITELLM_LOG": "DEBUG"}
    with running_proxy(config, tmp_path_factory.mktemp("litellm"), env) as (url, log):
        yield url, log


@pytest.fixture(scope="module")
def seen():
    """Everything the proxy answered (headers and bodies), for the key check."""
    return []


@pytest.fixture(scope="module")
def client(proxy):
    with openai.OpenAI(base_url=proxy[0] + "/v1", api_key=MASTER_KEY, max_retries=0,
                       timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def tenant(router):
    base, key = router
    with RouterClient(base, key) as c:
        yield c


def _ask(client, seen, group: str, text: str, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model=group, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": text}], **extra)
    seen.append(str(dict(raw.headers)))
    return raw


def _expected_cost(name: str) -> float:
    usage = ANSWERS[name].usage()
    return usage["prompt_tokens"] * PRICES[name][0] + usage["completion_tokens"] * PRICES[name][1]


def test_proxy_plain_routes_and_posts_cost_and_latency(client, tenant, upstream, seen):
    started = time.perf_counter()
    raw = _ask(client, seen, "bandit-router/auto", "What is the capital of France?")
    wall_ms = (time.perf_counter() - started) * 1000.0
    reply = raw.parse()
    seen.append(reply.model_dump_json())
    chosen = raw.headers["x-bandit-router-model"]
    name = chosen.removeprefix("openai/")
    assert name in GROUPS["bandit-router/auto"]
    assert reply.choices[0].message.content == ANSWERS[name].content
    assert upstream.calls(name)[-1].body["messages"][-1]["content"] == (
        "What is the capital of France?")

    decision = decision_with_feedback(tenant, raw.headers["x-bandit-router-decision-id"],
                                      rated=True)
    assert decision["model"] == chosen
    rows = {f["event_id"]: f for f in decision["feedback"]}
    # The success quality: a default (its own event), the cost and latency at once.
    assert rows.pop("gateway-default")["quality"] == 1.0
    [fb] = rows.values()
    assert fb["quality"] is None
    assert fb["cost_usd"] == pytest.approx(_expected_cost(name), rel=1e-6)
    # The fake waits 50 ms before answering; the client saw the whole round trip.
    assert 50.0 <= fb["latency_ms"] <= wall_ms


def test_proxy_stream_passes_chunks_and_posts_feedback(client, tenant, seen):
    raw = _ask(client, seen, "bandit-router/auto", "Stream me a short answer, please.",
               stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    seen.extend(c.model_dump_json() for c in chunks)
    name = raw.headers["x-bandit-router-model"].removeprefix("openai/")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWERS[name].content
    assert chunks[-1].usage.completion_tokens == ANSWERS[name].usage()["completion_tokens"]

    [fb] = decision_with_feedback(tenant, raw.headers["x-bandit-router-decision-id"])["feedback"]
    assert fb["cost_usd"] == pytest.approx(_expected_cost(name), rel=1e-6)
    assert fb["latency_ms"] >= 50.0


def test_proxy_other_groups_are_not_routed(client, seen):
    raw = _ask(client, seen, "direct", "Hello?")
    assert "x-bandit-router-decision-id" not in raw.headers
    assert raw.parse().choices[0].message.content == ANSWERS["cheap"].content


def test_proxy_failing_deployment_stops_being_chosen(client, tenant, upstream, seen):
    """flaky answers 503 every time; strong succeeds. flaky is believed better before
    any feedback (prior quality 0.9): the failures must teach the default policy, and the
    plug-in's availability leaves a deployment drawn down out of the candidates.

    Three questions asked in turn: a handful of request kinds, as real traffic repeats
    them (each new kind of query is a new context a contextual policy explores anew).
    """
    questions = ["Summarise this contract for me.", "Translate 'good morning' to French.",
                 "Write a haiku about the sea."]
    _learn_flaky_fails(client, tenant, upstream, seen, questions)


def _learn_flaky_fails(client, tenant, upstream, seen, questions: list[str]) -> None:
    decisions = []
    for i in range(30):
        try:
            raw = _ask(client, seen, "bandit-router/learn", questions[i % 3])
            decision_id = raw.headers["x-bandit-router-decision-id"]
        except openai.APIStatusError as exc:
            seen.append(str(dict(exc.response.headers)) + exc.response.text)
            decision_id = exc.response.headers["x-bandit-router-decision-id"]
        # Learn from this call before the next one decides (feedback is asynchronous).
        decisions.append(decision_with_feedback(tenant, decision_id, rated=True))
        assert decisions[-1]["feedback"], "no feedback was posted"
    chosen = [d["model"] for d in decisions]
    trace = " ".join(c[7] for c in chosen)
    assert "openai/flaky" in chosen[:10], f"flaky was never tried: {trace}"
    assert len(upstream.calls("flaky")) == chosen.count("openai/flaky")
    failures = [d["feedback"][0]["quality"] for d in decisions if d["model"] == "openai/flaky"]
    assert failures == [0.0] * len(failures)
    late = decisions[-15:]
    for d in late:
        flaky, strong = d["predictions"]["openai/flaky"], d["predictions"]["openai/strong"]
        # The learner's own estimate: strong is the better arm...
        assert strong["utility"] > flaky["utility"] + 0.5, (trace, d["predictions"])
    # ...so flaky is reached only by the policy's bounded exploration (the cold-start
    # share while it has < 10 pulls, epsilon after): a few of 15, not all (ties go to
    # the first candidate, flaky, in a learner that heard of no failure).
    assert [d["model"] for d in late].count("openai/flaky") <= 5, trace


def test_proxy_upstream_error_reaches_client_and_learner(client, tenant, seen):
    with pytest.raises(openai.InternalServerError) as caught:
        _ask(client, seen, "bandit-router/broken", "This will fail upstream.")
    response = caught.value.response
    seen.append(str(dict(response.headers)) + response.text)
    assert caught.value.status_code == 500
    assert "injected failure of broken" in caught.value.message  # LiteLLM passes it on
    decision = decision_with_feedback(tenant, response.headers["x-bandit-router-decision-id"])
    assert decision["model"] == "openai/broken"
    [fb] = decision["feedback"]
    assert fb["quality"] == 0.0
    assert fb["cost_usd"] is None
    assert fb["latency_ms"] >= 0.0


def test_proxy_upstream_timeout_is_408_and_a_failure(client, tenant, seen):
    started = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client, seen, "bandit-router/hung", "This upstream never answers.")
    assert time.perf_counter() - started < 30.0
    response = caught.value.response
    seen.append(str(dict(response.headers)) + response.text)
    assert caught.value.status_code == 408  # LiteLLM's documented mapping of its Timeout
    decision_id = response.headers["x-bandit-router-decision-id"]
    [fb] = decision_with_feedback(tenant, decision_id)["feedback"]
    assert fb["quality"] == 0.0
    assert fb["latency_ms"] >= 900.0  # the deployment's 1 s timeout
    # Final, as the router's gateway's failure: a later rating would count twice (409).
    with pytest.raises(RouterError) as refused:
        tenant.feedback(decision_id, quality=0.9, event_id="user")
    assert refused.value.status == 409


def test_proxy_failure_refused_by_the_router_is_retried(client, tenant, seen, router_app,
                                                        monkeypatch):
    """The router answers the plug-in's failure report 503 twice (as while its broker is
    away: nothing sent, Retry-After 1): the plug-in retries it off LiteLLM's callback
    until it is taken, and the failure's 0 is final. Before, it posted once: the failure
    was never learned."""
    sink = router_app[2].state.routing.sink
    refused, submit = [], sink.submit

    def flaky(*args):
        if len(refused) < 2 and str(args[3]).startswith("litellm-"):
            refused.append(args[1])
            raise UnavailableError("the feedback topic is unavailable (broker "
                                   "unreachable); retry", retry_after_s=1, unsent=True)
        return submit(*args)
    monkeypatch.setattr(sink, "submit", flaky)
    with pytest.raises(openai.InternalServerError) as caught:
        _ask(client, seen, "bandit-router/broken", "This fails, and so does its report.")
    response = caught.value.response
    seen.append(str(dict(response.headers)) + response.text)
    decision_id = response.headers["x-bandit-router-decision-id"]
    [fb] = decision_with_feedback(tenant, decision_id)["feedback"]
    assert refused == [decision_id] * 2
    assert fb["quality"] == 0.0 and fb["event_id"].startswith("litellm-")
    with pytest.raises(RouterError) as later:
        tenant.feedback(decision_id, quality=0.9, event_id="user")
    assert later.value.status == 409


def test_proxy_tenant_key_appears_nowhere(proxy, router, upstream, seen):
    """Runs last in this module: everything above was logged and answered by then."""
    key = router[1]
    log = proxy[1].read_text(errors="replace")
    assert "bandit-router/auto" in log and len(seen) >= 30, "nothing was checked"
    assert key not in log
    assert key[4:] not in log  # not even without its brt_ prefix
    assert not [s for s in seen if key in s]
    assert not [r for r in upstream.requests if key in str(r.headers) or key in str(r.body)]
    # The upstream got its own key, from the deployment's os.environ/ reference.
    assert upstream.calls("cheap")[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
