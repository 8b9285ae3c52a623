"""Embedded mode's statistics source: checkpoints of the policy store, and the replay of
the feedback written after the newest one (tables ``policy_checkpoints``,
``policy_snapshots``; reads ``feedback`` and ``decisions``).

A checkpoint stores every policy and the id of the last feedback row applied. On start
the newest checkpoint is loaded and the feedback rows after it are replayed in the order
they were applied, each weighted (with forgetting) by its decision's ``created_at``, as
when it was applied live: the replay reproduces the live statistics
(:meth:`service.policies.PolicyStore.apply`). Acknowledged feedback is never lost, even
after ``kill -9``; what a crash loses is the random-stream position of decisions since
the checkpoint and decisions still in the writer's queue.

Distributed mode plugs in :class:`service.distributed.FollowedStatistics` instead: the
learners' partition statistics in PostgreSQL are the state there.
"""

from __future__ import annotations

import copy
import logging

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from bandit import Policy
from service.config import Settings
from service.db import models as m
from service.domain import POLICY_CLASSES, POLICY_KINDS, stored_outcome, timestamp
from service.features import ContextSettingsError
from service.metrics import Metrics
from service.policies import PolicyStore

__all__ = ["Checkpoints"]

log = logging.getLogger("service.checkpoints")


class Checkpoints:
    def __init__(self, settings: Settings, engine: Engine, policies: PolicyStore,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.policies = policies
        self.metrics = metrics
        self._checkpointed_versions: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ start
    def load(self) -> None:
        """Restore the newest checkpoint, then replay the feedback written after it."""
        self._restore()
        self._replay()

    def start(self) -> None:
        """Nothing runs in the background (the app schedules :meth:`checkpoint`)."""

    def stop(self) -> None:
        try:
            self.checkpoint(force=True)
        except Exception:
            # Nothing is lost: the next start replays the feedback since the last
            # checkpoint that did succeed.
            log.exception("final checkpoint failed")

    def degraded(self) -> dict[str, str]:
        return {}

    def _restore(self) -> None:
        store = self.policies
        with Session(self.engine) as session:
            checkpoint = session.scalars(select(m.PolicyCheckpoint)
                                         .order_by(m.PolicyCheckpoint.id.desc())
                                         .limit(1)).first()
            snapshots: dict[str, bytes] = {}
            if checkpoint is not None:
                snapshots = {s.key: s.data for s in session.scalars(
                    select(m.PolicySnapshot)
                    .where(m.PolicySnapshot.checkpoint_id == checkpoint.id))}
                store.last_feedback_id = int(checkpoint.last_feedback_id)

        def restore(key: str, kind: str) -> Policy:
            data = snapshots.get(key)
            if data is None:
                return store.new_policy(kind)
            # Statistics from the checkpoint, settings from this process: a restart with
            # another BANDIT_ROUTER_EPSILON explores with the new one (and one with
            # another HALF_LIFE_HOURS forgets at the new rate from the checkpoint on).
            # The reference time comes with the statistics (the newest decision time
            # applied, see PolicyStore.apply): the replay continues from it, as the live
            # process did.
            policy = Policy.from_bytes(data, as_class=POLICY_CLASSES[kind],
                                       epsilon=self.settings.epsilon,
                                       half_life_hours=self.settings.half_life_hours)
            if policy.dim != store.context_dim:
                raise ContextSettingsError(
                    f"checkpoint {key} has dimension {policy.dim}, the settings say "
                    f"{store.context_dim} ({store.history.dim_source()}): restore the "
                    "settings it was learned with, or start on a fresh database")
            store.sync_arms(policy)
            return policy

        store.shared = {kind: restore(f"shared:{kind}", kind) for kind in POLICY_KINDS}
        store.isolated = {}
        for t in store.registry.tenants.values():
            if t.scope != "isolated":
                continue
            if all(f"tenant:{t.id}:{kind}" in snapshots for kind in POLICY_KINDS):
                store.isolated[t.id] = {kind: restore(f"tenant:{t.id}:{kind}", kind)
                                        for kind in POLICY_KINDS}
            else:
                # Turned isolated after the checkpoint: rebuild up to the checkpoint; the
                # replay that follows adds the rest.
                store.isolated[t.id] = store.rebuild_isolated(t.id, store.last_feedback_id)
        self._checkpointed_versions = store.versions()

    def _replay(self, batch: int = 1000) -> None:
        """Apply the feedback rows written after the checkpoint, in id order."""
        store = self.policies
        replayed = 0
        while True:
            rows = store.history.rows(store.last_feedback_id, batch)
            if not rows:
                break
            for fb, model, context, decided_at in rows:
                store.apply(fb.tenant_id, model, store.history.context(context, fb),
                            stored_outcome(fb), timestamp(decided_at))
                store.last_feedback_id = int(fb.id)
                replayed += 1
        if replayed:
            log.info("replayed %d feedback events written after the last checkpoint",
                     replayed)

    # ------------------------------------------------------------------ save
    def checkpoint(self, *, force: bool = False) -> bool:
        """Write every policy and the last applied feedback id (one transaction)."""
        store = self.policies
        with store.apply_lock, store.lock:
            versions = store.versions()
            if not force and versions == self._checkpointed_versions:
                return False
            # Copy under the locks (about 1 ms per policy), serialize outside them (about
            # 5x longer): decisions wait only for the copy.
            copies = {key: copy.deepcopy(p) for key, p in store.all_policies().items()}
            last = store.last_feedback_id
        blobs = {key: p.to_bytes() for key, p in copies.items()}
        with self.engine.connect() as conn, Session(bind=conn) as session, session.begin():
            if conn.dialect.name == "sqlite" and conn.engine.url.database not in (
                    None, "", ":memory:"):
                # sqlite3 caches the INSERT with the last blobs still bound (~4 MB per
                # policy) until its connection closes: one pooled connection after
                # another held them (docs/reliability.md, load). Close this one after
                # the commit instead of returning it to the pool.
                conn.detach()
            cp = m.PolicyCheckpoint(created_at=m.utcnow(), last_feedback_id=last)
            session.add(cp)
            session.flush()
            session.add_all([m.PolicySnapshot(checkpoint_id=cp.id, key=k, data=v)
                             for k, v in blobs.items()])
            keep = [i for (i,) in session.execute(
                select(m.PolicyCheckpoint.id).order_by(m.PolicyCheckpoint.id.desc())
                .limit(self.settings.checkpoints_kept))]
            old = select(m.PolicyCheckpoint.id).where(m.PolicyCheckpoint.id.not_in(keep))
            session.execute(delete(m.PolicySnapshot)
                            .where(m.PolicySnapshot.checkpoint_id.in_(old)))
            session.execute(delete(m.PolicyCheckpoint)
                            .where(m.PolicyCheckpoint.id.not_in(keep)))
        self._checkpointed_versions = versions
        self.metrics.checkpoints.inc()
        return True
