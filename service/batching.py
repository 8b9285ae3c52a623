"""Micro-batching of decides on the event loop.

Every decide request that reaches the policy in the same event-loop iteration joins one
batch; the batch is decided by one :meth:`~service.decider.Decider.decide_many` call, scheduled
with ``call_soon`` when the first request of the batch arrives. Nothing waits for a batch
to fill: alone, a request is decided one loop iteration later (microseconds); under load,
the requests that arrived while the previous batch was being decided form the next one,
and share one ``Policy.decide_batch`` call (about the cost of one decision for a few
rows). Each row is still decided independently, with its own propensity.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from bandit import Preferences
from service.routing import DecideArgs, PendingDecision, RoutingService, TenantState

__all__ = ["DecideBatcher"]

log = logging.getLogger("service.batching")


class DecideBatcher:
    """Gathers decides per event-loop iteration (one instance per app and loop)."""

    def __init__(self, service: RoutingService) -> None:
        self._service = service
        self._args: list[DecideArgs] = []
        self._futures: list[asyncio.Future[PendingDecision]] = []

    def decide(self, tenant: TenantState, x: np.ndarray, candidates: list[str] | None,
               override: Preferences | None, input_tokens: int | None = None,
               ) -> asyncio.Future[PendingDecision]:
        """A future of the decision (or of the exception ``decide`` would raise)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PendingDecision] = loop.create_future()
        if not self._args:
            loop.call_soon(self._run)
        self._args.append(DecideArgs(tenant, x, candidates, override, input_tokens))
        self._futures.append(future)
        return future

    def _run(self) -> None:
        args, futures = self._args, self._futures
        self._args, self._futures = [], []
        try:
            results = self._service.decide_many(args)
        except Exception as exc:  # a bug: fail these requests (500), keep the loop going
            log.exception("deciding a batch of %d failed", len(args))
            results = [exc] * len(args)
        for future, result in zip(futures, results, strict=True):
            if future.cancelled():
                # The request is gone: its decision is never answered nor stored.
                if isinstance(result, PendingDecision):
                    self._service.release(result)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
