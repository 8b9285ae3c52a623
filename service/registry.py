"""The registry: models, tenants and admin keys (tables ``models``, ``tenants``,
``admin_keys``), cached in memory so that a decision never touches the database.

It owns the caches and publishes every change of the set of models, and every tenant
whose settings changed, to its listeners (:class:`RegistryListener`: the policy store
adds and removes arms, and creates or drops a tenant's isolated policies). It imports
nothing of the listeners: the dependency points from the policy store to the registry.

Lock: the caches are guarded by the state lock handed in by the composition
(:mod:`service.components`), the same lock as the policies': a decision that sees a model in
the registry finds its arm in every policy. Model changes are published with it held;
tenant changes after it is released (isolating a tenant reads its feedback history).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Protocol

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit import ArmPrior, Preferences
from service.budget import Ledger
from service.config import Settings
from service.db import models as m
from service.domain import ModelState, TenantState
from service.exceptions import ConflictError, NotFoundError
from service.security import hash_key, new_key

__all__ = ["Registry", "RegistryListener"]


class RegistryListener(Protocol):
    """What the registry tells (the policy store)."""

    def model_added(self, model: ModelState) -> None:
        """A model entered the registry (called with the state lock held)."""

    def model_removed(self, name: str) -> None:
        """A model left the registry (called with the state lock held)."""

    def tenant_changed(self, tenant: TenantState) -> None:
        """A tenant's settings may have changed (called without the lock)."""


class Registry:
    def __init__(self, settings: Settings, engine: Engine, lock: threading.RLock) -> None:
        self.settings = settings
        self.engine = engine
        self.lock = lock
        self.models: dict[str, ModelState] = {}
        self.tenants: dict[str, TenantState] = {}
        self._by_key: dict[str, TenantState] = {}
        self.admin_key_hashes: set[str] = set()
        self._listeners: list[RegistryListener] = []

    def subscribe(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def load(self) -> str | None:
        """Load everything; returns a newly generated admin key, if any."""
        admin_key = self._ensure_admin_key()
        with Session(self.engine) as session:
            rows = session.scalars(select(m.Model).where(m.Model.deleted_at.is_(None))
                                   .order_by(m.Model.id))
            self.models = {r.name: self._model_state(r) for r in rows}
            states = [self._tenant_state(r) for r in session.scalars(select(m.Tenant))]
        self.tenants = {t.id: t for t in states}
        self._by_key = {t.key_hash: t for t in states}
        return admin_key

    # ------------------------------------------------------------------ admin key
    def _ensure_admin_key(self) -> str | None:
        configured = self.settings.admin_key
        with Session(self.engine) as session:
            hashes = set(session.scalars(select(m.AdminKey.key_hash)))
            generated = None
            if configured is not None:
                hashes.add(hash_key(configured.get_secret_value()))
            elif not hashes:
                generated = new_key("admin")
                session.add(m.AdminKey(key_hash=hash_key(generated)))
                session.commit()
                hashes.add(hash_key(generated))
        self.admin_key_hashes = hashes
        return generated

    def is_admin_key(self, key: str) -> bool:
        return hash_key(key) in self.admin_key_hashes

    # ------------------------------------------------------------------ models
    def prior(self, model: ModelState) -> ArmPrior:
        return ArmPrior(quality=model.prior_quality, cost_usd=model.prior_cost_usd)

    def prior_cost(self, input_price: float, output_price: float) -> float:
        s = self.settings
        return (input_price * s.prior_input_tokens + output_price * s.prior_output_tokens) / 1e6

    def _model_state(self, row: m.Model) -> ModelState:
        return ModelState(row.name, row.input_price_per_mtok, row.output_price_per_mtok,
                          row.enabled, row.prior_quality,
                          self.prior_cost(row.input_price_per_mtok, row.output_price_per_mtok))

    def list_models(self, include_deleted: bool = False) -> list[tuple[ModelState, bool]]:
        with Session(self.engine) as session:
            q = select(m.Model).order_by(m.Model.id)
            if not include_deleted:
                q = q.where(m.Model.deleted_at.is_(None))
            return [(self._model_state(r), r.deleted_at is not None) for r in session.scalars(q)]

    def get_model(self, name: str) -> ModelState:
        with self.lock:
            model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"model {name!r} does not exist")
        return model

    def create_model(self, name: str, input_price: float, output_price: float,
                     enabled: bool, prior_quality: float | None) -> ModelState:
        # The arm's prior is checked before anything is written: a model the policies
        # would refuse must not reach the registry (it would break every decision).
        self.prior(ModelState(name, input_price, output_price, enabled, prior_quality,
                              self.prior_cost(input_price, output_price))).validated()
        now = m.utcnow()
        row = m.Model(name=name, input_price_per_mtok=input_price,
                      output_price_per_mtok=output_price, enabled=enabled,
                      prior_quality=prior_quality, created_at=now, updated_at=now)
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
                session.flush()
                state = self._model_state(row)
        except IntegrityError:
            raise ConflictError(f"a model named {name!r} exists (or existed: a deleted "
                                "model's name stays reserved for its history)",
                                field="name", reason="already used",
                                allowed="a name never used before") from None
        with self.lock:
            self.models[name] = state
            for listener in self._listeners:
                listener.model_added(state)
        return state

    def update_model(self, name: str, changes: dict[str, Any]) -> ModelState:
        self.get_model(name)
        with Session(self.engine) as session, session.begin():
            row = session.scalars(select(m.Model).where(m.Model.name == name,
                                                        m.Model.deleted_at.is_(None))).one()
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = m.utcnow()
            session.flush()
            state = self._model_state(row)
        with self.lock:
            # Learned statistics stay: a new price or prior only seeds arms added later
            # (for example a tenant switching to an isolated policy).
            self.models[name] = state
        return state

    def delete_model(self, name: str) -> None:
        self.get_model(name)
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Model).where(m.Model.name == name)
                            .values(deleted_at=m.utcnow(), enabled=False))
        with self.lock:
            del self.models[name]
            for listener in self._listeners:
                listener.model_removed(name)

    # ------------------------------------------------------------------ tenants
    def _tenant_state(self, row: m.Tenant) -> TenantState:
        return TenantState(
            id=row.id, name=row.name, key_hash=row.key_hash,
            preferences=Preferences(row.weight_quality, row.weight_cost, row.weight_latency),
            policy=row.policy, scope=row.scope, on_budget_exhausted=row.on_budget_exhausted,
            ledger=Ledger(row.budget_usd_per_day, row.budget_usd_per_month))

    def tenant_for_key(self, key: str) -> TenantState | None:
        return self._by_key.get(hash_key(key))

    def create_tenant(self, name: str) -> tuple[TenantState, str]:
        key = new_key("tenant")
        now = m.utcnow()
        row = m.Tenant(id=str(uuid.uuid4()), name=name, key_hash=hash_key(key),
                       weight_quality=1.0, weight_cost=0.0, weight_latency=0.0,
                       policy=self.settings.default_policy, scope="shared",
                       on_budget_exhausted="cheapest", created_at=now, updated_at=now)
        with Session(self.engine) as session, session.begin():
            session.add(row)
            session.flush()
            state = self._tenant_state(row)
        with self.lock:
            self.tenants[state.id] = state
            self._by_key[state.key_hash] = state
        return state, key

    def rotate_key(self, tenant: TenantState) -> str:
        """A new API key for the tenant; the old one stops working at once here (other
        replicas pick the change up at their next refresh)."""
        key = new_key("tenant")
        digest = hash_key(key)
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Tenant).where(m.Tenant.id == tenant.id)
                            .values(key_hash=digest, updated_at=m.utcnow()))
        with self.lock:
            self._rekey(tenant, digest)
        return key

    def _rekey(self, tenant: TenantState, digest: str) -> None:
        if self._by_key.get(tenant.key_hash) is tenant:
            del self._by_key[tenant.key_hash]
        tenant.key_hash = digest
        self._by_key[digest] = tenant

    def update_preferences(self, tenant: TenantState, changes: dict[str, Any]) -> TenantState:
        """Persist then apply preference changes; the next decision uses them."""
        weights = changes.get("weights")
        prefs = tenant.preferences
        if weights is not None:
            prefs = Preferences(weights["quality"], weights["cost"],
                                weights["latency"]).validated()
        values: dict[str, Any] = {"weight_quality": prefs.quality, "weight_cost": prefs.cost,
                                  "weight_latency": prefs.latency, "updated_at": m.utcnow()}
        for key in ("policy", "scope", "budget_usd_per_day", "budget_usd_per_month",
                    "on_budget_exhausted"):
            if key in changes:
                values[key] = changes[key]
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Tenant).where(m.Tenant.id == tenant.id).values(**values))
        with self.lock:
            tenant.preferences = prefs
            tenant.policy = values.get("policy", tenant.policy)
            tenant.scope = values.get("scope", tenant.scope)
            tenant.on_budget_exhausted = values.get("on_budget_exhausted",
                                                    tenant.on_budget_exhausted)
            tenant.ledger.set_budgets(values.get("budget_usd_per_day", tenant.budget_usd_per_day),
                                      values.get("budget_usd_per_month",
                                                 tenant.budget_usd_per_month))
        for listener in self._listeners:
            listener.tenant_changed(tenant)
        return tenant

    # ========================================================== other replicas
    def refresh(self) -> None:
        """Pick up models and tenants changed through another replica (same database)."""
        with Session(self.engine) as session:
            model_rows = list(session.scalars(select(m.Model)
                                              .where(m.Model.deleted_at.is_(None))
                                              .order_by(m.Model.id)))
            tenant_rows = list(session.scalars(select(m.Tenant)))
        with self.lock:
            fresh = {r.name: self._model_state(r) for r in model_rows}
            for name in [n for n in self.models if n not in fresh]:
                del self.models[name]
                for listener in self._listeners:
                    listener.model_removed(name)
            for name, state in fresh.items():
                if name not in self.models:
                    for listener in self._listeners:
                        listener.model_added(state)
                self.models[name] = state
            for row in tenant_rows:
                tenant = self.tenants.get(row.id)
                if tenant is None:
                    tenant = self._tenant_state(row)
                    self.tenants[tenant.id] = tenant
                    self._by_key[tenant.key_hash] = tenant
                else:
                    if tenant.key_hash != row.key_hash:
                        # The key was rotated through another replica: the old one must
                        # stop working here too, within one refresh interval.
                        self._rekey(tenant, row.key_hash)
                    tenant.preferences = Preferences(row.weight_quality, row.weight_cost,
                                                     row.weight_latency)
                    tenant.policy, tenant.scope = row.policy, row.scope
                    tenant.on_budget_exhausted = row.on_budget_exhausted
                    tenant.ledger.set_budgets(row.budget_usd_per_day,
                                              row.budget_usd_per_month)
            tenants = [self.tenants[row.id] for row in tenant_rows]
        for tenant in tenants:
            for listener in self._listeners:
                listener.tenant_changed(tenant)
