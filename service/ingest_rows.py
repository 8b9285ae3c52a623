"""The records :mod:`service.ingest` passes between its steps: a feedback on its way in,
what became of it, a committed row to apply, a commit in doubt."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from service.domain import TenantState
from service.guards import GuardLesson

__all__ = ["Incoming", "Row", "Stored", "Uncertain"]


class Incoming(NamedTuple):
    """One feedback on its way to the database (direct, or from the buffer)."""

    tenant: TenantState
    decision_id: str
    event: str
    outcome: dict[str, float | None]
    received: datetime


@dataclass(frozen=True)
class Stored:
    """What :meth:`FeedbackIngest.store_many` did with one feedback: ``applied``,
    ``duplicate``, ``unknown-decision`` (or another tenant's: nothing stored) or
    ``not-applied`` (stored, and applying it raised ``error``)."""

    status: str
    feedback_id: int | None = None
    error: Exception | None = None


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
