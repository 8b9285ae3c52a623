"""Linear Thompson sampling with one head per objective."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from bandit._policy_kernel import RULE_THOMPSON, thompson_propensities
from bandit.base import Policy, PolicyConfig, check_finite_number
from bandit.errors import InvalidInputError

# An arm this many standard deviations below the chosen arm's lowest quadrature node
# cannot win (Phi(-7) = 1.3e-12): it is left out of the propensity integral.
_PRUNE_SIGMAS = 7.0

__all__ = ["LinearThompson", "LinearThompsonConfig"]


@dataclass(frozen=True)
class LinearThompsonConfig(PolicyConfig):
    """:class:`~bandit.base.PolicyConfig` plus

    ``scale``: v, the posterior is N(theta_k, v^2 sigma_k^2 A_k^-1) for each head
    (default 0.5: the exact posterior, v = 1, over-explored on the llmrouter replay);
    ``propensity_nodes``: quadrature nodes of the propensity integral (default 64:
    largest error 0.001, mean 0.0002 against 512 nodes on a trained 16-arm policy; about
    1 / nodes in the worst case, a step-shaped integrand);
    ``propensity_samples``: when > 0, use a Monte Carlo estimate with this many samples
    instead of quadrature (kept to cross-check the quadrature).
    """

    scale: float = 0.5
    # Issue 13, second round (docs/results.md): exploration="mean" with epsilon 0.01
    # earned less than LinUCB's defaults on MMLU, about as much elsewhere; with the shared
    # component it earned more on llmrouter and GSM8K but stopped routing by topic once
    # one model had most of the pulls (tests/cli/test_replay.py). So no new defaults.
    propensity_nodes: int = 64
    propensity_samples: int = 0

    def validated(self) -> LinearThompsonConfig:
        super().validated()
        check_finite_number("scale", self.scale, low=0.0)
        if not isinstance(self.propensity_nodes, int) or self.propensity_nodes < 8:
            raise InvalidInputError("propensity_nodes", "must be an integer >= 8",
                                    self.propensity_nodes)
        if not isinstance(self.propensity_samples, int) or self.propensity_samples < 0:
            raise InvalidInputError("propensity_samples", "must be an integer >= 0",
                                    self.propensity_samples)
        return self


class LinearThompson(Policy):
    """Thompson sampling on the tenant's utility.

    For one context the sampled utility of an arm, sum_k w_k theta~_k . x with
    theta~_k ~ N(theta_k, v^2 sigma_k^2 A_k^-1) drawn independently per head, is exactly
    N(u(x), v^2 s(x)^2). Sampling that scalar is the same draw as sampling theta and
    taking the dot product, at O(d^2) per arm with no Cholesky factor to maintain.

    Propensity: P(arm j has the largest sample) = E_{u ~ N(u_j, s_j)} prod_{i != j}
    Phi((u - u_i) / s_i), a one-dimensional integral evaluated by the midpoint rule on
    ``propensity_nodes`` quantiles of N(u_j, s_j) (deterministic, unlike Monte Carlo).

    Examples
    --------
    >>> from bandit import LinearThompson
    >>> policy = LinearThompson(dim=2, seed=1)
    >>> policy.add_arm("a"); policy.add_arm("b")
    >>> decision = policy.decide([0.0, 1.0])
    >>> 0.0 < decision.propensity <= 1.0
    True
    """

    name = "thompson"
    Config = LinearThompsonConfig

    def __init__(self, dim: int, scale: float = 0.5, **params: object) -> None:
        super().__init__(dim, scale=scale, **params)
        nodes = self.config.propensity_nodes
        self._quantiles = ndtri((np.arange(nodes) + 0.5) / nodes)
        # Monte Carlo propensities draw from their own stream: estimating a propensity
        # must not shift the policy's choices (same seed -> same decisions either way).
        seed = self.config.seed
        self._mc_rng = np.random.default_rng(None if seed is None else [seed, 1])

    def _fused_rule(self) -> tuple[int, float, np.ndarray, float] | None:
        cls = type(self)
        if (self.config.propensity_samples == 0 and cls._score is LinearThompson._score
                and cls._main_propensity is LinearThompson._main_propensity):
            return RULE_THOMPSON, float(self.config.scale), self._quantiles, _PRUNE_SIGMAS
        return None

    def _score(self, utility: np.ndarray, std: np.ndarray,
               ceiling: np.ndarray) -> np.ndarray:
        # The ceiling is not applied to samples: a clipped normal has an atom at the
        # ceiling, and the propensity integral below assumes continuous draws.
        noise = self._rng.standard_normal(utility.shape)
        return utility + self.config.scale * std * noise

    def _main_propensity(self, utility: np.ndarray, std: np.ndarray,
                         choices: np.ndarray, ceiling: np.ndarray,
                         scores: np.ndarray | None = None) -> np.ndarray:
        # ``scores`` (one draw of the samples) do not give the probability: unused.
        s = self.config.scale * std
        n, k = utility.shape
        rows = np.arange(n)
        if self.config.propensity_samples > 0:
            m = self.config.propensity_samples
            noise = self._mc_rng.standard_normal((n, m, k))
            draws = utility[:, None, :] + s[:, None, :] * noise
            return (np.argmax(draws, axis=2) == choices[:, None]).mean(axis=1)
        if self._stats.compiled:
            # One compiled loop over rows, nodes and competitors (bandit/_policy_kernel.py):
            # no (n, nodes, m) temporaries. The numpy code below is its reference.
            return thompson_propensities(utility, s, choices, self._quantiles,
                                         _PRUNE_SIGMAS)
        # u: (n, nodes) points of the chosen arm's sampled utility. An arm out of the
        # main branch (utility -inf: cold, quality unknown) has main propensity 0.
        mu_j = utility[rows, choices]
        reachable = np.isfinite(mu_j)
        mu_j = np.where(reachable, mu_j, 0.0)
        s_j = s[rows, choices]
        u = mu_j[:, None] + s_j[:, None] * self._quantiles[None, :]
        # Only competitive arms matter: one whose sample stays 7 standard deviations
        # below the chosen arm's lowest node has Phi = 1 - 1e-12 at every node. Keep,
        # per row, the m arms with the highest such ceiling (m = the batch's largest
        # count of competitors), so the (n, nodes, m) work shrinks with the field.
        ceiling = utility + _PRUNE_SIGMAS * s
        ceiling[rows, choices] = -np.inf  # the chosen arm's own factor is 1
        competes = ceiling >= u[:, :1]
        m = int(competes.sum(axis=1).max()) if n else 0
        if m == 0:
            return np.where(reachable, 1.0, 0.0)
        cols = np.argpartition(-ceiling, m - 1, axis=1)[:, :m] if m < k else \
            np.broadcast_to(np.arange(k), (n, k))
        mu_c = np.take_along_axis(utility, cols, axis=1)  # (n, m)
        s_c = np.take_along_axis(s, cols, axis=1)
        own = cols == choices[:, None]
        diff = u[:, :, None] - mu_c[:, None, :]  # (n, nodes, m)
        if np.all(s_c > 0):
            diff /= s_c[:, None, :]
            cdf = ndtr(diff, out=diff)
        else:
            # Arms with no spread (cold arms scored on their prior) are a step function.
            with np.errstate(divide="ignore", invalid="ignore"):
                z = diff / s_c[:, None, :]
            cdf = np.where(s_c[:, None, :] > 0, ndtr(z), (diff > 0) + 0.5 * (diff == 0))
        cdf[np.broadcast_to(own[:, None, :], cdf.shape)] = 1.0
        return np.where(reachable, np.prod(cdf, axis=2).mean(axis=1), 0.0)
