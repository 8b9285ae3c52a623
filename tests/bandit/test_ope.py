"""Off-policy estimators against a known truth on synthetic bandit logs."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinearThompson, LinUCB, Preferences
from bandit.ope import LoggedDecisions, doubly_robust, evaluate_log, ips, snips

ARMS = ["a", "b", "c"]
PREFS = Preferences(quality=1.0)


def world(seed: int, n: int, d: int = 5):
    """Contexts and the true expected quality of every arm (thumbs are Bernoulli)."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((len(ARMS), d))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = 0.5 + 0.3 * x @ theta.T  # (n, K) in [0.2, 0.8]
    return rng, x, truth


def log_traffic(seed: int, n: int) -> tuple[LoggedDecisions, np.ndarray]:
    """A LinUCB with epsilon 0.3 routes the traffic and logs its propensities."""
    rng, x, truth = world(seed, n)
    logger = LinUCB(x.shape[1], seed=seed, epsilon=0.3)
    for arm in ARMS:
        logger.add_arm(arm)
    arms, props, outcomes = [], [], []
    for t in range(n):
        decision = logger.decide(x[t], PREFS)
        j = ARMS.index(decision.arm)
        outcome = {"quality": float(rng.random() < truth[t, j])}
        logger.update(decision.arm, x[t], outcome)
        arms.append(decision.arm)
        props.append(decision.propensity)
        outcomes.append(outcome)
    return LoggedDecisions(x, arms, props, outcomes), truth


def trained_candidate(seed: int, cls=LinUCB, **params):
    """A candidate trained on separate full-information data, then frozen."""
    rng, x, truth = world(seed, 600)
    policy = cls(x.shape[1], seed=seed + 1000, **params)
    for arm in ARMS:
        policy.add_arm(arm)
    for t in range(600):
        for j, arm in enumerate(ARMS):
            policy.update(arm, x[t], {"quality": float(rng.random() < truth[t, j])})
    return policy


def test_evaluate_frozen_candidate_intervals_cover_truth():
    covered = {"ips": 0, "snips": 0, "dr": 0}
    seeds = range(20)
    for seed in seeds:
        log, truth = log_traffic(seed, 1500)
        candidate = trained_candidate(seed, epsilon=0.05)
        _, probs = candidate.probabilities(log.contexts, PREFS)
        true_value = float((probs * truth).sum(axis=1).mean())
        result = evaluate_log(candidate, log, PREFS, learn=False, batch_size=500)
        assert result["rows"] == 1500 and result["skipped"] == 0
        for name in covered:
            estimate = result[name]
            assert abs(estimate.value - true_value) < 4 * estimate.stderr, (seed, name)
            covered[name] += estimate.covers(true_value)
    # Nominal 95% intervals: over 20 seeds at least 16 must cover (fails for a biased
    # estimator or a wrong propensity with high probability).
    for name, count in covered.items():
        assert count >= 16, (name, count)


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_evaluate_learning_candidate_matches_its_own_replay(cls):
    log, truth = log_traffic(3, 1200)
    candidate = cls(5, seed=7)
    shadow = cls(5, seed=7)
    for arm in ARMS:
        candidate.add_arm(arm)
        shadow.add_arm(arm)
    result = evaluate_log(candidate, log, PREFS, learn=True)
    # Truth: the candidate's successive distributions, scored with the true rewards.
    values = []
    for t in range(1200):
        _, probs = shadow.probabilities(log.contexts[t], PREFS)
        values.append(float(probs[0] @ truth[t]))
        shadow.update(log.arms[t], log.contexts[t], log.outcomes[t])
    true_value = float(np.mean(values))
    for name in ("ips", "snips", "dr"):
        estimate = result[name]
        assert abs(estimate.value - true_value) < 4 * estimate.stderr, name
    assert result["dr"].stderr < result["ips"].stderr  # the model's predictions help


def test_estimators_small_cases_exact():
    assert ips([1, 0, 1], [0.5, 0.5, 0.25], [1.0, 1.0, 0.5]).value == pytest.approx(
        (2 * 1.0 + 0 + 4 * 0.5) / 3)
    assert ips([1, 1], [0.1, 0.5], [1.0, 1.0], clip=2.0).value == pytest.approx(2.0)
    assert snips([1, 1, 0], [0.5, 0.25, 0.5], [1.0, 0.0, 1.0]).value == pytest.approx(2 / 6)
    dr = doubly_robust(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 0], [0.5, 0.5], [1.0, 0.0],
                       np.array([[0.8, 0.2], [0.6, 0.4]]))
    assert dr.value == pytest.approx(((0.8 + 2 * (1.0 - 0.8)) + (0.4 + 0.0)) / 2)


def test_estimators_bad_input_name_field():
    with pytest.raises(InvalidInputError) as err:
        ips([1.0], [0.0], [1.0])
    assert err.value.field == "propensity"
    with pytest.raises(InvalidInputError) as err:
        ips([1.0, 1.0], [0.5], [1.0])
    assert err.value.field == "rewards"


def test_evaluate_rows_missing_weighted_objective_skipped():
    log, _ = log_traffic(4, 50)
    outcomes = list(log.outcomes)
    outcomes[0] = {"cost_usd": 0.001}  # no quality: cannot be scored for quality weights
    partial = LoggedDecisions(log.contexts, log.arms, log.propensities, outcomes)
    candidate = trained_candidate(4)
    result = evaluate_log(candidate, partial, PREFS, learn=False)
    assert result["rows"] == 49 and result["skipped"] == 1
