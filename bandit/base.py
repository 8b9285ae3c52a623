"""Shared types and the abstract policy.

Units used everywhere in the router:

* ``quality`` is a score in [0, 1] (thumbs, an eval score, a task metric);
* ``cost`` is the real cost of the request in USD;
* ``latency`` is wall-clock latency in milliseconds at the API, seconds inside the
  reward (so a latency weight of 0.1 means "one second is worth 0.1 quality points").

The reward a tenant maximizes is

    reward = quality_weight * quality - cost_weight * cost_usd - latency_weight * latency_s
"""

from __future__ import annotations

import abc
import functools
import io
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import ClassVar, NamedTuple

import numpy as np

from bandit import _policy_kernel as _kernel
from bandit._policy_kernel import copy_bounded, copy_bounded_row, quality_ceiling
from bandit.errors import DimensionError, InvalidInputError, UnknownArmError
from bandit.stats import ALL_GROUPED, FUSED_BATCH, ArmStatistics, prior_sigma

__all__ = [
    "OBJECTIVES",
    "MAX_ABS_CONTEXT",
    "MAX_COST_USD",
    "MAX_LATENCY_MS",
    "MAX_WEIGHT",
    "MIN_PRICE_ESTIMATE_USD",
    "Preferences",
    "ArmPrior",
    "Prediction",
    "Decision",
    "BatchDecision",
    "CostEstimate",
    "PriceList",
    "parse_outcome",
    "parse_outcome_array",
    "check_finite_number",
    "PolicyConfig",
    "Policy",
]

#: The objective heads every arm learns, in the order used by every array.
OBJECTIVES: tuple[str, ...] = ("quality", "cost", "latency")

# Bounds on what the statistics accept. Sums of squares of larger values overflow
# float64 (a context coordinate of 1e200, a cost of 1e300) and one such event would turn
# an arm's statistics into NaN for good; contexts near 1e6 already make A so ill-
# conditioned that A A^-1 = I holds only to 1e-4. Real traffic is far inside: embeddings
# are usually unit-norm, a request does not cost 10,000 USD nor last 28 hours.
#: Largest absolute value of a context coordinate.
MAX_ABS_CONTEXT = 1e3
#: Largest cost of one request, USD.
MAX_COST_USD = 1e4
#: Largest latency of one request, milliseconds.
MAX_LATENCY_MS = 1e8
#: Smallest price estimate (USD) a price ratio is learned from. A request priced below
#: it is a free model's (a price of ~0 per Mtok, or a denormal): its cost over that
#: estimate would be inf or ~1e12+ and would stay in the arm's ratio sums for good
#: (an inf or huge cost correction). The cheapest priced request in practice (one
#: token at 0.01 USD per Mtok) costs 1e-8 USD; with this floor a learned ratio is at
#: most MAX_COST_USD / 1e-10 = 1e14 (finite).
MIN_PRICE_ESTIMATE_USD = 1e-10
#: Largest preference weight (its square scales a variance: 1e200 would overflow).
MAX_WEIGHT = 1e6

# Outcome keys accepted by ``update`` and the head they feed. ``cost_usd`` and
# ``latency_ms`` are the names used on the wire (API, Kafka, replay logs).
_OUTCOME_KEYS = {
    "quality": 0,
    "cost": 1,
    "cost_usd": 1,
    "latency": 2,
    "latency_ms": 2,
}


# Upper bound of each head's outcome, in the units of the wire (latency in ms).
_OUTCOME_HIGH = (1.0, MAX_COST_USD, MAX_LATENCY_MS)
_F64 = np.dtype(np.float64)
_NO_ROWS = np.zeros((0, 0))  # no cost estimate, or no noise, for the fused decide
_NO_FACTOR = np.zeros(0)
_FREE = np.full(1, -1, dtype=np.intp)  # one row, no uniform draw
_FREE.setflags(write=False)
# Per thread, not per policy: the compiled decide releases the GIL while it reads the
# noise, so another thread's decide must not write the same buffer meanwhile.
_SCRATCH = threading.local()


def _noise_row(m: int) -> np.ndarray:
    """This thread's (1, m) buffer for one decide's Thompson noise."""
    try:
        return _SCRATCH.noise[m]
    except AttributeError:
        _SCRATCH.noise = {}
    except KeyError:
        pass
    buf = _SCRATCH.noise[m] = np.empty((1, m))
    return buf


#: PolicyConfig.cold_start_by: where an arm's cold start is counted.
COLD_START_BY = ("added-on-tags", "arm", "tags", "new-on-tags", "context")


def check_finite_number(name: str, value: object, *, low: float | None = None,
                        high: float | None = None) -> float:
    """Return ``value`` as a float, or raise :class:`InvalidInputError` naming ``name``.

    >>> check_finite_number("cost", 0.5, low=0.0)
    0.5
    >>> check_finite_number("cost", -1, low=0.0)
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: cost: must be a finite number >= 0.0 (got -1)
    """
    if not isinstance(value, bool) and isinstance(value, (int, float, np.floating,
                                                           np.integer)):
        number = float(value)
        if math.isfinite(number) and (low is None or number >= low) and (
                high is None or number <= high):
            return number  # the message is built only for an error (hot path)
    bounds = []
    if low is not None:
        bounds.append(f">= {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    allowed = "must be a finite number" + (" " + " and ".join(bounds) if bounds else "")
    raise InvalidInputError(name, allowed, value)


class Preferences(NamedTuple):
    """A tenant's trade-off between quality, cost and latency.

    Parameters
    ----------
    quality
        Weight of the quality score (0..1). Usually 1.
    cost
        Quality points a tenant gives up to save one USD on a request.
    latency
        Quality points a tenant gives up to save one second of latency.

    Changing the preferences changes the very next decision: every arm learns one
    head per objective, and the preferences only combine the heads.

    Examples
    --------
    >>> p = Preferences(quality=1.0, cost=50.0)
    >>> p.reward(quality=0.8, cost_usd=0.002, latency_ms=900.0)
    0.7
    >>> Preferences(cost=-1.0).validated()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: preferences.cost: must be a finite number >= 0.0 ...
    """

    quality: float = 1.0
    cost: float = 0.0
    latency: float = 0.0

    def validated(self) -> Preferences:
        """Return self after checking every weight is finite and non-negative."""
        # A tenant's weights are checked once, not per call. True == 1.0 and hashes alike,
        # so bools never take the shortcut (check_finite_number refuses them).
        if self in _VALID_PREFERENCES and bool not in map(type, self):
            return self
        for name, value in zip(self._fields, self, strict=True):
            check_finite_number(f"preferences.{name}", value, low=0.0, high=MAX_WEIGHT)
        if not any(self):
            raise InvalidInputError("preferences", "at least one weight must be > 0",
                                    tuple(self))
        if len(_VALID_PREFERENCES) >= 4096:
            _VALID_PREFERENCES.clear()
        _VALID_PREFERENCES.add(self)
        return self

    def head_weights(self) -> np.ndarray:
        """Weights that turn the heads (quality, cost USD, latency s) into a reward."""
        return np.array([self.quality, -self.cost, -self.latency], dtype=np.float64)

    def _weights(self) -> np.ndarray:
        """:meth:`validated`, then :meth:`head_weights` as a read-only array kept per
        valid value (a tenant's preferences repeat; the compiled decide only reads it)."""
        self.validated()
        w = _WEIGHTS.get(self)
        if w is None:
            if len(_WEIGHTS) >= 4096:
                _WEIGHTS.clear()
            w = _WEIGHTS[self] = self.head_weights()
            w.setflags(write=False)
        return w

    def reward(self, quality: float = 0.0, cost_usd: float = 0.0,
               latency_ms: float = 0.0) -> float:
        """The reward of one outcome, in quality points."""
        value = self.quality * quality - self.cost * cost_usd - self.latency * latency_ms / 1e3
        return round(value, 12)

    @classmethod
    def parse(cls, text: str) -> Preferences:
        """Parse ``"quality=1,cost=50,latency=0.1"`` (the command-line form).

        >>> Preferences.parse("quality=1,cost=20")
        Preferences(quality=1.0, cost=20.0, latency=0.0)
        """
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in cls._fields:
                raise InvalidInputError("preferences", "comma-separated key=value with keys "
                                        + ", ".join(cls._fields), part)
            try:
                values[key] = float(raw)
            except ValueError:
                raise InvalidInputError(f"preferences.{key}", "must be a number", raw) from None
        return cls(**values).validated()


# Preferences already validated (NamedTuples hash by value; bounded, cleared when full).
_VALID_PREFERENCES: set[Preferences] = set()
# Their head weights (Preferences._weights), likewise.
_WEIGHTS: dict[Preferences, np.ndarray] = {}
_DEFAULT_PREFERENCES = Preferences()


class ArmPrior(NamedTuple):
    """What is known about an arm before it has any feedback.

    Parameters
    ----------
    quality
        Expected quality in [0, 1], if known (for example from a public benchmark).
    cost_usd
        Expected cost of one request in USD, usually from the declared price.
    latency_ms
        Expected latency in milliseconds.
    strength
        How many observations the prior is worth (ridge strength of the known heads).
    """

    quality: float | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    strength: float = 1.0

    def validated(self) -> ArmPrior:
        if self.quality is not None:
            check_finite_number("prior.quality", self.quality, low=0.0, high=1.0)
        if self.cost_usd is not None:
            check_finite_number("prior.cost_usd", self.cost_usd, low=0.0)
        if self.latency_ms is not None:
            check_finite_number("prior.latency_ms", self.latency_ms, low=0.0)
        check_finite_number("prior.strength", self.strength, low=1e-6)
        return self

    def head_means(self) -> tuple[np.ndarray, np.ndarray]:
        """Prior mean per head in internal units, and a mask of the heads declared."""
        values = (self.quality, self.cost_usd,
                  None if self.latency_ms is None else self.latency_ms / 1e3)
        known = np.array([v is not None for v in values])
        means = np.array([0.5 if values[0] is None else values[0],
                          0.0 if values[1] is None else values[1],
                          0.0 if values[2] is None else values[2]], dtype=np.float64)
        return means, known


def parse_outcome(outcome: Mapping[str, object]) -> np.ndarray:
    """Turn an outcome mapping into a head vector (quality, cost USD, latency s).

    Missing objectives are NaN: the heads they feed are not updated.

    >>> parse_outcome({"quality": 1.0, "latency_ms": 250})
    array([1.  ,  nan, 0.25])
    """
    if not isinstance(outcome, Mapping):
        raise InvalidInputError("outcome", "must be a mapping of objective to value", outcome)
    # A list, then one array: item assignment into a numpy array costs more per value.
    values = [math.nan, math.nan, math.nan]
    for key, raw in outcome.items():
        if raw is None:
            continue
        head = _OUTCOME_KEYS.get(key)
        if head is None:
            raise InvalidInputError(f"outcome.{key}", "unknown objective; allowed: "
                                    + ", ".join(_OUTCOME_KEYS), raw)
        if type(raw) is float and 0.0 <= raw <= _OUTCOME_HIGH[head]:
            # The usual case, checked inline (NaN and infinities fail the comparison and
            # take the full check below, which names the field).
            values[head] = raw if head != 2 else raw / 1e3
        elif head == 0:
            values[0] = check_finite_number(key, raw, low=0.0, high=1.0)
        elif head == 1:
            values[1] = check_finite_number(key, raw, low=0.0, high=MAX_COST_USD)
        else:
            # Latency arrives in milliseconds under both names; the head learns seconds.
            values[2] = check_finite_number(key, raw, low=0.0, high=MAX_LATENCY_MS) / 1e3
    if all(math.isnan(v) for v in values):
        raise InvalidInputError("outcome", "needs at least one of quality, cost_usd, "
                                "latency_ms", dict(outcome))
    return np.array(values)


def parse_outcome_array(outcomes: np.ndarray) -> np.ndarray:
    """Validate an (n, 3) array of (quality, cost_usd, latency_ms), NaN = missing, and
    return head values (latency in seconds): :func:`parse_outcome` for many rows at once.

    >>> parse_outcome_array(np.array([[1.0, 0.002, np.nan]]))
    array([[1.   , 0.002,   nan]])
    """
    y = np.array(outcomes, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != len(OBJECTIVES):
        raise InvalidInputError("outcomes", "must be an (n, 3) array of quality, cost_usd, "
                                "latency_ms", np.shape(outcomes))
    high = np.array([1.0, MAX_COST_USD, MAX_LATENCY_MS])
    bad = np.isinf(y) | (y < 0) | (y > high)  # NaN compares False: missing is not bad
    if bad.any():
        row, col = np.argwhere(bad)[0]
        name = ("quality", "cost_usd", "latency_ms")[col]
        allowed = f"must be a finite number >= 0.0 and <= {high[col]}"
        raise InvalidInputError(f"outcomes[{row}].{name}", allowed, float(y[row, col]))
    empty = np.isnan(y).all(axis=1)
    if empty.any():
        raise InvalidInputError(f"outcomes[{int(np.argmax(empty))}]", "needs at least one "
                                "of quality, cost_usd, latency_ms")
    y[:, 2] /= 1e3
    return y


class Prediction(NamedTuple):
    """A policy's predicted outcome of one arm for one context (means, in API units).

    Immutable; a named tuple because a decision builds one per arm (16 per call): a
    frozen dataclass cost ~5x as much to construct.
    """

    quality: float
    cost_usd: float
    latency_ms: float
    utility: float
    uncertainty: float
    score: float

    def as_dict(self) -> dict[str, float]:
        return {"quality": self.quality, "cost_usd": self.cost_usd,
                "latency_ms": self.latency_ms, "utility": self.utility,
                "uncertainty": self.uncertainty, "score": self.score}


_make_prediction = functools.partial(tuple.__new__, Prediction)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`Policy.decide` for one context.

    ``propensity`` is the probability that the policy, in the state it was in and with
    the randomness it uses, would choose ``arm`` for this context: what off-policy
    evaluation needs.
    """

    arm: str
    propensity: float
    predictions: dict[str, Prediction]
    explored: bool = False
    policy: str = ""

    @property
    def scores(self) -> dict[str, float]:
        return {name: p.score for name, p in self.predictions.items()}


_PREDICTIONS = Decision.__dict__["predictions"]  # the slot (a member descriptor)


class _TableDecision(Decision):
    """A :class:`Decision` of the compiled decide whose ``predictions`` are built from
    its table row when first read: the same dict of the same Predictions, equal to the
    Decision built at once, but a caller that reads only ``arm`` and ``propensity``
    (a replay, the learner) no longer pays for 16 Prediction objects (5-10 µs)."""

    __slots__ = ("_arms", "_table")

    def __init__(self, arm: str, propensity: float,
                 predictions: dict[str, Prediction] | None = None, explored: bool = False,
                 policy: str = "", arms: list[str] | None = None,
                 table: np.ndarray | None = None) -> None:
        # Decision's fields (dataclasses.replace passes predictions), or the table row
        # (K, 6) of the candidates ``arms`` to build them from.
        _SET_ARM(self, arm)
        _SET_PROPENSITY(self, propensity)
        _SET_EXPLORED(self, explored)
        _SET_POLICY(self, policy)
        _SET_ARMS(self, arms)
        _SET_TABLE(self, table)
        _PREDICTIONS.__set__(self, predictions)  # None: built when first read

    @property
    def predictions(self) -> dict[str, Prediction]:  # type: ignore[override]
        value = _PREDICTIONS.__get__(self)
        if value is None:
            # tolist() converts the (K, 6) row in one C call; the tuples go straight into
            # Prediction (a named tuple) without a Python loop per arm.
            value = dict(zip(self._arms, map(_make_prediction, self._table.tolist()),
                             strict=True))
            _PREDICTIONS.__set__(self, value)
        return value

    @predictions.setter
    def predictions(self, value: dict[str, Prediction]) -> None:  # pickle, replace
        _PREDICTIONS.__set__(self, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return ((self.arm, self.propensity, self.predictions, self.explored, self.policy)
                == (other.arm, other.propensity, other.predictions, other.explored,
                    other.policy))

    __hash__ = Decision.__hash__

    def __repr__(self) -> str:
        return (f"Decision(arm={self.arm!r}, propensity={self.propensity!r}, "
                f"predictions={self.predictions!r}, explored={self.explored!r}, "
                f"policy={self.policy!r})")


# Frozen: the slots are set through their member descriptors, which object's setattr
# (what the dataclass uses) looks up by name at every call: 0.7 µs instead of 1.1 per
# Decision. Unrolled: a loop over them costs as much as the lookups.
_SET_ARM, _SET_PROPENSITY, _SET_EXPLORED, _SET_POLICY = (
    Decision.__dict__[f].__set__ for f in ("arm", "propensity", "explored", "policy"))
_SET_ARMS, _SET_TABLE = (_TableDecision.__dict__[f].__set__ for f in ("_arms", "_table"))


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """Decisions for many contexts at once (arrays, row per context).

    Attributes
    ----------
    arms
        The candidate arm names; columns of every (n, K) array.
    choices
        Index into ``arms`` of the chosen arm, shape (n,).
    propensities
        Probability of each choice, shape (n,).
    means
        Predicted head values (quality, cost USD, latency s), shape (n, K, 3).
    utility
        Predicted reward under the preferences, shape (n, K).
    uncertainty
        Standard deviation of the predicted reward, shape (n, K).
    scores
        The scores the choice maximized, shape (n, K).
    """

    arms: list[str]
    choices: np.ndarray
    propensities: np.ndarray
    means: np.ndarray
    utility: np.ndarray
    uncertainty: np.ndarray
    scores: np.ndarray
    explored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: (n, K, 6) the same predictions in :class:`Prediction`'s order and units (latency
    #: in ms), when the decide computed them in one piece (the compiled decide):
    #: ``utility``, ``uncertainty`` and ``scores`` are then its columns 3-5. None: built
    #: from the arrays above.
    table: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.choices.shape[0])

    def chosen(self) -> list[str]:
        return [self.arms[i] for i in self.choices]

    def prediction_dicts(self, **extra: np.ndarray) -> list[dict[str, dict[str, float]]]:
        """Per row: arm -> ``decision(row).predictions[arm].as_dict()``, plus one entry
        per ``extra`` (n, K) array (the service adds ``price_usd``).

        What a service answers and stores for every decision, without building the
        Prediction objects: one ``tolist()`` of the whole batch.

        >>> from bandit import LinUCB
        >>> p = LinUCB(1, seed=0)
        >>> p.add_arm("a")
        >>> b = p.decide_batch([[0.5]], explore=False)
        >>> b.prediction_dicts(price_usd=np.array([[0.25]]))[0]["a"]["price_usd"]
        0.25
        """
        for name, value in extra.items():
            if np.shape(value) != self.utility.shape:
                raise InvalidInputError(name, f"must have shape {self.utility.shape} "
                                        "(row per context, column per arm)", np.shape(value))
        # Dict displays over tolist() rows: ~3x faster than dict(zip(keys, ...)) per arm.
        # The first extra (the service's price_usd) goes into the display too: setting it
        # afterwards, arm by arm, cost the service's decide ~5 us per 16 arms.
        extras = [(key, np.asarray(value, dtype=np.float64).tolist())
                  for key, value in extra.items()]
        arms = self.arms
        # Without extras a placeholder column fills the display's last key, removed once.
        key0, first = extras[0] if extras else (None, [[None] * len(arms)] * len(self))
        if self.table is not None:
            # The compiled decide's table holds the six numbers of every arm in order
            # (latency already in ms, the same product): one tolist() for all of them.
            out = [{name: {"quality": c[0], "cost_usd": c[1], "latency_ms": c[2],
                           "utility": c[3], "uncertainty": c[4], "score": c[5], key0: e[j]}
                    for j, (name, c) in enumerate(zip(arms, t, strict=True))}
                   for t, e in zip(self.table.tolist(), first, strict=True)]
        else:
            means, utility = self.means.tolist(), self.utility.tolist()
            std, scores = self.uncertainty.tolist(), self.scores.tolist()
            out = [{name: {"quality": m[j][0], "cost_usd": m[j][1],
                           "latency_ms": m[j][2] * 1e3, "utility": u[j],
                           "uncertainty": s[j], "score": sc[j], key0: e[j]}
                    for j, name in enumerate(arms)}
                   for m, u, s, sc, e in zip(means, utility, std, scores, first,
                                             strict=True)]
        for key, values in extras[1:]:
            for row, cells in zip(out, values, strict=True):
                for name, value in zip(arms, cells, strict=True):
                    row[name][key] = value
        if key0 is None:
            for row in out:
                for cells in row.values():
                    del cells[None]
        return out

    def decision(self, row: int, policy: str = "") -> Decision:
        """One row as a :class:`Decision`."""
        if self.table is not None:
            # The predictions are built when first read (_TableDecision).
            return _TableDecision(self.arms[int(self.choices[row])],
                                  float(self.propensities[row]), None,
                                  bool(self.explored[row]), policy, self.arms,
                                  self.table[row])
        # tolist() converts a column in one C call; the tuples go straight into
        # Prediction (a named tuple) without a Python loop per arm.
        m = self.means[row]
        rows = zip(m[:, 0].tolist(), m[:, 1].tolist(), (m[:, 2] * 1e3).tolist(),
                   self.utility[row].tolist(), self.uncertainty[row].tolist(),
                   self.scores[row].tolist(), strict=True)
        predictions = dict(zip(self.arms, map(_make_prediction, rows), strict=True))
        explored = bool(self.explored[row]) if self.explored.size else False
        return Decision(arm=self.arms[int(self.choices[row])],
                        propensity=float(self.propensities[row]),
                        predictions=predictions, explored=explored, policy=policy)


def as_context_matrix(x: object, dim: int, field_name: str = "x") -> np.ndarray:
    """Validate one context (d,) or a batch (n, d) and return a float64 (n, d) array."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(field_name, f"must be numbers, a vector of length {dim}",
                                type(x).__name__) from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DimensionError(field_name, f"must have dimension {dim}",
                             f"shape {tuple(np.shape(x))}")
    if arr.shape[0] == 0:
        raise InvalidInputError(field_name, "must hold at least one context", "empty")
    if not np.isfinite(arr).all():
        raise InvalidInputError(field_name, "must be finite (no NaN or infinity)",
                                "non-finite value")
    if np.abs(arr).max() > MAX_ABS_CONTEXT:
        raise InvalidInputError(field_name, f"every value must be within +-{MAX_ABS_CONTEXT:g}"
                                " (embeddings are usually unit-norm)",
                                float(np.abs(arr).max()))
    return arr


def check_names(names: Sequence[str] | None, known: Sequence[str],
                field_name: str = "candidates",
                index: Mapping[str, int] | None = None) -> list[str]:
    """Validate a list of arm names against the known arms (None means all).

    ``index`` (name -> position) makes the membership test O(1) per name.
    """
    if names is None:
        if not known:
            raise InvalidInputError("arms", "the policy has no arms; add one with add_arm()")
        return list(known)
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    if not names:
        raise InvalidInputError(field_name, "must name at least one arm; allowed: "
                                + ", ".join(known), [])
    lookup = known if index is None else index
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise UnknownArmError(field_name, "unknown arm; allowed: " + ", ".join(known),
                              unknown[0])
    return names


class CostEstimate(NamedTuple):
    """An (n, K) price estimate already checked for ``names`` (read-only array, USD): what
    :meth:`PriceList.estimate` returns. Passed as ``cost_estimate`` for the same
    candidates, in the same order, it is used as is; otherwise it is checked again."""

    names: list[str]
    array: np.ndarray


class PriceList:
    """The candidates' prices, read once: the estimated cost (USD) of a request with
    ``t`` prompt tokens on candidate ``k`` is ``(t * input_per_mtok[k] + output_tokens *
    output_per_mtok[k]) / 1e6`` (prices per million tokens, ``output_tokens`` expected).

    :meth:`estimate` checks only the token counts, against the largest count whose every
    estimate stays within ``MAX_COST_USD``; estimates near or past that bound, odd token
    counts or odd prices get the full check of any ``cost_estimate`` (and its error).
    Build a new one when a price changes.
    """

    __slots__ = ("names", "input_per_mtok", "fixed", "max_tokens")

    def __init__(self, names: Sequence[str], input_per_mtok: Sequence[float],
                 output_per_mtok: Sequence[float], output_tokens: float) -> None:
        self.names = list(names)
        self.input_per_mtok = np.array(input_per_mtok, dtype=np.float64)
        self.fixed = output_tokens * np.array(output_per_mtok, dtype=np.float64)
        shape = (len(self.names),)
        if self.input_per_mtok.shape != shape or self.fixed.shape != shape:
            raise InvalidInputError("cost_estimate", "needs one price per candidate "
                                    f"({len(self.names)})", self.input_per_mtok.shape)
        self.input_per_mtok.setflags(write=False)
        self.fixed.setflags(write=False)
        with np.errstate(all="ignore"):
            room = np.where(self.input_per_mtok > 0,
                            (MAX_COST_USD * 1e6 - self.fixed) / self.input_per_mtok, np.inf)
            sane = (np.isfinite(self.input_per_mtok).all() and np.isfinite(self.fixed).all()
                    and (self.input_per_mtok >= 0).all() and (self.fixed >= 0).all())
        # A little short of the bound: rounding there is left to the full check.
        self.max_tokens = (float(room.min()) * (1 - 1e-9) if sane and room.size
                           else math.inf if sane else -1.0)

    def estimate(self, tokens: Sequence[float]) -> CostEstimate:
        """The (n, K) estimate for prompts of ``tokens`` tokens (one count per request)."""
        t = np.array(tokens, dtype=np.float64).reshape(-1)
        counts = t.tolist()
        if len(counts) == 1:  # the usual decide: scalar arithmetic, the same numbers
            arr = ((counts[0] * self.input_per_mtok + self.fixed) / 1e6)[None]
        else:
            arr = (t[:, None] * self.input_per_mtok + self.fixed) / 1e6
        most = self.max_tokens
        if not (counts and all(0.0 <= c <= most for c in counts)):  # NaN fails too
            arr = _cost_estimates(arr, self.names, len(counts))  # raises what it finds
        arr.setflags(write=False)
        return CostEstimate(self.names, arr)


def _cost_estimates(value: object, names: list[str], n: int) -> np.ndarray:
    """Validate a per-request price estimate and return it as an (n, K) array, USD."""
    if isinstance(value, CostEstimate):
        if value.names == names and value.array.shape == (n, len(names)):
            return value.array  # checked by PriceList.estimate
        value = value.array
    if isinstance(value, Mapping):
        missing = [a for a in names if a not in value]
        if missing:
            raise InvalidInputError(f"cost_estimate.{missing[0]}", "needs a value for "
                                    "every candidate", None)
        value = [value[a] for a in names]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError("cost_estimate", "must be numbers (USD), one per "
                                "candidate", type(value).__name__) from None
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (n, arr.shape[0]))
    if arr.shape != (n, len(names)):
        raise InvalidInputError("cost_estimate", f"must have one value per candidate "
                                f"({len(names)}) per context ({n})", arr.shape)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > MAX_COST_USD)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InvalidInputError(f"cost_estimate.{names[col]}", "must be a finite number "
                                f">= 0.0 and <= {MAX_COST_USD}", float(arr[row, col]))
    return arr


def _price_ratios(estimates: object, costs: np.ndarray) -> np.ndarray:
    """Observed cost over the price estimate per row, NaN (not learned) where either is
    missing or the estimate is below :data:`MIN_PRICE_ESTIMATE_USD` (0, a denormal, a
    price of ~0 per Mtok: a free model has no ratio to learn). Every ratio returned is
    finite."""
    est = np.asarray(estimates, dtype=np.float64).reshape(-1)
    if est.shape != costs.shape:
        raise InvalidInputError("cost_estimate", "must be one number (USD) per outcome",
                                f"shape {est.shape}")
    if not (np.isnan(est) | ((est >= 0) & (est <= MAX_COST_USD))).all():
        raise InvalidInputError("cost_estimate", "must be finite numbers >= 0.0 and <= "
                                f"{MAX_COST_USD} (NaN = unknown)", "out of range")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(est >= MIN_PRICE_ESTIMATE_USD, costs / est, np.nan)


def _price_ratio(estimate: object, cost: float) -> float:
    """:func:`_price_ratios` of one outcome (``update()``'s): the same number, and the
    same error for a refused estimate.

    A float estimate in range is divided here: the array version's numpy calls on
    one-element arrays (and its ``errstate`` context) cost ~20 us (0.1 here), most of
    what ``update()`` cost, paid for every policy kind the service keeps learning. Any
    other estimate takes the array version. A float division is IEEE's, as numpy's (it
    cannot overflow: the estimate is at least :data:`MIN_PRICE_ESTIMATE_USD`).
    """
    if type(estimate) is float and (estimate != estimate or 0.0 <= estimate <= MAX_COST_USD):
        if not estimate >= MIN_PRICE_ESTIMATE_USD:
            return math.nan
        return cost / estimate
    return float(_price_ratios([estimate], np.array([cost]))[0])


# ---------------------------------------------------------------------------- policy
_MAGIC = b"BRPOL\x01"
#: Serialization format: 2 added the price-ratio sums (format 1 files load with none).
_FORMAT = 2


class _Assessment(NamedTuple):
    """Predictions for a batch of contexts and the state of the exploration mixture."""

    names: list[str]
    means: np.ndarray
    utility: np.ndarray
    std: np.ndarray
    utility_main: np.ndarray  # -inf for arms outside the main branch
    std_main: np.ndarray  # 0 for cold arms while warm ones exist
    cold: np.ndarray  # (n, K) cold arms the cold-start share may explore in each row
    cold_share: np.ndarray  # (n,) share of that row's decisions given to them
    any_cold: bool  # whether any row's cold_share is > 0
    ceiling: np.ndarray  # utility with perfect quality: what no optimism may exceed


class _FusedPlan(NamedTuple):
    """What the compiled decide reads that changes only with the policy's state, built
    once per state (the version, the statistics and the config objects) and
    kept until the next change: per decide it was ~10 µs of Python (the rule, the
    eligibility checks, the arm range, the cold arms, the inverses' lookup)."""

    version: int
    stats: object
    config: object
    # None: the compiled decide does not apply (a rule the kernel lacks, a shared
    # component, a quality shift, "mean" exploration; see _decide_fused).
    rule: tuple[int, float, np.ndarray, float] | None
    names: list[str]  # every arm, in order; never changed (a batch gets a copy)
    arms: np.ndarray  # 0..K-1
    cold: np.ndarray  # (K,) arms cold in total
    n_cold: int
    by_direction: bool  # whether cold_start_by must look at each context's block
    inverses: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
    selecting: bool
    # The head groups (K, H) when some head is split off its arm's group (outcomes
    # reported in pieces), else ALL_GROUPED.
    group: np.ndarray
    # The split heads' own inverses the kernel reads (K, H, D, D): stats.a_inv, or from
    # FLOAT32_INVERSE_DIM features its float32 copy (ArmStatistics.own_inverses).
    own_inverses: np.ndarray


@dataclass(frozen=True)
class PolicyConfig:
    """Settings shared by every linear policy (immutable, validated once).

    Parameters
    ----------
    dim
        Dimension of the context vectors (a bias feature is added internally).
    ridge
        Ridge strength lambda: A starts at lambda * I. Worth ``ridge`` observations.
    epsilon
        Share of decisions made uniformly at random among the candidates. Keeps every
        propensity above ``epsilon / K`` so that logged traffic can evaluate any policy.
    half_life_hours
        Exponential forgetting: an observation's weight halves every this many hours
        (gamma per hour = 0.5 ** (1 / half_life_hours)). None keeps everything.
    decay_interval_s
        Forgetting is applied in steps at most this often (each step is O(K d^3)).
    drift_delta
        Confidence of river's ADWIN watching each arm's quality residuals; None turns
        drift detection off. On a detected change the arm keeps ``drift_keep`` of its
        data, so its uncertainty, hence its exploration, rises at once.
    cold_start_pulls
        An arm is cold until it has this many quality observations.
    cold_start_share
        While some candidates are warm, cold arms are explored in at most this share of
        decisions (uniformly among them); otherwise they are scored on their prior mean.
    cold_start_by
        Where the cold start is counted. ``"added-on-tags"`` (the default): as
        ``"tags"``, for the arms added late only (:meth:`Policy.add_arm` while other
        arms already had quality observations: a model added mid-stream); the arms
        there from the start are counted as by ``"arm"``, so a policy without a late
        arm decides exactly as with ``"arm"``. ``"arm"``: the arm's total
        quality observations. ``"tags"`` (opt-in): besides its total, an arm is cold for
        a request whose tag block (``tag_dims``) carries fewer than ``cold_start_pulls``
        of its quality observations along that block's direction (its posterior
        precision there, in observations: what it learned from other tags that share
        hashed coordinates does not count), while another candidate is warm there: a
        model added mid-stream gets its cold-start calls on every tag value it is asked
        about, not on whichever requests come first. Every arm then has a cold start
        on every tag value, which cost routing value on the tagged replays
        (docs/results.md, "New model mid-stream"): hence ``"added-on-tags"``.
        Untagged requests (a zero block) and policies without a tag block are counted
        by the total alone.
        ``"new-on-tags"``: as ``"tags"``, but only for an arm newer than the request's
        tags: fewer observations in total than another candidate has along them (a
        model added mid-stream, not the models there from the start on a tag they have
        not yet been called on). ``"context"``: as ``"tags"`` along the whole context's
        direction (the text too).
        The counts are read off the arms' sums: they forget, merge and serialize with
        them.
    refresh_every
        Recompute an arm's inverse exactly from its sums after this many rank-one updates.
    context_ridge
        Ridge of the context coefficients relative to the intercept's (``ridge``). Above 1
        an arm with little data is predicted by its mean, not by a noisy fit of its few
        contexts, so early play is close to the best-mean arm's.
    price_strength
        How many observations the declared price is worth against observed costs: the
        cost predicted from a per-request price estimate (``cost_estimate``) is the
        estimate times the arm's mean observed / estimated ratio, shrunk toward 1 by
        this many pseudo-observations.
    bounded_optimism
        No arm is scored above its utility with perfect quality (1.0) at its predicted
        cost, and a cold arm that could not beat the best warm arm's predicted utility
        even with perfect quality is not explored: at a tenant's cost weight an
        expensive model that cannot pay for itself costs no exploration.
    context_ridges
        Candidate context ridges of the quality head (model selection; same units as
        ``context_ridge``). Each arm keeps the same sums under every candidate and
        predicts quality with the one of lowest prequential (predict-then-update)
        squared error so far; ties (no data yet) go to the first. A candidate of 1e6 is
        the arm's mean alone (a plain multi-armed bandit): context is then used only for
        the arms where it has shown it predicts. None: ``context_ridge`` alone. The
        cost and latency heads always use ``context_ridge``.
    shared_ridge
        Learn a quality component shared by every arm (hybrid linear model, Li et al.
        2010; ridge strength of the shared coefficients): what one model's feedback
        teaches about a query (its difficulty, its domain) moves every model's
        prediction, and a model added mid-stream starts from the shared estimate.
        Each arm's own coefficients are its deviation, pulled toward 0 by ``ridge`` x
        ``context_ridge``. None: every arm learns alone.
    exploration
        What the exploration width (LinUCB's bonus, Thompson's posterior) measures:
        ``"mean"``, the uncertainty of each arm's mean utility alone,
        sqrt(sum_h w_h^2 sigma_h^2 / (n_h + lambda_h)), the same for every context;
        ``"context"`` (the default), the predictive uncertainty of the linear fit
        at this context, sqrt(sum_h w_h^2 sigma_h^2 x^T A_h^-1 x). Exploring on the
        means finds the best model fast and then stops; the context then moves a
        choice only through the predicted means. With hashed text features the
        context's own width stays wide for thousands of observations (each of 64
        directions must be learned) and buys exploration that the context does not
        repay: on the llmrouter replay even a full-information linear router on these
        features is within +-0.05 of the best single model (docs/results.md).
    tag_dims
        The last ``tag_dims`` coordinates of a context are the request tags' own block
        (:func:`bandit.featurize.append_tag_block`); 0: no block, tags (if any) are in
        the text's coordinates.
    tag_ridge
        Ridge of the tag block's coefficients relative to the intercept's (the text's is
        ``context_ridge``). A tag recurs on every request of an app or task, so a weak
        ridge lets each arm learn its effect from a few of them while the text's many
        sparse directions stay heavily regularized.
    tag_ridges
        Candidate tag ridges of the quality head (model selection, as
        ``context_ridges``; every pair of a context ridge and a tag ridge is a
        candidate): 1e6 is "no tags", so each arm uses the tags only where they have
        shown they predict its quality. None: ``tag_ridge`` alone.
    arm_prior
        Where an arm added without a declared quality gets its quality prior:
        ``"declared"`` (0.5, worth ``ridge`` observations) or ``"hierarchy"``, predicted
        from its price and every existing arm's quality so far by a prior across arms
        learned online (:mod:`bandit.hierarchy`; the slope of quality on log price is
        learned, the prediction's own uncertainty sets the prior's strength).
    seed
        Seed of the policy's private random generator.
    """

    dim: int
    ridge: float = 1.0
    epsilon: float = 0.0
    half_life_hours: float | None = None
    decay_interval_s: float = 60.0
    drift_delta: float | None = 0.002
    drift_keep: float = 0.1
    cold_start_pulls: int = 10
    cold_start_share: float = 0.1
    # Issue 13's new-model round (docs/results.md, "New model mid-stream"): "tags" met
    # the new-model goal in 6 of 6 runs (4 of 6 with "arm") but cost 0.02-0.05 of the
    # shuffled routing value on the tagged LLMRouter and MMLU replays; "added-on-tags"
    # does what "tags" does for a model added late and nothing otherwise: no cost on
    # those replays (identical decisions), the goal met in 4 of 6 runs (7 of 10 at w=0).
    cold_start_by: str = "added-on-tags"
    refresh_every: int = 1000
    # From the issue-13 sweep on the llmrouter replay (benchmarks/results/
    # value_sweep.json): a context ridge of 100 beat 1 at every weight tried; 1,000
    # and 10,000 (with the shared component, alpha 0) lost 0.05-0.06 more at w=0.
    context_ridge: float = 100.0
    price_strength: float = 10.0
    bounded_optimism: bool = True
    context_ridges: tuple[float, ...] | None = None
    # Opt-in, measured in issue 13's second round: see docs/results.md.
    shared_ridge: float | None = None
    exploration: str = "context"
    tag_dims: int = 0
    # Issue 13's tag sweep on the llmrouter replay (compare_routers --tag-ridge, 3
    # shuffles, mean over 5 weights): 0.1 / 0.3 / 1 / 3 gave -0.007 / -0.012 / +0.000 /
    # -0.017, within noise; 1 (a tag as free as the intercept) also won in file order.
    tag_ridge: float = 1.0
    tag_ridges: tuple[float, ...] | None = None
    # Issue 13 (docs/results.md, "A prior across models"): opt-in, no gain measured.
    arm_prior: str = "declared"
    seed: int | None = None

    def __post_init__(self) -> None:
        # A restored configuration (JSON) holds a list: store the immutable tuple.
        for name in ("context_ridges", "tag_ridges"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validated(self) -> PolicyConfig:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise InvalidInputError("dim", "must be an integer >= 1", self.dim)
        check_finite_number("ridge", self.ridge, low=1e-9)
        check_finite_number("epsilon", self.epsilon, low=0.0, high=1.0)
        if self.half_life_hours is not None:
            check_finite_number("half_life_hours", self.half_life_hours, low=1e-6)
        check_finite_number("decay_interval_s", self.decay_interval_s, low=0.0)
        if self.drift_delta is not None:
            check_finite_number("drift_delta", self.drift_delta, low=1e-12, high=1.0)
        check_finite_number("drift_keep", self.drift_keep, low=0.0, high=1.0)
        if not isinstance(self.cold_start_pulls, int) or self.cold_start_pulls < 0:
            raise InvalidInputError("cold_start_pulls", "must be an integer >= 0",
                                    self.cold_start_pulls)
        check_finite_number("cold_start_share", self.cold_start_share, low=0.0, high=1.0)
        if self.cold_start_by not in COLD_START_BY:
            raise InvalidInputError("cold_start_by", "allowed: " + ", ".join(COLD_START_BY),
                                    self.cold_start_by)
        if not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise InvalidInputError("refresh_every", "must be an integer >= 1",
                                    self.refresh_every)
        check_finite_number("context_ridge", self.context_ridge, low=1e-6, high=1e6)
        check_finite_number("price_strength", self.price_strength, low=1e-6)
        if self.arm_prior not in ("declared", "hierarchy"):
            raise InvalidInputError("arm_prior", "allowed: declared, hierarchy", self.arm_prior)
        if self.exploration not in ("context", "mean"):
            raise InvalidInputError("exploration", "allowed: context, mean",
                                    self.exploration)
        if self.context_ridges is not None:
            if (not isinstance(self.context_ridges, tuple)
                    or not 1 <= len(self.context_ridges) <= 8):
                raise InvalidInputError("context_ridges", "must be a list of 1 to 8 "
                                        "numbers in [1e-06, 1e6], or None",
                                        self.context_ridges)
            for i, value in enumerate(self.context_ridges):
                check_finite_number(f"context_ridges[{i}]", value, low=1e-6, high=1e6)
        if self.shared_ridge is not None:
            check_finite_number("shared_ridge", self.shared_ridge, low=1e-6, high=1e6)
        if (isinstance(self.tag_dims, bool) or not isinstance(self.tag_dims, int)
                or not 0 <= self.tag_dims < self.dim):
            raise InvalidInputError("tag_dims", f"must be an integer in [0, {self.dim - 1}] "
                                    "(the tag block's width, less than dim)", self.tag_dims)
        check_finite_number("tag_ridge", self.tag_ridge, low=1e-6, high=1e6)
        if self.tag_ridges is not None:
            if (not isinstance(self.tag_ridges, tuple) or not 1 <= len(self.tag_ridges) <= 4
                    or not self.tag_dims):
                raise InvalidInputError("tag_ridges", "must be a list of 1 to 4 numbers in "
                                        "[1e-06, 1e6] with tag_dims > 0, or None",
                                        self.tag_ridges)
            for i, value in enumerate(self.tag_ridges):
                check_finite_number(f"tag_ridges[{i}]", value, low=1e-6, high=1e6)
        if not isinstance(self.bounded_optimism, bool):
            raise InvalidInputError("bounded_optimism", "must be true or false",
                                    self.bounded_optimism)
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise InvalidInputError("seed", "must be an integer or None", self.seed)
        return self


class Policy(abc.ABC):
    """A contextual bandit over named arms with one linear head per objective.

    Subclasses set ``name`` and ``Config`` and implement :meth:`_score` (the scores the
    main branch maximizes) and :meth:`_main_propensity` (the probability that branch
    picks a given arm). Everything else, validation, exploration mixing, learning,
    forgetting, drift, merge and serialization, lives here.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    _registry: ClassVar[dict[str, type[Policy]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Policy._registry[cls.name] = cls

    def __init__(self, dim: int, **params: object) -> None:
        self.config = self.Config(dim=dim, **params).validated()  # type: ignore[arg-type]
        self._stats = ArmStatistics(dim, self.config.refresh_every,
                                    self.config.context_ridge, self.config.context_ridges,
                                    self.config.tag_dims, self.config.tag_ridge,
                                    self.config.tag_ridges)
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._priors: dict[str, ArmPrior] = {}
        # Arms added while others already had quality observations (cold_start_by).
        self._late: set[str] = set()
        self._rng = np.random.default_rng(self.config.seed)
        self._t_ref: float | None = None
        self._detectors: dict[str, object] = {}
        self.drift_events: dict[str, int] = {}
        #: Bumped by every change of the statistics or the arms.
        self.version = 0
        # Quality level shared by every arm (SelectiveThompson's level_horizon): the arms
        # learn quality minus it and predict it plus their own. 0 (and unmoved) in the
        # other policies; kept through serialization so restored predictions agree.
        self._level = 0.0
        # (version, (K, D) shared quality offsets): recomputed once per change, lazily.
        self._shared: tuple[int, np.ndarray] | None = None
        # (version, statistics, (K,) price correction): likewise.
        self._factor: tuple[int, ArmStatistics, np.ndarray] | None = None
        self._all_arms = np.zeros(0, dtype=np.intp)  # see _arm_range
        self._cold: tuple[int, object, np.ndarray, int] = (-1, None, _FREE, 0)
        # (statistics, (K,) quality weights when read, (K, b, b) inverses on the
        # cold-start block): see _direction_counts.
        self._block_data: tuple[object, np.ndarray, np.ndarray] | None = None
        self._plan: _FusedPlan | None = None  # see _fused_plan

    # ------------------------------------------------------------------ arms
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def arms(self) -> list[str]:
        return list(self._names)

    def add_arm(self, name: str, prior: ArmPrior | None = None, *,
                late: bool | None = None) -> None:
        """Add an arm, optionally with a prior; it is explored from the next decision.

        ``late``: whether the arm joins a policy that has started learning (a model added
        mid-stream: ``cold_start_by="added-on-tags"`` spreads its cold start over the
        tag values); None (the default): whether any arm has a quality observation.
        """
        if not isinstance(name, str) or not name:
            raise InvalidInputError("arm", "must be a non-empty string", name)
        if name in self._index:
            raise InvalidInputError("arm", "already exists; names must be unique", name)
        prior = (prior or ArmPrior()).validated()
        if (self.config.arm_prior == "hierarchy" and prior.quality is None
                and self._stats.weight[:, 0].sum() > 0):
            prior = self._learned_prior(prior)
        mu0, known = prior.head_means()
        lam = self.config.ridge * np.where(known, prior.strength, 1.0)
        self._stats.append(lam, mu0, prior_sigma(mu0, known))
        self._index[name] = len(self._names)
        self._names.append(name)
        self._priors[name] = prior
        if late if late is not None else bool(self._stats.count[:, 0].any()):
            self._late.add(name)
        self.drift_events.setdefault(name, 0)
        self._plan = None  # it holds the statistics' replaced arrays
        self.version += 1

    @property
    def late_arms(self) -> list[str]:
        """The arms added after the policy started learning (see :meth:`add_arm`)."""
        return [n for n in self._names if n in self._late]

    def set_late(self, name: str, late: bool = True) -> None:
        """Mark an arm added late or not (:meth:`add_arm`'s ``late``): for a policy
        rebuilt from sums that do not know it (the distributed deciders' snapshots)."""
        self._arm_index(name)  # an unknown arm is an error
        if late:
            self._late.add(name)
        else:
            self._late.discard(name)
        self.version += 1

    def _learned_prior(self, prior: ArmPrior) -> ArmPrior:
        """``arm_prior="hierarchy"``: the new arm's quality prior predicted from its
        price and every arm's quality so far (:mod:`bandit.hierarchy`)."""
        from bandit.hierarchy import ArmLevels, learned_prior

        costs = [np.nan if self._priors[n].cost_usd is None else self._priors[n].cost_usd
                 for n in self._names]
        return learned_prior(ArmLevels(), np.array(costs), self._stats.b_data[:, 0, -1],
                             self._stats.weight[:, 0], prior.cost_usd, self.config.ridge)

    def set_prior(self, name: str, prior: ArmPrior) -> None:
        """Replace an arm's prior (a new price, a new quality estimate) and keep its data.

        The learned sums stay; the ridge strength, prior mean and prior noise of each head
        change, so the next decision already uses the new price where data is thin.
        """
        k = self._arm_index(name)
        prior = prior.validated()
        mu0, known = prior.head_means()
        lam = self.config.ridge * np.where(known, prior.strength, 1.0)
        self._stats.set_prior(k, lam, mu0, prior_sigma(mu0, known))
        self._priors[name] = prior
        self.version += 1

    def remove_arm(self, name: str) -> None:
        """Remove an arm and its statistics; the other arms keep theirs untouched."""
        k = self._arm_index(name)
        self._stats.delete(k)
        del self._names[k]
        del self._priors[name]
        self._late.discard(name)
        self._detectors.pop(name, None)
        self.drift_events.pop(name, None)
        self._index = {n: i for i, n in enumerate(self._names)}
        # The later arms shift down one slot: the per-arm inverses cached by
        # _direction_counts (rebuilt only when K changes) would belong to other arms.
        self._block_data = None
        self._plan = None  # it holds the statistics' replaced arrays
        self.version += 1

    def _arm_index(self, name: str, field_name: str = "arm") -> int:
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise UnknownArmError(field_name, "unknown arm; allowed: "
                                  + ", ".join(self._names), name) from None

    def observations(self, name: str) -> dict[str, int]:
        """How many observations of each objective an arm has had (never decayed)."""
        k = self._arm_index(name)
        return dict(zip(OBJECTIVES, (int(c) for c in self._stats.count[k]), strict=True))

    # -------------------------------------------------------------- deciding
    def decide(self, x: object, preferences: Preferences | None = None,
               candidates: Sequence[str] | None = None, *, explore: bool = True,
               cost_estimate: Mapping[str, float] | Sequence[float] | None = None,
               ) -> Decision:
        """Choose an arm for one context.

        Parameters
        ----------
        x
            Context vector of length ``dim``.
        preferences
            The tenant's weights; default ``Preferences()`` (quality only).
        candidates
            Arm names allowed for this request; default all arms.
        explore
            False gives the greedy choice on predicted utility (propensity 1).
        cost_estimate
            The expected cost of this request on each candidate, USD, from the declared
            prices (input price x prompt tokens + output price x expected output
            tokens): a mapping arm -> USD covering the candidates, or one number per
            candidate in order (or a :class:`CostEstimate` from a :class:`PriceList`:
            prices checked once, not on every call). The predicted cost is then this
            estimate times the arm's learned correction (see ``price_strength``) and
            carries no uncertainty: no exploration is spent learning prices.
        """
        if explore and self._stats.compiled:
            rows = self._decide_fused(x, preferences, candidates, True, cost_estimate,
                                      one=True)
            if rows is not None:
                # The compiled decide's row as a Decision, as BatchDecision.decision
                # builds it, without the BatchDecision (~3 µs of a ~35 µs decide).
                names, choice, prop, explored, row = rows
                return _TableDecision(names[choice], prop, None, explored, self.name,
                                      names, row)
        if type(x) is not np.ndarray or x.ndim != 1:
            # Refused before decide_batch draws, as the compiled path refuses: a refused
            # decide leaves the random stream where it was on both paths.
            n = self._features(x).shape[0]
            if n != 1:
                raise InvalidInputError("x", "decide() takes one context; use "
                                        "decide_batch()", f"{n} rows")
        batch = self.decide_batch(x, preferences, candidates, explore=explore,
                                  cost_estimate=cost_estimate)
        return batch.decision(0, policy=self.name)

    def decide_batch(self, x: object, preferences: Preferences | None = None,
                     candidates: Sequence[str] | None = None, *, explore: bool = True,
                     propensities: bool = True,
                     cost_estimate: object = None) -> BatchDecision:
        """Choose an arm for each row of ``x`` (n, dim), independently.

        ``propensities=False`` skips computing them (NaN) where that costs extra work
        (Thompson sampling), for replays that do not need them. ``cost_estimate`` as
        for :meth:`decide`, or an (n, K) array (row per context, column per candidate).
        """
        if explore and self._stats.compiled:
            rows = self._decide_fused(x, preferences, candidates, propensities,
                                     cost_estimate)
            if rows is not None:
                names, choices, prop, means, table, explored = rows
                return BatchDecision(names, choices, prop, means, table[:, :, 3],
                                     table[:, :, 4], table[:, :, 5], explored, table)
        a = self._assess(x, preferences, candidates, explore, cost_estimate)
        n, k = a.utility.shape
        if not explore:
            choices = np.argmax(a.utility, axis=1)
            return BatchDecision(a.names, choices, np.ones(n), a.means, a.utility, a.std,
                                 a.utility, np.zeros(n, dtype=bool))
        scores = self._score(a.utility_main, a.std_main, a.ceiling)
        choices = np.argmax(scores, axis=1)
        eps, cold_share, cold_any = self.config.epsilon, a.cold_share, a.any_cold
        if n == 1 and not cold_any and eps > 0:
            # One context, no cold arm to explore: the same draws on Python floats.
            if self._rng.random() < eps:
                choices[0] = self._rng.integers(0, k)
        elif eps > 0 or cold_any:
            u = self._rng.random(n)
            uniform = u < eps
            if uniform.any():
                choices[uniform] = self._rng.integers(0, k, int(uniform.sum()))
            if cold_any:
                to_cold = ~uniform & (u < eps + (1 - eps) * cold_share)
                for row in np.flatnonzero(to_cold):
                    cold_idx = np.flatnonzero(a.cold[row])
                    choices[row] = cold_idx[self._rng.integers(0, cold_idx.size)]
        prop = (self._propensity(a, choices, scores) if propensities
                else np.full(n, np.nan))
        explored = choices != np.argmax(a.utility, axis=1)
        if a.utility_main is not a.utility:
            # Arms outside the main branch (cold, quality unknown) scored -inf there;
            # report their predicted utility instead, so every reported number is
            # finite (JSON).
            scores = np.where(np.isfinite(scores), scores, a.utility)
        return BatchDecision(a.names, choices, prop, a.means, a.utility, a.std, scores,
                             explored)

    def _fused_rule(self) -> tuple[int, float, np.ndarray, float] | None:
        """The main branch as the compiled decide computes it (``_policy_kernel.RULE_*``,
        its parameter, Thompson's quadrature nodes and pruning), or None: the numpy path. A subclass
        whose ``_score`` or ``_main_propensity`` differs from its rule's returns None."""
        return None

    def _fused_plan(self) -> _FusedPlan:
        """The current state's :class:`_FusedPlan`, built again after any change (every
        change of the statistics, the arms or their priors bumps ``version``, a merge and
        a decay included: a merge changes the statistics object in place; the statistics
        and config objects are compared too, should either be replaced). The version is
        read before the state: a change made while the plan is built (another thread)
        leaves it stamped older, so the next decide builds it again."""
        version = self.version
        plan = self._plan
        cfg, stats = self.config, self._stats
        if (plan is not None and plan.version == version and plan.stats is stats
                and plan.config is cfg):
            return plan
        rule = self._fused_rule()
        if (cfg.shared_ridge is not None or cfg.exploration == "mean" or self._shifting
                or not self._names):
            rule = None
        cold, n_cold = self._cold_arms()
        block = self._cold_block()
        by_direction = block is not None and not (cfg.cold_start_by == "added-on-tags"
                                                  and not self._late)
        plan = self._plan = _FusedPlan(
            version, stats, cfg, rule, list(self._names), self._arm_range(), cold,
            n_cold, by_direction, stats.width_inverses() if rule is not None else (),
            stats.selecting, ALL_GROUPED if stats._all_grouped() else stats.group,
            stats.own_inverses() if rule is not None else stats.a_inv)
        return plan

    def _decide_fused(self, x: object, preferences: Preferences | None,
                      candidates: Sequence[str] | None, propensities: bool,
                      cost_estimate: object, one: bool = False,
                      ) -> (tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                  np.ndarray, np.ndarray]
                            | tuple[list[str], int, float, bool, np.ndarray] | None):
        """:meth:`decide_batch` with exploration in one compiled call
        (``_policy_kernel.decide_rows``): the candidates' names, choices, propensities,
        means (n, m, 3), the table (n, m, 6) and whether each row explored; or None
        when the case is not the kernel's (then nothing was drawn from the random
        stream): a rule the policy has
        (:meth:`_fused_rule`), no shared
        component, no per-context quality shift (the kernel adds the scalar level only),
        ``exploration="context"``, at most ``FUSED_BATCH`` contexts, and no cold
        candidate among warm ones (the cold-start share). The same validation, draws
        and results as the numpy path.

        ``one``: :meth:`decide`'s call, one context (else an error before any draw),
        with propensity: ``(names, choice, propensity, explored, table row (m, 6))``
        from ``_policy_kernel.decide_one`` (Python scalars), the names the plan's own
        list (the caller does not hand it out)."""
        plan = self._fused_plan()
        if plan.rule is None or (type(x) is np.ndarray and x.ndim == 2
                                 and x.shape[0] > FUSED_BATCH and not one):
            return None
        xb = self._features(x)
        n = xb.shape[0]
        if one and n != 1:
            raise InvalidInputError("x", "decide() takes one context; use decide_batch()",
                                    f"{n} rows")
        if n > FUSED_BATCH:
            return None  # a batch: the stacked path (one GEMM, float32 widths) is faster
        w = (preferences or _DEFAULT_PREFERENCES)._weights()
        cfg, stats = self.config, self._stats
        if candidates is None:
            names, arms, n_cold = plan.names, plan.arms, plan.n_cold
            if not one:
                names = list(names)
        else:
            names = check_names(candidates, self._names, index=self._index)
            if len(names) == len(self._names) and names == self._names:
                arms, n_cold = plan.arms, plan.n_cold
            else:
                arms = np.fromiter((self._index[n] for n in names), dtype=np.intp,
                                   count=len(names))
                n_cold = int(np.count_nonzero(plan.cold[arms])) if plan.n_cold else 0
        m = len(names)
        if 0 < n_cold < m or (plan.by_direction and self._cold_by_direction(
                xb, arms, plan.cold) is not None):
            return None
        estimate, factor = _NO_ROWS, _NO_FACTOR
        if cost_estimate is not None:
            estimate = _cost_estimates(cost_estimate, names, n)
            factor = self._cost_factor()
        kind, param, quantiles, prune = plan.rule
        # The draws of the numpy path, in its order: Thompson's noise, then epsilon's.
        if kind != _kernel.RULE_THOMPSON:
            noise = _NO_ROWS
        elif n == 1:
            # Into this thread's buffer: the same draws as into a new array, without
            # the allocation (0.79 -> 0.61 µs, the buffer's lookup ~0.05; the kernel
            # reads it and keeps none). Nothing between this draw and the kernel may run
            # caller code (another decide on this thread would overwrite the buffer):
            # keep the cost estimate and cost factor before it.
            noise = self._rng.standard_normal(out=_noise_row(m))
        else:
            noise = self._rng.standard_normal((n, m))
        eps = cfg.epsilon
        if n == 1:
            pick = (int(self._rng.integers(0, m)) if eps > 0 and self._rng.random() < eps
                    else -1)
            forced = _FREE if pick < 0 or one else np.array([pick], dtype=np.intp)
        else:
            forced = np.full(n, -1, dtype=np.intp)
        if eps > 0 and n > 1:
            uniform = self._rng.random(n) < eps
            if uniform.any():
                forced[uniform] = self._rng.integers(0, m, int(uniform.sum()))
        inv, q_inv, q_sel, sel, same = plan.inverses
        if one:
            # Its outputs allocated in the kernel (new on every call, as below).
            if not plan.group.shape[0]:  # ALL_GROUPED (or a copy of it: deepcopy)
                choice, prop, explored, row = _kernel.decide_one(
                    stats.theta, xb, w, stats.sigma2, inv, q_inv, q_sel, plan.selecting,
                    sel, same, arms, self._level, estimate, factor, cfg.bounded_optimism,
                    kind, param, noise, pick, eps, quantiles, prune)
            else:
                choice, prop, explored, row = _kernel.decide_one_split(
                    stats.theta, xb, w, stats.sigma2, inv, q_inv, q_sel, plan.selecting,
                    sel, same, plan.group, plan.own_inverses, arms, self._level, estimate,
                    factor, cfg.bounded_optimism, kind, param, noise, pick, eps, quantiles,
                    prune)
            return names, choice, prop, explored, row
        # New outputs on every call, even those decide() reads at once: buffers kept in
        # the plan would be shared by concurrent decides (the kernel releases the GIL).
        means, table = np.empty((n, m, 3)), np.empty((n, m, 6))
        choices, prop = np.empty(n, dtype=np.intp), np.empty(n)
        explored = np.empty(n, dtype=bool)
        _kernel.decide_rows(stats.theta, xb, w, stats.sigma2, inv, q_inv, q_sel,
                            plan.selecting, sel, same, plan.group, plan.own_inverses, arms,
                            self._level, estimate, factor, cfg.bounded_optimism, kind,
                            param, noise, forced, eps, quantiles, prune, propensities,
                            _kernel.PHI_TABLE, means, table, choices, prop, explored)
        return names, choices, prop, means, table, explored

    def _cold_arms(self) -> tuple[np.ndarray, int]:
        """Which arms (K,) have fewer than ``cold_start_pulls`` quality observations, and
        how many, kept until the next change."""
        version, stats = self.version, self._stats  # the version first (_fused_plan)
        cached = self._cold
        if cached[0] != version or cached[1] is not stats:
            cold = stats.count[:, 0] < self.config.cold_start_pulls
            cached = self._cold = (version, stats, cold, int(np.count_nonzero(cold)))
        return cached[2], cached[3]

    def _cold_block(self) -> slice | None:
        """The context coordinates ``cold_start_by`` counts along, or None (the total)."""
        by, dim = self.config.cold_start_by, self.config.dim
        if by in ("tags", "new-on-tags", "added-on-tags") and self.config.tag_dims:
            return slice(dim - self.config.tag_dims, dim)
        return slice(0, dim) if by == "context" else None

    def _direction_counts(self, xb: np.ndarray, arms: np.ndarray | slice,
                          block: slice) -> np.ndarray:
        """(n, k) each arm's quality observations along each context's ``block``, t:
        1 / u^T (A + r I)^-1 u - r with u = t / |t|, A the arm's data matrix on the
        block and r = ``ridge`` (n for n observations of t alone; what it shares with
        other observed directions does not count); +inf where the block is zero."""
        stats = self._stats
        weight = stats.weight[:, 0]
        cached = self._block_data
        if cached is None or cached[0] is not stats or cached[1].shape != weight.shape:
            cached = self._block_data = (stats, np.full(weight.shape, np.nan),
                                         np.empty((weight.shape[0],) + (block.stop
                                                  - block.start,) * 2))
        # An arm's data matrix changes with its quality weight (an outcome, forgetting,
        # a merge): only those arms' inverses are taken again.
        changed = np.flatnonzero(weight != cached[1])
        if changed.size:
            group = stats.group[changed, 0]
            data = np.where(group[:, None, None], stats.s_data[changed, block, block],
                            stats.a_data[changed, 0, block, block])
            r = self.config.ridge
            cached[2][changed] = np.linalg.inv(data + r * np.eye(data.shape[1]))
            cached[1][changed] = weight[changed]
        t = xb[:, block]
        inv = cached[2] if isinstance(arms, slice) else cached[2][arms]
        width = ((t @ inv) * t).sum(axis=2).T  # (n, k): u^T (A + r I)^-1 u |t|^2
        norm2 = (t * t).sum(axis=1)[:, None]
        counts = norm2 / np.maximum(width, 1e-300) - self.config.ridge
        counts[norm2[:, 0] == 0] = np.inf
        return counts

    def _cold_by_direction(self, xb: np.ndarray, arms: np.ndarray | slice,
                           cold_arm: np.ndarray) -> np.ndarray | None:
        """(n, k) arms cold for each context (``cold_start_by``): cold in total
        (``cold_arm``, (K,)), or with fewer than ``cold_start_pulls`` observations
        along its block while another candidate has that many there; rows with
        none such are all False. None when no row has one (every untagged context)."""
        block = self._cold_block()
        added = self.config.cold_start_by == "added-on-tags"
        if block is None or (added and not self._late) or not xb[:, block].any():
            return None  # (no late arm: exactly as "arm")
        # (less a rounding margin: 10 observations of t count 10 +- 1e-15)
        counts = self._direction_counts(xb, arms, block)
        short = counts < self.config.cold_start_pulls - 1e-6
        if self.config.cold_start_by == "new-on-tags":
            # Only an arm newer than the tag: fewer observations in total than another
            # candidate has along the request's tags.
            seen = np.where(np.isfinite(counts), counts, 0.0).max(axis=1)
            short &= self._stats.weight[arms, 0][None, :] < seen[:, None]
        elif added:
            # As "tags" for the late arms: short only where another candidate is warm
            # along the tags (a tag value nobody has been called on is no one's cold start).
            late = np.fromiter((n in self._late for n in self._names), dtype=bool,
                               count=len(self._names))
            short &= late[arms][None, :] & ~short.all(axis=1, keepdims=True)
        short |= cold_arm[arms]
        n_short = short.sum(axis=1)
        short &= ((n_short > 0) & (n_short < short.shape[1]))[:, None]
        return short if short.any() else None

    def _arm_range(self) -> np.ndarray:
        """0..K-1 (intp), kept while the arms stay."""
        cached = self._all_arms
        if cached.shape[0] != len(self._names):
            cached = self._all_arms = np.arange(len(self._names), dtype=np.intp)
        return cached

    def probabilities(self, x: object, preferences: Preferences | None = None,
                      candidates: Sequence[str] | None = None, *,
                      cost_estimate: object = None) -> tuple[list[str], np.ndarray]:
        """The probability of every candidate for each context, (names, (n, K) array).

        The full distribution :meth:`decide_batch` draws from, in the policy's current
        state: what off-policy evaluation of this policy needs.
        """
        names, probs, _ = self._distribution(x, preferences, candidates, cost_estimate)
        return names, probs

    def _distribution(self, x: object, preferences: Preferences | None,
                      candidates: Sequence[str] | None, cost_estimate: object = None,
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names, the (n, K) choice distribution and the predicted utility, from one
        prediction (off-policy evaluation needs both)."""
        a = self._assess(x, preferences, candidates, True, cost_estimate)
        n, k = a.utility.shape
        probs = np.empty((n, k))
        for j in range(k):
            probs[:, j] = self._propensity(a, np.full(n, j, dtype=np.intp))
        return a.names, probs, a.utility

    def _assess(self, x: object, preferences: Preferences | None,
                candidates: Sequence[str] | None, explore: bool,
                cost_estimate: object = None) -> _Assessment:
        """Validate the inputs and predict; what every way of deciding starts from."""
        xb = self._features(x)
        prefs = (preferences or Preferences()).validated()
        w = prefs.head_weights()
        names = check_names(candidates, self._names, index=self._index)
        every_arm = len(names) == len(self._names) and names == self._names
        # Every arm (the usual case) selects with a slice: views, no index array.
        idx: slice | np.ndarray = slice(None) if every_arm else np.fromiter(
            (self._index[n] for n in names), dtype=np.intp, count=len(names))
        estimate = (None if cost_estimate is None
                    else _cost_estimates(cost_estimate, names, xb.shape[0]))
        c = (w * w) * self._stats.sigma2 if explore else None
        if c is not None and estimate is not None:
            c[:, 1] = 0.0  # the price is known: its correction earns no exploration
        mean_only = c is not None and self.config.exploration == "mean"
        means, utility, std = self._stats.predict(xb, None if every_arm else idx,
                                                  None if mean_only else c, w)
        if self._level or self._shifting:
            shift = self._quality_shift(xb)  # (n,): the part of quality every arm shares
            means[:, :, 0] += shift[:, None]
            utility = utility + w[0] * shift[:, None]
        if mean_only:
            assert c is not None
            # The uncertainty of each arm's mean utility alone, sigma_h^2 / (n_h +
            # lambda_h) per head: exploration finds the best model, whatever the context.
            var = (c / (self._stats.weight + self._stats.lam)).sum(axis=1)[idx]
            std = np.broadcast_to(np.sqrt(var), utility.shape).copy()
        if self.config.shared_ridge is not None:
            if self._shared is None or self._shared[0] != self.version:
                self._shared = (self.version,
                                self._stats.shared_offsets(self.config.shared_ridge))
            means[:, :, 0] += xb @ self._shared[1][idx].T
            if estimate is None:
                utility = means @ w
        if estimate is not None:
            factor = self._cost_factor()[idx]
            means[:, :, 1] = estimate * factor
            utility = means @ w
        n, k = utility.shape
        # Perfect quality at the predicted cost and latency: the most an arm can earn.
        ceiling = quality_ceiling(utility, means, float(w[0]))
        cold_arm = self._stats.count[idx, 0] < self.config.cold_start_pulls
        n_cold = int(np.count_nonzero(cold_arm))
        cold = np.zeros((n, k), dtype=bool)
        cold_share = np.zeros(n)
        any_cold = False
        utility_main, std_main = utility, std
        by_direction = (self._cold_by_direction(xb, idx, self._cold_arms()[0])
                        if explore and self.config.cold_start_by != "arm" else None)
        if explore and (0 < n_cold < k or by_direction is not None):
            if 0 < n_cold < k:
                cold[:] = cold_arm
            if by_direction is not None:
                # Rows with an arm cold along the request's tags (cold_start_by) use
                # their own mask: that arm's cold start is spread over the tag values.
                rows = by_direction.any(axis=1)
                cold[rows] = by_direction[rows]
            if self.config.bounded_optimism:
                best_warm = np.where(cold, -np.inf, utility).max(axis=1)
                cold &= ceiling >= best_warm[:, None]
            cold_share = np.where(cold.any(axis=1), self.config.cold_start_share, 0.0)
            any_cold = bool(cold_share.any())
        if explore and 0 < n_cold < k:
            if self.config.shared_ridge is None:
                # While warm arms exist, cold ones get no bonus in the main branch: their
                # exploration is the bounded cold-start share, not an unbounded optimism
                # bonus. A cold arm with a declared quality prior competes on its prior
                # mean; one without (quality unknown) is only reached by the cold share.
                std_main = np.where(cold_arm, 0.0, std)
                declared = np.fromiter((self._priors[n].quality is not None
                                        for n in names), dtype=bool, count=k)
                utility_main = np.where(cold_arm & ~declared, -np.inf, utility)
            # With a shared component a cold arm is predicted by it (a mean and its
            # uncertainty, like any arm) and competes in the main branch, its optimism
            # capped by the quality ceiling; the cold share comes on top. (Shutting
            # cold arms out hands the main branch to the first arm that warms up, good
            # or bad, for the ~cold_start_pulls x K / cold_start_share decisions the
            # others need to warm up: on the llmrouter replay, a 0.2-quality model
            # took 40% of the first 1,000 rows.)
        if not self.config.bounded_optimism:
            ceiling = np.full_like(utility, np.inf)
        return _Assessment(names, means, utility, std, utility_main, std_main, cold,
                           cold_share, any_cold, ceiling)

    def _propensity(self, a: _Assessment, choices: np.ndarray,
                    scores: np.ndarray | None = None) -> np.ndarray:
        """Probability of ``choices`` (n,) under the epsilon / cold-start / main mixture.
        ``scores``: the main branch's scores that chose them, if the caller has them."""
        k = a.utility.shape[1]
        eps = self.config.epsilon
        p_main = self._main_propensity(a.utility_main, a.std_main, choices, a.ceiling,
                                       scores)
        if not a.any_cold:  # no cold-start share: the main branch and epsilon
            return eps / k + (1 - eps) * p_main
        rows = np.arange(len(choices))
        n_cold = np.maximum(a.cold.sum(axis=1), 1)
        p_cold = np.where(a.cold[rows, choices], a.cold_share / n_cold, 0.0)
        return eps / k + (1 - eps) * (p_cold + (1 - a.cold_share) * p_main)

    def predict(self, x: object, preferences: Preferences | None = None,
                candidates: Sequence[str] | None = None) -> dict[str, Prediction]:
        """Predicted outcome of every candidate for one context, without choosing."""
        batch = self.decide_batch(x, preferences, candidates, explore=False)
        return batch.decision(0).predictions

    def _cost_factor(self) -> np.ndarray:
        """(K,) correction of the price estimates learned from feedback, once per change."""
        cached = self._factor
        if cached is None or cached[0] != self.version or cached[1] is not self._stats:
            cached = self._factor = (self.version, self._stats,
                                     self._stats.cost_factor(self.config.price_strength))
        return cached[2]

    def _features(self, x: object) -> np.ndarray:
        """The validated context(s) with the bias feature appended, (n, D)."""
        dim = self.config.dim
        if type(x) is np.ndarray and x.dtype == _F64:
            # The hot path (one context, or a batch): one copy into the bias-extended
            # rows and one bound check (NaN and infinities fail it too), in one compiled
            # call; anything off takes the full validation, which says what is wrong.
            if x.shape == (dim,):
                xb = np.empty((1, dim + 1))
                if copy_bounded_row(x, xb, MAX_ABS_CONTEXT):
                    return xb
            elif x.ndim == 2 and x.shape[0] > 0 and x.shape[1] == dim:
                xb = np.empty((x.shape[0], dim + 1))
                if copy_bounded(x, xb, MAX_ABS_CONTEXT):
                    return xb
        arr = as_context_matrix(x, self.config.dim)
        return np.concatenate([arr, np.ones((arr.shape[0], 1))], axis=1)

    @abc.abstractmethod
    def _score(self, utility: np.ndarray, std: np.ndarray,
               ceiling: np.ndarray) -> np.ndarray:
        """Scores (n,K) the main branch maximizes, from predicted utility, its std and
        the ceiling no optimism may exceed (+inf without ``bounded_optimism``)."""

    @abc.abstractmethod
    def _main_propensity(self, utility: np.ndarray, std: np.ndarray,
                         choices: np.ndarray, ceiling: np.ndarray,
                         scores: np.ndarray | None = None) -> np.ndarray:
        """Probability (n,) that the main branch picks ``choices``; ``scores`` are the
        scores that picked them (:meth:`_score` of the same inputs), when known."""

    # -------------------------------------------------------------- learning
    def update(self, arm: str, x: object, outcome: Mapping[str, object], *,
               now: float | None = None, time: float | None = None,
               cost_estimate: float | None = None) -> None:
        """Learn from the outcome of ``arm`` on context ``x``.

        ``outcome`` maps objectives to values: ``quality`` in [0, 1], ``cost`` /
        ``cost_usd`` in USD, ``latency`` / ``latency_ms`` in ms; any subset.
        ``now`` (seconds, any fixed origin) drives forgetting; default the wall clock.

        ``cost_estimate`` (USD) is the price estimate the decision used for this arm;
        with a ``cost_usd`` outcome it teaches the arm's price correction (not an
        estimate below :data:`MIN_PRICE_ESTIMATE_USD`: a free model's, no ratio).

        ``time`` (seconds; instead of ``now``) is the outcome's event time, as one row
        of :meth:`update_batch`'s ``times``: with forgetting, the outcome weighs
        ``0.5 ** ((t_ref - time) / half_life)``, its own age at the reference time, so
        late outcomes count as old and the sums do not depend on arrival order. Same
        statistics as ``update_batch([arm], [x], [outcome], times=[time])`` (to
        rounding), at the cost of a rank-one update instead of an exact refresh.

        >>> from bandit import LinUCB
        >>> p = LinUCB(1, half_life_hours=1.0, decay_interval_s=0.0, drift_delta=None)
        >>> p.add_arm("a")
        >>> p.update("a", [1.0], {"quality": 1.0}, time=7200.0)
        >>> p.update("a", [1.0], {"quality": 1.0}, time=0.0)  # late: two half-lives old
        >>> float(p._stats.weight[0, 0])
        1.25
        """
        k = self._arm_index(arm)
        xb = self._features(x)
        if xb.shape[0] != 1:
            raise InvalidInputError("x", "update() takes one context; use update_batch()",
                                    f"{xb.shape[0]} rows")
        y = parse_outcome(outcome)
        # Validated before anything learns or decays: a refused update teaches nothing.
        ratio = None if cost_estimate is None else _price_ratio(cost_estimate, float(y[1]))
        weight = 1.0
        if time is not None:
            if now is not None:
                raise InvalidInputError("now", "must be None when time is given")
            t = check_finite_number("time", time)
            weight = float(self._age_weights(t, t))
        else:
            self._maybe_decay(now)
        if self._level or self._shifting:
            y = self._arm_targets([arm], xb, y[None], weight)[0]
        try:
            residual = self._stats.update(k, xb[0], y, weight)
            if ratio is not None and ratio == ratio:  # not NaN
                self._stats.add_price_ratios(k, ratio, weight)
            if residual is not None:
                self._watch_drift(arm, [residual])
        finally:
            # Even after an error: the statistics may have changed (a head group split),
            # and the compiled decide's plan must be built again.
            self.version += 1

    def update_batch(self, arms: Sequence[str], x: object,
                     outcomes: Sequence[Mapping[str, object]] | np.ndarray, *,
                     now: float | None = None, weight: float = 1.0,
                     watch_drift: bool = True, times: object = None,
                     cost_estimates: object = None) -> None:
        """Learn from many outcomes at once (one exact refresh per arm touched).

        ``outcomes`` is a list of mappings as for :meth:`update`, or an (n, 3) array of
        (quality, cost_usd, latency_ms) with NaN for missing values (faster).

        ``weight`` in (0, 1] makes each outcome count as that many observations
        (discounted prior data, e.g. a warm start from a benchmark).

        ``watch_drift=False`` keeps the batch away from the drift detector: prior data
        (a warm start) is not a stream in time. Its residuals, all against the heads
        before the batch, would shift wherever the log's mix of tasks does, and a
        detection would discard most of the data just learned.

        ``times`` (seconds, one per outcome; with forgetting only, instead of ``now``)
        are the outcomes' event times: the statistics move to the latest of them (as
        :meth:`update` does with ``now``) and each outcome is weighted by
        ``0.5 ** ((t_ref - t) / half_life)``, its own age at the reference time. The sums
        are then the exponentially weighted sums of the events whatever order and
        batches they come in, so sums kept apart (partitions) add up exactly
        (:meth:`merge`, :meth:`decay`).

        ``cost_estimates`` (USD, one per outcome, NaN = none): the price estimates the
        decisions used, as ``cost_estimate`` of :meth:`update`.

        >>> from bandit import LinUCB
        >>> p = LinUCB(1, half_life_hours=1.0, decay_interval_s=0.0, drift_delta=None)
        >>> p.add_arm("a")
        >>> p.update_batch(["a"], [[1.0]], [{"quality": 1.0}], times=[7200.0])
        >>> p.update_batch(["a"], [[1.0]], [{"quality": 1.0}], times=[0.0])  # late
        >>> float(p._stats.weight[0, 0])  # 1 + 0.5 ** 2
        1.25
        """
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                0 < weight <= 1):
            raise InvalidInputError("weight", "must be a number in (0, 1]", weight)
        xb = self._features(x)
        if len(arms) != xb.shape[0] or len(outcomes) != xb.shape[0]:
            raise InvalidInputError("arms", "arms, x and outcomes must have the same length",
                                    f"{len(arms)}, {xb.shape[0]}, {len(outcomes)}")
        ks = np.array([self._arm_index(a) for a in arms], dtype=np.intp)
        y = (parse_outcome_array(outcomes) if isinstance(outcomes, np.ndarray)
             else np.stack([parse_outcome(o) for o in outcomes]))
        # Validated before anything learns or decays: a refused update teaches nothing
        # (the targets shift quality only, not cost).
        ratios = None if cost_estimates is None else _price_ratios(cost_estimates, y[:, 1])
        weights: float | np.ndarray = float(weight)
        if times is not None:
            if now is not None:
                raise InvalidInputError("now", "must be None when times are given")
            t = np.asarray(times, dtype=np.float64).reshape(-1)
            if t.shape != (xb.shape[0],) or not np.isfinite(t).all():
                raise InvalidInputError("times", "must be one finite time (seconds) per "
                                        "outcome", f"shape {t.shape}")
            if len(t):
                weights = float(weight) * self._age_weights(float(t.max()), t)
        else:
            self._maybe_decay(now)
        if self._level or self._shifting:
            y = self._arm_targets(arms, xb, y, weights)
        try:
            for k in np.unique(ks):
                rows = ks == k
                name = self._names[k]
                q = ~np.isnan(y[rows, 0])
                residuals = (y[rows, 0] - xb[rows] @ self._stats.theta[k, 0])[q]
                w_rows = weights if np.ndim(weights) == 0 else weights[rows]
                self._stats.update_many(int(k), xb[rows], y[rows], w_rows)
                if ratios is not None:
                    known = ~np.isnan(ratios[rows])
                    if known.any():
                        self._stats.add_price_ratios(
                            int(k), ratios[rows][known],
                            w_rows if np.ndim(w_rows) == 0 else w_rows[known])
                if watch_drift:
                    self._watch_drift(name, residuals.tolist())
        finally:
            self.version += 1  # as in update(): the plan follows whatever changed

    # Quality shared by every arm (SelectiveThompson): the arms learn quality minus it.
    _shifting = False

    def _quality_shift(self, xb: np.ndarray) -> np.ndarray:
        """The quality (n,) every arm shares at contexts ``xb`` (n, D), added to each
        arm's prediction: the level (0 unless SelectiveThompson's level_horizon)."""
        return np.full(xb.shape[0], self._level)

    def _arm_targets(self, arms: Sequence[str], xb: np.ndarray, y: np.ndarray,
                     weights: float | np.ndarray) -> np.ndarray:
        """What the arms learn from outcomes y (n, H): quality minus the shared part
        (a copy; a subclass that learns the shared part from them does it here)."""
        y = y.copy()
        y[:, 0] -= self._quality_shift(xb)
        return y

    def _watch_drift(self, arm: str, residuals: Sequence[float]) -> None:
        if self.config.drift_delta is None:
            return
        detector = self._detectors.get(arm)
        if detector is None:
            from river.drift import ADWIN  # imported lazily: river is slow to import

            detector = self._detectors[arm] = ADWIN(delta=self.config.drift_delta)
        drifted = False
        for r in residuals:
            detector.update(r)
            drifted = drifted or detector.drift_detected
        if drifted:
            # Keep at most as much old evidence as ADWIN's post-change window holds (and
            # never more than drift_keep of it): the old level must not outvote the new.
            k = self._index[arm]
            weight = max(float(self._stats.weight[k, 0]), 1.0)
            factor = min(self.config.drift_keep, float(detector.width) / weight)
            self._stats.scale(factor, [k])
            self.drift_events[arm] = self.drift_events.get(arm, 0) + 1

    def _maybe_decay(self, now: float | None) -> None:
        half_life = self.config.half_life_hours
        if half_life is None:
            return
        now = time.time() if now is None else float(now)
        if self._t_ref is None:
            self._t_ref = now
            return
        elapsed = now - self._t_ref
        # Out-of-order timestamps (late feedback) never un-decay the statistics.
        if elapsed >= max(self.config.decay_interval_s, 1e-12):
            self._stats.scale(0.5 ** (elapsed / 3600.0 / half_life))
            self._t_ref = now
            self.version += 1  # the plan's inverses and the price factor are stale

    def _age_weights(self, latest: float, times: float | np.ndarray) -> float | np.ndarray:
        """Move the reference time to the ``latest`` event time (as :meth:`update` does
        with ``now``) and return each event's weight, ``0.5 ** ((t_ref - t) / half_life)``:
        its own age at the reference time, not the gap to the previous event, so exact
        and order-free. Events newer than the reference (within ``decay_interval_s``)
        weigh slightly more than 1; events far older underflow to 0. Without forgetting
        every event weighs 1."""
        hl = self.config.half_life_hours
        if hl is None:
            return 1.0
        self._maybe_decay(latest)
        assert self._t_ref is not None
        return 0.5 ** ((self._t_ref - times) / 3600.0 / hl)

    def decay(self, now: float) -> None:
        """Discount the data sums (never the prior) to reference time ``now`` exactly.

        For statistics that receive no updates but must keep forgetting (the deciders'
        snapshot of the learners' sums). Without forgetting, with no reference time yet,
        or with ``now`` not after it (never un-decay), nothing changes.

        >>> from bandit import LinUCB
        >>> p = LinUCB(1, half_life_hours=1.0, drift_delta=None)
        >>> p.add_arm("a")
        >>> p.update_batch(["a"], [[1.0]], [{"quality": 1.0}], times=[0.0])
        >>> p.decay(7200.0)
        >>> float(p._stats.weight[0, 0]), p.reference_time
        (0.25, 7200.0)
        """
        check_finite_number("now", now)
        hl = self.config.half_life_hours
        if hl is None or self._t_ref is None or now <= self._t_ref:
            return
        self._stats.scale(0.5 ** ((now - self._t_ref) / 3600.0 / hl))
        self._t_ref = float(now)
        self.version += 1

    @property
    def reference_time(self) -> float | None:
        """The time the data sums are discounted to (None: no forgetting or no data)."""
        return self._t_ref

    # ------------------------------------------------------------- replicas
    def merge(self, other: Policy) -> Policy:
        """Add ``other``'s statistics to this policy's (in place) and return self.

        Both must be the same policy class with the same dimension. Arms only ``other``
        knows are copied with their prior. An arm added late (:meth:`add_arm`) in
        either is late in the result. With forgetting, the older statistics are
        decayed to the newer reference time first, so the sums stay comparable.
        """
        if type(other) is not type(self):
            raise InvalidInputError("other", f"must be a {type(self).__name__}",
                                    type(other).__name__)
        if other.dim != self.dim:
            raise InvalidInputError("other.dim", f"must be {self.dim}", other.dim)
        hl = self.config.half_life_hours
        theirs = other._stats
        factor_other = 1.0
        if hl is not None and self._t_ref is not None and other._t_ref is not None:
            t = max(self._t_ref, other._t_ref)
            if t > self._t_ref:
                self._stats.scale(0.5 ** ((t - self._t_ref) / 3600.0 / hl))
            factor_other = 0.5 ** ((t - other._t_ref) / 3600.0 / hl)
            self._t_ref = t
        elif self._t_ref is None:
            self._t_ref = other._t_ref
        if self._level != other._level:
            # The sums were learned against different levels: their quality-weighted mean.
            mine, theirs_w = float(self._stats.weight[:, 0].sum()), float(
                factor_other * theirs.weight[:, 0].sum())
            total = mine + theirs_w
            if total > 0:
                self._level = (mine * self._level + theirs_w * other._level) / total
        for j, name in enumerate(other._names):
            if name not in self._index:
                row = theirs.take(j)
                for key in ArmStatistics.DATA:
                    row[key] = row[key] * factor_other
                self._stats.put(row)
                self._index[name] = len(self._names)
                self._names.append(name)
                self._priors[name] = other._priors[name]
                self.drift_events.setdefault(name, 0)
                self._plan = None  # it holds the statistics' replaced arrays
            else:
                self._stats.add(self._index[name], theirs, j, factor_other)
        # Late in either replica is late: a model added mid-stream on one of them.
        self._late |= other._late & set(self._index)
        self._stats.refresh()
        self.version += 1
        return self

    def _extra_state(self) -> dict | None:
        """JSON state a subclass keeps beside the arms' sums (None: none)."""
        return None

    def _load_extra_state(self, state: dict | None) -> None:
        """Restore :meth:`_extra_state` (None: a policy saved without it)."""
        del state  # the base policy keeps no such state

    def clone(self) -> Policy:
        """A fresh policy with the same configuration and arms (priors, added late or
        not), and no data."""
        fresh = type(self)(**{k: v for k, v in asdict(self.config).items()})
        for name in self._names:
            fresh.add_arm(name, self._priors[name], late=name in self._late)
        return fresh

    # --------------------------------------------------------- serialization
    def to_bytes(self, *, derived: bool = True) -> bytes:
        """Serialize configuration, arms, statistics and RNG state (no pickle).

        ``derived=False`` leaves out what :meth:`from_bytes` can recompute exactly from
        the sums (inverses, coefficients, noise): about half the size, for statistics
        written often (the distributed learners). Drift detectors are not serialized:
        after a restore they start watching afresh. Statistics that keep their sums only
        (``sums_only``: their derived arrays are stale) are always written without them.
        """
        derived = derived and not self._stats.sums_only
        header = {
            "format": _FORMAT,
            "policy": self.name,
            "config": asdict(self.config),
            "arms": self._names,
            "priors": [list(self._priors[n]) for n in self._names],
            "t_ref": self._t_ref,
            "rng": self._rng.bit_generator.state,
            "version": self.version,
            "drift_events": self.drift_events,
            "derived": derived,
            "level": self._level,
            "late": self.late_arms,
        }
        extra = self._extra_state()
        if extra is not None:
            header["extra"] = extra
        raw_header = json.dumps(header).encode()
        names = ArmStatistics.ARRAYS if derived else ArmStatistics.SUMS
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(self._stats, name) for name in names})
        return _MAGIC + len(raw_header).to_bytes(4, "big") + raw_header + buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, as_class: type[Policy] | None = None,
                   **config: object) -> Policy:
        """Restore a policy serialized by :meth:`to_bytes` (any registered class).

        ``as_class`` restores the statistics into another policy class (LinUCB sums as a
        LinearThompson: they are the same sums); ``config`` overrides settings of the
        restored policy (``epsilon=0.05``); ``dim`` cannot change. An arm's price-ratio
        sums that are not finite (learned before :data:`MIN_PRICE_ESTIMATE_USD`) are
        dropped: its cost correction starts again from its declared price.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:6]) != _MAGIC:
            raise InvalidInputError("data", "is not a serialized policy (bad magic)")
        data = bytes(data)
        size = int.from_bytes(data[6:10], "big")
        header = json.loads(data[10:10 + size])
        if header.get("format") not in (1, _FORMAT):
            raise InvalidInputError("data", f"has format {header.get('format')!r}; this "
                                    f"version reads formats 1 and {_FORMAT}")
        policy_cls = Policy._registry.get(header["policy"])
        if policy_cls is None or (as_class is None and cls is not Policy
                                  and policy_cls is not cls):
            raise InvalidInputError("data", "holds policy " + repr(header["policy"])
                                    + "; allowed: " + ", ".join(Policy._registry))
        target = as_class or policy_cls
        if config.get("dim", header["config"]["dim"]) != header["config"]["dim"]:
            raise InvalidInputError("dim", f"must stay {header['config']['dim']}",
                                    config["dim"])
        fields = {f.name for f in dataclass_fields(target.Config)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise InvalidInputError(unknown[0], "is not a setting of " + target.__name__
                                    + "; allowed: " + ", ".join(sorted(fields)))
        settings = {k: v for k, v in header["config"].items() if k in fields}
        settings.update(config)
        policy = target(**settings)
        arrays = np.load(io.BytesIO(data[10 + size:]), allow_pickle=False)
        for name in arrays.files:
            setattr(policy._stats, name, arrays[name].copy())
        if "price_ratio" not in arrays.files:
            # Format 1 predates price corrections: no ratio was ever observed.
            policy._stats.price_ratio = np.zeros((len(header["arms"]), 2))
        ratios = policy._stats.price_ratio
        # An inf (or NaN) sum, learned before MIN_PRICE_ESTIMATE_USD from a denormal
        # estimate, is dropped: that arm's correction starts again from its price.
        ratios[~np.isfinite(ratios).all(axis=1)] = 0.0
        policy._names = list(header["arms"])
        policy._index = {n: i for i, n in enumerate(policy._names)}
        policy._priors = {n: ArmPrior(*p) for n, p in zip(policy._names, header["priors"],
                                                            strict=True)}
        stats = policy._stats
        before = header["config"].get("context_ridges")
        other_candidates = "context_ridges" in config and (
            tuple(config["context_ridges"] or ()) != tuple(before or ()))
        if other_candidates or stats.sel_err.shape != (len(policy._names),
                                                       stats.sel_diag.shape[0]):
            # Written without model selection, or with other candidates: the errors
            # start afresh (the sums, all that was learned, stay) and the candidates'
            # inverses are computed from the sums.
            stats.sel_err = np.zeros((len(policy._names), stats.sel_diag.shape[0]))
            stats.fill_derived()
        elif not header.get("derived", True):
            policy._stats.fill_derived()
        elif header["format"] == 1:
            # Format 1's stored inverses used one ridge for every coefficient; this
            # version's context_ridge may differ: recompute them from the sums.
            policy._stats.refresh()
        policy._t_ref = header["t_ref"]
        if target is policy_cls and "seed" not in config:
            policy._rng.bit_generator.state = header["rng"]
        policy.version = header["version"]
        policy.drift_events = dict(header["drift_events"])
        policy._level = float(header.get("level", 0.0))
        # Saved before the flag existed: every arm as if there from the start.
        policy._late = set(header.get("late", ())) & set(policy._index)
        policy._load_extra_state(header.get("extra"))
        return policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, arms={self._names})"
