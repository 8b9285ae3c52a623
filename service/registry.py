"""The registry: models, tenants and admin keys (tables ``models``, ``tenants``,
``admin_keys``), cached in memory so that a decision never touches the database.

It owns the caches and publishes every change to its listeners
(:class:`RegistryListener`): the policy store adds and removes arms and creates or drops
a tenant's isolated policies, the guards rebuild a tenant's account when its baseline
changed through another replica. It imports nothing of its listeners: the dependency
points from them to the registry.

Lock: the caches are guarded by the state lock handed in by the composition
(:mod:`service.components`), the same lock as the policies': a decision that sees a
model in the registry finds its arm in every policy. Model changes are published with it
held; tenant changes after it is released (isolating a tenant reads its feedback).
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bandit import ArmPrior, InvalidInputError, Preferences
from bandit.conservative import GuardConfig, GuardState
from bandit.pricing import request_cost
from service.budget import Ledger
from service.budget_lease import BudgetLeases
from service.config import Settings
from service.db import models as m
from service.domain import ModelState, TenantState
from service.exceptions import ConflictError, NotFoundError
from service.security import hash_key, new_key

__all__ = ["Registry", "RegistryListener"]

log = logging.getLogger("service.registry")


class RegistryListener(Protocol):
    """What the registry tells (the policy store, the guards)."""

    def model_added(self, model: ModelState) -> None:
        """A model entered the registry (called with the state lock held)."""

    def model_removed(self, name: str) -> None:
        """A model left the registry (called with the state lock held)."""

    def tenant_changed(self, tenant: TenantState) -> None:
        """A tenant's settings may have changed (called without the lock)."""

    def baseline_changed(self, tenant: TenantState) -> None:
        """Another replica gave the tenant another guard account (without the lock)."""


class Registry:
    def __init__(self, settings: Settings, engine: Engine, lock: threading.RLock,
                 leases: BudgetLeases | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.lock = lock
        self.leases = leases
        self.models: dict[str, ModelState] = {}
        #: Bumped by every change of ``models`` (what caches of prices key on).
        self.models_version = 0
        self.tenants: dict[str, TenantState] = {}
        self._by_key: dict[str, TenantState] = {}
        self.admin_key_hashes: set[str] = set()
        self._listeners: list[RegistryListener] = []
        # Local changes count up a generation and mark what they changed with it, so
        # that a refresh whose read started before a change (its rows are older than
        # this replica's cache) leaves that model or tenant alone (see refresh).
        self._generation = 0
        self._touched: dict[tuple[str, str], int] = {}

    def _touch(self, kind: str, key: str) -> None:
        """Mark a model or tenant changed here (call with the lock held)."""
        self._generation += 1
        self._touched[(kind, key)] = self._generation

    def subscribe(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def load(self) -> str | None:
        """Load everything; returns a newly generated admin key, if any."""
        admin_key = self._ensure_admin_key()
        self.load_models()
        with Session(self.engine) as session:
            states = [self._tenant_state(r) for r in session.scalars(select(m.Tenant))]
        self.tenants = {t.id: t for t in states}
        self._by_key = {t.key_hash: t for t in states}
        return admin_key

    def load_models(self) -> None:
        with Session(self.engine) as session:
            rows = session.scalars(select(m.Model).where(m.Model.deleted_at.is_(None))
                                   .order_by(m.Model.id))
            self.models = {r.name: self._model_state(r) for r in rows}
            self.models_version += 1

    # ------------------------------------------------------------------ admin keys
    def _ensure_admin_key(self) -> str | None:
        """The rule (service/README.md, "Admin keys"): a configured BANDIT_ROUTER_ADMIN_KEY
        is the only admin key while it is set; the stored keys (generated at a first start
        or created through the API) are refused, and said so at start. Unset, the stored
        keys are the admin keys, and the first start generates one."""
        configured = self.settings.admin_key
        generated = None
        with Session(self.engine) as session:
            stored = list(session.execute(select(m.AdminKey.id, m.AdminKey.key_hash)))
            if configured is None and not stored:
                generated = new_key("admin")
                session.add(m.AdminKey(key_hash=hash_key(generated)))
                session.commit()
        if configured is not None and stored:
            log.warning("BANDIT_ROUTER_ADMIN_KEY is set, so it is the only admin key: the "
                        "%d stored admin key(s) (ids %s) are refused while it is set; "
                        "revoke them (bandit-router admin-keys revoke ID) before unsetting "
                        "it, or they answer again", len(stored),
                        ", ".join(str(row.id) for row in stored))
        self.reload_admin_keys()
        return generated

    def reload_admin_keys(self) -> None:
        """The accepted admin keys' digests, from the setting or else the database (also
        run by :meth:`refresh`: a key revoked on one replica stops working on the others
        within ``registry_refresh_s``)."""
        configured = self.settings.admin_key
        if configured is not None:
            self.admin_key_hashes = {hash_key(configured.get_secret_value())}
            return
        with Session(self.engine) as session:
            self.admin_key_hashes = set(session.scalars(select(m.AdminKey.key_hash)))

    def is_admin_key(self, key: str) -> bool:
        return hash_key(key) in self.admin_key_hashes

    # ------------------------------------------------------------------ models
    def prior(self, model: ModelState) -> ArmPrior:
        return ArmPrior(quality=model.prior_quality, cost_usd=model.prior_cost_usd)

    def prior_cost(self, input_price: float, output_price: float) -> float:
        s = self.settings
        return request_cost(input_price, output_price, s.prior_input_tokens,
                            s.prior_output_tokens)

    def _model_state(self, row: m.Model) -> ModelState:
        return ModelState(row.name, row.input_price_per_mtok, row.output_price_per_mtok,
                          row.enabled, row.prior_quality,
                          self.prior_cost(row.input_price_per_mtok, row.output_price_per_mtok),
                          row.base_url, row.upstream_model, row.api_key_env,
                          bool(row.added_late))

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
                     enabled: bool, prior_quality: float | None,
                     upstream: dict[str, str | None] | None = None, *,
                     late: bool = False) -> ModelState:
        """Register a model; ``upstream`` may give its ``base_url``, ``upstream_model``
        and ``api_key_env`` (service/gateway). ``late``: the policies have started
        learning (:meth:`PolicyStore.learning`), or any quality is stored (read just
        before the insert, no lock: a first quality committed between the read and the
        model's commit is not seen); stored with the model (``models.added_late``: a
        restart or another replica reads the same answer)."""
        # The arm's prior is checked before anything is written: a model the policies
        # would refuse must not reach the registry (it would break every decision).
        self.prior(ModelState(name, input_price, output_price, enabled, prior_quality,
                              self.prior_cost(input_price, output_price))).validated()
        now = m.utcnow()
        row = m.Model(name=name, input_price_per_mtok=input_price,
                      output_price_per_mtok=output_price, enabled=enabled,
                      prior_quality=prior_quality, created_at=now, updated_at=now,
                      added_late=late, **(upstream or {}))
        try:
            with Session(self.engine) as session, session.begin():
                # Late too when a quality is stored that the policies have not learned
                # yet (being applied, another replica's, a learner's not in the
                # snapshot yet). Not a snapshot of the insert: PostgreSQL (read
                # committed) reads what was committed when the SELECT began, SQLite's
                # driver begins the transaction at the insert, after it.
                row.added_late = late or session.scalar(select(m.Feedback.id).where(
                    m.Feedback.quality.is_not(None)).limit(1)) is not None
                session.add(row)
                session.flush()
                state = self._model_state(row)
        except IntegrityError:
            raise ConflictError(f"a model named {name!r} exists (or existed: a deleted "
                                "model's name stays reserved for its history)",
                                field="name", reason="already used",
                                allowed="a name never used before") from None
        with self.lock:
            self._touch("model", name)
            self.models[name] = state
            self.models_version += 1
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
            self._touch("model", name)
            self.models[name] = state
            self.models_version += 1
        return state

    def delete_model(self, name: str) -> None:
        self.get_model(name)
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Model).where(m.Model.name == name)
                            .values(deleted_at=m.utcnow(), enabled=False))
        with self.lock:
            self._touch("model", name)
            del self.models[name]
            self.models_version += 1
            for listener in self._listeners:
                listener.model_removed(name)

    def check_baseline(self, name: str | None) -> None:
        if name is not None and name not in self.models:
            raise InvalidInputError("baseline_model", "unknown model; allowed: "
                                    + (", ".join(self.models) or "(no model registered)")
                                    + ", or null to turn the guard off", name)

    # ------------------------------------------------------------------ tenants
    def _tenant_state(self, row: m.Tenant) -> TenantState:
        return TenantState(
            id=row.id, name=row.name, key_hash=row.key_hash,
            preferences=Preferences(row.weight_quality, row.weight_cost, row.weight_latency),
            policy=row.policy, scope=row.scope, on_budget_exhausted=row.on_budget_exhausted,
            ledger=self._new_ledger(row.budget_usd_per_day, row.budget_usd_per_month),
            baseline_model=row.baseline_model,
            max_exploration_loss=float(row.max_exploration_loss
                                       if row.max_exploration_loss is not None else 0.02),
            guard_since=None if row.guard_since is None else m.as_utc(row.guard_since))

    def _new_ledger(self, budget_day: float | None, budget_month: float | None) -> Ledger:
        ledger = Ledger(budget_day, budget_month, leased=self.leases is not None)
        if self.leases is not None:
            ledger.wake = self.leases.wake
        return ledger

    def budgeted(self) -> list[TenantState]:
        """The tenants with a daily or monthly budget."""
        return [t for t in list(self.tenants.values())
                if t.budget_usd_per_day is not None or t.budget_usd_per_month is not None]

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

    def rekey(self, tenant: TenantState, digest: str) -> None:
        """The tenant answers to the key with this digest, no longer to its old one."""
        with self.lock:
            self._touch("tenant", tenant.id)
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
                    "on_budget_exhausted", "max_exploration_loss"):
            if key in changes:
                values[key] = changes[key]
        new_baseline = "baseline_model" in changes and \
            changes["baseline_model"] != tenant.baseline_model
        if "baseline_model" in changes:
            self.check_baseline(changes["baseline_model"])
            values["baseline_model"] = changes["baseline_model"]
        if new_baseline:
            # A new baseline starts a new account: the old one's sums say nothing about
            # it. The policies' statistics are untouched (nothing learned is lost).
            values["guard_since"] = m.utcnow()
        GuardConfig("-", values.get("max_exploration_loss",
                                    tenant.max_exploration_loss)).validated()
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Tenant).where(m.Tenant.id == tenant.id).values(**values))
        with self.lock:
            self._touch("tenant", tenant.id)
            if new_baseline:
                tenant.baseline_model = values["baseline_model"]
                tenant.guard_since = values["guard_since"]
                tenant.guard_state = GuardState()
            tenant.max_exploration_loss = values.get("max_exploration_loss",
                                                     tenant.max_exploration_loss)
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
        """Pick up models, tenants and admin keys changed through another replica.

        A model or tenant changed here after this refresh began reading keeps its cached
        state: the rows read may predate that change (a model created here would be
        dropped, a deleted one brought back, a new preference or a rotated key undone
        until the next refresh)."""
        with self.lock:
            started = self._generation
        with Session(self.engine) as session:
            model_rows = list(session.scalars(select(m.Model)
                                              .where(m.Model.deleted_at.is_(None))
                                              .order_by(m.Model.id)))
            tenant_rows = list(session.scalars(select(m.Tenant)))
        self.reload_admin_keys()
        changed_guards: list[TenantState] = []
        with self.lock:
            def newer(kind: str, key: str) -> bool:
                return self._touched.get((kind, key), 0) > started

            fresh = {r.name: self._model_state(r) for r in model_rows
                     if not newer("model", r.name)}
            gone = [n for n in self.models if n not in fresh and not newer("model", n)]
            if gone or any(self.models.get(n) != s for n, s in fresh.items()):
                # Only a change: the decider's price caches key on the version, and
                # a refresh runs every few seconds whether anything changed or not.
                self.models_version += 1
            for name in gone:
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
                elif not newer("tenant", row.id) and self._refresh_tenant(tenant, row):
                    changed_guards.append(tenant)
            tenants = [self.tenants[row.id] for row in tenant_rows]
            self._touched = {k: g for k, g in self._touched.items() if g > started}
        for tenant in tenants:
            for listener in self._listeners:
                listener.tenant_changed(tenant)
        for tenant in changed_guards:  # baseline changed through another replica
            for listener in self._listeners:
                listener.baseline_changed(tenant)

    def _refresh_tenant(self, tenant: TenantState, row: m.Tenant) -> bool:
        """Bring a cached tenant to its stored row; True when its guard account changed."""
        if tenant.key_hash != row.key_hash:
            # The key was rotated through another replica: the old one must stop
            # working here too, within one refresh interval.
            self.rekey(tenant, row.key_hash)
        tenant.preferences = Preferences(row.weight_quality, row.weight_cost,
                                         row.weight_latency)
        tenant.policy, tenant.scope = row.policy, row.scope
        tenant.on_budget_exhausted = row.on_budget_exhausted
        tenant.ledger.set_budgets(row.budget_usd_per_day, row.budget_usd_per_month)
        stored = self._tenant_state(row)
        tenant.max_exploration_loss = stored.max_exploration_loss
        if (stored.baseline_model, stored.guard_since) == (tenant.baseline_model,
                                                           tenant.guard_since):
            return False
        tenant.baseline_model = stored.baseline_model
        tenant.guard_since = stored.guard_since
        return True

    # ============================================= the local copy (degraded start)
    def to_local(self) -> bytes:
        """The registry as kept on local disk (what a start during an outage serves)."""
        with self.lock:
            return orjson.dumps({
                "admin_key_hashes": sorted(self.admin_key_hashes),
                "models": [vars(model) for model in self.models.values()],
                "tenants": [{"id": t.id, "name": t.name, "key_hash": t.key_hash,
                             "weights": list(t.preferences), "policy": t.policy,
                             "scope": t.scope, "on_budget_exhausted": t.on_budget_exhausted,
                             "budget_day": t.budget_usd_per_day,
                             "budget_month": t.budget_usd_per_month,
                             "baseline_model": t.baseline_model,
                             "max_exploration_loss": t.max_exploration_loss,
                             "guard_since": (None if t.guard_since is None
                                             else t.guard_since.isoformat()),
                             "guard_state": t.guard_state.to_dict()}
                            for t in self.tenants.values()]})

    def load_local(self, data: bytes) -> None:
        """The registry from :meth:`to_local`'s bytes (a start during an outage)."""
        registry = orjson.loads(data)
        self.admin_key_hashes = set(registry["admin_key_hashes"])
        if self.settings.admin_key is not None:
            self.admin_key_hashes.add(hash_key(self.settings.admin_key.get_secret_value()))
        self.models = {row["name"]: ModelState(**row) for row in registry["models"]}
        self.models_version += 1
        tenants = [TenantState(id=t["id"], name=t["name"], key_hash=t["key_hash"],
                               preferences=Preferences(*t["weights"]), policy=t["policy"],
                               scope=t["scope"], on_budget_exhausted=t["on_budget_exhausted"],
                               ledger=Ledger(t["budget_day"], t["budget_month"]),
                               baseline_model=t.get("baseline_model"),
                               max_exploration_loss=t.get("max_exploration_loss", 0.02),
                               guard_since=(None if t.get("guard_since") is None
                                            else datetime.fromisoformat(t["guard_since"])),
                               # The guard's sums as of the last registry save: a degraded
                               # start keeps guarding from there, not from zero.
                               guard_state=GuardState.from_dict(t.get("guard_state") or {}))
                   for t in registry["tenants"]]
        self.tenants = {t.id: t for t in tenants}
        self._by_key = {t.key_hash: t for t in tenants}
