"""Single statements on a gateway call's ``quality_defaults`` row, shared by the steps of
:class:`service.quality_defaults.QualityDefaults` (which documents the rows' states)."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import models as m

__all__ = ["OUTCOME_EVENT", "adopt", "restamp", "without_quality"]

log = logging.getLogger("service.quality_defaults")

#: The event id of the outcome the gateway posts for a forwarded call (a failure's 0).
OUTCOME_EVENT = "gateway"
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
