"""The batched decision writer: decisions are persisted off the request path.

``submit`` puts a row on a bounded queue and returns at once; one thread drains the
queue in batches (one multi-row INSERT per batch). When the queue is full the caller
gets :class:`QueueFull` (the API answers 503 with Retry-After): a decision is never
dropped silently.

Database outages (issue 14). With a :class:`~service.spool.DecisionSpool` (the default,
``BANDIT_ROUTER_DECISION_BUFFER_SIZE``), an INSERT that fails because the database cannot
be reached moves the batch, and from then on every queued row, into that file on local
disk (one fsync'd transaction per batch); while it holds rows the API answers a decide
only once its row is on disk (:meth:`DecisionWriter.must_confirm`,
:meth:`DecisionWriter.wait_durable`), so ``kill -9`` during an outage loses no answered
decision. The writer retries the database with backoff (at most 2 s) and, once it
answers, replays the file oldest first (rows already stored are skipped), new rows
queuing behind it. Without a spool (size 0) a failed INSERT is retried in memory and the
full queue turns into 503s.

The bound outside an outage: rows answered and still in memory (queued, or being
written) when the process is killed are lost, at most ``queue_size`` decisions, usually
one flush interval's worth (20 ms); also those answered between the moment the database
went away and the first failed INSERT. ``write_through``
(``BANDIT_ROUTER_DECISION_DURABILITY=write-through``) closes that window: every decide
is answered only after its row is committed or spooled (one group commit per batch: the
latency of an INSERT, not of a flush interval).
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from service.db.models import DecisionRow
from service.decision_insert import RowInserter
from service.spool import DecisionSpool

__all__ = ["DecisionWriter", "QueueFull"]

log = logging.getLogger("service.writer")

#: A decision row's columns that feedback never changes: a stored row equal on these is
#: the same decision (written by a try whose answer was lost).
_SAME_DECISION = ("id", "tenant_id", "model", "policy", "policy_version", "scope",
                  "propensity", "context", "predicted_cost_usd")


def _plain(value: Any) -> Any:
    """A driver's binary (memoryview) as bytes, to compare with a row's."""
    return bytes(value) if isinstance(value, memoryview) else value


class QueueFull(Exception):
    """The decision queue stayed full for the whole wait."""


class DecisionWriter:
    def __init__(self, engine: Engine, *, queue_size: int, batch_size: int,
                 flush_interval_s: float = 0.02,
                 on_flush: Callable[[int], None] | None = None,
                 spool: DecisionSpool | None = None, write_through: bool = False,
                 retry_max_s: float = 0.5) -> None:
        self._engine = engine
        # A deque under one lock rather than a queue.Queue: submit and the writer's
        # draining take one lock per row and per batch instead of a Queue's lock and
        # condition per row, on the event loop's path.
        self._lock = threading.Lock()
        self._rows: collections.deque[dict[str, Any]] = collections.deque()
        self._queue_size = queue_size
        # The writer polls here when idle (every flush interval), woken early by _hurry.
        self._has_rows = threading.Condition(self._lock)
        self._idle = False
        self._stopping = False
        self._batch_size = batch_size
        self._flush_interval = flush_interval_s
        self._urgent = threading.Event()  # someone waits for a row: write now
        self._on_flush = on_flush
        self._pending: set[str] = set()
        self._in_flight: list[dict[str, Any]] = []  # taken from the queue, not committed
        self._cond = threading.Condition(self._lock)  # rows written (wait_for, flush)
        self._thread: threading.Thread | None = None
        self._insert = RowInserter(engine)
        self.flushed = 0
        self.failed = 0  # rows the database refused (logged one by one)
        self.already_stored = 0  # rows a retry found stored (an answer lost), not failed
        self.spool = spool
        self.write_through = write_through
        # While spooling, the database is retried with backoff up to this (seconds).
        self._retry_max_s = retry_max_s
        self._retry_now = False  # retry_now(): the database answered someone else
        # Pending rows that are on disk (in the spool): durable, not in the database.
        self._spooled: set[str] = set()
        self.spooled_total = 0  # rows moved to the spool, ever
        if spool is not None and spool.depth():
            # Left by a previous run (an outage, a kill): pending until replayed, so that
            # feedback about them waits for them instead of finding no decision.
            ids = spool.ids()
            self._pending.update(ids)
            self._spooled.update(ids)
            log.warning("%d decisions spooled by a previous run; writing them when the "
                        "database answers", len(ids))

    # ------------------------------------------------------------ producer
    def submit(self, row: dict[str, Any]) -> bool:
        """Queue one decision row; False (nothing queued) when the queue is full."""
        with self._lock:
            if len(self._rows) >= self._queue_size:
                return False
            self._rows.append(row)
            self._pending.add(row["id"])
        # No wake-up here: an idle writer looks for rows every flush interval (_run).
        # Notifying it from each decide handed the GIL to this thread on the event
        # loop's path (~3% of a text decide's CPU, profiled under load).
        return True

    def depth(self) -> int:
        return len(self._rows)

    def pending_charges(self) -> dict[str, float]:
        """``charged_usd`` per tenant of the rows not committed yet (queued or being
        written): the spend the database does not show yet (service.budget)."""
        out: dict[str, float] = {}
        with self._lock:
            for rows in (self._rows, self._in_flight):
                for row in rows:
                    tenant = row["tenant_id"]
                    out[tenant] = out.get(tenant, 0.0) + row["charged_usd"]
        if self.spool is not None:
            for tenant, charged in self.spool.charges().items():
                out[tenant] = out.get(tenant, 0.0) + charged
        return out

    def spooling(self) -> bool:
        """True while decisions are being kept on disk (the database was unreachable and
        the spool is not replayed yet)."""
        return self.spool is not None and self.spool.depth() > 0

    def must_confirm(self) -> bool:
        """Whether a decide must wait for :meth:`wait_durable` before it is answered:
        always in write-through mode, and while spooling (an outage)."""
        return self.write_through or self.spooling()

    def wait_durable(self, decision_id: str, timeout: float) -> bool:
        """Block until the row is committed to the database or to the spool (True), or
        ``timeout`` passes (False)."""
        self._hurry()
        with self._cond:
            return self._cond.wait_for(lambda: decision_id not in self._pending
                                       or decision_id in self._spooled, timeout)

    def retry_now(self) -> None:
        """The database answered (``/readyz``): retry the spool's replay at once."""
        if self.spooling():
            self._retry_now = True
            self._hurry()

    def withdraw(self, decision_id: str) -> bool:
        """Take a row that is still queued (not being written) back out of the queue."""
        with self._cond:
            for row in self._rows:
                if row["id"] == decision_id:
                    self._rows.remove(row)
                    self._pending.discard(decision_id)
                    self._cond.notify_all()
                    return True
        return False

    def is_pending(self, decision_id: str) -> bool:
        with self._cond:
            return decision_id in self._pending

    def wait_for(self, decision_id: str, timeout: float = 10.0) -> bool:
        """Block until ``decision_id`` is written (True) or ``timeout`` passes (False)."""
        self._hurry()
        with self._cond:
            return self._cond.wait_for(lambda: decision_id not in self._pending, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written."""
        self._hurry()
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def _hurry(self) -> None:
        # Someone waits for a row: wake the writer whether it gathers rows or idles.
        self._urgent.set()
        with self._lock:
            if self._idle:
                self._has_rows.notify()

    # ------------------------------------------------------------ consumer
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="decision-writer",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._has_rows.notify()
        self._urgent.set()
        self._thread.join(timeout)
        self._thread = None
        self._insert.close()

    def _run(self) -> None:
        retry_at, delay = 0.0, 0.05
        while True:
            with self._lock:
                while not self._rows and not self._stopping and not self.spooling():
                    self._idle = True
                    self._has_rows.wait(self._flush_interval)
                    self._idle = False
                stopping = self._stopping
                if stopping and not self._rows and not self.spooling():
                    return  # stopping, everything written
            if self.spooling():
                # An outage: what is queued goes to disk now (the decides wait for it),
                # the database is retried with backoff, woken early by new rows.
                self._spool_queued()
                now = time.monotonic()
                if now >= retry_at or self._retry_now:
                    self._retry_now = False
                    if self._replay():
                        retry_at, delay = 0.0, 0.05
                        continue
                    retry_at, delay = now + delay, min(delay * 2, self._retry_max_s)
                if stopping:
                    self._spool_queued()
                    return  # the spool keeps the rest; the next start replays it
                if self._urgent.wait(max(retry_at - time.monotonic(), 0.0)):
                    self._urgent.clear()
                continue
            # Let rows gather for flush_interval (unless someone waits for one, or the
            # writer is stopping), then take them all: one transaction per batch, and one
            # wake-up of this thread per batch rather than per decision. Waking per
            # decision cost the event loop a GIL hand-off on every request.
            if not stopping and self._urgent.wait(self._flush_interval):
                self._urgent.clear()
            with self._lock:
                rows = self._rows
                batch = [rows.popleft() for _ in range(min(len(rows), self._batch_size))]
                self._in_flight = batch
            self._write_batch(batch)

    # ------------------------------------------------------------ the spool
    def _to_spool(self, rows: list[dict[str, Any]]) -> int:
        """Commit ``rows`` to the spool, as many as fit; returns how many."""
        assert self.spool is not None
        try:
            done = self.spool.add_many(rows)
        except sqlite3.Error:
            log.exception("spooling %d decisions to %s failed; they stay in memory",
                          len(rows), self.spool.path)
            return 0
        if done < len(rows):
            log.error("the decision spool is full (%d rows): %d decisions stay in memory",
                      self.spool.capacity, len(rows) - done)
        with self._cond:
            self._spooled.update(row["id"] for row in rows[:done])
            self._cond.notify_all()
        self.spooled_total += done
        return done

    def _spool_queued(self) -> None:
        """Move every queued row to the spool (in order); what does not fit stays queued."""
        with self._lock:
            rows = list(self._rows)
            self._rows.clear()
            self._in_flight = rows
        done = self._to_spool(rows) if rows else 0
        with self._lock:
            self._rows.extendleft(reversed(rows[done:]))
            self._in_flight = []

    def _replay(self) -> bool:
        """Write the spool into the database, oldest first; True once it is empty, False
        when the database is still unreachable."""
        assert self.spool is not None
        replayed = 0
        while self.spool.depth():
            self._spool_queued()  # decides waiting meanwhile are not held up
            head = self.spool.head(self._batch_size)
            if not head:
                break
            rows = [row for _, row in head]
            try:
                with self._engine.connect() as conn:
                    stored = set(conn.scalars(select(DecisionRow.id).where(
                        DecisionRow.id.in_([row["id"] for row in rows]))))
                # Stored already: written before a crash that left them in the spool.
                fresh = [row for row in rows if row["id"] not in stored]
                if fresh:
                    self._insert.write(fresh)
            except (OperationalError, InterfaceError) as exc:
                self._insert.close()
                log.warning("%d decisions spooled; the database is still unreachable (%s)",
                            self.spool.depth(), type(exc).__name__)
                return False
            except DBAPIError:
                self._write_one_by_one(fresh)
            self.spool.remove_through(head[-1][0])
            self._written(rows)
            replayed += len(rows)
        if replayed:
            log.warning("the database answers: %d spooled decisions written", replayed)
        return True

    def _written(self, rows: list[dict[str, Any]]) -> None:
        """``rows`` are in the database: wake whoever waits for them."""
        with self._cond:
            for row in rows:
                self._pending.discard(row["id"])
                self._spooled.discard(row["id"])
            self._cond.notify_all()
        self.flushed += len(rows)
        if self._on_flush is not None:
            self._on_flush(len(rows))

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        """Write ``batch`` as statements of bounded shapes (SQLite): all of it when it
        holds ``batch_size`` rows, else in parts of 2**k rows, largest first (a batch of
        24 is one INSERT of 16 rows and one of 8).

        Every row count is a distinct SQL text, and Python's sqlite3 keeps the last 128
        prepared statements of each connection (``cached_statements``). A prepared k-row
        INSERT into ``decisions`` holds about 2.8 KB per row (13 columns, two indexes, a
        foreign key), so batches of every size up to 500 filled that cache with up to
        ~180 MB that was never freed: the resident memory grew in steps under load, each
        stall (a checkpoint, a busy machine) leaving larger batches, new shapes, behind
        (docs/reliability.md, load). Powers of two bound the shapes to
        log2(batch_size) + 2, about 3 MB of prepared statements. Each part is its own
        autocommit statement (atomic, retried alone): nothing changes for a row.
        """
        if not self._insert.fast or len(batch) >= self._batch_size:
            parts = [batch]
        else:
            parts, start = [], 0
            while start < len(batch):
                size = 1 << ((len(batch) - start).bit_length() - 1)
                parts.append(batch[start:start + size])
                start += size
        for i, part in enumerate(parts):
            if not self._write(part):
                # The database is away: this part and the ones after it go to the spool
                # (the queue follows them there: the loop is now spooling).
                rest = [row for later in parts[i:] for row in later]
                done = self._to_spool(rest)
                with self._lock:
                    self._in_flight = []
                if done < len(rest):
                    self._write_retrying(rest[done:])
                return

    def _write(self, batch: list[dict[str, Any]]) -> bool:
        """Write ``batch``; False (nothing written) when the database cannot be reached
        and a spool can take the rows."""
        if self.spool is None:
            self._write_retrying(batch)
            return True
        try:
            self._insert.write(batch)
        except (OperationalError, InterfaceError):
            log.warning("writing %d decisions failed: the database is unreachable; "
                        "spooling them to %s", len(batch), self.spool.path, exc_info=True)
            return False
        except DBAPIError:
            self._write_one_by_one(batch)
        self._done_in_flight(batch)
        return True

    def _write_retrying(self, batch: list[dict[str, Any]]) -> None:
        delay = 0.05
        while True:
            try:
                self._insert.write(batch)
                break
            except (OperationalError, InterfaceError):
                # The database is away and no spool takes the rows: keep them and retry.
                # The queue fills up meanwhile and the API turns that into 503s
                # (backpressure), not loss.
                log.exception("writing %d decisions failed; retrying in %.2fs",
                              len(batch), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except DBAPIError:
                # A row the database refuses (a bug, not an outage) must not block the
                # rows behind it: write one by one and report each refused row.
                self._write_one_by_one(batch)
                break
        self._done_in_flight(batch)

    def _done_in_flight(self, batch: list[dict[str, Any]]) -> None:
        with self._lock:
            self._in_flight = self._in_flight[len(batch):]  # the parts still to write
        self._written(batch)

    def _write_one_by_one(self, batch: list[dict[str, Any]]) -> None:
        stored = self._stored_alike(batch)
        for row in batch:
            if row["id"] in stored:
                # An earlier try's commit landed but its answer was lost (a retry after
                # a connection error): the row is there, not refused.
                self.already_stored += 1
                log.warning("decision %s was already stored (a commit whose answer was "
                            "lost); not written again", row["id"])
                continue
            try:
                self._insert.write([row])
            except DBAPIError:
                self.failed += 1
                log.exception("decision %s refused by the database; it is not stored",
                              row["id"])

    def _stored_alike(self, batch: list[dict[str, Any]]) -> set[str]:
        """The ids of ``batch`` stored already with the same decision (the columns no
        feedback changes); a stored id with other content stays a refusal."""
        columns = [getattr(DecisionRow, name) for name in _SAME_DECISION]
        try:
            with self._engine.connect() as conn:
                found = conn.execute(select(*columns).where(
                    DecisionRow.id.in_([row["id"] for row in batch]))).all()
        except DBAPIError:
            log.warning("could not look for decisions already stored", exc_info=True)
            return set()
        by_id = {row["id"]: row for row in batch}
        return {values[0] for values in found
                if tuple(_plain(v) for v in values)
                == tuple(_plain(by_id[values[0]].get(name)) for name in _SAME_DECISION)}
