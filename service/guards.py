"""Guarded exploration per tenant: each guarded tenant's account against its baseline
model (:class:`bandit.conservative.ConservativeGuard`), applied to the decider's batches
and taught by feedback.

The decision log is the guard's record (``decisions.guard``): a tenant's account is
rebuilt from it at start, and when its baseline changed through another replica (the
registry tells, :meth:`Guards.baseline_changed`). The accounts live on the registry's
tenants (``TenantState.guard_state``) and are changed under the state lock.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit import Policy, Preferences
from bandit.base import BatchDecision
from bandit.conservative import (
    ConservativeGuard,
    GuardConfig,
    GuardRecord,
    GuardState,
    merge_outcome,
)
from service.db import models as m
from service.domain import ModelState, TenantState
from service.metrics import Metrics
from service.registry import Registry

__all__ = ["Guards", "GuardLesson"]


class GuardLesson(NamedTuple):
    """What a guard learns from one feedback once it is committed."""

    guard: ConservativeGuard
    record: GuardRecord
    reward: float
    previous: float | None


class Guards:
    def __init__(self, engine: Engine, registry: Registry, metrics: Metrics,
                 lock: threading.RLock) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.lock = lock
        self._guards: dict[tuple[str, float], ConservativeGuard] = {}
        registry.subscribe(self)

    def guard_for(self, tenant: TenantState) -> ConservativeGuard | None:
        """The tenant's guard, or None: no baseline, or the baseline is not a model."""
        baseline = tenant.baseline_model
        if baseline is None or baseline not in self.registry.models:
            return None
        key = (baseline, tenant.max_exploration_loss)
        guard = self._guards.get(key)
        if guard is None:
            if len(self._guards) >= 4096:
                self._guards.clear()
            guard = self._guards[key] = ConservativeGuard(
                GuardConfig(baseline, tenant.max_exploration_loss))
        return guard

    def apply(self, policy: Policy, prefs: Preferences, batch: BatchDecision,
              xs: np.ndarray, tenants: list[TenantState]) -> dict[int, GuardRecord]:
        """Apply each guarded tenant's guard to its row of ``batch`` (in place: the
        choice, its propensity, explored); returns row -> the record to :meth:`count`
        once the decision stands. Runs under the state lock."""
        arms = batch.arms
        records: dict[int, GuardRecord] = {}
        for r, tenant in enumerate(tenants):
            guard = self.guard_for(tenant)
            if guard is None or guard.config.baseline not in arms:
                continue  # no guard, or the request left the baseline out
            utility = dict(zip(arms, batch.utility[r].tolist(), strict=True))
            std = dict(zip(arms, batch.uncertainty[r].tolist(), strict=True))
            chosen = arms[int(batch.choices[r])]

            def probabilities(r: int = r) -> dict[str, float]:
                names, probs = policy.probabilities(xs[r], prefs, arms)
                return dict(zip(names, probs[0].tolist(), strict=True))

            choice = guard.choose(tenant.guard_state, chosen,
                                  float(batch.propensities[r]), utility, std,
                                  probabilities, count=False)
            if choice.overridden:
                batch.choices[r] = arms.index(choice.arm)
                batch.propensities[r] = choice.propensity
                if batch.explored.size:
                    batch.explored[r] = False
                self.metrics.guard_overrides.labels(tenant.id).inc()
            records[r] = choice.record
        return records

    def count(self, tenant: TenantState, record: GuardRecord, sign: int = 1) -> None:
        """Count a decision that stands in the tenant's account (``sign=-1``: one that
        is never answered after all)."""
        with self.lock:
            ConservativeGuard.count(tenant.guard_state, record, sign)

    # ------------------------------------------------------------------ rebuilding
    def load(self) -> None:
        for tenant in self.registry.tenants.values():
            self.rebuild(tenant)

    def rebuild(self, tenant: TenantState, batch: int = 5000) -> None:
        """The tenant's guard state from its guarded decisions since ``guard_since``
        against its current baseline: the decision log is the guard's record, so a
        restart (or a crash) loses nothing that was stored."""
        state = GuardState()
        if tenant.baseline_model is not None:
            guard = ConservativeGuard(GuardConfig(tenant.baseline_model,
                                                  tenant.max_exploration_loss))
            q = (select(m.DecisionRow.guard)
                 .where(m.DecisionRow.tenant_id == tenant.id, m.DecisionRow.guard.is_not(None))
                 .execution_options(yield_per=batch))
            if tenant.guard_since is not None:
                q = q.where(m.DecisionRow.created_at >= tenant.guard_since)
            with Session(self.engine) as session:
                for (stored,) in session.execute(q):
                    record = GuardRecord.from_list(stored["record"])
                    if record.baseline != tenant.baseline_model:
                        continue
                    guard.count(state, record)
                    if stored.get("reward") is not None:
                        guard.observe(state, record, float(stored["reward"]))
        with self.lock:
            tenant.guard_state = state

    # Registry events: only a baseline changed elsewhere concerns the guards.
    def model_added(self, model: ModelState) -> None:
        pass

    def model_removed(self, name: str) -> None:
        pass

    def tenant_changed(self, tenant: TenantState) -> None:
        pass

    def baseline_changed(self, tenant: TenantState) -> None:
        self.rebuild(tenant)

    # ------------------------------------------------------------------ feedback
    def lesson(self, tenant: TenantState, decision: m.DecisionRow,
               outcome: dict[str, float | None]) -> GuardLesson | None:
        """For feedback on a guarded decision of the tenant's current account: update
        the decision's stored guard part (merged outcome, its reward) and return what
        the in-memory state must learn once the feedback is committed."""
        stored = decision.guard
        if not stored or tenant.baseline_model is None:
            return None
        record = GuardRecord.from_list(stored["record"])
        guard = self.guard_for(tenant)
        if guard is None or record.baseline != tenant.baseline_model or (
                tenant.guard_since is not None
                and m.as_utc(decision.created_at) < tenant.guard_since):
            return None
        # Objectives the feedback has not reported are taken as predicted.
        predicted = (decision.predictions or {}).get(decision.model) or {}
        decision.guard = merge_outcome(stored, outcome, predicted, tenant.preferences)
        return GuardLesson(guard, record, float(decision.guard["reward"]),
                           stored.get("reward"))

    def learn(self, tenant: TenantState, lesson: GuardLesson) -> None:
        with self.lock:
            lesson.guard.observe(tenant.guard_state, lesson.record, lesson.reward,
                                 lesson.previous)

    def report(self, tenant: TenantState) -> dict[str, Any] | None:
        """The guard's view of a tenant (for /metrics and the status page), or None."""
        guard = self.guard_for(tenant)
        if guard is None:
            return None
        with self.lock:
            state = GuardState.from_dict(tenant.guard_state.to_dict())
        return {"baseline_model": tenant.baseline_model,
                "max_exploration_loss": tenant.max_exploration_loss,
                "rounds": state.rounds, "non_baseline_plays": state.plays,
                "baseline_reward": state.baseline_total,
                "lower_bound_gap": guard.lower_gap(state, 0.0, 0.0, 0.0, 0.0)
                + guard.config.z * guard.noise_std(state) * (
                    math.sqrt(state.plays + 1) - math.sqrt(state.plays)),
                "allowance": guard.allowance(state, 0.0),
                "value_vs_baseline": state.value, "value_rounds": state.value_rounds}
