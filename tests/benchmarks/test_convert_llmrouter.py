"""The LLMRouter converter, on a tiny generated copy of the layout (no ../shared)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

# ``benchmarks`` is not an installed package (the wheel ships bandit, service, streams);
# make the repository root importable when pytest is run without ``python -m``.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
conv = importlib.import_module("benchmarks.convert_llmrouter")

PRICES = {
    "small": {"size": "7B", "input_price_per_mtok": 0.2, "output_price_per_mtok": 0.4},
    "large": {"size": "70B", "input_price_per_mtok": 0.9, "output_price_per_mtok": 1.5},
    "unused": {"size": "1B", "input_price_per_mtok": 0.01, "output_price_per_mtok": 0.01},
}
TRAIN = [
    {"question": "0123456789", "scores": {"small": 0.25, "large": 1.0}, "cluster_id": 0},
    {"question": "abcd", "scores": {"large": 0, "small": 1}, "cluster_id": 3},
]
TEST = [
    {"question": "", "scores": {"small": 0.5, "large": 0.75}, "cluster_id": 1},
]


def _write_dir(root: Path, train=TRAIN, test=TEST, prices=PRICES) -> Path:
    data = root / "llmrouter"
    data.mkdir()
    (data / "models.json").write_text(json.dumps(prices))
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_convert_dir_costs_follow_formula(tmp_path):
    records = list(conv.convert_dir(_write_dir(tmp_path), output_tokens=100))

    # 10 characters -> ceil(10/4) = 3 prompt tokens; 4 -> 1; "" -> 0.
    cost = {(r["id"], m): o["cost_usd"] for r in records for m, o in r["outcomes"].items()}
    assert cost[("llmrouter-train-000000", "small")] == pytest.approx(
        (0.2 * 3 + 0.4 * 100) / 1e6, rel=1e-12)  # 4.06e-5
    assert cost[("llmrouter-train-000000", "large")] == pytest.approx(
        (0.9 * 3 + 1.5 * 100) / 1e6, rel=1e-12)  # 1.527e-4
    assert cost[("llmrouter-train-000001", "small")] == pytest.approx(40.2e-6, rel=1e-12)
    assert cost[("llmrouter-test-000000", "large")] == pytest.approx(150e-6, rel=1e-12)
    assert math.isclose(cost[("llmrouter-test-000000", "small")], 40e-6, rel_tol=1e-12)


def test_convert_dir_records_in_replay_format(tmp_path):
    records = list(conv.convert_dir(_write_dir(tmp_path)))

    assert [r["split"] for r in records] == ["train", "train", "test"]
    assert len({r["id"] for r in records}) == 3
    assert [r["prompt"] for r in records] == ["0123456789", "abcd", ""]
    for record in records:
        assert set(record) == {"id", "prompt", "outcomes", "split", "prices", "task"}
        # Only the models the rows score, not every model with a price.
        assert sorted(record["outcomes"]) == ["large", "small"]
        assert sorted(record["prices"]) == ["large", "small"]
        assert all(set(o) == {"quality", "cost_usd", "input_tokens", "output_tokens"}
                   for o in record["outcomes"].values())
    assert records[1]["outcomes"]["large"]["quality"] == 0.0
    assert records[2]["outcomes"]["large"]["quality"] == 0.75
    # The replay log carries what the router can know before the call: prices, the
    # prompt's token estimate, the assumed answer length, and the task cluster.
    assert records[0]["prices"]["large"] == {"input_price_per_mtok": 0.9,
                                             "output_price_per_mtok": 1.5}
    assert records[0]["outcomes"]["small"]["input_tokens"] == 3
    assert records[0]["outcomes"]["small"]["output_tokens"] == 256
    assert [r["task"] for r in records] == ["0", "3", "1"]


def test_convert_dir_default_output_tokens_is_256(tmp_path):
    records = list(conv.convert_dir(_write_dir(tmp_path)))

    assert conv.DEFAULT_OUTPUT_TOKENS == 256
    assert records[2]["outcomes"]["small"]["cost_usd"] == pytest.approx(0.4 * 256 / 1e6,
                                                                         rel=1e-12)


@pytest.mark.parametrize("bad", [None, "0.5", 1.5, -0.1, float("nan")])
def test_convert_dir_invalid_score_raises(tmp_path, bad):
    train = [TRAIN[0], {"question": "q", "scores": {"small": 0.1, "large": bad}}]

    with pytest.raises(conv.ConversionError) as info:
        list(conv.convert_dir(_write_dir(tmp_path, train=train)))

    message = str(info.value)
    assert "train.jsonl:2" in message
    assert "scores.large" in message
    assert "--skip-incomplete" in message


def test_convert_dir_missing_score_skipped_when_asked(tmp_path):
    train = [TRAIN[0], {"question": "q", "scores": {"small": 0.1}}, TRAIN[1]]
    stats = conv.ConversionStats()

    records = list(conv.convert_dir(_write_dir(tmp_path, train=train), skip_incomplete=True,
                                    stats=stats))

    # Ids keep the source line, so the skipped row leaves a gap, not a duplicate.
    assert [r["id"] for r in records] == ["llmrouter-train-000000", "llmrouter-train-000002",
                                          "llmrouter-test-000000"]
    assert stats.skipped == {"train": 1, "test": 0}
    assert stats.rows == {"train": 2, "test": 1}


def test_convert_dir_unpriced_model_raises(tmp_path):
    prices = {"small": PRICES["small"]}

    with pytest.raises(conv.ConversionError, match="no price in models.json for large"):
        list(conv.convert_dir(_write_dir(tmp_path, prices=prices)))


def test_convert_dir_model_not_in_first_row_raises(tmp_path):
    test = [{"question": "q", "scores": {"small": 0.5, "large": 0.5, "unused": 0.5}}]

    with pytest.raises(conv.ConversionError, match=r"test.jsonl:1: .*unused"):
        list(conv.convert_dir(_write_dir(tmp_path, test=test)))


def test_main_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "out" / "replay.jsonl"

    code = conv.main(["--data-dir", str(_write_dir(tmp_path)), "--out", str(out),
                      "--output-tokens", "10"])

    assert code == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["outcomes"]["small"]["cost_usd"] == pytest.approx((0.2 * 3 + 0.4 * 10) / 1e6,
                                                                   rel=1e-12)
    assert "wrote 3 rows" in capsys.readouterr().out


def test_main_missing_data_exits_2_with_help(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BANDIT_ROUTER_DATA", str(tmp_path / "nowhere"))

    code = conv.main(["--out", str(tmp_path / "x.jsonl")])

    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "llmrouter") in err
    assert "BANDIT_ROUTER_DATA" in err
    assert "replay format" in err
    assert not (tmp_path / "x.jsonl").exists()
