"""Micro-batched decides: a batch decides each request as one ``decide`` would."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bandit import InvalidInputError, Policy, Preferences
from service.app import create_app
from service.routing import DecideArgs
from tests.service.conftest import (
    ADMIN,
    DIM,
    add_model,
    assert_problem,
    create_tenant,
    embedding,
    make_settings,
)


def test_decide_many_equals_policy_decide_batch_row_by_row(new_database_url):
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        models = [add_model(client, f"b-{i}", 0.5 * (i + 1), 2.0 * (i + 1),
                            prior_quality=0.5 + 0.1 * i) for i in range(4)]
        add_model(client, "b-cold", 0.1, 0.2)  # no prior quality: a score may be -inf
        service = client.app.state.routing
        a = service.tenant_for_key(create_tenant(client, "a")["Authorization"][7:])
        b = service.tenant_for_key(create_tenant(client, "b")["Authorization"][7:])
        # The tenants' policy (the default), random stream included.
        assert a.policy == b.policy
        twin = Policy.from_bytes(service.shared[a.policy].to_bytes())
        xs = [np.asarray(embedding(seed)) for seed in range(6)]
        override = Preferences(1.0, 10.0, 0.0)
        requests = [DecideArgs(a, xs[0], None, None), DecideArgs(b, xs[1], None, None),
                    DecideArgs(a, xs[2], models[:2], None, 120),  # a prompt of 120 tokens
                    DecideArgs(a, xs[3], ["nope"], None),  # unknown model: this one fails
                    DecideArgs(b, xs[4], None, override),
                    DecideArgs(a, xs[5], None, Preferences(0.0, 0.0, 0.0))]  # bad weights
        results = service.decide_many(requests)

        assert isinstance(results[3], InvalidInputError)
        assert results[3].field == "candidates"
        assert isinstance(results[5], InvalidInputError)
        # The groups, in order of first arrival: (default prefs, all), (subset), (override).
        everything = service.decider.candidates(None)
        expected = {}
        for rows, prefs, names in (([0, 1], Preferences(), everything),
                                   ([2], Preferences(), models[:2]),
                                   ([4], override, everything)):
            # Every decide is priced from the registry: prompt tokens (or the
            # prior_input_tokens setting) and prior_output_tokens.
            est = service.decider.price_estimates(names, [requests[i].input_tokens for i in rows])
            batch = twin.decide_batch(np.stack([xs[i] for i in rows]), prefs, names,
                                      cost_estimate=est)
            for r, i in enumerate(rows):
                expected[i] = (batch.decision(r), dict(zip(names, est.array[r].tolist(),
                                                           strict=True)))
        for i, (decision, prices) in expected.items():
            response = results[i].response
            assert response["model"] == decision.arm
            assert response["propensity"] == decision.propensity
            assert response["explored"] == decision.explored
            assert response["predictions"] == {n: {**p.as_dict(), "price_usd": prices[n]}
                                               for n, p in decision.predictions.items()}
            assert results[i].row["predictions"] is response["predictions"]
            assert results[i].row["context"] == xs[i].astype("<f8").tobytes()
        assert {results[i].tenant.id for i in (0, 2)} == {a.id}
        # Nothing was queued yet: decide_many only decides and reserves.
        assert service.writer.depth() == 0


def test_decide_many_paces_once_per_tenant_ask_and_fails_each_request_alone(
        new_database_url, monkeypatch):
    """Requests of one tenant with the same override and candidates are paced and
    checked once per batch (nothing they depend on changes while a batch is grouped);
    one that fails is not remembered: each gets its own exception."""
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        models = [add_model(client, f"p-{i}", prior_quality=0.5) for i in range(2)]
        service = client.app.state.routing
        a = service.tenant_for_key(create_tenant(client, "a")["Authorization"][7:])
        b = service.tenant_for_key(create_tenant(client, "b")["Authorization"][7:])
        paced: list[str] = []
        for tenant in (a, b):
            real = tenant.ledger.paced_cost_weight

            def counted(*args, _real=real, _id=tenant.id, **kwargs):
                paced.append(_id)
                return _real(*args, **kwargs)

            monkeypatch.setattr(tenant.ledger, "paced_cost_weight", counted)
        xs = [np.asarray(embedding(seed)) for seed in range(8)]
        requests = [DecideArgs(a, xs[0], None, None),
                    DecideArgs(a, xs[1], None, Preferences(0.0, 0.0, 0.0)),  # bad weights
                    DecideArgs(b, xs[2], None, None),
                    DecideArgs(a, xs[3], None, None),
                    DecideArgs(a, xs[4], None, Preferences(0.0, 0.0, 0.0)),
                    DecideArgs(a, xs[5], models[:1], None),
                    DecideArgs(a, xs[6], list(models[:1]), None),
                    DecideArgs(a, xs[7], None, Preferences(1.0, 2.0, 0.0))]
        results = service.decide_many(requests)

        assert sorted(paced) == sorted([a.id, b.id, a.id, a.id])
        assert isinstance(results[1], InvalidInputError)
        assert isinstance(results[4], InvalidInputError)
        assert results[1] is not results[4]
        assert results[1].field == results[4].field == "preferences"
        assert [results[i].response["model"] for i in (5, 6)] == [models[0]] * 2
        assert all(not isinstance(results[i], Exception) for i in (0, 2, 3, 5, 6, 7))
        assert len({results[i].row["id"] for i in (0, 2, 3, 5, 6, 7)}) == 6


def test_decide_many_checks_every_override_and_candidate_list_alone(new_database_url):
    """The batch's once-per-ask grouping keys an override by identity and fails an
    unusable candidate list alone: an override equal to a valid one but of another type
    (True for 1.0) is still refused, and unhashable candidates fail only their request."""
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        models = [add_model(client, f"p-{i}", prior_quality=0.5) for i in range(2)]
        service = client.app.state.routing
        a = service.tenant_for_key(create_tenant(client, "a")["Authorization"][7:])
        xs = [np.asarray(embedding(seed)) for seed in range(4)]
        requests = [DecideArgs(a, xs[0], None, Preferences(1.0, 0.0, 0.0)),
                    DecideArgs(a, xs[1], None, Preferences(True, 0.0, 0.0)),
                    DecideArgs(a, xs[2], [[models[0]]], None),  # type: ignore[list-item]
                    DecideArgs(a, xs[3], models[:1], None)]
        results = service.decide_many(requests)
        assert not isinstance(results[0], Exception)
        assert isinstance(results[1], InvalidInputError)
        assert results[1].field == "preferences.quality"
        assert isinstance(results[2], Exception)
        assert results[3].response["model"] == models[0]


@pytest.mark.parametrize("n", [24])
def test_concurrent_decides_are_batched_answered_and_stored(new_database_url, n):
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        models = [add_model(client, f"c-{i}") for i in range(3)]
        tenant = create_tenant(client)
        service = client.app.state.routing
        calls = []
        original = service.decide_many

        def counting(requests):
            calls.append(len(requests))
            return original(requests)

        service.decide_many = counting

        async def burst() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                bodies = [{"query": {"embedding": embedding(i)}} for i in range(n)]
                bodies[5] = {"query": {"embedding": [0.0] * (DIM + 1)}}
                bodies[7] = {"query": {"embedding": embedding(7)}, "candidates": ["nope"]}
                return await asyncio.gather(*(http.post(
                    "/v1/decide", json=body, headers={"Authorization":
                                                      tenant["Authorization"]})
                    for body in bodies))

        responses = client.portal.call(burst)
        assert max(calls) > 1, calls  # concurrent requests shared a policy call
        assert_problem(responses[5], 422, field="query.embedding")
        assert_problem(responses[7], 422, field="candidates")
        ok = [r.json() for i, r in enumerate(responses) if i not in (5, 7)]
        assert all(r.status_code == 200 for i, r in enumerate(responses) if i not in (5, 7))
        assert {d["model"] for d in ok} <= set(models)
        assert len({d["decision_id"] for d in ok}) == len(ok)
        assert service.writer.flush(10)
        usage = client.get("/v1/tenants/me/usage", headers=tenant).json()
        assert usage["decisions_today"] == len(ok)
        assert client.get("/v1/admin/models", headers=ADMIN).status_code == 200
