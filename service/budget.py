"""Per-tenant spend: reservation at decide, reconciliation at feedback, and pacing.

Spend of a decision = its predicted cost (reserved when the decision is made), replaced
by the real cost when feedback reports one. Days and months are UTC calendar periods.

Pacing rule
-----------
Let ``f`` be the largest spent fraction over the budgets the tenant set (per day, per
month) and ``R`` the smallest remaining amount in USD. Below half of a budget nothing
changes. Above it the pressure ``p = ((f - 0.5) / 0.5)^2`` (0 at half, 1 at exhaustion)
raises the cost weight:

    cost' = cost * (1 + 9 p) + p * quality / R

The first term makes a tenant that already cares about cost care up to ten times more;
the second gives a price to money even for a tenant whose cost weight is 0: with full
pressure, spending the whole remaining budget on one request costs one full quality
point. The rule is a smooth stand-in for the dual variable of the budget constraint.

Several replicas
----------------
Each API replica reserves from its own ledger (a decision never waits on the database)
and, every ``registry_refresh_s``, :meth:`Ledger.sync` resets it to the spend every
replica has written (``charged_usd`` of the tenant's decisions this UTC day and month)
plus what this replica has reserved and not yet written, plus what moved locally while
the sum was read. So a budget holds across replicas up to what the other replicas
reserve between two syncs; a row written while the sum is read may count twice until
the next sync (the error is on the safe side).

Overspend bound
---------------
:meth:`Ledger.try_reserve` checks and reserves under one lock: the reserved spend never
exceeds a budget, whatever the concurrency. Only reconciliation (a real cost above the
predicted one) or the ``cheapest`` fallback (which serves on purpose after exhaustion)
take spend past a budget.

>>> ledger = Ledger(budget_day=1.0, budget_month=None)
>>> ledger.try_reserve(0.6, now=0.0), ledger.try_reserve(0.6, now=0.0)
(True, False)
>>> round(ledger.paced_cost_weight(quality=1.0, cost=10.0, now=0.0), 3)
13.7
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np

from bandit.base import MAX_WEIGHT

__all__ = ["Ledger", "period_keys", "format_usd"]


def period_keys(ts: float) -> tuple[str, str]:
    """UTC (day, month) keys of a timestamp: ``("2026-11-23", "2026-11")``."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%d"), dt.strftime("%Y-%m")


class Ledger:
    """One tenant's spend for the current UTC day and month (thread-safe)."""

    def __init__(self, budget_day: float | None, budget_month: float | None) -> None:
        self._lock = threading.Lock()
        self.budget_day = budget_day
        self.budget_month = budget_month
        self._day, self._month = period_keys(time.time())
        self._day_start = self._day_end = 0.0
        self.spent_day = 0.0
        self.spent_month = 0.0
        # Everything this replica added to spent_day / spent_month, ever (sync's marks).
        self._moved_day = 0.0
        self._moved_month = 0.0

    def set_budgets(self, budget_day: float | None, budget_month: float | None) -> None:
        with self._lock:
            self.budget_day, self.budget_month = budget_day, budget_month

    def load(self, spent_day: float, spent_month: float, now: float | None = None) -> None:
        with self._lock:
            self._day, self._month = period_keys(time.time() if now is None else now)
            self._day_start = self._day_end = 0.0
            self.spent_day, self.spent_month = spent_day, spent_month

    def _roll(self, now: float) -> None:
        # Called on every decision: compare with the next UTC midnight first and format
        # the period keys only when a day has passed.
        if self._day_start <= now < self._day_end:
            return
        day, month = period_keys(now)
        start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0,
                                                         microsecond=0)
        self._day_start = start.timestamp()
        self._day_end = self._day_start + 86_400.0
        if day != self._day:
            self._day, self.spent_day = day, 0.0
        if month != self._month:
            self._month, self.spent_month = month, 0.0

    def _fits(self, amount: float) -> bool:
        return ((self.budget_day is None or self.spent_day + amount <= self.budget_day)
                and (self.budget_month is None
                     or self.spent_month + amount <= self.budget_month))

    def try_reserve(self, amount: float, *, now: float | None = None,
                    force: bool = False) -> bool:
        """Atomically reserve ``amount`` if it fits every budget (or if ``force``)."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            if not force and not self._fits(amount):
                return False
            self.spent_day += amount
            self.spent_month += amount
            self._moved_day += amount
            self._moved_month += amount
            return True

    def fits(self, amount: float, *, now: float | None = None) -> bool:
        with self._lock:
            self._roll(time.time() if now is None else now)
            return self._fits(amount)

    def adjust(self, delta: float, decided_at: float, *, now: float | None = None) -> None:
        """Add ``delta`` to the periods the decision at ``decided_at`` was charged to,
        when they are still the current ones."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            day, month = period_keys(decided_at)
            if day == self._day:
                self.spent_day = max(self.spent_day + delta, 0.0)
                self._moved_day += delta
            if month == self._month:
                self.spent_month = max(self.spent_month + delta, 0.0)
                self._moved_month += delta

    def mark(self, *, now: float | None = None) -> tuple[str, float, float]:
        """Where this ledger stands before a sync reads the database (see :meth:`sync`)."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            return self._day, self._moved_day, self._moved_month

    def sync(self, spent_day: float, spent_month: float, mark: tuple[str, float, float],
             *, now: float | None = None) -> bool:
        """Take the spend of every replica (read after :meth:`mark`), plus what this
        ledger moved since the mark. False (nothing changed) when a day passed since."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            day, moved_day, moved_month = mark
            if day != self._day:
                return False
            self.spent_day = max(spent_day + self._moved_day - moved_day, 0.0)
            self.spent_month = max(spent_month + self._moved_month - moved_month, 0.0)
            return True

    def snapshot(self, now: float | None = None) -> tuple[float, float]:
        with self._lock:
            self._roll(time.time() if now is None else now)
            return self.spent_day, self.spent_month

    def paced_cost_weight(self, quality: float, cost: float, *,
                          now: float | None = None) -> float:
        """The cost weight after pacing (see the module docstring)."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            fractions, remaining = [], []
            for budget, spent in ((self.budget_day, self.spent_day),
                                  (self.budget_month, self.spent_month)):
                if budget is None:
                    continue
                fractions.append(1.0 if budget <= 0 else spent / budget)
                remaining.append(budget - spent)
        if not fractions:
            return cost
        f = max(fractions)
        if f <= 0.5:
            return cost
        p = min((f - 0.5) / 0.5, 1.0) ** 2
        paced = cost * (1.0 + 9.0 * p) + p * quality / max(min(remaining), 1e-6)
        # bandit refuses weights above MAX_WEIGHT (their square scales a variance); at
        # 1e6 quality points per USD the cheapest candidate wins anyway.
        return min(paced, MAX_WEIGHT)


def format_usd(value: float) -> str:
    """An amount for people: four decimals, or three significant digits below a cent,
    so that a small budget never shows as $0.0000.

    >>> format_usd(1234.5), format_usd(0.0204), format_usd(1e-5), format_usd(0.0)
    ('$1,234.5000', '$0.0204', '$0.00001', '$0.0000')
    >>> format_usd(0.000012345)
    '$0.0000123'
    """
    if value == 0 or abs(value) >= 0.01:
        return f"${value:,.4f}"
    return "$" + np.format_float_positional(value, precision=3, fractional=False, trim="-")
