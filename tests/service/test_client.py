"""service.client against the real service on a loopback socket (uvicorn in a thread).

One server per module on SQLite (the client does not care which database is behind;
the API tests run both). Retries are checked with a transport that answers 503/429 a few
times before forwarding to the real server, and with the real budget 429.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import httpx
import pytest

from service.client import (
    AsyncRouterClient,
    DecideResult,
    RetryPolicy,
    RouterClient,
    RouterError,
    TenantPreferences,
    Usage,
    Weights,
)
from tests.service.conftest import ADMIN_KEY, make_settings
from tests.service.live import live_server


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('client') / 'router.db'}"
    with live_server(make_settings(url, featurizer="hashing")) as base:
        yield base


@pytest.fixture(scope="module")
def admin(base_url):
    with RouterClient(base_url, ADMIN_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def models(admin):
    suffix = uuid.uuid4().hex[:6]
    return [admin.add_model(f"cheap-{suffix}", 0.1, 0.4).name,
            admin.add_model(f"strong-{suffix}", 3.0, 15.0, prior_quality=0.9).name]


@pytest.fixture
def tenant(admin):
    created = admin.create_tenant(f"t-{uuid.uuid4().hex[:6]}")
    assert created.api_key.startswith("brt_")
    return created


@pytest.fixture
def client(base_url, tenant):
    with RouterClient(base_url, tenant.api_key,
                      retry=RetryPolicy(backoff_s=0.01, max_backoff_s=0.05)) as c:
        yield c


class FlakyTransport(httpx.BaseTransport):
    """Answers the first ``failures`` requests itself (status, Retry-After), then forwards
    every request to the real server."""

    def __init__(self, failures: int, status: int = 503, retry_after: str | None = "0") -> None:
        self.failures = failures
        self.status = status
        self.retry_after = retry_after
        self.seen = 0
        self._real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen += 1
        if self.seen <= self.failures:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return httpx.Response(self.status, headers=headers, json={
                "type": "https://bandit-router.dev/problems/backpressure",
                "title": "Service unavailable", "status": self.status,
                "detail": "the decision log is behind; retry shortly"})
        return self._real.handle_request(request)

    def close(self) -> None:
        self._real.close()


# ------------------------------------------------------------------ decide/feedback
def test_decide_client_returns_typed_decision(client, models):
    decision = client.decide("Prove that sqrt(2) is irrational.", candidates=models)
    assert isinstance(decision, DecideResult)
    assert decision.model in models
    assert set(decision.predictions) == set(models)
    assert 0.0 < decision.propensity <= 1.0
    assert decision.policy == "select" and decision.scope == "shared"
    uuid.UUID(decision.decision_id)


def test_feedback_client_duplicate_event_is_no_op(client, models):
    decision = client.decide("hello", candidates=models)
    first = client.feedback(decision.decision_id, quality=0.7, event_id="e-1")
    again = client.feedback(decision.decision_id, quality=0.7, event_id="e-1")
    assert (first.status, again.status) == ("applied", "duplicate")
    assert client.decision(decision.decision_id)["feedback"][0]["quality"] == pytest.approx(0.7)


def test_raise_error_invalid_feedback_carries_problem_fields(client, models):
    decision = client.decide("hello", candidates=models)
    with pytest.raises(RouterError) as caught:
        client.feedback(decision.decision_id, quality=2.0)
    err = caught.value
    assert err.status == 422 and err.attempts == 1
    assert "quality" in err.fields
    assert err.type.endswith("/invalid-input") and err.title == "Invalid input"
    assert err.errors[0]["allowed"] == "a number <= 1.0"


def test_raise_error_unknown_decision_404(client):
    with pytest.raises(RouterError) as caught:
        client.feedback(str(uuid.uuid4()), quality=0.5)
    assert caught.value.status == 404
    assert "does not exist" in caught.value.detail


def test_reject_decide_admin_key_403(admin, models):
    with pytest.raises(RouterError) as caught:
        admin.decide("hi", candidates=models)
    assert caught.value.status == 403
    assert "tenant API key" in caught.value.detail


def test_decide_client_requires_exactly_one_query_kind(client):
    with pytest.raises(ValueError, match="exactly one"):
        client.decide("text", embedding=[0.0] * 8)


# --------------------------------------------------------------------------- route
def test_route_client_posts_measured_latency_and_cost(client, models):
    calls = []

    def call_llm(model: str) -> dict:
        calls.append(model)
        time.sleep(0.05)
        return {"output": f"answer from {model}", "cost_usd": 0.0021}

    routed = client.route("Write a haiku about queues.", call_llm, candidates=models)
    assert calls == [routed.model]
    assert routed.output == f"answer from {routed.model}"
    assert routed.feedback is not None and routed.feedback.status == "applied"
    assert 50.0 <= routed.latency_ms < 5000.0
    stored = client.decision(routed.decision.decision_id)
    assert stored["charged_usd"] == pytest.approx(0.0021)
    [fb] = stored["feedback"]
    assert fb["cost_usd"] == pytest.approx(0.0021)
    assert fb["latency_ms"] == pytest.approx(routed.latency_ms, rel=1e-9)
    assert fb["quality"] is None

    later = routed.send_quality(0.8)
    assert later.status == "applied"
    qualities = [f["quality"] for f in client.decision(routed.decision.decision_id)["feedback"]]
    assert qualities == [None, pytest.approx(0.8)]


def test_route_client_object_result_and_quality_function(client, models):
    class Reply:
        output = "42"
        cost_usd = 0.5

    routed = client.route("What is 6 x 7?", lambda model: Reply(), candidates=models,
                          quality=lambda reply: 1.0 if reply.output == "42" else 0.0)
    [fb] = client.decision(routed.decision.decision_id)["feedback"]
    assert (fb["quality"], fb["cost_usd"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert routed.output == "42"


def test_route_client_llm_error_posts_nothing(client, models):
    decided: list[DecideResult] = []
    original = client.decide

    def spy(*args, **kwargs):
        decided.append(original(*args, **kwargs))
        return decided[-1]

    client.decide = spy  # type: ignore[method-assign]

    def broken(model: str) -> dict:
        raise TimeoutError("the provider timed out")

    with pytest.raises(TimeoutError):
        client.route("hi", broken, candidates=models)
    assert client.decision(decided[0].decision_id)["feedback"] == []


def test_route_async_client_awaits_llm_function(base_url, tenant, models):
    async def main() -> tuple:
        async with AsyncRouterClient(base_url, tenant.api_key) as router:
            async def call_llm(model: str) -> dict:
                await asyncio.sleep(0.02)
                return {"output": model.upper(), "cost_usd": 0.001}

            routed = await router.route("async please", call_llm, candidates=models)
            await routed.send_quality(0.6)
            return routed, await router.decision(routed.decision.decision_id)

    routed, stored = asyncio.run(main())
    assert routed.output == routed.model.upper()
    assert routed.latency_ms >= 20.0
    assert [f["quality"] for f in stored["feedback"]] == [None, pytest.approx(0.6)]
    assert stored["feedback"][0]["cost_usd"] == pytest.approx(0.001)


# --------------------------------------------------------------------------- retries
def test_retry_client_503_then_success_honours_retry_after(base_url, tenant, models):
    waits: list[float] = []
    transport = FlakyTransport(failures=2, status=503, retry_after="1")
    with RouterClient(base_url, tenant.api_key, transport=transport, sleep=waits.append,
                      retry=RetryPolicy(max_attempts=3, backoff_s=0.01)) as c:
        decision = c.decide("retry me", candidates=models)
    assert decision.model in models
    assert transport.seen == 3
    # Retry-After: 1 wins over a backoff of at most 0.01-0.02 s.
    assert waits == [1.0, 1.0]


def test_retry_client_429_backoff_grows_with_jitter(base_url, tenant, models):
    waits: list[float] = []
    transport = FlakyTransport(failures=3, status=429, retry_after=None)
    policy = RetryPolicy(max_attempts=4, backoff_s=0.1, max_backoff_s=10.0)
    with RouterClient(base_url, tenant.api_key, transport=transport, sleep=waits.append,
                      retry=policy) as c:
        usage = c.usage()
    assert isinstance(usage, Usage) and usage.tenant_id == tenant.id
    assert len(waits) == 3
    for n, wait in enumerate(waits, start=1):
        assert 0.0 <= wait <= 0.1 * 2 ** (n - 1)


def test_retry_client_gives_up_after_max_attempts(base_url, tenant, models):
    waits: list[float] = []
    transport = FlakyTransport(failures=100, status=503, retry_after="0")
    with RouterClient(base_url, tenant.api_key, transport=transport, sleep=waits.append,
                      retry=RetryPolicy(max_attempts=3, backoff_s=0.0)) as c:
        with pytest.raises(RouterError) as caught:
            c.decide("never", candidates=models)
    assert caught.value.status == 503 and caught.value.attempts == 3
    assert caught.value.detail == "the decision log is behind; retry shortly"
    assert transport.seen == 3 and len(waits) == 2


def test_retry_client_budget_429_raised_without_waiting(admin, base_url, models):
    created = admin.create_tenant("broke")
    admin.put_preferences(created.id, budget_usd_per_day=0.0, on_budget_exhausted="reject")
    waits: list[float] = []
    with RouterClient(base_url, created.api_key, sleep=waits.append) as c:
        with pytest.raises(RouterError) as caught:
            c.decide("expensive", candidates=models)
    err = caught.value
    assert err.status == 429 and err.retry_after == pytest.approx(3600.0)
    assert err.type.endswith("/budget-exhausted") and "budget" in err.detail
    # Retry-After 3600 s > max_retry_wait_s: raised at once, not after an hour.
    assert waits == [] and err.attempts == 1


def test_retry_client_connection_refused_is_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    waits: list[float] = []
    with RouterClient(f"http://127.0.0.1:{port}", "brt_x", sleep=waits.append,
                      retry=RetryPolicy(max_attempts=3, backoff_s=0.0)) as c:
        with pytest.raises(RouterError) as caught:
            c.decide("anyone there?")
    assert caught.value.status == 0 and caught.value.attempts == 3
    assert "ConnectError" in caught.value.detail and len(waits) == 2


def test_timeout_client_read_timeout_not_retried_for_decide():
    # A socket that accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        waits: list[float] = []
        with RouterClient(f"http://127.0.0.1:{port}", "brt_x", timeout=0.2,
                          sleep=waits.append) as c:
            started = time.monotonic()
            with pytest.raises(RouterError) as caught:
                c.decide("slow")
            elapsed = time.monotonic() - started
    assert caught.value.status == 0 and "ReadTimeout" in caught.value.detail
    # A decide may have reached the server: not repeated (it would make a second decision).
    assert caught.value.attempts == 1 and waits == []
    assert elapsed < 5.0


def test_wait_retry_policy_rejects_bad_attempts():
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# ---------------------------------------------------------------- preferences/usage
def test_put_preferences_client_changes_only_given_fields(client):
    before = client.get_preferences()
    assert isinstance(before, TenantPreferences) and before.budget_usd_per_day is None
    after = client.put_preferences(weights=Weights(quality=1.0, cost=250.0),
                                   budget_usd_per_day=5.0)
    assert after.weights == Weights(quality=1.0, cost=250.0, latency=0.0)
    assert after.budget_usd_per_day == pytest.approx(5.0)
    assert after.policy == before.policy
    cleared = client.put_preferences(budget_usd_per_day=None)
    assert cleared.budget_usd_per_day is None and cleared.weights.cost == pytest.approx(250.0)


def test_put_preferences_client_unknown_field_value_error(client):
    with pytest.raises(ValueError, match="unknown preference field"):
        client.put_preferences(budget=3.0)


def test_get_usage_client_counts_decisions(client, models):
    for i in range(3):
        client.decide(f"count me {i}", candidates=models)
    usage = client.usage()
    assert usage.decisions_today == 3 and usage.decisions_month == 3
    assert sum(usage.model_share_month.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------- admin
def test_list_tenants_admin_shows_created_tenant(admin, tenant):
    listed = {t.id: t for t in admin.list_tenants()}
    assert listed[tenant.id].name == tenant.name
    assert listed[tenant.id].spend_usd_today == pytest.approx(0.0)


def test_rotate_key_admin_old_key_rejected(admin, base_url, tenant, models):
    rotated = admin.rotate_tenant_key(tenant.id)
    assert rotated.id == tenant.id and rotated.api_key != tenant.api_key
    with RouterClient(base_url, tenant.api_key) as old:
        with pytest.raises(RouterError) as caught:
            old.usage()
    assert caught.value.status == 401 and caught.value.detail == "unknown API key"
    with RouterClient(base_url, rotated.api_key) as new:
        assert new.usage().tenant_id == tenant.id


def test_rotate_key_admin_unknown_tenant_404(admin):
    with pytest.raises(RouterError) as caught:
        admin.rotate_tenant_key(str(uuid.uuid4()))
    assert caught.value.status == 404 and "does not exist" in caught.value.detail


def test_update_model_admin_price_and_disable(admin):
    name = admin.add_model(f"m-{uuid.uuid4().hex[:6]}", 1.0, 2.0).name
    changed = admin.update_model(name, input_price_per_mtok=0.5, enabled=False)
    assert changed.input_price_per_mtok == pytest.approx(0.5) and changed.enabled is False
    assert {m.name: m.enabled for m in admin.list_models()}[name] is False
    admin.delete_model(name)
    assert name not in {m.name for m in admin.list_models()}
    assert {m.name: m.deleted for m in admin.list_models(include_deleted=True)}[name] is True


def test_add_model_admin_duplicate_409(admin, models):
    with pytest.raises(RouterError) as caught:
        admin.add_model(models[0], 1.0, 1.0)
    assert caught.value.status == 409 and caught.value.fields == ["name"]


def test_get_preferences_admin_for_tenant_and_tenant_key_forbidden(admin, client, tenant):
    prefs = admin.get_preferences(tenant.id)
    assert prefs.weights == Weights()
    with pytest.raises(RouterError) as caught:
        client.get_preferences(tenant.id)  # a tenant key on an admin endpoint
    assert caught.value.status == 403 and "admin key" in caught.value.detail


def test_decision_old_client_name_warns_and_is_decide_result():
    import bandit_router_client

    import service.client

    for module in (bandit_router_client, service.client):
        with pytest.warns(DeprecationWarning, match="DecideResult"):
            assert module.Decision is DecideResult
    with pytest.raises(AttributeError, match="NoSuchName"):
        bandit_router_client.NoSuchName  # noqa: B018


def test_model_names_with_dot_segments_reach_their_own_model(admin):
    """A name may hold ``/`` and ``.`` (docs/litellm.md's ``openai/gpt-4o-mini``): the
    client quotes it, so ``a/../b`` is not sent as ``b`` (httpx collapses dot segments
    of an unquoted path: disabling ``a/../b`` disabled ``b``)."""
    suffix = uuid.uuid4().hex[:6]
    dotted, plain = f"a{suffix}/../b{suffix}", f"b{suffix}"
    admin.add_model(plain, 0.1, 0.4)
    admin.add_model(dotted, 0.1, 0.4)
    assert admin.update_model(dotted, enabled=False).name == dotted
    listed = {m.name: m.enabled for m in admin.list_models()}
    assert listed[dotted] is False and listed[plain] is True
    admin.delete_model(dotted)
    assert plain in {m.name for m in admin.list_models()}
    assert dotted not in {m.name for m in admin.list_models()}
