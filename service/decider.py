"""The decider: context, candidates, the policy's choice, the budget reservation, and
the decision row queued for the writer. Never touches the database.

The path of one decide, top to bottom: :meth:`Decider.context_from` (the caller's
embedding, or the featurized text), then :meth:`Decider.decide_many` (every decide of an
event-loop iteration at once, :mod:`service.batching`): preferences paced by the
tenant's budget, candidates from the registry, one ``Policy.decide_batch`` per group of
requests sharing policy, preferences and candidates, then :meth:`_reserve` (the predicted
cost taken from the tenant's ledger, or the cheapest candidate) builds the row and the
answer; :meth:`enqueue` hands the row to the writer (and to ``on_queued``: distributed
mode's decisions topic).

Reads the registry and the policy store under the state lock; owns the featurizer and
the cache of validated preferences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import orjson

from bandit import InvalidInputError, Policy, Preferences
from bandit.base import MAX_ABS_CONTEXT, BatchDecision
from bandit.featurize import PrototypeMap
from service.config import Settings
from service.domain import DecideArgs, PendingDecision, TenantState
from service.exceptions import BudgetExhaustedError, UnavailableError
from service.ids import uuid7_str
from service.metrics import Metrics
from service.policies import PolicyStore
from service.registry import Registry
from service.writer import DecisionWriter

__all__ = ["Decider"]


class _Group(NamedTuple):
    """Requests decided by one ``Policy.decide_batch`` call."""

    policy: Policy
    preferences: Preferences
    candidates: list[str]
    kind: str
    scope: str
    rows: list[int]  # request indices


class _Decided(NamedTuple):
    batch: BatchDecision
    version: int
    kind: str
    scope: str
    rows: list[int]


class Decider:
    def __init__(self, settings: Settings, registry: Registry, policies: PolicyStore,
                 writer: DecisionWriter, metrics: Metrics, *, context_dim: int,
                 prototype_map: PrototypeMap | None,
                 on_queued: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.policies = policies
        self.writer = writer
        self.metrics = metrics
        self.context_dim = context_dim
        self.prototype_map = prototype_map
        self.on_queued = on_queued
        self.featurizer: Any = None
        self._decision_counters: dict[tuple[str, str], Any] = {}
        self._valid_preferences: set[Preferences] = set()

    # ================================================================= context
    def featurize(self, text: str) -> np.ndarray:
        """The context of a text: featurizer, then the prototype map if configured."""
        if self.featurizer is None:
            from bandit.featurize import PrototypeFeaturizer, make_featurizer

            featurizer = make_featurizer(self.settings.featurizer, self.settings.dim,
                                         seed=self.settings.featurizer_seed)
            if self.prototype_map is not None:
                featurizer = PrototypeFeaturizer(featurizer, self.prototype_map)
            self.featurizer = featurizer
        return np.asarray(self.featurizer.transform_one(text), dtype=np.float64)

    def context_from(self, text: str | None, embedding: list[float] | None) -> np.ndarray:
        if embedding is not None:
            x = np.asarray(embedding, dtype=np.float64)
            if x.shape != (self.settings.dim,):
                raise InvalidInputError("query.embedding",
                                        f"must be a list of {self.settings.dim} numbers",
                                        f"{x.size} numbers")
            if not np.isfinite(x).all():
                raise InvalidInputError("query.embedding", "must be finite numbers "
                                        "(no NaN or infinity)", "non-finite value")
            if np.abs(x).max() > MAX_ABS_CONTEXT:
                raise InvalidInputError("query.embedding", "every value must be within "
                                        f"+-{MAX_ABS_CONTEXT:g}", float(np.abs(x).max()))
            if self.prototype_map is not None:
                # The same map as for text: a caller who embeds with the configured
                # featurizer gets the features a text would have given.
                x = self.prototype_map.transform(x)
            return x
        assert text is not None
        return self.featurize(text)

    def candidates(self, requested: list[str] | None) -> list[str]:
        """The enabled models among ``requested`` (all enabled ones if None)."""
        models = self.registry.models
        enabled = [n for n, s in models.items() if s.enabled]
        if requested is None:
            if not enabled:
                raise UnavailableError("no enabled model to route to; an admin registers "
                                       "one with POST /v1/admin/models", slug="no-models",
                                       retry_after_s=None)
            return enabled
        names = list(dict.fromkeys(requested))
        allowed = ", ".join(enabled) or "(none enabled)"
        for name in names:
            if name not in models:
                raise InvalidInputError("candidates", f"unknown model; allowed: {allowed}",
                                        name)
        names = [n for n in names if models[n].enabled]
        if not names:
            raise InvalidInputError("candidates", "every listed model is disabled; "
                                    f"allowed: {allowed}", requested)
        return names

    # ================================================================== decide
    def decide(self, tenant: TenantState, x: np.ndarray, candidates: list[str] | None,
               override: Preferences | None) -> PendingDecision:
        """Choose a model and reserve its predicted cost; :meth:`enqueue` queues the row.

        Raises :class:`~service.exceptions.BudgetExhaustedError` when the budget is spent
        and the tenant asked for ``reject``.
        """
        result = self.decide_many([DecideArgs(tenant, x, candidates, override)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def decide_many(self, requests: Sequence[DecideArgs]) -> list[PendingDecision | Exception]:
        """:meth:`decide` for several requests at once; each gets its decision or the
        exception :meth:`decide` would have raised for it alone.

        Requests on the same policy with the same (paced) preferences and candidates share
        one :meth:`Policy.decide_batch` call: each row is decided independently, exactly
        as one ``decide`` would, but a policy call costs ~50 us whatever the number of
        rows (numpy call overhead), so a batch of 8 costs about as much as two decisions.
        The API gathers the decides that arrive in the same event-loop iteration
        (:mod:`service.batching`).
        """
        now = time.time()
        out: list[PendingDecision | Exception | None] = [None] * len(requests)
        paced = self._paced(requests, out, now)
        decided: list[_Decided] = []
        with self.policies.lock:
            groups: dict[tuple[Any, ...], _Group] = {}
            for i, prefs in paced:
                tenant, _x, candidates, _override = requests[i]
                try:
                    names = self.candidates(candidates)
                except Exception as exc:
                    out[i] = exc
                    continue
                policy = self.policies.policy_for(tenant)
                key = (id(policy), prefs, tuple(names))
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(policy, prefs, names, tenant.policy,
                                                 tenant.scope, [])
                group.rows.append(i)
            for group in groups.values():
                xs = np.stack([requests[i].context for i in group.rows])
                try:
                    batch = group.policy.decide_batch(xs, group.preferences,
                                                      group.candidates)
                except Exception as exc:
                    for i in group.rows:
                        out[i] = exc
                    continue
                decided.append(_Decided(batch, int(group.policy.version), group.kind,
                                        group.scope, group.rows))
        for batch in decided:
            self._settle(requests, batch, out, now)
        return out  # type: ignore[return-value]

    def _paced(self, requests: Sequence[DecideArgs],
               out: list[PendingDecision | Exception | None],
               now: float) -> list[tuple[int, Preferences]]:
        """Each request's preferences with the cost weight paced by its budget."""
        paced: list[tuple[int, Preferences]] = []
        valid = self._valid_preferences
        for i, request in enumerate(requests):
            base = request.preferences or request.tenant.preferences
            try:
                if base not in valid:  # checked once per distinct weights, not per decide
                    base.validated()
                    if len(valid) >= 4096:
                        valid.clear()
                    valid.add(base)
                paced.append((i, base._replace(cost=request.tenant.ledger.paced_cost_weight(
                    base.quality, base.cost, now=now))))
            except Exception as exc:  # invalid weights: this request only
                out[i] = exc
        return paced

    def _settle(self, requests: Sequence[DecideArgs], decided: _Decided,
                out: list[PendingDecision | Exception | None], now: float) -> None:
        """Reserve and build the decision of every row of one decided batch."""
        batch = decided.batch
        arms = batch.arms
        # One tolist() per array and batch (per-element float() costs more than the
        # policy): the same values as BatchDecision.decision() and Prediction.as_dict().
        means, utility = batch.means.tolist(), batch.utility.tolist()
        std, scores = batch.uncertainty.tolist(), batch.scores.tolist()
        choices, props = batch.choices.tolist(), batch.propensities.tolist()
        rows = decided.rows
        explored = batch.explored.tolist() if batch.explored.size else [False] * len(rows)
        for r, i in enumerate(rows):
            m, u, s, sc = means[r], utility[r], std[r], scores[r]
            predictions = {
                name: {"quality": m[j][0], "cost_usd": m[j][1],
                       "latency_ms": m[j][2] * 1e3, "utility": u[j],
                       "uncertainty": s[j], "score": sc[j]}
                for j, name in enumerate(arms)}
            try:
                out[i] = self._reserve(requests[i].tenant, requests[i].context, arms,
                                       predictions, arms[choices[r]], props[r],
                                       bool(explored[r]), decided, now)
            except Exception as exc:  # budget spent and "reject"
                out[i] = exc

    def _reserve(self, tenant: TenantState, x: np.ndarray, names: list[str],
                 predictions: dict[str, dict[str, float]], model: str, propensity: float,
                 explored: bool, decided: _Decided, now: float) -> PendingDecision:
        """Reserve the chosen model's predicted cost (or fall back to the cheapest) and
        build the decision row and response."""
        cost = max(predictions[model]["cost_usd"], 0.0)
        budget_limited = over_budget = False
        if not tenant.ledger.try_reserve(cost, now=now):
            # The chosen model does not fit: fall back to the cheapest candidate, chosen
            # deterministically (propensity 1 given the budget state).
            cheapest = min(names, key=lambda n: (max(predictions[n]["cost_usd"], 0.0), n))
            cheap_cost = max(predictions[cheapest]["cost_usd"], 0.0)
            budget_limited = True
            if not tenant.ledger.try_reserve(cheap_cost, now=now):
                if tenant.on_budget_exhausted == "reject":
                    self.metrics.rejected.labels("budget").inc()
                    raise BudgetExhaustedError(
                        f"the tenant's budget is spent (day {tenant.budget_usd_per_day}, "
                        f"month {tenant.budget_usd_per_month} USD) and "
                        "on_budget_exhausted is 'reject'")
                tenant.ledger.try_reserve(cheap_cost, now=now, force=True)
                over_budget = True
            model, propensity, cost = cheapest, 1.0, cheap_cost
        decision_id = uuid7_str(int(now * 1000))  # time-ordered primary key (service.ids)
        kind, scope, version = decided.kind, decided.scope, decided.version
        row = {
            "id": decision_id, "tenant_id": tenant.id, "model": model, "policy": kind,
            "policy_version": version, "scope": scope, "propensity": float(propensity),
            "context": np.ascontiguousarray(x, dtype="<f8").tobytes(),
            # A score is -inf for an arm the main branch may not pick (a cold arm with no
            # declared quality). JSON has no infinity: orjson, which encodes both the
            # response and the stored row, writes it as null.
            "predictions": predictions,
            # Encoded once, here, for both the response body and the stored row (the
            # writer thread then does not encode them again holding the GIL).
            "predictions_json": orjson.dumps(predictions),
            "predicted_cost_usd": cost, "charged_usd": cost, "over_budget": over_budget,
            "created_at": datetime.fromtimestamp(now, UTC),
        }
        explored = explored and not budget_limited
        response = {"decision_id": decision_id, "model": model,
                    "propensity": float(propensity), "explored": explored,
                    "predictions": predictions, "policy": kind,
                    "policy_version": version, "scope": scope,
                    "budget_limited": budget_limited}
        return PendingDecision(response, row, tenant, explored)

    # ================================================================== queue
    def enqueue(self, pending: PendingDecision) -> bool:
        """Queue the decision row for the writer; False when the queue is full."""
        if not self.writer.submit(pending.row):
            return False
        self._count_decision(pending.tenant, pending.row["model"], pending.explored)
        if self.on_queued is not None:
            self.on_queued(pending.row)
        return True

    def abandon(self, pending: PendingDecision) -> None:
        """Give back the reservation of a decision that could not be queued."""
        self.release(pending)
        self.metrics.rejected.labels("backpressure").inc()

    def release(self, pending: PendingDecision) -> None:
        """Give back the reservation of a decision that is never answered."""
        row = pending.row
        pending.tenant.ledger.adjust(-row["charged_usd"], row["created_at"].timestamp())

    def _count_decision(self, tenant: TenantState, model: str, explored: bool) -> None:
        # Children cached: labels() validates and locks on every call (a few us).
        key = (model, tenant.id)
        child = self._decision_counters.get(key)
        if child is None:
            child = self._decision_counters[key] = self.metrics.decisions.labels(*key)
        child.inc()
        if explored:
            self.metrics.explored.labels(tenant.id).inc()
