"""The 409 for a second quality of a gateway call (:mod:`service.quality_defaults`)."""

from __future__ import annotations

from service.exceptions import ConflictError

__all__ = ["refusal"]


def refusal(decision_id: str, state: str, quality: float | None,
            taken_by: str | None) -> ConflictError:
    """The 409 for a second quality of a call whose row is in ``state``."""
    if state == "replaced":
        why = (f"the router's default quality {quality:g} was already replaced by the "
               f"quality of event {taken_by or '(none)'!r}; a second quality would count "
               "twice")
    elif state == "final":
        why = f"the call failed and the router reported its quality ({quality:g}) itself"
    else:
        why = (f"the router's default quality {quality:g} was learned when the tenant's "
               "quality_wait_seconds was over; a later quality would count twice")
    return _refused(decision_id, why)


def _refused(decision_id: str, why: str) -> ConflictError:
    return ConflictError(
        f"decision {decision_id}: quality refused: {why}. Post cost_usd/latency_ms "
        "without a quality, or rate within quality_wait_seconds "
        "(PUT /v1/tenants/me/gateway)", field="quality", reason="already reported",
        allowed="one quality per gateway call: the client's within the tenant's "
        "quality_wait_seconds, else the router's default", slug="quality-already-reported")
