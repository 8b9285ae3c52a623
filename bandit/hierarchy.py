"""A prior across arms learned from their features: a model added mid-stream starts from
what the others teach (issue 13, must-have 3).

Each arm's mean quality m_a is its features' prediction plus its own deviation,

    m_a = z_a . g + e_a,   z_a = (1, log cost_a - mean log cost),
    g ~ N((0.5, 0), diag(intercept_sd^2, slope_sd^2)),   e_a ~ N(0, tau^2),

so m ~ N(Z g0, tau^2 I + Z V0 Z^T) over the arms jointly: a Gaussian process over arms
with a linear kernel on their log price plus a nugget. The slope of quality on price is
learned from every arm's feedback, not assumed: where price says nothing (slope ~ 0),
the prior is the pooled mean with the spread tau of the arms around it. tau has a flat
prior on a grid and its posterior is exact on that grid; given tau the posterior of m
is Gaussian (observations: each arm's mean quality, noise ``noise`` / count). So the
prior's own uncertainty (g's and tau's) is part of every prediction.

:class:`ArmLevels` is pure arithmetic on per-arm sums (no policy state): a policy with
``PolicyConfig.arm_prior = "hierarchy"`` calls :func:`learned_prior` when an arm is
added without a declared quality (:meth:`bandit.base.Policy.add_arm`), and the benchmark
learner ``hier-ts`` (``benchmarks/value_learners.py``) samples it jointly for a
context-free Thompson sampler.
"""

from __future__ import annotations

import numpy as np

from bandit.base import ArmPrior, check_finite_number
from bandit.errors import InvalidInputError

__all__ = ["ARM_PRIORS", "TAUS", "ArmLevels", "learned_prior"]

#: ``PolicyConfig.arm_prior`` values: the declared prior alone, or the learned one.
ARM_PRIORS = ("declared", "hierarchy")
#: Grid of tau, the arms' spread around the price line (quality units), flat prior.
TAUS = np.array([0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5])


class ArmLevels:
    """The joint posterior of the arms' mean quality under the hierarchical prior.

    Parameters
    ----------
    slope_sd
        Prior sd of the quality change per unit of log price (natural log): 0.1 means a
        10x price is a priori within about +-0.23 of quality. Chosen on LLMRouter only
        (0.05 / 0.1 / 0.2 within noise there, ``/work/scratch-prior``).
    intercept_sd
        Prior sd of the mean quality at the mean log price (around 0.5).
    noise
        Variance of one quality observation (0.25: the largest a score in [0, 1] has).
    """

    def __init__(self, slope_sd: float = 0.1, intercept_sd: float = 0.5,
                 noise: float = 0.25, taus: np.ndarray = TAUS) -> None:
        self.slope_sd = check_finite_number("slope_sd", slope_sd, low=0.0)
        self.intercept_sd = check_finite_number("intercept_sd", intercept_sd, low=1e-6)
        self.noise = check_finite_number("noise", noise, low=1e-9)
        self.taus = np.asarray(taus, dtype=np.float64)

    # ------------------------------------------------------------ features
    @staticmethod
    def features(cost_usd: np.ndarray) -> np.ndarray:
        """(K, 2): 1 and the centred log cost (arms without a price, NaN, sit at the
        centre: their price says nothing)."""
        cost = np.asarray(cost_usd, dtype=np.float64)
        if cost.ndim != 1:
            raise InvalidInputError("cost_usd", "must be a list of numbers, one per arm",
                                    cost.shape)
        known = np.isfinite(cost) & (cost > 0)
        if np.any(np.isfinite(cost) & (cost < 0)):
            raise InvalidInputError("cost_usd", "must be >= 0 or NaN (unknown)", cost.tolist())
        logc = np.where(known, np.log(np.where(known, cost, 1.0)), np.nan)
        centre = float(np.nanmean(logc)) if known.any() else 0.0
        return np.column_stack([np.ones(cost.size), np.where(known, logc - centre, 0.0)])

    def _prior(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prior mean (K,) and covariance per tau (G, K, K)."""
        v0 = np.diag([self.intercept_sd ** 2, self.slope_sd ** 2])
        k = z.shape[0]
        return z @ np.array([0.5, 0.0]), self.taus[:, None, None] ** 2 * np.eye(k) + z @ v0 @ z.T

    def posterior(self, cost_usd: np.ndarray, sums: np.ndarray, counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tau's posterior weights (G,), and given each tau the mean (G, K) and
        covariance (G, K, K) of the arms' mean quality. ``sums`` / ``counts``: each
        arm's sum of quality observations and their (possibly decayed) count."""
        sums = np.asarray(sums, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.float64)
        z = self.features(cost_usd)
        if sums.shape != (z.shape[0],) or counts.shape != sums.shape:
            raise InvalidInputError("sums", "sums, counts and cost_usd need one entry per arm",
                                    (sums.shape, counts.shape, z.shape[0]))
        if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(counts))
                and np.all(counts >= 0)):
            raise InvalidInputError("counts", "sums must be finite and counts finite >= 0",
                                    counts.tolist())
        mu0, k0 = self._prior(z)
        k0inv = np.linalg.inv(k0)
        cov = np.linalg.inv(k0inv + np.diag(counts / self.noise))
        mean = np.einsum("gij,gj->gi", cov, k0inv @ mu0 + sums / self.noise)
        seen = counts > 0
        if not seen.any():
            return np.full(self.taus.size, 1.0 / self.taus.size), mean, cov
        # Marginal likelihood of the observed arms' means given tau.
        d = sums[seen] / counts[seen] - mu0[seen]
        s = k0[:, seen][:, :, seen] + np.diag(self.noise / counts[seen])
        _, logdet = np.linalg.slogdet(s)
        lp = -0.5 * (logdet + np.einsum("i,gij,j->g", d, np.linalg.inv(s), d))
        w = np.exp(lp - lp.max())
        return w / w.sum(), mean, cov

    def predict(self, cost_usd: np.ndarray, sums: np.ndarray, counts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Each arm's posterior mean quality (K,) and variance (K,), tau integrated out."""
        w, mean, cov = self.posterior(cost_usd, sums, counts)
        m = w @ mean
        var = w @ (np.diagonal(cov, axis1=1, axis2=2) + mean ** 2) - m ** 2
        return m, np.maximum(var, 0.0)

    def sample(self, rng: np.random.Generator, cost_usd: np.ndarray, sums: np.ndarray,
               counts: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """One joint draw of every arm's mean quality: tau from its posterior, then the
        arms together (their errors share g's uncertainty)."""
        w, mean, cov = self.posterior(cost_usd, sums, counts)
        g = int(rng.choice(w.size, p=w))
        chol = np.linalg.cholesky(cov[g])
        return mean[g] + scale * chol @ rng.standard_normal(mean.shape[1])


def learned_prior(levels: ArmLevels, cost_usd: np.ndarray, sums: np.ndarray,
                  counts: np.ndarray, new_cost_usd: float | None, ridge: float = 1.0,
                  ) -> ArmPrior:
    """The prior of an arm added now with price ``new_cost_usd`` (None: unknown), given
    the existing arms' prices and quality sums: its quality is the hierarchy's
    prediction and its strength the observations that prediction is worth
    (noise / predictive variance, in units of the policy's ``ridge``)."""
    if new_cost_usd is not None:
        check_finite_number("prior.cost_usd", new_cost_usd, low=0.0)
    cost = np.r_[np.asarray(cost_usd, dtype=np.float64),
                 np.nan if new_cost_usd is None else new_cost_usd]
    m, var = levels.predict(cost, np.r_[sums, 0.0], np.r_[counts, 0.0])
    strength = levels.noise / max(float(var[-1]), 1e-12) / ridge
    return ArmPrior(quality=float(np.clip(m[-1], 0.0, 1.0)), cost_usd=new_cost_usd,
                    strength=float(np.clip(strength, 1e-6, 1e6)))
