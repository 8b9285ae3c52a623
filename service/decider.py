"""The decider: candidates, one policy call per group of requests, the guard, the
reservation, the decision row; reads the registry, the policy store and the ledgers,
writes nothing but the writer's queue.

The path of a decide, top to bottom (:meth:`Decider.decide_many`): each request's
preferences paced by its tenant's ledger -> grouped by (policy, preferences,
candidates) under the state lock -> one :meth:`bandit.Policy.decide_batch` per group,
the tenants' guards applied to its rows -> per request, its predictions and the
reservation of the chosen model's predicted cost (:meth:`Decider._reserve`: the
cheapest candidate when the budget does not fit) -> :meth:`Decider.enqueue` queues the
row for the writer (and, distributed, the decisions topic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import orjson

from bandit import CostEstimate, InvalidInputError, Policy, Preferences, PriceList
from bandit.base import BatchDecision
from bandit.conservative import GuardRecord
from service.config import Settings
from service.domain import DecideArgs, PendingDecision, TenantState
from service.exceptions import BudgetExhaustedError, UnavailableError
from service.guards import Guards
from service.ids import uuid7_str
from service.metrics import Metrics
from service.policies import PolicyStore
from service.registry import Registry
from service.writer import DecisionWriter

__all__ = ["Decider", "prediction_dicts"]

#: Candidate lists whose prices the decider keeps (beyond, it starts over).
_PRICE_LISTS = 256
#: Estimates the decider keeps, all candidate lists and prompt lengths together (each
#: ~0.6-0.9 KB with its keys; beyond, they start over).
_ESTIMATES = 4096


class _Group(NamedTuple):
    """Requests decided by one policy call."""

    policy: Policy
    preferences: Preferences
    candidates: list[str]
    kind: str
    scope: str
    requests: list[int]  # indices into the decide_many call's requests


class _Batch(NamedTuple):
    """A group's policy call, guards applied."""

    group: _Group
    decided: BatchDecision
    version: int
    prices: CostEstimate  # (n, K) price estimates
    guarded: dict[int, GuardRecord]  # row -> the guard's record


def prediction_dicts(decided: BatchDecision, prices: np.ndarray
                     ) -> list[dict[str, dict[str, float]]]:
    """Per row of ``decided``: arm -> :meth:`bandit.base.Prediction.as_dict` plus its
    ``price_usd`` (what a decision answers and stores).

    The same values as ``decided.decision(r).predictions[arm].as_dict()``
    (tests/service/test_components.py checks it): the library's
    :meth:`bandit.base.BatchDecision.prediction_dicts`, one ``tolist()`` per batch, no
    Prediction objects on the path of every decide.
    """
    return decided.prediction_dicts(price_usd=prices)


@dataclass(eq=False)
class Decider:
    settings: Settings
    registry: Registry
    policies: PolicyStore
    guards: Guards
    writer: DecisionWriter
    metrics: Metrics
    #: Called with each decision row queued for the writer (the decisions topic).
    on_queued: Callable[[dict[str, Any]], None] | None = None
    _decision_counters: dict[tuple[str, str], Any] = field(default_factory=dict)
    _explored_counters: dict[str, Any] = field(default_factory=dict)
    #: Candidates -> their prices, for the registry's ``models_version`` below.
    _prices: dict[tuple[str, ...], PriceList] = field(default_factory=dict)
    _prices_version: int = -1
    #: (candidates, token counts) -> their estimate, for the same ``models_version``.
    _estimates: dict[tuple[tuple[str, ...], tuple[float, ...]], CostEstimate] = field(
        default_factory=dict)

    def candidates(self, requested: list[str] | None) -> list[str]:
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

    def price_estimates(self, names: list[str], input_tokens: Sequence[int | None]
                        ) -> CostEstimate:
        """(n, K) expected USD cost of each request on each model before the call: the
        registry's prices x (the prompt's tokens, else ``prior_input_tokens``) and
        ``prior_output_tokens`` expected output tokens. The policy predicts cost as this
        times a correction learned from feedback, so it spends no exploration on prices.

        The candidates' prices are read and checked once per change of the registry's
        models (:class:`bandit.PriceList`), not on every decide, and so is the estimate
        for the same token counts.
        """
        prior = self.settings.prior_input_tokens
        tokens = tuple([prior if t is None else t for t in input_tokens])
        candidates = tuple(names)
        prices = self._price_list(candidates)  # first: a change of the models clears both
        key = (candidates, tokens)
        estimate = self._estimates.get(key)
        if estimate is None:
            # The same prompt lengths on the same candidates cost the same until a price
            # changes: requests with an embedding (no prompt: prior_input_tokens) or
            # prompts of a common length are priced once. The array is read-only.
            estimate = prices.estimate(tokens)
            if len(self._estimates) >= _ESTIMATES:
                self._estimates.clear()
            self._estimates[key] = estimate
        return estimate

    def _price_list(self, names: tuple[str, ...]) -> PriceList:
        """The candidates' :class:`bandit.PriceList`, cached per ``models_version``."""
        version = self.registry.models_version  # read first: a later change rebuilds
        if version != self._prices_version:
            self._prices.clear()
            self._estimates.clear()
            self._prices_version = version
        prices = self._prices.get(names)
        if prices is None:
            if len(self._prices) >= _PRICE_LISTS:  # many distinct candidate lists
                self._prices.clear()
            models = [self.registry.models[n] for n in names]
            prices = self._prices[names] = PriceList(
                list(names), [mo.input_price_per_mtok for mo in models],
                [mo.output_price_per_mtok for mo in models], self.settings.prior_output_tokens)
        return prices

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
        with self.policies.lock:
            groups = self._groups(requests, out, now)
            batches = [self._decide_group(requests, group, out) for group in groups]
        # One time object for the whole batch: the writer formats it once for its rows.
        created_at = datetime.fromtimestamp(now, UTC)
        for batch in batches:
            if batch is not None:
                self._answer(requests, batch, out, now, created_at)
        return out  # type: ignore[return-value]

    def _groups(self, requests: Sequence[DecideArgs],
                out: list[PendingDecision | Exception | None], now: float) -> list[_Group]:
        """The requests grouped by policy, paced preferences and candidates (under the
        state lock); a request that cannot be decided gets its exception in ``out``."""
        groups: dict[tuple[Any, ...], _Group] = {}
        # Requests of one tenant with the same override and candidates are paced and
        # checked once per batch: nothing that decides their preferences and candidates
        # (the tenant's settings and ledger, the registry) changes while the batch is
        # grouped (the reservations come after, in _answer). A request that fails is not
        # remembered: each gets its own exception.
        asked: dict[tuple[Any, ...], _Group] = {}
        for i, request in enumerate(requests):
            tenant = request.tenant
            wanted = request.candidates
            # An override by identity: equal preferences of other types (True for 1.0)
            # are each validated.
            override = request.override
            try:
                ask = (id(tenant), None if override is None else id(override),
                       None if wanted is None else tuple(wanted))
                group = asked.get(ask)  # unhashable candidates: this request's error
            except Exception as exc:  # this request only
                out[i] = exc
                continue
            if group is None:
                try:
                    # Checked once per distinct weights (the library caches them).
                    base = (override or tenant.preferences).validated()
                    cost = tenant.ledger.paced_cost_weight(base.quality, base.cost, now=now)
                    prefs = base if cost == base.cost else base._replace(cost=cost)
                    names = self.candidates(wanted)
                except Exception as exc:  # this request only
                    out[i] = exc
                    continue
                policy = self.policies.policy_for(tenant)
                key = (id(policy), prefs, tuple(names))
                group = groups.get(key)
                if group is None:
                    group = groups[key] = _Group(policy, prefs, names, tenant.policy,
                                                 tenant.scope, [])
                asked[ask] = group
            group.requests.append(i)
        return list(groups.values())

    def _decide_group(self, requests: Sequence[DecideArgs], group: _Group,
                      out: list[PendingDecision | Exception | None]) -> _Batch | None:
        """One policy call for the group, its tenants' guards applied (state lock held)."""
        xs = np.stack([requests[i].x for i in group.requests])
        try:
            prices = self.price_estimates(group.candidates,
                                          [requests[i].input_tokens for i in group.requests])
            decided = group.policy.decide_batch(xs, group.preferences, group.candidates,
                                                cost_estimate=prices)
        except Exception as exc:
            for i in group.requests:
                out[i] = exc
            return None
        guarded = self.guards.apply(group.policy, group.preferences, decided, xs,
                                    [requests[i].tenant for i in group.requests])
        return _Batch(group, decided, int(group.policy.version), prices, guarded)

    def _answer(self, requests: Sequence[DecideArgs], batch: _Batch,
                out: list[PendingDecision | Exception | None], now: float,
                created_at: datetime) -> None:
        """Each row's predictions and reservation (after the state lock)."""
        group, decided = batch.group, batch.decided
        arms = decided.arms
        choices, props = decided.choices.tolist(), decided.propensities.tolist()
        explored = (decided.explored.tolist() if decided.explored.size
                    else [False] * len(group.requests))
        for r, (i, predictions) in enumerate(zip(group.requests,
                                                 prediction_dicts(decided, batch.prices.array),
                                                 strict=True)):
            tenant = requests[i].tenant
            try:
                pending = out[i] = self._reserve(
                    tenant, requests[i].x, group.candidates, predictions, arms[choices[r]],
                    props[r], bool(explored[r]), group.kind, group.scope, batch.version, now,
                    created_at)
            except Exception as exc:  # 429: budget spent and "reject"
                out[i] = exc
                continue
            record = batch.guarded.get(r)
            if record is not None and not pending.response["budget_limited"]:
                # Counted once the decision stands (a budget fallback is not the guard's
                # choice, and is not counted).
                self.guards.count(tenant, record)
                pending.row["guard"] = {"record": record.to_list(), "outcome": None,
                                        "reward": None}

    def _reserve(self, tenant: TenantState, x: np.ndarray, names: list[str],
                 predictions: dict[str, dict[str, float]], model: str, propensity: float,
                 explored: bool, kind: str, scope: str, version: int,
                 now: float, created_at: datetime) -> PendingDecision:
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
            "price_usd": predictions[model].get("price_usd"),
            "created_at": created_at,  # datetime.fromtimestamp(now, UTC)
            # Set by the caller (decide_body) and _answer (guarded decisions).
            "tags": None, "guard": None,
        }
        explored = explored and not budget_limited
        response = {"decision_id": decision_id, "model": model,
                    "propensity": float(propensity), "explored": explored,
                    "predictions": predictions, "policy": kind,
                    "policy_version": version, "scope": scope,
                    "budget_limited": budget_limited}
        return PendingDecision(response, row, tenant, explored)

    # ================================================================== after
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
        """Give back the reservation of a decision that is never answered (and its part
        of the tenant's guard state)."""
        row = pending.row
        pending.tenant.ledger.unreserve(row["charged_usd"], row["created_at"].timestamp(),
                                        from_slice=not row["over_budget"])
        if row.get("guard"):
            self.guards.count(pending.tenant, GuardRecord.from_list(row["guard"]["record"]),
                              -1)

    def _count_decision(self, tenant: TenantState, model: str, explored: bool) -> None:
        # Children cached: labels() validates and locks on every call (a few us).
        key = (model, tenant.id)
        child = self._decision_counters.get(key)
        if child is None:
            child = self._decision_counters[key] = self.metrics.decisions.labels(*key)
        child.inc()
        if explored:
            child = self._explored_counters.get(tenant.id)
            if child is None:
                child = self._explored_counters[tenant.id] = self.metrics.explored.labels(
                    tenant.id)
            child.inc()
