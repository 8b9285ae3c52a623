"""LinUCB with one head per objective and the tenant's preferences combining them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bandit._policy_kernel import RULE_UCB
from bandit.base import Policy, PolicyConfig, check_finite_number

__all__ = ["LinUCB", "LinUCBConfig"]

_NO_NODES = np.zeros(0)


@dataclass(frozen=True)
class LinUCBConfig(PolicyConfig):
    """:class:`~bandit.base.PolicyConfig` plus ``alpha``, the width of the bonus in
    standard deviations of the predicted utility.

    The default 0.3 comes from a sweep on the llmrouter replay (0.1 to 1.0 were within
    seed noise of each other below 0.5; 1.0 explored visibly too much). With the shared
    component (``shared_ridge=1``) and the bonus on the arms' mean uncertainty
    (``exploration="mean"``), LinUCB earned more on llmrouter (routing value -0.03
    against -0.26 at w=0, 5 shuffles, docs/results.md), but those are not its defaults:
    its argmax then settles on one model, and a logger that picks one model with
    probability 1 - epsilon leaves off-policy evaluation of other policies a few
    importance weights of K / epsilon (tests/service/test_evaluate.py: IPS 1.35 for a
    policy whose value is in [0, 1]). LinearThompson with them stays random where
    models cannot be told apart, but it lost its topic routing on a two-topic replay
    (docs/policies.md).
    """

    alpha: float = 0.3
    epsilon: float = 0.01

    def validated(self) -> LinUCBConfig:
        super().validated()
        check_finite_number("alpha", self.alpha, low=0.0)
        return self


class LinUCB(Policy):
    """Upper confidence bound on the tenant's utility.

    score(arm) = u(x) + alpha * s(x), where u(x) = sum_k w_k theta_k . x is the predicted
    utility and s(x)^2 = sum_k w_k^2 sigma_k^2 x^T A_k^-1 x its variance, with sigma_k the
    residual noise learned for head k. Scaling by each head's own noise (instead of the
    brief's ``||w||``) keeps the bonus in utility units whatever the units of w.

    The argmax is deterministic; ``epsilon`` (default 0.01) mixes in uniform choices so
    that every logged propensity is at least epsilon / K.

    Examples
    --------
    >>> import numpy as np
    >>> from bandit import LinUCB, Preferences
    >>> policy = LinUCB(dim=2, seed=0, epsilon=0.0)
    >>> policy.add_arm("small"); policy.add_arm("large")
    >>> for _ in range(30):
    ...     policy.update("small", [1.0, 0.0], {"quality": 0.6, "cost_usd": 0.001})
    ...     policy.update("large", [1.0, 0.0], {"quality": 0.9, "cost_usd": 0.02})
    >>> policy.decide([1.0, 0.0], Preferences(quality=1.0, cost=0.0)).arm
    'large'
    >>> policy.decide([1.0, 0.0], Preferences(quality=1.0, cost=100.0)).arm
    'small'
    """

    name = "linucb"
    Config = LinUCBConfig

    def __init__(self, dim: int, alpha: float = 0.3, **params: object) -> None:
        super().__init__(dim, alpha=alpha, **params)

    def _fused_rule(self) -> tuple[int, float, np.ndarray, float] | None:
        cls = type(self)
        if cls._score is LinUCB._score and cls._main_propensity is LinUCB._main_propensity:
            return RULE_UCB, float(self.config.alpha), _NO_NODES, 0.0
        return None

    def _score(self, utility: np.ndarray, std: np.ndarray,
               ceiling: np.ndarray) -> np.ndarray:
        # The bound never pulls a score below the mean (a linear mean can exceed 1).
        return np.minimum(utility + self.config.alpha * std, np.maximum(ceiling, utility))

    def _main_propensity(self, utility: np.ndarray, std: np.ndarray,
                         choices: np.ndarray, ceiling: np.ndarray,
                         scores: np.ndarray | None = None) -> np.ndarray:
        if scores is None:  # deterministic: the same inputs give the same scores
            scores = self._score(utility, std, ceiling)
        return (np.argmax(scores, axis=1) == choices).astype(np.float64)
