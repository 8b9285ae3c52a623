"""Distributed mode: Kafka feedback, learners' statistics, read-only deciders.

Chosen by :class:`service.routing.RoutingService` when ``kafka_bootstrap`` is set (and
the database is PostgreSQL): :func:`distributed` plugs in, instead of the embedded mode's
components (:func:`service.components.embedded`),

* ``POST /v1/feedback`` produces a feedback event to the feedback topic (``acks=all``,
  key = ``decision_id``) and answers 202 ``queued`` once the broker has it; the learners
  (``bandit-router learn``) apply it. A repeat is detected by the learner (the
  ``learner_applied`` key), not by the API, so the API cannot say ``duplicate``. The
  learner writes each applied event into the ``feedback`` table (the embedded mode's
  history, read by ``GET /v1/decisions/{id}``) in the partition's transaction. HTTP and
  telemetry feedback take the same path.
  (:class:`KafkaFeedback`, the feedback sink);
* every decision is also published to the decisions topic (analytics, off-policy
  evaluation) by a background thread; a full publish queue drops the event (counted),
  never the decision: PostgreSQL (the batched decision writer) stays the record
  (:meth:`KafkaFeedback.publish`, called for each queued decision);
* the policies are a read-only snapshot: the priors of the registry merged with the sum
  of every partition's statistics, refreshed by :class:`StatisticsFollower` when the
  learners bump a version (LISTEN/NOTIFY, and a version poll as a fallback). A decision
  reads the in-memory snapshot only; it never waits on Kafka or the database
  (:class:`FollowedStatistics`, the statistics source).

No checkpoints, no start-up feedback replay, no local copy: the learners' partition
statistics in PostgreSQL are the state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import psycopg
from kafka import KafkaProducer
from kafka.errors import KafkaError

from bandit import Policy
from bandit.featurize import (
    PrototypeFeaturizer,
    SentenceEmbeddingFeaturizer,
    make_featurizer,
)
from service.components import Components, Core
from service.config import Settings
from service.domain import POLICY_CLASSES, POLICY_KINDS, FeedbackReceipt, TenantState
from service.exceptions import UnavailableError
from service.features import Contexts
from service.follower import StatisticsFollower
from service.guards import GuardFollower, Guards
from service.policies import PolicyStore
from service.spool import outage_serving
from service.writer import DecisionWriter
from streams.config import StreamsConfig
from streams.learner import libpq_url
from streams.schemas import DecisionEvent, FeedbackEvent, encode_decision, encode_feedback
from streams.stats import SHARED_KEY, candidate_settings, recast

__all__ = ["distributed", "KafkaFeedback", "FollowedStatistics", "StatisticsFollower",
           "streams_config"]

log = logging.getLogger("service.distributed")


class _Named(NamedTuple):
    """What :class:`~bandit.featurize.PrototypeFeaturizer` reads of its base featurizer."""

    spec: str
    dim: int


def featurizer_spec(contexts: Contexts) -> str:
    """The spec of the featurizer ``contexts`` makes its vectors with, without building
    a model (the learners record it with their statistics and never featurize)."""
    settings = contexts.settings
    base: Any
    if settings.featurizer == "hashing":
        base = make_featurizer("hashing", settings.dim, seed=settings.featurizer_seed,
                               hashing_version=contexts.hashing_version())
    else:
        base = _Named(SentenceEmbeddingFeaturizer.spec_of(settings.dim,
                                                          settings.featurizer_seed),
                      settings.dim)
    return contexts.with_tag_block(str(
        (base if contexts.prototype_map is None
         else PrototypeFeaturizer(base, contexts.prototype_map)).spec))


def streams_config(settings: Settings, *, contexts: Contexts | None = None) -> StreamsConfig:
    """The pipeline configuration carried by the service settings.

    The statistics' dimension is the policies' context dimension: the prototype map's
    ``dim`` when ``BANDIT_ROUTER_PROTOTYPE_MAP`` is set (loaded here unless ``contexts``
    is given), else ``BANDIT_ROUTER_DIM``. A learner therefore needs the same map file as
    the API replicas. The featurizer's spec (:func:`featurizer_spec`) is stored with the
    statistics and checked against them.
    """
    if not settings.kafka_bootstrap:
        raise ValueError("kafka_bootstrap is not set: distributed mode is off")
    if contexts is None:
        contexts = Contexts(settings)
    dim = contexts.dim
    return StreamsConfig(
        bootstrap=settings.kafka_bootstrap, feedback_topic=settings.feedback_topic,
        decisions_topic=settings.decisions_topic,
        dead_letter_topic=settings.dead_letter_topic, partitions=settings.topic_partitions,
        group_id=settings.learner_group, dim=dim,
        pending_timeout_s=settings.feedback_pending_timeout_s,
        retention_hours=settings.feedback_retention_hours,
        max_poll_records=settings.learner_max_poll_records,
        metrics_port=settings.learner_metrics_port,
        half_life_hours=settings.half_life_hours,
        feedback_rows=settings.learner_feedback_rows,
        featurizer=featurizer_spec(contexts), tag_dims=contexts.tag_dims).validated()




def distributed(core: Core) -> Components:
    """Feedback to the feedback topic, decisions also to the decisions topic, policies
    from the learners' statistics."""
    if core.engine.dialect.name != "postgresql":
        raise ValueError("distributed mode (kafka_bootstrap set) needs a PostgreSQL "
                         "database_url; got " + core.engine.dialect.name)
    config = streams_config(core.settings, contexts=core.contexts)
    sink = KafkaFeedback(config, core.writer, core.metrics)
    return Components(sink=sink,
                      statistics=FollowedStatistics(core.settings, config, core.policies,
                                                    core.guards),
                      on_queued=sink.publish)


class KafkaFeedback:
    """The feedback sink: ``POST /v1/feedback`` produced to the feedback topic (a learner
    applies it); and the publisher of the decisions topic."""

    def __init__(self, config: StreamsConfig, writer: DecisionWriter, metrics: Any) -> None:
        self.streams = config
        self.writer = writer
        self.metrics = metrics
        self.producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        self._producer_resetting = False
        self._stop_producer = threading.Event()
        self._decisions: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=10_000)
        self._publisher: threading.Thread | None = None
        self.dropped_decision_events = 0

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.producer = self._new_producer()
        self._publisher = threading.Thread(target=self._publish_loop,
                                           name="decision-publisher", daemon=True)
        self._publisher.start()

    def stop(self) -> None:
        self._stop_producer.set()
        self._decisions.put(None)
        if self._publisher is not None:
            self._publisher.join(10)
        if self.producer is not None:
            self.producer.close(timeout=10)

    def close(self) -> None:
        """Nothing buffered on disk."""

    def wake(self) -> None:
        """Nothing waits for the database."""

    def buffered(self) -> int:
        return 0

    def outage_serving(self) -> str:
        return outage_serving(self.writer.spool, None)

    def degraded(self) -> dict[str, str]:
        if not self._producer_resetting:
            return {}
        return {"broker": "unreachable; feedback refused with 503 + Retry-After until "
                          "the producer reconnects"}

    def _new_producer(self) -> KafkaProducer:
        return KafkaProducer(bootstrap_servers=self.streams.bootstrap, acks="all",
                             linger_ms=2, client_id="bandit-router-api")

    def _reset_producer(self) -> None:
        """Replace the producer after a send failed, in the background.

        A broker restart that forgets producer ids leaves kafka-python's idempotent
        producer in a fatal state in which every later send fails; a new producer starts
        a new session. Building one blocks while the broker is down, so a thread retries
        it until the broker answers, and requests meanwhile get 503 + Retry-After.
        """
        with self._producer_lock:
            if self._producer_resetting:
                return
            self._producer_resetting = True
        threading.Thread(target=self._replace_producer, daemon=True,
                         name="producer-reset").start()

    def _replace_producer(self) -> None:
        try:
            while not self._stop_producer.is_set():
                try:
                    fresh = self._new_producer()
                    break
                except KafkaError as exc:
                    log.warning("feedback producer not replaced yet (%s); retrying",
                                type(exc).__name__)
                    self._stop_producer.wait(1.0)
            else:
                return
            old, self.producer = self.producer, fresh
            log.warning("feedback producer replaced after a send failure")
            if old is not None:
                self._retire_producer(old)
        finally:
            with self._producer_lock:
                self._producer_resetting = False

    @staticmethod
    def _retire_producer(old: KafkaProducer) -> None:
        """Close a producer whose sends failed, never raising in the reset thread.

        Its unsent records are the failed sends (their requests were answered 503), but
        kafka-python's ``close`` first flushes them and raises ``KafkaTimeoutError``
        while the broker is away, leaving the producer open (its ``__del__`` then raises
        again). There is no public way to drop them: abort them as ``close`` itself does
        after its timeout (the sender's ``force_close``), then close.
        """
        try:
            old.close(timeout=1)
            return
        except KafkaError as exc:
            log.info("old feedback producer did not flush (%s): dropping its failed "
                     "sends", type(exc).__name__)
        sender = getattr(old, "_sender", None)
        if sender is not None:
            sender.force_close()
        try:
            old.close(timeout=1)
        except KafkaError as exc:
            log.warning("old feedback producer not closed: %s", type(exc).__name__)

    # ------------------------------------------------------------ feedback
    def submit(self, tenant: TenantState, decision_id: str,
               outcome: dict[str, float | None], event_id: str | None) -> FeedbackReceipt:
        event = FeedbackEvent(event_id or "", decision_id, tenant.id,
                              quality=outcome.get("quality"), cost_usd=outcome.get("cost_usd"),
                              latency_ms=outcome.get("latency_ms"), sent_at=time.time())
        producer = self.producer
        if self._producer_resetting:
            # A send already failed and the producer is being rebuilt: answer at once
            # rather than after another 10 s send timeout. Nothing was sent.
            raise UnavailableError("the feedback topic is unavailable (broker "
                                   "unreachable); retry", retry_after_s=1, unsent=True)
        # Refused by the producer (no producer, no metadata within max_block_ms, buffer
        # full, closed): the event is certainly not on the topic (``unsent``, so a claim
        # made for it may be released). Once it is in the producer's buffer, a failure
        # or a timeout waiting for the broker's acknowledgement may follow a write.
        unsent = True
        try:
            if producer is None:
                raise KafkaError("no producer")
            future = producer.send(self.streams.feedback_topic, key=decision_id.encode(),
                                   value=encode_feedback(event))
            unsent = False
            future.get(timeout=10)
        except KafkaError as exc:
            self._reset_producer()
            raise UnavailableError(f"the feedback topic is unavailable "
                                   f"({type(exc).__name__}); retry",
                                   retry_after_s=1, unsent=unsent) from None
        self.metrics.feedback.labels("queued").inc()
        return FeedbackReceipt("queued", None)

    # ------------------------------------------------------------ decisions topic
    def publish(self, row: dict[str, Any]) -> None:
        """Queue a decision (queued for the writer) for the decisions topic; a full
        queue drops the event (counted), never the decision."""
        try:
            self._decisions.put_nowait(row)
        except queue.Full:
            self.dropped_decision_events += 1

    def _publish_loop(self) -> None:
        while True:
            row = self._decisions.get()
            if row is None or self.producer is None:
                return
            try:
                event = DecisionEvent(
                    decision_id=row["id"], tenant_id=row["tenant_id"], model=row["model"],
                    propensity=row["propensity"],
                    context=np.frombuffer(row["context"], dtype="<f8").tolist(),
                    predictions=row["predictions"], policy=row["policy"],
                    policy_version=row["policy_version"], scope=row["scope"],
                    created_at=row["created_at"].timestamp(), tags=row.get("tags"))
                self.producer.send(self.streams.decisions_topic, key=row["id"].encode(),
                                   value=encode_decision(event))
            except Exception:
                log.exception("publishing decision %s failed", row.get("id"))


class FollowedStatistics:
    """The statistics source: the policy store is the registry's priors plus the sum of
    the learners' partition statistics, swapped in whenever they change.

    Guarded tenants' accounts (:class:`service.guards.Guards`) follow the learners too:
    the learners write each guarded decision's outcome and reward into
    ``decisions.guard`` (streams/learner.py), and after the statistics changed the
    accounts are brought up to date from the decision log, at most every
    ``guard_refresh_s``, in a thread of their own (:class:`service.guards.GuardFollower`:
    only the changes since the last refresh, equal to a full rebuild). The accounts
    also count the other replicas' decisions, which a replica's
    own count misses; a decision of this replica still queued for the database when a
    rebuild reads is missing from the account until the next rebuild.
    """

    def __init__(self, settings: Settings, config: StreamsConfig,
                 policies: PolicyStore, guards: Guards | None = None, *,
                 guard_refresh_s: float = 2.0) -> None:
        self.policies = policies
        self.follower = StatisticsFollower(
            settings.resolved_database_url(), config, self._install,
            poll_interval_s=settings.snapshot_poll_interval_s)
        #: Per partition, the stored offset the current snapshot includes.
        self.snapshot_offsets: dict[int, int] = {}
        self.guards = guards
        self.guard_follower = None if guards is None else GuardFollower(
            guards, libpq_url(settings.resolved_database_url()))
        self.guard_refresh_s = guard_refresh_s
        self._guards_stale = threading.Event()
        self._stop_guards = threading.Event()
        self._guard_thread: threading.Thread | None = None

    def load(self) -> bool:
        """The registry's priors, until the first refresh (:meth:`start`)."""
        self.policies.restore({}, rebuild=False)
        return False

    def start(self) -> None:
        try:
            self.follower.refresh()  # the first decision already sees what was learned
        except psycopg.Error:
            log.exception("initial statistics load failed; serving the priors for now")
        self.follower.start()
        if self.guards is not None:
            self._guard_thread = threading.Thread(target=self._follow_guards,
                                                  name="guard-follower", daemon=True)
            self._guard_thread.start()

    def stop(self) -> None:
        self.follower.stop()
        self._stop_guards.set()
        self._guards_stale.set()
        if self._guard_thread is not None:
            self._guard_thread.join(10)

    def _follow_guards(self) -> None:
        """Rebuild the guarded tenants' accounts once the learners wrote (the outcomes
        they stored), at most every ``guard_refresh_s``."""
        assert self.guards is not None
        while not self._stop_guards.is_set():
            self._guards_stale.wait()
            if self._stop_guards.is_set():
                return
            self._guards_stale.clear()
            with self.policies.lock:
                guarded = [t for t in self.guards.registry.tenants.values()
                           if t.baseline_model is not None]
            try:
                self.guard_follower.refresh(guarded)
            except Exception:
                # The accounts in memory keep serving; the next write tries again.
                log.exception("guard accounts not rebuilt")
            self._stop_guards.wait(self.guard_refresh_s)

    def reloaded(self) -> None:
        """Never degraded: distributed mode does not start without the database."""

    def checkpoint(self, *, force: bool = False) -> bool:
        """No checkpoints: the partition statistics in PostgreSQL are the state."""
        return False

    def degraded(self) -> dict[str, str]:
        if self.follower.error is None:
            return {}
        return {"statistics": "not followed: " + self.follower.error}

    def _install(self, totals: dict[str, Policy], offsets: dict[int, int]) -> None:
        """Build base (priors) + sums for every policy, then swap them in at once."""
        store = self.policies
        shared = totals.get(SHARED_KEY)
        new_shared = {kind: self.snapshot(kind, shared) for kind in POLICY_KINDS}
        with store.lock:
            isolated_ids = list(store.isolated)
        new_isolated = {t: {kind: self.snapshot(kind, totals.get(f"tenant:{t}"))
                            for kind in POLICY_KINDS} for t in isolated_ids}
        store.install(new_shared, new_isolated)
        self.snapshot_offsets = offsets
        self._guards_stale.set()

    def snapshot(self, kind: str, total: Policy | None) -> Policy:
        """The registry's priors of ``kind`` plus the learners' sums ``total``."""
        store = self.policies
        with store.lock:
            policy = store.new_policy(kind)
        if total is not None and total.arms:
            # With the policy's own candidates: ``select`` keeps the learners'
            # prequential errors (the same candidates), the others have none.
            policy.merge(recast(total, POLICY_CLASSES[kind],
                                **candidate_settings(policy.config)))
            with store.lock:
                store.sync_arms(policy)  # arms the registry deleted (or never had) go
        return policy
