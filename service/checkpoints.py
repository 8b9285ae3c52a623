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

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import models as m
from service.features import ContextSettingsError
from service.local import LocalCopy
from service.metrics import Metrics
from service.policies import PolicyStore

__all__ = ["Checkpoints", "FEATURIZER_KEY"]

log = logging.getLogger("service.checkpoints")
#: The checkpoint's snapshot that holds the featurizer spec (not a policy).
FEATURIZER_KEY = "context:featurizer"


class Checkpoints:
    def __init__(self, settings: Settings, engine: Engine, policies: PolicyStore,
                 metrics: Metrics, local: LocalCopy) -> None:
        self.settings = settings
        self.engine = engine
        self.policies = policies
        self.metrics = metrics
        self.local = local
        self._checkpointed_versions: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ start
    def load(self) -> bool:
        """Restore the newest checkpoint, then replay the feedback written after it;
        True when the stored statistics were set aside (a checkpoint is due now)."""
        fresh = self._restore()
        replayed = self.policies.replay()
        if replayed:
            log.info("replayed %d feedback events written after the last checkpoint",
                     replayed)
        return fresh

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

    def reloaded(self) -> None:
        """After a reload from the database: the next :meth:`checkpoint` writes."""
        self._checkpointed_versions = None

    def _restore(self) -> bool:
        """Restore the newest checkpoint; True when a checkpoint is due now: the stored
        statistics were set aside because another featurizer learned them
        (``FEATURIZER_CHANGE=start-fresh``), or the database has none yet."""
        store, spec = self.policies, self.policies.contexts.spec()
        fresh = False
        with Session(self.engine) as session:
            checkpoint = session.scalars(select(m.PolicyCheckpoint)
                                         .order_by(m.PolicyCheckpoint.id.desc())
                                         .limit(1)).first()
            snapshots: dict[str, bytes] = {}
            store.last_feedback_id = 0
            if checkpoint is not None:
                snapshots = {s.key: s.data for s in session.scalars(
                    select(m.PolicySnapshot)
                    .where(m.PolicySnapshot.checkpoint_id == checkpoint.id))}
                store.last_feedback_id = int(checkpoint.last_feedback_id)
            # Checkpoints written before the spec was recorded have none: not checked.
            stored = snapshots.pop(FEATURIZER_KEY, b"").decode() or None
            # Every start on a fresh database records its spec at once (below), so
            # statistics without one (a checkpoint without the spec, or decisions and no
            # checkpoint) were learned before hashing had versions: version 1.
            legacy = stored is None and (checkpoint is not None or session.scalar(
                select(m.DecisionRow.id).limit(1)) is not None)
            if store.contexts.adopt_stored_spec(stored, legacy=legacy):
                spec = store.contexts.spec()
            changed = stored is not None and stored != spec
            if changed and self.settings.featurizer_change == "start-fresh":
                log.warning("BANDIT_ROUTER_FEATURIZER_CHANGE=start-fresh: the stored "
                            "statistics were learned with %r, the settings give %r; "
                            "starting from the models' priors, feedback before this start "
                            "is not replayed", stored, spec)
                snapshots, fresh = {}, True
                # The old decisions' contexts are in the old feature space: never replay.
                store.last_feedback_id = int(session.scalar(
                    select(func.coalesce(func.max(m.Feedback.id), 0))))
        store.restore(snapshots, rebuild=True, fresh=fresh)
        self._checkpointed_versions = store.versions()
        # A fresh database: checkpoint now, so the next start knows the featurizer.
        fresh = fresh or (checkpoint is None and not legacy)
        if changed and not fresh:
            # After the restore: a changed dimension has said so first, more precisely.
            raise ContextSettingsError(
                f"the stored statistics were learned with the featurizer {stored!r}; the "
                f"settings give {spec!r} (BANDIT_ROUTER_FEATURIZER, "
                "BANDIT_ROUTER_DIM, BANDIT_ROUTER_FEATURIZER_SEED, "
                "BANDIT_ROUTER_HASHING_VERSION, "
                "BANDIT_ROUTER_PROTOTYPE_MAP, BANDIT_ROUTER_TAG_BLOCK): restore the "
                "settings they were learned with, or set "
                "BANDIT_ROUTER_FEATURIZER_CHANGE=start-fresh to start from "
                "the models' priors (what was learned stays in the database, unused)")
        return fresh

    # ------------------------------------------------------------------ save
    def checkpoint(self, *, force: bool = False) -> bool:
        """Write every policy and the last applied feedback id (one transaction), and keep
        them in the local copy. Not while degraded: those policies lack what the
        database holds."""
        if self.local.degraded_since is not None:
            return False
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
        # What the statistics were learned with, checked by the next start.
        blobs[FEATURIZER_KEY] = store.contexts.spec().encode()
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
        self.local.save(blobs)
        return True
