"""The learner: a Kafka consumer-group member that applies feedback exactly once.

Per poll batch:

1. decode every record (a record that does not parse is a dead letter);
2. ONE query fetches the decisions of the batch (and of the pending events) by id;
3. classify each event: apply, dead-letter (other tenant, expired, bad context) or keep
   pending (decision not written yet, retried until ``pending_timeout_s`` after the
   record's timestamp);
4. produce the dead letters and wait for their acknowledgement;
5. for each partition, apply the events to its in-memory statistics (``update_batch``,
   each (decision_id, event_id) once, repeats of the previous write dropped) and
   serialize the changed keys; then ONE PostgreSQL transaction: lock the partition's row
   and check its version (fencing a zombie owner), record the events as applied by the
   group with ``ON CONFLICT DO NOTHING RETURNING`` (a repeat is skipped): their
   ``feedback`` rows (the history ``GET /v1/decisions/{id}`` shows), which name the
   group and are its key, or ``learner_applied`` keys when rows are off or another
   group wrote the row first; upsert the statistics, store the next offset, bump the
   version and ``NOTIFY``. When the database finds a repeat the loop could not see (an
   event applied in an earlier batch), the transaction reads the statistics back (the
   row lock holds them at the previous batch), applies only the fresh events to them
   and writes those; the loop takes them over;
6. commit the Kafka offsets (for lag monitoring only: the database offset is the truth).

Pipelining: the transactions of step 5 run in a writer thread, on its own connection,
while the loop polls and prepares (steps 1-4 and the statistics of step 5) the next
batch: the database's work and the learner's overlap, and the writer holds the GIL only
to build the statements' arrays. The loop waits for it before it hands over the next
batch, so the partitions' transactions stay in order; the offset and the statistics
each one stores are fixed when its batch is prepared, and written in one transaction,
so a kill at any point leaves the stored offset and statistics of the same batch; a
partition is never revoked while its write is in flight; a partition the writer could
not write is reloaded by the loop (a fresh state object: the prepared next batch's part
of it is dropped and re-read); one whose statistics the writer corrected has the
prepared next batch applied to them again.

The stored offset never passes a pending event: it is the smallest pending offset, so
a crash re-reads from there, and the events after it that were applied are skipped by
the ``learner_applied`` key. See docs/streams.md for the whole argument.

On assignment the partition's statistics are loaded and the consumer seeks to the
stored offset; on revocation they are dropped (everything applied is already written).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import psycopg
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Json

from bandit import Policy, Preferences
from bandit.base import MAX_ABS_CONTEXT
from bandit.conservative import merge_outcome
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
    check_featurizer,
    check_stored,
    load_statistics,
    new_statistics,
    scope_key,
    sums_only,
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


@dataclass(slots=True)
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
    #: (decision_id, event_id) of the events the last prepared write carries: the next
    #: batch drops their repeats before applying (that write may not have committed yet,
    #: so the database cannot tell; once it commits every one of them is applied).
    recent: set[tuple[str, str]] = field(default_factory=set)

    def offset_to_store(self) -> int:
        if self.pending:
            return min(p.offset for p in self.pending)
        return self.next_offset if self.next_offset >= 0 else self.stored_offset


class _Decisions:
    """Step 2's result: the batch's decisions (``decisions`` table), as columns, one
    entry per decision found; ``index`` maps a decision id to its row. One query
    returns each column as one array (no Python row objects: building them was half
    the query's time, issue 17)."""

    __slots__ = ("index", "tenant", "model", "extra", "x", "created", "price", "guarded",
                 "problem", "widths")

    #: ``problem`` codes: the decision can be learned from, or why not (step 3).
    OK, EXPIRED, WIDTH, VALUES = range(4)

    def __init__(self, ids: list[str], tenants: list[str], models: list[str],
                 scopes: list[str], contexts: bytes, widths: list[int],
                 created: list[float], prices: list[float], guarded: list[bool], *,
                 dim: int, horizon: float) -> None:
        n = len(ids)
        self.index = dict(zip(ids, range(n), strict=True))
        self.tenant = tenants
        self.model = np.array(models, dtype=object)
        #: The extra statistics key each decision's feedback also feeds (None: none).
        self.extra = np.full(n, None, dtype=object)
        for i in np.flatnonzero(np.array(scopes, dtype=object) != "shared").tolist():
            self.extra[i] = scope_key(scopes[i], tenants[i])
        #: When the decision was made (seconds since the epoch): the event time
        #: forgetting runs on; the chosen model's price estimate (``price_usd``, NaN
        #: for decisions made before estimates were recorded), which with a reported
        #: cost teaches the model's price correction, as in embedded mode.
        self.created = np.array(created, dtype=np.float64)
        self.price = np.array(prices, dtype=np.float64)
        #: Whether the tenant's guard counted the decision (``decisions.guard`` is
        #: set): its feedback also updates the guard's part (:meth:`Learner._update_guards`).
        self.guarded = guarded
        width = np.array(widths, dtype=np.int64).reshape(-1)
        fits = width == 8 * dim
        if fits.all():
            self.x = np.frombuffer(contexts, dtype="<f8").reshape(n, dim)
        else:  # a context of another dimension: the others still apply
            self.x = np.zeros((n, dim))
            ends = np.cumsum(width)
            for i in np.flatnonzero(fits):
                self.x[i] = np.frombuffer(contexts[ends[i] - width[i]:ends[i]], "<f8")
        with np.errstate(invalid="ignore"):
            # A huge (finite) embedding would overflow the shared sums to inf/NaN.
            values = (np.abs(self.x) <= MAX_CONTEXT_ABS).all(axis=1)  # False for NaN
        self.problem = np.select([self.created < horizon, ~fits, ~values],
                                 [self.EXPIRED, self.WIDTH, self.VALUES], self.OK).tolist()
        self.widths = width


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a record came from (what a dead letter names)."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None


class _Dead(NamedTuple):
    origin: _Origin
    reason: str  # one of streams.schemas.DEAD_LETTER_REASONS
    detail: str


class _Apply(NamedTuple):
    """An event to apply, with its decision: row ``row`` of ``decisions`` (the events of
    one write all come from one batch's)."""

    item: _Pending
    decisions: _Decisions
    row: int


class _Write(NamedTuple):
    """One partition's part of step 5, prepared by the loop: the events (each once, and
    not a repeat of the previous write), the statistics they were applied to and the
    offset, both fixed when the batch was prepared."""

    state: _Partition
    items: list[_Apply]
    offset: int
    #: The partition's statistics blobs (key, sums) after the batch, for the keys it
    #: changed, assuming every item is fresh (the writer checks that in its transaction).
    blobs: list[tuple[str, bytes]]
    #: Repeats dropped before the write (inside the batch, or of the previous write).
    repeats: int = 0


@dataclass
class _Written:
    """What the writer thread hands back: partitions to reload, the error to raise, and
    the statistics of partitions whose batch held repeats the loop could not see (the
    writer applied only the fresh events, to the statistics it read back in the
    transaction; the loop takes them over)."""

    reload: list[TopicPartition] = field(default_factory=list)
    error: Exception | None = None
    corrected: list[tuple[_Partition, dict[str, Policy]]] = field(default_factory=list)


@dataclass
class _Batch:
    """Step 1's result: the events to classify (new records, then pending events), by
    partition, in partition order."""

    taken: int = 0
    touched: set[TopicPartition] = field(default_factory=set)
    candidates: dict[TopicPartition, tuple[_Partition, list[_Pending]]] = field(
        default_factory=dict)
    dead: list[_Dead] = field(default_factory=list)


#: Largest absolute context value the learner applies: bandit's own bound.
MAX_CONTEXT_ABS = MAX_ABS_CONTEXT


class _Float8s(list):  # type: ignore[type-arg]
    """Floats sent as ONE binary ``float8[]`` parameter, packed by numpy (psycopg's
    generic list dumper dumps each element in Python: 6.5 us per event for the write
    statement's arrays, 0.9 us packed; issue 17)."""


class _Int8s(list):  # type: ignore[type-arg]
    """Integers sent as one binary ``int8[]`` parameter (see :class:`_Float8s`)."""


class _Texts(list):  # type: ignore[type-arg]
    """Strings sent as one binary ``varchar[]`` parameter (see :class:`_Float8s`)."""


def _array_header(element_oid: int, n: int) -> bytes:
    # PostgreSQL's binary array: ndim 1, no null bitmap, element type, length, lbound 1.
    return struct.pack(">iiIii", 1, 0, element_oid, n, 1)


def _packed_numbers(values: list[Any], element_oid: int, big_endian: str) -> bytes:
    items = np.empty(len(values), dtype=[("size", ">i4"), ("value", big_endian)])
    items["size"] = 8
    items["value"] = values
    return _array_header(element_oid, len(values)) + items.tobytes()


class _Float8sDumper(Dumper):
    format = Format.BINARY
    oid = 1022  # float8[]

    def dump(self, obj: list[float]) -> bytes:
        return _packed_numbers(obj, 701, ">f8")  # a missing value is NaN, never NULL


class _Int8sDumper(Dumper):
    format = Format.BINARY
    oid = 1016  # int8[]

    def dump(self, obj: list[int]) -> bytes:
        return _packed_numbers(obj, 20, ">i8")


class _TextsDumper(Dumper):
    format = Format.BINARY
    oid = 1015  # varchar[]

    def dump(self, obj: list[str]) -> bytes:
        joined = "".join(obj)
        if not joined.isascii():  # a character of several bytes: one string at a time
            parts = [_array_header(1043, len(obj))]
            for text in obj:
                data = text.encode()
                parts.append(len(data).to_bytes(4, "big"))
                parts.append(data)
            return b"".join(parts)
        # ASCII (the ids, always in practice): a character is a byte, so every
        # element's place is known from the lengths and numpy lays out the length
        # words and the bytes at once (a third of the loop's time for 20,000 ids).
        n = len(obj)
        lengths = np.fromiter(map(len, obj), np.int64, n)
        ends = np.cumsum(lengths + 4)
        words = ((ends - lengths - 4)[:, None] + np.arange(4)).ravel()
        out = np.empty(int(ends[-1]) if n else 0, np.uint8)
        out[words] = lengths.astype(">i4").view(np.uint8)
        text = np.ones(len(out), bool)
        text[words] = False
        out[text] = np.frombuffer(joined.encode(), np.uint8)
        return _array_header(1043, n) + out.tobytes()


def _connect(url: str) -> psycopg.Connection:
    """A connection that sends :class:`_Float8s`, :class:`_Int8s` and :class:`_Texts`
    as packed binary arrays."""
    conn = psycopg.connect(url, autocommit=False)
    for kind, dumper in ((_Float8s, _Float8sDumper), (_Int8s, _Int8sDumper),
                         (_Texts, _TextsDumper)):
        conn.adapters.register_dumper(kind, dumper)
    return conn


# The events of one partition batch as arrays, ``n`` their 1-based ordinal.
_EVENTS = ("b AS (SELECT * FROM unnest(%(d)b::varchar[], %(t)b::varchar[],"
           " %(e)b::varchar[], %(q)b::float8[], %(c)b::float8[], %(l)b::float8[],"
           " %(r)b::float8[], %(n)b::int8[]) AS u(d, t, e, q, c, l, r, n))")


class _Statement(NamedTuple):
    """One of the statements that record events as applied: ``ctes`` define the fresh
    events, ``spend`` reconciles their costs (added when ``reconcile_spend``), ``select``
    returns their (decision_id, event_id). Constant fragments: every value is a
    parameter."""

    ctes: str
    spend: str
    select: str


# The last reported cost of the fresh events of each decision, from ``new`` (d, c, n).
_SPEND_NEW = ("spend AS (UPDATE decisions AS x SET charged_usd = s.c FROM (SELECT"
              " DISTINCT ON (d) d, c FROM new WHERE c <> 'NaN' ORDER BY d, n DESC) AS s"
              " WHERE x.id = s.d AND x.charged_usd IS DISTINCT FROM s.c)")
# feedback_rows: the row is the key. An event is fresh when this group holds no
# learner_applied key for it (written while feedback_rows was off, or for a row of
# another group) and no row exists. The rows' ids follow the partition's order, so the
# costs come from the returned rows themselves (no join back to the arrays).
_FRESH_ROWS = _Statement(
    _EVENTS + ", rows AS (INSERT INTO feedback (decision_id, tenant_id, event_id,"  # noqa: S608
    " quality, cost_usd, latency_ms, created_at, learner_group) SELECT d, t, e,"
    " nullif(q, 'NaN'), nullif(c, 'NaN'), nullif(l, 'NaN'), to_timestamp(r),"
    " %(g)s::varchar FROM b WHERE NOT EXISTS (SELECT 1 FROM learner_applied a"
    " WHERE a.group_id = %(g)s::varchar AND a.decision_id = b.d AND a.event_id = b.e)"
    " ORDER BY n ON CONFLICT (decision_id, event_id) DO NOTHING"
    " RETURNING id, decision_id, event_id, cost_usd)",
    "spend AS (UPDATE decisions AS x SET charged_usd = s.c FROM (SELECT DISTINCT ON"
    " (decision_id) decision_id AS d, cost_usd AS c FROM rows WHERE cost_usd IS NOT NULL"
    " ORDER BY decision_id, id DESC) AS s WHERE x.id = s.d"
    # A cost equal to the charge (a re-sent event, a gateway that charged the real
    # cost already) writes no new row version.
    " AND x.charged_usd IS DISTINCT FROM s.c)",
    "SELECT decision_id, event_id FROM rows")
# The keys: an event is fresh when no feedback row of this group covers it and its key
# is new. Its statement runs after the feedback insert, so it sees the rows that insert
# found (a concurrent writer's included: the insert waited for it to commit).
_FRESH_KEYS = _Statement(
    _EVENTS + ", keys AS (INSERT INTO learner_applied"  # noqa: S608
    " (group_id, decision_id, event_id) SELECT %(g)s::varchar, d, e FROM b"
    " WHERE NOT EXISTS (SELECT 1 FROM feedback f WHERE f.decision_id = b.d"
    " AND f.event_id = b.e AND f.learner_group = %(g)s::varchar)"
    " ON CONFLICT (group_id, decision_id, event_id) DO NOTHING"
    " RETURNING decision_id, event_id),"
    " new AS (SELECT b.* FROM b JOIN keys ON keys.decision_id = b.d"
    " AND keys.event_id = b.e)", _SPEND_NEW, "SELECT d, e FROM new")
# The costs of given events only (after the two statements above both found some).
_SPEND_ONLY = _Statement(_EVENTS + ", new AS (SELECT * FROM b)",  # noqa: S608
                         _SPEND_NEW, "SELECT d, e FROM new")


def _event_arrays(group_id: str, candidates: list[_Apply]) -> dict[str, Any]:
    """The statements' parameters: one array per column, ``n`` the 1-based ordinal."""
    nan = float("nan")
    events = [c.item.event for c in candidates]
    return {
        "g": group_id, "d": _Texts(e.decision_id for e in events),
        "t": _Texts(e.tenant_id for e in events), "e": _Texts(e.event_id for e in events),
        "q": _Float8s(nan if e.quality is None else e.quality for e in events),
        "c": _Float8s(nan if e.cost_usd is None else e.cost_usd for e in events),
        "l": _Float8s(nan if e.latency_ms is None else e.latency_ms for e in events),
        "r": _Float8s(c.item.received_at for c in candidates),
        "n": _Int8s(range(1, len(candidates) + 1))}


def _first_of_repeats(items: list[_Apply]) -> dict[tuple[str, str], _Apply]:
    """The batch's events in partition order, each (decision_id, event_id) once, by
    that key (built once per event: the caller filters and remembers by it).

    Partition order: pending events come after the new records of the poll, but the
    first of two repeats must win (its values are the feedback row's), the last cost is
    the charge, and the feedback rows' ids follow the partition. A repeat inside the
    batch is dropped here; one across batches by the statements' keys."""
    unique: dict[tuple[str, str], _Apply] = {}
    for it in sorted(items, key=lambda it: it.item.offset):
        unique.setdefault((it.item.event.decision_id, it.item.event.event_id), it)
    return unique


def _subset(params: dict[str, Any], ordinals: list[int]) -> dict[str, Any]:
    """``params`` restricted to the events ``ordinals`` (which keep their ordinals)."""
    return {k: v if k == "g" else type(v)(v[n - 1] for n in ordinals)
            for k, v in params.items()}


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
        # Step 5 runs in a writer thread on its own connection while the loop polls and
        # prepares the next batch (module docstring, "Pipelining").
        self._wconn: psycopg.Connection | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: Future[_Written] | None = None

    # ------------------------------------------------------------ life cycle
    def start(self, *, create_topics: bool = True) -> None:
        if create_topics:
            ensure_topics(self.config)
        self._conn = _connect(self.database_url)
        self._check_stored_statistics()
        self._warm_up()
        self.producer = KafkaProducer(bootstrap_servers=self.config.bootstrap, acks="all",
                                      linger_ms=5, client_id=f"{self.client_id}-dlq")
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.config.bootstrap, group_id=self.config.group_id,
            client_id=self.client_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.config.max_poll_records,
            **self.consumer_settings)
        self.consumer.subscribe([self.config.feedback_topic], listener=_Listener(self))
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="learner-writer")
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, registry=self.metrics.registry)
        self._running.set()

    def _check_stored_statistics(self) -> None:
        """Refuse to start on statistics learned with another half-life, dimension or
        featurizer (before joining the group: a refusal inside the rebalance callback
        would only be logged)."""
        conn = self._db()
        with conn.transaction():
            row = conn.execute(
                "SELECT partition, key, data, featurizer FROM partition_statistics"
                " WHERE group_id = %s AND topic = %s"
                " ORDER BY featurizer IS NULL LIMIT 1",
                (self.config.group_id, self.config.feedback_topic)).fetchone()
        if row is not None:
            where = f"partition {row[0]} ({row[1]}) of group {self.config.group_id!r}"
            check_stored(Policy.from_bytes(bytes(row[2])), self.config.dim,
                         self.config.half_life_hours, where)
            check_featurizer(row[3], self.config.featurizer, where)

    def _warm_up(self) -> None:
        """One throwaway statistics update before joining the group: the compiled
        kernels (numba, loaded from its cache or compiled) and the lazy imports of the
        update path are ready before the first batch (0.2-0.4 s of it, measured alone;
        issue 17), so a learner that takes over partitions does not stall them."""
        stats = new_statistics(self.config.dim, self.config.half_life_hours,
                               self.config.tag_dims)
        stats.add_arm("warm-up")
        x = np.zeros((2, self.config.dim))
        stats.update_batch(["warm-up"] * 2, x, np.array([[0.5, 0.001, 100.0]] * 2),
                           times=None if self.config.half_life_hours is None
                           else np.zeros(2), cost_estimates=np.full(2, 0.001))
        stats.to_bytes(derived=False)

    def stop(self) -> None:
        """Ask the loop to stop after the current batch (safe from a signal handler)."""
        self._running.clear()

    @property
    def running(self) -> bool:
        return self._running.is_set()

    def close(self) -> None:
        # The batch being written is finished first (its transactions commit or fail
        # whole); then leave the group at once (the partitions move without waiting for
        # the session timeout). The Kafka offsets only feed lag tools.
        if self._inflight is not None:
            try:
                self._finish_writes(closing=True)
            except Exception:  # noqa: BLE001 - closing must not hide the real error
                log.exception("finishing the last batch failed")
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
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
        for conn in (self._conn, self._wconn):
            if conn is not None:
                conn.close()
        self._conn = self._wconn = None

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
        """Poll once and process the batch; returns the number of records taken.

        An exception other than a failed poll is fatal: this learner raises it again on
        every later call (``run()`` exits); start a new one."""
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
        if self._inflight is not None:
            # Everything applied is written before a partition moves (the writer catches
            # its errors; step() handles them).
            wait([self._inflight])
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
            stats = self._stored_statistics(conn, tp)
        return _Partition(tp, int(version), int(offset), stats)

    def _stored_statistics(self, conn: psycopg.Connection,
                           tp: TopicPartition) -> dict[str, Policy]:
        """The partition's statistics as stored, checked against this learner's
        settings."""
        blobs = conn.execute(
            "SELECT key, data, featurizer FROM partition_statistics"
            " WHERE group_id = %s AND topic = %s AND partition = %s",
            (self.config.group_id, tp.topic, tp.partition)).fetchall()
        stats = {key: sums_only(load_statistics(bytes(data), self.config.dim,
                                                self.config.half_life_hours,
                                                f"partition {tp.partition} ({key})",
                                                self.config.tag_dims))
                 for key, data, _spec in blobs}
        # After the dimension: a changed dimension says so first, more precisely.
        for key, _data, spec in blobs:
            check_featurizer(spec, self.config.featurizer,
                             f"partition {tp.partition} ({key})")
        return stats

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self.database_url)
        return self._conn

    def _wdb(self) -> psycopg.Connection:
        """The writer thread's connection (a psycopg connection serves one thread)."""
        if self._wconn is None or self._wconn.closed:
            self._wconn = _connect(self.database_url)
        return self._wconn

    # ------------------------------------------------------------ processing
    def _process(self, records: dict[TopicPartition, list[Any]]) -> int:
        """The numbered steps of the module docstring, for one poll batch; step 5 of this
        batch runs in the writer thread while the next batch is polled and prepared."""
        now = self.clock()
        batch = self._take(records, now)                          # 1: decode, pending
        writes = self._prepare(batch, now) if batch.touched else []  # 2-4, statistics
        writes = self._finish_writes(writes)  # the previous batch's step 5, then its 6
        self._submit(writes)                                      # 5
        return batch.taken

    def _prepare(self, batch: _Batch, now: float) -> list[_Write]:
        """Steps 2-4: join the decisions, classify, dead-letter; then each touched
        partition's write: its events applied to the in-memory statistics (the writer
        only writes), the offset fixed now (the next batch moves the state)."""
        decisions = self._fetch_decisions(                        # 2
            {p.event.decision_id for _, items in batch.candidates.values() for p in items},
            now)
        apply = self._classify(batch, decisions, now)             # 3
        self._send_dead_letters(batch.dead, now)                  # 4
        self.metrics.pending.set(sum(len(s.pending) for s in self.partitions.values()))
        writes = []
        for tp in sorted(batch.touched, key=lambda t: t.partition):
            state = self.partitions.get(tp)
            if state is None:
                continue
            polled = apply.get(tp, [])
            unique = _first_of_repeats(polled)
            if state.recent:
                unique = {k: it for k, it in unique.items() if k not in state.recent}
            state.recent = set(unique)
            items = list(unique.values())
            writes.append(_Write(state, items, state.offset_to_store(),
                                 self._blobs(state.stats, items), len(polled) - len(items)))
        return writes

    def _blobs(self, stats: dict[str, Policy], items: list[_Apply]) -> list[tuple[str, bytes]]:
        """Apply ``items`` to ``stats``; the changed keys' blobs (sums only: the readers
        recompute inverses exactly, half the bytes)."""
        return [(key, stats[key].to_bytes(derived=False))
                for key in self._apply(stats, items)]

    def _submit(self, writes: list[_Write]) -> None:
        """Step 5: hand the writes that still matter to the writer thread (a partition
        reloaded meanwhile drops its write; one with no event and no new offset has
        nothing to write)."""
        writes = [w for w in writes if self.partitions.get(w.state.tp) is w.state
                  and (w.items or w.offset != w.state.stored_offset)]
        if writes:
            assert self._writer is not None
            self._inflight = self._writer.submit(self._write_partitions, writes)
            self.batches += 1

    def _finish_writes(self, prepared: list[_Write] | None = None, *,
                       closing: bool = False) -> list[_Write]:
        """Wait for the batch in the writer thread; reload the partitions it could not
        write (another learner wrote them, or the database failed), raise its error, or
        commit the Kafka offsets (step 6). A partition whose statistics the writer
        corrected (repeats of events applied before) takes them over, and its
        ``prepared`` write (the next batch) is applied to them again; returns the
        prepared writes."""
        prepared = prepared or []
        future, self._inflight = self._inflight, None
        if future is None:
            return prepared
        done = future.result()
        if not closing:
            for state, stats in done.corrected:
                if self.partitions.get(state.tp) is not state:
                    continue  # dropped or reloaded meanwhile: the database has them
                state.stats = stats
                prepared = [w._replace(blobs=self._blobs(stats, w.items))
                            if w.state is state else w for w in prepared]
            for tp in done.reload:
                self._reload(tp)
        if done.error is not None:
            # Fatal: partitions after the failed one, and the batch prepared meanwhile,
            # are applied in memory but not stored. Every later step() raises it again
            # rather than write statistics ahead of their rows; a new learner resumes
            # from the offsets in PostgreSQL.
            self._fatal = done.error
            raise done.error
        self._commit_kafka()
        return prepared

    def _take(self, records: dict[TopicPartition, list[Any]], now: float) -> _Batch:
        """Step 1: decode the new records; the pending events join them as candidates."""
        batch = _Batch()
        timeout = self.config.pending_timeout_s
        for tp, polled in records.items():
            state = self.partitions.get(tp)
            if state is None:
                continue  # revoked while the batch was in flight
            first = max(state.next_offset, state.stored_offset)
            # Records come in offset order; those below are delivered again after a seek.
            fresh = polled if not polled or polled[0].offset >= first else \
                [r for r in polled if r.offset >= first]
            if not fresh:
                continue
            state.next_offset = fresh[-1].offset + 1
            batch.taken += len(fresh)
            batch.touched.add(tp)
            candidates = batch.candidates.setdefault(tp, (state, []))[1]
            for record in fresh:
                try:
                    event = decode_feedback(record.value)
                except InvalidEventError as exc:
                    batch.dead.append(_Dead(_Origin(tp, record.offset, record.key,
                                                    record.value), exc.reason, str(exc)))
                    continue
                stamp = record.timestamp
                received = min(stamp / 1e3, now) if stamp and stamp > 0 else now
                candidates.append(_Pending(record.offset, record.key, record.value, event,
                                           received + timeout, received))
        for state in self.partitions.values():
            if state.pending:
                batch.touched.add(state.tp)
                batch.candidates.setdefault(state.tp, (state, []))[1].extend(state.pending)
                state.pending = []
        return batch

    def _fetch_decisions(self, ids: set[str], now: float) -> _Decisions:
        """Step 2: the batch's decisions, ONE query, each column as one array (built in
        C by psycopg's array loaders, no row objects). Binary results: the contexts
        arrive as raw bytes, concatenated (text would hex-encode them, doubling the
        bytes and the work on both sides), ``created_at`` as seconds and the chosen
        model's price estimate (``price_usd``, written by the API with the decision;
        migration 0008). The aggregates of one query see the rows in the same order."""
        dim = self.config.dim
        horizon = now - self.config.retention_hours * 3600.0
        if not ids:
            return _Decisions([], [], [], [], b"", [], [], [], [], dim=dim, horizon=horizon)
        conn = self._db()
        with conn.transaction(), conn.cursor(binary=True) as cur:
            row = cur.execute(
                "SELECT array_agg(id), array_agg(tenant_id), array_agg(model),"
                " array_agg(scope), string_agg(context, ''::bytea),"
                " array_agg(octet_length(context)),"
                # date_part, not extract: extract returns numeric since PostgreSQL
                # 14: computing and casting it was ~15% of this query (issue 17).
                " array_agg(date_part('epoch', created_at)),"
                " array_agg(coalesce(price_usd, 'NaN'::float8)),"
                " array_agg(guard IS NOT NULL)"
                " FROM decisions WHERE id = ANY(%b::varchar[])", (_Texts(ids),)).fetchone()
        if row is None or row[0] is None:  # none of them (yet)
            return _Decisions([], [], [], [], b"", [], [], [], [], dim=dim, horizon=horizon)
        return _Decisions(*row, dim=dim, horizon=horizon)

    def _classify(self, batch: _Batch, decisions: _Decisions,
                  now: float) -> dict[TopicPartition, list[_Apply]]:
        """Step 3: apply, dead-letter (into ``batch.dead``) or keep pending. The
        decisions' own checks (age, context) were made for all of them at once."""
        index, tenant, problem = decisions.index, decisions.tenant, decisions.problem
        ok = _Decisions.OK
        apply: dict[TopicPartition, list[_Apply]] = {}
        for tp, (state, items) in batch.candidates.items():
            found = apply[tp] = []
            for item in items:
                event = item.event
                i = index.get(event.decision_id)
                if i is not None and tenant[i] == event.tenant_id and problem[i] == ok:
                    found.append(_Apply(item, decisions, i))
                elif i is None and now < item.deadline:
                    state.pending.append(item)
                else:
                    reason, detail = self._why(item, decisions, i)
                    batch.dead.append(_Dead(_Origin(tp, item.offset, item.key, item.value),
                                            reason, detail))
        return apply

    def _why(self, item: _Pending, decisions: _Decisions, i: int | None) -> tuple[str, str]:
        """Why an event cannot be applied: its dead letter's reason and detail."""
        if i is None:
            return "unknown-decision", (
                f"decision_id: no decision {item.event.decision_id!r} after "
                f"{self.config.pending_timeout_s:g} s")
        if decisions.tenant[i] != item.event.tenant_id:
            return "tenant-mismatch", "tenant_id: the decision belongs to another tenant"
        problem = decisions.problem[i]
        if problem == _Decisions.EXPIRED:
            return "decision-expired", (
                "decision_id: the decision is older than the retention window "
                f"({self.config.retention_hours:g} h)")
        if problem == _Decisions.WIDTH:
            return "invalid-event", (
                f"context: the decision's context has {int(decisions.widths[i]) // 8} "
                f"dimensions, the learner {self.config.dim}")
        return "invalid-event", ("context: the decision's context has values outside "
                                 f"+-{MAX_CONTEXT_ABS:g} or not finite")

    def _send_dead_letters(self, dead: list[_Dead], now: float) -> None:
        """Step 4: produce the dead letters and wait for their acknowledgement."""
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
                    ", ".join(sorted({d.reason for d in dead})))

    def _write_partitions(self, writes: list[_Write]) -> _Written:
        """Step 5 (in the writer thread): one transaction per partition. Errors are
        returned, not raised: the loop's thread reloads and raises them."""
        done = _Written()
        for i, w in enumerate(writes):
            try:
                # One NOTIFY per batch, with its last transaction: the deciders then
                # reload every partition of the batch at once instead of chasing them
                # one by one (their version poll covers a batch that fails half-way).
                corrected = self._write_partition(w, notify=i == len(writes) - 1)
                if corrected is not None:
                    done.corrected.append((w.state, corrected))
            except _LostOwnership:
                log.warning("partition %d was written by another learner: reloading it",
                            w.state.tp.partition)
                done.reload.append(w.state.tp)
            except Exception as exc:  # noqa: BLE001 - handed to the loop's thread
                # The in-memory statistics may hold the batch the database refused:
                # reload them and re-read from the stored offset, then raise.
                done.reload.append(w.state.tp)
                done.error = exc
                break
        return done

    def _write_partition(self, w: _Write, *,
                         notify: bool = True) -> dict[str, Policy] | None:
        """One transaction: fence, dedupe, store the statistics + the offset, notify.

        The loop applied every event of the write to its statistics. When the database
        says some were applied before (a repeat of an earlier batch: after a restart, a
        re-sent event), the statistics are read back in the transaction (the partition's
        row lock holds them at the previous batch), the fresh events applied to them and
        those written; they are returned for the loop to take over. Otherwise None."""
        state, items = w.state, w.items
        conn = self._wdb()
        ident = (self.config.group_id, state.tp.topic, state.tp.partition)
        corrected = None
        with conn.transaction():
            found = conn.execute(
                "SELECT version FROM learner_partitions WHERE group_id = %s"
                " AND topic = %s AND partition = %s FOR UPDATE", ident).fetchone()
            if found is None or int(found[0]) != state.version:
                raise _LostOwnership(state.tp)
            applied = self._record_applied(conn, items)
            self._update_guards(conn, [it for it in applied
                                       if it.decisions.guarded[it.row]])
            blobs = w.blobs
            if len(applied) < len(items):
                corrected = self._stored_statistics(conn, state.tp)
                blobs = self._blobs(corrected, applied)
            if blobs:
                conn.cursor().executemany(
                    "INSERT INTO partition_statistics (group_id, topic, partition, key,"
                    " data, featurizer) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (group_id, topic, partition, key) DO UPDATE SET"
                    " data = EXCLUDED.data, featurizer = coalesce(EXCLUDED.featurizer,"
                    " partition_statistics.featurizer)",
                    [(*ident, key, data, self.config.featurizer) for key, data in blobs])
            conn.execute(
                "UPDATE learner_partitions SET next_offset = %s, version = version + 1,"
                " updated_at = now() WHERE group_id = %s AND topic = %s"
                " AND partition = %s", (w.offset, *ident))
            if notify:
                conn.execute("SELECT pg_notify(%s, %s)",
                             (NOTIFY_CHANNEL, f"{state.tp.partition}:{state.version + 1}"))
        state.version += 1
        state.stored_offset = w.offset
        self.metrics.events.labels("applied").inc(len(applied))
        n_dup = w.repeats + len(items) - len(applied)
        if n_dup:
            self.metrics.events.labels("duplicate").inc(n_dup)
        return corrected

    def _reload(self, tp: TopicPartition) -> None:
        if tp in self.partitions:
            try:
                fresh = self._load(tp)
            except Exception:
                self.partitions.pop(tp, None)
                raise
            self.partitions[tp] = fresh
            self._seek(fresh)

    def _record_applied(self, conn: psycopg.Connection,
                        candidates: list[_Apply]) -> list[_Apply]:
        """Record the candidates as applied by this group; returns the ones it had not
        applied before, in order.

        The group applied an event iff its ``feedback`` row names the group
        (``learner_group``) or ``learner_applied`` holds the key; each write below checks
        both, so switching ``feedback_rows`` on or off keeps every event once.

        - ``feedback_rows`` on (one statement in the usual case): the fresh events'
          ``feedback`` rows, ``ON CONFLICT DO NOTHING RETURNING``; the row is the key
          (UNIQUE (decision_id, event_id)), no ``learner_applied`` row is written. Only
          the events whose row was already there go on to :meth:`_record_keys`: a row of
          this group is a repeat, another group's (a fresh group re-reads the topic; the
          history keeps the first row) or the embedded mode's needs the key.
        - ``feedback_rows`` off: the keys only (:meth:`_record_keys`).
        - ``reconcile_spend``: the real cost of a fresh event replaces its decision's
          predicted one (``decisions.charged_usd``, which the API replicas' budgets read,
          service/budget.py), the last of the batch in partition order (a decision's
          events share a partition), in the same statement.

        Arrays go once, in binary (``%b``: in text form, formatting and parsing them took
        as long as the writes). A missing value travels as NaN (which no applied event
        has: the schema refuses NaN) and becomes NULL.
        """
        if not candidates:
            return []
        params = _event_arrays(self.config.group_id, candidates)
        if self.config.feedback_rows:
            fresh = self._run(conn, _FRESH_ROWS, params)
            if len(fresh) < len(candidates):
                taken = set(fresh)
                rest = [n for n in range(1, len(candidates) + 1) if n not in taken]
                more = self._record_keys(conn, params, rest, spend=False)
                if more:
                    fresh = sorted(fresh + more)
                    if self.config.reconcile_spend:
                        # Again over all the fresh events: the last cost must win.
                        self._run(conn, _SPEND_ONLY, _subset(params, fresh))
        else:
            fresh = self._record_keys(conn, params, None, spend=True)
        return [candidates[n - 1] for n in fresh]

    def _record_keys(self, conn: psycopg.Connection, params: dict[str, Any],
                     only: list[int] | None, *, spend: bool) -> list[int]:
        """``learner_applied`` keys for the events (all, or the ordinals ``only``) that
        no ``feedback`` row of this group covers; returns the fresh ones' ordinals."""
        return self._run(conn, _FRESH_KEYS,
                         params if only is None else _subset(params, only), spend=spend)

    def _run(self, conn: psycopg.Connection, statement: _Statement,
             params: dict[str, Any], *, spend: bool = True) -> list[int]:
        """One of the statements above (with its reconciliation CTE when configured and
        ``spend``); returns the fresh events' ordinals (``params["n"]``), sorted."""
        ctes = statement.ctes
        if spend and self.config.reconcile_spend:
            ctes += ", " + statement.spend
        # Constant fragments chosen by the configuration; every value is a parameter.
        # The events are distinct (_first_of_repeats) and the fresh ones a subset of
        # them: their count tells whether all are fresh, the usual case, and only
        # otherwise are their keys sent back (20,000 rows made into Python objects
        # while the loop waited for the GIL; issue 17).
        count, ds, es = conn.execute(
            f"WITH {ctes}, fresh (d, e) AS ({statement.select}) SELECT count(*),"  # noqa: S608
            " CASE WHEN count(*) < %(k)s THEN array_agg(d) END,"
            " CASE WHEN count(*) < %(k)s THEN array_agg(e) END FROM fresh",
            {**params, "k": len(params["n"])}).fetchone()
        if count == len(params["n"]):
            return sorted(params["n"])
        ordinal = dict(zip(zip(params["d"], params["e"], strict=True), params["n"],
                           strict=True))
        return sorted(ordinal[key] for key in zip(ds or [], es or [], strict=True))

    def _update_guards(self, conn: psycopg.Connection, applied: list[_Apply]) -> None:
        """The guard's part of each guarded decision (``decisions.guard``): the merged
        outcome and its reward under the tenant's preferences, as the embedded ingest
        stores it (:func:`bandit.conservative.merge_outcome`), for the fresh events, in
        the partition's transaction (so exactly once). The API replicas rebuild their
        guards' accounts from these (service/distributed.py). Only decisions of the
        tenant's current account (its baseline, since ``guard_since``) change, as in
        embedded mode."""
        if not applied:
            return
        rows = conn.execute(
            "SELECT d.id, d.model, d.guard, d.predictions, t.weight_quality, t.weight_cost,"
            " t.weight_latency FROM decisions d JOIN tenants t ON t.id = d.tenant_id"
            " WHERE d.id = ANY(%s) AND d.guard IS NOT NULL AND t.baseline_model IS NOT NULL"
            " AND d.guard -> 'record' ->> 0 = t.baseline_model"
            " AND (t.guard_since IS NULL OR d.created_at >= t.guard_since)"
            " FOR UPDATE OF d", ([it.item.event.decision_id for it in applied],)).fetchall()
        current = {r[0]: (r[1], r[2], r[3] or {}, Preferences(r[4], r[5], r[6]))
                   for r in rows}
        updated: dict[str, dict[str, object]] = {}
        for it in applied:  # partition order: a later value of a field wins
            event = it.item.event
            found = current.get(event.decision_id)
            if found is None:
                continue
            model, stored, predictions, prefs = found
            stored = updated.get(event.decision_id, stored)
            updated[event.decision_id] = merge_outcome(
                stored, {"quality": event.quality, "cost_usd": event.cost_usd,
                         "latency_ms": event.latency_ms},
                predictions.get(model) or {}, prefs)
        if updated:
            conn.cursor().executemany("UPDATE decisions SET guard = %s WHERE id = %s",
                                      [(Json(g), d) for d, g in updated.items()])

    def prune_applied(self) -> int:
        """Forget idempotency keys older than the retention window (safe: see the table)."""
        conn = self._db()
        with conn.transaction():
            cur = conn.execute(
                "DELETE FROM learner_applied WHERE group_id = %s"
                " AND applied_at < now() - make_interval(secs => %s)",
                (self.config.group_id, self.config.retention_hours * 3600.0))
        return cur.rowcount

    def _apply(self, stats: dict[str, Policy], applied: list[_Apply]) -> list[str]:
        """Add the events to a partition's statistics, one ``update_batch`` (one array
        operation per arm) per statistics key; returns the keys changed."""
        if not applied:
            return []
        dim = self.config.dim
        source = applied[0].decisions
        if any(it.decisions is not source for it in applied):
            raise AssertionError("a write's events come from one batch's decisions")
        n = len(applied)
        at = np.fromiter((it.row for it in applied), np.intp, n)
        x = source.x[at]
        # An (n, 3) array: bandit validates it in one vectorized pass. One column at a
        # time with fromiter: a tenth of np.array's time on a list of tuples.
        nan = np.nan
        events = [it.item.event for it in applied]
        y = np.empty((n, 3))
        y[:, 0] = np.fromiter((nan if e.quality is None else e.quality for e in events),
                              np.float64, n)
        y[:, 1] = np.fromiter((nan if e.cost_usd is None else e.cost_usd for e in events),
                              np.float64, n)
        y[:, 2] = np.fromiter((nan if e.latency_ms is None else e.latency_ms
                               for e in events), np.float64, n)
        arms = source.model[at].tolist()
        # Forgetting runs on event time, the decision's created_at (stored by the API,
        # the same on every re-read), never on the wall clock at apply time: a replay
        # after a crash or on another learner must produce the same sums.
        times = None if self.config.half_life_hours is None else source.created[at]
        prices = source.price[at]
        groups: dict[str, list[int] | None] = {SHARED_KEY: None}  # None: every event
        extra = source.extra[at]
        for i in np.flatnonzero(extra != None).tolist():  # noqa: E711 - elementwise
            groups.setdefault(extra[i], []).append(i)  # type: ignore[union-attr]
        for key, rows in groups.items():
            policy = stats.get(key)
            if policy is None:
                policy = stats[key] = sums_only(new_statistics(
                    dim, self.config.half_life_hours, self.config.tag_dims))
            sub = arms if rows is None else [arms[i] for i in rows]
            known = set(policy.arms)
            for arm in dict.fromkeys(sub):  # first-seen order
                if arm not in known:
                    # An arm is known to the statistics from its first feedback on; its
                    # prior lives with the deciders (it is counted once, there), and so
                    # does whether it was added late (the registry's order, not this
                    # partition's first feedback).
                    policy.add_arm(arm, late=False)
            if rows is None:
                policy.update_batch(sub, x, y, times=times, cost_estimates=prices)
            else:
                policy.update_batch(sub, x[rows], y[rows],
                                    times=None if times is None else times[rows],
                                    cost_estimates=prices[rows])
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


def _limit_blas_threads() -> None:
    # update_batch multiplies small (n, 65) matrices: OpenBLAS threads only contend
    # (measured 15 ms instead of 40 us per product on two busy cores).
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then OPENBLAS_NUM_THREADS=1 is the way
        return
    threadpool_limits(1)


def _tune_gc() -> None:
    # A poll batch keeps ~10 small objects per event alive (decoded events, rows, their
    # tuples) until it is written: with the default threshold (700) the cyclic collector
    # ran hundreds of times per batch, rescanning them, and took 40% of the loop's time
    # (py-spy, issue 17). Almost nothing here forms cycles (refcounting frees it), so
    # collect young objects every 100,000 allocations, and never rescan what exists at
    # start (modules, the consumer, the statistics) again.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def main(argv: list[str] | None = None) -> None:
    """``python -m streams.learner``: a learner from command-line options (tests, ops).

    Every option left out keeps :class:`~streams.config.StreamsConfig`'s default (the one
    place the defaults are written; ``--help`` shows them from there)."""
    defaults = {f.name: f.default for f in fields(StreamsConfig)}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)

    def option(name: str, kind: type, help_: str = "") -> None:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,
                            help=f"{help_} (default: {defaults[name]})".lstrip())

    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--database-url", required=True)
    for name in ("feedback_topic", "dead_letter_topic", "decisions_topic", "group_id"):
        option(name, str)
    option("featurizer", str, "spec of the featurizer that made the contexts, stored "
           "with the statistics and checked against them")
    for name in ("dim", "tag_dims", "partitions", "max_poll_records", "metrics_port"):
        option(name, int)
    option("pending_timeout_s", float)
    option("half_life_hours", float, "forgetting by event time (same as the API "
           "replicas' BANDIT_ROUTER_HALF_LIFE_HOURS)")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--no-create-topics", action="store_true", default=False)
    parser.add_argument("--no-reconcile-spend", dest="reconcile_spend",
                        action="store_false",
                        help="do not write real costs into decisions.charged_usd")
    parser.add_argument("--no-feedback-rows", dest="feedback_rows", action="store_false",
                        help="do not write applied events into the feedback table")
    args = vars(parser.parse_args(argv))
    database_url, client_id = args.pop("database_url"), args.pop("client_id")
    create_topics = not args.pop("no_create_topics")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    learner = Learner(StreamsConfig(**args), database_url, client_id=client_id)
    run_until_signalled(learner, create_topics=create_topics)


def run_until_signalled(learner: Learner, *, create_topics: bool = True) -> None:
    """Run ``learner``; SIGTERM / SIGINT flip its run flag (the batch is finished)."""
    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the batch, then stopping", signum)
        learner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _limit_blas_threads()
    _tune_gc()
    try:
        learner.start(create_topics=create_topics)
        learner.run()
    finally:
        learner.close()
    log.info("learner stopped after %d batches", learner.batches)


if __name__ == "__main__":
    main()
