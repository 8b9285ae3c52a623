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
and, every ``registry_refresh_s``, :meth:`Ledger.sync` resets the spend it reports (and
paces on) to the spend every replica has written (``charged_usd`` of the tenant's
decisions this UTC day and month) plus what this replica has reserved and not yet
written, plus what moved locally while the sum was read.

With leases (``budget_leases``, on in distributed mode; service/budget_lease.py) the
budget itself is global: a replica may only reserve from a slice of the tenant's
remaining budget that it leased from PostgreSQL (``budget_pools``, one atomic
``UPDATE ... RETURNING`` per lease). The slices handed out never add up to more than the
budget, so the reservations of all replicas together never exceed it. The ledger holds
the slice (:meth:`Ledger.held`), spends it locally and asks the lease component for more
(:attr:`Ledger.wake`) when it runs low or a reservation did not fit; the component
leases, and returns what an idle replica does not use. A replica that cannot reach the
database spends only what it holds; one killed with ``kill -9`` takes its unused slice
with it (the budget under-spends by at most that slice, never over-spends). Pacing then
counts as spent everything leased by any replica and not held here: the global spend,
as of this replica's last lease.

Without leases (embedded mode by default) a budget holds across replicas up to what the
other replicas reserve between two syncs; a row written while the sum is read may count
twice until the next sync (the error is on the safe side).

Overspend bound
---------------
:meth:`Ledger.try_reserve` checks and reserves under one lock: the reserved spend never
exceeds a budget, whatever the concurrency (with leases: whatever the number of
replicas). Only reconciliation (a real cost above the predicted one) or the ``cheapest``
fallback (which serves on purpose after exhaustion) take spend past a budget.

>>> ledger = Ledger(budget_day=1.0, budget_month=None)
>>> ledger.try_reserve(0.6, now=0.0), ledger.try_reserve(0.6, now=0.0)
(True, False)
>>> round(ledger.paced_cost_weight(quality=1.0, cost=10.0, now=0.0), 3)
13.7
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from bandit.base import MAX_WEIGHT

__all__ = ["Ledger", "PERIODS", "period_keys", "format_usd"]

#: The budget periods, in the order of :func:`period_keys`.
PERIODS = ("day", "month")


def period_keys(ts: float) -> tuple[str, str]:
    """UTC (day, month) keys of a timestamp: ``("2026-11-23", "2026-11")``."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%d"), dt.strftime("%Y-%m")


class Ledger:
    """One tenant's spend for the current UTC day and month (thread-safe)."""

    def __init__(self, budget_day: float | None, budget_month: float | None, *,
                 leased: bool = False) -> None:
        self._lock = threading.Lock()
        #: Reservations must come out of a slice leased from the global budget.
        self.leased = leased
        #: Called (without I/O) when the held slice runs low or a reservation did not
        #: fit it: the lease component's wake-up.
        self.wake: Callable[[], None] | None = None
        # period -> (period key, USD held of that period's budget); a slice of another
        # period key (yesterday's) is void.
        self._held: dict[str, tuple[str, float]] = {}
        # period -> every replica's leases of the period as of our last lease (pacing).
        self._pool: dict[str, tuple[str, float]] = {}
        #: Sum of the reservations ever made (the lease component's spend rate), the
        #: largest one, and the last one refused for lack of a slice (0: none since).
        self.reserved_total = 0.0
        self.largest = 0.0
        self.short = 0.0
        self._slice: dict[str, float] = {}  # period -> the lease component's last target
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
            changed = (budget_day, budget_month) != (self.budget_day, self.budget_month)
            self.budget_day, self.budget_month = budget_day, budget_month
        if changed and self.leased and self.wake is not None:
            self.wake()

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

    def _fits_spent(self, amount: float) -> bool:
        return ((self.budget_day is None or self.spent_day + amount <= self.budget_day)
                and (self.budget_month is None
                     or self.spent_month + amount <= self.budget_month))

    def _fits(self, amount: float) -> bool:
        return self._fits_spent(amount) and (
            not self.leased or all(self._held_now(p) >= amount for p in self._budgeted()))

    def _budgeted(self) -> list[str]:
        return [p for p, b in (("day", self.budget_day), ("month", self.budget_month))
                if b is not None]

    def _key(self, period: str) -> str:
        return self._day if period == "day" else self._month

    def _held_now(self, period: str) -> float:
        key, amount = self._held.get(period, ("", 0.0))
        return amount if key == self._key(period) else 0.0

    def try_reserve(self, amount: float, *, now: float | None = None,
                    force: bool = False) -> bool:
        """Atomically reserve ``amount`` if it fits every budget (and, with leases, the
        slices held), or if ``force`` (which takes nothing from a slice)."""
        wake = False
        with self._lock:
            self._roll(time.time() if now is None else now)
            if not force:
                if not self._fits(amount):
                    if self.leased and self._fits_spent(amount):
                        self.short = max(self.short, amount)  # the slice was too small
                        wake = True
                    reserved = False
                else:
                    reserved = True
                    self.largest = max(self.largest, amount)
                    self.reserved_total += amount
                    if self.leased:
                        for period in self._budgeted():
                            key, held = self._held[period]
                            self._held[period] = (key, held - amount)
                            # Below half the last slice, or two reservations: ask for
                            # more before it runs out.
                            wake |= held - amount < max(0.5 * self._slice.get(period, 0.0),
                                                        2.0 * self.largest)
            if force or reserved:
                self.spent_day += amount
                self.spent_month += amount
                self._moved_day += amount
                self._moved_month += amount
        if wake and self.wake is not None:
            self.wake()  # sets an event: no I/O on the decide path
        return force or reserved

    def unreserve(self, amount: float, decided_at: float, *, from_slice: bool = True,
                  now: float | None = None) -> None:
        """Give back a reservation whose decision was never made (not written): the
        spend, and with leases the slice it came out of (``from_slice``: not a forced
        one)."""
        self.adjust(-amount, decided_at, now=now)
        if not (self.leased and from_slice):
            return
        with self._lock:
            for period, key in zip(PERIODS, period_keys(decided_at), strict=True):
                held_key, held = self._held.get(period, ("", 0.0))
                if held_key == key:
                    self._held[period] = (key, held + amount)

    # ------------------------------------------------ the lease component's side
    def lease_state(self, *, now: float | None = None) -> list[tuple[str, str, float, float]]:
        """Per budgeted period: (period, period key, budget, USD held)."""
        with self._lock:
            self._roll(time.time() if now is None else now)
            return [(p, self._key(p), self.budget_day if p == "day" else self.budget_month,
                     self._held_now(p)) for p in self._budgeted()]  # type: ignore[misc]

    def credit(self, period: str, key: str, amount: float, pool: float | None, *,
               slice_usd: float | None = None) -> None:
        """Add a leased ``amount`` to the slice held for ``period`` (of ``key``), with
        ``pool`` = every replica's leases of the period after this one (None: unknown)."""
        with self._lock:
            held_key, held = self._held.get(period, ("", 0.0))
            self._held[period] = (key, (held if held_key == key else 0.0) + amount)
            if pool is not None:
                self._pool[period] = (key, pool)
            if slice_usd is not None:
                self._slice[period] = slice_usd
            if amount > 0:
                self.short = 0.0

    def take_held(self, period: str, key: str, amount: float | None = None) -> float:
        """Take ``amount`` (None: all) out of the slice held for ``period`` (to return
        it); returns what was taken."""
        with self._lock:
            held_key, held = self._held.get(period, ("", 0.0))
            if held_key != key or held <= 0:
                return 0.0
            taken = held if amount is None else min(amount, held)
            self._held[period] = (key, held - taken)
            return taken

    def pool(self, period: str, key: str) -> float:
        """Every replica's leases of ``period`` (of ``key``) as of our last lease."""
        with self._lock:
            pool_key, pool = self._pool.get(period, ("", 0.0))
            return pool if pool_key == key else 0.0

    def held(self, period: str = "day") -> float:
        """USD of the current ``period``'s budget this replica holds (may reserve)."""
        with self._lock:
            return self._held_now(period)

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
            for period, budget, spent in (("day", self.budget_day, self.spent_day),
                                          ("month", self.budget_month, self.spent_month)):
                if budget is None:
                    continue
                pool_key, pool = self._pool.get(period, ("", 0.0))
                if self.leased and pool_key == self._key(period):
                    # Leased by any replica and not held here: the global spend as of
                    # our last lease (the others' unspent slices count as spent).
                    spent = max(spent, pool - self._held_now(period))
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
