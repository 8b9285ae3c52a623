"""Thompson sampling that admits context only where it has paid (issue 13).

Every arm keeps nested models of its quality over the same sums
(:class:`~bandit.stats.ArmStatistics`' model selection): the arm's mean alone (context
ridge 1e6: a context-free bandit), the mean plus the request tags' block (when the
contexts carry one), and the mean plus tags plus text. Each model is scored by its
prequential (predict-then-update) squared error on the arm's own outcomes, and the arm
predicts, and Thompson samples, with the model that has predicted it best so far. Ties
(an arm with no data) go to the mean alone.

So a fresh policy is context-free Thompson sampling (the exploration floor: what finding
the best model costs), and a richer model takes over an arm only once it has shown,
out of sample, that it predicts that arm's quality better. The exploration width is the
selected model's: an arm on its mean explores like a context-free sampler, not with the
wide width of 64 barely-learned text directions.

Why Thompson and not LinUCB: LinUCB's bonus at alpha 0.3 sometimes settles on a bad model
for the whole stream at cost weight 0 (docs/results.md, "Routing value"), while Thompson
keeps sampling where models cannot be told apart, and its propensities are those of
the posterior draw, not 0 or 1, so the decisions it logs can evaluate other policies
(:mod:`bandit.ope`). No uniform share by default (``epsilon`` 0, as LinearThompson):
on the RouteLLM MMLU replay at cost weight 100, ``epsilon`` 0.01 alone cost 0.15 of the
headroom (one random GPT-4 call in 200 at ~100x Mixtral's price; docs/results.md). Set
``epsilon`` where off-policy evaluation needs a floor (every propensity >= epsilon / K).

Drift (``level_horizon``, opt-in). Each arm's mean is learned from the queries it was
called on. When the stream's difficulty drifts (a log ordered by task), a model last
called on hard queries keeps a low estimate while the model called on easy ones rises,
and Thompson sampling, its width shrunk, never calls the first again: on the LLMRouter
replay in file order at cost weight 0, ``select`` sent the last 20% of the stream to
llama-3.1-8b (its estimate 0.59 against 0.23 for nemotron-51b, 31 calls, all on hard
tasks), a routing value of -0.76 there. With a level the arms learn quality minus a
quality level shared by every arm, which moves by 1 / ``level_horizon`` of each outcome's
residual: a shift common to the arms goes to the level, so an arm not called for a while
is predicted relative to the others (there: -0.29 -> -0.00 for the whole pass, last 20%
-0.76 -> 0.00, horizon 100). Not the default: over shuffles it earned no more (LLMRouter
-0.048 against -0.042; docs/results.md, "A level that follows the stream's difficulty"),
and it has two known weaknesses. An arm with few outcomes learns faster than the level,
so it takes a shift as its own; and a level keeps the arms' order as it was learned, so
a played model that gets worse relative to the others (a new task) is read as a harder
stream, not as a reason to try the others (a generated stream of that kind: the best
model's share of the last 1,000 rows 0.49 with the level, 0.93 without).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bandit.base import check_finite_number
from bandit.thompson import LinearThompson, LinearThompsonConfig

__all__ = ["SelectiveThompson", "SelectiveThompsonConfig", "MEAN_ONLY_RIDGE"]

#: A context ridge this strong leaves a model its intercept alone (the arm's mean).
MEAN_ONLY_RIDGE = 1e6


@dataclass(frozen=True)
class SelectiveThompsonConfig(LinearThompsonConfig):
    """:class:`~bandit.thompson.LinearThompsonConfig` with nested models by default.

    ``context_ridges`` left None becomes (1e6, ``context_ridge``): the arm's mean first
    (ties go to it), then the text at the usual ridge. ``tag_ridges`` left None, when
    the contexts carry a tag block (``tag_dims`` > 0), becomes (1e6, ``tag_ridge``):
    without and with the tags. Every pair of the two is a model; each arm uses the one
    of lowest prequential error. Explicit candidates are kept as given.

    ``level_horizon`` (observations; None: off): a quality level shared by every arm,
    for streams whose difficulty drifts (module docstring, "Drift"). Each arm learns
    its quality minus the level, and the level moves by 1 / ``level_horizon`` of each
    outcome's residual against the arm's prediction (an exponentially weighted mean
    over about that many outcomes of any arm).
    """

    level_horizon: float | None = None

    def validated(self) -> SelectiveThompsonConfig:
        super().validated()
        if self.level_horizon is not None:
            check_finite_number("level_horizon", self.level_horizon, low=1.0)
        return self

    def __post_init__(self) -> None:
        super().__post_init__()
        # Only well-typed settings are filled in: validated() names anything else.
        if self.context_ridges is None and _is_number(self.context_ridge):
            object.__setattr__(self, "context_ridges",
                               (MEAN_ONLY_RIDGE, float(self.context_ridge)))
        if (self.tag_ridges is None and _is_number(self.tag_ridge)
                and isinstance(self.tag_dims, int) and self.tag_dims > 0):
            object.__setattr__(self, "tag_ridges", (MEAN_ONLY_RIDGE, float(self.tag_ridge)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SelectiveThompson(LinearThompson):
    """Thompson sampling on each arm's best-predicting nested model (module docstring).

    Examples
    --------
    >>> from bandit import SelectiveThompson
    >>> policy = SelectiveThompson(dim=2, seed=0)
    >>> policy.config.context_ridges
    (1000000.0, 100.0)
    >>> policy.add_arm("a"); policy.add_arm("b")
    >>> 0.0 < policy.decide([0.0, 1.0]).propensity <= 1.0
    True
    """

    name = "select"
    Config = SelectiveThompsonConfig

    def _watch_drift(self, arm: str, residuals: Sequence[float]) -> None:
        super()._watch_drift(arm, residuals)
        horizon = self.config.level_horizon
        if horizon is not None and len(residuals):
            # n residuals against the same level: n steps of the exponential mean.
            share = 1.0 - (1.0 - 1.0 / horizon) ** len(residuals)
            self._level += share * float(np.mean(residuals))
