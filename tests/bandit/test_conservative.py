"""ConservativeGuard: the bound holds along a stream, exploration still pays, state
round-trips, bad settings are refused naming the setting."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinUCB, Preferences, UnknownArmError
from bandit.conservative import ConservativeGuard, GuardConfig, GuardRecord, GuardState

ARMS = ("base", "better", "worse")


def _stream(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts and each arm's realized quality: 'better' wins on half of the contexts
    by a wide margin and ties elsewhere; 'worse' is always worse; qualities are noisy."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    x = np.stack([kind, 1 - kind], axis=1).astype(float)
    mean = np.stack([np.full(n, 0.6), np.where(kind == 1, 0.9, 0.6), np.full(n, 0.2)],
                    axis=1)
    quality = np.clip(mean + rng.normal(0, 0.15, mean.shape), 0, 1)
    return x, quality


def _run(guarded: bool, seed: int, n: int = 1500, max_loss: float = 0.02,
         epsilon: float = 0.01) -> dict[str, np.ndarray | GuardState]:
    x, quality = _stream(n, seed)
    # An explicit bonus: the premise (exploring without the guard breaks the bound)
    # must not hang on the default policy settings.
    policy = LinUCB(2, seed=seed, epsilon=epsilon, alpha=1.0)
    for arm in ARMS:
        policy.add_arm(arm)
    guard = ConservativeGuard(GuardConfig(baseline="base", max_loss=max_loss))
    state = GuardState()
    got = np.empty(n)
    for t in range(n):
        if guarded:
            choice = guard.decide(policy, x[t], state)
            arm = choice.arm
        else:
            arm = policy.decide(x[t]).arm
        j = ARMS.index(arm)
        got[t] = quality[t, j]
        policy.update(arm, x[t], {"quality": got[t]})
        if guarded:
            guard.observe(state, choice.record, Preferences().reward(quality=got[t]))
    base = quality[:, 0]
    gap = np.cumsum(got - base)
    limit = -max_loss * np.maximum(np.cumsum(base), 0)
    return {"gap": gap, "limit": limit, "state": state}


# Seeds on which the same policy without the guard falls below the bound somewhere.
@pytest.mark.parametrize("seed", [2, 3, 5])
def test_guard_keeps_cumulative_reward_within_bound_everywhere(seed: int) -> None:
    guarded = _run(True, seed)
    assert (guarded["gap"] - guarded["limit"]).min() >= 0.0
    # Not by never exploring: by the end the router is well ahead of the baseline.
    assert guarded["gap"][-1] > 50.0
    unguarded = _run(False, seed)  # the same policy without the guard breaks the bound
    assert (unguarded["gap"] - unguarded["limit"]).min() < 0.0


def test_guard_with_zero_bound_never_risks_anything() -> None:
    # With no room at all the lower bound of any exploration is below the baseline's:
    # every round plays the baseline (the cumulative gap is exactly 0).
    result = _run(True, 2, max_loss=0.0)
    assert np.all(result["gap"] == 0.0)
    state = result["state"]
    assert isinstance(state, GuardState)
    assert state.rounds == 1500 and state.plays == 0 and state.margin == 0.0


def test_guard_override_propensity_counts_refused_arms() -> None:
    guard = ConservativeGuard(GuardConfig(baseline="base", max_loss=0.02))
    utility = {"base": 0.5, "better": 0.9, "worse": 0.1}
    std = {"base": 0.1, "better": 0.3, "worse": 0.3}
    probs = {"base": 0.2, "better": 0.7, "worse": 0.1}
    state = GuardState()  # nothing earned: every non-baseline arm is refused
    choice = guard.choose(state, "better", 0.7, utility, std, probs)
    assert choice.arm == "base" and choice.overridden
    assert choice.propensity == pytest.approx(1.0)
    # Far ahead of the baseline: 'better' allowed, 'worse' (lower bound far below) not.
    rich = GuardState(rounds=1000, baseline_total=500.0, margin=100.0)
    choice = guard.choose(rich, "worse", 0.1, utility, std | {"worse": 60.0}, probs)
    assert choice.arm == "base" and choice.propensity == pytest.approx(0.3)
    choice = guard.choose(rich, "better", 0.7, utility, std, probs)
    assert choice.arm == "better" and not choice.overridden
    assert choice.propensity == pytest.approx(0.7)


def test_guard_observe_again_replaces_the_decisions_part() -> None:
    guard = ConservativeGuard(GuardConfig(baseline="base"))
    record = GuardRecord("base", False, 0.5, 0.05, 0.8, 0.7, 0.3)
    once, twice = GuardState(), GuardState()
    for state in (once, twice):
        guard.count(state, record)
    guard.observe(once, record, 0.9)
    guard.observe(twice, record, 0.1)
    guard.observe(twice, record, 0.9, previous=0.1)
    assert twice.to_dict() == pytest.approx(once.to_dict())
    assert once.margin == pytest.approx(0.9 - 0.5)
    assert once.value == pytest.approx(0.9 - 0.5) and once.value_rounds == 1


def test_guard_value_is_zero_where_the_baseline_is_played_surely() -> None:
    guard = ConservativeGuard(GuardConfig(baseline="base"))
    state = GuardState()
    record = GuardRecord("base", True, 0.5, 0.05, 0.5, 0.5, 1.0)
    guard.count(state, record)
    guard.observe(state, record, 0.8)
    assert state.value == 0.0 and state.value_rounds == 1
    # Realized baseline reward replaces the predicted one in B.
    assert state.baseline_total == pytest.approx(0.8)
    # With propensity 1/2 the doubly robust term corrects the prediction.
    half = GuardState()
    guard.observe(half, record._replace(propensity=0.5), 0.8)
    assert half.value == pytest.approx(0.8 - (0.5 + 0.3 / 0.5))


def test_guard_state_round_trip_and_add() -> None:
    state = GuardState(rounds=3, baseline_total=1.5, margin=-0.2, uncertainty=0.1, plays=1,
                       residuals=2, residual_sq=0.04, value=0.3, value_rounds=2)
    restored = GuardState.from_dict(state.to_dict())
    assert restored == state and isinstance(restored.rounds, int)
    total = GuardState.from_dict(state.to_dict()).add(state)
    assert total.rounds == 6 and total.margin == pytest.approx(-0.4)
    with pytest.raises(InvalidInputError) as err:
        GuardState.from_dict({"rounds": 1, "budget": 2})
    assert err.value.field == "budget"
    record = GuardRecord("base", False, 0.5, 0.05, 0.8, 0.7, 0.3)
    assert GuardRecord.from_list(record.to_list()) == record


@pytest.mark.parametrize(("config", "field"), [
    (GuardConfig(baseline="base", max_loss=1.5), "max_exploration_loss"),
    (GuardConfig(baseline="base", max_loss=-0.1), "max_exploration_loss"),
    (GuardConfig(baseline="base", max_loss=float("nan")), "max_exploration_loss"),
    (GuardConfig(baseline=""), "baseline_model"),
    (GuardConfig(baseline="base", z=-1.0), "z"),
])
def test_guard_config_refuses_bad_settings(config: GuardConfig, field: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        ConservativeGuard(config)
    assert err.value.field == field
    assert "must be" in err.value.allowed


def test_guard_refuses_baseline_outside_candidates_and_counts_nothing() -> None:
    guard = ConservativeGuard(GuardConfig(baseline="gone"))
    state = GuardState()
    with pytest.raises(UnknownArmError) as err:
        guard.choose(state, "a", 1.0, {"a": 0.5}, {"a": 0.1})
    assert err.value.field == "baseline_model" and "a" in err.value.allowed
    assert state == GuardState()
