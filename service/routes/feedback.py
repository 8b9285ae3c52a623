"""``POST /v1/feedback``: the outcome of a decision, applied exactly once."""

from __future__ import annotations

import time

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from bandit import InvalidInputError
from bandit.base import MAX_COST_USD
from service.deps import MetricsDep, ServiceDep, TenantDep
from service.domain import FeedbackReceipt
from service.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(prefix="/v1", tags=["routing"])


# A sync route (thread pool): it writes to the database before answering.
@router.post("/feedback", status_code=status.HTTP_202_ACCEPTED,
             response_model=FeedbackResponse)
def feedback(body: FeedbackRequest, tenant: TenantDep, service: ServiceDep,
             metrics: MetricsDep) -> JSONResponse:
    """Store the feedback (durably) and learn from it; a repeat of the same
    (decision_id, event_id) answers ``duplicate`` and changes nothing.

    While the database is unreachable the feedback is kept in a bounded buffer on the
    service's disk and answered ``buffered`` (stored and applied once the database is
    back; an unknown decision or another tenant's is then dropped, never applied, and a
    quality that would be a gateway call's second loses its quality). A full buffer is a
    503 with ``Retry-After``.

    A quality for a call the gateway forwarded with the tenant's ``success_quality`` set
    replaces that default within ``quality_wait_seconds``; after it, a second quality
    and one for a failed call are refused with 409 (docs/api.md). ``default_quality``
    (a gateway's, e.g. the LiteLLM plug-in's) is such a default, answered ``pending``
    when nothing else is given. ``failed`` marks ``quality`` as a gateway's for a failed
    call: learned at once and final, so a later quality for the call is refused (409)."""
    started = time.perf_counter()
    cost = body.cost_usd
    if cost is None and body.input_tokens is not None and body.output_tokens is not None:
        # Priced here, once: what is stored (and replayed) is the cost in USD.
        cost = service.price_tokens(tenant, str(body.decision_id), body.input_tokens,
                                    body.output_tokens)
        if cost > MAX_COST_USD:
            raise InvalidInputError("input_tokens", "with output_tokens, prices to more "
                                    f"than {MAX_COST_USD:g} USD; check the counts", cost)
    decision_id = str(body.decision_id)
    outcome = {"quality": body.quality, "cost_usd": cost, "latency_ms": body.latency_ms}
    # Stored first (an unknown decision is refused there), then the default recorded.
    result = FeedbackReceipt("pending", None) if all(v is None for v in outcome.values()) \
        else service.feedback(tenant, decision_id, outcome, body.event_id, final=body.failed)
    if body.default_quality is not None:
        service.provisional_quality(tenant, decision_id, body.default_quality)
    metrics.feedback_latency.observe(time.perf_counter() - started)
    if result.status == "queued":
        # Distributed mode: on the feedback topic (acks=all); the learner applies it and
        # detects a repeat (docs/streams.md).
        return JSONResponse({"status": "queued", "decision_id": str(body.decision_id),
                             "event_id": body.event_id},
                            status_code=status.HTTP_202_ACCEPTED)
    return JSONResponse(FeedbackResponse(status=result.status,  # type: ignore[arg-type]
                                         decision_id=str(body.decision_id),
                                         event_id=body.event_id).model_dump(),
                        status_code=status.HTTP_202_ACCEPTED)
