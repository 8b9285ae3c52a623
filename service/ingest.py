"""Embedded mode's feedback sink: store each feedback once, then hand its outcome to the
policy store (tables ``feedback`` written, ``decisions.charged_usd`` reconciled).

The path of one feedback, top to bottom: :meth:`FeedbackIngest.submit` waits for its
decision to be written (the decision writer may still hold it), :meth:`_store_many`
writes it in one transaction with its decision's reconciled charge, recognizes a repeat
(``duplicate``) and an unknown decision, then :meth:`_apply_stored` hands the outcome to
:meth:`service.policies.PolicyStore.apply`, and :meth:`_account` moves the tenant's
ledger and the metrics.

While the database is unreachable the feedback is kept in the outage buffer
(:mod:`service.spool`, committed to disk before the answer) and answered ``buffered``;
the drain thread (``feedback-drain``) stores and applies it, through the same
:meth:`_store_many`, when the database is back.

Locks: store-then-apply runs under the policy store's ``apply_lock`` (so that a
checkpoint's ``last_feedback_id`` is exactly what its statistics include).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import models as m
from service.domain import FeedbackReceipt, TenantState, timestamp
from service.exceptions import NotFoundError, UnavailableError
from service.metrics import Metrics
from service.policies import PolicyStore
from service.registry import Registry
from service.spool import FeedbackSpool, SpooledFeedback, spool_path
from service.writer import DecisionWriter

__all__ = ["FeedbackIngest"]

log = logging.getLogger("service.ingest")
#: With a feedback buffer, feedback whose decision is still in the writer's queue waits
#: this long for it (the writer hurries when asked), then is buffered: the writer holds
#: the decision, typically because the database is away.
_PENDING_WAIT_S = 1.0
#: The drain retries an unreachable database with backoff up to this (seconds).
_DRAIN_MAX_DELAY_S = 1.0
#: Buffered feedback stored per transaction by the drain.
_DRAIN_BATCH = 200
_NO_BUFFER = "decisions from memory; feedback refused with 503 + Retry-After"


@dataclass(frozen=True)
class _Incoming:
    """One feedback on its way to the database (direct, or from the buffer)."""

    tenant: TenantState
    decision_id: str
    event: str
    outcome: dict[str, float | None]
    received: datetime


class _Stored(NamedTuple):
    """A feedback row stored (now, or by a commit whose answer was lost), to apply."""

    index: int  # in the batch
    feedback_id: int
    model: str
    context: bytes
    cost_delta: float  # the decision's charge moved by this much
    decided_at: float


class _Race(Exception):
    """Another process stored one of the batch's rows first: store them one by one."""


class FeedbackIngest:
    def __init__(self, settings: Settings, engine: Engine, registry: Registry,
                 policies: PolicyStore, writer: DecisionWriter, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.policies = policies
        self.writer = writer
        self.metrics = metrics
        self.spool: FeedbackSpool | None = None
        self._drain_thread: threading.Thread | None = None
        self._drain_stop = threading.Event()
        self._drain_wake = threading.Event()
        # (tenant, decision, event) -> (cost delta, decided at) of feedback whose commit
        # failed with a connection error: maybe stored, certainly not applied.
        self._uncertain: dict[tuple[str, str, str], tuple[float, float]] = {}

    # ================================================================= one feedback
    def submit(self, tenant: TenantState, decision_id: str,
               outcome: dict[str, float | None], event_id: str | None) -> FeedbackReceipt:
        """Record feedback (exactly once per decision and event id), then learn from it."""
        event = event_id or ""
        spool = self.spool
        if spool is not None and spool.depth():
            # Feedback already waits in the buffer: queue behind it, so that feedback is
            # stored and applied in the order it was accepted.
            return self._buffer(tenant, decision_id, event, outcome)
        if self.writer.is_pending(decision_id) and not self.writer.wait_for(
                decision_id, timeout=10.0 if spool is None else _PENDING_WAIT_S):
            if spool is not None:
                # The writer holds the decision (the database is away or far behind);
                # the drain waits for it to be written.
                return self._buffer(tenant, decision_id, event, outcome)
            raise UnavailableError("the decision is not written yet; retry",
                                   retry_after_s=1)
        received = m.utcnow()
        try:
            result = self._store_many([_Incoming(tenant, decision_id, event, outcome,
                                                 received)])[0]
        except (OperationalError, InterfaceError) as exc:
            if spool is None:
                raise  # 503 + Retry-After (service.errors)
            log.warning("storing feedback for decision %s failed (%s: the database is "
                        "unreachable); buffering it", decision_id, type(exc).__name__)
            # Same received time: if the commit did land, the drain recognizes the row.
            return self._buffer(tenant, decision_id, event, outcome, received)
        if isinstance(result, BaseException):
            raise result
        return result

    def _store_many(self, items: Sequence[_Incoming]) -> list[FeedbackReceipt | Exception]:
        """Store feedback rows (and their decisions' reconciled charges) in one
        transaction, then apply them in order: the one path of direct feedback (one
        item) and of the buffer's drain (a batch). Per item: ``applied``, ``duplicate``
        (that (decision_id, event_id) is stored already), a :class:`NotFoundError`
        (unknown decision or another tenant's: nothing stored, nothing applied), or the
        exception that applying it raised. Raises the database's errors (then nothing of
        the batch is known to be stored)."""
        results: list[FeedbackReceipt | Exception | None] = [None] * len(items)
        with self.policies.apply_lock:
            try:
                stored = self._write(items, results)
            except _Race:
                stored = None
            else:
                self._apply_stored(items, stored, results)
        if stored is None:
            if len(items) == 1:
                return [self._count_duplicate(FeedbackReceipt("duplicate", None))]
            return [self._store_many([it])[0] for it in items]
        return self._account(items, stored, results)

    def _write(self, items: Sequence[_Incoming],
               results: list[FeedbackReceipt | Exception | None]) -> list[_Stored]:
        """The transaction: new rows added, repeats and unknown decisions noted in
        ``results``; returns the rows to apply."""
        out: list[_Stored] = []
        with Session(self.engine) as session:
            ids = sorted({it.decision_id for it in items})
            decisions = {d.id: d for d in session.scalars(
                select(m.Decision).where(m.Decision.id.in_(ids)))}
            stored = {(d, e): (int(i), m.as_utc(at)) for d, e, i, at in session.execute(
                select(m.Feedback.decision_id, m.Feedback.event_id, m.Feedback.id,
                       m.Feedback.created_at).where(m.Feedback.decision_id.in_(ids)))}
            new: list[tuple[int, m.Feedback, m.Decision, float]] = []
            for i, it in enumerate(items):
                decision = decisions.get(it.decision_id)
                if decision is None or decision.tenant_id != it.tenant.id:
                    results[i] = NotFoundError(f"decision {it.decision_id} does not exist",
                                               slug="decision-not-found")
                    continue
                key = (it.decision_id, it.event)
                uncertain = self._uncertain.pop((it.tenant.id, *key), None)
                if key in stored:
                    fid, at = stored[key]
                    if uncertain is not None and at == it.received:
                        # Ours: its commit was sent but its outcome never came back (the
                        # connection died), so it was stored and not applied.
                        out.append(_Stored(i, fid, decision.model, decision.context,
                                           *uncertain))
                    else:
                        results[i] = FeedbackReceipt("duplicate", fid)
                    continue
                stored[key] = (0, it.received)  # a repeat later in this batch
                new.append((i, *self._add_row(session, it, decision)))
            if new:
                out.extend(self._commit(session, items, new))
        return out

    @staticmethod
    def _add_row(session: Session, it: _Incoming,
                 decision: m.Decision) -> tuple[m.Feedback, m.Decision, float]:
        fb = m.Feedback(decision_id=it.decision_id, tenant_id=it.tenant.id,
                        event_id=it.event, quality=it.outcome.get("quality"),
                        cost_usd=it.outcome.get("cost_usd"),
                        latency_ms=it.outcome.get("latency_ms"), created_at=it.received)
        session.add(fb)
        delta = 0.0
        if it.outcome.get("cost_usd") is not None:
            delta = float(it.outcome["cost_usd"]) - decision.charged_usd
            decision.charged_usd = float(it.outcome["cost_usd"])
        return fb, decision, delta

    def _commit(self, session: Session, items: Sequence[_Incoming],
                new: list[tuple[int, m.Feedback, m.Decision, float]]) -> list[_Stored]:
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            raise _Race from None
        batch = [_Stored(i, int(fb.id), d.model, d.context, delta, timestamp(d.created_at))
                 for i, fb, d, delta in new]
        try:
            session.commit()
        except IntegrityError:
            session.rollback()  # another process stored one of them first
            raise _Race from None
        except (OperationalError, InterfaceError):
            # Maybe committed, maybe not: remember what applying them would take; the
            # retry recognizes them by their time.
            for row in batch:
                it = items[row.index]
                self._uncertain[(it.tenant.id, it.decision_id, it.event)] = (
                    row.cost_delta, row.decided_at)
            raise
        return batch

    def _apply_stored(self, items: Sequence[_Incoming], stored: list[_Stored],
                      results: list[FeedbackReceipt | Exception | None]) -> None:
        stored.sort()  # item order (a recovered row may come first)
        for row in stored:
            it = items[row.index]
            try:
                self.policies.apply(it.tenant.id, row.model,
                                    np.frombuffer(row.context, dtype=np.float64),
                                    it.outcome, row.decided_at)
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[row.index] = exc
            else:
                results[row.index] = FeedbackReceipt("applied", row.feedback_id)
            self.policies.last_feedback_id = max(self.policies.last_feedback_id,
                                                 row.feedback_id)

    def _account(self, items: Sequence[_Incoming], stored: list[_Stored],
                 results: list[FeedbackReceipt | Exception | None]
                 ) -> list[FeedbackReceipt | Exception]:
        """Ledgers and metrics of the applied rows (after the lock)."""
        for row in stored:
            it = items[row.index]
            if row.cost_delta:
                it.tenant.ledger.adjust(row.cost_delta, row.decided_at)
            if not isinstance(results[row.index], FeedbackReceipt):
                continue
            self.metrics.feedback.labels("applied").inc()
            if it.outcome.get("cost_usd"):
                self.metrics.spend_reported.labels(it.tenant.id).inc(
                    float(it.outcome["cost_usd"]))
            self.metrics.reward.labels(it.tenant.id).inc(it.tenant.preferences.reward(
                **{k: v for k, v in it.outcome.items() if v is not None}))
        for result in results:
            if isinstance(result, FeedbackReceipt) and result.status == "duplicate":
                self._count_duplicate(result)
        return results  # type: ignore[return-value]

    def _count_duplicate(self, result: FeedbackReceipt) -> FeedbackReceipt:
        self.metrics.feedback.labels("duplicate").inc()
        return result

    # ---------------------------------------------------------- feedback buffer
    def _buffer(self, tenant: TenantState, decision_id: str, event: str,
                outcome: dict[str, float | None],
                received: datetime | None = None) -> FeedbackReceipt:
        """Keep the feedback in the buffer (committed to disk before the answer)."""
        assert self.spool is not None
        result = self.spool.add(tenant.id, decision_id, event, outcome,
                                (received or m.utcnow()).isoformat())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self.metrics.feedback_buffer.labels(result).inc()
        if result == "full":
            raise UnavailableError(f"the database is unavailable and the feedback buffer "
                                   f"is full ({self.spool.capacity} events); nothing was "
                                   "stored, retry later", retry_after_s=5)
        self.metrics.feedback.labels(result).inc()
        self._drain_wake.set()
        return FeedbackReceipt(result, None)

    def buffered(self) -> int:
        """Feedback events accepted and not yet stored in the database."""
        return self.spool.depth() if self.spool is not None else 0

    def outage_serving(self) -> str:
        """What callers get while the database is unreachable (for ``/readyz``)."""
        if self.spool is None:
            return _NO_BUFFER
        return (f"decisions from memory; feedback buffered ({self.spool.depth()} of "
                f"{self.spool.capacity}; 503 + Retry-After when full)")

    def degraded(self) -> dict[str, str]:
        """Feedback still in the outage buffer, for ``/readyz``."""
        buffered = self.buffered()
        if buffered:
            return {"feedback_buffer": f"{buffered} feedback events accepted while the "
                                       "database was unreachable, being stored"}
        return {}

    def start(self) -> None:
        s = self.settings
        if s.feedback_buffer_size <= 0:
            return
        directory = s.feedback_buffer_dir if s.feedback_buffer_dir is not None else s.data_dir
        self.spool = FeedbackSpool(spool_path(directory, s.resolved_database_url()),
                                   s.feedback_buffer_size)
        if self.spool.depth():
            log.warning("%d feedback events buffered by a previous run; storing them",
                        self.spool.depth())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self._drain_stop.clear()
        self._drain_thread = threading.Thread(target=self._drain_loop,
                                              name="feedback-drain", daemon=True)
        self._drain_thread.start()

    def stop(self) -> None:
        """Before the writer stops: the drain thread ends."""
        if self._drain_thread is not None:
            self._drain_stop.set()
            self._drain_wake.set()
            self._drain_thread.join(30)
            self._drain_thread = None

    def close(self) -> None:
        """After the writer stopped: a last drain (the database may be back), then close
        the file (removed when empty; otherwise the next start drains it)."""
        if self.spool is None:
            return
        if self.spool.depth():
            try:
                self.drain(deadline=time.monotonic() + 10.0)
            except Exception as exc:  # noqa: BLE001 - the rows stay on disk
                log.warning("final feedback drain failed (%s); %d events stay buffered",
                            type(exc).__name__, self.spool.depth())
        self.spool.close()

    def _drain_loop(self) -> None:
        delay = 0.25
        while not self._drain_stop.is_set():
            try:
                empty = self.drain()
                delay = 0.25
            except (OperationalError, InterfaceError) as exc:
                log.warning("feedback buffer: %d events wait, the database is still "
                            "unreachable (%s); retrying in %.2fs", self.buffered(),
                            type(exc).__name__, delay)
                self._drain_stop.wait(delay)
                delay = min(delay * 2, _DRAIN_MAX_DELAY_S)
                continue
            except Exception:
                log.exception("draining the feedback buffer failed; retrying")
                self._drain_stop.wait(delay)
                delay = min(delay * 2, _DRAIN_MAX_DELAY_S)
                continue
            if empty:
                self._drain_wake.wait(1.0)
                self._drain_wake.clear()
            else:  # waiting for a decision the writer still holds
                self._drain_stop.wait(0.1)

    def drain(self, deadline: float | None = None) -> bool:
        """Store and apply buffered feedback, oldest first, a batch per transaction;
        True once the buffer is empty.

        Stops (False) at feedback whose decision the writer still holds (it waits for
        it), at the deadline or when the drain is stopping; raises the database's
        connection errors (the batch stays buffered)."""
        spool = self.spool
        if spool is None:
            return True
        while spool.depth():
            if (self._drain_stop.is_set() and deadline is None) or (
                    deadline is not None and time.monotonic() > deadline):
                return False
            batch: list[SpooledFeedback] = []
            blocked = False
            for item in spool.head(_DRAIN_BATCH):
                if self.writer.is_pending(item.decision_id) and not self.writer.wait_for(
                        item.decision_id, timeout=_PENDING_WAIT_S):
                    blocked = True  # its decision first; the ones before it now
                    break
                batch.append(item)
            if batch:
                self._drain_batch(batch)
                spool.remove_through(batch[-1].seq)
                self.metrics.feedback_buffer_depth.set(spool.depth())
            if blocked:
                return False
        return True

    def _drain_batch(self, batch: list[SpooledFeedback]) -> None:
        def drop(item: SpooledFeedback, reason: str) -> None:
            self.metrics.feedback_buffer.labels("dropped").inc()
            log.warning("buffered feedback dropped: %s (decision %s, event %r, tenant %s)",
                        reason, item.decision_id, item.event_id, item.tenant_id)

        known: list[tuple[SpooledFeedback, _Incoming]] = []
        for item in batch:
            tenant = self.registry.tenants.get(item.tenant_id)
            if tenant is None:
                drop(item, "the tenant does not exist")
                continue
            known.append((item, _Incoming(tenant, item.decision_id, item.event_id,
                                          item.outcome,
                                          datetime.fromisoformat(item.received_at))))
        if not known:
            return
        try:
            results = self._store_many([incoming for _, incoming in known])
        except (OperationalError, InterfaceError):
            raise  # the database is away: the batch stays buffered
        except DBAPIError:
            if len(known) == 1:
                # Refused by the database (not an outage): logged, not retried forever
                # (it would block every event behind it).
                log.exception("buffered feedback for decision %s refused by the database",
                              known[0][0].decision_id)
                self.metrics.feedback_buffer.labels("dropped").inc()
                return
            for item, _ in known:  # find the one refused
                self._drain_batch([item])
            return
        for (item, _), result in zip(known, results, strict=True):
            if isinstance(result, NotFoundError):
                # Unknown decision, or another tenant's: nothing stored or applied.
                drop(item, "the decision does not exist or is another tenant's")
            elif isinstance(result, Exception):
                self.metrics.feedback_buffer.labels("dropped").inc()
                log.error("buffered feedback for decision %s stored but not applied",
                          item.decision_id, exc_info=result)
            else:
                self.metrics.feedback_buffer.labels(
                    "drained" if result.status == "applied" else "duplicate").inc()
