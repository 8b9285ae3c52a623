"""Select's update without the copy of the selected candidate's inverse (issue 19):
``q_inv`` is copied from ``sel_inv`` only when read, the compiled decides read the
candidate through the selected index, and the float32 copy is written in the selected
candidate's own step. Held to the numpy reference over a stream whose arms switch
candidates, after every update; and the lazy predictions of a compiled decide."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from bandit import Decision, Preferences, SelectiveThompson
from bandit.stats import FLOAT32_INVERSE_DIM

PREFS = Preferences(quality=1.0, cost=20.0, latency=0.1)


def select_pair(d: int) -> list[SelectiveThompson]:
    policies = []
    for compiled in (True, False):
        policy = SelectiveThompson(d, seed=3, drift_delta=None, refresh_every=50)
        for j in range(3):
            policy.add_arm(f"m{j}")  # no priors: every head grouped, the kernels' case
        policy._stats.compiled = compiled
        policies.append(policy)
    return policies


@pytest.mark.parametrize("d", [6, FLOAT32_INVERSE_DIM])
def test_select_update_path_matches_numpy_reference_as_candidates_switch(d):
    compiled, reference = select_pair(d)
    stats, ref = compiled._stats, reference._stats
    rng = np.random.default_rng(11)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    chosen = set()
    for t in range(120):
        x = rng.standard_normal(d) / np.sqrt(d)
        # Quality linear in x for the first 80 events (the text candidate takes over),
        # then flat noise: the selection moves, per arm, at different times.
        signal = 3.0 * float(x @ direction) if t < 80 else 0.0
        y = {"quality": float(np.clip(0.5 + signal + 0.05 * rng.standard_normal(), 0, 1)),
             "cost_usd": 0.001, "latency_ms": 300.0 + t}
        arm = f"m{t % 3}"
        k = t % 3
        compiled.update(arm, x, y)
        reference.update(arm, x, y)
        if stats.updates[k]:  # not refreshed by this update: the kernel's step
            assert stats._q_stale[k]  # nothing copied by the update
        np.testing.assert_array_equal(stats._sel, np.argmin(stats.sel_err, axis=1))
        np.testing.assert_array_equal(stats._sel, ref._sel)
        chosen.update(stats._sel.tolist())
        for name in ("sel_inv", "sel_theta", "sel_err", "theta", "s_inv"):
            np.testing.assert_allclose(getattr(stats, name), getattr(ref, name),
                                       rtol=1e-9, atol=1e-9, err_msg=name)
        # The decides read the selected candidates: widths and choices as the reference.
        xq = rng.standard_normal(d) / np.sqrt(d)
        got, want = compiled.decide_batch(xq, PREFS), reference.decide_batch(xq, PREFS)
        np.testing.assert_array_equal(got.choices, want.choices)
        np.testing.assert_allclose(got.uncertainty, want.uncertainty,
                                   rtol=1e-6 if d >= FLOAT32_INVERSE_DIM else 1e-9)
        if d >= FLOAT32_INVERSE_DIM:  # the copy the kernel wrote is the selected one's
            copy = stats._copies32["q_inv"][1]
            np.testing.assert_allclose(copy, ref.sel_inv[np.arange(3), ref._sel],
                                       rtol=1e-6, atol=1e-12)
    assert chosen == {0, 1}  # both candidates were selected along the stream
    # Read: the copy of the selected candidates' inverses, as the reference's.
    np.testing.assert_allclose(stats.q_inv, ref.q_inv, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stats.q_inv, stats.sel_inv[np.arange(3), stats._sel])
    assert not stats._q_stale.any()
    # Arms removed and added: the copies follow their arms.
    for policy in (compiled, reference):
        policy.update("m1", x, y)
        policy.remove_arm("m0")
        policy.add_arm("m3")
    np.testing.assert_allclose(stats.q_inv, ref.q_inv, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stats._sel, np.argmin(stats.sel_err, axis=1))


def test_compiled_decision_builds_the_same_predictions_when_read():
    compiled, reference = select_pair(6)
    rng = np.random.default_rng(2)
    for t in range(30):
        x = rng.standard_normal(6) / 2
        y = {"quality": float(rng.random()), "cost_usd": 0.001, "latency_ms": 200.0}
        for policy in (compiled, reference):
            policy.update(f"m{t % 3}", x, y)
    got, want = compiled.decide(x, PREFS), reference.decide(x, PREFS)
    assert isinstance(got, Decision) and got.arm == want.arm
    assert type(got.predictions) is dict and list(got.predictions) == list(want.predictions)
    for name, p in want.predictions.items():
        np.testing.assert_allclose(tuple(got.predictions[name]), tuple(p), rtol=1e-9,
                                   atol=1e-9)
    assert got.predictions is got.predictions  # built once
    plain = Decision(got.arm, got.propensity, dict(got.predictions), got.explored,
                     got.policy)
    assert got == plain and plain == got and repr(got) == repr(plain)
    assert pickle.loads(pickle.dumps(got)) == got  # noqa: S301 (our own bytes)
    assert dataclasses.replace(got, arm="m9").arm == "m9"
    assert dataclasses.asdict(got)["predictions"] == dataclasses.asdict(plain)["predictions"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.arm = "m1"  # type: ignore[misc]


def test_prediction_dicts_from_the_compiled_table_equal_those_from_the_arrays():
    compiled, _ = select_pair(6)
    rng = np.random.default_rng(4)
    for t in range(30):
        x = rng.standard_normal(6) / 2
        compiled.update(f"m{t % 3}", x, {"quality": float(rng.random()), "cost_usd": 0.001,
                                         "latency_ms": 200.0 + t})
    batch = compiled.decide_batch(rng.standard_normal((3, 6)) / 2, PREFS)
    assert batch.table is not None  # the compiled decide's
    arrays = dataclasses.replace(batch, table=None)
    prices, other = rng.random((3, 3)), rng.random((3, 3))
    assert (batch.prediction_dicts(price_usd=prices, other=other)
            == arrays.prediction_dicts(price_usd=prices, other=other))
    assert batch.prediction_dicts() == arrays.prediction_dicts()
    assert batch.prediction_dicts()[2]["m1"] == batch.decision(2).predictions["m1"].as_dict()
