"""Per-arm, per-objective ridge-regression statistics, stacked for speed.

Every arm learns one linear head per objective (quality, cost, latency). Each head has
its own design matrix ``A = lambda*I + sum x x^T`` over the observations that reported
that objective: feedback often arrives in pieces (cost and latency when the response
ends, a thumbs-up minutes later), and a head must not count a context it never saw.
When every event reports every objective the three matrices are equal, as in the design
brief's single shared matrix.

Everything a replica accumulates is a sum (``A_data``, ``b_data``, ``sum r^2``, counts),
so two replicas' statistics add up to those of one replica that saw both streams: the
property the distributed learners rely on.

Numerics: all state is float64. ``A^-1`` and ``theta`` are kept current by the
recursive-least-squares form of Sherman-Morrison (O(d^2) per update, never an inverse on
the hot path) and recomputed exactly from the sums every ``refresh_every`` updates of an
arm, after a merge, a decay step or a restore, so rounding error cannot accumulate.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ArmStatistics"]

_H = 3  # heads: quality, cost (USD), latency (s)

#: Batches of at least this many contexts compute the exploration width in float32.
FLOAT32_WIDTH_BATCH = 128

# Prior noise scale per head, in head units, worth NU0 observations: quality is a score
# in [0, 1] (std at most 0.5); cost and latency default to half the prior mean when the
# prior declares one (see ``_prior_sigma``).
_NU0 = 2.0
_QUALITY_SIGMA0 = 0.5
_COST_SIGMA0 = 1e-3
_LATENCY_SIGMA0 = 1.0


class ArmStatistics:
    """Stacked sufficient statistics of K arms with D = dim + 1 features (bias last).

    Arrays (K arms, H=3 heads, D features):

    ``a_data`` (K,H,D,D), ``b_data`` (K,H,D), ``srr`` (K,H) sum of squared targets,
    ``weight`` (K,H) decayed observation count, ``count`` (K,H) raw count (int),
    ``lam`` (K,H) ridge strength, ``mu0`` (K,H) prior mean (on the bias coefficient),
    ``sigma0`` (K,H) prior noise scale, and the derived ``a_inv`` (K,H,D,D),
    ``theta`` (K,H,D), ``sigma2`` (K,H).
    """

    ARRAYS = ("a_data", "b_data", "srr", "weight", "count", "lam", "mu0", "sigma0",
              "updates", "a_inv", "theta", "sigma2")

    def __init__(self, dim: int, refresh_every: int = 1000) -> None:
        self.dim = dim
        self.n_features = dim + 1
        self.refresh_every = refresh_every
        d = self.n_features
        self.a_data = np.zeros((0, _H, d, d))
        self.b_data = np.zeros((0, _H, d))
        self.srr = np.zeros((0, _H))
        self.weight = np.zeros((0, _H))
        self.count = np.zeros((0, _H), dtype=np.int64)
        self.lam = np.zeros((0, _H))
        self.mu0 = np.zeros((0, _H))
        self.sigma0 = np.zeros((0, _H))
        self.updates = np.zeros(0, dtype=np.int64)  # updates since the last exact refresh
        self.a_inv = np.zeros((0, _H, d, d))
        self.theta = np.zeros((0, _H, d))
        self.sigma2 = np.zeros((0, _H))

    # ----------------------------------------------------------------- arms
    def __len__(self) -> int:
        return int(self.lam.shape[0])

    def append(self, lam: np.ndarray, mu0: np.ndarray, sigma0: np.ndarray) -> None:
        """Add one arm with per-head ridge strength, prior mean and prior noise."""
        d = self.n_features
        row = {
            "a_data": np.zeros((1, _H, d, d)), "b_data": np.zeros((1, _H, d)),
            "srr": np.zeros((1, _H)), "weight": np.zeros((1, _H)),
            "count": np.zeros((1, _H), dtype=np.int64), "lam": lam[None, :].astype(float),
            "mu0": mu0[None, :].astype(float), "sigma0": sigma0[None, :].astype(float),
            "updates": np.zeros(1, dtype=np.int64), "a_inv": np.zeros((1, _H, d, d)),
            "theta": np.zeros((1, _H, d)), "sigma2": np.zeros((1, _H)),
        }
        for name in self.ARRAYS:
            setattr(self, name, np.concatenate([getattr(self, name), row[name]]))
        self.refresh([len(self) - 1])

    def delete(self, index: int) -> None:
        for name in self.ARRAYS:
            setattr(self, name, np.delete(getattr(self, name), index, axis=0))

    def take(self, index: int) -> dict[str, np.ndarray]:
        """Copies of one arm's arrays (for moving an arm between policies)."""
        return {name: getattr(self, name)[index].copy() for name in self.ARRAYS}

    def put(self, row: dict[str, np.ndarray]) -> None:
        for name in self.ARRAYS:
            setattr(self, name, np.concatenate([getattr(self, name), row[name][None]]))

    # ------------------------------------------------------------- derived
    def refresh(self, arms: list[int] | None = None) -> None:
        """Recompute A^-1, theta and sigma^2 exactly from the sums (O(d^3) per head)."""
        idx = range(len(self)) if arms is None else arms
        eye = np.eye(self.n_features)
        for k in idx:
            a = self.a_data[k] + self.lam[k][:, None, None] * eye  # (H,D,D)
            b = self._b_total(k)
            # Cholesky: A is symmetric positive definite by construction (lambda > 0).
            chol = np.linalg.cholesky(a)
            inv_l = np.linalg.inv(chol)  # triangular, D^3/3: off the hot path
            self.a_inv[k] = np.swapaxes(inv_l, -1, -2) @ inv_l
            self.theta[k] = np.einsum("hij,hj->hi", self.a_inv[k], b)
            self.updates[k] = 0
            self._update_sigma2(k)

    def _b_total(self, k: int) -> np.ndarray:
        b = self.b_data[k].copy()
        b[:, -1] += self.lam[k] * self.mu0[k]
        return b

    def _update_sigma2(self, k: int) -> None:
        # Penalized residual sum of squares of the ridge fit, from sums only:
        #   J = sum r^2 + lam*mu0^2 - b.theta   (prior mean sits on the bias coefficient)
        b = self._b_total(k)
        rss = self.srr[k] + self.lam[k] * self.mu0[k] ** 2 - np.einsum("hi,hi->h", b,
                                                                          self.theta[k])
        rss = np.maximum(rss, 0.0)
        self.sigma2[k] = (_NU0 * self.sigma0[k] ** 2 + rss) / (_NU0 + self.weight[k])

    # -------------------------------------------------------------- learning
    def update(self, k: int, x: np.ndarray, y: np.ndarray) -> float | None:
        """Rank-one update of arm k with features x (D,) and targets y (H,), NaN = missing.

        Returns the quality residual before the update (None if quality was missing),
        which the drift detector watches.
        """
        heads = np.flatnonzero(~np.isnan(y))
        residual_quality = None
        if heads.size == 0:
            return None
        yh = y[heads]
        p = self.a_inv[k, heads]  # (h,D,D) copy by fancy indexing
        px = p @ x  # (h,D)
        denom = 1.0 + px @ x  # (h,)
        theta = self.theta[k, heads]
        err = yh - theta @ x  # (h,)
        if heads[0] == 0:
            residual_quality = float(err[0])
        gain = px / denom[:, None]
        self.a_inv[k, heads] = p - gain[:, :, None] * px[:, None, :]
        self.theta[k, heads] = theta + gain * err[:, None]
        self.a_data[k, heads] += np.outer(x, x)
        self.b_data[k, heads] += yh[:, None] * x
        self.srr[k, heads] += yh * yh
        self.weight[k, heads] += 1.0
        self.count[k, heads] += 1
        self.updates[k] += 1
        if self.updates[k] >= self.refresh_every:
            self.refresh([k])
        else:
            self._update_sigma2(k)
        return residual_quality

    def update_many(self, k: int, x: np.ndarray, y: np.ndarray) -> None:
        """Add a batch of observations (n,D) / (n,H) to arm k, then refresh it exactly."""
        observed = ~np.isnan(y)
        for h in range(_H):
            rows = observed[:, h]
            if not rows.any():
                continue
            xh = x[rows]
            yh = y[rows, h]
            self.a_data[k, h] += xh.T @ xh
            self.b_data[k, h] += yh @ xh
            self.srr[k, h] += yh @ yh
            self.weight[k, h] += rows.sum()
            self.count[k, h] += int(rows.sum())
        self.refresh([k])

    def scale(self, factor: float | np.ndarray, arms: list[int] | None = None) -> None:
        """Discount the data of some arms (forgetting); the prior is never discounted."""
        idx = slice(None) if arms is None else arms
        self.a_data[idx] *= factor
        self.b_data[idx] *= factor
        self.srr[idx] *= factor
        self.weight[idx] *= factor
        self.refresh(None if arms is None else list(arms))

    def add(self, k: int, other: ArmStatistics, j: int) -> None:
        """Add the data sums of arm j of ``other`` to arm k of self (merge)."""
        self.a_data[k] += other.a_data[j]
        self.b_data[k] += other.b_data[j]
        self.srr[k] += other.srr[j]
        self.weight[k] += other.weight[j]
        self.count[k] += other.count[j]

    # ------------------------------------------------------------ prediction
    def predict(self, xb: np.ndarray, arms: np.ndarray | None, c: np.ndarray | None,
                w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head means (n,K,H), utility (n,K) and utility std (n,K) for contexts xb (n,D).

        ``arms`` selects the candidate arms (None: all, in order); ``c`` (all arms, H)
        are the per-head variance weights w_h^2 * sigma_h^2; when None the std is not
        computed (zeros). Everything is computed on the full stacked arrays and the
        candidates' columns are selected at the end: indexing ``a_inv`` first would copy
        K*H*D^2 floats per call, more than the arithmetic it saves.
        """
        k, h, d = self.theta.shape
        n = xb.shape[0]
        means = (xb @ self.theta.reshape(k * h, d).T).reshape(n, k, h)
        if arms is not None:
            means = means[:, arms]
        utility = means @ w
        if c is None:
            return means, utility, np.zeros_like(utility)
        if n == 1:
            # One context: per-head quadratic forms, batched matrix-vector products.
            x = xb[0]
            q = (self.a_inv @ x) @ x  # (K,H)
            var = (q * c).sum(axis=1)[None, :]
        else:
            # Many contexts: one combined matrix per arm, then one quadratic form per
            # context and arm, as a single (n, D) x (D, K*D) product.
            m = (c[:, None, :] @ self.a_inv.reshape(k, h, d * d)).reshape(k, d, d)
            m = m.transpose(1, 0, 2).reshape(d, k * d)
            xq = xb
            if n >= FLOAT32_WIDTH_BATCH:
                # The exploration width of a large batch in float32: ~6x faster, and a
                # relative error of ~1e-6 on a standard deviation is far below anything
                # exploration can notice. Statistics, inverses and means stay float64.
                m, xq = m.astype(np.float32), xb.astype(np.float32)
            t = (xq @ m).reshape(n, k, d)
            var = np.einsum("nkd,nd->nk", t, xq).astype(np.float64)
        if arms is not None:
            var = var[:, arms]
        return means, utility, np.sqrt(np.maximum(var, 0.0))

    def prior_sigma(self) -> np.ndarray:
        return np.sqrt(self.sigma2)


def prior_sigma(mu0: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Prior noise scale per head for an arm whose prior mean is ``mu0``."""
    sigma = np.array([_QUALITY_SIGMA0, _COST_SIGMA0, _LATENCY_SIGMA0])
    for h in (1, 2):
        if known[h] and mu0[h] > 0:
            sigma[h] = 0.5 * mu0[h]
    return sigma
