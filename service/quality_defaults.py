"""A gateway call's default quality, provisional: the client's own quality replaces it.

A tenant that sets ``success_quality`` (``/v1/tenants/me/gateway``) has the router report
that quality for each successful call it forwards (and 0 for a failed one). A client
may still rate the answer later with ``POST /v1/feedback``; learning both would teach
the model twice for one call, once with a made-up quality. So the default is learned
only if no quality of the client's came within the tenant's ``quality_wait_seconds``
(default 300); one that came replaces it. The decision is made in the database, one
row per call in ``quality_defaults`` (migration 0011), so that every replica, embedded
and distributed mode alike, and a restart see the same answer:

* the gateway records ``pending`` (the default, due at the call's time + the wait) or,
  for a failed call, ``final`` (its quality 0 is reported at once with the cost and
  latency: the router knows the call failed). A failure whose record failed (the
  database away, a transient error) has its outcome held and recorded again before it
  is posted (service/gateway/feedback.py; bounded: past that, the outage buffer's
  drain records it, while one stored at once, distributed mode's, leaves a later
  rating to be learned with the 0);
* a client's quality claims the row before it goes to the feedback sink: ``pending`` ->
  ``replaced`` (its event id kept); one that comes first leaves a ``replaced`` marker,
  which the gateway's record keeps. The claim is given back (``release``) when the sink
  refuses the quality with nothing sent (a 404/422, a 503 ``unsent``), by the stamp
  (``changed_at``) the claim wrote: a retry of the same event stamps it anew and keeps
  it (a retry never gives it back: an earlier attempt may have been sent). A failure's
  ``final`` row refused so goes too (``unfinal``: the client's rating is then taken).
  A quality buffered while the database was away claims when it is drained
  (service/ingest.py; given back if the database then refuses to store it);
* at ``due_at`` the gateway's applier claims ``pending`` -> ``applying``, posts the
  default as a feedback event of its own (:data:`DEFAULT_EVENT`) through the same sink
  as any feedback (so the learned statistics and their replay are those of ordinary
  feedback rows, exactly once per (decision, event) in both modes), then ``applied``.
  A row left ``applying`` (a crash, the database away) is posted again after
  :data:`LEASE_S` (a duplicate then);
* a quality that comes after the default was applied, a second quality (another event
  id) after a first replaced the default, and a quality for a failed call are refused
  with 409 (``quality-already-reported``): learned, they would count twice.

Done rows are kept :data:`RETENTION_S` (a day), then pruned (a later quality counts in
addition to the default, as without this table). Each change of a row is one statement
on it (or on a batch of rows), atomic on SQLite and PostgreSQL alike (``INSERT .. ON
CONFLICT``, ``UPDATE .. WHERE state = ..``), so two replicas never both apply a default
nor both replace it; :meth:`QualityDefaults.final` runs its steps in one transaction
and takes them again when the row changed between two of them (a failure's 0 takes the
place of a waiting default, given back by ``unfinal``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

from sqlalchemy import Engine, and_, case, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.db import models as m
from service.exceptions import ConflictError
from service.quality_refusals import refusal
from service.quality_rows import OUTCOME_EVENT, adopt, restamp, without_quality
from service.spool import SpooledFeedback

__all__ = ["QualityDefaults", "Claim", "Final", "Recorded", "Due", "Undo", "DEFAULT_EVENT",
           "OUTCOME_EVENT", "ROUTER_EVENTS", "LEASE_S", "RETENTION_S"]

log = logging.getLogger("service.quality_defaults")

#: The event id of a default quality, learned once its wait is over.
DEFAULT_EVENT = "gateway-default"
#: The router's own events (the call's outcome, its default quality): never a claim.
ROUTER_EVENTS = frozenset({OUTCOME_EVENT, DEFAULT_EVENT})
#: A default claimed for applying and not marked applied after this long is posted again.
LEASE_S = 10.0
#: Rows that are done are pruned after this long.
RETENTION_S = 86_400.0
_T = m.QualityDefault
#: What undoes a drained quality's step (:meth:`QualityDefaults.take_drained`).
Undo = Callable[[], None]


class Recorded(NamedTuple):
    """What the gateway records of one call: the default quality of a success, due at
    ``due_at``; or (``due_at`` None) the 0 of a failure, reported at once."""

    tenant_id: str
    decision_id: str
    quality: float
    due_at: datetime | None


class Final(NamedTuple):
    """What :meth:`QualityDefaults.final` did."""

    replaced: bool  # a client's quality came first: the failure's is not stored
    stamp: datetime | None  # the row it wrote (``changed_at``), for :meth:`unfinal`
    #: The waiting default it took the place of (quality, due time), for :meth:`unfinal`.
    took: tuple[float, datetime | None] | None = None


class Due(NamedTuple):
    tenant_id: str
    decision_id: str
    quality: float


@dataclass(frozen=True)
class Claim:
    """A client's quality took the decision's row (to undo if the sink refuses it)."""

    decision_id: str
    event_id: str
    #: The ``changed_at`` this claim wrote; None when it found the row its event's already
    #: (a retry: an earlier attempt may have been sent, it is not undone).
    stamp: datetime | None


def _insert(engine: Engine) -> Callable[[Any], Any]:
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


class QualityDefaults:
    """The ``quality_defaults`` table's steps (one per app, ``RoutingService.quality_defaults``).

    ``claims(tenant_id)`` says whether a tenant's qualities are claimed at all: only
    tenants with ``success_quality`` set, or whose client posted a ``default_quality``
    (``enable`` marks them), have defaults; the others' qualities only look the decision
    up (a replica whose cached settings are behind still claims a recorded default).
    ``wait_s(tenant_id)`` is the tenant's ``quality_wait_seconds``."""

    def __init__(self, engine: Engine, claims: Callable[[str], bool],
                 wait_s: Callable[[str], float], enable: Callable[[str], object]) -> None:
        self._engine = engine
        self._claims, self._wait_s, self._enable = claims, wait_s, enable
        self._insert = _insert(engine)

    def provisional(self, tenant_id: str, decision_id: str, quality: float) -> None:
        """A client's ``default_quality`` (the LiteLLM plug-in's success quality): recorded
        as the gateway records its own, due after the tenant's wait. The first one turns
        the tenant's claims on (``enable``, stored: every replica's within its settings
        reload)."""
        self._claims_on(tenant_id)
        due = m.utcnow() + timedelta(seconds=self._wait_s(tenant_id))
        self.record([Recorded(tenant_id, decision_id, quality, due)])

    def final(self, tenant_id: str, decision_id: str, quality: float,
              event_id: str | None = None) -> Final:
        """A client's quality for a failed call (``failed``, the LiteLLM plug-in's):
        recorded ``final`` as the gateway records its own failure (a later quality is
        refused); turns the tenant's claims on as :meth:`provisional` does. The row keeps
        the failure's ``event_id``: the same event drained from the outage buffer (or
        retried) is its own, not a second quality (:meth:`claim`); "" for none, as a
        claim's. ``replaced``: a quality of the client's came first (its marker), the
        failure's must not be stored. ``stamp``: this call wrote the row (``changed_at``);
        should the sink refuse the 0 with nothing sent, :meth:`unfinal` removes it. A
        retry of the same event that finds the row stamps it anew (the first attempt's
        undo keeps it) and gets no stamp: an earlier attempt may have stored the 0. A
        default not learned yet (``pending``) gives way to the failure's 0; a row of
        another event's failure, or a default learned already, raises
        :class:`ConflictError` (the claim's 409): the call has its quality."""
        self._claims_on(tenant_id)
        return self._final(tenant_id, decision_id, quality, event_id or "")

    def _final(self, tenant_id: str, decision_id: str, quality: float, event: str) -> Final:
        now = m.utcnow()
        insert = self._insert(_T).values(
            decision_id=decision_id, tenant_id=tenant_id, quality=quality, state="final",
            due_at=None, event_id=event, changed_at=now).on_conflict_do_nothing(
            index_elements=["decision_id"]).returning(_T.decision_id)
        row = and_(_T.decision_id == decision_id, _T.tenant_id == tenant_id)
        # One transaction, each step one statement: an earlier attempt's unfinal may
        # delete the row between two of them; then the insert is tried again.
        with Session(self._engine) as session, session.begin():
            while True:
                if session.execute(insert).first() is not None:
                    return Final(False, now)
                if restamp(session, tenant_id, decision_id, "final", event, now):
                    return Final(False, None)  # this failure's own row (a retry)
                if session.execute(update(_T).where(row, _T.state == "replaced").values(
                        quality=quality, due_at=None).returning(_T.decision_id)).first():
                    return Final(True, None)  # the client's quality came first
                # A default not learned yet: the failure's 0 takes its place (the row
                # locked, so that its default can be given back by unfinal).
                waiting = session.execute(select(_T.quality, _T.due_at).where(
                    row, _T.state == "pending").with_for_update()).first()
                if waiting is not None:
                    session.execute(update(_T).where(row).values(
                        state="final", quality=quality, due_at=None, event_id=event,
                        changed_at=now))
                    return Final(False, now, (float(waiting.quality), waiting.due_at))
                found = session.execute(select(_T.tenant_id, _T.state, _T.quality,
                                               _T.event_id).where(
                    _T.decision_id == decision_id)).first()
                if found is None or (found.tenant_id == tenant_id
                                     and found.state in ("pending", "replaced")):
                    # Deleted meanwhile (an earlier attempt's unfinal), or changed
                    # between two of the steps above (PostgreSQL: each statement sees
                    # what was committed when it started): the steps again.
                    continue
                if found.tenant_id != tenant_id:
                    return Final(False, None)  # another tenant's: the sink answers that
                if found.state == "final" and adopt(session, tenant_id, decision_id,
                                                    event, quality, now):
                    return Final(False, None)  # a retry of a pre-upgrade failure
                raise refusal(decision_id, found.state, found.quality, found.event_id)

    def unfinal(self, decision_id: str, stamp: datetime,
                took: tuple[float, datetime | None] | None = None) -> None:
        """The sink refused the failure's quality with nothing sent (:meth:`final`'s
        ``stamp``): its ``final`` row goes, so that the client's rating is taken, unless
        a retry of the same event stamped it since (that retry may store the 0). A
        default it took the place of (``took``) is waiting again, as a released claim's."""
        mine = and_(_T.decision_id == decision_id, _T.state == "final",
                    _T.changed_at == stamp)
        with Session(self._engine) as session, session.begin():
            if took is None:
                session.execute(delete(_T).where(mine))
            else:
                session.execute(update(_T).where(mine).values(
                    state="pending", quality=took[0], due_at=took[1], event_id=None,
                    changed_at=m.utcnow()))

    # ------------------------------------------------------------ the gateway
    def _claims_on(self, tenant_id: str) -> None:
        """Turn the tenant's claims on (stored) if this replica does not claim yet."""
        if not self._claims(tenant_id):
            self._enable(tenant_id)

    def record(self, rows: Sequence[Recorded]) -> set[str]:
        """Record calls' defaults (one transaction). A client's quality that came first
        left a ``replaced`` marker: it stays (its default is never applied; its due time
        is kept, so that a claim released later makes it due). A row whose quality is
        reported already (a client gateway's failure, ``final``; a default learned) is
        left as it is. Returns the decisions so replaced or left: their quality (a
        failure's 0) must not be reported too. A failure's own row keeps
        :data:`OUTCOME_EVENT` (its 0's event), so that it is told from a client's; it
        takes the place of a default still waiting (a client gateway's), as in final()."""
        if not rows:
            return set()
        now = m.utcnow()
        stmt = self._insert(_T).values([
            {"decision_id": r.decision_id, "tenant_id": r.tenant_id, "quality": r.quality,
             "state": "final" if r.due_at is None else "pending", "due_at": r.due_at,
             "event_id": OUTCOME_EVENT if r.due_at is None else None,
             "changed_at": now} for r in rows])
        failure = and_(stmt.excluded.due_at.is_(None), _T.state == "pending")
        stmt = stmt.on_conflict_do_update(
            index_elements=["decision_id"],
            set_={"quality": stmt.excluded.quality, "due_at": stmt.excluded.due_at,
                  "state": case((failure, "final"), else_=_T.state),
                  "event_id": case((failure, OUTCOME_EVENT), else_=_T.event_id)},
            # A failure's own row (a retry of a record whose commit's answer was lost)
            # is its own: the 0 is still to be reported.
            where=and_(_T.tenant_id == stmt.excluded.tenant_id, or_(
                _T.state.in_(("pending", "replaced")),
                and_(_T.state == "final", _T.event_id == OUTCOME_EVENT,
                     stmt.excluded.due_at.is_(None))))).returning(_T.decision_id, _T.state)
        with Session(self._engine) as session, session.begin():
            done = dict(session.execute(stmt).all())
            tenants = {r.decision_id: r.tenant_id for r in rows if r.decision_id not in done}
            left = [(d, state) for d, owner, state in session.execute(
                select(_T.decision_id, _T.tenant_id, _T.state).where(
                    _T.decision_id.in_(list(tenants)))) if owner == tenants[d]] \
                if tenants else []
        for decision_id, state in left:
            log.info("the gateway's quality for decision %s not recorded: its quality is "
                     "reported already (%s)", decision_id, state)
        return {d for d, state in done.items() if state == "replaced"} | {d for d, _ in left}

    def take_due(self, limit: int = 500) -> list[Due]:
        """Claim the defaults whose wait is over (and those claimed more than
        :data:`LEASE_S` ago and not applied) for posting."""
        now = m.utcnow()
        ready = or_(and_(_T.state == "pending", _T.due_at <= now),
                    and_(_T.state == "applying", _T.changed_at <= now - timedelta(
                        seconds=LEASE_S)))
        with Session(self._engine) as session:
            ids = list(session.scalars(select(_T.decision_id).where(ready)
                                       .order_by(_T.due_at).limit(limit)))
            if not ids:
                return []  # rolled back: no commit for a round with nothing due
            # The WHERE again: another replica may have claimed some meanwhile.
            rows = session.execute(
                update(_T).where(_T.decision_id.in_(ids), ready)
                .values(state="applying", changed_at=now)
                .returning(_T.tenant_id, _T.decision_id, _T.quality)).all()
            session.commit()
        return [Due(t, d, float(q)) for t, d, q in rows]

    def applied(self, decision_ids: Sequence[str]) -> None:
        if decision_ids:
            with Session(self._engine) as session, session.begin():
                session.execute(update(_T).where(_T.decision_id.in_(decision_ids),
                                                 _T.state == "applying")
                                .values(state="applied", changed_at=m.utcnow()))

    def prune(self) -> int:
        """Delete the rows done more than :data:`RETENTION_S` ago; how many."""
        before = m.utcnow() - timedelta(seconds=RETENTION_S)
        with Session(self._engine) as session, session.begin():
            result = session.execute(delete(_T).where(
                _T.state.in_(("replaced", "applied", "final")), _T.changed_at < before))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ a client's quality
    def claim(self, tenant_id: str, decision_id: str, event_id: str, *,
              buffered: bool = False) -> Claim | None:
        """Take the decision's row for a client's quality (``event_id``; "" for none)
        before it is submitted; raises :class:`ConflictError` when learning it would
        count a second quality for the call. None: nothing claimed (the tenant has no
        defaults, or the decision is another tenant's: the sink answers that).
        ``buffered``: a drained quality, whose lookup raises the database's errors (the
        drain stops there), and whose claim found its event's marker is stamped too
        (its release undoes it: the drain alone stores the item)."""
        if not self._claims(tenant_id) and not self._recorded(tenant_id, decision_id,
                                                              strict=buffered):
            return None
        now = m.utcnow()
        stmt = self._insert(_T).values(
            decision_id=decision_id, tenant_id=tenant_id, state="replaced", quality=None,
            due_at=None, event_id=event_id, changed_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["decision_id"],
            set_={"state": "replaced", "event_id": event_id, "changed_at": now},
            where=and_(_T.state == "pending", _T.tenant_id == tenant_id))
        with Session(self._engine) as session, session.begin():
            # A retry of this event's claim stamps it anew, so that the earlier
            # attempt's release (answered after the retry was sent) keeps it.
            took = session.execute(stmt.returning(_T.decision_id)).first() is not None
            if not took:
                # The drain's own claim (taken again) is its to release: stamped.
                took = restamp(session, tenant_id, decision_id, "replaced", event_id,
                               now) and buffered
            row = session.execute(select(_T.tenant_id, _T.state, _T.quality, _T.event_id)
                                  .where(_T.decision_id == decision_id)).one()
        owner, state, quality, taken_by = row
        if owner != tenant_id:
            return None
        if state == "replaced" and (taken_by == event_id or quality is None):
            # This event's claim (or its retry); or no default known (yet): the marker
            # only keeps a later default out, not other events.
            return Claim(decision_id, event_id, now if took else None)
        if state == "final" and taken_by == event_id:
            # The failure's own quality (:meth:`final`; "" for none, as the drain's and a
            # client's): nothing to claim.
            return None
        raise refusal(decision_id, state, quality, taken_by)

    def drained(self, tenant_id: str, decision_id: str, event_id: str,
                outcome: dict[str, float | None]) -> dict[str, float | None] | None:
        """A feedback drained from the outage buffer (service/ingest.py), whose quality
        claims now as it would have had the database been there (a claim made before is
        this event's, taken again; the drain has waited for its decision). The outcome
        to store: refused, without its quality (None: nothing left). The database's
        errors are raised (the drain stops there)."""
        return self.take_drained(tenant_id, decision_id, event_id, outcome)[0]

    def take_drained_many(self, items: Sequence[SpooledFeedback]
                          ) -> list[tuple[dict[str, float | None] | None, Undo | None]]:
        """:meth:`take_drained` for a drain's batch, in order. A client's quality whose
        tenant has no defaults (``claims``) and whose decision has no row of the
        tenant's has nothing to claim: those are looked up together, one query for the
        batch, not two or three per item (the drain must outpace the feedback arriving
        behind it). A decision for which another item of the batch may write a row (the
        gateway's failure, a claim of a tenant with defaults) is taken item by item for
        all of its items, in order: the others must see that row."""
        def client_quality(item: SpooledFeedback) -> bool:
            return (item.outcome.get("quality") is not None
                    and item.event_id not in ROUTER_EVENTS)

        def writes(item: SpooledFeedback) -> bool:
            return ((item.event_id == OUTCOME_EVENT and item.outcome.get("quality") is not None)
                    or (client_quality(item) and self._claims(item.tenant_id)))

        one_by_one = {item.decision_id for item in items if writes(item)}
        unclaimed = {i for i, item in enumerate(items)
                     if client_quality(item) and item.decision_id not in one_by_one}
        owners: dict[str, str] = {}
        if unclaimed:
            with Session(self._engine) as session:
                owners = dict(session.execute(select(_T.decision_id, _T.tenant_id).where(
                    _T.decision_id.in_({items[i].decision_id for i in unclaimed}))).all())
        return [(item.outcome, None)
                if i in unclaimed and owners.get(item.decision_id) != item.tenant_id
                else self.take_drained(item.tenant_id, item.decision_id, item.event_id,
                                       item.outcome)
                for i, item in enumerate(items)]

    def take_drained(self, tenant_id: str, decision_id: str, event_id: str,
                     outcome: dict[str, float | None]) -> tuple[dict[str, float | None]
                                                                | None, Undo | None]:
        """:meth:`drained`, and how to undo what it took should the database refuse the
        item (the drain drops it): its claim (stamped, also when it took its event's
        row again) is released, the default due again; the ``final`` row of the
        failure it is (stamped anew, or recorded now) goes, as :meth:`unfinal` does.

        The gateway's own failure (:data:`OUTCOME_EVENT`) records its ``final`` row as
        record() would have (that failed if the database was away). A ``final`` row
        written before this version (event id NULL) is the gateway's outcome's if one
        is drained or stored for the call (migration 0014 marks those stored then);
        else it is taken by the first drained quality equal to its own (a client
        gateway's failure buffered before the upgrade): its event is stored on it."""
        quality, now = outcome.get("quality"), m.utcnow()
        own = False
        if event_id == OUTCOME_EVENT and quality is not None:  # the gateway's failure
            with Session(self._engine) as session, session.begin():
                # A final row without an event id (left unmarked by migration 0014: its
                # outcome buffered then; or an older replica's) is its failure's. Not
                # for a success's outcome (no quality): such a row is a client's.
                session.execute(update(_T).where(
                    _T.decision_id == decision_id, _T.tenant_id == tenant_id,
                    _T.state == "final", _T.event_id.is_(None)).values(
                    event_id=OUTCOME_EVENT))
                own = restamp(session, tenant_id, decision_id, "final", OUTCOME_EVENT,
                              now)
        if own:
            return outcome, partial(self.unfinal, decision_id, now)
        if quality is None or event_id == DEFAULT_EVENT:
            return outcome, None
        with Session(self._engine) as session:
            owner = session.scalar(select(m.DecisionRow.tenant_id).where(
                m.DecisionRow.id == decision_id))
        if owner != tenant_id:
            return outcome, None  # unknown or another tenant's: dropped by the store
        if event_id == OUTCOME_EVENT:
            # A failure whose record() failed (the database away): recorded now as
            # record() would have; a quality that came first (or reported) keeps it out.
            try:
                final = self._final(tenant_id, decision_id, quality, OUTCOME_EVENT)
            except ConflictError as exc:
                log.warning("gateway failure %s: 0 not learned: %s", decision_id,
                            exc.detail)
                final = Final(True, None)
            if final.replaced:
                return without_quality(outcome), None
            return outcome, None if final.stamp is None else partial(
                self.unfinal, decision_id, final.stamp, final.took)
        try:
            claim = self.claim(tenant_id, decision_id, event_id, buffered=True)
        except ConflictError as exc:
            with Session(self._engine) as session, session.begin():
                adopted = adopt(session, tenant_id, decision_id, event_id, quality, now)
            if adopted:  # undone as the final row it now is
                return outcome, partial(self.unfinal, decision_id, now)
            log.warning("buffered quality for decision %s not learned: %s", decision_id,
                        exc.detail)
            return without_quality(outcome), None
        if claim is not None:
            return outcome, None if claim.stamp is None else partial(self.release, claim)
        with Session(self._engine) as session, session.begin():
            own = restamp(session, tenant_id, decision_id, "final", event_id, now)
        return outcome, partial(self.unfinal, decision_id, now) if own else None

    def _recorded(self, tenant_id: str, decision_id: str, *, strict: bool = False) -> bool:
        """Whether the decision has a row of the tenant's: claimed even when this
        replica's settings (``claims``) are not reloaded yet. The database away: False
        (unless ``strict``), so that such a tenant's feedback is buffered as before
        (service/spool.py); the drain checks it again."""
        try:
            with Session(self._engine) as session:
                return session.scalar(select(_T.tenant_id).where(
                    _T.decision_id == decision_id)) == tenant_id
        except DBAPIError:
            if strict:
                raise
            return False

    def release(self, claim: Claim) -> None:
        """The sink refused the claimed quality (nothing stored): the default is pending
        again; the marker goes, also one a failure's 0 found (that 0 was not stored; the
        client's retry is taken). Only while the row has the claim's stamp."""
        with Session(self._engine) as session, session.begin():
            mine = and_(_T.decision_id == claim.decision_id, _T.state == "replaced",
                        _T.event_id == claim.event_id, _T.changed_at == claim.stamp)
            session.execute(delete(_T).where(mine, or_(_T.quality.is_(None),
                                                       _T.due_at.is_(None))))
            session.execute(update(_T).where(mine).values(
                state="pending", event_id=None, changed_at=m.utcnow()))
