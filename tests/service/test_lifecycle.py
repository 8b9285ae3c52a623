"""Start-up and background work: the generated admin key, periodic checkpoints."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.db.models import PolicyCheckpoint
from tests.service.conftest import add_model, create_tenant, decide, make_settings

REPO = Path(__file__).resolve().parents[2]


def test_start_admin_key_generated_once(new_database_url, capsys):
    url = new_database_url()
    settings = make_settings(url, admin_key=None)
    with TestClient(create_app(settings)) as c1:
        key = c1.app.state.generated_admin_key
        assert key and key.startswith("bra_")
        r = c1.post("/v1/admin/tenants", json={"name": "t"},
                    headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201
    assert key in capsys.readouterr().err
    with TestClient(create_app(settings)) as c2:
        assert c2.app.state.generated_admin_key is None
        r = c2.post("/v1/admin/tenants", json={"name": "t2"},
                    headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201
    assert key not in capsys.readouterr().err


def test_checkpoint_periodic_and_pruned(new_database_url):
    url = new_database_url()
    settings = make_settings(url, checkpoint_interval_s=0.05, checkpoints_kept=2)
    with TestClient(create_app(settings)) as client:
        service = client.app.state.routing
        model = add_model(client)
        tenant = create_tenant(client)
        for i in range(6):
            d = decide(client, tenant, [model], seed=i).json()["decision_id"]
            client.post("/v1/feedback", json={"decision_id": d, "quality": 0.5},
                        headers=tenant)
            time.sleep(0.12)
        deadline = time.monotonic() + 10
        while True:  # the periodic task catches up with the last feedback
            with Session(service.engine) as session:
                count = session.scalar(select(func.count()).select_from(PolicyCheckpoint))
                newest = session.scalar(select(func.max(PolicyCheckpoint.last_feedback_id)))
            if newest == service.last_feedback_id or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert count == 2
        assert newest == service.last_feedback_id
        assert service.metrics.checkpoints._value.get() >= 3



_NOTHING_COMPILES_AFTER_START = """
import sys
from fastapi.testclient import TestClient
from bandit import Policy, _hashing_kernel, _policy_kernel
from tests.service.conftest import add_model, create_tenant, decide, make_settings
from service.app import create_app

def compiled():
    return {(m.__name__, n): len(f.signatures) for m in (_policy_kernel, _hashing_kernel)
            for n, f in vars(m).items() if hasattr(f, "signatures")}

with TestClient(create_app(make_settings(sys.argv[1]))) as client:
    names = [add_model(client), add_model(client)]
    headers = create_tenant(client)
    routing = client.app.state.routing
    before = compiled()
    r = decide(client, headers)
    assert r.status_code == 200, r.text
    r = client.post("/v1/feedback", headers=headers, json={
        "decision_id": r.json()["decision_id"], "quality": 0.7, "cost_usd": 0.001,
        "latency_ms": 120.0})
    assert r.status_code in (200, 202), r.text
    r = client.post("/v1/decide", headers=headers, json={"query": {"text": "hello there"}})
    assert r.status_code == 200, r.text
    # A batch of two, as the decider calls it when requests queue, on copies of the
    # store's policies (their draws stay theirs).
    prices = routing.decider.price_estimates(names, [None, 40])
    for kind, policy in routing.policies.shared.items():
        copy = Policy.from_bytes(policy.to_bytes())
        copy.decide_batch(routing.contexts.featurize("a b c")[None].repeat(2, 0),
                          cost_estimate=prices)
    after = compiled()
    print(sorted(k for k in after if after[k] != before[k]))
"""


def test_nothing_compiles_after_start(tmp_path):
    # A fresh process (what start-up itself compiled or loaded from numba's cache, not
    # what an earlier test did): the first decide, feedback and batched decide of a new
    # install compile nothing; without the warm-up they compiled ~2 s and ~1 s while
    # requests waited.
    done = subprocess.run([sys.executable, "-c", _NOTHING_COMPILES_AFTER_START,
                           f"sqlite:///{tmp_path / 'router.db'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
