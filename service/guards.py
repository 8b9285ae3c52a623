"""Guarded exploration per tenant: each guarded tenant's account against its baseline
model (:class:`bandit.conservative.ConservativeGuard`), applied to the decider's batches
and taught by feedback.

The decision log is the guard's record (``decisions.guard``): a tenant's account is
rebuilt from it at start, and when its baseline changed through another replica (the
registry tells, :meth:`Guards.baseline_changed`). The accounts live on the registry's
tenants (``TenantState.guard_state``) and are changed under the state lock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import psycopg
from sqlalchemy import Engine, select, text
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

__all__ = ["Guards", "GuardFollower", "GuardLesson", "account", "CHANGES_KEEP_S"]

log = logging.getLogger("service.guards")

#: ``guard_changes`` rows (PostgreSQL, migration 0010) are kept this long: the replicas'
#: followers read them within seconds and rebuild in full every ``PRUNE_EVERY_S``.
CHANGES_KEEP_S = 3600.0
#: How often the log is pruned (by every replica's follower, and by the guards of any
#: process that makes guarded decisions: embedded mode has no follower).
PRUNE_EVERY_S = 600.0


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
        #: Pruning of ``guard_changes`` (:meth:`prune_changes`): on PostgreSQL only.
        self.keep_s = CHANGES_KEEP_S
        self.prune_every_s = PRUNE_EVERY_S
        self.clock: Callable[[], float] = time.monotonic
        self._last_prune = -math.inf
        self._pruning = threading.Lock()

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
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        """Prune ``guard_changes`` in the background at most every ``prune_every_s``.

        Migration 0010's trigger logs every guarded decision's changes whatever the
        mode; distributed mode's followers read and prune the log, but an embedded
        process has none, so without this the log would grow forever (one or two rows
        per guarded decision). Driven by the guarded decisions themselves: no decision,
        no new rows, nothing to prune."""
        if self.engine.dialect.name != "postgresql":
            return  # SQLite: no trigger, no log
        now = self.clock()
        if now - self._last_prune < self.prune_every_s or not self._pruning.acquire(
                blocking=False):
            return
        self._last_prune = now
        threading.Thread(target=self._prune_in_background, name="guard-changes-prune",
                         daemon=True).start()

    def _prune_in_background(self) -> None:
        try:
            self.prune_changes()
        except Exception:  # noqa: BLE001 - the next guarded decision tries again later
            log.exception("guard_changes not pruned")
        finally:
            self._pruning.release()

    def prune_changes(self) -> int:
        """Delete the ``guard_changes`` rows older than ``keep_s``; returns how many."""
        with self.engine.begin() as conn:
            return conn.execute(_PRUNE, {"keep": float(self.keep_s)}).rowcount

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
            q = (select(m.DecisionRow.guard)
                 .where(m.DecisionRow.tenant_id == tenant.id, m.DecisionRow.guard.is_not(None))
                 .execution_options(yield_per=batch))
            if tenant.guard_since is not None:
                q = q.where(m.DecisionRow.created_at >= tenant.guard_since)
            with Session(self.engine) as session:
                state = account(tenant.baseline_model,
                                (stored for (stored,) in session.execute(q)))
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


# ---------------------------------------------------------------------- accounts
def _add_decision(state: GuardState, guard: ConservativeGuard, record: GuardRecord,
                  reward: float | None, sign: int = 1) -> None:
    """Add (``sign=-1``: take out) one guarded decision with its reward (None: no
    outcome yet) to ``state``: what a full rebuild adds for its row."""
    if sign > 0:
        guard.count(state, record)
        if reward is not None:
            guard.observe(state, record, reward)
        return
    part = GuardState()
    _add_decision(part, guard, record, reward)
    for name, value in part.to_dict().items():
        setattr(state, name, getattr(state, name) - value)


def account(baseline: str, stored: Iterable[Mapping[str, Any] | None]) -> GuardState:
    """A guard account from decisions' stored guard parts (``decisions.guard``): those
    recorded against ``baseline``. A null part (an unguarded decision, which the ORM
    writes as JSON null) is skipped."""
    state = GuardState()
    guard = ConservativeGuard(GuardConfig(baseline))  # counting needs no bound
    for part in stored:
        if not part:
            continue
        record = GuardRecord.from_list(part["record"])
        if record.baseline == baseline:
            reward = part.get("reward")
            _add_decision(state, guard, record, None if reward is None else float(reward))
    return state


class _Account(NamedTuple):
    basis: tuple[str | None, datetime | None]  # (baseline_model, guard_since)
    state: GuardState


_PRUNE = text("DELETE FROM guard_changes WHERE at < now() - make_interval(secs => :keep)")

# The changes past a watermark (migration 0010's trigger writes them).
_CHANGES = ("SELECT id, xid::text::int8, tenant_id, decision_at, record, counted_before,"
            " reward_before, counted_after, reward_after FROM guard_changes"
            " WHERE xid >= %s::text::xid8")


class GuardFollower:
    """Guarded tenants' accounts kept equal to a full rebuild from the decision log
    (:meth:`Guards.rebuild`) by reading only what changed (distributed mode, PostgreSQL).

    Migration 0010's trigger logs every change of ``decisions.guard`` in
    ``guard_changes`` (a decision written, its outcome updated by a learner, a
    decision deleted), stamped with the writing transaction's id. A refresh reads, in
    one REPEATABLE READ snapshot, the changes stamped at or after the ``xmin`` of the
    previous refresh's snapshot (every transaction below it had ended then, so none of
    them can commit a change later), skips the ones it already applied (by id), and
    adds each to its tenant's account as the row's part after minus its part before.
    A tenant seen for the first time, or whose baseline or ``guard_since`` changed, is
    rebuilt in full in the same snapshot; so is every tenant every ``full_every_s``
    (rounding never accumulates; changes older than ``keep_s`` are pruned then).
    """

    def __init__(self, guards: Guards, database_url: str, *,
                 full_every_s: float = PRUNE_EVERY_S, keep_s: float = CHANGES_KEEP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.guards = guards
        self.url = database_url
        self.full_every_s = full_every_s
        self.keep_s = keep_s
        self.clock = clock
        self._low: int | None = None  # the watermark: xmin of the last refresh
        self._seen: dict[int, int] = {}  # change id -> xid, for xids >= the watermark
        self._accounts: dict[str, _Account] = {}
        self._last_full = -math.inf
        self.full_rebuilds = 0  # tenants rebuilt from the whole decision log
        self.changes_applied = 0

    def refresh(self, tenants: list[TenantState]) -> None:
        """Bring the ``tenants``' accounts (the guarded ones) up to date and install them
        (``tenant.guard_state``); the others are forgotten."""
        full = self._low is None or self.clock() - self._last_full >= self.full_every_s
        basis = {t.id: (t.baseline_model, t.guard_since) for t in tenants}
        with psycopg.connect(self.url, autocommit=False) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                low = int(conn.execute(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8"
                ).fetchone()[0])
                again = set(basis) if full else {
                    tid for tid, b in basis.items()
                    if tid not in self._accounts or self._accounts[tid].basis != b}
                since = low if full else self._low
                for row in conn.execute(_CHANGES, (str(since),)):
                    self._change(row, basis, again)
                for tid in again:
                    self._accounts[tid] = _Account(basis[tid], self._full(conn, basis[tid],
                                                                          tid))
            if full:
                with conn.transaction():
                    conn.execute("DELETE FROM guard_changes WHERE at < now()"
                                 " - make_interval(secs => %s)", (self.keep_s,))
                self._last_full = self.clock()
        self._low = low
        self._seen = {i: x for i, x in self._seen.items() if x >= low}
        self._accounts = {tid: a for tid, a in self._accounts.items() if tid in basis}
        with self.guards.lock:
            for tenant in tenants:
                tenant.guard_state = GuardState.from_dict(
                    self._accounts[tenant.id].state.to_dict())

    def _change(self, row: tuple[Any, ...], basis: dict[str, tuple[str | None, Any]],
                again: set[str]) -> None:
        change_id, xid, tenant_id, decision_at, stored, *parts = row
        if change_id in self._seen:
            return
        self._seen[change_id] = xid
        if tenant_id not in basis or tenant_id in again:
            return  # not followed, or rebuilt in full from this very snapshot
        baseline, since = basis[tenant_id]
        record = GuardRecord.from_list(stored)
        if record.baseline != baseline or (since is not None and decision_at < since):
            return
        counted_before, reward_before, counted_after, reward_after = parts
        state = self._accounts[tenant_id].state
        guard = ConservativeGuard(GuardConfig(baseline))
        if counted_before and counted_after and reward_after is not None:
            # A learner's update of the outcome: the live path's replacement.
            if reward_after != reward_before:
                guard.observe(state, record, reward_after, reward_before)
        else:
            if counted_before:
                _add_decision(state, guard, record, reward_before, -1)
            if counted_after:
                _add_decision(state, guard, record, reward_after)
        self.changes_applied += 1

    def _full(self, conn: psycopg.Connection, basis: tuple[str | None, Any],
              tenant_id: str) -> GuardState:
        baseline, since = basis
        self.full_rebuilds += 1
        if baseline is None:
            return GuardState()
        rows = conn.execute(
            "SELECT guard FROM decisions WHERE tenant_id = %s"
            " AND json_typeof(guard) = 'object'"
            " AND (%s::timestamptz IS NULL OR created_at >= %s::timestamptz)",
            (tenant_id, since, since))
        return account(baseline, (stored for (stored,) in rows))
