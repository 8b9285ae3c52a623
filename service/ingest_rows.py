"""The records :mod:`service.ingest` passes between its steps: a feedback on its way in,
its decision's columns, what became of it, a committed row to apply, a commit in doubt."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Connection, Text, bindparam, select, type_coerce, update

from service.db import models as m
from service.domain import FeedbackReceipt, TenantState, price_estimate
from service.exceptions import NotFoundError
from service.guards import GuardLesson

__all__ = ["IN_DOUBT", "IN_DOUBT_S", "RECOVERED", "SETTLED_KEPT", "Decision", "Incoming", "Row",
           "Stored", "Uncertain", "in_doubt", "receipt", "settled", "update_decisions"]


class Incoming(NamedTuple):
    """One feedback on its way to the database (direct, or from the buffer)."""

    tenant: TenantState
    decision_id: str
    event: str
    outcome: dict[str, float | None]
    received: datetime

    def row(self) -> dict[str, object]:
        """Its ``feedback`` row's columns (embedded mode: no learners' group)."""
        return {"decision_id": self.decision_id, "tenant_id": self.tenant.id,
                "event_id": self.event, "quality": self.outcome.get("quality"),
                "cost_usd": self.outcome.get("cost_usd"),
                "latency_ms": self.outcome.get("latency_ms"), "created_at": self.received,
                "learner_group": None}


@dataclass(frozen=True)
class Stored:
    """What :meth:`FeedbackIngest.store_many` did with one feedback: ``applied``,
    ``duplicate``, ``unknown-decision`` (or another tenant's: nothing stored) or
    ``not-applied`` (stored, and applying it raised ``error``)."""

    status: str
    feedback_id: int | None = None
    error: Exception | None = None


def receipt(stored: Stored, decision_id: str) -> FeedbackReceipt | Exception:
    """What :meth:`FeedbackIngest.submit` answers for one stored feedback."""
    if stored.status == "unknown-decision":
        return NotFoundError(f"decision {decision_id} does not exist",
                             slug="decision-not-found")
    if stored.error is not None:
        return stored.error
    return FeedbackReceipt(stored.status, stored.feedback_id)


class Row(NamedTuple):
    """A committed feedback row, to apply."""

    index: int  # in the batch
    feedback_id: int
    model: str
    context: bytes
    cost_delta: float  # reported cost - the decision's charge
    decided_at: float
    price: float | None  # the decision's price estimate for its model
    lesson: GuardLesson | None
    outcome: dict[str, float | None]  # the stored row's (what a replay learns)


class Uncertain(NamedTuple):
    """A feedback whose commit failed with a connection error: maybe stored, certainly
    not applied."""

    cost_delta: float
    decided_at: float
    received: datetime  # the row's ``created_at`` if it was stored (a retry has its own)
    tenant: TenantState
    # What the guard learns if it was stored (its decision's guard part was updated in
    # the same transaction): learned once, when the row is recovered or settled.
    lesson: GuardLesson | None = None


#: The outcome of an :class:`Incoming` that settles a commit in doubt (no feedback of
#: its own: its stored row is applied if it landed, nothing is inserted if not).
IN_DOUBT: dict[str, float | None] = {}


def in_doubt(uncertain: dict[tuple[str, str, str], Uncertain],
             items: list[Incoming]) -> list[Incoming]:
    """The commits in doubt no item of this batch retries, to settle before it: a row that
    landed is applied before any later row is, so ``last_feedback_id`` (what a checkpoint
    records and the restart's replay starts after) never passes a stored row the
    statistics lack (rel14: before, a later feedback, a checkpoint and a restart lost
    it for good)."""
    keys = {(it.tenant.id, it.decision_id, it.event) for it in items}
    return [Incoming(u.tenant, key[1], key[2], IN_DOUBT, u.received)
            for key, u in uncertain.items() if key not in keys]


#: The time of a row stored or recovered earlier in the same batch: equal to no attempt's
#: time, so a repeat of its key in that batch is a duplicate (not recovered, nor learned,
#: twice; a buffered retry keeps its failed attempt's time, which the in-doubt entry has).
RECOVERED = object()

#: How long a commit in doubt that later batches did not find stored stays in doubt
#: (seconds from its attempt); then it is taken as not landed (its retry stores it anew).
IN_DOUBT_S = 60.0

#: How many settled commits keep their "applied" answer for a retry that may never come
#: (the gateway does not retry); a retry of an older one answers ``duplicate``.
SETTLED_KEPT = 10_000


def settled(uncertain: dict[tuple[str, str, str], Uncertain],
            settled_at: dict[tuple[str, str, str], datetime], items: list[Incoming],
            rows: list[Row]) -> None:
    """After a batch's commit: its items are no longer in doubt (nor settled: a retry is
    answered); a commit in doubt it found stored (and applies) is remembered as settled,
    a bounded number of them."""
    found = {r.index for r in rows if items[r.index].outcome is IN_DOUBT}
    now = m.utcnow()
    for i, it in enumerate(items):
        key = (it.tenant.id, it.decision_id, it.event)
        u = uncertain.pop(key, None)
        settled_at.pop(key, None)
        if u is None:
            continue
        if i in found:
            settled_at[key] = u.received
            if len(settled_at) > SETTLED_KEPT:
                del settled_at[next(iter(settled_at))]
        elif it.outcome is IN_DOUBT and (now - m.as_utc(u.received)).total_seconds() < IN_DOUBT_S:
            # Not seen stored (yet): PostgreSQL may make a COMMIT whose connection died
            # visible after this batch's read; looked for again by the next batches.
            uncertain[key] = u


class Decision:
    """The columns of a decision that storing its feedback reads, and the two it may
    change (the charge reconciled with a reported cost, the guard's part): what
    :meth:`FeedbackIngest._commit` reads instead of an ORM object (and hands to
    :meth:`Guards.lesson`, which reads and sets the same attributes)."""

    __slots__ = ("id", "tenant_id", "model", "context", "predictions", "charged_usd",
                 "created_at", "guard", "_loaded")

    def __init__(self, id: str, tenant_id: str, model: str, context: bytes,  # noqa: A002
                 predictions: dict[str, Any] | None, charged_usd: float,
                 created_at: datetime, guard: dict[str, Any] | None) -> None:
        self.id, self.tenant_id, self.model, self.context = id, tenant_id, model, context
        self.predictions, self.charged_usd = predictions, charged_usd
        self.created_at, self.guard = created_at, guard
        self._loaded = (charged_usd, guard)

    @classmethod
    def load(cls, conn: Connection, ids: list[str]) -> dict[str, Decision]:
        """The decisions of these ids (those that exist), by id."""
        t = m.DecisionRow.__table__
        # The predictions as text (SQLite; PostgreSQL's driver parses JSON itself), read by
        # _predictions below instead of the column's json.loads.
        return {r[0]: cls(r[0], r[1], r[2], r[3], _predictions(r[4]), *r[5:])
                for r in conn.execute(select(
                    t.c.id, t.c.tenant_id, t.c.model, t.c.context,
                    type_coerce(t.c.predictions, Text), t.c.charged_usd, t.c.created_at,
                    t.c.guard).where(t.c.id.in_(ids)))}

    def price(self) -> float | None:
        return price_estimate(self.model, self.predictions)

    def changes(self) -> dict[str, object]:
        """The changed columns (as the ORM's unit of work compares: by value)."""
        out: dict[str, object] = {}
        if self.charged_usd != self._loaded[0]:
            out["charged_usd"] = self.charged_usd
        if self.guard != self._loaded[1]:
            out["guard"] = self.guard
        return out


def _predictions(value: Any) -> dict[str, Any] | None:
    """A decision's stored predictions, as the column's ``json.loads`` reads them.

    orjson where it can: the standard library's parser was ~20 us of each gateway
    outcome's storing (the storing thread holds the GIL the event loop needs). Every
    value is the same: the predictions are written by orjson (floats, null, strings;
    orjson reads floats correctly rounded, as ``float()``); rows it refuses (NaN or
    Infinity written by the standard library's ``json.dumps``) are read by
    ``json.loads`` as before. orjson reads an integer beyond 64 bits as a float, and no
    prediction holds one.
    """
    if not isinstance(value, str):
        return value  # NULL, or parsed by the driver (PostgreSQL)
    try:
        return orjson.loads(value)  # type: ignore[no-any-return]
    except orjson.JSONDecodeError:
        return json.loads(value)  # type: ignore[no-any-return]


def update_decisions(conn: Connection, decisions: Iterable[Decision]) -> None:
    """The changed decisions' UPDATEs in the order of their ids, as the ORM sent them (two
    processes that update the same decisions lock their rows in the same order: no
    deadlock on PostgreSQL), one executemany per run of decisions with the same changed
    columns (a column not changed is not written: a NULL guard would come back as JSON
    ``null``)."""
    table = m.DecisionRow.__table__
    runs: list[tuple[tuple[str, ...], list[dict[str, object]]]] = []
    for d in sorted(decisions, key=lambda d: d.id):
        changes = d.changes()
        if changes:
            columns = tuple(changes)
            if not runs or runs[-1][0] != columns:
                runs.append((columns, []))
            runs[-1][1].append({"b_id": d.id, **{f"b_{k}": v for k, v in changes.items()}})
    for columns, params in runs:
        conn.execute(update(table).where(table.c.id == bindparam("b_id")).values(
            {c: bindparam(f"b_{c}") for c in columns}), params)
