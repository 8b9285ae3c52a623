"""bandit/availability.py: Thompson admission on each upstream's recent success rate."""

from __future__ import annotations

import pytest
from scipy.stats import beta

from bandit.availability import HALF_LIFE_S, UpstreamAvailability

DRAWS = 4000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admitted_share(a: UpstreamAvailability, key: str) -> float:
    return sum(key in a.admitted([key, "other"]) for _ in range(DRAWS)) / DRAWS


def test_upstream_without_failures_is_always_admitted() -> None:
    a = UpstreamAvailability(seed=1)
    a.record("ok", failed=False)
    assert all(a.admitted(["ok", "new"]) == ["ok", "new"] for _ in range(200))


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_admission_is_the_posterior_chance_of_being_up(failures: int) -> None:
    a = UpstreamAvailability(seed=2, clock=Clock())
    for _ in range(failures):
        a.record("down", failed=True)
    # P(p >= 1/2) for p ~ Beta(1/2, f): 0.29, 0.12, 0.05.
    expected = beta(0.5, failures).sf(0.5)
    assert admitted_share(a, "down") == pytest.approx(expected, abs=0.025)
    assert a.success_rate("down") == pytest.approx(0.5 / (0.5 + failures))


def test_successes_outweigh_a_rare_failure() -> None:
    a = UpstreamAvailability(seed=3)
    for _ in range(50):
        a.record("flaky", failed=False)
    a.record("flaky", failed=True)
    assert admitted_share(a, "flaky") > 0.999


def test_failures_fade_with_their_age() -> None:
    clock = Clock()
    a = UpstreamAvailability(seed=4, clock=clock)
    for _ in range(6):
        a.record("down", failed=True)
    assert admitted_share(a, "down") < 0.02
    clock.now += 5 * HALF_LIFE_S  # 6 failures then weigh 6 / 32
    assert admitted_share(a, "down") == pytest.approx(beta(0.5, 6 / 32).sf(0.5), abs=0.025)
    assert a.success_rate("down") == pytest.approx(0.5 / (0.5 + 6 / 32))
    clock.now += 10 * HALF_LIFE_S
    assert admitted_share(a, "down") == 1.0  # faded to nothing


def test_none_admitted_means_all() -> None:
    a = UpstreamAvailability(seed=5)
    for _ in range(40):
        a.record("x", failed=True)
        a.record("y", failed=True)
    assert a.admitted(["x", "y"]) == ["x", "y"]
    assert a.admitted([]) == []


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        UpstreamAvailability(half_life_s=0.0)
