"""The calling tenant's own preferences and usage."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ServiceDep, TenantDep
from service.routing import TenantState
from service.schemas import PreferenceWeights, TenantPreferences, TenantPreferencesUpdate, UsageOut

router = APIRouter(prefix="/v1/tenants/me", tags=["tenants"])


def _prefs(tenant: TenantState) -> TenantPreferences:
    p = tenant.preferences
    return TenantPreferences(
        weights=PreferenceWeights(quality=p.quality, cost=p.cost, latency=p.latency),
        policy=tenant.policy, scope=tenant.scope,  # type: ignore[arg-type]
        budget_usd_per_day=tenant.budget_usd_per_day,
        budget_usd_per_month=tenant.budget_usd_per_month,
        on_budget_exhausted=tenant.on_budget_exhausted,  # type: ignore[arg-type]
        baseline_model=tenant.baseline_model,
        max_exploration_loss=tenant.max_exploration_loss)


@router.get("/preferences", response_model=TenantPreferences)
def get_preferences(tenant: TenantDep) -> TenantPreferences:
    return _prefs(tenant)


@router.put("/preferences", response_model=TenantPreferences)
def put_preferences(body: TenantPreferencesUpdate, tenant: TenantDep,
                    service: ServiceDep) -> TenantPreferences:
    """Change preferences; the next decision uses them. Fields left out keep their value,
    an explicit ``null`` budget removes that budget."""
    changes = body.model_dump(exclude_unset=True)
    if body.weights is not None:
        changes["weights"] = body.weights.model_dump()
    return _prefs(service.update_preferences(tenant, changes))


@router.get("/usage", response_model=UsageOut)
def get_usage(tenant: TenantDep, service: ServiceDep) -> UsageOut:
    return UsageOut(**service.usage(tenant))
