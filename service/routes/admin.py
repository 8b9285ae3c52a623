"""Admin endpoints: tenants and the model registry (admin key only)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.deps import AdminDep, ServiceDep
from service.routing import ModelState
from service.schemas import ModelCreate, ModelOut, ModelUpdate, TenantCreate, TenantCreated

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _out(model: ModelState, deleted: bool = False) -> ModelOut:
    return ModelOut(name=model.name, input_price_per_mtok=model.input_price_per_mtok,
                    output_price_per_mtok=model.output_price_per_mtok, enabled=model.enabled,
                    prior_quality=model.prior_quality, prior_cost_usd=model.prior_cost_usd,
                    deleted=deleted, base_url=model.base_url,
                    upstream_model=model.upstream_model, api_key_env=model.api_key_env)


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantCreated)
def create_tenant(body: TenantCreate, _admin: AdminDep, service: ServiceDep) -> TenantCreated:
    """Create a tenant. The API key is in this response only: it is stored hashed."""
    tenant, key = service.create_tenant(body.name)
    return TenantCreated(id=tenant.id, name=tenant.name, api_key=key)


@router.post("/models", status_code=status.HTTP_201_CREATED, response_model=ModelOut)
def create_model(body: ModelCreate, _admin: AdminDep, service: ServiceDep) -> ModelOut:
    """Register a model; it is a candidate (and explored) from the next decision."""
    return _out(service.create_model(body.name, body.input_price_per_mtok,
                                     body.output_price_per_mtok, body.enabled,
                                     body.prior_quality,
                                     body.model_dump(include={"base_url", "upstream_model",
                                                              "api_key_env"})))


@router.get("/models", response_model=list[ModelOut])
def list_models(_admin: AdminDep, service: ServiceDep,
                include_deleted: bool = False) -> list[ModelOut]:
    return [_out(s, deleted) for s, deleted in service.list_models(include_deleted)]


# ``:path``: a name may hold a slash (the pattern allows it, and LiteLLM's deployments are
# named ``openai/gpt-4o-mini``, docs/litellm.md); no route lies below a model's.
@router.get("/models/{name:path}", response_model=ModelOut)
def get_model(name: str, _admin: AdminDep, service: ServiceDep) -> ModelOut:
    return _out(service.get_model(name))


@router.patch("/models/{name:path}", response_model=ModelOut)
def update_model(name: str, body: ModelUpdate, _admin: AdminDep,
                 service: ServiceDep) -> ModelOut:
    return _out(service.update_model(name, body.model_dump(exclude_unset=True)))


@router.delete("/models/{name:path}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(name: str, _admin: AdminDep, service: ServiceDep) -> Response:
    """Remove a model from routing; its decisions and feedback stay in the database."""
    service.delete_model(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
