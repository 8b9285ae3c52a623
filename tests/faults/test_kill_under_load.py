"""``kill -9`` of ``bandit-router serve`` (embedded mode, SQLite) in the middle of
concurrent decides and feedback: after a restart every acknowledged feedback is stored
and counted in the policies exactly once; the decisions lost are at most the writer's
queue (the documented bound, service/README.md "Recovery").

Complements tests/service/test_kill.py (sequential traffic, predictions equal before
and after): here the kill lands while requests are in flight.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import httpx
import numpy as np

from bandit import Policy
from tests.service.conftest import embedding
from tests.service.test_kill import free_port, small_and_large, start

LOAD_S = 3.0  # at least this long under load before the kill
MIN_ACKED = 200  # and until this many feedback events were acknowledged (up to 60 s)
THREADS = 4
QUEUE_BOUND = 10_000  # DECISION_QUEUE_SIZE default


def _load(base: str, tenant: dict[str, str], seed: int, acked_decisions: set[str],
          acked_feedback: set[tuple[str, str]], lock: threading.Lock,
          stop: threading.Event) -> None:
    i = 0
    with httpx.Client(base_url=base, timeout=5.0) as http:
        while not stop.is_set():
            try:
                r = http.post("/v1/decide", headers=tenant,
                              json={"query": {"embedding": embedding(seed * 100_000 + i)}})
                if r.status_code != 200:
                    continue
                decision = r.json()["decision_id"]
                with lock:
                    acked_decisions.add(decision)
                event = f"k{seed}-{i}"
                f = http.post("/v1/feedback", headers=tenant, json={
                    "decision_id": decision, "event_id": event,
                    "quality": 0.9 if r.json()["model"] == "large" else 0.2,
                    "cost_usd": 0.001})
                if f.status_code == 202:
                    with lock:
                        acked_feedback.add((decision, event))
            except httpx.HTTPError:
                return  # the server is gone
            finally:
                i += 1


def test_kill_9_under_load_keeps_every_acknowledged_feedback(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(url, port)
    acked_decisions: set[str] = set()
    acked_feedback: set[tuple[str, str]] = set()
    lock, stop = threading.Lock(), threading.Event()
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            tenant = small_and_large(http, "k")
        threads = [threading.Thread(target=_load, args=(base, tenant, s, acked_decisions,
                                                        acked_feedback, lock, stop),
                                    daemon=True) for s in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        # A loaded machine serves fewer requests per second: kill once enough feedback
        # was acknowledged for the check to mean something, not after a fixed time.
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            with lock:
                if len(acked_feedback) >= MIN_ACKED:
                    break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
    for t in threads:
        t.join(10)
    assert len(acked_feedback) >= MIN_ACKED, len(acked_feedback)

    # Restart: replays the feedback after the last checkpoint; then a clean stop writes a
    # final checkpoint we can read.
    proc = start(url, port)
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.post("/v1/decide", headers=tenant,
                             json={"query": {"embedding": embedding(1)}}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)

    db = sqlite3.connect(tmp_path / "router.db")
    stored_feedback = set(db.execute("SELECT decision_id, event_id FROM feedback"))
    stored_decisions = {r[0] for r in db.execute("SELECT id FROM decisions")}
    quality_rows = db.execute(
        "SELECT count(*) FROM feedback WHERE quality IS NOT NULL").fetchone()[0]
    checkpoint, last_feedback = db.execute(
        "SELECT id, last_feedback_id FROM policy_checkpoints ORDER BY id DESC LIMIT 1"
    ).fetchone()
    snapshot = db.execute("SELECT data FROM policy_snapshots WHERE checkpoint_id = ? "
                          "AND key = 'shared:linucb'", (checkpoint,)).fetchone()[0]
    max_feedback = db.execute("SELECT max(id) FROM feedback").fetchone()[0]
    db.close()

    lost_feedback = acked_feedback - stored_feedback
    assert not lost_feedback, f"{len(lost_feedback)} acknowledged feedback events lost"
    lost_decisions = acked_decisions - stored_decisions
    # Documented bound: only decisions still in the writer's queue at the kill.
    assert len(lost_decisions) <= QUEUE_BOUND
    # Every decision that got feedback is stored (feedback waits for its decision).
    assert {d for d, _ in acked_feedback} <= stored_decisions
    # The restarted service counted every stored feedback exactly once (replay after
    # the checkpoint, none twice): the shared policy's quality observations.
    assert last_feedback == max_feedback
    policy = Policy.from_bytes(snapshot)
    counts = policy._stats.count[:, 0]
    assert int(np.sum(counts)) == quality_rows, (counts, quality_rows)
    print(f"\nkill -9 under load: {len(acked_decisions)} decisions and "
          f"{len(acked_feedback)} feedback acknowledged; lost {len(lost_decisions)} "
          f"decisions, 0 feedback; {quality_rows} feedback rows counted once")
