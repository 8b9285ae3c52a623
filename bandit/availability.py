"""Which upstreams are failing: each one's success rate, learned from every call.

A gateway always knows whether a forwarded call succeeded, even when nobody reports its
quality. Quality and availability are kept apart: the quality statistics hold the
ratings of answers (a failure is quality 0 there only when the tenant reports a quality
for every success too; failures heard always and successes only when rated would drag
a rarely failing model's quality towards 0), and this class holds whether answers come.
Without it, a model that never answers would keep its prior quality, or, with failures
reported as 0, a wide posterior on its competitor's side, and still be drawn (Thompson
sampling draws every arm whose posterior is wide): each draw a failed request for a user.

:class:`UpstreamAvailability` keeps, per upstream, the successes s and failures f of
its calls, each weighted by its age (half-life ``half_life_s``: an outage ends, and the
evidence of it fades), and admits an upstream to a decision by Thompson sampling on
whether it is up: it draws p ~ Beta(1/2 + s, f) and admits when p >= 1/2, that is, when
a call is drawn more likely to succeed than to fail. The prior Beta(1/2, 0) is Jeffreys'
half a success and no failure: an upstream with no failure is always admitted (and
admitted again as its failures fade), one with f failures and no success is admitted
with probability 0.29, 0.12, 0.05, 0.02, 0.01 for f = 1..5, and successes bring it back
at once. So a dead upstream is probed ever more rarely while its evidence is fresh
(each probe can let a recovered upstream back in), whatever the learner believes of
the others' quality. When no candidate is admitted all are: the estimate never
refuses a request itself.

What LiteLLM's router does with a failing deployment (``litellm.router_utils
.cooldown_handlers``): it cools it down (out of every pick for ``cooldown_time``, 5 s)
when over half of its calls in the current minute failed (with at least 5 calls), on a
429, or on an error a retry cannot fix (401, 404); never a group's only deployment.
Here the same evidence (the share of failed calls, recent calls counting most) decides
in proportion to how sure it is, from the first failure on, instead of at a threshold.

An admission depends on past outcomes only, never on the request being decided: the
admitted set is part of the decision's context, and the propensity the policy logs for
its choice among them stays right for off-policy evaluation.

>>> a = UpstreamAvailability(seed=0)
>>> a.admitted(["up", "down"])
['up', 'down']
>>> for _ in range(12):
...     a.record("down", failed=True)
>>> a.record("up", failed=False)
>>> a.admitted(["up", "down"])
['up']
>>> round(a.success_rate("down"), 3), round(a.success_rate("up"), 3)
(0.04, 1.0)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["UpstreamAvailability", "HALF_LIFE_S"]

#: Evidence this old counts half: LiteLLM judges a deployment over the current minute.
HALF_LIFE_S = 60.0
#: The prior's successes (Jeffreys' 1/2); its failures are 0.
_PRIOR_S = 0.5


class UpstreamAvailability:
    """Per-upstream success / failure evidence and Thompson admission (module docstring).

    Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(self, half_life_s: float = HALF_LIFE_S, *, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not half_life_s > 0:
            raise ValueError("half_life_s must be > 0")
        self._half_life_s = half_life_s
        self._clock = clock
        self._rng = random.Random(seed)  # noqa: S311 - sampling, not secrets
        self._lock = threading.Lock()
        # upstream -> [successes, failures, time of the last update]
        self._evidence: dict[str, list[float]] = {}
        # Upstreams with failures not yet faded: the only ones a draw can leave out.
        self._failing: set[str] = set()

    def _aged(self, key: str, now: float) -> list[float] | None:
        e = self._evidence.get(key)
        if e is not None and now > e[2]:
            factor = 0.5 ** ((now - e[2]) / self._half_life_s)
            e[0] *= factor
            e[1] *= factor
            e[2] = now
        return e

    def record(self, key: str, *, failed: bool) -> None:
        """One call to ``key``'s upstream ended: failed, or answered."""
        now = self._clock()
        with self._lock:
            e = self._aged(key, now)
            if e is None:
                e = self._evidence[key] = [0.0, 0.0, now]
            if failed:
                e[1] += 1.0
                self._failing.add(key)
            else:
                e[0] += 1.0

    def success_rate(self, key: str) -> float:
        """The posterior mean chance that a call to ``key`` succeeds."""
        with self._lock:
            e = self._aged(key, self._clock())
        return 1.0 if e is None else (_PRIOR_S + e[0]) / (_PRIOR_S + e[0] + e[1])

    def admitted(self, keys: Sequence[str]) -> list[str]:
        """The ``keys`` drawn up (p ~ Beta(1/2 + s, f) >= 1/2); all of them if none is."""
        if self._failing.isdisjoint(keys):
            return list(keys)  # the usual case: no failure to weigh
        now = self._clock()
        out = []
        with self._lock:
            for key in keys:
                e = self._aged(key, now) if key in self._failing else None
                if e is not None and e[1] < 1e-3:
                    self._failing.discard(key)  # its failures faded to nothing
                    e = None
                if e is None or self._rng.betavariate(_PRIOR_S + e[0], e[1]) >= 0.5:
                    out.append(key)
        return out or list(keys)
