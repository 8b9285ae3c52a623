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

Difficulty (``shared_difficulty``, opt-in). Context that predicts how hard a query is
for every model is admitted for each arm on its own, and then biases the comparison.
A model whose text model predicts its quality well sends the queries it predicts hard
to the others, and a model kept on its mean learns that mean on those hard queries:
on the RouteLLM MMLU replay GPT-4's mean was 0.719 on the 231 queries it was called on
against 0.804 over all rows, and it lost the rest of the stream. With
``shared_difficulty`` the policy learns a difficulty x.beta from every arm's outcomes
(:class:`SharedDifficulty`: a ridge fit with a free mean per arm, so which arm was called
on which queries does not bias it; the hybrid linear model of Li et al. 2010 with the
arms' deviations profiled in turn), and every arm learns, and selects its candidate
models on, its quality minus x.beta: a block of context is admitted for an arm only
where it predicts that arm's quality relative to the shared prediction (the difference
criterion), and an arm on its mean compares its mean net of the queries' difficulty.
The arms' sums are moved exactly onto each new beta (b -= A delta), so they always hold
deviations from the current one. Thompson draws from each arm's deviation posterior plus
x.beta, conditional on beta at its fit. (The exact joint draw, one beta for every arm,
moves arm k's sample by (Lambda_k A_k^-1 x).delta; measured on the LLMRouter replay,
that part's spread between the arms was 0.002-0.012 against arms' widths of 0.04-0.13,
and over 6 policy seeds it earned nothing: left out.) The shift is used only once one
of its ridge candidates has predicted outcomes' deviations from their arm's mean better
than none. Its sums are the arms' own quality sums (:class:`ArmSums`: sum x x^T is the
sum of the arms' quality matrices, sum x q is b + A beta), so it forgets exactly as they
do (``half_life_hours``, drift scaling, a removed arm) and merges with them (with a
level, they and the candidates' scores are of quality minus the level); beside the
arms it keeps only its candidates' scores and the coefficients applied. The distributed
learners do not carry it yet (the shift must be applied, and the scores kept, in the
partition's state before the arms' update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bandit.base import Policy, check_finite_number
from bandit.errors import InvalidInputError
from bandit.stats import ArmStatistics
from bandit.tagprior import MIN_WEIGHT, learned_tag_ridge
from bandit.thompson import LinearThompson, LinearThompsonConfig

__all__ = ["SelectiveThompson", "SelectiveThompsonConfig", "MEAN_ONLY_RIDGE",
           "ArmSums", "SharedDifficulty"]

#: A context ridge this strong leaves a model its intercept alone (the arm's mean).
MEAN_ONLY_RIDGE = 1e6
#: ``tag_prior``: the with-tags candidate's ridge fixed (``tag_ridge``) or learned.
TAG_PRIORS = ("fixed", "learned")
#: The learned tag ridge is estimated again once the arms' quality weight has moved
#: by this factor (either way: forgetting shrinks it) since the last estimate, and
#: given to the candidates once it is this factor or more from the ridge they have:
#: each change recomputes two D x D inverses per arm (~190 ms for 9 arms at D = 81 on
#: a loaded host; changed at every estimate it cost 1.6x the policy's time per row).
_TAG_PRIOR_STEP = np.log(1.1)
_TAG_PRIOR_MOVE = np.log(2.0)


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

    ``shared_difficulty`` (default False): a query difficulty shared by every arm,
    learned from every arm's outcomes (module docstring, "Difficulty"). Each arm learns,
    and selects its candidates on, its quality minus the shared prediction. Its sums are
    the arms': it forgets as they do (``half_life_hours``, drift scaling).

    ``tag_prior`` (``"fixed"`` or ``"learned"``): with ``"learned"`` the with-tags
    candidates' tag ridge (``tag_ridge`` until then) is estimated from every arm's
    outcomes by empirical Bayes (:mod:`bandit.tagprior`), again whenever the arms'
    quality weight has moved by 10%; without a tag block it changes nothing.
    """

    level_horizon: float | None = None
    shared_difficulty: bool = False
    tag_prior: str = "fixed"

    def validated(self) -> SelectiveThompsonConfig:
        super().validated()
        if self.level_horizon is not None:
            check_finite_number("level_horizon", self.level_horizon, low=1.0)
        if not isinstance(self.shared_difficulty, bool):
            raise InvalidInputError("shared_difficulty", "must be true or false",
                                    self.shared_difficulty)
        if self.tag_prior not in TAG_PRIORS:
            raise InvalidInputError("tag_prior", "allowed: " + ", ".join(TAG_PRIORS),
                                    self.tag_prior)
        if self.tag_prior == "learned" and self.tag_dims and sum(
                r != MEAN_ONLY_RIDGE for r in self.tag_ridges or ()) != 1:
            raise InvalidInputError("tag_ridges", "must hold one ridge besides 1e6 (the "
                                    "one tag_prior 'learned' estimates)", self.tag_ridges)
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

    def __init__(self, dim: int, **params: object) -> None:
        super().__init__(dim, **params)
        self._difficulty: SharedDifficulty | None = None
        #: The difficulty coefficients the arms' quality sums are relative to (D,).
        self._applied = np.zeros(self._stats.n_features)
        if self.config.shared_difficulty:
            # Candidates: the text at the intercept's ridge and at the arms' context
            # ridge; the tags at their own ridge. (The bias's is immaterial: centred on
            # each arm's mean, its row of the fit is 0.)
            diag = self._stats.ridge_diag
            text = dim - self.config.tag_dims
            grid = []
            for c in sorted({1.0, float(self.config.context_ridge)}):
                row = diag.copy()
                row[:text] = c
                grid.append(self.config.ridge * row)
            self._difficulty = SharedDifficulty(np.array(grid))
            self._shifting = True
        # The learned tag prior (tag_prior "learned"): the candidates it sets, the ridge
        # they have, and the arms' quality weight at its last estimate.
        self._tag_rows: np.ndarray | None = None
        self._tag_ridge = float(self.config.tag_ridge)
        self._tag_weight = 0.0
        if self.config.tag_prior == "learned" and self.config.tag_dims:
            self._tag_rows = self._with_tag_rows()
            self._tag_ridge = float(self._stats.sel_diag[self._tag_rows, dim - 1][0])

    def _with_tag_rows(self) -> np.ndarray:
        """The quality candidates with a tag ridge (a mask over ``sel_diag``'s rows)."""
        return self._stats.sel_diag[:, self.config.dim - 1] != MEAN_ONLY_RIDGE

    @property
    def tag_ridge(self) -> float:
        """The with-tags candidates' tag ridge in use (``tag_ridge`` unless learned)."""
        return self._tag_ridge

    def _learn_tag_prior(self, ridge: float | None = None) -> None:
        """Estimate the tag ridge again (:func:`bandit.tagprior.learned_tag_ridge`)
        once the arms' quality weight has moved by 10%, and give it to the with-tags
        candidates once it is twice or half the ridge they have (each arm's recomputed
        from its sums); ``ridge``: give them that one (a restore)."""
        if self._tag_rows is None:
            return
        if ridge is None:
            total = float(self._stats.weight[:, 0].sum())
            if total <= 0.0 or (self._tag_weight > 0.0 and abs(
                    np.log(total / self._tag_weight)) < _TAG_PRIOR_STEP):
                return
            ridge = learned_tag_ridge(self._stats, self.config.tag_dims,
                                      self.config.ridge)
            if total >= MIN_WEIGHT:
                # Kept even when the estimate finds nothing (untagged traffic, one tag
                # value): else it would be taken again on every update.
                self._tag_weight = total
            if ridge is None or abs(np.log(ridge / self._tag_ridge)) < _TAG_PRIOR_MOVE:
                return
        if ridge != self._tag_ridge:
            self._stats.set_tag_ridge(self._tag_rows, self.config.tag_dims, ridge)
            self._tag_ridge = ridge

    def _quality_shift(self, xb: np.ndarray) -> np.ndarray:
        shift = super()._quality_shift(xb)
        if self._difficulty is not None:
            shift += xb @ self._applied
        return shift

    def _arm_targets(self, arms: Sequence[str], xb: np.ndarray, y: np.ndarray,
                     weights: float | np.ndarray) -> np.ndarray:
        targets = super()._arm_targets(arms, xb, y, weights)  # before the shift learns
        if self._difficulty is not None:
            # The arms' sums are of quality minus the level (each outcome's at its time;
            # ArmSums adds the difficulty back): score the outcomes on the same scale.
            self._difficulty.observe(ArmSums.of(self._stats, self._applied),
                                     [self._index[a] for a in arms], xb,
                                     y[:, 0] - self._level, weights)
        return targets

    def update(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        super().update(*args, **kwargs)  # type: ignore[arg-type]
        self._apply_difficulty()
        self._learn_tag_prior()

    def update_batch(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        super().update_batch(*args, **kwargs)  # type: ignore[arg-type]
        self._apply_difficulty()
        self._learn_tag_prior()

    def _apply_difficulty(self, beta: np.ndarray | None = None) -> None:
        """Move every arm's quality sums onto the current difficulty coefficients
        (exactly: :meth:`~bandit.stats.ArmStatistics.shift_quality`), so each arm's
        fit and candidate errors are of its deviation from the shared prediction."""
        if self._difficulty is None:
            return
        if beta is None:
            beta = self._difficulty.coefficients(ArmSums.of(self._stats, self._applied))
        delta = beta - self._applied
        if delta.any():
            self._stats.shift_quality(delta)
            self._applied = beta.copy()

    def merge(self, other: Policy) -> Policy:
        if self._difficulty is None or not isinstance(other, SelectiveThompson) or (
                other._difficulty is None):
            super().merge(other)
        else:
            # Both replicas' sums relative to the other's coefficients, then added.
            self._apply_difficulty(other._applied)
            super().merge(other)
            self._difficulty.add(other._difficulty)
            self._apply_difficulty()
        if self._tag_rows is not None:  # the merged sums' tag prior, whatever it was
            self._tag_weight = float(self._stats.weight[:, 0].sum())
            ridge = learned_tag_ridge(self._stats, self.config.tag_dims, self.config.ridge)
            if ridge is not None:
                self._learn_tag_prior(ridge)
        return self

    def _extra_state(self) -> dict | None:
        state: dict = {}
        if self._difficulty is not None:
            state.update(difficulty=self._difficulty.to_json(),
                         applied=self._applied.tolist())
        if self._tag_rows is not None:
            state.update(tag_ridge=self._tag_ridge, tag_weight=self._tag_weight)
        return state or None

    def _load_extra_state(self, state: dict | None) -> None:
        if self._difficulty is not None and state and "difficulty" in state:
            self._difficulty.load(state["difficulty"])
            self._applied = np.asarray(state["applied"], dtype=np.float64).reshape(
                self._applied.shape)
        if self._tag_rows is not None and state and "tag_ridge" in state:
            # The restored candidates' inverses are recomputed under the learned ridge.
            self._learn_tag_prior(float(state["tag_ridge"]))
            self._tag_weight = float(state["tag_weight"])
        elif (state and "tag_ridge" in state and self.config.tag_dims
              and float(state["tag_ridge"]) != self._tag_ridge):
            # A learned state restored with tag_prior="fixed": its stored inverses were
            # taken under the learned ridge, the candidates now have the configured one.
            self._stats.set_tag_ridge(self._with_tag_rows(), self.config.tag_dims,
                                      self._tag_ridge)

    def _watch_drift(self, arm: str, residuals: Sequence[float]) -> None:
        super()._watch_drift(arm, residuals)
        horizon = self.config.level_horizon
        if horizon is not None and len(residuals):
            # n residuals against the same level: n steps of the exponential mean.
            share = 1.0 - (1.0 - 1.0 / horizon) ** len(residuals)
            self._level += share * float(np.mean(residuals))


class ArmSums:
    """What :class:`SharedDifficulty` fits, summed over each arm's quality outcomes:
    ``xx`` (D, D) sum of x x^T and ``xy`` (D,) sum of x * quality over every arm; per
    arm ``n`` (K,) the weight, ``sy`` (K,) the quality and ``sx`` (K, D) x.

    From :meth:`of`, ``xx`` and ``xy`` (O(K D^2): every arm's D x D matrix read) are
    summed on first use only, which is when the fits are solved again: read them before
    the statistics change."""

    def __init__(self, xx: np.ndarray | None, xy: np.ndarray | None, n: np.ndarray,
                 sy: np.ndarray, sx: np.ndarray) -> None:
        self._totals: tuple[np.ndarray, np.ndarray] | None = (
            None if xx is None or xy is None else (xx, xy))
        self._read: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
        self.n, self.sy, self.sx = n, sy, sx

    @property
    def xx(self) -> np.ndarray:
        return self._summed()[0]

    @property
    def xy(self) -> np.ndarray:
        return self._summed()[1]

    def _summed(self) -> tuple[np.ndarray, np.ndarray]:
        if self._totals is None:
            assert self._read is not None
            self._totals = self._read()
        return self._totals

    @classmethod
    def of(cls, stats: ArmStatistics, applied: np.ndarray) -> ArmSums:
        """The sums read off the arms' quality-head statistics, whose targets are
        quality - x.``applied`` (b = sum x q - A applied): whatever the arms forget
        (half-life, drift scaling, a removed arm), the difficulty forgets with them."""
        # Each arm's quality data matrix A_k is s_data[k] (head in the group) or
        # a_data[k, 0]: read by its bias column (A_k is symmetric) and, for the totals,
        # summed slice by slice, never stacked into a (K, D, D) copy.
        group = stats.group[:, 0]
        sx = np.where(group[:, None], stats.s_data[:, :, -1], stats.a_data[:, 0, :, -1])
        b = stats.b_data[:, 0]  # (K, D): sum of x * (quality - x.applied) per arm
        sums = cls(None, None, sx[:, -1].copy(), b[:, -1] + sx @ applied, sx)

        def totals() -> tuple[np.ndarray, np.ndarray]:
            xx = np.zeros((applied.shape[0],) * 2)
            for k, shared in enumerate(group):
                xx += stats.s_data[k] if shared else stats.a_data[k, 0]
            return xx, b.sum(axis=0) + xx @ applied

        sums._read = totals
        return sums


class SharedDifficulty:
    """A query's difficulty, x.beta, learned from every arm's outcomes with a free mean
    per arm (module docstring, "Difficulty").

    The joint ridge fit of quality_i = alpha_k(i) + x_i.beta with unpenalized per-arm
    offsets alpha_k: profiling them out (Frisch-Waugh) leaves beta fit on each arm's
    outcomes centred on that arm's means, so the mix of arms called on hard or easy
    queries does not bias beta, and every statistic is a sum:

        (Lambda + sum_i x_i x_i^T - sum_k s_k s_k^T / n_k) beta
            = sum_i x_i q_i - sum_k s_k y_k / n_k

    with s_k = sum of x, y_k = sum of quality, n_k = weight over arm k's outcomes.
    Those sums are the arms' own (:class:`ArmSums`, read off their statistics), so the
    difficulty decays, merges and drops an arm exactly as the arms do; it keeps only
    the candidates' scores. Lambda is a candidate ridge on the context coefficients
    (the bias has none: the arms' means are theirs): ``ridges`` (G, D) diagonals. Each
    candidate, and "no difficulty", is scored by the prequential squared error of each
    outcome's deviation from its arm's mean so far (predicted before the outcome is
    learned); the shift is the candidate of lowest error, and 0 while none has beaten
    "no difficulty" (the policy is then plain ``select``). The scores forget with the
    arms: when the arms' total weight has shrunk, by the share it shrank. The shift is
    centred on the mean context seen (bias coefficient), so an arm's prior mean stays a
    mean quality.
    """

    def __init__(self, ridges: np.ndarray) -> None:
        g, d = ridges.shape
        self.ridges = ridges
        #: prequential squared errors: no difficulty, then each candidate
        self.err = np.zeros(1 + g)
        self._fits: np.ndarray | None = None  # (G, D)
        self.seen = 0.0  # outcome weight scored so far (never decayed)
        self._solved_at = 0.0  # ``seen`` when the fits were last solved
        self._weight = 0.0  # the arms' total weight once they learn what was scored

    def coefficients(self, sums: ArmSums) -> np.ndarray:
        """The shift's coefficients (D,), bias last: the best candidate's, or zeros."""
        best = int(np.argmin(self.err))
        if best == 0:
            return np.zeros(self.ridges.shape[1])
        return self.fits(sums)[best - 1]

    def fits(self, sums: ArmSums) -> np.ndarray:
        """Every candidate's ridge fit (G, D), centred on the mean context; solved
        again once 1% of the arms' weight (or one outcome) is new since the last
        solve, or the arms forgot."""
        total = float(sums.n.sum())
        if self._fits is None or self.seen - self._solved_at >= max(0.01 * total, 1.0):
            self._solved_at = self.seen
            within, rhs = sums.xx.copy(), sums.xy.copy()
            has = sums.n > 0
            n, sx = sums.n[has], sums.sx[has]
            within -= (sx / n[:, None]).T @ sx
            rhs -= sx.T @ (sums.sy[has] / n)
            d = within.shape[0]
            fits = np.linalg.solve(within[None] + self.ridges[:, :, None] * np.eye(d),
                                   np.broadcast_to(rhs, self.ridges.shape)[..., None])[..., 0]
            fits[:, -1] = 0.0
            if total > 0:  # centre: the mean context's shift is 0
                fits[:, -1] = -(fits @ sums.xx[-1]) / total
            self._fits = fits
        return self._fits

    def observe(self, sums: ArmSums, arms: Sequence[int], xb: np.ndarray,
                quality: np.ndarray, weights: float | np.ndarray) -> None:
        """Score the candidates on outcomes of arms (indices into ``sums``), each
        predicted before it is learned (the arms learn them next)."""
        total = float(sums.n.sum())
        if total < self._weight * (1.0 - 1e-9):  # the arms forgot: so do the scores
            self.err *= total / self._weight
            self._fits = None
        w = np.broadcast_to(np.asarray(weights, dtype=np.float64), quality.shape)
        fits = self.fits(sums)
        n, sy, sx = sums.n.copy(), sums.sy.copy(), sums.sx.copy()
        for k, x, q, wi in zip(arms, xb, quality, w, strict=True):
            if q != q:  # quality not reported
                continue
            if n[k] > 0:
                r = q - sy[k] / n[k]
                e = np.r_[0.0, fits @ (x - sx[k] / n[k])] - r
                self.err += wi * e * e
            n[k] += wi
            sy[k] += wi * q
            sx[k] += wi * x
            self.seen += wi
            total += wi
        self._weight = total

    def add(self, other: SharedDifficulty) -> None:
        """Add another replica's scores (merge; the arms add their sums)."""
        self.err += other.err
        self.seen += other.seen
        self._weight += other._weight
        self._fits = None

    def to_json(self) -> dict:
        return {"err": self.err.tolist(),
                "fits": None if self._fits is None else self._fits.tolist(),
                "seen": self.seen, "solved_at": self._solved_at, "weight": self._weight}

    def load(self, state: dict) -> None:
        """Restore :meth:`to_json` (a state saved before the sums were the arms' has
        no ``seen``: its fits are solved again on first use)."""
        self.err = np.asarray(state["err"], dtype=np.float64).reshape(self.err.shape)
        fits = state.get("fits")
        self._fits = None if fits is None or "seen" not in state else np.asarray(
            fits, dtype=np.float64).reshape(self.ridges.shape)
        self.seen = float(state.get("seen", 0.0))
        self._solved_at = float(state.get("solved_at", 0.0))
        self._weight = float(state.get("weight", 0.0))
