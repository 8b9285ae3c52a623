"""``BANDIT_ROUTER_PROTOTYPE_MAP``: contexts through a prototype map, on SQLite and
PostgreSQL (hashing base featurizer, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from bandit import Preferences
from bandit.featurize import HashingFeaturizer, PrototypeMap
from service.app import create_app
from service.config import Settings
from service.db import models as m
from service.features import ContextSettingsError
from tests.service.conftest import DIM, add_model, assert_problem, create_tenant, make_settings

K = 4
TOPICS = ["solve the integral of x squared", "write a poem about autumn",
          "translate this sentence to german", "sort a list in python"]
PREFS = Preferences(1.0, 20.0, 0.1)


def prompts(n: int = 80) -> list[str]:
    return [f"{TOPICS[i % len(TOPICS)]} #{i}" for i in range(n)]


def base_vector(text: str) -> np.ndarray:
    """What the service's featurizer (hashing, BANDIT_ROUTER_DIM=DIM, seed 0) makes."""
    return HashingFeaturizer(DIM, seed=0).transform_one(text)


@pytest.fixture(scope="module")
def map_path(tmp_path_factory):
    x = HashingFeaturizer(DIM, seed=0).transform(prompts())
    path = tmp_path_factory.mktemp("prototypes") / "map.json"
    PrototypeMap.fit(x, K, temperature=0.1, seed=1).save(str(path))
    return path


def stored_context(client: TestClient, decision_id: str) -> np.ndarray:
    service = client.app.state.routing
    assert service.writer.flush(10)
    with Session(service.engine) as session:
        blob = session.scalar(select(m.DecisionRow.context).where(m.DecisionRow.id == decision_id))
    return np.frombuffer(blob, dtype=np.float64)


def train(client, tenant, models, rounds: int) -> None:
    rng = np.random.default_rng(5)
    for i in range(rounds):
        d = client.post("/v1/decide", json={"query": {"text": prompts()[i % 80]},
                                            "candidates": models}, headers=tenant).json()
        j = models.index(d["model"])
        r = client.post("/v1/feedback", json={
            "decision_id": d["decision_id"], "quality": float(rng.uniform(0.2 + 0.3 * j, 1.0)),
            "cost_usd": 0.001 * (j + 1), "latency_ms": 300.0}, headers=tenant)
        assert r.status_code == 202 and r.json()["status"] == "applied", r.text


def predictions(client, models) -> dict[str, np.ndarray]:
    probes = PrototypeMap.load(str(client.app.state.settings.prototype_map)).transform(
        HashingFeaturizer(DIM, seed=0).transform(TOPICS))
    return {kind: np.array([[[p.quality, p.cost_usd, p.utility]
                             for p in policy.predict(x, PREFS, models).values()]
                            for x in probes])
            for kind, policy in client.app.state.routing.shared.items()}


def test_settings_read_prototype_map_from_environment(monkeypatch, map_path):
    monkeypatch.setenv("BANDIT_ROUTER_PROTOTYPE_MAP", str(map_path))
    assert Settings().prototype_map == map_path
    monkeypatch.setenv("BANDIT_ROUTER_PROTOTYPE_MAP", "")
    assert Settings().prototype_map is None


def test_decide_text_and_embedding_share_mapped_context(new_database_url, map_path):
    settings = make_settings(new_database_url(), prototype_map=map_path)
    prototype_map = PrototypeMap.load(str(map_path))
    with TestClient(create_app(settings)) as client:
        service = client.app.state.routing
        assert service.context_dim == K
        assert {p.dim for p in service.shared.values()} == {K}
        models = [add_model(client, f"model-{i}") for i in range(2)]
        tenant = create_tenant(client)
        text = "translate this sentence to german please"
        by_text = client.post("/v1/decide", json={"query": {"text": text}},
                              headers=tenant)
        assert by_text.status_code == 200, by_text.text
        by_vector = client.post("/v1/decide", json={
            "query": {"embedding": base_vector(text).tolist()}}, headers=tenant)
        assert by_vector.status_code == 200, by_vector.text
        assert by_text.json()["model"] in models
        # The decision stores the context the policy saw: the mapped vector, the same
        # for the text and for the caller's own embedding of it.
        expected = prototype_map.transform(base_vector(text))
        assert expected.shape == (K,)
        x_text = stored_context(client, by_text.json()["decision_id"])
        x_vector = stored_context(client, by_vector.json()["decision_id"])
        np.testing.assert_allclose(x_text, expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(x_vector, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("length", [K, DIM - 1, DIM + 1])
def test_decide_embedding_not_base_dim_422_names_length(new_database_url, map_path, length):
    with TestClient(create_app(make_settings(new_database_url(),
                                             prototype_map=map_path))) as client:
        add_model(client, "only")
        tenant = create_tenant(client)
        r = client.post("/v1/decide", json={"query": {"embedding": [0.1] * length}},
                        headers=tenant)
        body = assert_problem(r, 422, field="query.embedding")
        error = next(e for e in body["errors"] if e["field"] == "query.embedding")
        assert f"{DIM} numbers" in error["allowed"], error


def test_feedback_learns_and_restart_restores_with_same_map(new_database_url, map_path):
    url = new_database_url()
    settings = make_settings(url, prototype_map=map_path)
    with TestClient(create_app(settings)) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant = create_tenant(c1)
        linucb = c1.app.state.routing.shared["linucb"]
        version = linucb.version
        untrained = predictions(c1, models)
        train(c1, tenant, models, 24)
        linucb = c1.app.state.routing.shared["linucb"]
        assert linucb.dim == K and linucb.version > version
        before = predictions(c1, models)
        assert not np.allclose(before["linucb"], untrained["linucb"])
    with TestClient(create_app(settings)) as c2:
        assert {p.dim for p in c2.app.state.routing.shared.values()} == {K}
        after = predictions(c2, models)
        for kind in before:
            np.testing.assert_allclose(after[kind], before[kind], rtol=0, atol=1e-12)
        r = c2.post("/v1/decide", json={"query": {"text": TOPICS[0]}}, headers=tenant)
        assert r.status_code == 200, r.text


def test_start_refuses_map_of_other_base_dim(new_database_url, tmp_path):
    path = tmp_path / "wide.json"
    x = HashingFeaturizer(DIM * 2, seed=0).transform(prompts())
    PrototypeMap.fit(x, K).save(str(path))
    app = create_app(make_settings(new_database_url(), prototype_map=path))
    with pytest.raises(ContextSettingsError,
                       match=f"BANDIT_ROUTER_PROTOTYPE_MAP.*{DIM * 2}.*BANDIT_ROUTER_DIM.*"
                             f"is {DIM}"):
        with TestClient(app):
            pass


@pytest.mark.parametrize("content", [None, "not json", '{"type": "prototypes"}'])
def test_start_refuses_missing_or_corrupt_map(new_database_url, tmp_path, content):
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    app = create_app(make_settings(new_database_url(), prototype_map=path))
    expected = "no file" if content is None else "is not a prototype map"
    with pytest.raises(ContextSettingsError, match=f"BANDIT_ROUTER_PROTOTYPE_MAP.*{expected}"):
        with TestClient(app):
            pass


def test_start_refuses_checkpoint_of_other_dim(new_database_url, map_path):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:  # no map: DIM-dim policies
        models = [add_model(c1, f"model-{i}") for i in range(2)]
        train(c1, create_tenant(c1), models, 3)
    app = create_app(make_settings(url, prototype_map=map_path))
    with pytest.raises(ContextSettingsError,
                       match=f"dimension {DIM}, the settings say {K}.*PROTOTYPE_MAP"):
        with TestClient(app):
            pass


def test_start_without_map_refuses_checkpoint_learned_with_it(new_database_url, map_path):
    url = new_database_url()
    with TestClient(create_app(make_settings(url, prototype_map=map_path))) as c1:
        models = [add_model(c1, f"model-{i}") for i in range(2)]
        train(c1, create_tenant(c1), models, 3)
    with pytest.raises(ContextSettingsError,
                       match=f"dimension {K}, the settings say {DIM}.*PROTOTYPE_MAP is unset"):
        with TestClient(create_app(make_settings(url))):
            pass
