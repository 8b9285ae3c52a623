"""Per-arm, per-objective ridge-regression statistics, stacked for speed.

Every arm learns one linear head per objective (quality, cost, latency). Each head has
its own design matrix ``A = lambda*I + sum x x^T`` over the observations that reported
that objective: feedback often arrives in pieces (cost and latency when the response
ends, a thumbs-up minutes later), and a head must not count a context it never saw.

Shared group: heads with the same history (same ridge strength, reported by exactly the
same events) have equal matrices. Each arm keeps one such *group* of heads (at first
every head whose ridge equals the quality head's) whose matrices are stored once, in
``s_data`` / ``s_inv``; heads outside the group keep their own in ``a_data`` /
``a_inv``. An event that reports part of the group splits the unreported heads off
(they keep the state they had, e.g. lambda*I for a head never reported); heads outside
the group are updated on their own. With complete feedback, or objectives that are never
or always reported apart, every update and width of the group costs one matrix instead of
one per head. The results are the same either way (tested).

Everything a replica accumulates is a sum (``A_data``, ``b_data``, ``sum r^2``, counts),
so two replicas' statistics add up to those of one replica that saw both streams: the
property the distributed learners rely on.

Numerics: all state is float64. ``A^-1`` and ``theta`` are kept current by the
recursive-least-squares form of Sherman-Morrison (O(d^2) per update, never an inverse on
the hot path) and recomputed exactly from the sums every ``refresh_every`` updates of an
arm, after a merge, a decay step or a restore, so rounding error cannot accumulate.

Model selection of the quality head (``context_ridges``): beside its own inverse, each
arm keeps, for a few candidate context ridges (a strong one = "intercept only", a plain
multi-armed bandit), the inverse and coefficients of the same data sums under that ridge,
and the prequential (predict-then-update) squared error of each candidate. The quality
head is, for each arm, the candidate with the lowest error so far: context is used only
where it has shown it predicts that arm's quality better than the arm's mean. The
candidates are updated together (one batched Sherman-Morrison step over the grid), and
their errors are sums like the others (replicas merge, forgetting discounts them).
"""

from __future__ import annotations

import operator
import threading

import numpy as np
from scipy.linalg import blas as _blas
from scipy.linalg import lapack as _lapack
from scipy.linalg.blas import dger as _dger

from bandit import _policy_kernel as _kernel

__all__ = ["ArmStatistics", "FLOAT32_WIDTH_BATCH", "FUSED_BATCH", "FLOAT32_INVERSE_DIM",
           "prior_sigma", "sequential_errors"]

_H = 3  # heads: quality, cost (USD), latency (s)
_NONE = np.zeros(0, dtype=np.intp)
#: The head groups the compiled kernels take when every head of every arm is in its arm's
#: group (then they read no head's own inverse): an empty (0, H) mask.
ALL_GROUPED = np.zeros((0, _H), dtype=bool)

#: Batches of at least this many contexts compute the exploration width in float32.
FLOAT32_WIDTH_BATCH = 128
#: Batches up to this many contexts are predicted by one compiled call, arm by arm
#: (bandit/_policy_kernel.py predict_width): up to it, building the combined (K, D, D)
#: matrices of the batch path cost more than the rows' quadratic forms.
FUSED_BATCH = 4
#: From this many features (dim + 1) on, a single context's exploration width reads a
#: float32 copy of the shared inverses (summing in float64): at d=384 the 16 inverses
#: are 19 MB of float64 and the width is bound by memory (630 -> 266 us measured, std
#: relative error 3e-9); at d=64 they fit the cache and float32 gains nothing. The same
#: for the selected quality candidates' inverses and for the own inverses of heads split
#: off their group (outcomes reported in pieces).
FLOAT32_INVERSE_DIM = 257
#: From this many features on, the update kernel defers the shared data matrices'
#: rank-one steps ``s_data[k] += w x x^T``, ``DEFER_ROWS`` per arm, and adds them at
#: once (``_policy_kernel.defer_data``; the same numbers): at d=384 each step read and
#: wrote 1.2 MB (~60 µs of an update bound by memory); at d=64 the matrices fit the
#: cache and the steps cost little.
DEFER_DIM = 257
DEFER_ROWS = 32
_NO_COPY = np.zeros((0, 0, 0), dtype=np.float32)
_NO_OWN_COPY = np.zeros((0, 0, 0, 0), dtype=np.float32)  # of a_inv (K, H, D, D)
# pend_x, pend_w, pend_n of the update kernel that does not defer the data steps
_NO_DEFER = (np.zeros((0, 0, 0)), np.zeros((0, 0)), np.zeros(0, dtype=np.int64))
#: Reading ``s_data`` adds the deferred steps: two readers at once (each only reading,
#: which was safe before the steps were deferred) must not both add them.
_FLUSH_LOCK = threading.Lock()
# sel_inv, sel_theta, sel_err, the selected index, its stale flags, the shared
# candidate's stale flags, the float32 copy, the shared candidate, of the update kernel
# without selection.
_NO_SELECTION = (np.zeros((0, 0, 0, 0)), np.zeros((0, 0, 0)), np.zeros((0, 0)),
                 np.zeros(0, dtype=np.intp), np.zeros(0, dtype=bool),
                 np.zeros(0, dtype=bool), _NO_COPY, -1)

# Prior noise scale per head, in head units, worth NU0 observations: quality is a score
# in [0, 1] (std at most 0.5); cost and latency default to half the prior mean when the
# prior declares one (see ``prior_sigma``).
_NU0 = 2.0
_QUALITY_SIGMA0 = 0.5
_COST_SIGMA0 = 1e-3
_LATENCY_SIGMA0 = 1.0


class ArmStatistics:
    """Stacked sufficient statistics of K arms with D = dim + 1 features (bias last).

    Arrays (K arms, H=3 heads, D features):

    ``group`` (K,H) heads sharing ``s_data`` / ``s_inv`` (K,D,D); the other heads' own
    ``a_data`` / ``a_inv`` (K,H,D,D) (stale for heads in the group: read every head's
    through :meth:`matrices`); ``b_data`` (K,H,D); ``srr`` (K,H) sum of squared targets;
    ``weight`` (K,H) decayed observation count; ``count`` (K,H) raw count (int);
    ``lam`` (K,H) ridge strength; ``mu0`` (K,H) prior mean (on the bias coefficient);
    ``sigma0`` (K,H) prior noise scale; derived ``theta`` (K,H,D) and ``sigma2`` (K,H).
    """

    ARRAYS = ("group", "s_data", "s_inv", "a_data", "a_inv", "b_data", "srr", "weight",
              "count", "lam", "mu0", "sigma0", "updates", "theta", "sigma2", "price_ratio",
              "sel_err", "sel_inv", "sel_theta", "q_inv")
    # what forgetting discounts
    DATA = ("s_data", "a_data", "b_data", "srr", "weight", "price_ratio", "sel_err")
    # What defines the statistics; the rest (inverses, theta, sigma^2) is recomputed.
    SUMS = ("group", "s_data", "a_data", "b_data", "srr", "weight", "count", "lam", "mu0",
            "sigma0", "updates", "price_ratio", "sel_err")

    def __init__(self, dim: int, refresh_every: int = 1000,
                 context_ridge: float = 1.0,
                 context_ridges: tuple[float, ...] | None = None,
                 tag_dims: int = 0, tag_ridge: float = 1.0,
                 tag_ridges: tuple[float, ...] | None = None) -> None:
        self.dim = dim
        self.n_features = dim + 1
        self.refresh_every = refresh_every
        #: One context's prediction and every update through the compiled kernels
        #: (bandit/_policy_kernel.py); False: the numpy reference (the tests compare).
        self.compiled = True
        #: :meth:`update_many` scores the candidates' prequential errors event by event
        #: (:func:`sequential_errors`: the same sums as one :meth:`update` per row, in
        #: any batching); False: every row of a batch against the coefficients before
        #: the batch. The distributed learners set it (streams/stats.py).
        self.exact_prequential = False
        #: Keep the sums only: :meth:`refresh` leaves the derived arrays (inverses,
        #: coefficients, noise) as they are, stale. For statistics that only add and
        #: store sums and never predict (the distributed learners' carriers,
        #: streams/stats.py): the inverses were a fifth of their update's time.
        self.sums_only = False
        #: Data steps the update kernel defers per arm (0: none; see DEFER_DIM).
        self.defer_rows = DEFER_ROWS if self.n_features >= DEFER_DIM else 0
        self._pend: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        d = self.n_features
        text = dim - tag_dims
        # Ridge of the context coefficients relative to the intercept's: above 1 shrinks
        # an arm's context weights toward its mean, so that with little data an arm is
        # predicted by its mean (the best-mean arm wins early) instead of by a noisy fit.
        # The last tag_dims coordinates (the request tags' block) have their own ridge:
        # a tag recurs on many requests, so its coefficient is learned from few of them.
        tags = np.full(tag_dims, float(tag_ridge))
        self.ridge_diag = np.r_[np.full(text, float(context_ridge)), tags, 1.0]
        # Quality-head model selection: one ridge diagonal per candidate (G, D); the
        # candidates differ on the text's coordinates (context_ridges) and, with
        # tag_ridges, on the tag block's (every pair of the two), else it keeps its ridge.
        texts = tuple(context_ridges or ())
        if tag_ridges:
            pairs = [(c, t) for c in (texts or (float(context_ridge),)) for t in tag_ridges]
        else:
            pairs = [(c, float(tag_ridge)) for c in texts]
        grid = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        self.sel_diag = np.concatenate([np.repeat(grid[:, :1], text, axis=1),
                                        np.repeat(grid[:, 1:], tag_dims, axis=1),
                                        np.ones((grid.shape[0], 1))], axis=1)
        g = grid.shape[0]
        self.group = np.zeros((0, _H), dtype=bool)
        self._grouped: tuple[np.ndarray, bool] | None = None  # see _all_grouped
        # The float32 copies of s_inv, q_inv and a_inv (see FLOAT32_INVERSE_DIM), by
        # name: (the array it copies, the copy, the arms (K,), or for a_inv the arms'
        # heads (K, H), whose copy is stale). The update kernel writes the copies of
        # what it steps; a refresh, a numpy update or a split (a_inv: the heads that
        # leave take the group's inverse) marks them stale; a new array (arms added or
        # removed, a restore) makes a new copy. a_inv's copy is made the first time a
        # decide reads a split head (then kept); its entries of heads in their group are
        # stale like a_inv's own (never read).
        self._copies32: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._first = np.zeros(0, dtype=np.intp)  # index 0 of every arm (width_inverses)
        self._same: int | None = None  # see shared_candidate
        self.s_data = np.zeros((0, d, d))
        self.s_inv = np.zeros((0, d, d))
        self.a_data = np.zeros((0, _H, d, d))
        self.a_inv = np.zeros((0, _H, d, d))
        self.b_data = np.zeros((0, _H, d))
        self.srr = np.zeros((0, _H))
        self.weight = np.zeros((0, _H))
        self.count = np.zeros((0, _H), dtype=np.int64)
        self.lam = np.zeros((0, _H))
        self.mu0 = np.zeros((0, _H))
        self.sigma0 = np.zeros((0, _H))
        self.updates = np.zeros(0, dtype=np.int64)  # updates since the last exact refresh
        self.theta = np.zeros((0, _H, d))
        self.sigma2 = np.zeros((0, _H))
        # Observed cost over the per-request price estimate: (sum of weighted ratios,
        # sum of weights) per arm; the cost correction learned on top of declared prices.
        self.price_ratio = np.zeros((0, 2))
        # Per candidate ridge: prequential squared error of the quality head (a sum),
        # inverse and coefficients; q_inv is the selected candidate's inverse (derived,
        # copied when read: see the q_inv property).
        self.sel_err = np.zeros((0, g))
        self.sel_inv = np.zeros((0, g, d, d))
        self.sel_theta = np.zeros((0, g, d))
        self.q_inv = np.zeros((0, d, d))

    @property
    def s_data(self) -> np.ndarray:
        """The shared groups' data matrices (K, D, D), every deferred step added: the
        update kernel keeps up to ``defer_rows`` rank-one steps of each arm aside
        (``_pend``) and adds them when they are full or here, when read (refreshes,
        merges, forgetting, serialization, the numpy paths)."""
        pend = self._pend
        if pend is not None and pend[2].any():
            with _FLUSH_LOCK:
                if pend[2].any():  # not added by another reader meanwhile
                    _kernel.flush_all(self._s_data, *pend)
        return self._s_data

    @s_data.setter
    def s_data(self, value: np.ndarray) -> None:
        # A whole array (arms added or removed, a restore): its own sums, none deferred
        # (the getter that read the previous array added its deferred steps).
        self._s_data = value
        self._pend = None

    def _deferred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The update kernel's rows of deferred data steps (``pend_x`` (K, M, D),
        ``pend_w`` (K, M), ``pend_n`` (K,)), made for the current arms."""
        m = self.defer_rows
        if not m:
            if self._pend is not None:
                self.s_data  # noqa: B018 (adds what was deferred)
                self._pend = None
            return _NO_DEFER
        pend = self._pend
        k = self._s_data.shape[0]
        if pend is None or pend[0].shape[:2] != (k, m):
            self.s_data  # noqa: B018 (adds what was deferred)
            pend = self._pend = (np.zeros((k, m, self.n_features)), np.zeros((k, m)),
                                 np.zeros(k, dtype=np.int64))
        return pend

    @property
    def sel_inv(self) -> np.ndarray:
        """The quality candidates' inverses (K, G, D, D). The candidate with the
        group's ridge (:attr:`shared_candidate`) has the same matrix as the group's
        ``s_inv[k]`` while the quality head is in its arm's group, so the update kernel
        does not store it there (``_same_stale[k]``): it is copied from ``s_inv`` when
        read here (at d=384 the copy was ~46 µs of select's update). The compiled
        decides and update read ``_sel_inv`` directly: an arm that selected that
        candidate reads ``s_inv`` for it."""
        if self._same_stale.any():
            self._fresh_same(np.flatnonzero(self._same_stale))
        return self._sel_inv

    @sel_inv.setter
    def sel_inv(self, value: np.ndarray) -> None:
        # A whole array (arms added or removed, a restore): every candidate stored.
        self._sel_inv = value
        self._same_stale = np.zeros(value.shape[0], dtype=bool)

    def _fresh_same(self, arms: np.ndarray | list[int]) -> None:
        """Store the shared candidate's inverse of ``arms`` (whose flag is set), copied
        from the quality head's inverse (its float32 copy, when selected, the update
        kernel wrote from the same values: not stale)."""
        same = self.shared_candidate
        for k in arms:
            if same >= 0:  # (none once a new tag ridge changed it: recomputed then)
                self._sel_inv[k, same] = (self.s_inv[k] if self.group[k, 0]
                                          else self.a_inv[k, 0])
            self._same_stale[k] = False

    @property
    def q_inv(self) -> np.ndarray:
        """The quality head's inverse of every arm (K, D, D): its selected candidate's,
        ``sel_inv[k, g]``. Copied from ``sel_inv`` when read, for the arms whose
        selection or candidates changed since: the update kernel and the compiled
        decides read the candidate's own inverse through the selected index (see
        :meth:`width_inverses`), so an update no longer copies a D x D matrix that only
        the numpy paths read (at d=384, 1.2 MB per update)."""
        stale = self._q_stale
        if stale.any():
            idx = np.flatnonzero(stale)
            self._q_inv[idx] = self.sel_inv[idx, self._sel[idx]]
            stale[:] = False
        return self._q_inv

    @q_inv.setter
    def q_inv(self, value: np.ndarray) -> None:
        # A whole array (arms added or removed, a restore): current, of the candidates
        # the errors select.
        k, g = value.shape[0], self.sel_diag.shape[0]
        self._q_inv = value
        self._q_stale = np.zeros(k, dtype=bool)
        self._sel = (np.argmin(self.sel_err, axis=1).astype(np.intp)
                     if g and self.sel_err.shape == (k, g) else np.zeros(k, dtype=np.intp))

    @property
    def selecting(self) -> bool:
        """Whether the quality head is chosen among candidate context ridges."""
        return self.sel_diag.shape[0] > 0

    @property
    def shared_candidate(self) -> int:
        """The quality candidate whose ridge is the shared group's (``ridge_diag``; by
        default the text at ``context_ridge``), or -1: that candidate's inverse is the same
        matrix as the quality head's (``s_inv`` while the head is in its arm's group,
        its own ``a_inv`` once split off: the same sums, ridge and steps), so the
        compiled update copies it from there and the compiled decides read ``s_inv``
        for it. Kept until :meth:`set_tag_ridge` changes the
        candidates' ridges."""
        if self._same is None:
            same = np.flatnonzero((self.sel_diag == self.ridge_diag).all(axis=1))
            self._same = int(same[0]) if same.size else -1
        return self._same

    def selected(self) -> np.ndarray:
        """Index (K,) of each arm's candidate ridge: the lowest prequential error so far
        (ties, e.g. before any data, go to the first candidate)."""
        return np.argmin(self.sel_err, axis=1)

    # ----------------------------------------------------------------- arms
    def __len__(self) -> int:
        return int(self.lam.shape[0])

    def append(self, lam: np.ndarray, mu0: np.ndarray, sigma0: np.ndarray) -> None:
        """Add one arm with per-head ridge strength, prior mean and prior noise."""
        d = self.n_features
        lam = np.asarray(lam, dtype=float)
        # Heads start in one group when their priors make their matrices equal; the group
        # holds at least the quality head, the one reported most.
        row = {
            "group": lam == lam[0],
            "s_data": np.zeros((d, d)), "s_inv": np.zeros((d, d)),
            "a_data": np.zeros((_H, d, d)), "a_inv": np.zeros((_H, d, d)),
            "b_data": np.zeros((_H, d)), "srr": np.zeros(_H), "weight": np.zeros(_H),
            "count": np.zeros(_H, dtype=np.int64), "lam": lam,
            "mu0": np.asarray(mu0, dtype=float), "sigma0": np.asarray(sigma0, dtype=float),
            "updates": np.int64(0), "theta": np.zeros((_H, d)), "sigma2": np.zeros(_H),
            "price_ratio": np.zeros(2),
            "sel_err": np.zeros(self.sel_diag.shape[0]),
            "sel_inv": np.zeros((self.sel_diag.shape[0], d, d)),
            "sel_theta": np.zeros((self.sel_diag.shape[0], d)), "q_inv": np.zeros((d, d)),
        }
        self.put(row)
        self.refresh([len(self) - 1])

    def set_prior(self, k: int, lam: np.ndarray, mu0: np.ndarray, sigma0: np.ndarray) -> None:
        """New prior for arm k; its data sums stay. Heads whose ridge strengths now differ
        leave the shared group (their matrices are no longer equal)."""
        group = self.group[k]
        if group.any() and len(set(lam[group].tolist())) > 1:
            self._split(k, group.copy())
        self.lam[k], self.mu0[k], self.sigma0[k] = lam, mu0, sigma0
        self.refresh([k])

    def fill_derived(self) -> None:
        """Allocate and recompute the derived arrays after a sums-only restore."""
        k, d = len(self), self.n_features
        self.s_inv = np.zeros((k, d, d))
        self.a_inv = np.zeros((k, _H, d, d))
        self.theta = np.zeros((k, _H, d))
        self.sigma2 = np.zeros((k, _H))
        self.sel_inv = np.zeros((k, self.sel_diag.shape[0], d, d))
        self.sel_theta = np.zeros((k, self.sel_diag.shape[0], d))
        self.q_inv = np.zeros((k, d, d))
        self._drop_dead_copies()
        self.refresh()

    def delete(self, index: int) -> None:
        self.sel_inv  # noqa: B018 (stores the shared candidates' while the arms are as they were)
        self.q_inv  # noqa: B018 (copies the stale arms' while sel_inv still has them)
        for name in self.ARRAYS:
            setattr(self, name, np.delete(getattr(self, name), index, axis=0))
        self._drop_dead_copies()

    def take(self, index: int) -> dict[str, np.ndarray]:
        """Copies of one arm's arrays (for moving an arm between policies)."""
        return {name: getattr(self, name)[index].copy() for name in self.ARRAYS}

    def put(self, row: dict[str, np.ndarray]) -> None:
        self.sel_inv  # noqa: B018 (stores the shared candidates' while the arms are as they were)
        self.q_inv  # noqa: B018 (copies the stale arms' while sel_inv still has them)
        for name in self.ARRAYS:
            value = np.asarray(row[name])[None]
            setattr(self, name, np.concatenate([getattr(self, name), value]))
        self._drop_dead_copies()

    # ---------------------------------------------------------------- group
    def _split(self, k: int, heads: np.ndarray) -> None:
        """Move ``heads`` (a mask) out of arm k's group; they keep the shared state."""
        leaving = self.group[k] & heads
        if leaving.any():
            if leaving[0] and self._same_stale[k]:
                self._fresh_same([k])  # the compiled decides read it once split
            self.a_data[k, leaving] = self.s_data[k]
            self.a_inv[k, leaving] = self.s_inv[k]
            self._stale32(k, "a_inv", leaving)
            self.group[k, leaving] = False
            self._grouped = None

    def matrices(self, name: str) -> np.ndarray:
        """``a_data`` or ``a_inv`` with every head's own matrix (a copy)."""
        out = getattr(self, name).copy()
        shared = self.s_data if name == "a_data" else self.s_inv
        k, h = np.nonzero(self.group)
        out[k, h] = shared[k]
        return out

    # ------------------------------------------------------------- derived
    def refresh(self, arms: list[int] | None = None) -> None:
        """Recompute A^-1, theta and sigma^2 exactly from the sums (O(d^3) per matrix)."""
        idx = range(len(self)) if arms is None else arms
        if self.sums_only:
            self.updates[list(idx)] = 0
            return
        eye = np.diag(self.ridge_diag)
        for k in idx:
            group = self.group[k]
            own = np.flatnonzero(~group)
            if group.any():
                lam = self.lam[k, np.argmax(group)]
                self.s_inv[k] = _spd_inverse(self.s_data[k] + lam * eye)
                self._stale32(k, "s_inv")
            if own.size:
                a = self.a_data[k, own] + self.lam[k, own, None, None] * eye
                self.a_inv[k, own] = _spd_inverse(a)
                self._stale32(k, "a_inv", own)
            b = self._b_total(k)
            if group.any():
                self.theta[k, group] = b[group] @ self.s_inv[k]  # A^-1 is symmetric
            if own.size:
                self.theta[k, own] = np.einsum("hij,hj->hi", self.a_inv[k, own], b[own])
            self.updates[k] = 0
            if self.selecting:
                self._refresh_candidates(k, slice(None), b[0])
            self._update_sigma2(k)

    def _refresh_candidates(self, k: int, rows: slice | np.ndarray, b: np.ndarray) -> None:
        """Arm k's quality candidates ``rows``, inverses and coefficients, exactly from
        the sums (``b`` its quality target vector with the prior), then its selection."""
        a0 = self.s_data[k] if self.group[k, 0] else self.a_data[k, 0]
        if self._same_stale[k]:  # ``rows`` may leave it out
            self._fresh_same([k])
        self._sel_inv[k, rows] = _spd_inverse(
            a0 + self.lam[k, 0] * self.sel_diag[rows, :, None] * np.eye(self.n_features))
        self.sel_theta[k, rows] = self._sel_inv[k, rows] @ b
        self._select(k)

    def set_tag_ridge(self, rows: np.ndarray, tag_dims: int, ridge: float) -> None:
        """Give the quality candidates ``rows`` (a mask over ``sel_diag``) the ridge
        ``ridge`` on the last ``tag_dims`` context coordinates (a learned tag prior:
        bandit/tagprior.py) and recompute those candidates of every arm from its sums
        (the other candidates and heads are unchanged). The prequential errors stay:
        they score each candidate's predictions as they were made."""
        self.sel_inv  # noqa: B018 (stores the shared candidate's before it may change)
        self.sel_diag[rows, self.dim - tag_dims:self.dim] = ridge
        self._same = None
        if self.sums_only:
            return
        for k in range(len(self)):
            self._refresh_candidates(k, rows, self._b_total(k)[0])
            self._update_sigma2(k)

    def _select(self, k: int) -> None:
        """Make arm k's quality head its candidate with the lowest prequential error."""
        g = int(np.argmin(self.sel_err[k]))
        self.theta[k, 0] = self.sel_theta[k, g]
        self._sel[k] = g
        self._q_stale[k] = True
        self._stale32(k, "q_inv")

    def _b_total(self, k: int) -> np.ndarray:
        b = self.b_data[k].copy()
        b[:, -1] += self.lam[k] * self.mu0[k]
        return b

    def _update_sigma2(self, k: int) -> None:
        # Penalized residual sum of squares of the ridge fit, from sums only:
        #   J = sum r^2 + lam*mu0^2 - b.theta   (prior mean sits on the bias coefficient)
        #   with b = b_data + lam*mu0 on the bias: b.theta = b_data.theta + lam*mu0*theta_bias
        theta, lam_mu0 = self.theta[k], self.lam[k] * self.mu0[k]
        rss = self.srr[k] + lam_mu0 * (self.mu0[k] - theta[:, -1]) - np.vecdot(
            self.b_data[k], theta)
        rss = np.maximum(rss, 0.0)
        self.sigma2[k] = (_NU0 * self.sigma0[k] ** 2 + rss) / (_NU0 + self.weight[k])

    # -------------------------------------------------------------- learning
    def update(self, k: int, x: np.ndarray, y: np.ndarray,
               weight: float = 1.0) -> float | None:
        """Rank-one update of arm k with features x (D,) and targets y (H,), NaN = missing,
        the observation counting as ``weight`` (> 0) observations.

        Returns the quality residual before the update (None if quality was missing),
        which the drift detector watches.

        In place on arm k's slices of the stacked arrays, in one compiled call
        (``_policy_kernel.update_arm``) unless ``compiled`` is False; the numpy steps
        below are the reference (the rank-one changes of the inverses and data
        matrices through BLAS ``dger``, no D x D temporary). The control flow runs on
        Python bools (numpy's any() on 3 values is slower).
        """
        observed = y == y  # not NaN
        obs = observed.tolist()
        if not any(obs):
            return None
        grp = self.group[k].tolist()
        if obs != grp and not all(obs):
            reported = list(map(operator.and_, obs, grp))  # the group's reported heads
            if any(reported) and reported != grp:
                # The group is reported in part: its unreported heads split off (once
                # per head and arm; then the group is reported whole or not at all).
                self._split(k, ~observed)
                grp = self.group[k].tolist()
        if self.compiled:
            # One compiled call (bandit/_policy_kernel.py) for the steps below, which
            # stay the reference for it: the group's step, the own heads', the quality
            # candidates' when selecting and quality is reported, the sums.
            sel = ((self._sel_inv, self.sel_theta, self.sel_err, self._sel, self._q_stale,
                    self._same_stale, self._kept32("q_inv"), self.shared_candidate)
                   if self.selecting else _NO_SELECTION)
            residual = _kernel.update_arm(
                k, x, y, float(weight), self.group, self.s_inv, self._s_data, self.a_inv,
                self.a_data, self.theta, self.b_data, self.srr, self.weight, self.count,
                self.lam, self.mu0, self.sigma0, self.sigma2, _NU0, self._kept32("s_inv"),
                self._kept32("a_inv"), *sel, *self._deferred())
            self.updates[k] += 1
            if self.updates[k] >= self.refresh_every:
                self.refresh([k])
            return residual if obs[0] else None
        if self._same_stale[k]:  # before the group's step
            self._fresh_same([k])
        touched = any(map(operator.and_, obs, grp))
        theta = self.theta[k]  # (H,D) view
        err = y - theta @ x  # (H,) NaN where not observed
        # Weighted Sherman-Morrison: A + w x x^T, gain = w A^-1 x / (1 + w x^T A^-1 x).
        xw = x if weight == 1.0 else weight * x
        if touched:
            # One gain serves every head of the group: they share A^-1.
            p = self.s_inv[k]
            px = p @ x
            gain = (weight / (1.0 + weight * float(px @ x))) * px
            _rank1(p, -1.0, gain, px)
            self._stale32(k, "s_inv")
            _rank1(self.s_data[k], 1.0, xw, x)
            if all(grp):
                _rank1(theta, 1.0, err, gain)
            else:
                group = self.group[k]
                theta[group] += err[group, None] * gain
        own = [h for h in range(_H) if obs[h] and not grp[h]]
        for h in own:
            p = self.a_inv[k, h]
            px = p @ x
            gain = (weight / (1.0 + weight * float(px @ x))) * px
            _rank1(p, -1.0, gain, px)
            self._stale32(k, "a_inv", h)
            _rank1(self.a_data[k, h], 1.0, xw, x)
            theta[h] += err[h] * gain
        if obs[0] and self.selecting:
            # Predict, score, then learn: every candidate's error on this observation
            # before it has seen it (prequential), then one rank-one step for all.
            e = y[0] - self.sel_theta[k] @ x  # (G,)
            self.sel_err[k] += weight * e * e
            p = self.sel_inv[k]
            px = p @ x
            gain = weight * px / (1.0 + weight * (px @ x))[:, None]
            p -= gain[:, :, None] * px[:, None, :]
            self.sel_theta[k] += e[:, None] * gain
            self._select(k)
        if all(obs):
            yo, wo = y, weight
        else:
            yo = np.where(observed, y, 0.0)
            wo = weight * observed
        _rank1(self.b_data[k], 1.0, yo, xw)
        self.srr[k] += weight * (yo * yo)
        self.weight[k] += wo
        self.count[k] += observed
        self.updates[k] += 1
        if self.updates[k] >= self.refresh_every:
            self.refresh([k])
        else:
            self._update_sigma2(k)
        return float(err[0]) if obs[0] else None

    def update_many(self, k: int, x: np.ndarray, y: np.ndarray,
                    weight: float | np.ndarray = 1.0) -> None:
        """Add a batch of observations (n,D) / (n,H) to arm k, each counting as ``weight``
        observations (one number, or one per row), then refresh the arm exactly."""
        observed = ~np.isnan(y)
        if self.selecting and observed[:, 0].any():
            # Every candidate's error on the batch, predicted before the batch is learned.
            q = observed[:, 0]
            wq = weight[q] if np.ndim(weight) else weight
            if self.exact_prequential:
                group = self.group[k]
                a0 = self.s_data[k] if group[0] else self.a_data[k, 0]
                ridges = self.lam[k, 0] * self.sel_diag  # (G,D): each candidate's
                a = np.broadcast_to(a0, (len(ridges), *a0.shape)).copy()
                a[:, np.arange(self.n_features), np.arange(self.n_features)] += ridges
                self.sel_err[k] += sequential_errors(a, self._b_total(k)[0], x[q], y[q, 0],
                                                     wq)
            else:
                e = y[q, 0, None] - x[q] @ self.sel_theta[k].T  # (n, G)
                self.sel_err[k] += (np.reshape(wq, (-1, 1)) * e * e).sum(axis=0)
        if np.ndim(weight):  # one weight per row: sum_i w_i x_i x_i^T = (w x)^T x
            w: np.ndarray | float = np.asarray(weight, dtype=np.float64).reshape(-1, 1)
            xw, wsum = x * w, 1.0
        else:
            w, xw, wsum = 1.0, x, float(weight)
        touched = (observed & self.group[k]).any(axis=1)  # rows reporting a group head
        if touched.any():
            # The group keeps the heads every such row reports; the others split off.
            self._split(k, ~np.logical_and.reduce(observed[touched], axis=0))
            self.s_data[k] += wsum * (xw[touched].T @ x[touched])
        group = self.group[k]
        for h in np.flatnonzero(~group):
            rows = observed[:, h]
            if rows.any():
                self.a_data[k, h] += wsum * (xw[rows].T @ x[rows])
        yo = np.where(observed, y, 0.0)
        self.b_data[k] += wsum * ((yo * w).T @ x)
        self.srr[k] += wsum * (w * yo * yo).sum(axis=0)
        self.weight[k] += wsum * (w * observed).sum(axis=0)
        self.count[k] += observed.sum(axis=0)
        self.refresh([k])

    def scale(self, factor: float, arms: list[int] | None = None) -> None:
        """Discount the data of some arms (forgetting); the prior is never discounted."""
        idx = slice(None) if arms is None else arms
        for name in self.DATA:
            getattr(self, name)[idx] *= factor
        self.refresh(None if arms is None else list(arms))

    def add(self, k: int, other: ArmStatistics, j: int, factor: float = 1.0) -> None:
        """Add ``factor`` times the data sums of arm j of ``other`` to arm k (merge)."""
        if self.group[k].any() and np.array_equal(self.group[k], other.group[j]):
            self.s_data[k] += factor * other.s_data[j]
            own = ~self.group[k]
            self.a_data[k, own] += factor * other.a_data[j, own]
        else:
            self._split(k, self.group[k].copy())
            self.a_data[k] += factor * other.matrices_of(j, "a_data")
        self.b_data[k] += factor * other.b_data[j]
        self.srr[k] += factor * other.srr[j]
        self.weight[k] += factor * other.weight[j]
        self.count[k] += other.count[j]
        self.price_ratio[k] += factor * other.price_ratio[j]
        self.sel_err[k] += factor * other.sel_err[j]

    def add_price_ratios(self, k: int, ratios: np.ndarray,
                         weights: float | np.ndarray = 1.0) -> None:
        """Record observed cost / price estimate of arm k (one ratio or many)."""
        if type(ratios) is float and type(weights) is float:
            # One outcome (update()'s): the same sums without numpy calls on one-element
            # arrays (~6 us, paid per policy kind learning). "0.0 +": the dot product's
            # sum starts at 0.0, so a -0.0 product adds as +0.0 there too.
            self.price_ratio[k, 0] += 0.0 + weights * ratios
            self.price_ratio[k, 1] += weights
            return
        r = np.asarray(ratios, dtype=np.float64).reshape(-1)
        w = np.broadcast_to(np.asarray(weights, dtype=np.float64), r.shape)
        self.price_ratio[k, 0] += float(w @ r)
        self.price_ratio[k, 1] += float(w.sum())

    def cost_factor(self, strength: float) -> np.ndarray:
        """Per-arm multiplicative correction of the price estimate: the mean observed
        ratio, shrunk toward 1 (the declared price) by ``strength`` pseudo-observations."""
        return (strength + self.price_ratio[:, 0]) / (strength + self.price_ratio[:, 1])

    def shared_offsets(self, shared_ridge: float) -> np.ndarray:
        """Quality-head coefficients (K, D) that add a shared component to every arm:
        the hybrid model of Li et al. (2010), quality = x.(beta + theta_k), with beta
        shared by all arms (ridge ``shared_ridge``) and theta_k each arm's deviation,
        pulled toward its prior by the arm's ridge Lambda_k.

        Everything comes from the per-arm sums, so replicas still merge exactly. With
        A_k = D_k + Lambda_k and theta_k the arm's own ridge fit, profiling out the
        deviations gives

            (lambda_s I + sum_k (Lambda_k - Lambda_k A_k^-1 Lambda_k)) beta
                = sum_k Lambda_k (theta_k - m_k)

        and the joint fit of arm k is theta_k + A_k^-1 Lambda_k beta: an arm with
        little data (a model added mid-stream) is predicted by the shared component,
        one with much data by its own. Returns the added term A_k^-1 Lambda_k beta.
        """
        k, _, d = self.theta.shape
        if k == 0:
            return np.zeros((0, d))
        lam0 = self.lam[:, 0]
        dev = self.theta[:, 0].copy()
        dev[:, -1] -= self.mu0[:, 0]  # theta_k - m_k (the prior mean sits on the bias)
        if self.selecting:
            # Each arm's own ridge diagonal is its selected candidate's: Lambda_k =
            # lam_k R_k, and the quality inverse is that candidate's.
            inv, rd = self.q_inv, self.sel_diag[self.selected()]  # (K,D,D), (K,D)
            lr = lam0[:, None] * rd
            m0 = np.diag(shared_ridge + lr.sum(axis=0)) - np.einsum(
                "kij,ki,kj->ij", inv, lr, lr)
            beta = np.linalg.solve(m0, (lr * dev).sum(axis=0))
            return lam0[:, None] * np.einsum("kij,kj->ki", inv, rd * beta)
        in_group = self.group[:, 0]
        if in_group.all():  # the usual case: no copy of the inverses
            inv = self.s_inv
        elif not in_group.any():
            inv = self.a_inv[:, 0]
        else:
            inv = np.where(in_group[:, None, None], self.s_inv, self.a_inv[:, 0])
        # Lambda_k = lam_k R with R = diag(ridge_diag) shared by every arm, so
        # sum_k Lambda_k A_k^-1 Lambda_k = R (sum_k lam_k^2 A_k^-1) R: one weighted sum
        # over the arms (O(K D^2)), then one D x D solve; no per-arm inverse.
        rd = self.ridge_diag
        m0 = np.diag(shared_ridge + lam0.sum() * rd) - np.tensordot(
            lam0 * lam0, inv, axes=1) * np.outer(rd, rd)
        beta = np.linalg.solve(m0, rd * (lam0 @ dev))
        return lam0[:, None] * (inv @ (rd * beta))

    def shift_quality(self, delta: np.ndarray) -> None:
        """Make every arm's quality targets y - x.delta instead of y, exactly, from the
        sums: b -= A delta and sum r^2 -= 2 delta.b - delta.A.delta, with A the quality
        head's data matrix (decayed like b, so any forgetting stays consistent). The
        coefficients follow (one matrix-vector product per candidate ridge); the
        inverses and the prequential errors are unchanged."""
        if not len(self) or not delta.any():
            return
        in_group = self.group[:, 0]
        # A delta arm by arm: no (K, D, D) stack of the quality matrices.
        ad = np.stack([(self.s_data[k] if shared else self.a_data[k, 0]) @ delta
                       for k, shared in enumerate(in_group)])  # (K, D)
        b = self.b_data[:, 0]
        self.srr[:, 0] += ad @ delta - 2.0 * (b @ delta)
        b -= ad
        lam_mu0 = self.lam[:, 0] * self.mu0[:, 0]
        b_total = b.copy()
        b_total[:, -1] += lam_mu0
        if self.selecting:
            self.sel_theta[:] = (self.sel_inv @ b_total[:, None, :, None])[..., 0]
            self.theta[:, 0] = self.sel_theta[np.arange(len(self)), self.selected()]
        else:
            inv = np.where(in_group[:, None, None], self.s_inv, self.a_inv[:, 0])
            self.theta[:, 0] = (inv @ b_total[:, :, None])[..., 0]
        # The quality head's noise, as _update_sigma2 for every arm at once.
        theta = self.theta[:, 0]
        rss = np.maximum(self.srr[:, 0] + lam_mu0 * (self.mu0[:, 0] - theta[:, -1])
                         - np.vecdot(b, theta), 0.0)
        self.sigma2[:, 0] = (_NU0 * self.sigma0[:, 0] ** 2 + rss) / (_NU0 + self.weight[:, 0])

    def matrices_of(self, k: int, name: str) -> np.ndarray:
        """One arm's (H,D,D) ``a_data`` or ``a_inv`` with every head's own matrix."""
        out = getattr(self, name)[k].copy()
        out[self.group[k]] = (self.s_data if name == "a_data" else self.s_inv)[k]
        return out

    def _drop_dead_copies(self) -> None:
        """Forget the float32 copies of arrays replaced since (arms added or removed, a
        restore): a copy keeps its source alive (a_inv's and its copy: 85 MB at d=384,
        K=16), and a_inv's is made again only when a decide reads a split head."""
        for name, copy in list(self._copies32.items()):
            if copy[0] is not self._source(name):
                del self._copies32[name]

    def _source(self, name: str) -> np.ndarray:
        """The array the float32 copy ``name`` copies (q_inv's without updating it)."""
        return self._q_inv if name == "q_inv" else getattr(self, name)

    def _stale32(self, k: int, name: str, heads: object = None) -> None:
        """Mark arm k's float32 copy of ``name`` stale (of a_inv: its ``heads``, an
        index or a mask over the heads)."""
        copy = self._copies32.get(name)
        if copy is not None and copy[0] is self._source(name):
            copy[2][k if heads is None else (k, heads)] = True

    def _kept32(self, name: str) -> np.ndarray:
        """The float32 copy of ``name`` for the update kernel to keep equal; empty when
        there is none (or it copies an array replaced since)."""
        copy = self._copies32.get(name)
        if copy is not None and copy[0] is self._source(name):
            return copy[1]
        return _NO_OWN_COPY if name == "a_inv" else _NO_COPY

    def _copy32(self, name: str) -> np.ndarray:
        """The float32 copy of ``s_inv``, ``q_inv`` or ``a_inv``, current (see
        FLOAT32_INVERSE_DIM); q_inv's stale arms are copied from their selected
        candidates' inverses."""
        source = self._source(name)
        copy = self._copies32.get(name)
        if copy is None or copy[0] is not source:
            current = self.q_inv if name == "q_inv" else source
            copy = self._copies32[name] = (source, current.astype(np.float32),
                                           np.zeros(source.shape[:-2], dtype=bool))
        stale = copy[2]
        if stale.any():
            if name == "q_inv":
                idx = np.flatnonzero(stale)
                copy[1][idx] = self.sel_inv[idx, self._sel[idx]]
            else:
                idx = np.nonzero(stale)  # arms, or (arms, heads) of a_inv
                copy[1][idx] = source[idx]
            stale[:] = False
        return copy[1]

    def own_inverses(self) -> np.ndarray:
        """The heads' own inverses (K, H, D, D) that the compiled kernels read for a head
        split off its arm's group: ``a_inv``, or from ``FLOAT32_INVERSE_DIM`` features
        its float32 copy, current (made when first read; then the update kernel keeps
        it). ``a_inv`` (not read) when every head is grouped, or with quality model
        selection when only quality heads are split (they read their candidates')."""
        if (self.n_features < FLOAT32_INVERSE_DIM or self._all_grouped()
                or (self.selecting and self.group[:, 1:].all())):
            return self.a_inv
        return self._copy32("a_inv")

    def _all_grouped(self) -> bool:
        """Whether every head of every arm is in its arm's shared group (cached: the
        groups change only on a split, a merge, a restore or a change of arms)."""
        group = self.group
        cached = self._grouped
        if cached is None or cached[0] is not group:
            cached = self._grouped = (group, bool(group.all()))
        return cached[1]

    # ------------------------------------------------------------ prediction
    def width_inverses(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                      int]:
        """The shared inverses (K, D, D) that the compiled kernels read for the
        exploration width, and the quality head's as (K, G, D, D) with the index (K,) of
        each arm's selected one: the candidates' own inverses (no copy), or from
        ``FLOAT32_INVERSE_DIM`` features on the float32 copies of both (q_inv's only when
        selecting; then G = 1); then each arm's selected candidate (K,) and
        :attr:`shared_candidate` (an arm that selected it reads the shared inverse)."""
        same = self.shared_candidate if self.selecting else -1
        if self.n_features < FLOAT32_INVERSE_DIM or not self.selecting:
            inv = (self.s_inv if self.n_features < FLOAT32_INVERSE_DIM
                   else self._copy32("s_inv"))
            # (an arm whose shared candidate is not stored selected it with its quality
            # head in the group: the kernels fold it into ``inv``, and never read it)
            return inv, self._sel_inv, self._sel, self._sel, same
        k = len(self)
        if self._first.shape[0] != k:
            self._first = np.zeros(k, dtype=np.intp)
        return (self._copy32("s_inv"), self._copy32("q_inv")[:, None], self._first,
                self._sel, same)

    def predict(self, xb: np.ndarray, arms: np.ndarray | None, c: np.ndarray | None,
                w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head means (n,K,H), utility (n,K) and utility std (n,K) for contexts xb (n,D).

        ``arms`` selects the candidate arms (None: all, in order); ``c`` (all arms, H)
        are the per-head variance weights w_h^2 * sigma_h^2; when None the std is not
        computed (zeros). Everything is computed on the full stacked arrays and the
        candidates' columns are selected at the end: indexing the matrices first would
        copy them, more work than the arithmetic it saves.
        """
        k, h, d = self.theta.shape
        n = xb.shape[0]
        if n <= FUSED_BATCH and self.compiled and c is not None:
            # The usual case of a few contexts (one decide, or the service's decides
            # gathered in one event-loop turn) in one compiled call: means, utility, std.
            means, utility, std = np.empty((n, k, h)), np.empty((n, k)), np.empty((n, k))
            inv, q_inv, q_sel, sel, same = self.width_inverses()
            _kernel.predict_width(self.theta, xb, w, c, inv, q_inv, q_sel, self.selecting,
                                  sel, same, ALL_GROUPED if self._all_grouped() else self.group,
                                  self.own_inverses(), means, utility, std)
            if arms is not None:
                means, utility, std = means[:, arms], utility[:, arms], std[:, arms]
            return means, utility, std
        if n == 1 and self.compiled:
            means, utility = np.empty((1, k, h)), np.empty((1, k))
            _kernel.predict_one(self.theta, xb[0], w, means[0], utility[0])
            if arms is not None:
                means, utility = means[:, arms], utility[:, arms]
        else:
            means = (xb @ self.theta.reshape(k * h, d).T).reshape(n, k, h)
            if arms is not None:
                means = means[:, arms]
            utility = means @ w
        if c is None:
            return means, utility, np.zeros_like(utility)
        c_sel = None
        if self.selecting:
            # The quality head's inverse is its selected candidate's (q_inv), not the
            # group's or its own.
            c_sel, c = c[:, 0], c.copy()
            c[:, 0] = 0.0
        if c_sel is None and self._all_grouped():
            # The usual case: every head of every arm shares its arm's matrix.
            c_group, own_k, own_h = c.sum(axis=1), _NONE, _NONE
        else:
            c_group = (c * self.group).sum(axis=1)  # (K,)
            # (arm, head) pairs outside the groups that the preferences weigh.
            own_k, own_h = np.nonzero(~self.group & (c > 0))
        if n == 1 and self.compiled:
            x = xb[0]
            var = np.zeros(k)
            _kernel.add_quadratic_forms(
                self._copy32("s_inv") if d >= FLOAT32_INVERSE_DIM else self.s_inv, x,
                c_group, var)
            if c_sel is not None:
                _kernel.add_quadratic_forms(self.q_inv, x, np.ascontiguousarray(c_sel), var)
            if own_k.size:
                q = (self.a_inv[own_k, own_h] @ x) @ x
                np.add.at(var, own_k, q * c[own_k, own_h])
            var = var[None, :]
        elif n == 1:
            x = xb[0]
            # x^T A_k^-1 x for every arm: two matrix-vector products on the stacked
            # inverses viewed as one (K*D, D) matrix (BLAS gemv, no per-arm loop).
            var = (self.s_inv.reshape(k * d, d) @ x).reshape(k, d) @ x
            var *= c_group
            if c_sel is not None:
                var += ((self.q_inv.reshape(k * d, d) @ x).reshape(k, d) @ x) * c_sel
            if own_k.size:
                q = (self.a_inv[own_k, own_h] @ x) @ x
                np.add.at(var, own_k, q * c[own_k, own_h])
            var = var[None, :]
        else:
            # One combined matrix sum_h c_h A_h^-1 per arm, then one quadratic form per
            # context and arm, as a single (n, D) x (D, K*D) product.
            # The exploration width of a large batch in float32: ~6x faster, and a
            # relative error of ~1e-6 on a standard deviation is far below anything
            # exploration can notice. Statistics, inverses and means stay float64.
            wide = n >= FLOAT32_WIDTH_BATCH
            xq = xb.astype(np.float32) if wide else xb
            if self.compiled and not own_k.size:
                # The same matrices in one compiled pass, already in (D, K*D) layout.
                m = np.empty((d, k * d), dtype=xq.dtype)
                sel_inv = self.sel_inv if c_sel is not None else _NO_SELECTION[0]
                _kernel.width_matrix(self.s_inv, c_group, sel_inv, self._sel,
                                     c_sel if c_sel is not None else c_group, m)
            else:
                m = c_group[:, None, None] * self.s_inv
                if c_sel is not None:
                    m += c_sel[:, None, None] * self.q_inv
                if own_k.size:
                    np.add.at(m, own_k,
                              c[own_k, own_h, None, None] * self.a_inv[own_k, own_h])
                m = m.transpose(1, 0, 2).reshape(d, k * d)
                if wide:
                    m = m.astype(np.float32)
            t = (xq @ m).reshape(n, k, d)
            var = np.einsum("nkd,nd->nk", t, xq).astype(np.float64)
        if arms is not None:
            var = var[:, arms]
        return means, utility, np.sqrt(np.maximum(var, 0.0))


def sequential_errors(a: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
                      weight: float | np.ndarray = 1.0, block: int = 128) -> np.ndarray:
    """Prequential squared errors of G ridge fits over a batch, as if learned row by row.

    ``a`` (G,D,D) are the fits' matrices (data plus each candidate's ridge) and ``b``
    (D,) their common target vector (``A_g theta_g = b``), before the batch; ``x``
    (n,D) and ``y`` (n,) the batch in order, ``weight`` one number or (n,). Returns
    (G,) the sums of ``w_i e_i^2`` with ``e_i`` each row's error against the fit of
    every row before it: what n calls of :meth:`ArmStatistics.update` add to
    ``sel_err`` (to rounding), in a few matrix products per ``block`` rows instead of
    n rank-one steps.

    The errors are the innovations of each block: with A = L L^T and V = L^-1 X^T, the
    block's residuals r = y - X theta have covariance S = V^T V + diag(1/w) (in noise
    units), and with S = C C^T the sequential errors are diag(C) * C^-1 r. Then the
    block is added to A and b (shared by the candidates) and the next block starts from
    the new fits. O(d^2) per row and candidate, as a rank-one step; LAPACK directly
    (no checks or copies of scipy's wrappers), S from its lower triangle (dsyrk).
    """
    g = a.shape[0]
    total = np.zeros(g)
    w = np.broadcast_to(np.asarray(weight, dtype=np.float64), y.shape)
    keep = w > 0  # a weightless row teaches nothing and scores nothing
    if not keep.all():
        x, y, w = x[keep], y[keep], w[keep]
    n = y.shape[0]
    a, b = a.copy(), b.copy()
    for start in range(0, n, block):
        xb, yb, wb = x[start:start + block], y[start:start + block], w[start:start + block]
        m = yb.shape[0]
        rhs = np.column_stack([xb.T, b])  # (D, m+1): L^-1 of both at once
        for j in range(g):
            lo = _cholesky(a[j])
            z = _solve_lower(lo, rhs)
            wt, u = z[:, :m], z[:, m]  # V = L^-1 X^T; X theta = V^T L^-1 b
            s = _blas.dsyrk(1.0, wt, trans=1, lower=1)  # V^T V, lower triangle
            s[np.diag_indices(m)] += 1.0 / wb
            c = _cholesky(s)
            e = np.diagonal(c) * _solve_lower(c, yb - wt.T @ u)
            total[j] += float(wb @ (e * e))
        if start + block < n:
            xw = xb * wb[:, None]
            a += xw.T @ xb
            b += xw.T @ yb
    return total


def _rank1(a: np.ndarray, alpha: float, u: np.ndarray, v: np.ndarray) -> None:
    """``a += alpha * u v^T`` in place for a C-contiguous (M, D) ``a`` (BLAS dger on its
    Fortran-ordered transpose): no D x D temporary, ~3x faster than numpy's outer."""
    # f2py writes in place into an F-contiguous float64 array with overwrite_a
    # (tests/bandit/test_hot_path.py checks the update against the numpy form).
    _dger(alpha, v, u, a=a.T, overwrite_a=1)


def _cholesky(a: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a symmetric positive definite matrix (LAPACK dpotrf,
    reading the lower triangle; the upper one is left as it was, unread below)."""
    factor, info = _lapack.dpotrf(a, lower=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix not positive definite (dpotrf info {info})")
    return factor


def _solve_lower(c: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``c^-1 rhs`` for a lower triangular ``c`` (LAPACK dtrtrs: no checks, no copies
    beyond the result)."""
    out, info = _lapack.dtrtrs(c, rhs, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"singular triangular factor (dtrtrs info {info})")
    return out


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of symmetric positive definite matrices (..., D, D) through Cholesky."""
    inv_l = np.linalg.inv(np.linalg.cholesky(a))  # triangular: off the hot path
    return np.swapaxes(inv_l, -1, -2) @ inv_l


def prior_sigma(mu0: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Prior noise scale per head for an arm whose prior mean is ``mu0``."""
    sigma = np.array([_QUALITY_SIGMA0, _COST_SIGMA0, _LATENCY_SIGMA0])
    for h in (1, 2):
        if known[h] and mu0[h] > 0:
            sigma[h] = 0.5 * mu0[h]
    return sigma
