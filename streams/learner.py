"""The learner: a Kafka consumer-group member that applies feedback exactly once.

Per poll batch:

1. decode every record (a record that does not parse is a dead letter);
2. ONE query fetches the decisions of the batch (and of the pending events) by id;
3. classify each event: apply, dead-letter (other tenant, expired, bad context) or keep
   pending (decision not written yet, retried until ``pending_timeout_s`` after the
   record's timestamp);
4. produce the dead letters and wait for their acknowledgement;
5. for each partition, ONE PostgreSQL transaction: lock the partition's row and check
   its version (fencing a zombie owner), insert the events' keys into
   ``learner_applied`` with ``ON CONFLICT DO NOTHING RETURNING`` (a repeat is skipped),
   write the new ones into ``feedback`` (the history ``GET /v1/decisions/{id}`` shows)
   and apply them to the partition's statistics (``update_batch``), upsert the
   statistics, store the next offset, bump the version and ``NOTIFY``;
6. commit the Kafka offsets (for lag monitoring only: the database offset is the truth).

The stored offset never passes a pending event: it is the smallest pending offset, so
a crash re-reads from there, and the events after it that were applied are skipped by
the ``learner_applied`` key. See docs/streams.md for the whole argument.

On assignment the partition's statistics are loaded and the consumer seeks to the
stored offset; on revocation they are dropped (everything applied is already written).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bandit import Policy
from bandit.base import MAX_ABS_CONTEXT
from streams.config import StreamsConfig
from streams.schemas import (
    DeadLetter,
    FeedbackEvent,
    InvalidEventError,
    decode_feedback,
    encode_dead_letter,
)
from streams.stats import (
    SHARED_KEY,
    StatisticsMismatchError,
    check_stored,
    new_statistics,
    scope_key,
)
from streams.topics import ensure_topics

__all__ = ["Learner", "LearnerMetrics", "libpq_url", "NOTIFY_CHANNEL", "main"]

log = logging.getLogger("streams.learner")

#: PostgreSQL channel the learners NOTIFY after every partition write.
NOTIFY_CHANNEL = "bandit_stats"

# Tansu's group coordinator (and any broker) accepts these; the client defaults (10 s
# session, 3 s heartbeat) make a rebalance after a crash take longer.
DEFAULT_CONSUMER_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    # A fetch waits at most this long for data: the visibility latency at low load.
    "fetch_max_wait_ms": 100,
    # kafka-python computes CRC32C in pure Python: a fifth of the learner's time at
    # 10k events/s. TCP and the broker checksum the data already; a corrupt record
    # would fail JSON/schema validation and be dead-lettered, not applied.
    "check_crcs": False,
}


def libpq_url(url: str) -> str:
    """``postgresql://`` form of a SQLAlchemy ``postgresql+psycopg://`` URL.

    >>> libpq_url("postgresql+psycopg://u@h:5432/db")
    'postgresql://u@h:5432/db'
    """
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}" if sep else url


class LearnerMetrics:
    """Prometheus metrics of one learner, in their own registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("bandit_learner_events", "Feedback records by outcome",
                              ["outcome"], registry=self.registry)
        self.dead_letters = Counter("bandit_learner_dead_letters",
                                    "Records sent to the dead-letter topic", ["reason"],
                                    registry=self.registry)
        self.lag = Gauge("bandit_learner_lag", "Records behind the end of the partition "
                         "(from the stored offset)", ["partition"], registry=self.registry)
        self.pending = Gauge("bandit_learner_pending", "Events waiting for their decision",
                             registry=self.registry)
        self.partitions = Gauge("bandit_learner_partitions", "Partitions owned",
                                registry=self.registry)
        self.batch_seconds = Histogram("bandit_learner_batch_seconds",
                                       "Time to process one poll batch",
                                       registry=self.registry)
        self.poll_errors = Counter("bandit_learner_poll_errors",
                                   "Polls that failed (broker unreachable); retried",
                                   registry=self.registry)


@dataclass
class _Pending:
    offset: int
    key: bytes | None
    value: bytes
    event: FeedbackEvent
    deadline: float
    #: When the event entered the topic (the record's timestamp, at most the learner's
    #: clock), seconds since the epoch: the ``received_at`` of its feedback row.
    received_at: float


@dataclass
class _Partition:
    tp: TopicPartition
    version: int
    stored_offset: int  # -1: nothing stored yet (start at the beginning)
    stats: dict[str, Policy]
    next_offset: int = -1  # the offset after the last record taken from a poll
    pending: list[_Pending] = field(default_factory=list)

    def offset_to_store(self) -> int:
        if self.pending:
            return min(p.offset for p in self.pending)
        return self.next_offset if self.next_offset >= 0 else self.stored_offset


class _LostOwnership(Exception):
    """Another learner wrote this partition since we loaded it."""


class _Listener(ConsumerRebalanceListener):
    def __init__(self, learner: Learner) -> None:
        self.learner = learner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.learner._drop(revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.learner._assign(assigned)


class Learner:
    """One member of the learners' consumer group.

    Parameters
    ----------
    config
        Topics, group and limits (:class:`~streams.config.StreamsConfig`).
    database_url
        PostgreSQL URL (SQLAlchemy or libpq form).
    consumer_settings
        Extra :class:`kafka.KafkaConsumer` keyword arguments.
    clock
        Seconds since the epoch (tests move it).
    """

    def __init__(self, config: StreamsConfig, database_url: str, *,
                 consumer_settings: dict[str, Any] | None = None,
                 client_id: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config.validated()
        self.database_url = libpq_url(database_url)
        self.client_id = client_id or f"bandit-learner-{socket.gethostname()}"
        self.consumer_settings = {**DEFAULT_CONSUMER_SETTINGS, **(consumer_settings or {})}
        self.clock = clock
        self.metrics = LearnerMetrics()
        self.partitions: dict[TopicPartition, _Partition] = {}
        self._running = threading.Event()
        self._conn: psycopg.Connection | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self._last_lag_log = 0.0
        self._last_prune = time.monotonic()
        self._fatal: Exception | None = None
        self.batches = 0

    # ------------------------------------------------------------ life cycle
    def start(self, *, create_topics: bool = True) -> None:
        if create_topics:
            ensure_topics(self.config)
        self._conn = psycopg.connect(self.database_url, autocommit=False)
        self._check_stored_statistics()
        self.producer = KafkaProducer(bootstrap_servers=self.config.bootstrap, acks="all",
                                      linger_ms=5, client_id=f"{self.client_id}-dlq")
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.config.bootstrap, group_id=self.config.group_id,
            client_id=self.client_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.config.max_poll_records,
            **self.consumer_settings)
        self.consumer.subscribe([self.config.feedback_topic], listener=_Listener(self))
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, registry=self.metrics.registry)
        self._running.set()

    def _check_stored_statistics(self) -> None:
        """Refuse to start on statistics learned with another half-life or dimension (before
        joining the group: a refusal inside the rebalance callback would only be logged)."""
        conn = self._db()
        with conn.transaction():
            row = conn.execute(
                "SELECT partition, key, data FROM partition_statistics"
                " WHERE group_id = %s AND topic = %s LIMIT 1",
                (self.config.group_id, self.config.feedback_topic)).fetchone()
        if row is not None:
            where = f"partition {row[0]} ({row[1]}) of group {self.config.group_id!r}"
            check_stored(Policy.from_bytes(bytes(row[2])), self.config.dim,
                         self.config.half_life_hours, where)

    def stop(self) -> None:
        """Ask the loop to stop after the current batch (safe from a signal handler)."""
        self._running.clear()

    @property
    def running(self) -> bool:
        return self._running.is_set()

    def close(self) -> None:
        # Leave the group at once (the partitions move without waiting for the session
        # timeout); nothing is committed here: every batch was written already.
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing must not hide the real error
                log.exception("closing the consumer failed")
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=10)
            except Exception:  # noqa: BLE001
                log.exception("closing the producer failed")
            self.producer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, *, max_seconds: float | None = None) -> None:
        """Start, loop until :meth:`stop` (or ``max_seconds``), close in ``finally``."""
        _limit_blas_threads()
        try:
            if self.consumer is None:
                self.start()
            deadline = None if max_seconds is None else time.monotonic() + max_seconds
            while self.running and (deadline is None or time.monotonic() < deadline):
                self.step()
        finally:
            self.close()

    def step(self, timeout_ms: int = 500) -> int:
        """Poll once and process the batch; returns the number of records taken."""
        assert self.consumer is not None
        try:
            records = self.consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as exc:
            # The broker is away (a restart, the network). kafka-python lets a failed
            # coordinator lookup out of poll(); the client reconnects by itself, and the
            # offsets in PostgreSQL are the truth, so wait and poll again, not exit.
            self.metrics.poll_errors.inc()
            log.warning("poll failed (%r); polling again in 1 s", exc)
            time.sleep(1.0)
            return 0
        if self._fatal is not None:
            raise self._fatal
        started = time.perf_counter()
        taken = self._process(records)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self._report_lag()
        if time.monotonic() - self._last_prune > 3600.0:
            self._last_prune = time.monotonic()
            log.info("pruned %d idempotency keys past retention", self.prune_applied())
        return taken

    # ------------------------------------------------------------ assignment
    def _assign(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            try:
                state = self._load(tp)
            except StatisticsMismatchError as exc:
                # kafka-python only logs a listener's exception: stop, and let step()
                # raise it, rather than own a partition without its statistics.
                self._fatal = exc
                self.stop()
                return
            self.partitions[tp] = state
            self._seek(state)
        self.metrics.partitions.set(len(self.partitions))
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    def _drop(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.partitions.pop(tp, None)
            try:
                self.metrics.lag.remove(str(tp.partition))
            except KeyError:
                pass
        self.metrics.partitions.set(len(self.partitions))
        log.info("revoked %s", sorted(tp.partition for tp in revoked))

    def _seek(self, state: _Partition) -> None:
        assert self.consumer is not None
        if state.stored_offset >= 0:
            self.consumer.seek(state.tp, state.stored_offset)
        else:
            self.consumer.seek_to_beginning(state.tp)

    def _load(self, tp: TopicPartition) -> _Partition:
        conn = self._db()
        ident = (self.config.group_id, tp.topic, tp.partition)
        with conn.transaction():
            conn.execute(
                "INSERT INTO learner_partitions (group_id, topic, partition, next_offset,"
                " version, updated_at) VALUES (%s, %s, %s, -1, 0, now())"
                " ON CONFLICT (group_id, topic, partition) DO NOTHING", ident)
            offset, version = conn.execute(
                "SELECT next_offset, version FROM learner_partitions"
                " WHERE group_id = %s AND topic = %s AND partition = %s", ident).fetchone()
            blobs = conn.execute(
                "SELECT key, data FROM partition_statistics"
                " WHERE group_id = %s AND topic = %s AND partition = %s", ident).fetchall()
        stats = {key: check_stored(Policy.from_bytes(bytes(data)), self.config.dim,
                                   self.config.half_life_hours,
                                   f"partition {tp.partition} ({key})")
                 for key, data in blobs}
        return _Partition(tp, int(version), int(offset), stats)

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=False)
        return self._conn

    # ------------------------------------------------------------ processing
    def _process(self, records: dict[TopicPartition, list[Any]]) -> int:
        now = self.clock()
        touched: set[TopicPartition] = set()
        dead: list[tuple[Any, str, str]] = []  # (record-like, reason, detail)
        candidates: list[tuple[_Partition, _Pending]] = []
        taken = 0
        for tp, batch in records.items():
            state = self.partitions.get(tp)
            if state is None:
                continue  # revoked while the batch was in flight
            for record in batch:
                if record.offset < state.next_offset or record.offset < state.stored_offset:
                    continue  # delivered again after a seek
                state.next_offset = record.offset + 1
                taken += 1
                touched.add(tp)
                try:
                    event = decode_feedback(record.value)
                except InvalidEventError as exc:
                    dead.append((_Origin(tp, record.offset, record.key, record.value),
                                 exc.reason, str(exc)))
                    continue
                sent = record.timestamp / 1e3 if record.timestamp and record.timestamp > 0 \
                    else now
                received = min(sent, now)
                candidates.append((state, _Pending(record.offset, record.key, record.value,
                                                   event, received + self.config.pending_timeout_s,
                                                   received)))
        for state in self.partitions.values():
            if state.pending:
                touched.add(state.tp)
                candidates.extend((state, p) for p in state.pending)
                state.pending = []
        if not touched:
            return 0

        decisions = self._fetch_decisions({p.event.decision_id for _, p in candidates})
        apply: dict[TopicPartition, list[tuple[_Pending, tuple]]] = {}
        horizon = now - self.config.retention_hours * 3600.0
        for state, item in candidates:
            row = decisions.get(item.event.decision_id)
            origin = _Origin(state.tp, item.offset, item.key, item.value)
            if row is None:
                if now < item.deadline:
                    state.pending.append(item)
                else:
                    dead.append((origin, "unknown-decision",
                                 f"decision_id: no decision {item.event.decision_id!r} after "
                                 f"{self.config.pending_timeout_s:g} s"))
                continue
            tenant_id, _model, _scope, context, created_at = row
            if tenant_id != item.event.tenant_id:
                dead.append((origin, "tenant-mismatch", "tenant_id: the decision belongs to "
                             "another tenant"))
            elif created_at.timestamp() < horizon:
                dead.append((origin, "decision-expired", "decision_id: the decision is older "
                             f"than the retention window ({self.config.retention_hours:g} h)"))
            elif len(context) != 8 * self.config.dim:
                dead.append((origin, "invalid-event", "context: the decision's context has "
                             f"{len(context) // 8} dimensions, the learner {self.config.dim}"))
            elif not _context_ok(context):
                # A huge (finite) embedding would overflow the shared sums to inf/NaN.
                dead.append((origin, "invalid-event", "context: the decision's context has "
                             f"values outside +-{MAX_CONTEXT_ABS:g} or not finite"))
            else:
                apply.setdefault(state.tp, []).append((item, row))

        self._send_dead_letters(dead, now)
        writes = []
        for tp in sorted(touched, key=lambda t: t.partition):
            state = self.partitions.get(tp)
            if state is None:
                continue
            items = apply.get(tp, [])
            if items or state.offset_to_store() != state.stored_offset:
                writes.append((state, items))
        for i, (state, items) in enumerate(writes):
            # One NOTIFY per batch, with its last transaction: the deciders then reload
            # every partition of the batch at once instead of chasing them one by one
            # (their version poll covers a batch that fails half-way).
            self._write_partition(state, items, notify=i == len(writes) - 1)
        self.metrics.pending.set(sum(len(s.pending) for s in self.partitions.values()))
        self._commit_kafka()
        self.batches += 1
        return taken

    def _fetch_decisions(self, ids: set[str]) -> dict[str, tuple]:
        if not ids:
            return {}
        conn = self._db()
        with conn.transaction():
            rows = conn.execute(
                "SELECT id, tenant_id, model, scope, context, created_at FROM decisions"
                " WHERE id = ANY(%s)", (list(ids),)).fetchall()
        return {r[0]: r[1:] for r in rows}

    def _send_dead_letters(self, dead: list[tuple[Any, str, str]], now: float) -> None:
        if not dead:
            return
        assert self.producer is not None
        futures = []
        for origin, reason, detail in dead:
            letter = DeadLetter(reason, detail, origin.tp.topic, origin.tp.partition,
                                origin.offset, origin.key, origin.value or b"", now)
            futures.append(self.producer.send(self.config.dead_letter_topic,
                                              key=origin.key, value=encode_dead_letter(letter)))
            self.metrics.dead_letters.labels(reason).inc()
            self.metrics.events.labels("dead_lettered").inc()
        # The dead letters are durable BEFORE the offset that passes them is stored: a
        # crash in between sends them again (at least once), never loses one.
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)
        log.warning("dead-lettered %d records (%s)", len(dead),
                    ", ".join(sorted({reason for _, reason, _ in dead})))

    def _write_partition(self, state: _Partition, items: list[tuple[_Pending, tuple]], *,
                         notify: bool = True) -> None:
        """One transaction: fence, dedupe, apply, store statistics + offset, notify."""
        conn = self._db()
        ident = (self.config.group_id, state.tp.topic, state.tp.partition)
        # Partition order: pending events come after the new records of the poll, but
        # the first of two repeats must win (its values are the feedback row's), the last
        # cost is the charge, and the feedback rows' ids follow the partition.
        items = sorted(items, key=lambda it: it[0].offset)
        # A repeat inside the batch is skipped here; one across batches by the insert.
        unique: dict[tuple[str, str], tuple[_Pending, tuple]] = {}
        for item, row in items:
            unique.setdefault((item.event.decision_id, item.event.event_id), (item, row))
        duplicates_in_batch = len(items) - len(unique)
        try:
            with conn.transaction():
                found = conn.execute(
                    "SELECT version FROM learner_partitions WHERE group_id = %s"
                    " AND topic = %s AND partition = %s FOR UPDATE", ident).fetchone()
                if found is None or int(found[0]) != state.version:
                    raise _LostOwnership(state.tp)
                fresh = set(self._insert_applied(conn, list(unique.values())))
                applied = [item for k, item in unique.items() if k in fresh]  # in order
                if self.config.feedback_rows:
                    self._insert_feedback(conn, applied)
                if self.config.reconcile_spend:
                    self._reconcile_spend(conn, applied)
                changed = self._apply(state, applied)
                if changed:
                    conn.cursor().executemany(
                        "INSERT INTO partition_statistics (group_id, topic, partition, key,"
                        " data) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (group_id, topic,"
                        " partition, key) DO UPDATE SET data = EXCLUDED.data",
                        # Sums only: the readers recompute inverses exactly, half the bytes.
                        [(*ident, key, state.stats[key].to_bytes(derived=False))
                         for key in changed])
                offset = state.offset_to_store()
                conn.execute(
                    "UPDATE learner_partitions SET next_offset = %s, version = version + 1,"
                    " updated_at = now() WHERE group_id = %s AND topic = %s"
                    " AND partition = %s", (offset, *ident))
                if notify:
                    conn.execute("SELECT pg_notify(%s, %s)",
                                 (NOTIFY_CHANNEL, f"{state.tp.partition}:{state.version + 1}"))
        except _LostOwnership:
            log.warning("partition %d was written by another learner: reloading it",
                        state.tp.partition)
            self._reload(state.tp)
            return
        except Exception:
            # The in-memory statistics may hold the batch the database refused: reload
            # them and re-read from the stored offset, then let the caller see the error.
            self._reload(state.tp)
            raise
        state.version += 1
        state.stored_offset = offset
        n_dup = len(unique) - len(applied) + duplicates_in_batch
        self.metrics.events.labels("applied").inc(len(applied))
        if n_dup:
            self.metrics.events.labels("duplicate").inc(n_dup)

    def _reload(self, tp: TopicPartition) -> None:
        if tp in self.partitions:
            try:
                fresh = self._load(tp)
            except Exception:
                self.partitions.pop(tp, None)
                raise
            self.partitions[tp] = fresh
            self._seek(fresh)

    def _insert_applied(self, conn: psycopg.Connection,
                        items: list[tuple[_Pending, tuple]]) -> list[tuple[str, str]]:
        """Record the events as applied; returns the ones not recorded before."""
        if not items:
            return []
        events = [item.event for item, _ in items]
        rows = conn.execute(
            "INSERT INTO learner_applied (group_id, decision_id, event_id)"
            " SELECT %s, d, e FROM unnest(%s::varchar[], %s::varchar[]) AS u(d, e)"
            " ON CONFLICT (group_id, decision_id, event_id) DO NOTHING"
            " RETURNING decision_id, event_id",
            (self.config.group_id, [e.decision_id for e in events],
             [e.event_id for e in events])).fetchall()
        return [(r[0], r[1]) for r in rows]

    @staticmethod
    def _insert_feedback(conn: psycopg.Connection,
                         applied: list[tuple[_Pending, tuple]]) -> None:
        """The applied events as ``feedback`` rows, as the embedded mode stores them: in the
        partition's transaction (so exactly once, with the statistics), one INSERT for
        the batch. Only events applied now come here (``learner_applied`` said they are
        new to this group); ``ON CONFLICT DO NOTHING`` keeps the first row when another
        consumer group (started afresh, it re-reads the topic) applies an event again.

        Arrays go in binary (``%b``): in text form, formatting and parsing the 7 arrays
        took about as long as the insert itself. A missing value travels as NaN (which no
        applied event has: the schema refuses NaN) and becomes NULL."""
        if not applied:
            return
        nan = float("nan")
        events = [item.event for item, _ in applied]
        conn.execute(
            "INSERT INTO feedback (decision_id, tenant_id, event_id, quality, cost_usd,"
            " latency_ms, created_at)"
            " SELECT d, t, e, nullif(q, 'NaN'), nullif(c, 'NaN'), nullif(l, 'NaN'),"
            " to_timestamp(r) FROM unnest(%b::varchar[], %b::varchar[], %b::varchar[],"
            " %b::float8[], %b::float8[], %b::float8[], %b::float8[])"
            " WITH ORDINALITY AS u(d, t, e, q, c, l, r, n)"
            # ids in partition order, like the embedded mode's ids in arrival order
            " ORDER BY n ON CONFLICT (decision_id, event_id) DO NOTHING",
            ([e.decision_id for e in events], [e.tenant_id for e in events],
             [e.event_id for e in events],
             [nan if e.quality is None else e.quality for e in events],
             [nan if e.cost_usd is None else e.cost_usd for e in events],
             [nan if e.latency_ms is None else e.latency_ms for e in events],
             [item.received_at for item, _ in applied]))

    @staticmethod
    def _reconcile_spend(conn: psycopg.Connection,
                         applied: list[tuple[_Pending, tuple]]) -> None:
        """The real cost a feedback reports replaces the decision's predicted one in
        ``decisions.charged_usd``, in the partition's transaction (so exactly once), as
        the embedded mode does: the API replicas' budgets and ``/usage`` read it
        (service/budget.py, "Several replicas"). The last cost of a batch wins, in the
        partition's order (a decision's events share a partition)."""
        costs: dict[str, float] = {}
        for item, _ in applied:
            if item.event.cost_usd is not None:
                costs[item.event.decision_id] = item.event.cost_usd
        if costs:
            conn.execute(
                "UPDATE decisions AS d SET charged_usd = u.c"
                " FROM unnest(%s::varchar[], %s::float8[]) AS u(id, c) WHERE d.id = u.id",
                (list(costs), list(costs.values())))

    def prune_applied(self) -> int:
        """Forget idempotency keys older than the retention window (safe: see the table)."""
        conn = self._db()
        with conn.transaction():
            cur = conn.execute(
                "DELETE FROM learner_applied WHERE group_id = %s"
                " AND applied_at < now() - make_interval(secs => %s)",
                (self.config.group_id, self.config.retention_hours * 3600.0))
        return cur.rowcount

    def _apply(self, state: _Partition, applied: list[tuple[_Pending, tuple]]) -> list[str]:
        """Add the events to the partition's statistics; returns the keys changed."""
        groups: dict[str, list[tuple[_Pending, tuple]]] = {}
        for item, row in applied:
            groups.setdefault(SHARED_KEY, []).append((item, row))
            extra = scope_key(row[2], row[0])
            if extra is not None:
                groups.setdefault(extra, []).append((item, row))
        for key, rows in groups.items():
            policy = state.stats.get(key)
            if policy is None:
                policy = state.stats[key] = new_statistics(self.config.dim,
                                                           self.config.half_life_hours)
            known = set(policy.arms)
            for _, row in rows:
                if row[1] not in known:
                    # An arm is known to the statistics from its first feedback on; its
                    # prior lives with the deciders (it is counted once, there).
                    policy.add_arm(row[1])
                    known.add(row[1])
            x = np.frombuffer(b"".join(row[3] for _, row in rows), dtype="<f8")
            # An (n, 3) array: bandit validates it in one vectorized pass.
            y = np.array([[np.nan if v is None else v for v in (
                item.event.quality, item.event.cost_usd, item.event.latency_ms)]
                for item, _ in rows], dtype=np.float64)
            # Forgetting runs on event time, the decision's created_at (stored by the API,
            # the same on every re-read), never on the wall clock at apply time: a replay
            # after a crash or on another learner must produce the same sums.
            times = (None if self.config.half_life_hours is None
                     else [row[4].timestamp() for _, row in rows])
            policy.update_batch([row[1] for _, row in rows],
                                x.reshape(len(rows), self.config.dim), y, times=times)
        return list(groups)

    # ------------------------------------------------------------ kafka offsets
    def _commit_kafka(self, attempts: int = 10) -> None:
        assert self.consumer is not None
        offsets = {tp: OffsetAndMetadata(s.stored_offset, "", -1)
                   for tp, s in self.partitions.items() if s.stored_offset >= 0}
        if not offsets:
            return
        for attempt in range(attempts):
            try:
                self.consumer.commit(offsets)
                return
            except RebalanceInProgressError:
                if attempt == attempts - 1:
                    break
                # Take part in the rebalance without taking records: pause, poll.
                paused = set(self.consumer.assignment())
                self.consumer.pause(*paused)
                try:
                    stray = self.consumer.poll(timeout_ms=200)
                    # Partitions assigned by this very poll are not paused and may hand
                    # out records: put them back, or the next batch would skip them.
                    for tp, batch in stray.items():
                        if batch:
                            self.consumer.seek(tp, batch[0].offset)
                finally:
                    still = paused & set(self.consumer.assignment())
                    if still:
                        self.consumer.resume(*still)
                offsets = {tp: o for tp, o in offsets.items() if tp in self.partitions}
                if not offsets:
                    return
            except (CommitFailedError, KafkaError) as exc:
                # The database offset is the truth; the Kafka one only feeds lag tools.
                log.info("kafka offset commit skipped: %r", exc)
                return

    def _report_lag(self) -> None:
        assert self.consumer is not None
        total = 0
        for tp, state in self.partitions.items():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            lag = max(high - max(state.offset_to_store(), 0), 0)
            total += lag
            self.metrics.lag.labels(str(tp.partition)).set(lag)
        now = time.monotonic()
        if now - self._last_lag_log > 10.0:
            self._last_lag_log = now
            log.info("partitions %s, lag %d, pending %d, batches %d",
                     sorted(tp.partition for tp in self.partitions), total,
                     sum(len(s.pending) for s in self.partitions.values()), self.batches)


#: Largest absolute context value the learner applies: bandit's own bound.
MAX_CONTEXT_ABS = MAX_ABS_CONTEXT


def _context_ok(context: bytes) -> bool:
    x = np.frombuffer(context, dtype="<f8")
    return bool(np.isfinite(x).all() and (np.abs(x) <= MAX_CONTEXT_ABS).all())


@dataclass(frozen=True, slots=True)
class _Origin:
    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None


def _limit_blas_threads() -> None:
    # update_batch multiplies small (n, 65) matrices: OpenBLAS threads only contend
    # (measured 15 ms instead of 40 us per product on two busy cores).
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then OPENBLAS_NUM_THREADS=1 is the way
        return
    threadpool_limits(1)


def main(argv: list[str] | None = None) -> None:
    """``python -m streams.learner``: a learner from command-line options (tests, ops)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = StreamsConfig(bootstrap="")  # the defaults, written once (StreamsConfig)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--feedback-topic", default=d.feedback_topic)
    parser.add_argument("--dead-letter-topic", default=d.dead_letter_topic)
    parser.add_argument("--decisions-topic", default=d.decisions_topic)
    parser.add_argument("--group-id", default=d.group_id)
    parser.add_argument("--dim", type=int, default=d.dim)
    parser.add_argument("--partitions", type=int, default=d.partitions)
    parser.add_argument("--pending-timeout-s", type=float, default=d.pending_timeout_s)
    parser.add_argument("--max-poll-records", type=int, default=d.max_poll_records)
    parser.add_argument("--metrics-port", type=int, default=d.metrics_port)
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--no-create-topics", action="store_true")
    parser.add_argument("--half-life-hours", type=float, default=d.half_life_hours,
                        help="forgetting by event time (same as the API replicas' "
                             "BANDIT_ROUTER_HALF_LIFE_HOURS); default none")
    parser.add_argument("--no-reconcile-spend", action="store_true",
                        help="do not write real costs into decisions.charged_usd")
    parser.add_argument("--no-feedback-rows", action="store_true",
                        help="do not write applied events into the feedback table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = StreamsConfig(
        bootstrap=args.bootstrap, feedback_topic=args.feedback_topic,
        decisions_topic=args.decisions_topic, dead_letter_topic=args.dead_letter_topic,
        group_id=args.group_id, dim=args.dim, partitions=args.partitions,
        pending_timeout_s=args.pending_timeout_s, max_poll_records=args.max_poll_records,
        metrics_port=args.metrics_port, reconcile_spend=not args.no_reconcile_spend,
        half_life_hours=args.half_life_hours, feedback_rows=not args.no_feedback_rows)
    learner = Learner(config, args.database_url, client_id=args.client_id)
    run_until_signalled(learner, create_topics=not args.no_create_topics)


def run_until_signalled(learner: Learner, *, create_topics: bool = True) -> None:
    """Run ``learner``; SIGTERM / SIGINT flip its run flag (the batch is finished)."""
    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the batch, then stopping", signum)
        learner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _limit_blas_threads()
    try:
        learner.start(create_topics=create_topics)
        learner.run()
    finally:
        learner.close()
    log.info("learner stopped after %d batches", learner.batches)


if __name__ == "__main__":
    main()
