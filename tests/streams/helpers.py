"""Shared helpers of the streams tests: a world of tenants and decisions, event
production, waiting for the learners, and the clean single-process replay."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from kafka import KafkaProducer
from psycopg.types.json import Json

from bandit import Policy
from streams.learner import libpq_url
from streams.schemas import FeedbackEvent, encode_feedback
from streams.stats import SHARED_KEY, new_statistics, sum_statistics

DIM = 8
MODELS = [f"model-{i}" for i in range(4)]


@dataclass
class World:
    """Tenants and decisions stored in a test database."""

    url: str
    dim: int = DIM
    seed: int = 0
    tenants: list[str] = field(default_factory=list)
    decisions: dict[str, tuple[str, str, str, np.ndarray]] = field(default_factory=dict)
    #: created_at of each stored decision (seconds): the event time of its feedback.
    created: dict[str, float] = field(default_factory=dict)
    #: The price estimate (USD) a decision stored for its model (``price_usd``, and in
    #: ``predictions`` as the API stores it).
    prices: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def conn(self) -> psycopg.Connection:
        return psycopg.connect(libpq_url(self.url), autocommit=True)

    def add_tenants(self, n: int) -> list[str]:
        new = [str(uuid.uuid4()) for _ in range(n)]
        with self.conn() as conn:
            conn.cursor().executemany(
                "INSERT INTO tenants (id, name, key_hash, weight_quality, weight_cost,"
                " weight_latency, policy, scope, on_budget_exhausted, created_at, updated_at)"
                " VALUES (%s, %s, %s, 1, 0, 0, 'linucb', 'shared', 'cheapest', now(), now())",
                [(t, f"tenant-{t[:8]}", uuid.uuid4().hex + uuid.uuid4().hex) for t in new])
        self.tenants.extend(new)
        return new

    def add_decisions(self, n: int, *, scope: str = "shared", age: timedelta | None = None,
                      store: bool = True, priced: bool = False) -> list[str]:
        created = datetime.now(UTC) - (age or timedelta(0))
        rows = []
        for _ in range(n):
            decision_id = str(uuid.uuid4())
            tenant = self.tenants[int(self.rng.integers(len(self.tenants)))]
            model = MODELS[int(self.rng.integers(len(MODELS)))]
            x = self.rng.normal(size=self.dim)
            self.decisions[decision_id] = (tenant, model, scope, x)
            if priced:
                self.prices[decision_id] = float(self.rng.uniform(0.001, 0.008))
            rows.append((decision_id, tenant, model, scope, x))
        if store:
            self.store(rows, created)
        return [r[0] for r in rows]

    def store(self, rows: list[tuple], created: datetime | None = None) -> None:
        created = created or datetime.now(UTC)
        with self.conn() as conn:
            conn.cursor().executemany(
                "INSERT INTO decisions (id, tenant_id, model, policy, policy_version, scope,"
                " propensity, context, predictions, predicted_cost_usd, charged_usd,"
                " over_budget, price_usd, created_at) VALUES (%s, %s, %s, 'linucb', 0, %s,"
                " 1.0, %s, %s, 0, 0, false, %s, %s)",
                [(d, t, m, s, np.ascontiguousarray(x, dtype="<f8").tobytes(),
                  Json({m: {"price_usd": self.prices[d]}} if d in self.prices else {}),
                  self.prices.get(d), created)
                 for d, t, m, s, x in rows])
        # PostgreSQL keeps microseconds, as datetime does: the learner reads this back.
        self.created.update({r[0]: created.timestamp() for r in rows})

    def store_later(self, decision_id: str) -> None:
        tenant, model, scope, x = self.decisions[decision_id]
        self.store([(decision_id, tenant, model, scope, x)])

    def feedback(self, decision_id: str, event_id: str | None = None,
                 tenant: str | None = None) -> FeedbackEvent:
        owner = self.decisions[decision_id][0]
        q = float(self.rng.uniform())
        return FeedbackEvent(event_id or uuid.uuid4().hex, decision_id, tenant or owner,
                             quality=q, cost_usd=float(self.rng.uniform(0, 0.01)),
                             latency_ms=float(self.rng.uniform(50, 2000)),
                             sent_at=time.time())


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)


class Ends(dict):
    """End offset (last offset + 1) of each partition, from the producer's own receipts.

    The test broker (Tansu, in-memory) answers ListOffsets with the base offset of the
    last batch + 1, not the end: ``KafkaConsumer.end_offsets`` cannot be used here.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        #: (partition, offset, event) of every event sent through :func:`send_events`.
        self.placed: list[tuple[int, int, FeedbackEvent]] = []

    def track(self, futures: list) -> list:
        metas = [future.get(timeout=30) for future in futures]
        for meta in metas:
            self[meta.partition] = max(self.get(meta.partition, 0), meta.offset + 1)
        return metas


def send_events(prod: KafkaProducer, topic: str, events: list[FeedbackEvent],
                ends: Ends) -> None:
    futures = [prod.send(topic, key=e.decision_id.encode(), value=encode_feedback(e))
               for e in events]
    prod.flush()
    metas = ends.track(futures)
    ends.placed.extend((m.partition, m.offset, e) for m, e in zip(metas, events, strict=True))


def send_raw(prod: KafkaProducer, topic: str, key: bytes, value: bytes, ends: Ends) -> None:
    future = prod.send(topic, key=key, value=value)
    prod.flush()
    ends.track([future])


def stored_offsets(url: str, group: str, topic: str) -> dict[int, int]:
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT partition, next_offset FROM learner_partitions"
                            " WHERE group_id = %s AND topic = %s", (group, topic)).fetchall()
    return {int(p): int(o) for p, o in rows}


def wait_caught_up(url: str, group: str, topic: str, ends: Ends,
                   timeout_s: float = 60.0) -> None:
    """Wait until every partition's stored offset reached the end of the partition."""
    deadline = time.monotonic() + timeout_s
    while True:
        stored = stored_offsets(url, group, topic)
        behind = {p: (stored.get(p, -1), end) for p, end in ends.items()
                  if end > 0 and stored.get(p, -1) < end}
        if not behind:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"learners did not catch up in {timeout_s}s: "
                                 f"(stored, end) per partition {behind}")
        time.sleep(0.2)


def load_statistics(url: str, group: str, topic: str, key: str = SHARED_KEY,
                    half_life_hours: float | None = None) -> Policy:
    """The sum of the stored partitions (with forgetting: at the latest event time)."""
    with psycopg.connect(libpq_url(url)) as conn:
        blobs = conn.execute("SELECT data FROM partition_statistics WHERE group_id = %s"
                             " AND topic = %s AND key = %s", (group, topic, key)).fetchall()
    parts = [Policy.from_bytes(bytes(b)) for (b,) in blobs]
    return sum_statistics(parts, DIM, half_life_hours)


def replay(world: World, events: list[FeedbackEvent], key: str = SHARED_KEY,
           half_life_hours: float | None = None) -> Policy:
    """The clean single-process replay: every distinct (decision_id, event_id) once.

    With ``half_life_hours``: one event at a time in event-time order (the decisions'
    ``created_at``), forgetting between them, as one embedded process would."""
    seen: set[tuple[str, str]] = set()
    policy = new_statistics(world.dim)
    arms, xs, outcomes, decided, prices = [], [], [], [], []
    for event in events:
        ident = (event.decision_id, event.event_id)
        if ident in seen:
            continue
        seen.add(ident)
        tenant, model, scope, x = world.decisions[event.decision_id]
        if key != SHARED_KEY and (scope != "isolated" or key != f"tenant:{tenant}"):
            continue
        if model not in policy.arms:
            policy.add_arm(model)
        arms.append(model)
        decided.append(event.decision_id)
        xs.append(x)
        outcomes.append(event.outcome())
        prices.append(world.prices.get(event.decision_id, np.nan))
    if half_life_hours is not None:
        timed = new_statistics(world.dim, half_life_hours)
        for arm in policy.arms:
            timed.add_arm(arm)
        times = [world.created[d] for d in decided]
        for i in sorted(range(len(arms)), key=times.__getitem__):
            timed.update(arms[i], xs[i], outcomes[i], now=times[i],
                         cost_estimate=None if np.isnan(prices[i]) else prices[i])
        return timed
    if arms:
        policy.update_batch(arms, np.array(xs), outcomes, cost_estimates=np.array(prices))
    return policy


def replay_partitions(world: World, ends: Ends) -> Policy:
    """The learners' prequential errors, replayed: each partition's events in offset
    order, each (decision_id, event_id) once (its first), one update per event from
    that partition's own statistics, then the partitions' sum. No forgetting (with it
    the errors depend slightly on the batches: the prior's weight against the
    discounted data)."""
    parts: dict[int, Policy] = {}
    seen: set[tuple[str, str]] = set()
    for partition, _offset, event in sorted(ends.placed, key=lambda p: p[:2]):
        ident = (event.decision_id, event.event_id)
        if ident in seen:
            continue
        seen.add(ident)
        _tenant, model, _scope, x = world.decisions[event.decision_id]
        policy = parts.setdefault(partition, new_statistics(world.dim))
        if model not in policy.arms:
            policy.add_arm(model)
        policy.update(model, x, event.outcome())
    return sum_statistics(parts.values(), world.dim)


def assert_same_selection(actual: Policy, expected: Policy) -> None:
    """The candidates' prequential errors (what ``select`` picks by) equal arm by arm."""
    assert sorted(actual.arms) == sorted(expected.arms)
    a, e = actual._stats, expected._stats  # noqa: SLF001 - the sums under test
    got = a.sel_err[[actual._index[n] for n in expected.arms]]  # noqa: SLF001
    want = e.sel_err[[expected._index[n] for n in expected.arms]]  # noqa: SLF001
    assert want.shape[1] > 1 and (want > 0).all(), "no errors: a vacuous check"
    np.testing.assert_allclose(got, want, rtol=1e-9, err_msg="prequential errors")


def assert_same_statistics(actual: Policy, expected: Policy, tol: float = 1e-9) -> None:
    """Data sums equal arm by arm (to ``tol``, relative to the scale of each array)."""
    assert sorted(actual.arms) == sorted(expected.arms)
    for name in expected.arms:
        assert actual.observations(name) == expected.observations(name), name
        # Private arrays, read-only: the sums are the property under test and the
        # public API only exposes them through predictions.
        a, e = actual._stats, expected._stats  # noqa: SLF001
        i, j = actual._index[name], expected._index[name]  # noqa: SLF001
        pairs = {"a_data": (a.matrices_of(i, "a_data"), e.matrices_of(j, "a_data"))}
        for array in ("b_data", "srr", "weight", "price_ratio"):
            pairs[array] = (getattr(a, array)[i], getattr(e, array)[j])
        assert np.abs(pairs["a_data"][1]).max() > 0, f"no data for {name}: a vacuous check"
        for array, (got, want) in pairs.items():
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale,
                                       err_msg=f"{array} of {name}")


def assert_feedback_rows(url: str, events: list[FeedbackEvent]) -> None:
    """The ``feedback`` table holds every distinct (decision_id, event_id) of ``events``
    exactly once, with the values of its first occurrence (as embedded mode keeps them)."""
    expected: dict[tuple[str, str], tuple] = {}
    for e in events:
        expected.setdefault((e.decision_id, e.event_id), (e.quality, e.cost_usd, e.latency_ms))
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute("SELECT decision_id, event_id, quality, cost_usd, latency_ms"
                            " FROM feedback WHERE decision_id = ANY(%s)",
                            (sorted({d for d, _ in expected}),)).fetchall()
    keys = [(d, e) for d, e, *_ in rows]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicated rows"
    assert {(d, e): tuple(v) for d, e, *v in rows} == expected
