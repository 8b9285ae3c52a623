"""PostgreSQL stopped under load (issue 7): the service on a private cluster, decides and
feedback from two client threads, the cluster stopped for ``BANDIT_FAULT_OUTAGE_S``
seconds (default 30) and started again.

The scenario runs once per module (``outage`` fixture); each test checks one promise on
what it recorded:

* decisions keep being served from memory while the database is away (the decision
  writer keeps its rows and retries; a full queue would be a 503, never a silent drop);
* every decision answered 200 and every feedback answered 202, before, during or after
  the outage, is in the database once it is back;
* ``/readyz`` says *degraded* (not plain "not ready") while decisions are still served;
* feedback during the outage is answered 202 ``buffered`` (the bounded on-disk buffer of
  ``service/spool.py``), never a 500 nor a 503 (the buffer is far from full), and after
  recovery the buffer drains: every buffered feedback stored exactly once, none dropped,
  and the policies' statistics equal a rebuild that applies every stored row once.

The /readyz and 500 promises were strict xfails until commit 97ae784; until the feedback
buffer was built, feedback during the outage was refused with 503 + Retry-After (the
test then accepted 202 or 503).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.faults.conftest import PrivatePostgres, serve
from tests.service.conftest import ADMIN, ADMIN_KEY, DIM, embedding, make_settings

OUTAGE_S = float(os.environ.get("BANDIT_FAULT_OUTAGE_S", "30"))
WARMUP_S = 3.0
AFTER_S = 3.0
RATE_PER_THREAD = 40.0  # decides per second per client thread (80/s in all)
FEEDBACK_DELAY_S = 0.5


@dataclass
class Observed:
    phase: str = "warmup"
    decisions_ok: set[str] = field(default_factory=set)
    feedback_ok: set[tuple[str, str]] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)  # (phase, endpoint, status)
    feedback_bodies: dict[int, Any] = field(default_factory=dict)
    feedback_headers: dict[int, dict[str, str]] = field(default_factory=dict)
    feedback_answers: Counter = field(default_factory=Counter)  # (phase, body status)
    #: When each feedback answered "buffered" during the outage was sent (monotonic).
    buffered_sent: list[float] = field(default_factory=list)
    #: When each decide answered 200 during the outage was sent (monotonic).
    decided_sent: list[float] = field(default_factory=list)
    outage_started: float | None = None
    readyz: list[tuple[str, int, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    recovered_after_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _decide_loop(base: str, tenant: dict[str, str], seed: int, obs: Observed,
                 todo: queue.Queue, stop: threading.Event) -> None:
    """Decides at RATE_PER_THREAD per second; every other one is queued for feedback."""
    i = 0
    with httpx.Client(base_url=base, timeout=15.0) as http:
        while not stop.is_set():
            started = time.monotonic()
            phase = obs.phase
            try:
                r = http.post("/v1/decide", headers=tenant,
                              json={"query": {"embedding": embedding(seed * 100_000 + i)}})
            except httpx.HTTPError as exc:
                with obs.lock:
                    obs.errors.append(f"decide: {exc!r}")
                continue
            with obs.lock:
                obs.statuses[(phase, "decide", r.status_code)] += 1
            if r.status_code == 200:
                decision = r.json()["decision_id"]
                with obs.lock:
                    obs.decisions_ok.add(decision)
                    if phase == "outage":
                        obs.decided_sent.append(started)
                if i % 2 == 0:
                    todo.put((time.monotonic(), decision, f"e{seed}-{i}"))
            i += 1
            time.sleep(max(0.0, 1.0 / RATE_PER_THREAD - (time.monotonic() - started)))


def _feedback_loop(base: str, tenant: dict[str, str], obs: Observed, todo: queue.Queue,
                   stop: threading.Event) -> None:
    """Feedback for queued decisions once they are FEEDBACK_DELAY_S old (as a caller
    reporting after its LLM call), one attempt each: what is refused is not retried."""
    with httpx.Client(base_url=base, timeout=30.0) as http:
        while not (stop.is_set() and todo.empty()):
            try:
                made, decision, event = todo.get(timeout=0.2)
            except queue.Empty:
                continue
            time.sleep(max(0.0, made + FEEDBACK_DELAY_S - time.monotonic()))
            phase, sent = obs.phase, time.monotonic()
            try:
                f = http.post("/v1/feedback", headers=tenant, json={
                    "decision_id": decision, "event_id": event,
                    "quality": 0.7, "cost_usd": 0.001, "latency_ms": 200})
            except httpx.HTTPError as exc:
                with obs.lock:
                    obs.statuses[(phase, "feedback", type(exc).__name__)] += 1
                continue
            with obs.lock:
                obs.statuses[(phase, "feedback", f.status_code)] += 1
                if f.status_code == 202:
                    obs.feedback_ok.add((decision, event))
                    obs.feedback_answers[(phase, f.json()["status"])] += 1
                    if phase == "outage" and f.json()["status"] == "buffered":
                        obs.buffered_sent.append(sent)
                else:
                    obs.feedback_bodies.setdefault(f.status_code, f.text[:300])
                    obs.feedback_headers.setdefault(f.status_code, dict(f.headers))


def _outage_tenths(obs: Observed, sent: list[float]) -> set[int]:
    """Which tenths of the outage have a request in ``sent`` (send times) in them.

    Promises "throughout the outage" are asserted on time, not on a count: the clients'
    rate follows the machine's load (523 feedback of a nominal 1,200 on a busy host), so
    a count proves nothing more and fails on a slow host; every tenth answered also
    catches a stall of a few seconds that a total would hide."""
    assert obs.outage_started is not None
    width = OUTAGE_S / 10
    return {min(int((t - obs.outage_started) / width), 9) for t in sent}


def _readyz(http: httpx.Client) -> tuple[int, Any]:
    r = http.get("/readyz")
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def _statistics(policy: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stats = policy._stats
    return stats.matrices("a_data"), stats.b_data, stats.count


def _buffer_counts(app: Any) -> dict[str, float]:
    registry = app.state.routing.metrics.registry
    return {r: registry.get_sample_value("bandit_router_feedback_buffer_total",
                                         {"result": r}) or 0.0
            for r in ("buffered", "full", "drained", "duplicate", "dropped")}


def buffered_settings(pg: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory):
    """The service on the private cluster, with a feedback buffer of its own."""
    return make_settings(pg.url, registry_refresh_s=3600.0,
                         feedback_buffer_dir=tmp_path_factory.mktemp("feedback-buffer"))


@pytest.fixture(scope="module")
def outage(private_postgres: PrivatePostgres,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pg = private_postgres
    settings = buffered_settings(pg, tmp_path_factory)
    obs = Observed()
    stop = threading.Event()
    with serve(settings) as (base, app), httpx.Client(base_url=base, timeout=15.0) as http:
        for name, price in (("fault-small", 0.2), ("fault-large", 5.0)):
            assert http.post("/v1/admin/models", headers=ADMIN, json={
                "name": name, "input_price_per_mtok": price,
                "output_price_per_mtok": 4 * price}).status_code == 201
        created = http.post("/v1/admin/tenants", headers=ADMIN, json={"name": "f"}).json()
        tenant = {"Authorization": f"Bearer {created['api_key']}"}
        service = app.state.routing
        todo: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=_decide_loop,
                                    args=(base, tenant, s, obs, todo, stop), daemon=True)
                   for s in range(2)]
        threads.append(threading.Thread(target=_feedback_loop,
                                        args=(base, tenant, obs, todo, stop), daemon=True))
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)
        obs.readyz.append(("warmup", *_readyz(http)))
        pg.stop()
        obs.phase = "outage"
        obs.outage_started = time.monotonic()
        outage_end = obs.outage_started + OUTAGE_S
        while time.monotonic() < outage_end:
            obs.readyz.append(("outage", *_readyz(http)))
            time.sleep(1.0)
        buffered_at_restart = service.feedback_buffered()
        pg.start()
        obs.phase = "recovery"
        restarted = time.monotonic()
        database_back_s = drained_s = None
        while time.monotonic() < restarted + 60:
            status, body = _readyz(http)
            if database_back_s is None and not (isinstance(body, dict)
                                                and "database" in body):
                database_back_s = time.monotonic() - restarted
            if drained_s is None and service.feedback_buffered() == 0:
                drained_s = time.monotonic() - restarted
            # Ready, not merely 200: "degraded" is a 200 too (during the outage, and
            # while buffered feedback is still being stored).
            if status == 200 and body == {"status": "ready"}:
                obs.recovered_after_s = time.monotonic() - restarted
                break
            time.sleep(0.05)
        obs.phase = "after"
        time.sleep(AFTER_S)
        stop.set()
        for t in threads:
            t.join(120)
        obs.readyz.append(("after", *_readyz(http)))
        queued_at_end = service.writer.depth()
        flushed = service.writer.flush(timeout=60)
        deadline = time.monotonic() + 60
        while service.feedback_buffered() and time.monotonic() < deadline:
            time.sleep(0.05)
        buffered_at_end = service.feedback_buffered()
        buffer_counts = _buffer_counts(app)
        # Statistics = every stored feedback row applied once: the live shared policies
        # (one tenant) against policies rebuilt from the stored rows, from the priors.
        rebuilt = service.policies.rebuild_isolated(created["id"], upto=2**62)
        statistics = {kind: (_statistics(service.shared[kind]), _statistics(rebuilt[kind]))
                      for kind in ("linucb", "thompson")}
    # Read what is stored, with the service stopped (its shutdown drained the writer).
    conninfo = make_url(pg.url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(conninfo) as conn:
        stored_decisions = {r[0] for r in conn.execute("SELECT id FROM decisions")}
        feedback_rows = [(str(r[0]), r[1]) for r in conn.execute(
            "SELECT decision_id, event_id FROM feedback")]
        stored_feedback = set(feedback_rows)
    summary = {
        "outage_s": OUTAGE_S, "statuses": {"/".join(map(str, k)): v
                                           for k, v in sorted(obs.statuses.items(), key=str)},
        "decisions_ok": len(obs.decisions_ok), "feedback_ok": len(obs.feedback_ok),
        "stored_decisions": len(stored_decisions), "stored_feedback": len(stored_feedback),
        "recovered_after_s": obs.recovered_after_s, "queued_at_end": queued_at_end,
        "feedback_answers": {"/".join(k): v for k, v in sorted(obs.feedback_answers.items())},
        "buffered_at_restart": buffered_at_restart, "database_back_s": database_back_s,
        "drained_s": drained_s, "buffered_at_end": buffered_at_end,
        "buffer_counts": buffer_counts, "feedback_rows": len(feedback_rows),
        "errors": obs.errors[:5],
    }
    print("\npostgres outage:", summary)
    return {"obs": obs, "stored_decisions": stored_decisions,
            "stored_feedback": stored_feedback, "feedback_rows": feedback_rows,
            "flushed": flushed, "summary": summary, "statistics": statistics}


def test_postgres_outage_decisions_served_from_memory(outage):
    obs: Observed = outage["obs"]
    during = {s: n for (phase, ep, s), n in obs.statuses.items()
              if phase == "outage" and ep == "decide"}
    assert obs.errors == []
    # At 80 decides/s the writer's queue (10,000 rows) outlasts a 30 s outage: every
    # decide is answered from memory, none refused...
    assert set(during) == {200}, during
    # ... throughout the outage: every tenth of it has decides sent in it and answered.
    covered = _outage_tenths(obs, obs.decided_sent)
    assert covered == set(range(10)), (sorted(covered), during)


def test_postgres_outage_every_accepted_decision_and_feedback_stored(outage):
    obs: Observed = outage["obs"]
    assert outage["flushed"]
    assert obs.recovered_after_s is not None, "readyz never came back after the restart"
    missing_decisions = obs.decisions_ok - outage["stored_decisions"]
    missing_feedback = obs.feedback_ok - outage["stored_feedback"]
    assert not missing_decisions, f"{len(missing_decisions)} accepted decisions lost"
    assert not missing_feedback, f"{len(missing_feedback)} accepted feedback events lost"
    assert len(obs.decisions_ok) > 100 and len(obs.feedback_ok) > 20


def test_postgres_outage_service_ready_again(outage):
    obs: Observed = outage["obs"]
    assert obs.readyz[0][1] == 200
    assert obs.readyz[-1][1] == 200
    after = {s: n for (phase, ep, s), n in obs.statuses.items() if phase == "after"}
    assert set(after) <= {200, 202} and after.get(200), after


def test_postgres_outage_readyz_says_degraded(outage):
    during = [(status, body) for phase, status, body in outage["obs"].readyz
              if phase == "outage"]
    assert during
    assert all("degraded" in str(body) for _, body in during), during[:3]
    # Degraded, not down: the replica still serves decides, so it stays in rotation.
    assert all(status == 200 for status, _ in during), during[:3]


def test_postgres_outage_feedback_buffered(outage):
    obs: Observed = outage["obs"]
    during = {s: n for (phase, ep, s), n in obs.statuses.items()
              if phase == "outage" and ep == "feedback"}
    assert during, "no feedback was attempted during the outage"
    # The buffer (10,000) outlasts a 30 s outage at ~40 feedback/s: every one is
    # accepted, as "buffered" (the database cannot be reached to store it).
    assert set(during) == {202}, (during, obs.feedback_bodies)
    answers = {status: n for (phase, status), n in obs.feedback_answers.items()
               if phase == "outage"}
    assert answers == {"buffered": during[202]}, answers
    # Accepted throughout the outage, not only at its start: every tenth of it has
    # feedback sent in it and buffered (_outage_tenths: on time, not on a count).
    covered = _outage_tenths(obs, obs.buffered_sent)
    assert covered == set(range(10)), (sorted(covered), during)


def test_postgres_outage_buffer_drained_once_after_recovery(outage):
    summary = outage["summary"]
    counts = summary["buffer_counts"]
    buffered_answers = sum(n for (_, status), n in outage["obs"].feedback_answers.items()
                           if status == "buffered")
    assert summary["buffered_at_end"] == 0, summary
    assert summary["drained_s"] is not None, summary
    # Every buffered feedback stored (none was stored already, none dropped).
    assert counts["buffered"] == buffered_answers > 0, (counts, buffered_answers)
    assert counts["drained"] == buffered_answers, counts
    assert counts["dropped"] == counts["full"] == counts["duplicate"] == 0, counts
    # Exactly once: no (decision, event) stored twice, nothing stored that was not
    # acknowledged.
    rows = outage["feedback_rows"]
    assert len(rows) == len(set(rows)) == len(outage["obs"].feedback_ok), (
        len(rows), len(set(rows)), len(outage["obs"].feedback_ok))


def test_postgres_outage_statistics_equal_applying_each_feedback_once(outage):
    for kind, (live, rebuilt) in outage["statistics"].items():
        for name, a, b in zip(("a_data", "b_data", "count"), live, rebuilt, strict=True):
            assert a.shape == b.shape, (kind, name)
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9,
                                       err_msg=f"{kind} {name}")
    counts = outage["statistics"]["linucb"][0][2]
    assert int(np.sum(counts[:, 0])) == len(outage["feedback_rows"])


def test_postgres_outage_identifiers_are_unique(outage):
    # Sanity of the bookkeeping above: ids are UUIDs, events unique per decision.
    obs: Observed = outage["obs"]
    assert all(uuid.UUID(d) for d in list(obs.decisions_ok)[:10])
    assert ADMIN_KEY and DIM
