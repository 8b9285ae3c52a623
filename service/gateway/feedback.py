"""The outcome of each forwarded call, posted by the router itself.

Off the request's path: the answer goes out first, the outcome is queued here and a
background task hands batches of them to :meth:`RoutingService.feedback_many` in a
worker thread: one database transaction per batch (embedded mode), not one per call,
and the event loop never waits for it. A batch is sent once :data:`BATCH_TARGET`
outcomes are queued or the first of them has waited ``max_wait_s``, whichever comes
first: storing costs 1.5-2 ms of CPU for an outcome alone, 0.6-0.8 ms each in batches
of 5, 0.3-0.4 ms in batches of 25 to 100 (SQLite; ``python -m benchmarks.gateway_overhead
--store-cost``: the ORM transaction is shared by the batch), and that CPU is taken from
the requests being served (the storing thread holds the GIL while it runs Python code),
so at low rates waiting longer for a bigger batch is cheaper for everyone; at high rates
the target fills first.

At shutdown the queue is stored before the routing service stops
(:meth:`FeedbackSender.aclose`). An outcome is stored at most once: feedback is
exactly-once per (decision, event id), so a batch retried item by item
after an error stores none twice.

The join with a later quality: every outcome is posted with ``event_id`` =
:data:`EVENT_ID` (``"gateway"``). Feedback is exactly-once per (decision, event id), and
each event is learned on its own (the fields it gives), so the client's later
``POST /v1/feedback`` with the decision id and its own event id (or none) adds the
quality without being refused as a duplicate of the router's cost and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.routing import FeedbackItem, RoutingService, TenantState

__all__ = ["FeedbackSender", "EVENT_ID"]

log = logging.getLogger("service.gateway")

#: The event id of the outcome the router posts for a forwarded call.
EVENT_ID = "gateway"
#: A batch is sent when this many outcomes are queued (or after ``max_wait_s``).
BATCH_TARGET = 100
_BATCH = 1000

_Item = tuple[TenantState, str, dict[str, float | None]]


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

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-feedback")

    def report(self, tenant: TenantState, decision_id: str, *, quality: float | None,
               cost_usd: float | None, latency_ms: float | None) -> None:
        outcome = {"quality": quality, "cost_usd": cost_usd, "latency_ms": latency_ms}
        if any(v is not None for v in outcome.values()):
            self._queue.put_nowait((tenant, decision_id, outcome))
            self._queued += 1
            if self._queue.qsize() >= BATCH_TARGET:
                self._full.set()

    def queued(self) -> int:
        """Outcomes reported and not stored yet."""
        return self._queued

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Wait for a batch (see the module docstring). Meanwhile the decisions reach
            # the database at the writer's own pace (max_wait_s is above its flush
            # interval): the feedback of a decision still queued would make the writer
            # flush at once, one transaction per decision instead of one per batch.
            if self._queue.qsize() + 1 < BATCH_TARGET and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_wait_s)
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._post, batch)
            finally:
                self._queued -= len(batch)
                for _ in batch:
                    self._queue.task_done()

    def _post(self, batch: list[_Item]) -> None:
        items = [FeedbackItem(tenant, decision_id, outcome, EVENT_ID)
                 for tenant, decision_id, outcome in batch]
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
            log.warning("%d gateway outcomes not stored at shutdown", self._queue.qsize())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
