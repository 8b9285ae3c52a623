"""``kill -9`` of ``bandit-router serve`` during a PostgreSQL outage (issue 14, item 1).

Decides (two clients, ~40/s each) and feedback (every other decision, 0.5 s later) flow
against a real ``serve`` process on a private PostgreSQL cluster. The cluster is
stopped; mid-outage the service is killed with SIGKILL and restarted while the database
is still down (it must serve, degraded, from its local state: item 2); with ``kills=5``
that happens five times in the same outage. Then the cluster is started again and the
test waits for ``/readyz`` to say ``ready``. A client whose request failed because the
process was gone retries it later (as ``service.client`` does); what was never answered
is not counted as acknowledged.

Checked at the end, with the service stopped cleanly (its final checkpoint written):

* every decision answered 200 is stored (the outage's were spooled before the answer);
* every feedback answered 202 is stored exactly once (none dropped at the drain because
  its decision had been lost, none stored twice);
* the final checkpoint's statistics equal (1e-9) policies rebuilt from the stored rows,
  each applied once.

Before the decision spool (commit 2cce4eb) the first restart could not even serve: the
start exited (code 3) until PostgreSQL was back; and with that fixed alone, the decisions
of the outage lived in the killed process's memory and their feedback was dropped.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from sqlalchemy.engine import make_url

from bandit import Policy
from service.db.engine import make_engine
from service.metrics import Metrics
from service.routing import RoutingService
from tests.faults.conftest import ROOT, PrivatePostgres, free_port
from tests.service.conftest import ADMIN, ADMIN_KEY, DIM, embedding, make_settings

RATE_PER_THREAD = 40.0
FEEDBACK_DELAY_S = 0.5
WARMUP_S = 4.0  # more than a checkpoint and a registry refresh: the local state has both
SERVE_S = 3.0  # between a (re)start and the next kill, in the outage


@dataclass
class Traffic:
    decisions_ok: set[str] = field(default_factory=set)
    feedback_ok: set[tuple[str, str]] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    other: dict[int, str] = field(default_factory=dict)
    phase: str = "warmup"
    lock: threading.Lock = field(default_factory=threading.Lock)


def _serve(url: str, port: int, data: Path, log: Path) -> subprocess.Popen:
    """``bandit-router serve`` on ``port``, returned once ``/readyz`` answers 200."""
    env = {**os.environ, "BANDIT_ROUTER_DATABASE_URL": url,
           "BANDIT_ROUTER_ADMIN_KEY": ADMIN_KEY, "BANDIT_ROUTER_DIM": str(DIM),
           "BANDIT_ROUTER_DATA_DIR": str(data), "BANDIT_ROUTER_CHECKPOINT_INTERVAL_S": "1",
           "BANDIT_ROUTER_REGISTRY_REFRESH_S": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                                 str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with code {proc.returncode}: "
                        f"{log.read_text()[-3000:]}", pytrace=False)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"serve did not answer /readyz in 60 s: {log.read_text()[-3000:]}")


def _decide_loop(base: str, tenant: dict[str, str], seed: int, t: Traffic,
                 todo: queue.Queue, stop: threading.Event) -> None:
    i = 0
    with httpx.Client(base_url=base, timeout=15.0) as http:
        while not stop.is_set():
            started = time.monotonic()
            phase = t.phase
            try:
                r = http.post("/v1/decide", headers=tenant,
                              json={"query": {"embedding": embedding(seed * 100_000 + i)}})
            except httpx.HTTPError:
                with t.lock:
                    t.statuses[(phase, "decide", "no answer")] += 1
                time.sleep(0.05)
                continue
            with t.lock:
                t.statuses[(phase, "decide", r.status_code)] += 1
                if r.status_code == 200:
                    t.decisions_ok.add(r.json()["decision_id"])
                else:
                    t.other.setdefault(r.status_code, r.text[:300])
            if r.status_code == 200 and i % 2 == 0:
                quality = 0.9 if r.json()["model"] == "kd-large" else 0.3
                todo.put((time.monotonic(), r.json()["decision_id"], f"e{seed}-{i}", quality))
            i += 1
            time.sleep(max(0.0, 1.0 / RATE_PER_THREAD - (time.monotonic() - started)))


def _feedback_loop(base: str, tenant: dict[str, str], t: Traffic, todo: queue.Queue,
                   stop: threading.Event) -> None:
    """Feedback once each decision is FEEDBACK_DELAY_S old; a request the process did not
    answer (killed) is retried a moment later, anything answered is final."""
    with httpx.Client(base_url=base, timeout=15.0) as http:
        while not (stop.is_set() and todo.empty()):
            try:
                item = todo.get(timeout=0.2)
            except queue.Empty:
                continue
            made, decision, event, quality = item
            time.sleep(max(0.0, made + FEEDBACK_DELAY_S - time.monotonic()))
            phase = t.phase
            try:
                f = http.post("/v1/feedback", headers=tenant, json={
                    "decision_id": decision, "event_id": event, "quality": quality,
                    "cost_usd": 0.001, "latency_ms": 200})
            except httpx.HTTPError:
                with t.lock:
                    t.statuses[(phase, "feedback", "no answer")] += 1
                time.sleep(0.1)
                todo.put(item)
                continue
            with t.lock:
                t.statuses[(phase, "feedback", f.status_code)] += 1
                if f.status_code == 202:
                    t.feedback_ok.add((decision, event))
                    t.answers[(phase, f.json()["status"])] += 1
                else:
                    t.other.setdefault(f.status_code, f.text[:300])


def _new_database(pg: PrivatePostgres, name: str) -> str:
    conninfo = make_url(pg.url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(pg.url).set(database=name).render_as_string(hide_password=False)


def _stats(policy: Policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stats = policy._stats
    return stats.matrices("a_data"), stats.b_data, stats.count


@pytest.mark.parametrize("kills", [1, 5])
def test_kill_9_during_outage_keeps_every_acknowledged_decision_and_feedback(
        private_postgres: PrivatePostgres, tmp_path: Path, kills: int) -> None:
    pg = private_postgres
    url = _new_database(pg, f"kill_outage_{kills}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(url, port, tmp_path / "data", log)
    t, stop, todo = Traffic(), threading.Event(), queue.Queue()
    threads: list[threading.Thread] = []
    readyz: list[tuple[str, int, object]] = []
    ready_after_s = None
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            for name, price in (("kd-small", 0.2), ("kd-large", 5.0)):
                assert http.post("/v1/admin/models", headers=ADMIN, json={
                    "name": name, "input_price_per_mtok": price,
                    "output_price_per_mtok": 4 * price}).status_code == 201
            created = http.post("/v1/admin/tenants", headers=ADMIN,
                                json={"name": "kd"}).json()
        tenant = {"Authorization": f"Bearer {created['api_key']}"}
        threads = [threading.Thread(target=_decide_loop, args=(base, tenant, s, t, todo, stop),
                                    daemon=True) for s in range(2)]
        threads.append(threading.Thread(target=_feedback_loop,
                                        args=(base, tenant, t, todo, stop), daemon=True))
        for th in threads:
            th.start()
        time.sleep(WARMUP_S)
        pg.stop()
        t.phase = "outage"
        for k in range(kills):
            time.sleep(SERVE_S)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t.phase = f"restart {k + 1}"
            proc = _serve(url, port, tmp_path / "data", log)  # the database is still down
            r = httpx.get(f"{base}/readyz", timeout=5)
            readyz.append((t.phase, r.status_code, r.json()))
            t.phase = "outage"
        time.sleep(SERVE_S)
        pg.start()
        print(f"\nPostgreSQL answers again at {time.time():.3f}")
        t.phase = "recovery"
        back = time.monotonic()
        while time.monotonic() < back + 60:
            r = httpx.get(f"{base}/readyz", timeout=5)
            if r.status_code == 200 and r.json() == {"status": "ready"}:
                ready_after_s = time.monotonic() - back
                break
            time.sleep(0.05)
        t.phase = "after"
        time.sleep(2.0)
        stop.set()
        for th in threads:
            th.join(60)
    finally:
        stop.set()
        proc.terminate()  # a clean stop: writes the final checkpoint
        proc.wait(60)

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(conninfo) as conn:
        stored_decisions = {str(r[0]) for r in conn.execute("SELECT id FROM decisions")}
        feedback_rows = [(str(r[0]), r[1]) for r in conn.execute(
            "SELECT decision_id, event_id FROM feedback")]
        checkpoint, last_feedback = conn.execute(
            "SELECT id, last_feedback_id FROM policy_checkpoints ORDER BY id DESC LIMIT 1"
        ).fetchone()
        blobs = dict(conn.execute("SELECT key, data FROM policy_snapshots WHERE "
                                  "checkpoint_id = %s", (checkpoint,)).fetchall())
        max_feedback = conn.execute("SELECT max(id) FROM feedback").fetchone()[0]
    service = RoutingService(make_settings(url, data_dir=tmp_path / "rebuild"),
                             make_engine(url), Metrics())
    service.registry.load_models()
    rebuilt = service.policies.rebuild_isolated(created["id"], upto=2**62)
    service.engine.dispose()

    summary = {
        "kills": kills, "decisions_ok": len(t.decisions_ok),
        "feedback_ok": len(t.feedback_ok), "stored_decisions": len(stored_decisions),
        "feedback_rows": len(feedback_rows), "ready_after_s": ready_after_s,
        "answers": {"/".join(k): v for k, v in sorted(t.answers.items())},
        "statuses": {"/".join(map(str, k)): v for k, v in sorted(t.statuses.items(),
                                                                  key=str)},
        "other": t.other, "readyz after restarts": readyz[:2],
    }
    print(f"\nkill -9 during a PostgreSQL outage: {summary}")
    assert ready_after_s is not None, f"/readyz never said ready: {summary}"
    # Every restart in the outage served, degraded, from the local state.
    assert len(readyz) == kills
    for phase, status, body in readyz:
        assert status == 200 and body["status"] == "degraded", (phase, body)
        assert "unreachable" in body["database"], (phase, body)
    restarted_ok = sum(n for (phase, ep, s), n in t.statuses.items()
                       if phase.startswith("outage") and ep == "decide" and s == 200)
    assert restarted_ok > 0
    outage_feedback = sum(n for (phase, status), n in t.answers.items()
                          if phase == "outage" and status == "buffered")
    assert outage_feedback > 20, summary
    # Nothing answered is lost; nothing is stored twice.
    lost_decisions = t.decisions_ok - stored_decisions
    assert not lost_decisions, f"{len(lost_decisions)} answered decisions lost: {summary}"
    lost_feedback = t.feedback_ok - set(feedback_rows)
    assert not lost_feedback, f"{len(lost_feedback)} acknowledged feedback lost: {summary}"
    assert len(feedback_rows) == len(set(feedback_rows)), "a feedback stored twice"
    assert {d for d, _ in feedback_rows} <= stored_decisions
    # Statistics = every stored feedback applied once.
    assert last_feedback == max_feedback
    for kind in ("linucb", "thompson"):
        live = _stats(Policy.from_bytes(blobs[f"shared:{kind}"]))
        for name, a, b in zip(("a_data", "b_data", "count"), live, _stats(rebuilt[kind]),
                              strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=f"{kind} {name}")
    assert int(np.sum(_stats(Policy.from_bytes(blobs["shared:linucb"]))[2][:, 0])) == len(
        feedback_rows)
