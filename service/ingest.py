"""Embedded mode's feedback sink: store each feedback once, then hand it to the policy
store (tables ``feedback``; reconciles ``decisions.charged_usd``), with the outage buffer
(:class:`service.spool.FeedbackSpool`) and its drain thread.

The path of a feedback, top to bottom: :meth:`FeedbackIngest.submit` or ``submit_many``
(buffered while the database is away or feedback already waits) -> ``store_many`` in one
transaction (dedupe by ``(decision_id, event_id)``, reconcile the charge, the guard's
part) -> :meth:`service.policies.PolicyStore.apply` in order, under the store's
``apply_lock`` (so ``last_feedback_id`` is exactly what the statistics include) -> the
ledger and the metrics. The drain of the buffer goes through the same ``store_many``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter

import numpy as np
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from service.config import Settings
from service.db import models as m
from service.domain import FeedbackItem, FeedbackReceipt, TenantState, stored_outcome, timestamp
from service.exceptions import UnavailableError
from service.guards import GuardLesson, Guards
from service.ingest_rows import IN_DOUBT, RECOVERED, Incoming, Stored, in_doubt, receipt, settled
from service.ingest_rows import Decision as _Decision
from service.ingest_rows import Row as _Row
from service.ingest_rows import Uncertain as _Uncertain
from service.ingest_rows import update_decisions as _update_decisions
from service.local import LocalCopy
from service.metrics import Metrics
from service.policies import PolicyStore
from service.quality_defaults import QualityDefaults, Undo
from service.registry import Registry
from service.spool import (
    FeedbackSpool,
    SpooledFeedback,
    buffer_dir,
    outage_files,
    outage_serving,
    spool_path,
)
from service.writer import DecisionWriter

__all__ = ["FeedbackIngest", "Incoming", "Stored"]

log = logging.getLogger("service.ingest")
#: With a feedback buffer, feedback whose decision is still in the writer's queue waits
#: this long for it (the writer hurries when asked), then is buffered: the writer holds
#: the decision, typically because the database is away.
_PENDING_WAIT_S = 1.0
#: Buffered feedback stored per transaction by the drain.
_DRAIN_BATCH = 200
#: Transactions tried when another process stores one of a batch's rows first.
_ATTEMPTS = 3
#: Sleep _YIELD_S per _YIELD_EVERY rows applied (~0.1 ms of CPU each, GIL held): the event
#: loop's turn, not after the 5 ms switch interval (sleep(0) is not; ``gateway_overhead
#: --store-cost``). Under ``apply_lock`` only: checkpoints wait ~30% longer for a batch.
_YIELD_EVERY = 10
_YIELD_S = 1e-4


@dataclass(eq=False)
class FeedbackIngest:
    settings: Settings
    engine: Engine
    registry: Registry
    policies: PolicyStore
    guards: Guards
    writer: DecisionWriter
    metrics: Metrics
    local: LocalCopy
    #: The outage buffer (from :meth:`start`; None without one).
    spool: FeedbackSpool | None = None
    #: The gateway's (service/quality_defaults.py): a buffered quality claims when drained.
    defaults: QualityDefaults | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    #: (tenant, decision, event) -> feedback whose commit is in doubt.
    _uncertain: dict[tuple[str, str, str], _Uncertain] = field(default_factory=dict)
    #: Of those, the ones a later batch found stored and applied -> the first attempt's
    #: time (a retry answers ``applied``); the oldest forgotten beyond SETTLED_KEPT.
    _settled: dict[tuple[str, str, str], datetime] = field(default_factory=dict)

    # ================================================================= submit
    def submit(self, tenant: TenantState, decision_id: str, outcome: dict[str, float | None],
               event_id: str | None) -> FeedbackReceipt:
        """Record feedback (exactly once per decision and event id), then learn from it.

        While the database is unreachable the feedback is kept in the buffer and
        answered ``buffered``; the drain stores and applies it when the database is
        back."""
        result = self.submit_many([FeedbackItem(tenant, decision_id, outcome, event_id)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def submit_many(self, items: list[FeedbackItem]) -> list[FeedbackReceipt | Exception]:
        """:meth:`submit` for many (the gateway's outcomes), those stored directly in one
        transaction; per item its receipt, or the error :meth:`submit` would raise."""
        out: list[FeedbackReceipt | Exception | None] = [None] * len(items)
        spool, degraded = self.spool, self.local.degraded_since is not None
        deadline = time.monotonic() + (10.0 if spool is None else _PENDING_WAIT_S)
        direct: list[tuple[int, Incoming]] = []
        for i, (tenant, decision_id, outcome, event_id) in enumerate(items):
            event = event_id or ""
            if spool is not None and (spool.depth() or degraded):
                # Feedback already waits in the buffer: queue behind it, so that feedback
                # is stored and applied in the order it was accepted. Degraded (started
                # from the local copy): the policies are not the database's yet; the
                # drain applies it after the reload.
                out[i] = self._buffer(tenant, decision_id, event, outcome)
                continue
            if degraded:
                out[i] = UnavailableError("the service started while the database was "
                                          "unreachable and has no feedback buffer; retry "
                                          "later", retry_after_s=5, unsent=True)
                continue
            if self.writer.is_pending(decision_id) and (
                    (spool is not None and self.writer.spooling())
                    or not self.writer.wait_for(
                        decision_id, timeout=max(deadline - time.monotonic(), 0.0))):
                # The writer holds (or spooled) the decision: the database is away or
                # far behind; the drain waits for it to be written.
                out[i] = self._buffer(tenant, decision_id, event, outcome) \
                    if spool is not None else UnavailableError(
                        "the decision is not written yet; retry", retry_after_s=1,
                        unsent=True)
                continue
            direct.append((i, Incoming(tenant, decision_id, event, outcome, m.utcnow())))
        if direct:
            try:
                stored = self.store_many([it for _, it in direct])
                for (i, it), result in zip(direct, stored, strict=True):
                    out[i] = receipt(result, it.decision_id)
            except (OperationalError, InterfaceError) as exc:
                for i, it in direct:
                    if spool is None:
                        out[i] = exc  # 503 + Retry-After (service.errors)
                        continue
                    log.warning("storing feedback for decision %s failed (%s: the "
                                "database is unreachable); buffering it", it.decision_id,
                                type(exc).__name__)
                    # Same received time: if the commit landed, the drain recognizes it.
                    out[i] = self._buffer(it.tenant, it.decision_id, it.event,
                                                   it.outcome, it.received)
        return [r for r in out if r is not None]

    # ================================================================= store
    def store_many(self, items: list[Incoming]) -> list[Stored]:
        """Store feedback rows (and their decisions' reconciled charges) in one
        transaction, then apply them in order: the one path of direct feedback (one
        item) and of the buffer's drain (a batch). Raises the database's errors (then
        nothing of the batch is known to be stored). Commits in doubt settled first."""
        with self.policies.apply_lock:
            settle = in_doubt(self._uncertain, items) if self._uncertain else []
            if settle:
                items = settle + items
            for attempt in itertools.count(1):
                try:
                    results, rows = self._commit(items)
                    break
                except IntegrityError:
                    # Another process stored one of them first: read again, and that
                    # one is a duplicate now.
                    if attempt == _ATTEMPTS:
                        raise
            self._apply(items, rows, results)
        self._account(items, rows, results)
        return results[len(settle):] if settle else results

    def _commit(self, items: list[Incoming]) -> tuple[list[Stored], list[_Row]]:
        """The transaction: per item its result (``duplicate``, ``unknown-decision``;
        ``applied`` for now for the rows to apply) and the rows to apply.

        Core statements (the ORM's unit of work, an object and an INSERT per row, was half
        a gateway batch's CPU): a SELECT of the decisions, an INSERT, batched UPDATEs."""
        results = [Stored("applied")] * len(items)
        rows: list[_Row] = []
        pending: list[tuple[int, _Decision, float, GuardLesson | None]] = []
        values: list[dict[str, object]] = []
        fb_t = m.Feedback.__table__
        with self.engine.connect() as conn:
            ids = sorted({it.decision_id for it in items})
            decisions = _Decision.load(conn, ids)
            stored = {(fb.decision_id, fb.event_id): (
                int(fb.id), m.as_utc(fb.created_at), stored_outcome(fb))
                for fb in conn.execute(select(
                    fb_t.c.decision_id, fb_t.c.event_id, fb_t.c.id, fb_t.c.created_at,
                    fb_t.c.quality, fb_t.c.cost_usd, fb_t.c.latency_ms).where(
                    fb_t.c.decision_id.in_(ids)))}
            for i, it in enumerate(items):
                decision = decisions.get(it.decision_id)
                if decision is None or decision.tenant_id != it.tenant.id:
                    results[i] = Stored("unknown-decision")
                    continue
                key = (it.decision_id, it.event)
                if key in stored:
                    fid, at, outcome = stored[key]
                    uncertain = self._uncertain.get((it.tenant.id, *key))
                    if uncertain is not None and at == uncertain.received:
                        # Ours: its commit was sent but its outcome never came back (the
                        # connection died), so it was stored and not applied: with the
                        # stored row's outcome (the first attempt's), as a replay; once.
                        rows.append(_Row(i, fid, decision.model, decision.context,
                                         uncertain.cost_delta, uncertain.decided_at,
                                         decision.price(), uncertain.lesson, outcome))
                        stored[key] = (fid, RECOVERED, outcome)  # a repeat: duplicate
                    else:  # a retry of one settled by an earlier batch: its answer
                        results[i] = Stored("applied" if at == self._settled.get(
                            (it.tenant.id, *key)) else "duplicate", fid)
                    continue
                if it.outcome is IN_DOUBT:
                    continue  # its commit did not land: the retry stores it
                stored[key] = (0, RECOVERED, it.outcome)  # a repeat later: a duplicate
                values.append(it.row())
                delta = 0.0
                if it.outcome.get("cost_usd") is not None:
                    delta = float(it.outcome["cost_usd"]) - decision.charged_usd
                    decision.charged_usd = float(it.outcome["cost_usd"])
                pending.append((i, decision, delta,
                                self.guards.lesson(it.tenant, decision, it.outcome)))
            if pending:
                # One batched INSERT .. RETURNING, its rows in any order (asked for the
                # parameters' order, SQLAlchemy would insert row by row on SQLite): the
                # ids matched by (decision, event).
                got = {(r.decision_id, r.event_id): int(r.id) for r in conn.execute(
                    insert(fb_t).returning(fb_t.c.id, fb_t.c.decision_id, fb_t.c.event_id),
                    values)}
                new_ids = [got[(items[i].decision_id, items[i].event)]
                           for i, *_ in pending]
                _update_decisions(conn, decisions.values())
                new = [_Row(i, fid, d.model, d.context, delta, timestamp(d.created_at),
                            d.price(), lesson, items[i].outcome)
                       for (i, d, delta, lesson), fid in zip(pending, new_ids, strict=True)]
                try:
                    conn.commit()
                except (OperationalError, InterfaceError):
                    # Maybe committed, maybe not: remember what applying them would take;
                    # the retry (the buffer's, or the client's after a 503) recognizes
                    # them by this attempt's time.
                    for row in new:
                        it = items[row.index]
                        self._uncertain[(it.tenant.id, it.decision_id, it.event)] = \
                            _Uncertain(row.cost_delta, row.decided_at, it.received,
                                       it.tenant, row.lesson)
                    raise
                rows.extend(new)
        if self._uncertain or self._settled:
            settled(self._uncertain, self._settled, items, rows)
        # In id order, as a replay applies them (a recovered row, or one a retry
        # recovers behind a new row of its batch, is older than the batch's new rows).
        rows.sort(key=attrgetter("feedback_id"))
        return results, rows

    def _apply(self, items: list[Incoming], rows: list[_Row], results: list[Stored]) -> None:
        """Hand the committed rows to the policy store (``apply_lock`` held)."""
        store = self.policies
        for n, row in enumerate(rows):
            if n and not n % _YIELD_EVERY:
                time.sleep(_YIELD_S)  # the event loop's turn (the constants' comment)
            it = items[row.index]
            try:
                store.apply(it.tenant.id, row.model,
                            np.frombuffer(row.context, dtype=np.float64), row.outcome,
                            row.decided_at, row.price)
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[row.index] = Stored("not-applied", row.feedback_id, exc)
            else:
                results[row.index] = Stored("applied", row.feedback_id)
            if row.lesson is not None:
                self.guards.learn(it.tenant, row.lesson)
            store.last_feedback_id = max(store.last_feedback_id, row.feedback_id)

    def _account(self, items: list[Incoming], rows: list[_Row], results: list[Stored]) -> None:
        """The ledgers and the metrics, after the locks."""
        for row in rows:
            it = items[row.index]
            if row.cost_delta:
                it.tenant.ledger.adjust(row.cost_delta, row.decided_at)
            if results[row.index].status != "applied":
                continue
            metrics = self.metrics  # children cached: labels() validates and locks
            metrics.child(metrics.feedback, "applied").inc()
            if row.outcome.get("cost_usd"):
                metrics.child(metrics.spend_reported, it.tenant.id).inc(
                    float(row.outcome["cost_usd"]))
            metrics.child(metrics.reward, it.tenant.id).inc(it.tenant.preferences.reward(
                **{k: v for k, v in row.outcome.items() if v is not None}))
        for result in results:
            if result.status == "duplicate":
                self.metrics.feedback.labels("duplicate").inc()

    # ========================================================== outage buffer
    def _buffer(self, tenant: TenantState, decision_id: str, event: str,
                outcome: dict[str, float | None],
                received: datetime | None = None) -> FeedbackReceipt | Exception:
        """Keep the feedback in the buffer (committed to disk before the answer); the
        error to answer when it is full, ``unsent`` unless ``received`` (a failed commit's)."""
        assert self.spool is not None
        result = self.spool.add(tenant.id, decision_id, event, outcome,
                                (received or m.utcnow()).isoformat())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self.metrics.feedback_buffer.labels(result).inc()
        if result == "full":
            sent = "it may have been stored" if received else "nothing was stored"
            return UnavailableError(f"the database is unavailable and the feedback buffer "
                                    f"is full ({self.spool.capacity} events); {sent}, retry "
                                    "later", retry_after_s=5, unsent=received is None)
        self.metrics.feedback.labels(result).inc()
        self._wake.set()
        return FeedbackReceipt(result, None)

    def buffered(self) -> int:
        """Feedback events accepted and not yet stored in the database."""
        return self.spool.depth() if self.spool is not None else 0

    def outage_serving(self) -> str:
        return outage_serving(self.writer.spool, self.spool)

    def degraded(self) -> dict[str, str]:
        return outage_files(self.writer.spool, self.spool)

    def wake(self) -> None:
        """The database is back: drain now."""
        self._wake.set()

    def start(self) -> None:
        s = self.settings
        if s.feedback_buffer_size <= 0:
            return
        self.spool = FeedbackSpool(spool_path(buffer_dir(s), s.resolved_database_url()),
                                   s.feedback_buffer_size)
        if self.spool.depth():
            log.warning("%d feedback events buffered by a previous run; storing them",
                        self.spool.depth())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self._stop.clear()
        self._thread = threading.Thread(target=self._drain_loop, name="feedback-drain",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(30)
            self._thread = None

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
        while not self._stop.is_set():
            try:
                empty = self.drain()
                delay = 0.25
            except (OperationalError, InterfaceError) as exc:
                log.warning("feedback buffer: %d events wait, the database is still "
                            "unreachable (%s); retrying in %.2fs", self.buffered(),
                            type(exc).__name__, delay)
                self.local.wait_for_database(delay)
                delay = min(delay * 2, self.settings.outage_retry_s)
                continue
            except Exception:
                log.exception("draining the feedback buffer failed; retrying")
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.outage_retry_s)
                continue
            if empty:
                self._wake.wait(1.0)
                self._wake.clear()
            else:  # waiting for a decision the writer still holds
                self._stop.wait(0.1)

    def drain(self, deadline: float | None = None) -> bool:
        """Store and apply buffered feedback, oldest first, a batch per transaction;
        True once the buffer is empty.

        Stops (False) at feedback whose decision the writer still holds (it waits for
        it), at the deadline or when the drain is stopping; raises the database's
        connection errors (the batch stays buffered)."""
        spool = self.spool
        if spool is None:
            return True
        if self.local.degraded_since is not None:
            return False  # after the reload from the database
        started, drained = time.perf_counter(), 0
        while spool.depth():
            if (self._stop.is_set() and deadline is None) or (
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
                drained += len(batch)
            if blocked:
                return False
        if drained:
            log.warning("feedback buffer empty: %d events stored in %.2f s", drained,
                        time.perf_counter() - started)
        return True

    def _drop(self, item: SpooledFeedback, reason: str) -> None:
        self.metrics.feedback_buffer.labels("dropped").inc()
        log.warning("buffered feedback dropped: %s (decision %s, event %r, tenant %s)",
                    reason, item.decision_id, item.event_id, item.tenant_id)

    def _drain_batch(self, batch: list[SpooledFeedback]) -> None:
        known: list[tuple[SpooledFeedback, Incoming, Undo | None]] = []
        # Dropped items are counted once the batch is stored: an outage meanwhile
        # leaves the batch buffered, to be drained (and counted) again.
        dropped: list[tuple[SpooledFeedback, str]] = []
        live: list[tuple[SpooledFeedback, TenantState]] = []
        for item in batch:
            tenant = self.registry.tenants.get(item.tenant_id)
            if tenant is None:
                dropped.append((item, "the tenant does not exist"))
            else:
                live.append((item, tenant))
        taken = [(item.outcome, None) for item, _ in live] if self.defaults is None else \
            self.defaults.take_drained_many([item for item, _ in live])
        for (item, tenant), (outcome, undo) in zip(live, taken, strict=True):
            if outcome is None:
                dropped.append((item, "a second quality for a gateway call"))
                continue
            known.append((item, Incoming(tenant, item.decision_id, item.event_id, outcome,
                                         datetime.fromisoformat(item.received_at)), undo))
        self._store_known(known)
        for item, reason in dropped:
            self._drop(item, reason)

    def _store_known(self, known: list[tuple[SpooledFeedback, Incoming, Undo | None]]
                     ) -> None:
        """Store drained items whose claims are taken (``_drain_batch``); a batch the
        database refuses is stored item by item with the claims (and undos) of the
        first pass: taken again, a failure's row would be its own (a retry) and its undo
        would lose the default it took."""
        if not known:
            return
        try:
            results = self.store_many([incoming for _, incoming, _ in known])
        except (OperationalError, InterfaceError):
            raise  # the database is away: the batch stays buffered
        except DBAPIError:
            if len(known) == 1:
                # Refused by the database (not an outage): logged, not retried forever
                # (it would block every event behind it); what its quality took of
                # the call's row given back (the default due again, a failure's row).
                item, _, undo = known[0]
                log.exception("buffered feedback for decision %s refused by the database"
                              "%s", item.decision_id,
                              "; its claim on the call's quality given back" if undo else "")
                self.metrics.feedback_buffer.labels("dropped").inc()
                if undo is not None:
                    undo()
                return
            for k in known:  # find the one refused
                self._store_known([k])
            return
        for (item, _, _), result in zip(known, results, strict=True):
            if result.status == "unknown-decision":
                # Unknown decision, or another tenant's: nothing stored or applied.
                self._drop(item, "the decision does not exist or is another tenant's")
            elif result.error is not None:
                self.metrics.feedback_buffer.labels("dropped").inc()
                log.error("buffered feedback for decision %s stored but not applied",
                          item.decision_id, exc_info=result.error)
            else:
                self.metrics.feedback_buffer.labels(
                    "drained" if result.status == "applied" else "duplicate").inc()
