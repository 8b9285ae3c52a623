"""``bandit-router fit-prototypes`` on generated prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bandit.featurize import HashingFeaturizer, PrototypeMap
from service.cli import app

runner = CliRunner()
TOPICS = ["solve the integral of x squared", "write a poem about autumn",
          "translate this sentence to german", "sort a list in python"]


def prompts(n: int = 120) -> list[str]:
    return [f"{TOPICS[i % len(TOPICS)]} #{i}" for i in range(n)]


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    # 'prompt' as in the replay format; 'text' accepted as well.
    lines = [json.dumps({"prompt": p} if i % 2 else {"text": p, "id": i})
             for i, p in enumerate(prompts())]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_fit_prototypes_jsonl_writes_loadable_map(jsonl_file, tmp_path):
    out = tmp_path / "maps" / "map.json"
    result = runner.invoke(app, ["fit-prototypes", str(jsonl_file), "--out", str(out),
                                 "--k", "4", "--dim", "16", "--temperature", "0.1",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    loaded = PrototypeMap.load(str(out))
    assert (loaded.k, loaded.base_dim, loaded.dim) == (4, 16, 4)
    assert loaded.temperature == pytest.approx(0.1) and not loaded.include_base
    # Exactly the map the library fits on the same prompts with the same seed.
    x = HashingFeaturizer(16, seed=0).transform(prompts())
    expected = PrototypeMap.fit(x, 4, temperature=0.1, seed=3)
    assert loaded.spec == expected.spec
    # Four topics, four prototypes: each topic's prompts share their nearest prototype.
    nearest = np.argmax(loaded.transform(x), axis=1)
    for t in range(len(TOPICS)):
        assert len(set(nearest[t::len(TOPICS)].tolist())) == 1
    assert "BANDIT_ROUTER_PROTOTYPE_MAP" in result.output


def test_fit_prototypes_text_lines_include_base(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts(40)) + "\n")
    out = tmp_path / "map.json"
    result = runner.invoke(app, ["fit-prototypes", str(path), "--out", str(out), "--k", "3",
                                 "--dim", "8", "--include-base", "--featurizer-seed", "5"])
    assert result.exit_code == 0, result.output
    loaded = PrototypeMap.load(str(out))
    assert (loaded.k, loaded.base_dim, loaded.dim, loaded.include_base) == (3, 8, 11, True)
    x = HashingFeaturizer(8, seed=5).transform(prompts(40))
    assert loaded.spec == PrototypeMap.fit(x, 3, include_base=True).spec


@pytest.mark.parametrize("version", [1, 3, 4])
def test_fit_prototypes_hashing_version_fits_that_versions_vectors(jsonl_file, tmp_path,
                                                                   version):
    # A deployment that learned with version 1 (or opted in to 3 or 4) fits its map on that
    # version's vectors.
    out = tmp_path / "map.json"
    result = runner.invoke(app, ["fit-prototypes", str(jsonl_file), "--out", str(out),
                                 "--k", "4", "--dim", "16", "--hashing-version",
                                 str(version)])
    assert result.exit_code == 0, result.output
    x = HashingFeaturizer(16, seed=0, version=version).transform(prompts())
    # What the fitted map's file reads back as: the map's constructor normalizes its rows
    # again, which can move a coordinate by an ulp (it does for these v3 vectors).
    written = PrototypeMap.from_dict(PrototypeMap.fit(x, 4).to_dict())
    assert PrototypeMap.load(str(out)).spec == written.spec
    assert PrototypeMap.fit(x, 4).spec != PrototypeMap.fit(
        HashingFeaturizer(16, seed=0).transform(prompts()), 4).spec


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "--k"),
        (["--k", "500"], "--k"),
        (["--temperature", "0"], "--temperature"),
        (["--featurizer", "bert"], "--featurizer"),
        (["--dim", "0"], "--dim"),
        (["--mix", "1.5"], "--mix"),
        (["--format", "csv"], "--format"),
        (["--hashing-version", "5"], "--hashing-version"),
    ],
)
def test_fit_prototypes_bad_option_exit_2_names_it(jsonl_file, tmp_path, args, message):
    out = tmp_path / "map.json"
    result = runner.invoke(app, ["fit-prototypes", str(jsonl_file), "--out", str(out),
                                 "--k", "4", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_fit_prototypes_malformed_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\nnot json\n")
    result = runner.invoke(app, ["fit-prototypes", str(path), "--out",
                                 str(tmp_path / "m.json"), "--k", "1"])
    assert result.exit_code == 2
    assert "PROMPTS line 2" in result.output
