"""``GET /v1/decisions/{decision_id}``: a tenant reads one of its own decisions."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter

from service.deps import ServiceDep, TenantDep
from service.schemas import DecisionOut

router = APIRouter(prefix="/v1", tags=["routing"])


@router.get("/decisions/{decision_id}", response_model=DecisionOut)
def get_decision(decision_id: UUID, tenant: TenantDep, service: ServiceDep) -> DecisionOut:
    """The decision, what was predicted and the feedback it received. Another tenant's
    decision is a 404, exactly like one that does not exist."""
    return DecisionOut(**service.get_decision(tenant, str(decision_id)))
