"""The plug-in in a real LiteLLM Proxy with LiteLLM's cooldowns on (its default; the other
proxy module turns them off): a deployment LiteLLM cooled down is not offered to the
router, so the request succeeds on another instead of ending with LiteLLM's "No
deployments left after routing-plugin filtering".

    openai SDK -> LiteLLM proxy (our plug-in, cooldowns on) -> fake upstream
                        \\-> our service (embedded mode, SQLite, loopback socket)
"""

from __future__ import annotations

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

from service.client import RouterClient  # noqa: E402
from tests.fakes.openai_upstream import FakeModel, running_upstream  # noqa: E402
from tests.service.conftest import ADMIN_KEY, make_settings  # noqa: E402
from tests.service.live import live_server  # noqa: E402

GROUP = "bandit-router/cool"
LIMITED, STEADY = "openai/limited", "openai/steady"
#: Seconds LiteLLM keeps a deployment out after a 429: longer than the test.
COOLDOWN_S = 300
ANSWERS = {"limited": FakeModel("never seen", status=429, retry_after_s=COOLDOWN_S),
           "steady": FakeModel("The steady model answers.", prompt_tokens=9,
                               completion_tokens=4)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(openai client to the proxy, router client of the tenant, fake upstream)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('router') / 'router.db'}"
    with running_upstream(ANSWERS) as upstream, \
            live_server(make_settings(url, featurizer="hashing")) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            key = admin.create_tenant(f"cool-{uuid.uuid4().hex[:6]}").api_key
            # limited is believed better before any feedback: chosen first.
            admin.add_model(LIMITED, 1.0, 2.0, prior_quality=0.9)
            admin.add_model(STEADY, 1.0, 2.0)
        learn_defaults_at_once(base, key)
        config = {
            "model_list": [{"model_name": GROUP, "litellm_params": {
                "model": f"openai/{name}", "api_base": upstream.base_url + "/v1",
                "api_key": "sk-fake-upstream"}} for name in ANSWERS],
            "router_settings": {"plugins": ["bandit_router_litellm.router"],
                                "num_retries": 0, "cooldown_time": COOLDOWN_S},
            "litellm_settings": {"callbacks": ["bandit_router_litellm.router"]},
            "general_settings": {"master_key": MASTER_KEY},
        }
        env = {"BANDIT_ROUTER_URL": base, "BANDIT_ROUTER_API_KEY": key,
               "BANDIT_ROUTER_LITELLM_GROUPS": GROUP,
               "BANDIT_ROUTER_LITELLM_TIMEOUT_S": "20"}
        with running_proxy(config, tmp_path_factory.mktemp("litellm"), env) as (proxy, _), \
                openai.OpenAI(base_url=proxy + "/v1", api_key=MASTER_KEY, max_retries=0,
                              timeout=60.0) as client, RouterClient(base, key) as tenant:
            yield client, tenant, upstream


def _ask(client: openai.OpenAI, i: int):
    return client.chat.completions.with_raw_response.create(
        model=GROUP, messages=[{"role": "user", "content": f"Question number {i}?"}])


def test_proxy_deployment_in_cooldown_is_not_chosen(setup):
    client, tenant, upstream = setup
    # 1. Until the router picks limited: its 429 puts it in LiteLLM's cooldown.
    for i in range(10):
        try:
            raw = _ask(client, i)
        except openai.RateLimitError as exc:
            decision_id = exc.response.headers["x-bandit-router-decision-id"]
            assert decision_with_feedback(tenant, decision_id)["model"] == LIMITED
            break
        assert raw.headers["x-bandit-router-model"] == STEADY
    else:
        pytest.fail("the router never chose limited (prior quality 0.9)")
    limited_calls = len(upstream.calls("limited"))
    assert limited_calls == 1
    # 2. While it cools down: every request is decided among the others and succeeds.
    for i in range(8):
        raw = _ask(client, 100 + i)  # an error here is the bug: "No deployments left"
        assert raw.parse().choices[0].message.content == ANSWERS["steady"].content
        assert raw.headers["x-bandit-router-model"] == STEADY
        decision = decision_with_feedback(tenant, raw.headers["x-bandit-router-decision-id"],
                                          rated=True)
        assert set(decision["predictions"]) == {STEADY}  # limited was not a candidate
        assert [f["quality"] for f in decision["feedback"]
                if f["quality"] is not None] == [1.0]
    assert len(upstream.calls("limited")) == limited_calls
