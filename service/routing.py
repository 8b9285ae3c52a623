"""The in-process routing state: policies, the model registry, tenants and budgets.

One :class:`RoutingService` per app. It owns

* one shared policy per kind (``linucb``, ``thompson``), learning from every tenant's
  feedback, and a pair of policies per ``isolated`` tenant, learning from its own;
  feedback updates both kinds so that switching kind is instant;
* caches of the model registry and of the tenants (keyed by API-key digest), so that a
  decision never touches the database;
* each tenant's spend :class:`~service.budget.Ledger`.

Locks: ``_lock`` guards policies, models and tenants and is held only for in-memory work
(microseconds), never across I/O. ``_feedback_lock`` serializes feedback (write, then
apply) and checkpoints, so that the ``last_feedback_id`` stored with a checkpoint is
exactly the set of feedback rows its statistics include.

Recovery: a checkpoint stores every policy and the id of the last feedback row applied.
On start the newest checkpoint is loaded and the feedback rows after it are replayed
in the order they were applied, each weighted (with forgetting) by its decision's
``created_at``, as when it was applied live: the replay reproduces the live statistics
(:meth:`RoutingService._apply`). Acknowledged
feedback is never lost, even after ``kill -9``; what a crash loses is the random-stream
position of decisions since the checkpoint and decisions still in the writer's queue.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import orjson
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from bandit import ArmPrior, InvalidInputError, LinearThompson, LinUCB, Policy, Preferences
from bandit.base import MAX_ABS_CONTEXT, BatchDecision, check_finite_number
from bandit.conservative import ConservativeGuard, GuardConfig, GuardRecord, GuardState
from bandit.featurize import TAGS_SPEC, with_tags
from bandit.pricing import request_cost
from service.budget import Ledger
from service.budget_lease import budget_leases
from service.config import Settings
from service.db import models as m
from service.db.engine import is_at_head
from service.exceptions import (
    BudgetExhaustedError,
    ConflictError,
    NotFoundError,
    UnavailableError,
)
from service.features import ContextSettingsError, context_dim, load_prototype_map
from service.ids import uuid7_str
from service.metrics import Metrics
from service.security import hash_key, new_key
from service.spool import (
    DecisionSpool,
    FeedbackSpool,
    LocalState,
    SpooledFeedback,
    spool_path,
)
from service.writer import DecisionWriter

__all__ = ["RoutingService", "TenantState", "ModelState", "PendingDecision", "DecideArgs",
           "POLICY_KINDS"]

log = logging.getLogger("service.routing")
#: With a feedback buffer, feedback whose decision is still in the writer's queue waits
#: this long for it (the writer hurries when asked), then is buffered: the writer holds
#: the decision, typically because the database is away.
_PENDING_WAIT_S = 1.0
#: Buffered feedback stored per transaction by the drain.
_DRAIN_BATCH = 200
POLICY_KINDS = ("linucb", "thompson")
# The checkpoint's snapshot that holds the featurizer spec (not a policy).
_FEATURIZER_KEY = "context:featurizer"
_POLICY_CLASSES: dict[str, type[Policy]] = {"linucb": LinUCB, "thompson": LinearThompson}


@dataclass
class ModelState:
    name: str
    input_price_per_mtok: float
    output_price_per_mtok: float
    enabled: bool
    prior_quality: float | None
    prior_cost_usd: float
    #: Where POST /v1/chat/completions forwards its requests (service/gateway); the key is
    #: the value of the environment variable ``api_key_env`` names, never stored.
    base_url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None


@dataclass
class TenantState:
    id: str
    name: str
    key_hash: str
    preferences: Preferences
    policy: str
    scope: str
    on_budget_exhausted: str
    ledger: Ledger = field(repr=False)
    #: Guarded exploration: the tenant's baseline model (None: off), the bound, since
    #: when the guard counts, and its state (the sum over the tenant's guarded decisions
    #: since then: rebuilt from the decision log at start, kept current by decides and
    #: feedback).
    baseline_model: str | None = None
    max_exploration_loss: float = 0.02
    guard_since: datetime | None = None
    guard_state: GuardState = field(default_factory=GuardState, repr=False)

    @property
    def budget_usd_per_day(self) -> float | None:
        return self.ledger.budget_day

    @property
    def budget_usd_per_month(self) -> float | None:
        return self.ledger.budget_month


@dataclass(frozen=True)
class PendingDecision:
    """A decision made and paid for (reserved), not yet queued for the writer."""

    response: dict[str, Any]
    row: dict[str, Any]
    tenant: TenantState
    explored: bool


class DecideArgs(NamedTuple):
    """What one decide request asks."""

    tenant: TenantState
    x: np.ndarray
    candidates: list[str] | None
    override: Preferences | None
    #: The prompt's length in tokens when known (from the text); None: the
    #: ``prior_input_tokens`` setting.
    input_tokens: int | None = None


@dataclass(frozen=True)
class FeedbackResult:
    status: str
    feedback_id: int | None


@dataclass(frozen=True)
class _Incoming:
    """One feedback on its way to the database (direct, or from the buffer)."""

    tenant: TenantState
    decision_id: str
    event: str
    outcome: dict[str, float | None]
    received: datetime


def _outcome(fb: m.Feedback) -> dict[str, float | None]:
    return {"quality": fb.quality, "cost_usd": fb.cost_usd, "latency_ms": fb.latency_ms}


def _price_estimate(model: str, predictions: dict[str, Any] | None) -> float | None:
    """The price estimate a decision used for its model (None for decisions made
    before estimates were recorded)."""
    prediction = (predictions or {}).get(model) or {}
    value = prediction.get("price_usd")
    return float(value) if isinstance(value, (int, float)) else None


def _periods() -> tuple[datetime, datetime, datetime]:
    """Now, and the starts of the current UTC day and month (budgets' periods)."""
    now = datetime.now(UTC)
    day0 = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now, day0, day0.replace(day=1)


def _ts(value: datetime) -> float:
    return m.as_utc(value).timestamp()


class RoutingService:
    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._lock = threading.RLock()
        self._feedback_lock = threading.Lock()
        self.shared: dict[str, Policy] = {}
        self.isolated: dict[str, dict[str, Policy]] = {}
        self.models: dict[str, ModelState] = {}
        self.tenants: dict[str, TenantState] = {}
        self._by_key: dict[str, TenantState] = {}
        self.admin_key_hashes: set[str] = set()
        self.last_feedback_id = 0
        # (tenant, month start, day start) -> spend of the month's earlier days (sync_spend)
        self._spend_before_today: dict[tuple[str, datetime, datetime], float] = {}
        self._checkpointed_versions: tuple[int, ...] | None = None
        buffers = (settings.feedback_buffer_dir if settings.feedback_buffer_dir is not None
                   else settings.data_dir)
        url = settings.resolved_database_url()
        self.writer = DecisionWriter(
            engine, queue_size=settings.decision_queue_size,
            batch_size=settings.decision_batch_size,
            flush_interval_s=settings.decision_flush_interval_s,
            spool=DecisionSpool(spool_path(buffers, url, "decision-spool"),
                                settings.decision_buffer_size)
            if settings.decision_buffer_size > 0 else None,
            write_through=settings.decision_durability == "write-through",
            retry_max_s=settings.outage_retry_s)
        # What a restart during an outage serves from (embedded mode): see _start_local.
        self.local_state = LocalState(spool_path(buffers, url, "local-state"), 0)
        self._local_registry: bytes | None = None
        #: Set by the app: applies the migrations (retried by the reload after a
        #: degraded start).
        self.migrate: Any = None
        #: Started from the local state while the database was unreachable; cleared by
        #: the reload from the database (_reload_loop).
        self.degraded_since: str | None = None
        self._reload_thread: threading.Thread | None = None
        self.spool: FeedbackSpool | None = None
        self._drain_thread: threading.Thread | None = None
        self._drain_stop = threading.Event()
        self._drain_wake = threading.Event()
        self._database_back = threading.Event()  # database_answers(): retry now
        # (tenant, decision, event) -> (cost delta, decided at) of feedback whose commit
        # failed with a connection error: maybe stored, certainly not applied.
        self._uncertain: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._featurizer: Any = None
        # Loaded (and checked against BANDIT_ROUTER_DIM) here, so that a bad map refuses
        # the start before anything else is done.
        self.prototype_map = load_prototype_map(settings)
        #: The policies' context dimension (the map's dim, else BANDIT_ROUTER_DIM).
        self.context_dim = context_dim(settings, self.prototype_map)
        self._decision_counters: dict[tuple[str, str], Any] = {}
        self._valid_preferences: set[Preferences] = set()
        self._guards: dict[tuple[str, float], ConservativeGuard] = {}
        #: Budgets leased from PostgreSQL (service/budget_lease.py), or None.
        self.leases = budget_leases(settings, engine.dialect.name)

    # ================================================================= start / stop
    def start(self) -> str | None:
        """Load everything from the database; returns a newly generated admin key, if any.

        Embedded mode, database unreachable: start from the local state (the newest
        checkpoint this replica saw, its registry), degraded, and reload from the
        database once it answers (issue 14)."""
        # Load the featurizer now (a sentence-embedding model takes seconds), not on the
        # first text query; and before the checkpoint, which is checked against its spec.
        self.featurize("warm up")
        try:
            if self.migrate is not None:
                self.migrate()
            admin_key = self._load_from_database()
        except (OperationalError, InterfaceError) as exc:
            if self.settings.kafka_bootstrap or not self._start_local(exc):
                raise
            admin_key = None
        else:
            self._save_local_state(self._policy_blobs())
        # The policies' first update imports river's drift detector (about 3 s here,
        # much more on a busy machine), holding the policies' lock: now, not in the
        # first feedback or in the drain after an outage (it held /readyz's "ready"
        # back by that much). A background import was no better: the drain waited
        # for it, slowed down by the requests being served meanwhile.
        importlib.import_module("river.drift")
        if self.leases is not None:
            self.leases.start(self._budgeted_ledgers)
        # Replicas (and learners) must agree on this; the spec names the featurizer and
        # the map's digest, so a log search shows a replica with another file.
        log.info("contexts: %s, %d dimensions; request tags: %s",
                 getattr(self._featurizer, "spec", "?"), self.context_dim, TAGS_SPEC)
        self.writer.start()
        self._start_feedback_buffer()
        if self.degraded_since is not None:
            self._reload_thread = threading.Thread(target=self._reload_loop,
                                                   name="reload", daemon=True)
            self._reload_thread.start()
        return admin_key

    def _load_from_database(self) -> str | None:
        admin_key = self._ensure_admin_key()
        self._load_models()
        self._load_tenants()
        self._load_guards()
        started_fresh = self._load_policies()
        self._replay_feedback()
        self._load_spend()
        if started_fresh:
            # Record the new featurizer at once: a restart must not meet the old one.
            self.checkpoint(force=True)
        return admin_key

    def stop(self) -> None:
        if self.leases is not None:
            self.leases.stop()  # returns the unused slices first
        self._drain_stop.set()  # also ends the reload loop
        self._database_back.set()  # ... now, not at the end of its backoff
        if self._reload_thread is not None:
            self._reload_thread.join(30)
        self._stop_feedback_buffer()
        self.writer.stop()
        self._close_feedback_buffer()
        if self.writer.spool is not None:
            self.writer.spool.close()
        try:
            self.checkpoint(force=True)
        except Exception:
            # Nothing is lost: the next start replays the feedback since the last
            # checkpoint that did succeed.
            log.exception("final checkpoint failed")
        self.local_state.close()

    # ------------------------------------------------- local state (degraded start)
    def _policy_blobs(self) -> dict[str, bytes]:
        with self._lock:
            return {key: p.to_bytes() for key, p in self._all_policies().items()}

    def _save_local_state(self, blobs: dict[str, bytes] | None = None) -> None:
        """Keep the registry (when it changed) and, with ``blobs``, the policies of a
        checkpoint on local disk: what a restart during an outage serves from."""
        with self._lock:
            registry = orjson.dumps({
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
            last = self.last_feedback_id
        items: dict[str, bytes] = {}
        if registry != self._local_registry:
            items["registry"] = registry
        if blobs is not None:
            items.update({f"policy:{key}": blob for key, blob in blobs.items()})
            now = m.utcnow()
            items["checkpoint"] = orjson.dumps({
                "last_feedback_id": last, "at": now.isoformat(),
                "spend": {t.id: t.ledger.snapshot() for t in list(self.tenants.values())}})
        if not items:
            return
        try:
            self.local_state.put(items, drop_prefix="policy:" if blobs is not None else None)
        except Exception:  # noqa: BLE001 - the database stays the record
            log.exception("writing the local state to %s failed", self.local_state.path)
            return
        self._local_registry = registry

    def _start_local(self, exc: Exception) -> bool:
        """Load models, tenants and policies from the local state; False without one."""
        state = self.local_state.get_all()
        if "registry" not in state or "checkpoint" not in state:
            log.error("the database is unreachable (%s) and %s holds no local state: "
                      "cannot start", type(exc).__name__, self.local_state.path)
            return False
        registry = orjson.loads(state["registry"])
        checkpoint = orjson.loads(state["checkpoint"])
        self.admin_key_hashes = set(registry["admin_key_hashes"])
        if self.settings.admin_key is not None:
            self.admin_key_hashes.add(hash_key(self.settings.admin_key.get_secret_value()))
        self.models = {row["name"]: ModelState(**row) for row in registry["models"]}
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
        if checkpoint["at"][:10] == m.utcnow().isoformat()[:10]:  # same UTC day
            for tenant_id, (day, month) in checkpoint.get("spend", {}).items():
                if tenant_id in self.tenants:
                    self.tenants[tenant_id].ledger.load(day, month)
        self.last_feedback_id = int(checkpoint["last_feedback_id"])
        self._install_policies({key.removeprefix("policy:"): blob
                                for key, blob in state.items() if key.startswith("policy:")},
                               rebuild=False)
        self._local_registry = state["registry"]
        self.degraded_since = checkpoint["at"]
        log.warning("the database is unreachable (%s): serving DEGRADED from the local "
                    "state in %s (checkpoint of %s, %d models, %d tenants); feedback is "
                    "buffered, decisions spooled, and everything reloads from the database "
                    "when it answers", type(exc).__name__, self.local_state.path,
                    checkpoint["at"], len(self.models), len(self.tenants))
        return True

    def _reload_loop(self) -> None:
        """After a degraded start: once the database answers and the spooled decisions
        are in it, load everything from it (the truth: the feedback stored after the
        local checkpoint is replayed) and leave degraded mode."""
        delay = 0.1
        while not self._drain_stop.is_set():
            if self.writer.spooling():
                self._drain_stop.wait(0.1)  # the writer retries the database meanwhile
                continue
            try:
                started = time.perf_counter()
                # alembic's upgrade costs about a second even at head: check first.
                if self.migrate is not None and not is_at_head(self.engine):
                    self.migrate()
                t1 = time.perf_counter()
                with self._feedback_lock:
                    self._load_from_database()
                    self._checkpointed_versions = None  # checkpoint it
                    self.degraded_since = None
                log.warning("the database answers: reloaded from it in %.2f s (%.2f s "
                            "migrations check); degraded mode ends",
                            time.perf_counter() - started, t1 - started)
                self._save_local_state(self._policy_blobs())
                self._drain_wake.set()
                return
            except (OperationalError, InterfaceError) as exc:
                log.info("reload: the database is still unreachable (%s)",
                         type(exc).__name__)
            except Exception:
                log.exception("reload from the database failed; retrying")
            self._wait_for_database(delay)
            delay = min(delay * 2, self.settings.outage_retry_s)

    def _wait_for_database(self, delay: float) -> None:
        """Sleep ``delay`` before retrying the database, or less if /readyz found it
        answering (:meth:`database_answers`) or the service stops."""
        if self._database_back.wait(delay):
            self._database_back.clear()

    def database_answers(self) -> None:
        """Called by ``/readyz`` when it reached the database while something waits for
        it: the spool, the feedback buffer and the reload retry at once instead of at the
        end of their backoff."""
        self.writer.retry_now()
        self._database_back.set()

    def featurize(self, text: str) -> np.ndarray:
        """The context of a text: featurizer, then the prototype map if configured."""
        if self._featurizer is None:
            from bandit.featurize import PrototypeFeaturizer, make_featurizer

            featurizer = make_featurizer(self.settings.featurizer, self.settings.dim,
                                         seed=self.settings.featurizer_seed)
            if self.prototype_map is not None:
                featurizer = PrototypeFeaturizer(featurizer, self.prototype_map)
            self._featurizer = featurizer
        return np.asarray(self._featurizer.transform_one(text), dtype=np.float64)

    # ------------------------------------------------------------------ admin key
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
        run by :meth:`refresh_registry`: a key revoked on one replica stops working on the
        others within ``registry_refresh_s``)."""
        configured = self.settings.admin_key
        if configured is not None:
            self.admin_key_hashes = {hash_key(configured.get_secret_value())}
            return
        with Session(self.engine) as session:
            self.admin_key_hashes = set(session.scalars(select(m.AdminKey.key_hash)))

    # ------------------------------------------------------------------ policies
    def _new_policy(self, kind: str) -> Policy:
        policy = _POLICY_CLASSES[kind](self.context_dim, seed=self.settings.policy_seed,
                                       epsilon=self.settings.epsilon,
                                       half_life_hours=self.settings.half_life_hours)
        for model in self.models.values():
            policy.add_arm(model.name, self._prior(model))
        return policy

    def _prior(self, model: ModelState) -> ArmPrior:
        return ArmPrior(quality=model.prior_quality, cost_usd=model.prior_cost_usd)

    def prior_cost(self, input_price: float, output_price: float) -> float:
        s = self.settings
        return request_cost(input_price, output_price, s.prior_input_tokens,
                            s.prior_output_tokens)

    def price_estimates(self, names: list[str], input_tokens: Sequence[int | None]
                        ) -> np.ndarray:
        """(n, K) expected USD cost of each request on each model before the call: the
        registry's prices x (the prompt's tokens, else ``prior_input_tokens``) and
        ``prior_output_tokens`` expected output tokens. The policy predicts cost as this
        times a correction learned from feedback, so it spends no exploration on prices.
        """
        s = self.settings
        models = [self.models[n] for n in names]
        p_in = np.array([mo.input_price_per_mtok for mo in models])
        p_out = np.array([mo.output_price_per_mtok for mo in models])
        t_in = np.array([s.prior_input_tokens if t is None else t for t in input_tokens],
                        dtype=np.float64)
        return (t_in[:, None] * p_in + s.prior_output_tokens * p_out) / 1e6

    def _all_policies(self) -> dict[str, Policy]:
        out = {f"shared:{k}": p for k, p in self.shared.items()}
        for tenant_id, pair in self.isolated.items():
            out.update({f"tenant:{tenant_id}:{k}": p for k, p in pair.items()})
        return out

    def _sync_arms(self, policy: Policy) -> None:
        """Make a restored policy's arms match the registry (added / deleted models)."""
        for name in policy.arms:
            if name not in self.models:
                policy.remove_arm(name)
        for model in self.models.values():
            if model.name not in policy.arms:
                policy.add_arm(model.name, self._prior(model))

    def _featurizer_spec(self) -> str:
        return str(getattr(self._featurizer, "spec", type(self._featurizer).__name__))

    def _load_policies(self) -> bool:
        """Restore the newest checkpoint; True when the stored statistics were set aside
        because another featurizer learned them (``FEATURIZER_CHANGE=start-fresh``)."""
        fresh = False
        with Session(self.engine) as session:
            checkpoint = session.scalars(select(m.PolicyCheckpoint)
                                         .order_by(m.PolicyCheckpoint.id.desc())
                                         .limit(1)).first()
            snapshots: dict[str, bytes] = {}
            self.last_feedback_id = 0
            if checkpoint is not None:
                snapshots = {s.key: s.data for s in session.scalars(
                    select(m.PolicySnapshot)
                    .where(m.PolicySnapshot.checkpoint_id == checkpoint.id))}
                self.last_feedback_id = int(checkpoint.last_feedback_id)
            # Checkpoints written before the spec was recorded have none: not checked.
            stored = snapshots.pop(_FEATURIZER_KEY, b"").decode() or None
            changed = stored is not None and stored != self._featurizer_spec()
            if changed and self.settings.featurizer_change == "start-fresh":
                log.warning("BANDIT_ROUTER_FEATURIZER_CHANGE=start-fresh: the stored "
                            "statistics were learned with %r, the settings give %r; "
                            "starting from the models' priors, feedback before this start "
                            "is not replayed", stored, self._featurizer_spec())
                snapshots, fresh = {}, True
                # The old decisions' contexts are in the old feature space: never replay.
                self.last_feedback_id = int(session.scalar(
                    select(func.coalesce(func.max(m.Feedback.id), 0))))
        self._install_policies(snapshots, rebuild=True, fresh=fresh)
        if changed and not fresh:
            # After the restore: a changed dimension has said so first, more precisely.
            raise ContextSettingsError(
                f"the stored statistics were learned with the featurizer {stored!r}; the "
                f"settings give {self._featurizer_spec()!r} (BANDIT_ROUTER_FEATURIZER, "
                "BANDIT_ROUTER_DIM, BANDIT_ROUTER_FEATURIZER_SEED, "
                "BANDIT_ROUTER_PROTOTYPE_MAP): restore the settings they were learned "
                "with, or set BANDIT_ROUTER_FEATURIZER_CHANGE=start-fresh to start from "
                "the models' priors (what was learned stays in the database, unused)")
        return fresh

    def _install_policies(self, snapshots: dict[str, bytes], *, rebuild: bool,
                          fresh: bool = False) -> None:
        """Policies from a checkpoint's snapshots; an isolated tenant without one is
        rebuilt from its feedback up to the checkpoint (``rebuild``, needs the database)
        or starts from the priors (also when ``fresh``: the statistics were set aside)."""

        def restore(key: str, kind: str) -> Policy:
            data = snapshots.get(key)
            if data is None:
                return self._new_policy(kind)
            # Statistics from the checkpoint, settings from this process: a restart with
            # another BANDIT_ROUTER_EPSILON explores with the new one (and one with
            # another HALF_LIFE_HOURS forgets at the new rate from the checkpoint on).
            # The reference time comes with the statistics (the newest decision time
            # applied, see _apply): the replay continues from it, as the live process did.
            policy = Policy.from_bytes(data, as_class=_POLICY_CLASSES[kind],
                                       epsilon=self.settings.epsilon,
                                       half_life_hours=self.settings.half_life_hours)
            if policy.dim != self.context_dim:
                raise ContextSettingsError(
                    f"checkpoint {key} has dimension {policy.dim}, the settings say "
                    f"{self.context_dim} ({self._dim_source()}): restore the settings it "
                    "was learned with, or start on a fresh database")
            self._sync_arms(policy)
            return policy

        self.shared = {kind: restore(f"shared:{kind}", kind) for kind in POLICY_KINDS}
        self.isolated = {}
        for t in self.tenants.values():
            if t.scope != "isolated":
                continue
            if not rebuild or fresh or all(f"tenant:{t.id}:{kind}" in snapshots
                                           for kind in POLICY_KINDS):
                self.isolated[t.id] = {kind: restore(f"tenant:{t.id}:{kind}", kind)
                                       for kind in POLICY_KINDS}
            else:
                # Turned isolated after the checkpoint: rebuild up to the checkpoint; the
                # replay that follows adds the rest.
                self.isolated[t.id] = self._rebuild_isolated(t.id, self.last_feedback_id)
        self._checkpointed_versions = self._versions()

    def _dim_source(self) -> str:
        if self.prototype_map is None:
            return "BANDIT_ROUTER_DIM; BANDIT_ROUTER_PROTOTYPE_MAP is unset"
        return (f"the k={self.prototype_map.k} prototypes of BANDIT_ROUTER_PROTOTYPE_MAP="
                f"{str(self.settings.prototype_map)!r}"
                + (" plus BANDIT_ROUTER_DIM" if self.prototype_map.include_base else ""))

    def _stored_context(self, context: bytes, fb: Any) -> np.ndarray:
        """A stored decision's context, refused (at start-up) if another setting made it."""
        x = np.frombuffer(context, dtype=np.float64)
        if x.size != self.context_dim:
            raise ContextSettingsError(
                f"the decision of feedback {fb.id} has a {x.size}-dimensional context, the "
                f"settings say {self.context_dim} ({self._dim_source()}): restore the "
                "settings it was decided with, or start on a fresh database")
        return x

    def _versions(self) -> tuple[int, ...]:
        return tuple(p.version for _, p in sorted(self._all_policies().items()))

    def _replay_feedback(self, batch: int = 1000) -> None:
        """Apply the feedback rows written after the checkpoint, in id order."""
        replayed = 0
        while True:
            rows = self._feedback_rows(self.last_feedback_id, batch)
            if not rows:
                break
            for fb, model, context, decided_at, predictions in rows:
                self._apply(fb.tenant_id, model, self._stored_context(context, fb),
                            _outcome(fb), _ts(decided_at),
                            _price_estimate(model, predictions))
                self.last_feedback_id = int(fb.id)
                replayed += 1
        if replayed:
            log.info("replayed %d feedback events written after the last checkpoint",
                     replayed)

    def checkpoint(self, *, force: bool = False) -> bool:
        """Write every policy and the last applied feedback id (one transaction), and keep
        them in the local state. Not while degraded: those policies lack what the
        database holds."""
        if self.degraded_since is not None:
            return False
        with self._feedback_lock, self._lock:
            versions = self._versions()
            if not force and versions == self._checkpointed_versions:
                return False
            # Copy under the locks (about 1 ms per policy), serialize outside them (about
            # 5x longer): decisions wait only for the copy.
            copies = {key: copy.deepcopy(p) for key, p in self._all_policies().items()}
            last = self.last_feedback_id
        blobs = {key: p.to_bytes() for key, p in copies.items()}
        # What the statistics were learned with, checked by the next start.
        blobs[_FEATURIZER_KEY] = self._featurizer_spec().encode()
        with self.engine.connect() as conn, Session(bind=conn) as session, session.begin():
            if conn.dialect.name == "sqlite" and conn.engine.url.database not in (
                    None, "", ":memory:"):
                # sqlite3 caches the INSERT with the last blobs still bound (~4 MB per
                # policy) until its connection closes: one pooled connection after
                # another held them (docs/reliability.md, load). Close this one after
                # the commit instead of returning it to the pool.
                conn.detach()
            cp = m.PolicyCheckpoint(created_at=m.utcnow(), last_feedback_id=last)
            session.add(cp)
            session.flush()
            session.add_all([m.PolicySnapshot(checkpoint_id=cp.id, key=k, data=v)
                             for k, v in blobs.items()])
            keep = [i for (i,) in session.execute(
                select(m.PolicyCheckpoint.id).order_by(m.PolicyCheckpoint.id.desc())
                .limit(self.settings.checkpoints_kept))]
            old = select(m.PolicyCheckpoint.id).where(m.PolicyCheckpoint.id.not_in(keep))
            session.execute(delete(m.PolicySnapshot)
                            .where(m.PolicySnapshot.checkpoint_id.in_(old)))
            session.execute(delete(m.PolicyCheckpoint)
                            .where(m.PolicyCheckpoint.id.not_in(keep)))
        self._checkpointed_versions = versions
        self.metrics.checkpoints.inc()
        self._save_local_state(blobs)
        return True

    # ------------------------------------------------------------------ models
    def _model_state(self, row: m.Model) -> ModelState:
        return ModelState(row.name, row.input_price_per_mtok, row.output_price_per_mtok,
                          row.enabled, row.prior_quality,
                          self.prior_cost(row.input_price_per_mtok, row.output_price_per_mtok),
                          row.base_url, row.upstream_model, row.api_key_env)

    def _load_models(self) -> None:
        with Session(self.engine) as session:
            rows = session.scalars(select(m.Model).where(m.Model.deleted_at.is_(None))
                                   .order_by(m.Model.id))
            self.models = {r.name: self._model_state(r) for r in rows}

    def list_models(self, include_deleted: bool = False) -> list[tuple[ModelState, bool]]:
        with Session(self.engine) as session:
            q = select(m.Model).order_by(m.Model.id)
            if not include_deleted:
                q = q.where(m.Model.deleted_at.is_(None))
            return [(self._model_state(r), r.deleted_at is not None) for r in session.scalars(q)]

    def get_model(self, name: str) -> ModelState:
        with self._lock:
            model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"model {name!r} does not exist")
        return model

    def create_model(self, name: str, input_price: float, output_price: float,
                     enabled: bool, prior_quality: float | None,
                     upstream: dict[str, str | None] | None = None) -> ModelState:
        """Register a model; ``upstream`` may give its ``base_url``, ``upstream_model``
        and ``api_key_env`` (service/gateway)."""
        # The arm's prior is checked before anything is written: a model the policies
        # would refuse must not reach the registry (it would break every decision).
        self._prior(ModelState(name, input_price, output_price, enabled, prior_quality,
                               self.prior_cost(input_price, output_price))).validated()
        now = m.utcnow()
        row = m.Model(name=name, input_price_per_mtok=input_price,
                      output_price_per_mtok=output_price, enabled=enabled,
                      prior_quality=prior_quality, created_at=now, updated_at=now,
                      **(upstream or {}))
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
        with self._lock:
            self.models[name] = state
            for policy in self._all_policies().values():
                policy.add_arm(name, self._prior(state))
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
        with self._lock:
            # Learned statistics stay: a new price or prior only seeds arms added later
            # (for example a tenant switching to an isolated policy).
            self.models[name] = state
        return state

    def delete_model(self, name: str) -> None:
        self.get_model(name)
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Model).where(m.Model.name == name)
                            .values(deleted_at=m.utcnow(), enabled=False))
        with self._lock:
            del self.models[name]
            for policy in self._all_policies().values():
                if name in policy.arms:
                    policy.remove_arm(name)

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

    def _budgeted_ledgers(self) -> list[tuple[str, Ledger]]:
        return [(t.id, t.ledger) for t in list(self.tenants.values())
                if t.budget_usd_per_day is not None or t.budget_usd_per_month is not None]

    def _load_tenants(self) -> None:
        with Session(self.engine) as session:
            states = [self._tenant_state(r) for r in session.scalars(select(m.Tenant))]
        self.tenants = {t.id: t for t in states}
        self._by_key = {t.key_hash: t for t in states}

    def _load_spend(self) -> None:
        _now, day0, month0 = _periods()
        with Session(self.engine) as session:
            def sums(since: datetime) -> dict[str, float]:
                return dict(session.execute(
                    select(m.Decision.tenant_id, func.sum(m.Decision.charged_usd))
                    .where(m.Decision.created_at >= since)
                    .group_by(m.Decision.tenant_id)).all())
            day, month = sums(day0), sums(month0)
        for tenant in self.tenants.values():
            tenant.ledger.load(float(day.get(tenant.id) or 0.0),
                               float(month.get(tenant.id) or 0.0))

    def sync_spend(self) -> None:
        """Budgets hold across replicas: reset each budgeted tenant's ledger to the spend
        every replica wrote, plus this replica's unwritten reservations
        (service/budget.py, "Several replicas"). One indexed sum per budgeted tenant."""
        budgeted = [t for t in list(self.tenants.values())
                    if t.budget_usd_per_day is not None or t.budget_usd_per_month is not None]
        if not budgeted:
            return
        now, day0, month0 = _periods()
        marks = {t.id: t.ledger.mark(now=now.timestamp()) for t in budgeted}
        unwritten = self.writer.pending_charges()  # before the sums: never missed
        spend = m.Decision.charged_usd
        totals: dict[str, tuple[float, float]] = {}
        with Session(self.engine) as session:
            for t in budgeted:
                today = session.scalar(select(func.coalesce(func.sum(spend), 0.0)).where(
                    m.Decision.tenant_id == t.id, m.Decision.created_at >= day0))
                key = (t.id, month0, day0)
                before = self._spend_before_today.get(key)
                if before is None:  # once a day per tenant: the month's earlier days
                    before = float(session.scalar(
                        select(func.coalesce(func.sum(spend), 0.0)).where(
                            m.Decision.tenant_id == t.id, m.Decision.created_at >= month0,
                            m.Decision.created_at < day0)))
                    self._spend_before_today = {k: v for k, v in
                                                self._spend_before_today.items()
                                                if k[2] == day0}
                    self._spend_before_today[key] = before
                extra = unwritten.get(t.id, 0.0)
                totals[t.id] = (float(today) + extra, before + float(today) + extra)
        for t in budgeted:
            t.ledger.sync(*totals[t.id], marks[t.id], now=now.timestamp())

    def tenant_for_key(self, key: str) -> TenantState | None:
        return self._by_key.get(hash_key(key))

    def is_admin_key(self, key: str) -> bool:
        return hash_key(key) in self.admin_key_hashes

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
        with self._lock:
            self.tenants[state.id] = state
            self._by_key[state.key_hash] = state
        return state, key

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
            self._check_baseline(changes["baseline_model"])
            values["baseline_model"] = changes["baseline_model"]
        if new_baseline:
            # A new baseline starts a new account: the old one's sums say nothing about
            # it. The policies' statistics are untouched (nothing learned is lost).
            values["guard_since"] = m.utcnow()
        GuardConfig("-", values.get("max_exploration_loss",
                                    tenant.max_exploration_loss)).validated()
        with Session(self.engine) as session, session.begin():
            session.execute(update(m.Tenant).where(m.Tenant.id == tenant.id).values(**values))
        with self._lock:
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
        self._sync_isolation(tenant)
        return tenant

    # ========================================================== other replicas
    def refresh_registry(self) -> None:
        """Pick up models and tenants changed through another replica (same database).

        Run periodically by the app (``registry_refresh_s``), which also brings the
        budgeted tenants' spend up to date with every replica's (:meth:`sync_spend`),
        and keeps the registry in the local state (a degraded start's).
        """
        if self.degraded_since is not None:
            return  # the reload (_reload_loop) brings everything
        with Session(self.engine) as session:
            model_rows = list(session.scalars(select(m.Model)
                                              .where(m.Model.deleted_at.is_(None))
                                              .order_by(m.Model.id)))
            tenant_rows = list(session.scalars(select(m.Tenant)))
        self.reload_admin_keys()
        changed_guards: list[TenantState] = []
        with self._lock:
            fresh = {r.name: self._model_state(r) for r in model_rows}
            for name in [n for n in self.models if n not in fresh]:
                del self.models[name]
                for policy in self._all_policies().values():
                    if name in policy.arms:
                        policy.remove_arm(name)
            for name, state in fresh.items():
                if name not in self.models:
                    for policy in self._all_policies().values():
                        if name not in policy.arms:
                            policy.add_arm(name, self._prior(state))
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
                        if self._by_key.get(tenant.key_hash) is tenant:
                            del self._by_key[tenant.key_hash]
                        tenant.key_hash = row.key_hash
                        self._by_key[row.key_hash] = tenant
                    tenant.preferences = Preferences(row.weight_quality, row.weight_cost,
                                                     row.weight_latency)
                    tenant.policy, tenant.scope = row.policy, row.scope
                    tenant.on_budget_exhausted = row.on_budget_exhausted
                    tenant.ledger.set_budgets(row.budget_usd_per_day,
                                              row.budget_usd_per_month)
                    fresh_tenant = self._tenant_state(row)
                    tenant.max_exploration_loss = fresh_tenant.max_exploration_loss
                    if (fresh_tenant.baseline_model, fresh_tenant.guard_since) != (
                            tenant.baseline_model, tenant.guard_since):
                        tenant.baseline_model = fresh_tenant.baseline_model
                        tenant.guard_since = fresh_tenant.guard_since
                        changed_guards.append(tenant)
            tenants = [self.tenants[row.id] for row in tenant_rows]
        for tenant in tenants:
            self._sync_isolation(tenant)
        for tenant in changed_guards:  # baseline changed through another replica
            self._rebuild_guard(tenant)
        self.sync_spend()
        self._save_local_state()

    def _sync_isolation(self, tenant: TenantState) -> None:
        """Create or drop a tenant's isolated policies to match its scope.

        Called without ``_lock`` held (it takes ``_feedback_lock`` first, the lock order
        everywhere). A tenant turning isolated gets policies rebuilt from its own feedback
        history, so "isolated" means "learned from the tenant's own feedback" whenever
        the switch happened, and a restart rebuilds the same state.
        """
        if tenant.scope == "isolated" and tenant.id not in self.isolated:
            with self._feedback_lock:
                pair = self._rebuild_isolated(tenant.id, self.last_feedback_id)
                with self._lock:
                    self.isolated.setdefault(tenant.id, pair)
        elif tenant.scope == "shared" and tenant.id in self.isolated:
            with self._lock:
                self.isolated.pop(tenant.id, None)

    def _rebuild_isolated(self, tenant_id: str, upto: int,
                          batch: int = 1000) -> dict[str, Policy]:
        pair = {kind: self._new_policy(kind) for kind in POLICY_KINDS}
        after = 0
        while True:
            rows = self._feedback_rows(after, batch, tenant_id=tenant_id, upto=upto)
            if not rows:
                return pair
            for fb, model, context, decided_at, predictions in rows:
                x = self._stored_context(context, fb)
                estimate = _price_estimate(model, predictions)
                for policy in pair.values():
                    if model in policy.arms:
                        policy.update(model, x, _outcome(fb), time=_ts(decided_at),
                                      cost_estimate=estimate)
                after = int(fb.id)

    def _feedback_rows(self, after: int, limit: int, *, tenant_id: str | None = None,
                       upto: int | None = None) -> list[Any]:
        """Feedback rows after ``after`` in id order (the order they were applied), each
        with its decision's model, context, ``created_at`` and predictions (the price
        estimate the decision used teaches the model's price correction)."""
        q = (select(m.Feedback, m.Decision.model, m.Decision.context, m.Decision.created_at,
                    m.Decision.predictions)
             .join(m.Decision, m.Decision.id == m.Feedback.decision_id)
             .where(m.Feedback.id > after).order_by(m.Feedback.id).limit(limit))
        if tenant_id is not None:
            q = q.where(m.Feedback.tenant_id == tenant_id)
        if upto is not None:
            q = q.where(m.Feedback.id <= upto)
        with Session(self.engine) as session:
            return list(session.execute(q).all())

    # ================================================================== decide
    def context_from(self, text: str | None, embedding: list[float] | None,
                     tags: dict[str, str] | None = None) -> np.ndarray:
        """The context of a query: its text's features or its embedding (through the
        prototype map when one is configured), with the request's tags hashed into the
        same coordinates (:func:`bandit.featurize.with_tags`; untagged: unchanged)."""
        return with_tags(self._query_context(text, embedding), tags)

    def _query_context(self, text: str | None, embedding: list[float] | None) -> np.ndarray:
        if embedding is not None:
            x = np.asarray(embedding, dtype=np.float64)
            if x.shape != (self.settings.dim,):
                raise InvalidInputError("query.embedding",
                                        f"must be a list of {self.settings.dim} numbers",
                                        f"{x.size} numbers")
            if not np.isfinite(x).all():
                raise InvalidInputError("query.embedding", "must be finite numbers "
                                        "(no NaN or infinity)", "non-finite value")
            if np.abs(x).max() > MAX_ABS_CONTEXT:
                raise InvalidInputError("query.embedding", "every value must be within "
                                        f"+-{MAX_ABS_CONTEXT:g}", float(np.abs(x).max()))
            if self.prototype_map is not None:
                # The same map as for text: a caller who embeds with the configured
                # featurizer gets the features a text would have given.
                x = self.prototype_map.transform(x)
            return x
        assert text is not None
        return self.featurize(text)

    def _candidates(self, requested: list[str] | None) -> list[str]:
        enabled = [n for n, s in self.models.items() if s.enabled]
        if requested is None:
            if not enabled:
                raise UnavailableError("no enabled model to route to; an admin registers "
                                       "one with POST /v1/admin/models", slug="no-models",
                                       retry_after_s=None)
            return enabled
        names = list(dict.fromkeys(requested))
        allowed = ", ".join(enabled) or "(none enabled)"
        for name in names:
            if name not in self.models:
                raise InvalidInputError("candidates", f"unknown model; allowed: {allowed}",
                                        name)
        names = [n for n in names if self.models[n].enabled]
        if not names:
            raise InvalidInputError("candidates", "every listed model is disabled; "
                                    f"allowed: {allowed}", requested)
        return names

    def _policy_for(self, tenant: TenantState) -> Policy:
        if tenant.scope == "isolated":
            return self.isolated[tenant.id][tenant.policy]
        return self.shared[tenant.policy]

    def decide(self, tenant: TenantState, x: np.ndarray, candidates: list[str] | None,
               override: Preferences | None) -> PendingDecision:
        """Choose a model and reserve its predicted cost; :meth:`enqueue` queues the row.

        Raises :class:`~service.exceptions.BudgetExhaustedError` when the budget is spent and
        the tenant asked for ``reject``.
        """
        result = self.decide_many([DecideArgs(tenant, x, candidates, override)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def decide_many(self, requests: Sequence[DecideArgs]) -> list[PendingDecision | Exception]:
        """:meth:`decide` for several requests at once; each gets its decision or the
        exception :meth:`decide` would have raised for it alone.

        Requests on the same policy with the same (paced) preferences and candidates share
        one :meth:`Policy.decide_batch` call: each row is decided independently, exactly
        as one ``decide`` would, but a policy call costs ~50 us whatever the number of
        rows (numpy call overhead), so a batch of 8 costs about as much as two decisions.
        The API gathers the decides that arrive in the same event-loop iteration
        (:mod:`service.batching`).
        """
        now = time.time()
        out: list[PendingDecision | Exception | None] = [None] * len(requests)
        paced: list[tuple[int, Preferences]] = []
        valid = self._valid_preferences
        for i, request in enumerate(requests):
            tenant = request.tenant
            base = request.override or tenant.preferences
            try:
                if base not in valid:  # checked once per distinct weights, not per decide
                    base.validated()
                    if len(valid) >= 4096:
                        valid.clear()
                    valid.add(base)
                paced.append((i, base._replace(cost=tenant.ledger.paced_cost_weight(
                    base.quality, base.cost, now=now))))
            except Exception as exc:  # invalid weights: this request only
                out[i] = exc
        # key -> (policy, preferences, candidate names, kind, scope, request indices)
        groups: dict[tuple[Any, ...], tuple[Policy, Preferences, list[str], str, str,
                                           list[int]]] = {}
        batches: list[tuple[BatchDecision, int, str, str, list[int]]] = []
        estimates: dict[int, np.ndarray] = {}  # id(batch) -> its price estimates
        guarded: dict[int, tuple[ConservativeGuard, GuardRecord]] = {}
        with self._lock:
            for i, prefs in paced:
                tenant = requests[i].tenant
                try:
                    names = self._candidates(requests[i].candidates)
                except Exception as exc:
                    out[i] = exc
                    continue
                policy = self._policy_for(tenant)
                key = (id(policy), prefs, tuple(names))
                group = groups.get(key)
                if group is None:
                    group = groups[key] = (policy, prefs, names, tenant.policy, tenant.scope,
                                           [])
                group[5].append(i)
            for policy, prefs, names, kind, scope, rows in groups.values():
                xs = np.stack([requests[i].x for i in rows])
                est = self.price_estimates(names, [requests[i].input_tokens for i in rows])
                try:
                    batch = policy.decide_batch(xs, prefs, names, cost_estimate=est)
                except Exception as exc:
                    for i in rows:
                        out[i] = exc
                    continue
                self._guard_batch(policy, prefs, batch, xs, [requests[i].tenant for i in rows],
                                  rows, guarded)
                batches.append((batch, int(policy.version), kind, scope, rows))
                estimates[id(batch)] = est
        for batch, version, kind, scope, rows in batches:
            arms = batch.arms
            # One tolist() per array and batch (per-element float() costs more than the
            # policy): the same values as BatchDecision.decision() and Prediction.as_dict().
            means, utility = batch.means.tolist(), batch.utility.tolist()
            prices = estimates[id(batch)].tolist()
            std, scores = batch.uncertainty.tolist(), batch.scores.tolist()
            choices, props = batch.choices.tolist(), batch.propensities.tolist()
            explored = batch.explored.tolist() if batch.explored.size else [False] * len(rows)
            for r, i in enumerate(rows):
                m, u, s, sc = means[r], utility[r], std[r], scores[r]
                predictions = {
                    name: {"quality": m[j][0], "cost_usd": m[j][1],
                           "latency_ms": m[j][2] * 1e3, "utility": u[j],
                           "uncertainty": s[j], "score": sc[j], "price_usd": prices[r][j]}
                    for j, name in enumerate(arms)}
                tenant, x = requests[i].tenant, requests[i].x
                try:
                    pending = out[i] = self._reserve(tenant, x, arms, predictions,
                                                     arms[choices[r]], props[r],
                                                     bool(explored[r]), kind, scope,
                                                     version, now)
                except Exception as exc:  # 429: budget spent and "reject"
                    out[i] = exc
                    continue
                if i in guarded and not pending.response["budget_limited"]:
                    # Counted once the decision stands (a budget fallback is not the
                    # guard's choice, and is not counted).
                    guard, record = guarded[i]
                    with self._lock:
                        guard.count(tenant.guard_state, record)
                    pending.row["guard"] = {"record": record.to_list(), "outcome": None,
                                            "reward": None}
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------- guarded exploration
    def _guard_for(self, tenant: TenantState) -> ConservativeGuard | None:
        """The tenant's guard, or None: no baseline, or the baseline is not a model."""
        baseline = tenant.baseline_model
        if baseline is None or baseline not in self.models:
            return None
        key = (baseline, tenant.max_exploration_loss)
        guard = self._guards.get(key)
        if guard is None:
            if len(self._guards) >= 4096:
                self._guards.clear()
            guard = self._guards[key] = ConservativeGuard(
                GuardConfig(baseline, tenant.max_exploration_loss))
        return guard

    def _guard_batch(self, policy: Policy, prefs: Preferences, batch: BatchDecision,
                     xs: np.ndarray, tenants: list[TenantState], rows: list[int],
                     guarded: dict[int, tuple[ConservativeGuard, GuardRecord]]) -> None:
        """Apply each guarded tenant's guard to its rows of ``batch`` (in place: the
        choice, its propensity, explored); the records are counted once the decisions
        stand (:meth:`decide_many`). Runs under ``_lock``."""
        arms = batch.arms
        for r, (tenant, i) in enumerate(zip(tenants, rows, strict=True)):
            guard = self._guard_for(tenant)
            if guard is None or guard.config.baseline not in arms:
                continue  # no guard, or the request left the baseline out
            utility = dict(zip(arms, batch.utility[r].tolist(), strict=True))
            std = dict(zip(arms, batch.uncertainty[r].tolist(), strict=True))
            chosen = arms[int(batch.choices[r])]

            def probabilities(r: int = r) -> dict[str, float]:
                names, probs = policy.probabilities(xs[r], prefs, arms)
                return dict(zip(names, probs[0].tolist(), strict=True))

            choice = guard.choose(tenant.guard_state, chosen,
                                  float(batch.propensities[r]), utility, std,
                                  probabilities, count=False)
            if choice.overridden:
                batch.choices[r] = arms.index(choice.arm)
                batch.propensities[r] = choice.propensity
                if batch.explored.size:
                    batch.explored[r] = False
                self.metrics.guard_overrides.labels(tenant.id).inc()
            guarded[i] = (guard, choice.record)

    def _check_baseline(self, name: str | None) -> None:
        if name is not None and name not in self.models:
            raise InvalidInputError("baseline_model", "unknown model; allowed: "
                                    + (", ".join(self.models) or "(no model registered)")
                                    + ", or null to turn the guard off", name)

    def _load_guards(self) -> None:
        for tenant in self.tenants.values():
            self._rebuild_guard(tenant)

    def _rebuild_guard(self, tenant: TenantState, batch: int = 5000) -> None:
        """The tenant's guard state from its guarded decisions since ``guard_since``
        against its current baseline: the decision log is the guard's record, so a
        restart (or a crash) loses nothing that was stored."""
        state = GuardState()
        if tenant.baseline_model is not None:
            guard = ConservativeGuard(GuardConfig(tenant.baseline_model,
                                                  tenant.max_exploration_loss))
            q = (select(m.Decision.guard)
                 .where(m.Decision.tenant_id == tenant.id, m.Decision.guard.is_not(None))
                 .execution_options(yield_per=batch))
            if tenant.guard_since is not None:
                q = q.where(m.Decision.created_at >= tenant.guard_since)
            with Session(self.engine) as session:
                for (stored,) in session.execute(q):
                    record = GuardRecord.from_list(stored["record"])
                    if record.baseline != tenant.baseline_model:
                        continue
                    guard.count(state, record)
                    if stored.get("reward") is not None:
                        guard.observe(state, record, float(stored["reward"]))
        with self._lock:
            tenant.guard_state = state

    def _guard_outcome(self, tenant: TenantState, decision: m.Decision,
                       outcome: dict[str, float | None]
                       ) -> tuple[ConservativeGuard, GuardRecord, float, float | None] | None:
        """For feedback on a guarded decision of the tenant's current account: update
        the decision's stored guard part (merged outcome, its reward) and return what
        the in-memory state must learn once the feedback is committed."""
        stored = decision.guard
        if not stored or tenant.baseline_model is None:
            return None
        record = GuardRecord.from_list(stored["record"])
        guard = self._guard_for(tenant)
        if guard is None or record.baseline != tenant.baseline_model or (
                tenant.guard_since is not None
                and m.as_utc(decision.created_at) < tenant.guard_since):
            return None
        merged = {**(stored.get("outcome") or {}),
                  **{k: v for k, v in outcome.items() if v is not None}}
        # Objectives the feedback has not reported are taken as predicted.
        predicted = (decision.predictions or {}).get(decision.model) or {}
        values = {key: merged.get(key, predicted.get(key)) or 0.0
                  for key in ("quality", "cost_usd", "latency_ms")}
        reward = tenant.preferences.reward(**values)
        previous = stored.get("reward")
        decision.guard = {"record": stored["record"], "outcome": merged, "reward": reward}
        return guard, record, reward, previous

    def guard_report(self, tenant: TenantState) -> dict[str, Any] | None:
        """The guard's view of a tenant (for /metrics and the status page), or None."""
        guard = self._guard_for(tenant)
        if guard is None:
            return None
        with self._lock:
            state = GuardState.from_dict(tenant.guard_state.to_dict())
        return {"baseline_model": tenant.baseline_model,
                "max_exploration_loss": tenant.max_exploration_loss,
                "rounds": state.rounds, "non_baseline_plays": state.plays,
                "baseline_reward": state.baseline_total,
                "lower_bound_gap": guard.lower_gap(state, 0.0, 0.0, 0.0, 0.0)
                + guard.config.z * guard.noise_std(state) * (
                    math.sqrt(state.plays + 1) - math.sqrt(state.plays)),
                "allowance": guard.allowance(state, 0.0),
                "value_vs_baseline": state.value, "value_rounds": state.value_rounds}

    def _reserve(self, tenant: TenantState, x: np.ndarray, names: list[str],
                 predictions: dict[str, dict[str, float]], model: str, propensity: float,
                 explored: bool, kind: str, scope: str, version: int,
                 now: float) -> PendingDecision:
        """Reserve the chosen model's predicted cost (or fall back to the cheapest) and
        build the decision row and response."""
        cost = max(predictions[model]["cost_usd"], 0.0)
        budget_limited = over_budget = False
        if not tenant.ledger.try_reserve(cost, now=now):
            # The chosen model does not fit: fall back to the cheapest candidate, chosen
            # deterministically (propensity 1 given the budget state).
            cheapest = min(names, key=lambda n: (max(predictions[n]["cost_usd"], 0.0), n))
            cheap_cost = max(predictions[cheapest]["cost_usd"], 0.0)
            budget_limited = True
            if not tenant.ledger.try_reserve(cheap_cost, now=now):
                if tenant.on_budget_exhausted == "reject":
                    self.metrics.rejected.labels("budget").inc()
                    raise BudgetExhaustedError(
                        f"the tenant's budget is spent (day {tenant.budget_usd_per_day}, "
                        f"month {tenant.budget_usd_per_month} USD) and "
                        "on_budget_exhausted is 'reject'")
                tenant.ledger.try_reserve(cheap_cost, now=now, force=True)
                over_budget = True
            model, propensity, cost = cheapest, 1.0, cheap_cost
        decision_id = uuid7_str(int(now * 1000))  # time-ordered primary key (service.ids)
        row = {
            "id": decision_id, "tenant_id": tenant.id, "model": model, "policy": kind,
            "policy_version": version, "scope": scope, "propensity": float(propensity),
            "context": np.ascontiguousarray(x, dtype="<f8").tobytes(),
            # A score is -inf for an arm the main branch may not pick (a cold arm with no
            # declared quality). JSON has no infinity: orjson, which encodes both the
            # response and the stored row, writes it as null.
            "predictions": predictions,
            # Encoded once, here, for both the response body and the stored row (the
            # writer thread then does not encode them again holding the GIL).
            "predictions_json": orjson.dumps(predictions),
            "predicted_cost_usd": cost, "charged_usd": cost, "over_budget": over_budget,
            "created_at": datetime.fromtimestamp(now, UTC),
            # Set by the caller (decide_body) and decide_many (guarded decisions).
            "tags": None, "guard": None,
        }
        explored = explored and not budget_limited
        response = {"decision_id": decision_id, "model": model,
                    "propensity": float(propensity), "explored": explored,
                    "predictions": predictions, "policy": kind,
                    "policy_version": version, "scope": scope,
                    "budget_limited": budget_limited}
        return PendingDecision(response, row, tenant, explored)

    def enqueue(self, pending: PendingDecision) -> bool:
        """Queue the decision row for the writer; False when the queue is full."""
        if not self.writer.submit(pending.row):
            return False
        self._count_decision(pending.tenant, pending.row["model"], pending.explored)
        return True

    def abandon(self, pending: PendingDecision) -> None:
        """Give back the reservation of a decision that could not be queued."""
        self.release(pending)
        self.metrics.rejected.labels("backpressure").inc()

    def release(self, pending: PendingDecision) -> None:
        """Give back the reservation of a decision that is never answered (and its part
        of the tenant's guard state)."""
        row = pending.row
        pending.tenant.ledger.unreserve(row["charged_usd"], row["created_at"].timestamp(),
                                        from_slice=not row["over_budget"])
        if row.get("guard"):
            with self._lock:
                ConservativeGuard.count(pending.tenant.guard_state,
                                        GuardRecord.from_list(row["guard"]["record"]), -1)

    def _count_decision(self, tenant: TenantState, model: str, explored: bool) -> None:
        # Children cached: labels() validates and locks on every call (a few us).
        key = (model, tenant.id)
        child = self._decision_counters.get(key)
        if child is None:
            child = self._decision_counters[key] = self.metrics.decisions.labels(*key)
        child.inc()
        if explored:
            self.metrics.explored.labels(tenant.id).inc()

    def outage_serving(self) -> str:
        """What callers get while the database is unreachable (for ``/readyz``)."""
        decisions = ("decisions from memory, spooled to disk before the answer"
                     if self.writer.spool is not None else "decisions from memory")
        if self.spool is None:
            return f"{decisions}; feedback refused with 503 + Retry-After"
        return (f"{decisions}; feedback buffered ({self.spool.depth()} of "
                f"{self.spool.capacity}; 503 + Retry-After when full)")

    def degraded(self) -> dict[str, str]:
        """Parts other than the database that are away, for ``/readyz``: part -> what
        callers get meanwhile. Embedded mode: feedback still in the outage buffer."""
        out: dict[str, str] = {}
        if self.degraded_since is not None:
            out["start"] = ("started while the database was unreachable: serving from the "
                            f"local checkpoint of {self.degraded_since}, reloading")
        spooled = self.writer.spool.depth() if self.writer.spool is not None else 0
        if spooled:
            out["decision_spool"] = (f"{spooled} decisions spooled while the database was "
                                     "unreachable, being written")
        buffered = self.feedback_buffered()
        if buffered:
            out["feedback_buffer"] = (f"{buffered} feedback events accepted while the "
                                      "database was unreachable, being stored")
        return out

    def export_gauges(self) -> None:
        """Set the gauges read at scrape time (spend per tenant, writer queue depth,
        feedback buffer depth)."""
        self.metrics.queue_depth.set(self.writer.depth())
        self.metrics.feedback_buffer_depth.set(self.feedback_buffered())
        for tenant in list(self.tenants.values()):
            day, month = tenant.ledger.snapshot()
            self.metrics.spend.labels(tenant.id, "day").set(day)
            self.metrics.spend.labels(tenant.id, "month").set(month)
            report = self.guard_report(tenant)
            if report is not None:
                self.metrics.value_vs_baseline.labels(tenant.id).set(
                    report["value_vs_baseline"])
                self.metrics.guard_gap.labels(tenant.id, "lower_bound").set(
                    report["lower_bound_gap"])
                self.metrics.guard_gap.labels(tenant.id, "allowed").set(-report["allowance"])

    # ================================================================= feedback
    def feedback(self, tenant: TenantState, decision_id: str, outcome: dict[str, float | None],
                 event_id: str | None) -> FeedbackResult:
        """Record feedback (exactly once per decision and event id), then learn from it.

        While the database is unreachable the feedback is kept in the buffer
        (``service.spool``) and answered ``buffered``; the drain stores and applies it,
        through :meth:`_store`, when the database is back."""
        for key in ("cost_usd", "latency_ms"):
            if outcome.get(key) is not None:
                check_finite_number(key, outcome[key], low=0.0)
        event = event_id or ""
        spool = self.spool
        if spool is not None and (spool.depth() or self.degraded_since is not None):
            # Feedback already waits in the buffer: queue behind it, so that feedback is
            # stored and applied in the order it was accepted. Degraded (started from
            # the local state): the policies are not the database's yet; the drain
            # applies it after the reload.
            return self._buffer(tenant, decision_id, event, outcome)
        if self.degraded_since is not None:
            raise UnavailableError("the service started while the database was "
                                   "unreachable and has no feedback buffer; retry later",
                                   retry_after_s=5)
        if self.writer.is_pending(decision_id) and (
                (spool is not None and self.writer.spooling())
                or not self.writer.wait_for(
                    decision_id, timeout=10.0 if spool is None else _PENDING_WAIT_S)):
            if spool is not None:
                # The writer holds (or spooled) the decision: the database is away or far
                # behind; the drain waits for it to be written.
                return self._buffer(tenant, decision_id, event, outcome)
            raise UnavailableError("the decision is not written yet; retry",
                                   retry_after_s=1)
        received = m.utcnow()
        try:
            return self._store(tenant, decision_id, event, outcome, received)
        except (OperationalError, InterfaceError) as exc:
            if spool is None:
                raise  # 503 + Retry-After (service.errors)
            log.warning("storing feedback for decision %s failed (%s: the database is "
                        "unreachable); buffering it", decision_id, type(exc).__name__)
            # Same received time: if the commit did land, the drain recognizes the row.
            return self._buffer(tenant, decision_id, event, outcome, received)

    def _store(self, tenant: TenantState, decision_id: str, event: str,
               outcome: dict[str, float | None], received: datetime) -> FeedbackResult:
        """Store one feedback and apply it (:meth:`_store_many`); raises 404 for an
        unknown decision or another tenant's, and the database's errors."""
        result = self._store_many([_Incoming(tenant, decision_id, event, outcome,
                                             received)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _store_many(self, items: Sequence[_Incoming]
                    ) -> list[FeedbackResult | Exception]:
        """Store feedback rows (and their decisions' reconciled charges) in one
        transaction, then apply them in order: the one path of direct feedback (one
        item) and of the buffer's drain (a batch). Per item: ``applied``, ``duplicate``
        (that (decision_id, event_id) is stored already), a NotFoundError (unknown decision
        or another tenant's: nothing stored, nothing applied), or the exception that
        applying it raised. Raises the database's errors (then nothing of the batch is
        known to be stored)."""
        results: list[FeedbackResult | Exception | None] = [None] * len(items)
        # (index, feedback id, model, context, cost delta, decided at)
        rows: list[tuple[int, int, str, bytes, float, float]] = []
        prices: dict[int, float | None] = {}  # item -> its decision's price estimate
        # index -> what the tenant's guard learns once the feedback is committed
        guard_learn: dict[int, tuple[ConservativeGuard, GuardRecord, float, float | None]] = {}
        one_by_one = False
        with self._feedback_lock:
            with Session(self.engine) as session:
                ids = sorted({it.decision_id for it in items})
                decisions = {d.id: d for d in session.scalars(
                    select(m.Decision).where(m.Decision.id.in_(ids)))}
                stored = {(d, e): (int(i), m.as_utc(at)) for d, e, i, at in session.execute(
                    select(m.Feedback.decision_id, m.Feedback.event_id, m.Feedback.id,
                           m.Feedback.created_at).where(m.Feedback.decision_id.in_(ids)))}
                new: list[tuple[int, m.Feedback, m.Decision, float]] = []
                for i, it in enumerate(items):
                    decision = decisions.get(it.decision_id)
                    if decision is None or decision.tenant_id != it.tenant.id:
                        results[i] = NotFoundError(f"decision {it.decision_id} does not "
                                                   "exist", slug="decision-not-found")
                        continue
                    key = (it.decision_id, it.event)
                    prices[i] = _price_estimate(decision.model, decision.predictions)
                    uncertain = self._uncertain.pop((it.tenant.id, *key), None)
                    if key in stored:
                        fid, at = stored[key]
                        if uncertain is not None and at == it.received:
                            # Ours: its commit was sent but its outcome never came back
                            # (the connection died), so it was stored and not applied.
                            rows.append((i, fid, decision.model, decision.context,
                                         uncertain[0], uncertain[1]))
                        else:
                            results[i] = FeedbackResult("duplicate", fid)
                        continue
                    prices[i] = _price_estimate(decision.model, decision.predictions)
                    stored[key] = (0, it.received)  # a repeat later in this batch
                    fb = m.Feedback(decision_id=it.decision_id, tenant_id=it.tenant.id,
                                    event_id=it.event, quality=it.outcome.get("quality"),
                                    cost_usd=it.outcome.get("cost_usd"),
                                    latency_ms=it.outcome.get("latency_ms"),
                                    created_at=it.received)
                    session.add(fb)
                    delta = 0.0
                    if it.outcome.get("cost_usd") is not None:
                        delta = float(it.outcome["cost_usd"]) - decision.charged_usd
                        decision.charged_usd = float(it.outcome["cost_usd"])
                    new.append((i, fb, decision, delta))
                    learned = self._guard_outcome(it.tenant, decision, it.outcome)
                    if learned is not None:
                        guard_learn[i] = learned
                if new:
                    try:
                        session.flush()
                        batch = [(i, int(fb.id), d.model, d.context, delta,
                                  _ts(d.created_at)) for i, fb, d, delta in new]
                    except IntegrityError:
                        session.rollback()
                        one_by_one = True
                    else:
                        try:
                            session.commit()
                        except IntegrityError:
                            # Another process stored one of them first.
                            session.rollback()
                            one_by_one = True
                        except (OperationalError, InterfaceError):
                            # Maybe committed, maybe not: remember what applying them
                            # would take; the retry recognizes them by their time.
                            for i, _fid, _model, _ctx, delta, decided_at in batch:
                                it = items[i]
                                self._uncertain[(it.tenant.id, it.decision_id,
                                                 it.event)] = (delta, decided_at)
                            raise
                        else:
                            rows.extend(batch)
            if not one_by_one:
                rows.sort()  # item order (a recovered row may come first)
                for i, fid, model, context, _delta, decided_at in rows:
                    it = items[i]
                    try:
                        self._apply(it.tenant.id, model,
                                    np.frombuffer(context, dtype=np.float64), it.outcome,
                                    decided_at, prices.get(i))
                    except Exception as exc:  # noqa: BLE001 - reported per item
                        results[i] = exc
                    else:
                        results[i] = FeedbackResult("applied", fid)
                    learned = guard_learn.get(i)
                    if learned is not None:
                        guard, record, reward, previous = learned
                        with self._lock:
                            guard.observe(it.tenant.guard_state, record, reward, previous)
                    self.last_feedback_id = max(self.last_feedback_id, fid)
        if one_by_one:
            return [self._store_many([it])[0] for it in items] if len(items) > 1 else [
                self._count_duplicate(FeedbackResult("duplicate", None))]
        for i, _fid, _model, _context, delta, decided_at in rows:
            it = items[i]
            if delta:
                it.tenant.ledger.adjust(delta, decided_at)
            if not isinstance(results[i], FeedbackResult):
                continue
            self.metrics.feedback.labels("applied").inc()
            if it.outcome.get("cost_usd"):
                self.metrics.spend_reported.labels(it.tenant.id).inc(
                    float(it.outcome["cost_usd"]))
            self.metrics.reward.labels(it.tenant.id).inc(it.tenant.preferences.reward(
                **{k: v for k, v in it.outcome.items() if v is not None}))
        for result in results:
            if isinstance(result, FeedbackResult) and result.status == "duplicate":
                self._count_duplicate(result)
        return results  # type: ignore[return-value]

    def _count_duplicate(self, result: FeedbackResult) -> FeedbackResult:
        self.metrics.feedback.labels("duplicate").inc()
        return result

    # ---------------------------------------------------------- feedback buffer
    def _buffer(self, tenant: TenantState, decision_id: str, event: str,
                outcome: dict[str, float | None],
                received: datetime | None = None) -> FeedbackResult:
        """Keep the feedback in the buffer (committed to disk before the answer)."""
        assert self.spool is not None
        result = self.spool.add(tenant.id, decision_id, event, outcome,
                                (received or m.utcnow()).isoformat())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self.metrics.feedback_buffer.labels(result).inc()
        if result == "full":
            raise UnavailableError(f"the database is unavailable and the feedback buffer "
                                   f"is full ({self.spool.capacity} events); nothing was "
                                   "stored, retry later", retry_after_s=5)
        self.metrics.feedback.labels(result).inc()
        self._drain_wake.set()
        return FeedbackResult(result, None)

    def feedback_buffered(self) -> int:
        """Feedback events accepted and not yet stored in the database."""
        return self.spool.depth() if self.spool is not None else 0

    def _start_feedback_buffer(self) -> None:
        s = self.settings
        if s.feedback_buffer_size <= 0 or s.kafka_bootstrap:
            return  # no buffer, or distributed mode (feedback goes to Kafka)
        directory = s.feedback_buffer_dir if s.feedback_buffer_dir is not None else s.data_dir
        self.spool = FeedbackSpool(spool_path(directory, s.resolved_database_url()),
                                   s.feedback_buffer_size)
        if self.spool.depth():
            log.warning("%d feedback events buffered by a previous run; storing them",
                        self.spool.depth())
        self.metrics.feedback_buffer_depth.set(self.spool.depth())
        self._drain_stop.clear()
        self._drain_thread = threading.Thread(target=self._drain_loop,
                                              name="feedback-drain", daemon=True)
        self._drain_thread.start()

    def _stop_feedback_buffer(self) -> None:
        if self._drain_thread is not None:
            self._drain_stop.set()
            self._drain_wake.set()
            self._drain_thread.join(30)
            self._drain_thread = None

    def _close_feedback_buffer(self) -> None:
        """After the writer stopped: a last drain (the database may be back), then close
        the file (removed when empty; otherwise the next start drains it)."""
        if self.spool is None:
            return
        if self.spool.depth():
            try:
                self.drain_feedback(deadline=time.monotonic() + 10.0)
            except Exception as exc:  # noqa: BLE001 - the rows stay on disk
                log.warning("final feedback drain failed (%s); %d events stay buffered",
                            type(exc).__name__, self.spool.depth())
        self.spool.close()

    def _drain_loop(self) -> None:
        delay = 0.25
        while not self._drain_stop.is_set():
            try:
                empty = self.drain_feedback()
                delay = 0.25
            except (OperationalError, InterfaceError) as exc:
                log.warning("feedback buffer: %d events wait, the database is still "
                            "unreachable (%s); retrying in %.2fs", self.feedback_buffered(),
                            type(exc).__name__, delay)
                self._wait_for_database(delay)
                delay = min(delay * 2, self.settings.outage_retry_s)
                continue
            except Exception:
                log.exception("draining the feedback buffer failed; retrying")
                self._drain_stop.wait(delay)
                delay = min(delay * 2, self.settings.outage_retry_s)
                continue
            if empty:
                self._drain_wake.wait(1.0)
                self._drain_wake.clear()
            else:  # waiting for a decision the writer still holds
                self._drain_stop.wait(0.1)

    def drain_feedback(self, deadline: float | None = None) -> bool:
        """Store and apply buffered feedback, oldest first, a batch per transaction;
        True once the buffer is empty.

        Stops (False) at feedback whose decision the writer still holds (it waits for
        it), at the deadline or when the drain is stopping; raises the database's
        connection errors (the batch stays buffered)."""
        spool = self.spool
        if spool is None:
            return True
        if self.degraded_since is not None:
            return False  # after the reload from the database (_reload_loop)
        started, drained = time.perf_counter(), 0
        while spool.depth():
            if (self._drain_stop.is_set() and deadline is None) or (
                    deadline is not None and time.monotonic() > deadline):
                return False
            batch: list[SpooledFeedback] = []
            blocked = False
            for item in spool.head(_DRAIN_BATCH):
                if self.writer.is_pending(item.decision_id) and not self.writer.wait_for(
                        item.decision_id, timeout=_PENDING_WAIT_S):
                    blocked = True  # its decision first; the ones before it now
                    break
                batch.append(item)
            if batch:
                self._drain_batch(batch)
                spool.remove_through(batch[-1].seq)
                self.metrics.feedback_buffer_depth.set(spool.depth())
                drained += len(batch)
            if blocked:
                return False
        if drained:
            log.warning("feedback buffer empty: %d events stored in %.2f s", drained,
                        time.perf_counter() - started)
        return True

    def _drain_batch(self, batch: list[SpooledFeedback]) -> None:
        def drop(item: SpooledFeedback, reason: str) -> None:
            self.metrics.feedback_buffer.labels("dropped").inc()
            log.warning("buffered feedback dropped: %s (decision %s, event %r, tenant %s)",
                        reason, item.decision_id, item.event_id, item.tenant_id)

        known: list[tuple[SpooledFeedback, _Incoming]] = []
        for item in batch:
            tenant = self.tenants.get(item.tenant_id)
            if tenant is None:
                drop(item, "the tenant does not exist")
                continue
            known.append((item, _Incoming(tenant, item.decision_id, item.event_id,
                                          item.outcome,
                                          datetime.fromisoformat(item.received_at))))
        if not known:
            return
        try:
            results = self._store_many([incoming for _, incoming in known])
        except (OperationalError, InterfaceError):
            raise  # the database is away: the batch stays buffered
        except DBAPIError:
            if len(known) == 1:
                # Refused by the database (not an outage): logged, not retried forever
                # (it would block every event behind it).
                log.exception("buffered feedback for decision %s refused by the database",
                              known[0][0].decision_id)
                self.metrics.feedback_buffer.labels("dropped").inc()
                return
            for item, _ in known:  # find the one refused
                self._drain_batch([item])
            return
        for (item, _), result in zip(known, results, strict=True):
            if isinstance(result, NotFoundError):
                # Unknown decision, or another tenant's: nothing stored or applied.
                drop(item, "the decision does not exist or is another tenant's")
            elif isinstance(result, Exception):
                self.metrics.feedback_buffer.labels("dropped").inc()
                log.error("buffered feedback for decision %s stored but not applied",
                          item.decision_id, exc_info=result)
            else:
                self.metrics.feedback_buffer.labels(
                    "drained" if result.status == "applied" else "duplicate").inc()

    def _apply(self, tenant_id: str, model: str, x: np.ndarray,
               outcome: dict[str, float | None], decided_at: float,
               cost_estimate: float | None = None) -> None:
        """Learn one feedback in the shared policies and the tenant's isolated ones: the
        one rule of live application, replay and rebuild.

        ``decided_at`` is its decision's ``created_at`` (seconds). With forgetting the
        feedback weighs ``0.5 ** ((t_ref - decided_at) / half-life)``: its decision's age,
        not its arrival's, as in distributed mode's learners (docs/streams.md,
        "Forgetting (half-life) by event time"). Each event weighs by its own age at the
        reference time, so late feedback about an old decision counts as old and the sums
        do not depend on arrival order; a replay that applies the same rows in the same
        order after a checkpoint (which keeps the reference time) repeats the same
        operations. ``update(..., time=)`` applies that weight as a rank-one update
        (``update_batch(times=)`` would refresh the arm's inverse exactly, about 6x the
        time: benchmarks/feedback_forgetting.py); without forgetting it is a plain update.

        ``cost_estimate`` is the price estimate the decision used for this model (stored
        in its predictions): with a reported cost it teaches the model's price
        correction, live, in a replay after a restart and in a rebuild alike.
        """
        with self._lock:
            targets = list(self.shared.values()) + list(self.isolated.get(tenant_id,
                                                                          {}).values())
            for policy in targets:
                if model in policy.arms:  # a deleted model learns nothing more
                    policy.update(model, x, outcome, time=decided_at,
                                  cost_estimate=cost_estimate)

    # ================================================================ decisions
    def _tenant_decision(self, session: Session, tenant: TenantState,
                         decision_id: str) -> m.Decision:
        """The tenant's decision (waiting for it if the writer still holds it); another
        tenant's is a 404 exactly like a decision that does not exist."""
        if self.writer.is_pending(decision_id):
            self.writer.wait_for(decision_id)
        decision = session.get(m.Decision, decision_id)
        if decision is None or decision.tenant_id != tenant.id:
            raise NotFoundError(f"decision {decision_id} does not exist",
                                slug="decision-not-found")
        return decision

    def get_decision(self, tenant: TenantState, decision_id: str) -> dict[str, Any]:
        """One of the tenant's decisions with its feedback; another tenant's is a 404
        exactly like a decision that does not exist."""
        with Session(self.engine) as session:
            decision = self._tenant_decision(session, tenant, decision_id)
            feedback = session.scalars(select(m.Feedback)
                                       .where(m.Feedback.decision_id == decision_id)
                                       .order_by(m.Feedback.id)).all()
            return {
                "decision_id": decision.id, "model": decision.model,
                "propensity": decision.propensity, "policy": decision.policy,
                "policy_version": int(decision.policy_version), "scope": decision.scope,
                "predictions": decision.predictions,
                "predicted_cost_usd": decision.predicted_cost_usd,
                "charged_usd": decision.charged_usd, "over_budget": decision.over_budget,
                "tags": decision.tags,
                "created_at": m.as_utc(decision.created_at),
                "feedback": [{"event_id": f.event_id or None, "quality": f.quality,
                              "cost_usd": f.cost_usd, "latency_ms": f.latency_ms,
                              "received_at": m.as_utc(f.created_at)} for f in feedback],
            }

    def price_tokens(self, tenant: TenantState, decision_id: str, input_tokens: int,
                     output_tokens: int) -> float:
        """USD cost of a decision's call from its token counts and the registry's prices
        of the model it chose (feedback that reports tokens instead of ``cost_usd``).
        404 for an unknown decision or another tenant's; a model since removed from the
        registry cannot be priced (422: send ``cost_usd``)."""
        with Session(self.engine) as session:
            name = self._tenant_decision(session, tenant, decision_id).model
        model = self.models.get(name)
        if model is None:
            raise InvalidInputError("cost_usd", "is needed: the decision's model is no "
                                    "longer registered, so its tokens cannot be priced",
                                    name)
        return request_cost(model.input_price_per_mtok, model.output_price_per_mtok,
                            input_tokens, output_tokens)

    # ==================================================================== usage
    def usage(self, tenant: TenantState) -> dict[str, Any]:
        self.writer.flush(timeout=5.0)
        _now, day0, month0 = _periods()
        with Session(self.engine) as session:
            per_model = dict(session.execute(
                select(m.Decision.model, func.count())
                .where(m.Decision.tenant_id == tenant.id, m.Decision.created_at >= month0)
                .group_by(m.Decision.model)).all())
            today = session.scalar(select(func.count()).select_from(m.Decision).where(
                m.Decision.tenant_id == tenant.id, m.Decision.created_at >= day0)) or 0
        total = sum(per_model.values())
        day, month = tenant.ledger.snapshot()
        return {"tenant_id": tenant.id, "spend_usd_today": day, "spend_usd_month": month,
                "budget_usd_per_day": tenant.budget_usd_per_day,
                "budget_usd_per_month": tenant.budget_usd_per_month,
                "decisions_today": int(today), "decisions_month": int(total),
                "model_share_month": {k: v / total for k, v in sorted(per_model.items())}}

