"""Forgetting in embedded mode: with a half-life every feedback weighs by the age of its
DECISION (``decisions.created_at``), as in distributed mode, exactly and whatever order
the feedback arrives in; live, after a restart (checkpoint + replay) and in an isolated
tenant's rebuild alike. Without a half-life the statistics are those of plain updates.

Decisions get their ages by moving their stored ``created_at`` back (the service reads
it from the database when feedback arrives, as it does for every decision).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from bandit import Policy
from service.app import create_app
from service.db import models as m
from service.routing import RoutingService
from tests.service.conftest import DIM, add_model, create_tenant, decide, make_settings

HALF_LIFE = 24.0
PROBES = np.random.default_rng(5).standard_normal((4, DIM))


@dataclass(frozen=True)
class Made:
    """A decision as stored: its id, model, context and created_at (seconds)."""

    decision_id: str
    model: str
    x: np.ndarray
    at: float


@dataclass(frozen=True)
class Sent:
    """One feedback event sent (and applied)."""

    made: Made
    outcome: dict[str, float]
    event_id: str | None = None


def routing_of(client: TestClient) -> RoutingService:
    return client.app.state.routing


def make_decisions(client: TestClient, tenant: dict[str, str], models: list[str],
                   hours_ago: list[float], seed: int) -> list[Made]:
    """One decision per entry of ``hours_ago``, stored with that age."""
    routing = routing_of(client)
    bodies = []
    for i in range(len(hours_ago)):
        r = decide(client, tenant, models, seed=seed + i)
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    assert routing.writer.flush(timeout=10.0)
    now = datetime.now(UTC)
    made = []
    with Session(routing.engine) as session, session.begin():
        for body, hours in zip(bodies, hours_ago, strict=True):
            moved = session.execute(update(m.DecisionRow)
                                    .where(m.DecisionRow.id == body["decision_id"])
                                    .values(created_at=now - timedelta(hours=hours)))
            assert moved.rowcount == 1
        session.flush()
        for body in bodies:
            row = session.get(m.DecisionRow, body["decision_id"])
            assert row is not None
            made.append(Made(row.id, row.model, np.frombuffer(row.context, dtype="<f8"),
                             m.as_utc(row.created_at).timestamp()))
    return made


def send(client: TestClient, tenant: dict[str, str], made: list[Made], seed: int,
         event_id: str | None = None) -> list[Sent]:
    """Feedback for ``made``, in that order (every head reported)."""
    rng = np.random.default_rng(seed)
    sent = []
    for d in made:
        outcome = {"quality": float(rng.uniform(0.0, 1.0)),
                   "cost_usd": float(rng.uniform(0.0, 0.01)),
                   "latency_ms": float(rng.uniform(50.0, 2000.0))}
        body: dict[str, object] = {"decision_id": d.decision_id, **outcome}
        if event_id is not None:
            body["event_id"] = event_id
        r = client.post("/v1/feedback", json=body, headers=tenant)
        assert r.status_code == 202 and r.json()["status"] == "applied", r.text
        sent.append(Sent(d, outcome, event_id))
    return sent


def shuffled(made: list[Made], seed: int) -> list[Made]:
    """``made`` in an order that is not the decisions' time order."""
    order = np.random.default_rng(seed).permutation(len(made))
    out = [made[i] for i in order]
    assert [d.at for d in out] != sorted(d.at for d in out)
    return out


def reference(routing: RoutingService, kind: str, sent: list[Sent]) -> Policy:
    """The rule itself: a fresh policy of the service's fed every event in one batch,
    each weighted by its decision's age (``update_batch(times=...)``)."""
    policy = routing.policies.new_policy(kind)  # noqa: SLF001 - the service's own builder
    policy.update_batch([s.made.model for s in sent], np.stack([s.made.x for s in sent]),
                        [s.outcome for s in sent], times=[s.made.at for s in sent],
                        watch_drift=False)
    return policy


def assert_same_sums(actual: Policy, expected: Policy, tol: float = 1e-9) -> None:
    """Every arm's data sums equal (to ``tol`` relative to each array's scale), at one
    reference time: sums taken at T and at T' > T differ by 0.5 ** ((T' - T) / h), so
    the one with the earlier reference time is decayed to the later first."""
    a, e = copy.deepcopy(actual), copy.deepcopy(expected)
    assert a.reference_time is not None and e.reference_time is not None
    t = max(a.reference_time, e.reference_time)
    a.decay(t)
    e.decay(t)
    assert a.arms == e.arms
    for name in e.arms:
        assert a.observations(name) == e.observations(name), name
        i, j = a._index[name], e._index[name]  # noqa: SLF001
        sa, se = a._stats, e._stats  # noqa: SLF001 - the sums are what is under test
        pairs = {"a_data": (sa.matrices_of(i, "a_data"), se.matrices_of(j, "a_data"))}
        for array in ("b_data", "srr", "weight"):
            pairs[array] = (getattr(sa, array)[i], getattr(se, array)[j])
        for array, (got, want) in pairs.items():
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale,
                                       err_msg=f"{array} of {name}")


def assert_same_predictions(actual: Policy, expected: Policy, models: list[str]) -> None:
    for x in PROBES:
        got, want = actual.predict(x, candidates=models), expected.predict(x,
                                                                           candidates=models)
        for name in models:
            np.testing.assert_allclose(
                [got[name].quality, got[name].cost_usd, got[name].latency_ms,
                 got[name].uncertainty],
                [want[name].quality, want[name].cost_usd, want[name].latency_ms,
                 want[name].uncertainty], rtol=1e-9, atol=1e-9, err_msg=name)


def assert_no_drift(policies: dict[str, Policy]) -> None:
    """The drift detector rescales statistics in arrival order; these checks assume it
    did not fire (it would make the comparison with one batch meaningless)."""
    for kind, policy in policies.items():
        assert not any(policy.drift_events.values()), (kind, policy.drift_events)


def forgetting_app(url: str) -> TestClient:
    return TestClient(create_app(make_settings(url, half_life_hours=HALF_LIFE)))


# --------------------------------------------------------------------------- tests
def test_apply_feedback_out_of_order_equals_event_time_reference(new_database_url):
    with forgetting_app(new_database_url()) as client:
        routing = routing_of(client)
        models = [add_model(client, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1))
                  for i in range(3)]
        tenant = create_tenant(client)
        hours = np.random.default_rng(1).uniform(0.0, 240.0, 30).tolist()
        made = make_decisions(client, tenant, models, hours, seed=0)
        sent = send(client, tenant, shuffled(made, seed=2), seed=3)
        assert_no_drift(routing.shared)
        for kind, policy in routing.shared.items():
            ref = reference(routing, kind, sent)
            # The reference time is the newest decision's (to within one decay step).
            assert ref.reference_time == max(d.at for d in made)
            assert policy.reference_time is not None
            assert ref.reference_time - 60.0 <= policy.reference_time <= ref.reference_time
            assert_same_sums(policy, ref)


def test_apply_late_feedback_weighs_half_life_power_of_decision_age(new_database_url):
    with forgetting_app(new_database_url()) as client:
        routing = routing_of(client)
        model = add_model(client, "only")
        tenant = create_tenant(client)
        old, new = make_decisions(client, tenant, [model], [48.0, 0.0], seed=0)
        # The feedback about the new decision comes first, the old one's a while later.
        send(client, tenant, [new], seed=1)
        send(client, tenant, [old], seed=2)
        late = 0.5 ** ((new.at - old.at) / 3600.0 / HALF_LIFE)
        assert abs(late - 0.25) < 1e-3  # 48 hours: two half-lives
        for kind, policy in routing.shared.items():
            assert policy.reference_time == new.at, kind
            weight = policy._stats.weight[policy._index[model]]  # noqa: SLF001
            np.testing.assert_allclose(weight, [1.0 + late] * 3, rtol=0, atol=1e-12,
                                       err_msg=kind)
            assert policy.observations(model) == {"quality": 2, "cost": 2, "latency": 2}


def test_restart_after_crash_replay_equals_live_by_decision_time(new_database_url):
    url = new_database_url()
    with forgetting_app(url) as c1:
        routing = routing_of(c1)
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant = create_tenant(c1)
        rng = np.random.default_rng(11)
        first = make_decisions(c1, tenant, models, rng.uniform(0, 200, 15).tolist(), seed=0)
        sent = send(c1, tenant, shuffled(first, seed=1), seed=2)
        assert routing.checkpoint(force=True)
        second = make_decisions(c1, tenant, models, rng.uniform(0, 200, 15).tolist(),
                                seed=100)
        sent += send(c1, tenant, shuffled(second, seed=3), seed=4)
        # Late feedback (another event) about decisions from before the checkpoint.
        sent += send(c1, tenant, first[::3], seed=5, event_id="late")
        assert_no_drift(routing.shared)
        with routing.policies.lock:  # noqa: SLF001
            live = {kind: copy.deepcopy(p) for kind, p in routing.shared.items()}
        # c1 never checkpoints again: for the database this is a process killed with -9.
        with forgetting_app(url) as c2:
            recovered = routing_of(c2).shared
            for kind, policy in live.items():
                assert recovered[kind].reference_time == policy.reference_time, kind
                assert_same_sums(recovered[kind], policy)
                assert_same_predictions(recovered[kind], policy, models)
                assert_same_sums(policy, reference(routing, kind, sent))


def test_rebuild_isolated_tenant_equals_live_by_decision_time(new_database_url):
    url = new_database_url()
    with forgetting_app(url) as c1:
        routing = routing_of(c1)
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant, other = create_tenant(c1, "own"), create_tenant(c1, "other")
        tenant_id = tenant["X-Tenant"]
        rng = np.random.default_rng(21)
        own = make_decisions(c1, tenant, models, rng.uniform(0, 200, 12).tolist(), seed=0)
        sent = send(c1, tenant, shuffled(own, seed=1), seed=2)
        theirs = make_decisions(c1, other, models, rng.uniform(0, 200, 8).tolist(), seed=50)
        send(c1, other, theirs, seed=3)
        assert routing.checkpoint(force=True)
        # Turned isolated: its pair is rebuilt from its feedback so far, then learns live.
        r = c1.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=tenant)
        assert r.status_code == 200
        more = make_decisions(c1, tenant, models, rng.uniform(0, 200, 12).tolist(), seed=100)
        sent += send(c1, tenant, shuffled(more, seed=4), seed=5)
        sent += send(c1, tenant, own[::3], seed=6, event_id="late")
        send(c1, other, make_decisions(c1, other, models, [1.0, 30.0], seed=150), seed=7)
        with routing.policies.lock:  # noqa: SLF001
            live = {kind: copy.deepcopy(p) for kind, p in routing.isolated[tenant_id].items()}
        assert_no_drift(live)
        with routing.policies.apply_lock:  # noqa: SLF001 - as tenant_changed calls it
            rebuilt = routing.policies.rebuild_isolated(  # noqa: SLF001
                tenant_id, routing.last_feedback_id)
        for kind, policy in live.items():
            assert rebuilt[kind].reference_time == policy.reference_time, kind
            assert_same_sums(rebuilt[kind], policy)
            assert_same_predictions(rebuilt[kind], policy, models)
            assert_same_sums(policy, reference(routing, kind, sent))
        # After a crash: rebuilt up to the checkpoint (taken while it was shared), then
        # the replay adds the rest.
        with forgetting_app(url) as c2:
            recovered = routing_of(c2).isolated[tenant_id]
            for kind, policy in live.items():
                assert recovered[kind].reference_time == policy.reference_time, kind
                assert_same_sums(recovered[kind], policy)
                assert_same_predictions(recovered[kind], policy, models)


def test_apply_without_half_life_equals_plain_updates(new_database_url):
    """No half-life: the cheap rank-one updates in arrival order, bit for bit as before
    (decision ages play no part, no reference time)."""
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        routing = routing_of(client)
        models = [add_model(client, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1))
                  for i in range(3)]
        tenant = create_tenant(client)
        hours = np.random.default_rng(31).uniform(0.0, 240.0, 20).tolist()
        made = make_decisions(client, tenant, models, hours, seed=0)
        sent = send(client, tenant, shuffled(made, seed=1), seed=2)
        for kind, policy in routing.shared.items():
            plain = routing.policies.new_policy(kind)  # noqa: SLF001
            for s in sent:
                plain.update(s.made.model, s.made.x, s.outcome)
            assert policy.reference_time is None and plain.reference_time is None
            got, want = policy._stats, plain._stats  # noqa: SLF001
            for array in ("s_data", "a_data", "b_data", "srr", "weight", "count",
                          "s_inv", "a_inv", "theta", "sigma2", "updates"):
                np.testing.assert_array_equal(getattr(got, array), getattr(want, array),
                                              err_msg=f"{kind}: {array}")
