"""The outcome of each forwarded call, posted by the router itself.

Off the request's path: the answer goes out first, the outcome is queued here and a
background task hands batches of them to :meth:`RoutingService.feedback_many` in a
worker thread: one database transaction per batch (embedded mode), not one per call,
and the event loop never waits for it. A batch is sent once :data:`BATCH_TARGET`
outcomes are queued or the first of them has waited ``max_wait_s``, whichever comes
first: storing and learning costs ~0.8 ms of CPU for an outcome alone, ~0.3 ms each in
batches of 5, 0.16-0.19 ms in batches of 25 to 100 (SQLite; ``python -m
benchmarks.gateway_overhead --store-cost``, 2026-12-05, loaded machine; main before the
Core statements of service/ingest.py: 1.2, 0.46, 0.20-0.25 ms: the transaction's
statements are shared by the batch), and that CPU is taken from the requests being
served (the storing thread holds the GIL while it runs Python code, pausing between
chunks of rows), so at low rates waiting longer for a bigger batch is cheaper for
everyone; at high rates the target fills first.

At shutdown the queue is stored before the routing service stops
(:meth:`FeedbackSender.aclose`). An outcome is stored at most once: feedback is
exactly-once per (decision, event id), so a batch retried item by item
after an error stores none twice.

The join with a later quality: every outcome is posted with ``event_id`` =
:data:`EVENT_ID` (``"gateway"``). Feedback is exactly-once per (decision, event id), and
each event is learned on its own (the fields it gives), so the client's later
``POST /v1/feedback`` with the decision id and its own event id (or none) adds the
quality without being refused as a duplicate of the router's cost and latency.

The tenant's ``success_quality`` is not in that outcome: it is recorded as the call's
provisional default (:mod:`service.quality_defaults`) in the same batch, before the
outcomes are stored, and learned only if the client's quality does not come within the
tenant's ``quality_wait_seconds`` (:class:`DefaultApplier`, its own event
:data:`~service.quality_defaults.DEFAULT_EVENT`). A failure's quality 0 is in the
outcome and recorded as final, unless a client's quality for the call came first (it
was stored; the 0 is then left out of the outcome, not learned in addition). When that
record fails (the database away, or a transient error), a failure's outcome is held
here, not posted, and its record tried again in each later round (at least every
:data:`HELD_RETRY_S`) before it is posted: posted without it (distributed mode sends it
straight to the topic; embedded mode, the database back, stores it) nothing would keep
a later rating out, and both would be learned. At most :data:`HELD_MAX` are held, for
at most :data:`HELD_MAX_S`; past that, at shutdown (after one more try), and when the
database refused the record (an integrity or data error, not an outage: trying again
would not help), the outcomes are posted without their record as before (the outage
buffer's drain then records a buffered one; one stored at once is learned with a later
rating). Held outcomes (at most HELD_MAX_S of failures) are lost if the process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from service.exceptions import NotFoundError
from service.quality_defaults import DEFAULT_EVENT, OUTCOME_EVENT, QualityDefaults, Recorded
from service.routing import FeedbackItem, RoutingService, TenantState

__all__ = ["FeedbackSender", "DefaultApplier", "EVENT_ID"]

log = logging.getLogger("service.gateway")

#: The event id of the outcome the router posts for a forwarded call.
EVENT_ID = OUTCOME_EVENT
#: A batch is sent when this many outcomes are queued (or after ``max_wait_s``).
BATCH_TARGET = 100
_BATCH = 1000
#: At most this many failures' outcomes wait for their record (the module docstring).
HELD_MAX = 1000
#: Failures' outcomes held are tried again after this long without a batch.
HELD_RETRY_S = 1.0
#: ... and for at most this long: then posted as before (into the outage buffer while the
#: database is away, whose drain records them; not only in this process's memory).
HELD_MAX_S = 10.0

_Item = tuple[TenantState, str, dict[str, float | None], Recorded | None]


class FeedbackSender:
    """Queues outcomes and stores them in the background (one per app)."""

    def __init__(self, service: RoutingService, max_wait_s: float = 0.1) -> None:
        self._service = service
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._full = asyncio.Event()  # BATCH_TARGET outcomes are queued
        self._closing = False  # no more waiting for a batch: store what is queued
        self._task: asyncio.Task[None] | None = None
        self._queued = 0  # reported, not yet handed to the routing service
        self._held: list[_Item] = []  # failures whose record() failed (the docstring)
        self._held_since: float | None = None  # when the oldest held one was first held

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-feedback")

    def report(self, tenant: TenantState, decision_id: str, *, quality: float | None,
               cost_usd: float | None, latency_ms: float | None,
               default: Recorded | None = None) -> None:
        """Queue a call's outcome and, with ``success_quality``, its :class:`Recorded`
        default quality."""
        outcome = {"quality": quality, "cost_usd": cost_usd, "latency_ms": latency_ms}
        if default is not None or any(v is not None for v in outcome.values()):
            self._queue.put_nowait((tenant, decision_id, outcome, default))
            self._queued += 1
            if self._queue.qsize() >= BATCH_TARGET:
                self._full.set()

    def queued(self) -> int:
        """Outcomes reported and not stored yet."""
        return self._queued

    async def _run(self) -> None:
        while True:
            if not self._held:
                batch = [await self._queue.get()]
            elif self._closing:
                batch = []  # the held ones posted (the module docstring)
            else:
                try:
                    batch = [await asyncio.wait_for(self._queue.get(), HELD_RETRY_S)]
                except TimeoutError:
                    batch = []  # a round for the held ones alone
            # Wait for a batch (see the module docstring). Meanwhile the decisions reach
            # the database at the writer's own pace (max_wait_s is above its flush
            # interval): the feedback of a decision still queued would make the writer
            # flush at once, one transaction per decision instead of one per batch.
            if batch and self._queue.qsize() + 1 < BATCH_TARGET and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_wait_s)
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            held = len(self._held)
            try:
                await asyncio.to_thread(self._post, batch, not self._closing)
            finally:
                done = len(batch) + held - len(self._held)  # held ones stay queued
                self._queued -= done
                for _ in range(done):
                    self._queue.task_done()

    def _post(self, batch: list[_Item], hold: bool = True) -> None:
        """Store a batch (and the outcomes held before it); ``hold``: a failure's whose
        record() fails is held for the next round (the module docstring)."""
        batch, self._held = self._held + batch, []
        defaults = self._service.quality_defaults
        recorded = [d for *_, d in batch if d is not None]
        replaced: set[str] = set()
        if defaults is not None and recorded:
            try:
                # A client's quality already stored (a failure's, within the batch's
                # wait): the router's 0 is not reported in addition.
                replaced = defaults.record(recorded)
            except Exception as exc:  # noqa: BLE001 - the outcomes are still stored
                failures = [i for i in batch if i[3] is not None and i[3].due_at is None]
                # Refused by the database (not an outage): trying again would not help.
                refused = isinstance(exc, DBAPIError) and not isinstance(
                    exc, (OperationalError, InterfaceError))
                now = time.monotonic()
                hold = (hold and not refused and len(failures) <= HELD_MAX
                        and now - (self._held_since or now) < HELD_MAX_S)
                log.warning("the default qualities of %d gateway calls were not recorded "
                            "(a success's never learned; %d failures' %s)", len(recorded),
                            len(failures), "outcomes held, recorded in the next round"
                            if hold else "recorded if their outcome is buffered, when "
                            "drained", exc_info=True)
                if hold:
                    self._held = failures
                    self._held_since = self._held_since or now
                    batch = [i for i in batch if i[3] is None or i[3].due_at is not None]
        if not self._held:
            self._held_since = None
        outcomes = [(tenant, decision_id, {**outcome, "quality": None}
                     if decision_id in replaced else outcome)
                    for tenant, decision_id, outcome, _ in batch]
        items = [FeedbackItem(tenant, decision_id, outcome, EVENT_ID)
                 for tenant, decision_id, outcome in outcomes
                 if any(v is not None for v in outcome.values())]
        try:
            results: list[object] = list(self._service.feedback_many(items))
        except Exception:  # noqa: BLE001 - e.g. a row the database refused: one by one
            log.warning("storing %d gateway outcomes in one batch failed; storing them "
                        "one by one", len(items), exc_info=True)
            results = []
            for item in items:
                try:
                    results.append(self._service.feedback(*item))
                except Exception as exc:  # noqa: BLE001 - one lost outcome, not the rest
                    results.append(exc)
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Exception):
                log.warning("the outcome of decision %s was not stored: %s",
                            item.decision_id, result)

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Store what is queued (bounded by ``timeout_s``), then stop."""
        if self._task is None:
            return
        self._closing = True
        self._full.set()
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.warning("%d gateway outcomes not stored at shutdown", self._queued)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class DefaultApplier:
    """Learns the default qualities whose wait is over (one task per app): every
    ``interval_s`` it claims them (:meth:`QualityDefaults.take_due`), posts each as the
    feedback event :data:`DEFAULT_EVENT` through the routing service's sink, and marks
    them applied. One that could not be posted stays claimed and is posted again after
    the lease (a duplicate then, if it was stored after all)."""

    def __init__(self, service: RoutingService, defaults: QualityDefaults,
                 interval_s: float = 0.5, prune_every_s: float = 600.0) -> None:
        self._service, self._defaults = service, defaults
        self._interval_s, self._prune_every_s = interval_s, prune_every_s

    def apply_due(self) -> int:
        """One round (in a worker thread); how many defaults were posted."""
        due = self._defaults.take_due()
        if not due:
            return 0
        tenants = self._service.tenants
        items, known = [], []
        for d in due:
            tenant = tenants.get(d.tenant_id)
            if tenant is None:  # the tenant is gone: nothing to learn for it
                known.append(d.decision_id)
                continue
            items.append(FeedbackItem(tenant, d.decision_id, {"quality": d.quality},
                                      DEFAULT_EVENT))
        done = list(known)
        for item, result in zip(items, self._service.feedback_many(items), strict=True):
            if isinstance(result, NotFoundError):
                log.warning("the default quality of decision %s was not learned: %s",
                            item.decision_id, result)
            elif isinstance(result, Exception):
                log.warning("the default quality of decision %s was not stored (%s); "
                            "retried", item.decision_id, result)
                continue
            done.append(item.decision_id)
        self._defaults.applied(done)
        return len(items)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pruned, delay = loop.time(), self._interval_s
        while True:
            try:
                await asyncio.to_thread(self.apply_due)
                if loop.time() - pruned >= self._prune_every_s:
                    pruned = loop.time()
                    await asyncio.to_thread(self._defaults.prune)
                delay = self._interval_s
            except Exception as exc:  # noqa: BLE001 - the rows stay; retried later
                delay = min(delay * 2, 30.0)  # the database is away: no log flood
                log.warning("applying the default qualities failed (%s: %s); retrying "
                            "in %.1f s", type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
