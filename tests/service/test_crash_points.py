"""A process dies between a feedback row's commit and its learning (rel14): the gateway's
own outcomes (``event_id`` ``gateway``, stored in batches by ``feedback_many``) are
committed, then the process exits (``os._exit``, as ``kill -9``) while the batch is being
applied. The restart (newest checkpoint + replay of the rows after it) learns every
stored row exactly once: its statistics equal a rebuild from the stored rows, and a
client's later quality for the same decisions is a separate event, learned once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]

CRASHING = r'''
import os, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.policies import PolicyStore
from service.routing import FeedbackItem
from tests.service.conftest import add_model, create_tenant, decide, make_settings

url, data, crash_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
with TestClient(create_app(make_settings(url, data_dir=data))) as client:
    add_model(client, "small", 0.2, 0.8)
    add_model(client, "large", 5.0, 20.0)
    headers = create_tenant(client, "t")
    service = client.app.state.routing
    ids = [decide(client, headers, seed=i).json()["decision_id"] for i in range(24)]
    assert service.writer.flush(timeout=10)
    tenant = service.tenants[headers["X-Tenant"]]

    def outcomes(chunk, start):
        # The gateway's: cost and latency, quality 0 for a failure (every third).
        return [FeedbackItem(tenant, d, {"quality": 0.0 if (start + j) % 3 == 0 else None,
                                         "cost_usd": 1e-4 * (1 + (start + j) % 5),
                                         "latency_ms": 100.0 + start + j}, "gateway")
                for j, d in enumerate(chunk)]

    service.feedback_many(outcomes(ids[:8], 0))
    assert service.checkpoint(force=True)
    service.feedback_many(outcomes(ids[8:12], 8))  # after the checkpoint: replayed
    applied = []
    real = PolicyStore.apply

    def dies(self, *args, **kwargs):
        applied.append(1)
        if len(applied) == crash_at:
            print(headers["X-Tenant"], flush=True)
            os._exit(9)  # the batch is committed; rows from here on not learned
        real(self, *args, **kwargs)

    PolicyStore.apply = dies
    service.feedback_many(outcomes(ids[12:], 12))
    print("not killed", flush=True)
'''


def _counts(policy) -> np.ndarray:  # noqa: ANN001
    return np.array([[policy.observations(a)[h] for h in ("quality", "cost", "latency")]
                     for a in sorted(policy.arms)])


def test_killed_between_commit_and_learning_restart_learns_each_row_once(
        new_database_url, tmp_path):
    url = new_database_url()
    proc = subprocess.run([sys.executable, "-c", CRASHING, url, str(tmp_path / "a"), "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    tenant_id = proc.stdout.split()[0]
    with TestClient(create_app(make_settings(url, data_dir=tmp_path / "b"))) as client:
        service = client.app.state.routing
        with service.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT count(*), count(quality) FROM feedback").one()
        assert tuple(rows) == (24, 8)  # every outcome of the three batches was committed
        rebuilt = service.policies.rebuild_isolated(tenant_id, upto=2**62)
        for kind, policy in service.shared.items():
            counts = _counts(policy)
            assert counts.sum(axis=0).tolist() == [8, 24, 24], kind  # each row once
            np.testing.assert_array_equal(counts, _counts(rebuilt[kind]))
            for name in ("b_data", "srr", "weight", "price_ratio", "theta"):
                np.testing.assert_allclose(getattr(policy._stats, name),
                                           getattr(rebuilt[kind]._stats, name),
                                           rtol=1e-9, atol=1e-12, err_msg=f"{kind} {name}")
        # The client's quality for a decision the router reported on: its own event.
        tenant = service.tenants[tenant_id]
        with service.engine.connect() as conn:
            decision = conn.exec_driver_sql(
                "SELECT decision_id FROM feedback WHERE quality IS NULL LIMIT 1").scalar()
        before = _counts(service.shared["linucb"]).sum(axis=0)[0]
        first = service.feedback(tenant, str(decision), {"quality": 0.9, "cost_usd": None,
                                                         "latency_ms": None}, "client")
        again = service.feedback(tenant, str(decision), {"quality": 0.9, "cost_usd": None,
                                                         "latency_ms": None}, "client")
        assert (first.status, again.status) == ("applied", "duplicate")
        assert _counts(service.shared["linucb"]).sum(axis=0)[0] == before + 1
