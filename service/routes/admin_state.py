"""Learned state in and out of a running service (admin key only): a warm start from
``bandit-router warmstart``, or one deployment's statistics into another.

``GET /v1/admin/state`` exports every policy (the shared pair and each isolated tenant's)
as a :class:`~service.state_file.StateFile`. ``PUT /v1/admin/state`` imports one. Every
check runs before anything changes (a refused file changes nothing):

* the file's featurizer spec and context dimension must be this service's (the same
  refusal as a checkpoint of another dimension at start-up, naming the settings);
* every policy restores, has that dimension, and knows only registered models (a model
  of the registry that the file lacks starts from its prior, as a new model does);
* ``shared:<kind>`` keys and ``tenant:<id>:<kind>`` keys of tenants that are isolated
  here; a tenant key of a tenant that is not is skipped and reported.

A file with one policy kind (a warm start) loads it into both kinds: LinUCB and
Thompson keep the same sums. The import replaces what the service had learned for those
keys and writes a checkpoint at once, so a restart keeps it; feedback stored after the
import is applied on top of it. Embedded mode only: in distributed mode the learners own
the statistics (409).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel

from bandit import InvalidInputError, Policy
from service.deps import AdminDep, ServiceDep
from service.domain import POLICY_CLASSES, POLICY_KINDS
from service.errors import Problem
from service.routing import RoutingService
from service.state_file import FORMAT, VERSION, StateFile

router = APIRouter(prefix="/v1/admin/state", tags=["admin"])


class Imported(BaseModel):
    loaded: list[str]
    skipped: dict[str, str]
    featurizer: str
    context_dim: int


@router.get("")
def export_state(_admin: AdminDep, service: ServiceDep) -> dict[str, Any]:
    """Every policy's statistics, with the featurizer and dimension they were learned in."""
    store = service.policies
    with store.apply_lock, store.lock:
        copies = {key: copy.deepcopy(p) for key, p in store.all_policies().items()}
    return StateFile(service.contexts.spec(), service.context_dim,
                     {key: p.to_bytes(derived=False) for key, p in copies.items()}).to_json()


def _targets(service: RoutingService, keys: list[str]) -> tuple[dict[str, tuple[str, str]],
                                                                 dict[str, str]]:
    """key -> (scope, kind) for every key to load; key -> reason for those skipped."""
    load: dict[str, tuple[str, str]] = {}
    skipped: dict[str, str] = {}
    for key in keys:
        parts = key.split(":")
        kind = parts[-1]
        if kind not in POLICY_KINDS or not (
                (len(parts) == 2 and parts[0] == "shared")
                or (len(parts) == 3 and parts[0] == "tenant")):
            raise InvalidInputError(f"policies.{key}", "keys are shared:<kind> or "
                                    f"tenant:<id>:<kind>, kind one of {', '.join(POLICY_KINDS)}")
        if parts[0] == "tenant" and parts[1] not in service.isolated:
            skipped[key] = "no isolated tenant with this id here"
            continue
        load[key] = ("shared" if parts[0] == "shared" else parts[1], kind)
    # A warm start has one kind: it fills both (same sums).
    for scope in {scope for scope, _ in load.values()}:
        prefix = "shared" if scope == "shared" else f"tenant:{scope}"
        have = [kind for s, kind in load.values() if s == scope]
        source = next(k for k, (s, _) in load.items() if s == scope)
        for kind in POLICY_KINDS:
            if kind not in have:
                load[f"{prefix}:{kind}<-{source}"] = (scope, kind)
    return load, skipped


#: The envelope StateFile.from_json checks (service/state_file.py), as the document's
#: request body: what the schema can say; the featurizer and dimension must also be this
#: service's, and each policy a statistics file (checked on import, 422 naming the field).
_STATE_BODY = {"type": "object",
               "required": ["format", "version", "featurizer", "context_dim", "policies"],
               "properties": {
                   "format": {"const": FORMAT}, "version": {"const": VERSION},
                   "source": {"type": "string"},
                   "featurizer": {"type": "string", "minLength": 1},
                   "context_dim": {"type": "integer", "minimum": 1},
                   "policies": {"type": "object", "minProperties": 1,
                                "additionalProperties": {"type": "string"}}}}


@router.put("", response_model=Imported, openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": _STATE_BODY}}}})
def import_state(_admin: AdminDep, service: ServiceDep,
                 body: Annotated[dict[str, Any], Body()]) -> Imported:
    """Load a warm start or an exported state (checks first; see the module docstring)."""
    if service.settings.kafka_bootstrap:
        raise Problem(409, "distributed mode: the learners own the statistics; import a "
                      "state into an embedded deployment", slug="distributed-mode")
    state = StateFile.from_json(body)
    spec = service.contexts.spec()
    if state.featurizer != spec:
        raise InvalidInputError("featurizer", f"must be this service's {spec!r} (set by "
                                "BANDIT_ROUTER_FEATURIZER, DIM, FEATURIZER_SEED and "
                                "PROTOTYPE_MAP): fit the file with the same, or configure "
                                "the service as the file was", state.featurizer)
    if state.context_dim != service.context_dim:
        raise InvalidInputError("context_dim", f"must be {service.context_dim} "
                                f"({service.contexts.dim_source()})", state.context_dim)
    load, skipped = _targets(service, list(state.policies))
    registry = set(service.models)
    policies: dict[str, Policy] = {}
    for key, (_scope, kind) in load.items():
        source = key.split("<-")[-1]
        data = state.policies[source]
        try:
            policy = Policy.from_bytes(data, as_class=POLICY_CLASSES[kind],
                                       **service.settings.policy_settings(
                                           POLICY_CLASSES[kind]))
        except InvalidInputError as err:
            raise InvalidInputError(f"policies.{source}", f"does not restore: {err}") from None
        if policy.dim != service.context_dim:
            raise InvalidInputError(f"policies.{source}", f"has dimension {policy.dim}, "
                                    f"must be {service.context_dim}", policy.dim)
        unknown = sorted(set(policy.arms) - registry)
        if unknown:
            raise InvalidInputError(f"policies.{source}", "knows models this service has "
                                    f"not registered: register them first (bandit-router "
                                    f"models add); registered: {', '.join(sorted(registry))}",
                                    unknown)
        policies[key] = policy
    store = service.policies
    with store.apply_lock, store.lock:
        for key, policy in policies.items():
            scope, kind = load[key]
            store.sync_arms(policy)
            if scope == "shared":
                service.shared[kind] = policy
            else:
                service.isolated[scope][kind] = policy
    service.checkpoint(force=True)
    return Imported(loaded=sorted(k.split("<-")[0] for k in policies), skipped=skipped,
                    featurizer=spec, context_dim=service.context_dim)
