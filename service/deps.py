"""``Annotated`` dependencies: the routing state, the settings and the two kinds of caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Scope

from service.config import Settings
from service.errors import Problem
from service.metrics import Metrics
from service.routing import RoutingService, TenantState

__all__ = ["ServiceDep", "SettingsDep", "MetricsDep", "TenantDep", "AdminDep",
           "authenticate_tenant", "tenant_for_authorization", "admin_for_authorization",
           "authentication_problem"]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
#: Routes that check the key before reading the body themselves.
_SELF_AUTHENTICATED = frozenset({"/v1/decide", "/v1/chat/completions"})

# Every dependency is ``async def`` although none awaits: FastAPI runs a sync dependency
# in the thread pool, a hop that costs more than the whole decision.


async def get_service(request: Request) -> RoutingService:
    return request.app.state.routing


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[RoutingService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def bearer_key(request: Request) -> str:
    return _bearer(request.headers.get("authorization"))


def _bearer(header: str | None) -> str:
    if not header:
        raise Problem(401, "missing Authorization header; send 'Authorization: Bearer <key>'",
                      headers=_CHALLENGE)
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem(401, "the Authorization header must be 'Bearer <key>'",
                      headers=_CHALLENGE)
    return key.strip()


async def require_tenant(request: Request, service: ServiceDep) -> TenantState:
    return authenticate_tenant(request, service)


def authenticate_tenant(request: Request, service: RoutingService) -> TenantState:
    """The tenant calling, from its bearer key (401 / 403 otherwise)."""
    return tenant_for_authorization(request.headers.get("authorization"), service)


def tenant_for_authorization(header: str | None, service: RoutingService) -> TenantState:
    """The tenant of an ``Authorization`` header's value (401 / 403 otherwise)."""
    key = _bearer(header)
    tenant = service.tenant_for_key(key)
    if tenant is not None:
        return tenant
    if service.is_admin_key(key):
        raise Problem(403, "this endpoint takes a tenant API key, not the admin key")
    raise Problem(401, "unknown API key", headers=_CHALLENGE)


async def require_admin(request: Request, service: ServiceDep) -> None:
    admin_for_authorization(request.headers.get("authorization"), service)


def admin_for_authorization(header: str | None, service: RoutingService) -> None:
    """Nothing when the header carries the admin key (401 / 403 otherwise)."""
    key = _bearer(header)
    if service.is_admin_key(key):
        return
    if service.tenant_for_key(key) is not None:
        raise Problem(403, "this endpoint needs the admin key")
    raise Problem(401, "unknown API key", headers=_CHALLENGE)


def authentication_problem(scope: Scope) -> Problem | None:
    """The key before the body (issue 14), run by the app's middleware
    (:mod:`service.middleware`) before the route reads the body: a ``/v1/`` request
    without a valid key of the right kind gets 401 / 403 (this problem), never a 400
    about a body nobody may send. ``/v1/admin/...`` takes the admin key, the rest of
    ``/v1/`` a tenant key; the route's dependency checks again (about a microsecond).
    ``POST /v1/decide`` and ``POST /v1/chat/completions`` authenticate first themselves
    (service.routes.decide, service.gateway: the latter answers in OpenAI's error format);
    ``OPTIONS`` is answered without a key (405, Allow)."""
    path = scope["path"]
    if (not path.startswith("/v1/") or path in _SELF_AUTHENTICATED
            or scope["method"] == "OPTIONS"):
        return None
    header = next((v.decode("latin-1") for k, v in scope["headers"]
                   if k == b"authorization"), None)
    service: RoutingService = scope["app"].state.routing
    try:
        if path.startswith("/v1/admin/"):
            admin_for_authorization(header, service)
        else:
            tenant_for_authorization(header, service)
    except Problem as problem:
        return problem
    return None


TenantDep = Annotated[TenantState, Depends(require_tenant)]
AdminDep = Annotated[None, Depends(require_admin)]
