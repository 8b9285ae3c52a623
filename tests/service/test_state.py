"""Learned state in and out of a running service: a warm start from
``bandit-router warmstart`` loaded with ``bandit-router state import`` changes the first
decisions as it should; an export loads into another deployment; every refusal (other
featurizer, other dimension, unknown models) changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.client import RouterClient
from tests.service.conftest import ADMIN_KEY, make_settings
from tests.service.live import live_server

runner = CliRunner()
TOPICS = {"math": ("solve the integral of x squared", "solver"),
          "poem": ("write a poem about autumn", "writer")}


@pytest.fixture
def warm_file(tmp_path):
    """A labelled log (solver is right on math, writer on poems) and its warm start."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(300):
        prompt, good = TOPICS["math" if rng.random() < 0.5 else "poem"]
        outcomes = {m: {"quality": 0.9 if m == good else 0.2, "cost_usd": 0.001}
                    for m in ("solver", "writer")}
        lines.append(json.dumps({"id": f"q{i}", "prompt": f"{prompt} #{i}",
                                 "outcomes": outcomes}))
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "warm.json"
    result = runner.invoke(cli_app, ["warmstart", str(log), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"bandit-router state import {out}" in result.stdout.replace("\n", "")
    return out


def _service(tmp_path, name: str, **overrides):
    # The defaults a deployment has (hashing, 64 dimensions), no exploration: the
    # decisions show what the statistics say.
    values = {"dim": 64, "epsilon": 0.0, **overrides}
    return live_server(make_settings(f"sqlite:///{tmp_path / name}", **values))


def _setup(base: str, models=("solver", "writer")) -> str:
    with RouterClient(base, ADMIN_KEY) as admin:
        for name in models:
            admin.add_model(name, 1.0, 2.0)
        return admin.create_tenant("warm").api_key


def _right(base: str, key: str, policy: str | None = None) -> int:
    """How many of 20 fresh prompts (10 per topic) go to the model that is right (with
    the tenant's policy set to ``policy`` first, when given)."""
    right = 0
    with RouterClient(base, key) as router:
        if policy is not None:
            router.put_preferences(policy=policy)
        for i in range(10):
            for prompt, good in TOPICS.values():
                right += router.decide(f"{prompt} (live {i})").model == good
    return right


def _cli(base: str, *args: str, code: int = 0):
    result = runner.invoke(cli_app, list(args), env={"BANDIT_ROUTER_URL": base,
                                                     "BANDIT_ROUTER_KEY": ADMIN_KEY})
    assert result.exit_code == code, (result.output, result.exception)
    return result


def test_import_warm_start_changes_first_decisions(tmp_path, warm_file):
    with _service(tmp_path, "a.db") as base:
        key = _setup(base)
        # LinUCB breaks a tie the same way every time: two models alike, no data, one of
        # them for every prompt (the sampling kinds would pick at random).
        before = _right(base, key, "linucb")
        out = _cli(base, "state", "import", str(warm_file)).stdout
        assert "loaded shared:linucb, shared:select, shared:thompson" in out
        # The file's select (warmstart's default) fills every kind (the same sums); the
        # select policy also knows, per model, that the text predicts it.
        after = {kind: _right(base, key, kind) for kind in ("select", "linucb", "thompson")}
    assert before == 10
    assert after == {"select": 20, "linucb": 20, "thompson": 20}


def test_imported_state_survives_restart_and_exports(tmp_path, warm_file):
    settings = {"dim": 64, "epsilon": 0.0}
    with _service(tmp_path, "b.db", **settings) as base:
        key = _setup(base)
        _cli(base, "state", "import", str(warm_file))
    exported = tmp_path / "exported.json"
    with _service(tmp_path, "b.db", **settings) as base:  # restarted on the same database
        assert _right(base, key) == 20
        out = _cli(base, "state", "export", str(exported)).stdout
        assert "3 policies" in out  # one shared policy per kind
    with _service(tmp_path, "c.db", **settings) as base:  # another deployment
        key = _setup(base)
        assert _right(base, key, "linucb") == 10
        _cli(base, "state", "import", str(exported))
        assert _right(base, key, "select") == 20


def test_import_refusals_change_nothing(tmp_path, warm_file):
    state = json.loads(warm_file.read_text())
    with _service(tmp_path, "d.db", featurizer_seed=1) as base:
        key = _setup(base)
        before = _cli(base, "state", "export", str(tmp_path / "before.json"))
        err = _cli(base, "state", "import", str(warm_file), code=1).stderr
        assert "error 422" in err and "featurizer" in err and "FEATURIZER_SEED" in err
        spec = json.loads((tmp_path / "before.json").read_text())["featurizer"]
        other_dim = tmp_path / "dim.json"
        other_dim.write_text(json.dumps({**state, "featurizer": spec, "context_dim": 32}))
        err = _cli(base, "state", "import", str(other_dim), code=1).stderr
        assert "context_dim" in err and "BANDIT_ROUTER_DIM" in err
        assert _right(base, key, "linucb") == 10
        assert before.exit_code == 0
    with _service(tmp_path, "e.db") as base:
        _setup(base, models=("solver",))
        err = _cli(base, "state", "import", str(warm_file), code=1).stderr
        assert "error 422" in err and "writer" in err and "models add" in err
        garbage = tmp_path / "garbage.json"
        garbage.write_text(json.dumps({"format": "bandit-router-state", "version": 1,
                                       "featurizer": "x", "context_dim": 64,
                                       "policies": {"shared:linucb": "@@@"}}))
        err = _cli(base, "state", "import", str(garbage), code=1).stderr
        assert "policies.shared:linucb" in err and "base64" in err
