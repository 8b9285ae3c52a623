"""Budget leases: each API replica spends a slice of a tenant's budget leased from
PostgreSQL, so that a budget holds across replicas without the database on the decide
path (quota leasing, as in Google's Doorman and global rate limiters).

The pool
--------
``budget_pools`` has one row per (tenant, budget period): ``granted_usd``, what the
replicas leased of the period's budget (spent, or still held by one of them). A lease is
ONE atomic statement::

    UPDATE budget_pools SET granted_usd = granted_usd + g ... RETURNING g, granted_usd

with ``g = min(want, max(share * (budget - granted), floor), budget - granted)``: never
more than what is left, so the slices never add up to more than the budget, and never
more than ``share`` of what is left (but at least one reservation, ``floor``), so the
slices shrink as the remaining budget does and the last of it is split among the
replicas that spend. A replica returns what it does not use (``granted_usd -= back``).

Slice size
----------
A few seconds of the replica's own spend: ``horizon_s`` times its spend rate (an
exponential average over ``horizon_s``), at least the standby slice below. The ledger
asks for more (without I/O: it sets an event) when its slice falls under half of that
or under two reservations, or when a reservation did not fit;
the lease thread also looks every ``interval_s``, and returns the part of a slice above
twice the target (an idle replica keeps only the standby slice: four of its largest
reservation, a tenth of the budget before it has made one, and at least 1% of what is
left of the budget, so that a burst after a quiet spell does not find it empty).

Bound
-----
The reservations of all replicas together never exceed the budget (only the ``cheapest``
fallback after exhaustion and real costs above predicted ones go past it, as with one
replica). A replica that cannot reach the database spends only what it holds. One killed
with ``kill -9`` takes its unused slice with it: the budget under-spends by at most that
slice. Real costs reported by feedback are folded into the pool every
``true_up_interval_s`` (``reconciled_usd``: the sum of real minus predicted cost of the
period's decisions, applied once whichever replica runs it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg

from service.budget import Ledger
from service.config import Settings

__all__ = ["BudgetLeases", "budget_leases", "period_bounds"]

log = logging.getLogger("service.budget_lease")

# grant = min(want, max(share * left, floor), left), never negative; both SET
# expressions read the row as it was before this statement (under its row lock): one
# atomic grant.
_LEASE = (
    "UPDATE budget_pools SET last_grant_usd = GREATEST(LEAST(%(want)s::float8,"
    " GREATEST(%(share)s::float8 * (%(budget)s::float8 - granted_usd), %(floor)s::float8),"
    " %(budget)s::float8 - granted_usd), 0),"
    " granted_usd = granted_usd + GREATEST(LEAST(%(want)s::float8,"
    " GREATEST(%(share)s::float8 * (%(budget)s::float8 - granted_usd), %(floor)s::float8),"
    " %(budget)s::float8 - granted_usd), 0),"
    " updated_at = now() WHERE tenant_id = %(t)s AND period_key = %(k)s"
    " RETURNING last_grant_usd, granted_usd")
_RETURN = (
    "UPDATE budget_pools SET granted_usd = GREATEST(granted_usd - %(back)s::float8, 0),"
    " updated_at = now() WHERE tenant_id = %(t)s AND period_key = %(k)s"
    " RETURNING granted_usd")
_TRUE_UP = (
    "UPDATE budget_pools AS p SET reconciled_usd = s.delta, updated_at = now(),"
    " granted_usd = GREATEST(p.granted_usd + s.delta - p.reconciled_usd, 0)"
    " FROM (SELECT coalesce(sum(charged_usd - predicted_cost_usd), 0) AS delta"
    " FROM decisions WHERE tenant_id = %(t)s AND created_at >= %(start)s"
    " AND created_at < %(end)s) AS s"
    " WHERE p.tenant_id = %(t)s AND p.period_key = %(k)s")


def budget_leases(settings: Settings, dialect: str) -> BudgetLeases | None:
    """The lease component the settings ask for (``budget_leases``; unset = on in
    distributed mode), or None."""
    wanted = settings.budget_leases
    if wanted is None:
        wanted = bool(settings.kafka_bootstrap)
    if not wanted:
        return None
    if dialect != "postgresql":
        raise ValueError("budget_leases needs a PostgreSQL database_url (got "
                         f"{dialect}); unset BANDIT_ROUTER_BUDGET_LEASES or use PostgreSQL")
    return BudgetLeases(settings.resolved_database_url(),
                        horizon_s=settings.budget_lease_horizon_s,
                        true_up_interval_s=settings.registry_refresh_s)


def period_bounds(key: str) -> tuple[datetime, datetime]:
    """UTC start and end of a budget period key (``service.budget.period_keys``).

    >>> [d.isoformat() for d in period_bounds("2026-12")]
    ['2026-12-01T00:00:00+00:00', '2027-01-01T00:00:00+00:00']
    """
    if len(key) == 7:  # a month
        start = datetime.strptime(key, "%Y-%m").replace(tzinfo=UTC)
        end = start.replace(year=start.year + start.month // 12,
                            month=start.month % 12 + 1)
        return start, end
    start = datetime.strptime(key, "%Y-%m-%d").replace(tzinfo=UTC)
    return start, datetime.fromtimestamp(start.timestamp() + 86_400.0, UTC)


class _Rate:
    """A tenant's spend rate on this replica: an exponential average over ``horizon``."""

    __slots__ = ("total", "at", "usd_per_s", "last_spend_at")

    def __init__(self, total: float, at: float) -> None:
        self.total, self.at, self.usd_per_s, self.last_spend_at = total, at, 0.0, at

    def update(self, total: float, at: float, horizon: float) -> float:
        dt = at - self.at
        if dt > 0:
            alpha = 1.0 - math.exp(-dt / horizon)
            self.usd_per_s += alpha * ((total - self.total) / dt - self.usd_per_s)
            if total > self.total:
                self.last_spend_at = at
            self.total, self.at = total, at
        return self.usd_per_s


class BudgetLeases:
    """Keeps the budgeted tenants' slices topped up (one thread, one connection).

    Parameters
    ----------
    database_url
        PostgreSQL URL (SQLAlchemy or libpq form).
    horizon_s
        A slice is this many seconds of the replica's spend.
    share
        A lease takes at most this fraction of what is left of a budget.
    interval_s
        The thread looks at every slice at least this often (and when a ledger asks).
    true_up_interval_s
        How often real costs reported by feedback are folded into the pools.
    """

    def __init__(self, database_url: str, *, horizon_s: float = 3.0, share: float = 0.5,
                 interval_s: float = 0.5, true_up_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        scheme, sep, rest = database_url.partition("://")
        self.url = f"{scheme.split('+', 1)[0]}{sep}{rest}"
        self.horizon_s, self.share = horizon_s, share
        self.interval_s, self.true_up_interval_s = interval_s, true_up_interval_s
        self.clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._rates: dict[str, _Rate] = {}
        self._dry: dict[tuple[str, str], float] = {}  # (tenant, period key) -> retry at
        self._trued_up_at = 0.0
        self._budgeted: Callable[[], list[tuple[str, Ledger]]] = list
        self.leases = self.returns = self.failures = 0

    def wake(self) -> None:
        """Ask the thread to look now (what a ledger calls; no I/O)."""
        self._wake.set()

    # ------------------------------------------------------------ life cycle
    def start(self, budgeted: Callable[[], list[tuple[str, Ledger]]]) -> None:
        """First slices for every budgeted tenant (before serving), then the thread."""
        self._budgeted = budgeted
        try:
            self.maintain_all()
        except psycopg.Error:
            log.exception("first budget leases failed; retrying in the background")
        self._thread = threading.Thread(target=self._run, name="budget-leases",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and return every unused slice (best effort)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            for tenant_id, ledger in self._budgeted():
                for period, key, _budget, _held in ledger.lease_state():
                    self._give_back(tenant_id, ledger, period, key, None)
        except psycopg.Error:
            log.exception("returning the budget slices failed; they stay leased")
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.maintain_all()
            except Exception:
                # Meanwhile every replica spends only what it holds.
                self.failures += 1
                log.exception("budget leases failed; retrying in 1 s")
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._stop.wait(1.0)

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._conn

    # ------------------------------------------------------------ leases
    def maintain_all(self) -> None:
        now = self.clock()
        budgeted = self._budgeted()
        if now - self._trued_up_at >= self.true_up_interval_s:
            self._trued_up_at = now
            for tenant_id, ledger in budgeted:
                self.true_up(tenant_id, ledger)
        for tenant_id, ledger in budgeted:
            self.maintain(tenant_id, ledger, now)

    def maintain(self, tenant_id: str, ledger: Ledger, now: float) -> None:
        """Lease or return so that the tenant's slices are about the target."""
        rate = self._rates.get(tenant_id)
        if rate is None:
            rate = self._rates[tenant_id] = _Rate(ledger.reserved_total, now)
        usd_per_s = rate.update(ledger.reserved_total, now, self.horizon_s)
        for period, key, budget, held in ledger.lease_state(now=now):
            floor = max(ledger.largest, ledger.short)
            # A burst after a quiet spell must not find the slice empty while the budget
            # is far from spent: the standby slice is also 1% of what is left.
            left = budget - ledger.pool(period, key)
            standby = max(4.0 * floor if floor > 0 else budget / 10.0, 0.01 * left)
            target = max(usd_per_s * self.horizon_s, standby)
            if (held < 0.5 * target or ledger.short > held) and \
                    now >= self._dry.get((tenant_id, key), 0.0):
                self._lease(tenant_id, ledger, period, key, budget,
                            max(target - held, floor), floor, target)
            elif held > 2.0 * target:
                self._give_back(tenant_id, ledger, period, key, held - target)

    def _lease(self, tenant_id: str, ledger: Ledger, period: str, key: str, budget: float,
               want: float, floor: float, target: float) -> None:
        params = {"t": tenant_id, "k": key, "want": want, "floor": floor,
                  "share": self.share, "budget": budget}
        conn = self._db()
        row = conn.execute(_LEASE, params).fetchone()
        if row is None:  # the period's first lease: create its row, then lease
            conn.execute("INSERT INTO budget_pools (tenant_id, period_key, granted_usd,"
                         " last_grant_usd, reconciled_usd, updated_at)"
                         " VALUES (%s, %s, 0, 0, 0, now()) ON CONFLICT DO NOTHING",
                         (tenant_id, key))
            row = conn.execute(_LEASE, params).fetchone()
        granted, pool = float(row[0]), float(row[1])
        ledger.credit(period, key, granted, pool, slice_usd=target)
        self.leases += 1
        if granted <= 0:
            # Nothing left: ask again after interval_s, not on every refused decide.
            self._dry[(tenant_id, key)] = self.clock() + self.interval_s
        else:
            self._dry.pop((tenant_id, key), None)

    def _give_back(self, tenant_id: str, ledger: Ledger, period: str, key: str,
                   amount: float | None) -> None:
        """Return ``amount`` of the slice (None: all of it) to the pool."""
        back = ledger.take_held(period, key, amount)
        if back <= 0:
            return
        try:
            row = self._db().execute(_RETURN, {"t": tenant_id, "k": key,
                                               "back": back}).fetchone()
        except psycopg.Error:
            ledger.credit(period, key, back, None)  # not returned: still ours
            raise
        ledger.credit(period, key, 0.0, float(row[0]) if row else 0.0)
        self.returns += 1

    def true_up(self, tenant_id: str, ledger: Ledger) -> None:
        """Fold the real costs reported so far into the tenant's pools."""
        conn = self._db()
        for _period, key, _budget, _held in ledger.lease_state():
            start, end = period_bounds(key)
            conn.execute(_TRUE_UP, {"t": tenant_id, "k": key, "start": start, "end": end})
