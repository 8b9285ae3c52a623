"""The tag block's prior strength learned from the data (empirical Bayes; issue 13).

A fixed tag ridge serves one kind of tags only: ridge 1 earned the most on LLMRouter
(3 task clusters of ~2,000 rows with real differences between the models), 10 on MMLU
(57 subjects of ~50 rows, GPT-4 better on nearly all): docs/results.md, "With request
tags". The ridge is a prior: each tag coefficient ~ N(0, tau^2) with the noise's
variance s^2, ridge = s^2 / (lambda tau^2). Here tau^2 / s^2, how much quality differs
between tag values relative to the noise, is estimated from the data by maximizing the
evidence (type-II likelihood) of every model's outcomes at once: one ratio shared by
the models, each with its own noise s_k^2 (profiled out), so every model's feedback tells
how much the tags matter.

Per model, the outcomes centred on the model's mean (its intercept is free) against the
tag coordinates centred likewise: with C = X^T X = U diag(d) U^T and z = U^T X^T y (both
read off the model's quality sums, :class:`~bandit.stats.ArmStatistics`), y ~ N(0,
s^2 (I + kappa X X^T)), kappa = tau^2 / s^2, has (Woodbury, the determinant lemma)

    log p(y | kappa, s^2) = -m/2 log(2 pi s^2) - 1/2 sum_j log(1 + kappa d_j)
                            - (y^T y - sum_j kappa z_j^2 / (1 + kappa d_j)) / (2 s^2)

with m = n - 1 (the mean's degree of freedom spent). s^2 at its maximum leaves
-m/2 log Q_k(kappa) - 1/2 sum_j log(1 + kappa d_j) per model; the shared kappa
maximizes their sum over a grid (:data:`RIDGES`). Everything is a sum the statistics
already keep, so the estimate forgets and merges with them (a merge estimates it again
on the merged sums). The ridge *in use* is not a function of the current sums alone:
the policy estimates again only after 10% more quality weight and switches only when
the estimate is 2x or more from the ridge in use (hysteresis), so it depends on the
history that led to the sums; it is stored with the state (``to_bytes``) and restored
as it was. The same events in the same order give the same ridge: decisions stay
reproducible per seed.

Many small groups whose quality differences are mostly noise (MMLU's subjects) give a
small kappa (a strong ridge: the block moves a prediction, and widens the exploration
of a never-seen tag value, little); a few large groups with real differences
(LLMRouter's clusters) a large one (a weak ridge).
"""

from __future__ import annotations

import numpy as np

from bandit.stats import ArmStatistics

__all__ = ["RIDGES", "MIN_WEIGHT", "tag_ridge_evidence", "learned_tag_ridge"]

#: Candidate tag ridges (relative to the intercept's, as ``PolicyConfig.tag_ridge``):
#: 8 per decade from 0.01 (a tag worth 100 observations of the intercept) to 10^4 (the
#: tags all but off).
RIDGES = np.logspace(-2.0, 4.0, 49)
#: The models' total quality weight before which the configured ridge is kept: the
#: evidence of a few dozen outcomes spread over 16 coordinates says little.
MIN_WEIGHT = 50.0


def tag_ridge_evidence(stats: ArmStatistics, tag_dims: int, lam: float,
                       ridges: np.ndarray = RIDGES) -> np.ndarray | None:
    """Log evidence (G,) of every model's quality outcomes at each candidate tag ridge
    (up to a constant), or None while no model has tagged outcomes to tell them apart.

    ``lam`` is the intercept's ridge (``PolicyConfig.ridge``): a tag coefficient's prior
    variance is s^2 / (``lam`` x ridge).
    """
    d = stats.n_features
    tags = np.arange(d - 1 - tag_dims, d - 1)
    group = stats.group[:, 0]
    kappa = 1.0 / (lam * np.asarray(ridges, dtype=np.float64))  # (G,)
    total = np.zeros(kappa.shape)
    informed = False
    for k in range(len(stats)):
        a = stats.s_data[k] if group[k] else stats.a_data[k, 0]
        n = float(a[-1, -1])  # the bias column: the weight, sum x, sum x x^T
        if n <= 2.0:
            continue
        b, sx = stats.b_data[k, 0], a[tags, -1]
        cov = a[np.ix_(tags, tags)] - np.outer(sx, sx) / n
        cross = b[tags] - sx * (b[-1] / n)
        yy = float(stats.srr[k, 0] - b[-1] ** 2 / n)
        if yy <= 0.0:
            continue
        ev, u = np.linalg.eigh(cov)
        ev = np.maximum(ev, 0.0)
        if ev.max() <= 1e-9 * n:
            continue  # no tag varies within this model's outcomes
        informed = True
        z2 = (u.T @ cross) ** 2
        scaled = kappa[:, None] * ev  # (G, T)
        q = yy - (kappa[:, None] * z2 / (1.0 + scaled)).sum(axis=1)
        q = np.maximum(q, 1e-12 * yy)
        total += -0.5 * (n - 1.0) * np.log(q) - 0.5 * np.log1p(scaled).sum(axis=1)
    return total if informed else None


def learned_tag_ridge(stats: ArmStatistics, tag_dims: int, lam: float) -> float | None:
    """The candidate ridge of highest evidence (:func:`tag_ridge_evidence`), or None
    while the models' quality weight is below :data:`MIN_WEIGHT` or no tag varies.

    >>> stats = ArmStatistics(3, tag_dims=2)
    >>> learned_tag_ridge(stats, 2, 1.0) is None  # no data: keep the configured ridge
    True
    """
    if tag_dims <= 0 or float(stats.weight[:, 0].sum()) < MIN_WEIGHT:
        return None
    evidence = tag_ridge_evidence(stats, tag_dims, lam)
    if evidence is None:
        return None
    return float(RIDGES[int(np.argmax(evidence))])
