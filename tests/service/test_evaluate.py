"""``bandit-router evaluate`` on the service's own database and on a JSON-lines log."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bandit import LinUCB, Preferences
from service.app import create_app
from service.cli import app as cli
from tests.service.conftest import DIM, add_model, create_tenant, make_settings

runner = CliRunner()


def test_evaluate_database_decisions_with_feedback(new_database_url, tmp_path):
    url = new_database_url()
    rng = np.random.default_rng(0)
    with TestClient(create_app(make_settings(url))) as client:
        tenant = create_tenant(client, "ope")
        models = [add_model(client, f"ope-{i}") for i in range(3)]
        answered = 0
        for t in range(120):
            x = rng.standard_normal(DIM)
            x /= np.linalg.norm(x)
            r = client.post("/v1/decide", headers=tenant,
                            json={"query": {"embedding": x.tolist()}, "candidates": models})
            assert r.status_code == 200, r.text
            if t % 4 == 3:
                continue  # no feedback: such decisions cannot be scored
            did = r.json()["decision_id"]
            # Feedback in two events: cost when the response ends, quality later.
            for body in ({"cost_usd": 0.001, "event_id": "cost"},
                         {"quality": float(rng.random() < 0.6), "event_id": "thumbs"}):
                f = client.post("/v1/feedback", headers=tenant,
                                json={"decision_id": did, **body})
                assert f.status_code == 202, f.text
            answered += 1
    out = tmp_path / "ope.json"
    result = runner.invoke(cli, ["evaluate", "--database-url", url, "--policy", "thompson",
                                 "--preferences", "quality=1,cost=10", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    # Both feedback events were merged: every answered decision has quality and cost.
    assert data["rows"] == answered == 90 and data["skipped"] == 0
    for name in ("ips", "snips", "dr"):
        assert data[name]["low"] <= data[name]["value"] <= data[name]["high"]
        assert -0.1 <= data[name]["value"] <= 1.1


def _synthetic_log(path, seed: int = 1, n: int = 1500):
    """A LinUCB (epsilon 0.3) logs its decisions; the true mean quality of each model is
    known, so the value of a fixed 'always model b' candidate is known exactly."""
    rng = np.random.default_rng(seed)
    means = {"a": 0.3, "b": 0.7, "c": 0.5}
    logger = LinUCB(4, seed=seed, epsilon=0.3)
    for arm in means:
        logger.add_arm(arm)
    lines = []
    for _ in range(n):
        x = rng.standard_normal(4)
        x /= np.linalg.norm(x)
        d = logger.decide(x, Preferences())
        outcome = {"quality": float(rng.random() < means[d.arm])}
        logger.update(d.arm, x, outcome)
        lines.append(json.dumps({"context": x.tolist(), "model": d.arm,
                                 "propensity": d.propensity, "outcome": outcome}))
    path.write_text("\n".join(lines) + "\n")
    return means


def test_evaluate_log_file_estimate_near_truth(tmp_path):
    log = tmp_path / "log.jsonl"
    means = _synthetic_log(log)
    out = tmp_path / "ope.json"
    result = runner.invoke(cli, ["evaluate", "--log", str(log), "--policy", "linucb",
                                 "--epsilon", "0.0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    # A learning LinUCB soon routes everything to "b" (0.7): its average value over the
    # log lies between the mean model and the best one.
    for name in ("ips", "snips", "dr"):
        assert 0.55 < data[name]["value"] < means["b"] + 3 * data[name]["stderr"]
    assert data["dr"]["stderr"] <= data["ips"]["stderr"]
    assert "dr" in result.output and "logged policy" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --log and --database-url"),
        (["--policy", "greedy"], "--policy"),
        # the value as typed, brackets included (rich took "[bold]" for markup and ate it)
        (["--policy", "[bold]greedy"], "[bold]greedy"),
        (["--preferences", "speed=1"], "preferences"),
    ],
)
def test_evaluate_bad_option_exit_2(tmp_path, args, message):
    log = tmp_path / "log.jsonl"
    _synthetic_log(log, n=20)
    base = [] if not args else ["--log", str(log)]
    result = runner.invoke(cli, ["evaluate", *base, *args])
    assert result.exit_code == 2
    assert message in result.output


def test_evaluate_malformed_log_line_exit_2(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"context": [1, 0], "model": "a", "propensity": 0.5, '
                   '"outcome": {"quality": 1}}\n{"context": [1]}\n')
    result = runner.invoke(cli, ["evaluate", "--log", str(log)])
    assert result.exit_code == 2
    assert "line 2" in result.output


def test_feedback_and_embedding_beyond_bounds_refused_not_stored(client):
    """What bandit's statistics would refuse is refused before anything is stored."""
    from tests.service.conftest import assert_problem

    tenant = create_tenant(client, "bounds")
    model = add_model(client)
    huge = [0.0] * DIM
    huge[0] = 1e200
    r = client.post("/v1/decide", headers=tenant,
                    json={"query": {"embedding": huge}, "candidates": [model]})
    assert_problem(r, 422, field="query.embedding")
    d = client.post("/v1/decide", headers=tenant,
                    json={"query": {"embedding": [0.1] * DIM}, "candidates": [model]})
    did = d.json()["decision_id"]
    r = client.post("/v1/feedback", headers=tenant,
                    json={"decision_id": did, "cost_usd": 1e300})
    assert_problem(r, 422, field="cost_usd")
    ok = client.post("/v1/feedback", headers=tenant,
                     json={"decision_id": did, "cost_usd": 0.01, "quality": 1.0})
    assert ok.status_code == 202 and ok.json()["status"] == "applied"
