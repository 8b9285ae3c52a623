"""Single statements on a gateway call's ``quality_defaults`` row, shared by the steps of
:class:`service.quality_defaults.QualityDefaults` (which documents the rows' states)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import models as m

__all__ = ["DEFAULT_EVENT", "OUTCOME_EVENT", "ROUTER_EVENTS", "adopt", "rated", "restamp",
           "without_quality"]

log = logging.getLogger("service.quality_defaults")

#: The event id of the outcome the gateway posts for a forwarded call (a failure's 0).
OUTCOME_EVENT = "gateway"
#: The event id of a default quality, learned once its wait is over.
DEFAULT_EVENT = "gateway-default"
#: The router's own events (the call's outcome, its default quality): never a claim.
ROUTER_EVENTS = frozenset({OUTCOME_EVENT, DEFAULT_EVENT})
_T = m.QualityDefault


def without_quality(outcome: dict[str, float | None]) -> dict[str, float | None] | None:
    """The outcome without its quality; None when nothing else is left."""
    rest = {**outcome, "quality": None}
    return None if all(v is None for v in rest.values()) else rest


def restamp(session: Session, tenant_id: str, decision_id: str, state: str, event_id: str,
            now: datetime) -> bool:
    """A retry of the event that holds the row (``state``) stamps it anew: an earlier
    attempt's undo (by its stamp) then keeps it. Whether it held the row."""
    result = session.execute(update(_T).where(
        _T.decision_id == decision_id, _T.tenant_id == tenant_id, _T.state == state,
        _T.event_id == event_id).values(changed_at=now))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def adopt(session: Session, tenant_id: str, decision_id: str, event_id: str,
          quality: float | None, now: datetime) -> bool:
    """A ``final`` row written before the upgrade (event id NULL) of ``quality`` takes
    ``event_id``, that failure's (``QualityDefaults.take_drained``, a retry's
    ``QualityDefaults.final``); whether it did."""
    # Not a row whose call the gateway reported failed (its outcome's 0 stored: the
    # gateway's own failure, left unmarked by migration 0014 or written by an older
    # replica since); a success's outcome (no quality) leaves a client's row its own.
    gateways = select(m.Feedback.id).where(m.Feedback.decision_id == decision_id,
                                           m.Feedback.event_id == OUTCOME_EVENT,
                                           m.Feedback.quality.is_not(None)).exists()
    result = session.execute(update(_T).where(
        _T.decision_id == decision_id, _T.tenant_id == tenant_id, _T.state == "final",
        _T.event_id.is_(None), _T.quality == quality, ~gateways).values(
        event_id=event_id, changed_at=now))
    if result.rowcount:  # type: ignore[attr-defined]
        log.warning("failure of decision %s (event %r) taken as that of its final row "
                    "written before the upgrade", decision_id, event_id)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def rated(session: Session, decision_ids: Sequence[str]) -> set[str]:
    """The calls among ``decision_ids`` with a quality of the client's stored (an event
    not the router's): a failure's 0 recorded after it (held while the database was
    away, or drained) is left out, as after a claim's marker, which a tenant without
    defaults does not leave."""
    return set(session.scalars(select(m.Feedback.decision_id).where(
        m.Feedback.decision_id.in_(list(decision_ids)), m.Feedback.quality.is_not(None),
        m.Feedback.event_id.not_in(ROUTER_EVENTS)))) if decision_ids else set()
