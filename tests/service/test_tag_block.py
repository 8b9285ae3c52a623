"""BANDIT_ROUTER_TAG_BLOCK: request tags in their own block after the text's coordinates
(zeros when untagged), learned in a few observations; a restart that turns it on over
statistics learned without it is refused, naming the setting."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bandit.featurize import TAG_BLOCK_DIMS, tag_block
from service.app import create_app
from service.features import ContextSettingsError
from tests.service.conftest import (
    DIM,
    add_model,
    create_tenant,
    embedding,
    make_settings,
    stored_decision,
)


@pytest.fixture(scope="module")
def block_client(new_database_url):
    with TestClient(create_app(make_settings(new_database_url(), tag_block=True))) as c:
        yield c


def _decide(client, tenant, tags=None, seed=0, **extra):
    body = {"query": {"embedding": embedding(seed)}, **extra}
    if tags is not None:
        body["tags"] = tags
    r = client.post("/v1/decide", json=body, headers=tenant)
    assert r.status_code == 200, r.text
    return r.json()


def _context(client, decision_id: str) -> np.ndarray:
    return np.frombuffer(stored_decision(client, decision_id).context, dtype=np.float64)


def test_tag_block_appended_after_the_text_zeros_untagged(block_client):
    add_model(block_client, "blk-a")
    tenant = create_tenant(block_client, "blk-ctx")
    tags = {"app": "support-bot"}
    tagged = _context(block_client, _decide(block_client, tenant, tags, seed=3)["decision_id"])
    plain = _context(block_client, _decide(block_client, tenant, seed=3)["decision_id"])
    assert tagged.shape == plain.shape == (DIM + TAG_BLOCK_DIMS,)
    assert np.array_equal(plain[:DIM], np.asarray(embedding(3)))
    assert np.array_equal(plain[DIM:], np.zeros(TAG_BLOCK_DIMS))
    assert np.array_equal(tagged[:DIM], plain[:DIM])
    np.testing.assert_allclose(tagged[DIM:], tag_block(tags), rtol=0, atol=1e-12)
    assert block_client.app.state.routing.shared["linucb"].config.tag_dims == TAG_BLOCK_DIMS


def test_tag_block_routes_by_tags_after_a_few_observations(block_client):
    models = [add_model(block_client, "blk-good-search"), add_model(block_client,
                                                                   "blk-good-support")]
    tenant = create_tenant(block_client, "blk-learn")
    best = {"search": models[0], "support": models[1]}
    # 8 rounds, where tags hashed into the text's coordinates need about 100 (the
    # context ridge 100 shrinks them; tests/service/test_tags.py).
    for _ in range(8):
        for app, good in best.items():
            for model in models:
                d = _decide(block_client, tenant, {"app": app}, candidates=[model])
                r = block_client.post("/v1/feedback", json={
                    "decision_id": d["decision_id"],
                    "quality": 0.9 if model == good else 0.2}, headers=tenant)
                assert r.status_code == 202, r.text
    for app, good in best.items():
        answer = _decide(block_client, tenant, {"app": app}, candidates=models)
        p = answer["predictions"]
        other = next(n for n in models if n != good)
        assert p[good]["quality"] > p[other]["quality"] + 0.4, (app, p)


def test_restart_turning_the_tag_block_on_is_refused_naming_it(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c:
        add_model(c, "blk-m")
        tenant = create_tenant(c)
        d = _decide(c, tenant, {"app": "x"})
        c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.9},
               headers=tenant)
        c.app.state.routing.checkpoint(force=True)
    with pytest.raises(ContextSettingsError, match="BANDIT_ROUTER_TAG_BLOCK"):
        with TestClient(create_app(make_settings(url, tag_block=True))):
            pass
    # The settings it learned with still start, with what it learned.
    with TestClient(create_app(make_settings(url))) as c:
        assert c.app.state.routing.shared["linucb"].observations("blk-m")["quality"] == 1
