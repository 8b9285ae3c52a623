"""BanditRouter in-process against the real service on a loopback socket: the decision
half (LiteLLM's RoutingContext in, narrowed candidates out), the feedback half (LiteLLM's
callback kwargs in, feedback in the service out), failing open, and the settings.

The LiteLLM process itself is exercised in test_proxy.py; these cover the branches a
proxy run does not reach (an unreachable router, an unregistered deployment, a repeat).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta

import httpx
import pytest

pytest.importorskip("litellm", reason="the [litellm] extra is not installed "
                                      "(pip install -e '.[litellm]')")

from litellm.types.router import RoutingContext  # noqa: E402

from bandit_router_litellm import BanditRouter, PluginSettings  # noqa: E402
from bandit_router_litellm import plugin as plugin_module  # noqa: E402
from bandit_router_litellm.plugin import FEEDBACK_RETRY, SIGNAL  # noqa: E402
from bandit_router_litellm.settings import ENV_API_KEY, ENV_URL  # noqa: E402
from service.client import RouterClient, RouterError  # noqa: E402
from service.exceptions import UnavailableError  # noqa: E402
from tests.fakes.openai_upstream import refused_base_url  # noqa: E402
from tests.service.conftest import ADMIN_KEY, make_settings  # noqa: E402
from tests.service.live import live_server  # noqa: E402

GROUP = "bandit-router/auto"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('plugin') / 'router.db'}"
    with live_server(make_settings(url, featurizer="hashing")) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            key = admin.create_tenant(f"p-{uuid.uuid4().hex[:6]}").api_key
            models = [admin.add_model(f"openai/m{i}-{uuid.uuid4().hex[:4]}", 1.0, 2.0).name
                      for i in range(2)]
        yield base, key, models


def tenant_key(base: str) -> str:
    with RouterClient(base, ADMIN_KEY) as admin:
        return admin.create_tenant(f"p-{uuid.uuid4().hex[:6]}").api_key


@pytest.fixture
def tenant(router):
    with RouterClient(router[0], router[1]) as c:
        yield c


def _plugin(base: str, key: str) -> BanditRouter:
    return BanditRouter(PluginSettings(url=base, api_key=key, timeout_s=20.0))


def _context(candidates, group=GROUP, messages=MESSAGES) -> RoutingContext:
    return RoutingContext(raw_messages=messages, structured_messages=messages,
                          candidate_models=list(candidates),
                          metadata={"model_group": group})


def _run(plugin: BanditRouter, context: RoutingContext) -> RoutingContext:
    async def go() -> RoutingContext:
        try:
            return await plugin.run(context)
        finally:
            await plugin.aclose()
    return asyncio.run(go())


def _callback(plugin: BanditRouter, method: str, kwargs: dict, seconds: float) -> None:
    start = datetime(2026, 1, 1, 12, 0, 0)

    async def go() -> None:
        try:
            await getattr(plugin, method)(kwargs, None, start, start + timedelta(seconds=seconds))
        finally:
            await plugin.aclose()
    asyncio.run(go())


def test_run_narrows_candidates_to_the_decision(router, tenant):
    base, key, models = router
    context = _run(_plugin(base, key), _context(models))
    [chosen] = context.candidate_models
    signal = context.signals[SIGNAL]
    assert signal["model"] == chosen and chosen in models
    assert 0.0 < signal["propensity"] <= 1.0
    assert tenant.decision(signal["decision_id"])["model"] == chosen


def test_run_leaves_other_groups_alone(router):
    base, key, models = router
    # A refused URL: had the plug-in called the router for this group, it would warn.
    context = _run(_plugin(refused_base_url(), key), _context(models, group="other"))
    assert context.candidate_models == models and SIGNAL not in context.signals


@pytest.mark.parametrize("messages", [[{"role": "system", "content": "only a system"}],
                                      [{"role": "user", "content": "   "}]])
def test_run_without_user_text_leaves_choice_to_litellm(router, messages):
    base, key, models = router
    context = _run(_plugin(base, key), _context(models, messages=messages))
    assert context.candidate_models == models and SIGNAL not in context.signals


def test_run_fails_open_when_router_unreachable(router, caplog):
    _, key, models = router
    with caplog.at_level(logging.WARNING, logger="bandit_router_litellm"):
        context = _run(_plugin(refused_base_url(), key), _context(models))
    assert context.candidate_models == models and SIGNAL not in context.signals
    assert "no decision for bandit-router/auto" in caplog.text
    assert key not in caplog.text


def test_run_fails_open_on_unregistered_deployment(router, caplog):
    base, key, models = router
    candidates = [*models, "openai/not-registered"]
    with caplog.at_level(logging.WARNING, logger="bandit_router_litellm"):
        context = _run(_plugin(base, key), _context(candidates))
    assert context.candidate_models == candidates and SIGNAL not in context.signals
    assert "openai/not-registered" in caplog.text  # the router's detail names it
    assert key not in caplog.text


def _litellm_router(models: list[str]):
    """A real LiteLLM Router with one deployment of GROUP per model (never called)."""
    import litellm

    return litellm.Router(model_list=[
        {"model_name": GROUP, "litellm_params": {
            "model": m, "api_base": refused_base_url() + "/v1", "api_key": "sk-unused"}}
        for m in models])


def _cool_down(litellm_router, model: str) -> None:
    """Put ``model``'s deployment in cooldown the way LiteLLM does after a 429."""
    import litellm
    from litellm.router_utils.cooldown_handlers import set_cooldown_deployments

    [deployment] = [d for d in litellm_router.get_model_list(model_name=GROUP)
                    if d["litellm_params"]["model"] == model]

    async def go() -> bool:  # LiteLLM schedules its cooldown callback on the loop
        cooled = set_cooldown_deployments(
            litellm_router, original_exception=litellm.RateLimitError(
                "rate limited", llm_provider="openai", model=model),
            exception_status=429, deployment=deployment["model_info"]["id"],
            time_to_cooldown=60.0, requested_model_group=GROUP)
        await asyncio.sleep(0)
        return cooled
    assert asyncio.run(go())


def test_run_decides_only_among_deployments_litellm_would_call(router, tenant):
    base, key, models = router
    litellm_router = _litellm_router(models)
    _cool_down(litellm_router, models[0])
    plugin = BanditRouter(PluginSettings(url=base, api_key=key, timeout_s=20.0),
                          litellm_router=litellm_router)
    for _ in range(6):
        context = _run(plugin, _context(models))
        assert context.candidate_models == [models[1]]
        decision = tenant.decision(context.signals[SIGNAL]["decision_id"])
        # The router was asked about the callable deployment only.
        assert set(decision["predictions"]) == {models[1]}


def test_run_with_every_deployment_in_cooldown_leaves_litellm_to_answer(router, caplog):
    base, key, models = router
    litellm_router = _litellm_router(models)
    for m in models:
        _cool_down(litellm_router, m)
    plugin = BanditRouter(PluginSettings(url=base, api_key=key, timeout_s=20.0),
                          litellm_router=litellm_router)
    with caplog.at_level(logging.INFO, logger="bandit_router_litellm"):
        context = _run(plugin, _context(models))
    assert context.candidate_models == models and SIGNAL not in context.signals
    assert "every deployment of bandit-router/auto is in cooldown" in caplog.text


def test_run_keeps_candidates_the_litellm_router_does_not_list(router, caplog):
    """Deployments the Router does not list for the group (an alias, a wildcard route,
    another LiteLLM version's model list) are not taken for cooling down: the router
    still decides among them, with a warning naming them."""
    base, key, models = router
    litellm_router = _litellm_router(["openai/listed-elsewhere"])
    plugin = BanditRouter(PluginSettings(url=base, api_key=key, timeout_s=20.0),
                          litellm_router=litellm_router)
    with caplog.at_level(logging.WARNING, logger="bandit_router_litellm"):
        context = _run(plugin, _context(models))
    assert context.candidate_models[0] in models and len(context.candidate_models) == 1
    assert SIGNAL in context.signals
    assert "not among the deployments LiteLLM lists" in caplog.text


def _kwargs(decision: dict, model: str, call_id: str, cost: float | None = 0.0125) -> dict:
    return {"litellm_call_id": call_id, "response_cost": cost, "model": model,
            "litellm_params": {"model": model, "metadata": {
                "routing_plugin_signals": {SIGNAL: decision}}}}


def test_success_callback_posts_cost_latency_quality_once(router, tenant):
    base, key, models = router
    plugin = _plugin(base, key)
    decision = _run(plugin, _context(models)).signals[SIGNAL]
    kwargs = _kwargs(decision, decision["model"].removeprefix("openai/"), "call-1")
    _callback(plugin, "async_log_success_event", kwargs, 0.25)
    _callback(plugin, "async_log_success_event", kwargs, 0.25)  # LiteLLM repeating itself
    [fb] = tenant.decision(decision["decision_id"])["feedback"]
    # The success quality (1.0) is a default, learned after the tenant's wait (below).
    assert (fb["quality"], fb["cost_usd"], fb["latency_ms"]) == (None, 0.0125, 250.0)
    assert fb["event_id"] == "litellm-call-1"


def test_success_quality_is_replaced_by_the_clients_and_learned_without_it(router):
    """The plug-in's success quality is provisional (POST /v1/feedback
    default_quality): a client's quality within the tenant's quality_wait_seconds
    replaces it; without one it is learned once the wait is over. Before, both were
    learned: the call counted twice, once with the made-up 1.0."""
    base, _, models = router
    key = tenant_key(base)  # its own tenant: the wait is a tenant setting
    r = httpx.put(f"{base}/v1/tenants/me/gateway", json={"quality_wait_seconds": 1.0},
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    plugin = _plugin(base, key)
    ids = []
    for call in ("rated", "unrated"):
        decision = _run(plugin, _context(models)).signals[SIGNAL]
        _callback(plugin, "async_log_success_event",
                  _kwargs(decision, decision["model"].removeprefix("openai/"), call), 0.1)
        ids.append(decision["decision_id"])
    with RouterClient(base, key) as client:
        assert client.feedback(ids[0], quality=0.3, event_id="user").status == "applied"
        time.sleep(2.5)  # the wait (1 s) and the applier's rounds (0.5 s)
        rows = [{f["event_id"]: f["quality"] for f in client.decision(d)["feedback"]}
                for d in ids]
        assert rows == [{"litellm-rated": None, "user": 0.3},
                        {"litellm-unrated": None, "gateway-default": 1.0}], rows
        with pytest.raises(RouterError) as info:  # the default was learned: too late
            client.feedback(ids[1], quality=0.2, event_id="late")
        assert info.value.status == 409


def test_failure_callback_posts_failure_quality(router, tenant):
    base, key, models = router
    plugin = _plugin(base, key)
    decision = _run(plugin, _context(models)).signals[SIGNAL]
    _callback(plugin, "async_log_failure_event",
              _kwargs(decision, decision["model"], "call-2", cost=None), 1.5)
    [fb] = tenant.decision(decision["decision_id"])["feedback"]
    assert (fb["quality"], fb["cost_usd"], fb["latency_ms"]) == (0.0, None, 1500.0)
    # Final, as the router's gateway reports a failure: a client's later rating of the
    # failed call would count a second quality (409).
    with pytest.raises(RouterError) as info:
        tenant.feedback(decision["decision_id"], quality=0.9, event_id="user")
    assert info.value.status == 409
    assert len(tenant.decision(decision["decision_id"])["feedback"]) == 1


@contextmanager
def _refusing_router(tmp_path, monkeypatch, times: int,
                     retry_after_s: int) -> Iterator[tuple[BanditRouter, dict, list[str]]]:
    """A router whose sink answers the first ``times`` feedbacks 503 (its broker away:
    sent nothing, ``Retry-After``); the plug-in, the decision it got, the refused."""
    apps: list = []
    with live_server(make_settings(f"sqlite:///{tmp_path / 'router.db'}",
                                   featurizer="hashing"), prepare=apps.append) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            key = admin.create_tenant("retry").api_key
            models = [admin.add_model(f"openai/r{i}-{uuid.uuid4().hex[:4]}", 1.0, 2.0).name
                      for i in range(2)]
        sink = apps[0].state.routing.sink
        refused: list[str] = []
        submit = sink.submit

        def flaky(*args):
            if len(refused) < times:
                refused.append(args[1])
                raise UnavailableError("the feedback topic is unavailable (broker "
                                       "unreachable); retry", retry_after_s=retry_after_s,
                                       unsent=True)
            return submit(*args)
        monkeypatch.setattr(sink, "submit", flaky)
        plugin = _plugin(base, key)
        yield plugin, _run(plugin, _context(models)).signals[SIGNAL], refused


def _failure_callback(plugin: BanditRouter, kwargs: dict, refused: list[str]) -> int:
    """The failure callback, then the wait for its retries; how many feedbacks were
    refused when the callback returned."""
    start = datetime(2026, 1, 1, 12, 0, 0)

    async def go() -> int:
        try:
            await plugin.async_log_failure_event(kwargs, None, start,
                                                 start + timedelta(seconds=2))
            return len(refused)  # the callback did not wait for the retries
        finally:
            await plugin.aclose()  # waits for the post's retries
    return asyncio.run(go())


def test_feedback_refused_with_503_is_retried_off_the_callback(tmp_path, monkeypatch):
    """The router answers the failure's feedback 503 twice (its broker away: sent
    nothing, Retry-After 1): the callback returns after its first attempt, and a task
    retries until the feedback is taken; the failure's 0 is then final. Before, the
    plug-in posted once and logged the 503: the failure was never learned."""
    with _refusing_router(tmp_path, monkeypatch, 2, 1) as (plugin, decision, refused):
        kwargs = _kwargs(decision, decision["model"], "call-r", cost=None)
        assert _failure_callback(plugin, kwargs, refused) == 1
        assert refused == [decision["decision_id"]] * 2
        with RouterClient(plugin.settings.url, plugin.settings.api_key) as tenant:
            [fb] = tenant.decision(decision["decision_id"])["feedback"]
            assert (fb["event_id"], fb["quality"], fb["latency_ms"]) == (
                "litellm-call-r", 0.0, 2000.0)
            with pytest.raises(RouterError) as info:
                tenant.feedback(decision["decision_id"], quality=0.9, event_id="user")
            assert info.value.status == 409


def test_feedback_whose_retry_after_is_too_long_is_dropped(tmp_path, monkeypatch, caplog):
    """The router answers 503 with a Retry-After longer than FEEDBACK_RETRY waits: the
    feedback is dropped with a warning, not retried. Before, it was retried at once."""
    with _refusing_router(tmp_path, monkeypatch, 5, 3600) as (plugin, decision, refused):
        kwargs = _kwargs(decision, decision["model"], "call-long", cost=None)
        with caplog.at_level(logging.WARNING, logger="bandit_router_litellm"):
            assert _failure_callback(plugin, kwargs, refused) == 1
        assert refused == [decision["decision_id"]]
        assert "not posted" in caplog.text and "3600" in caplog.text


def test_feedback_retries_wait_as_documented():
    """docs/litellm.md: 4 more attempts, 0.5 s, 1 s, 2 s, 4 s apart (the full jitter's
    ceilings): the task's first wait, then its client's. Before: 0.5, 0.5, 1, 2 s."""
    first = replace(FEEDBACK_RETRY, jitter=False).wait(1, None)
    task = replace(plugin_module._TASK_RETRY, jitter=False)
    assert [first, *(task.wait(n, None) for n in range(1, task.max_attempts))] == [
        0.5, 1.0, 2.0, 4.0]
    assert task.max_attempts == FEEDBACK_RETRY.max_attempts == 4  # 5 attempts in all


def test_failure_callback_without_success_quality_posts_no_quality(router, tenant):
    base, key, models = router
    plugin = BanditRouter(PluginSettings(url=base, api_key=key, timeout_s=20.0,
                                         success_quality=None))
    decision = _run(plugin, _context(models)).signals[SIGNAL]
    _callback(plugin, "async_log_failure_event",
              _kwargs(decision, decision["model"], "call-5", cost=None), 0.5)
    [fb] = tenant.decision(decision["decision_id"])["feedback"]
    # Both sides or neither: with no quality for a success, none for a failure.
    assert (fb["quality"], fb["cost_usd"], fb["latency_ms"]) == (None, None, 500.0)


def test_callback_for_a_fallback_model_posts_nothing(router, tenant):
    base, key, models = router
    plugin = _plugin(base, key)
    decision = _run(plugin, _context(models)).signals[SIGNAL]
    _callback(plugin, "async_log_success_event",
              _kwargs(decision, "some-other-model", "call-3"), 0.1)
    assert tenant.decision(decision["decision_id"])["feedback"] == []


def test_callback_without_decision_posts_nothing(router):
    # A refused URL: a post would log a warning; there is nothing to post.
    plugin = _plugin(refused_base_url(), router[1])
    _callback(plugin, "async_log_success_event", {"litellm_params": {"metadata": {}}}, 0.1)


@pytest.mark.parametrize(("env", "message"), [
    ({}, f"{ENV_URL}, {ENV_API_KEY}: not set"),
    ({ENV_URL: "router:8000", ENV_API_KEY: "k"}, f"{ENV_URL}: must be an http(s) URL"),
    ({ENV_URL: "http://r", ENV_API_KEY: "k", "BANDIT_ROUTER_LITELLM_GROUPS": ""},
     "BANDIT_ROUTER_LITELLM_GROUPS: must name at least one"),
    ({ENV_URL: "http://r", ENV_API_KEY: "k", "BANDIT_ROUTER_LITELLM_SUCCESS_QUALITY": "2"},
     "BANDIT_ROUTER_LITELLM_SUCCESS_QUALITY: must be a quality in [0, 1]"),
    ({ENV_URL: "http://r", ENV_API_KEY: "k", "BANDIT_ROUTER_LITELLM_FAILURE_QUALITY": "x"},
     "BANDIT_ROUTER_LITELLM_FAILURE_QUALITY: must be a quality in [0, 1] (got 'x')"),
])
def test_settings_from_env_rejects_bad_values_naming_the_variable(env, message):
    with pytest.raises(ValueError) as caught:
        PluginSettings.from_env(env)
    assert message in str(caught.value)


def test_settings_success_quality_none_and_key_hidden():
    s = PluginSettings.from_env({ENV_URL: "http://r/", ENV_API_KEY: "brt_secret",
                                 "BANDIT_ROUTER_LITELLM_SUCCESS_QUALITY": "none",
                                 "BANDIT_ROUTER_LITELLM_GROUPS": "a, b"})
    assert (s.url, s.groups, s.success_quality) == ("http://r", ("a", "b"), None)
    assert "brt_secret" not in repr(s)


def test_run_with_unset_environment_raises_naming_the_variables(router, monkeypatch):
    """A misconfigured plug-in is loud (LiteLLM ends the routed request with the error)
    rather than silently leaving every request to LiteLLM."""
    for name in (ENV_URL, ENV_API_KEY):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=f"{ENV_URL}, {ENV_API_KEY}: not set"):
        _run(BanditRouter(), _context(router[2]))
