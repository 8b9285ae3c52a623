"""The routing service: the components of the routing core, plugged together.

One :class:`RoutingService` per app (``app.state.routing``); the routes call it. It holds
no state of its own: each part is a module with one responsibility, and the arrows point
one way (``service/`` has no import circle; tests/service/test_layout.py checks)::

    registry (models, tenants, admin keys) --publishes changes to--> policy store, guards
    policy store (policies; apply, install) <--applied outcomes-- feedback sink
    decider (candidates, decide, reserve) reads registry + policy store + guards + ledgers
    spending (ledgers' sync, usage) reads registry + writer
    statistics source restores / saves the policy store (checkpoints, or the learners')

Embedded and distributed mode differ only by the components they plug in
(:class:`service.components.Components`): the **feedback sink**
(:class:`service.ingest.FeedbackIngest`, store then apply; or distributed mode's Kafka
producer), the **statistics source** (:class:`service.checkpoints.Checkpoints`; or the
learners' statistics followed from PostgreSQL), embedded mode's **local copy** (a start
while the database is unreachable) and distributed mode's decisions topic.

Locks: the state lock (``registry.lock`` = ``policies.lock``) guards the registry's caches,
the policies and the guards' accounts, and is held only for in-memory work
(microseconds), never across I/O. ``policies.apply_lock`` serializes store-then-apply of
feedback and checkpoints; it is taken before the state lock.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from bandit import InvalidInputError, Policy, Preferences
from bandit.base import check_finite_number
from bandit.featurize import TAG_BLOCK_SPEC, TAGS_SPEC
from service.budget import Ledger
from service.components import Components, build_core
from service.config import Settings
from service.db.engine import is_at_head
from service.domain import (
    POLICY_KINDS,
    DecideArgs,
    FeedbackItem,
    FeedbackReceipt,
    ModelState,
    PendingDecision,
    TenantState,
)
from service.embedded import embedded
from service.exceptions import NotFoundError, UnavailableError
from service.metrics import Metrics
from service.quality_defaults import ROUTER_EVENTS, QualityDefaults
from service.spool import FeedbackSpool

__all__ = ["RoutingService", "TenantState", "ModelState", "PendingDecision", "DecideArgs",
           "FeedbackItem", "FeedbackReceipt", "POLICY_KINDS"]

log = logging.getLogger("service.routing")


def _check_outcome(outcome: dict[str, float | None]) -> None:
    """The checks of a feedback's outcome both modes share."""
    for key in ("cost_usd", "latency_ms"):
        if outcome.get(key) is not None:
            check_finite_number(key, outcome[key], low=0.0)


def _undo(undo: Callable[[], None], decision_id: str) -> None:
    """Release a claim whose feedback the sink refused; after a database error (away, or
    refusing) it stays (the safe side: a retry of the same event finds it its own)."""
    try:
        undo()
    except DBAPIError as exc:  # the sink's 503 (or 404/422) is the answer, not a 500
        log.warning("the quality claim of decision %s not released (%s)", decision_id,
                    type(exc).__name__)


def _submitted(sink: Any, item: FeedbackItem) -> FeedbackReceipt | Exception:
    try:
        return sink.submit(*item)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - returned per item, as submit_many does
        return exc


class RoutingService:
    """The façade the routes call; ``kafka_bootstrap`` set: distributed mode."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics) -> None:
        core = build_core(settings, engine, metrics)
        self.settings, self.engine, self.metrics = settings, engine, metrics
        self.contexts, self.registry, self.history = core.contexts, core.registry, core.history
        self.policies, self.guards, self.writer = core.policies, core.guards, core.writer
        self.spending, self.decider, self.leases = core.spending, core.decider, core.leases
        self.context_dim = core.contexts.dim
        self.prototype_map = core.contexts.prototype_map
        if settings.kafka_bootstrap:
            # Imported here so that the embedded default never loads the Kafka client.
            from service.distributed import distributed

            components: Components = distributed(core)
        else:
            components = embedded(core)
        self.sink, self.statistics = components.sink, components.statistics
        self.local = components.local
        core.decider.on_queued = components.on_queued
        #: Set by the app: applies the migrations (retried by the reload after a
        #: degraded start).
        self.migrate: Any = None
        self._reload_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: Set by the gateway: a client's quality replaces a call's default quality
        #: (service/quality_defaults.py). None: no defaults to claim.
        self.quality_defaults: QualityDefaults | None = None

    # ================================================================= start / stop
    def start(self) -> str | None:
        """Load everything from the database; returns a newly generated admin key, if any.

        Embedded mode, database unreachable: start from the local copy (the newest
        checkpoint this replica saw, its registry), degraded, and reload from the
        database once it answers (issue 14)."""
        # Load the featurizer now (a sentence-embedding model takes seconds), not on the
        # first text query; and before the checkpoint, which is checked against its spec.
        self.contexts.featurize("warm up")
        try:
            if self.migrate is not None:
                self.migrate()
            admin_key = self._load_from_database()
        except (OperationalError, InterfaceError) as exc:
            if self.local is None or not self.local.start_from(exc):
                raise
            admin_key = None
        else:
            if self.local is not None:
                self.local.save(self.policies.blobs())
        # The policies' first update imports river's drift detector (about 3 s here,
        # much more on a busy machine), holding the policies' lock: now, not in the
        # first feedback or in the drain after an outage (it held /readyz's "ready"
        # back by that much). A background import was no better: the drain waited
        # for it, slowed down by the requests being served meanwhile.
        importlib.import_module("river.drift")
        self.policies.warm_kernels()
        if self.leases is not None:
            self.leases.start(self._budgeted_ledgers)
        # Replicas (and learners) must agree on this; the spec names the featurizer and
        # the map's digest, so a log search shows a replica with another file.
        log.info("contexts: %s, %d dimensions; request tags: %s",
                 getattr(self.contexts.featurizer, "spec", "?"), self.context_dim,
                 TAG_BLOCK_SPEC if self.contexts.tag_dims else TAGS_SPEC)
        self.writer.start()
        self.sink.start()
        self.statistics.start()
        if self.degraded_since is not None:
            self._reload_thread = threading.Thread(target=self._reload_loop,
                                                   name="reload", daemon=True)
            self._reload_thread.start()
        return admin_key

    def _load_from_database(self) -> str | None:
        admin_key = self.registry.load()
        self.guards.load()
        save_now = self.statistics.load()
        self.spending.load()
        if save_now:
            # Record the new featurizer at once: a restart must not meet the old one.
            self.statistics.checkpoint(force=True)
        return admin_key

    def _budgeted_ledgers(self) -> list[tuple[str, Ledger]]:
        return [(t.id, t.ledger) for t in self.registry.budgeted()]

    def stop(self) -> None:
        if self.leases is not None:
            self.leases.stop()  # returns the unused slices first
        self._stopping.set()  # ends the reload loop ...
        if self.local is not None:
            self.local.database_back.set()  # ... now, not at the end of its backoff
        if self._reload_thread is not None:
            self._reload_thread.join(30)
        self.sink.stop()
        self.writer.stop()
        self.sink.close()
        if self.writer.spool is not None:
            self.writer.spool.close()
        self.statistics.stop()
        if self.local is not None:
            self.local.close()

    def _reload_loop(self) -> None:
        """After a degraded start: once the database answers and the spooled decisions
        are in it, load everything from it (the truth: the feedback stored after the
        local checkpoint is replayed) and leave degraded mode."""
        assert self.local is not None
        delay = 0.1
        while not self._stopping.is_set():
            if self.writer.spooling():
                self._stopping.wait(0.1)  # the writer retries the database meanwhile
                continue
            try:
                started = time.perf_counter()
                # alembic's upgrade costs about a second even at head: check first.
                if self.migrate is not None and not is_at_head(self.engine):
                    self.migrate()
                t1 = time.perf_counter()
                with self.policies.apply_lock:
                    self._load_from_database()
                    self.statistics.reloaded()  # checkpoint it
                    self.local.degraded_since = None
                log.warning("the database answers: reloaded from it in %.2f s (%.2f s "
                            "migrations check); degraded mode ends",
                            time.perf_counter() - started, t1 - started)
                self.local.save(self.policies.blobs())
                self.sink.wake()
                return
            except (OperationalError, InterfaceError) as exc:
                log.info("reload: the database is still unreachable (%s)",
                         type(exc).__name__)
            except Exception:
                log.exception("reload from the database failed; retrying")
            self.local.wait_for_database(delay)
            delay = min(delay * 2, self.settings.outage_retry_s)

    def database_answers(self) -> None:
        """Called by ``/readyz`` when it reached the database while something waits for
        it: the spool, the feedback buffer and the reload retry at once instead of at the
        end of their backoff."""
        self.writer.retry_now()
        if self.local is not None:
            self.local.database_back.set()

    def checkpoint(self, *, force: bool = False) -> bool:
        """Save the policies (embedded mode; distributed: the learners' statistics in
        PostgreSQL are the state, nothing to save)."""
        return self.statistics.checkpoint(force=force)

    def refresh_registry(self) -> None:
        """Pick up models and tenants changed through another replica (same database).

        Run periodically by the app (``registry_refresh_s``), which also brings the
        budgeted tenants' spend up to date with every replica's (:meth:`sync_spend`),
        and keeps the registry in the local copy (a degraded start's).
        """
        if self.degraded_since is not None:
            return  # the reload (_reload_loop) brings everything
        self.registry.refresh()
        self.spending.sync()
        if self.local is not None:
            self.local.save()

    # ================================================================= the state
    @property
    def degraded_since(self) -> str | None:
        """Started from the local copy while the database was unreachable (when)."""
        return None if self.local is None else self.local.degraded_since

    @property
    def shared(self) -> dict[str, Policy]:
        return self.policies.shared

    @property
    def isolated(self) -> dict[str, dict[str, Policy]]:
        return self.policies.isolated

    @property
    def last_feedback_id(self) -> int:
        return self.policies.last_feedback_id

    @property
    def models(self) -> dict[str, ModelState]:
        return self.registry.models

    @property
    def tenants(self) -> dict[str, TenantState]:
        return self.registry.tenants

    @property
    def spool(self) -> FeedbackSpool | None:
        """Embedded mode's feedback buffer (None without one, and in distributed mode)."""
        return getattr(self.sink, "spool", None)

    # ================================================================= registry
    def tenant_for_key(self, key: str) -> TenantState | None:
        return self.registry.tenant_for_key(key)

    def is_admin_key(self, key: str) -> bool:
        return self.registry.is_admin_key(key)

    def reload_admin_keys(self) -> None:
        self.registry.reload_admin_keys()

    def list_models(self, include_deleted: bool = False) -> list[tuple[ModelState, bool]]:
        return self.registry.list_models(include_deleted)

    def get_model(self, name: str) -> ModelState:
        return self.registry.get_model(name)

    def create_model(self, name: str, input_price: float, output_price: float,
                     enabled: bool, prior_quality: float | None,
                     upstream: dict[str, str | None] | None = None) -> ModelState:
        return self.registry.create_model(name, input_price, output_price, enabled,
                                          prior_quality, upstream,
                                          late=self.policies.learning())

    def update_model(self, name: str, changes: dict[str, Any]) -> ModelState:
        return self.registry.update_model(name, changes)

    def delete_model(self, name: str) -> None:
        self.registry.delete_model(name)

    def prior_cost(self, input_price: float, output_price: float) -> float:
        return self.registry.prior_cost(input_price, output_price)

    def create_tenant(self, name: str) -> tuple[TenantState, str]:
        return self.registry.create_tenant(name)

    def update_preferences(self, tenant: TenantState, changes: dict[str, Any]) -> TenantState:
        return self.registry.update_preferences(tenant, changes)

    def usage(self, tenant: TenantState) -> dict[str, Any]:
        return self.spending.usage(tenant)

    def sync_spend(self) -> None:
        self.spending.sync()

    def guard_report(self, tenant: TenantState) -> dict[str, Any] | None:
        return self.guards.report(tenant)

    # ================================================================= decide
    def featurize(self, text: str) -> np.ndarray:
        return self.contexts.featurize(text)

    def context_from(self, text: str | None, embedding: list[float] | None,
                     tags: dict[str, str] | None = None) -> np.ndarray:
        return self.contexts.context_from(text, embedding, tags)

    def decide(self, tenant: TenantState, x: np.ndarray, candidates: list[str] | None,
               override: Preferences | None) -> PendingDecision:
        return self.decider.decide(tenant, x, candidates, override)

    def decide_many(self, requests: list[DecideArgs]) -> list[PendingDecision | Exception]:
        return self.decider.decide_many(requests)

    def enqueue(self, pending: PendingDecision) -> bool:
        return self.decider.enqueue(pending)

    def abandon(self, pending: PendingDecision) -> None:
        self.decider.abandon(pending)

    def release(self, pending: PendingDecision) -> None:
        self.decider.release(pending)

    def get_decision(self, tenant: TenantState, decision_id: str) -> dict[str, Any]:
        return self.history.get_decision(tenant, decision_id)

    def price_tokens(self, tenant: TenantState, decision_id: str, input_tokens: int,
                     output_tokens: int) -> float:
        return self.history.price_tokens(tenant, decision_id, input_tokens, output_tokens)

    # ================================================================= feedback
    def feedback(self, tenant: TenantState, decision_id: str, outcome: dict[str, float | None],
                 event_id: str | None, *, final: bool = False) -> FeedbackReceipt:
        """Hand one feedback to the sink, after the checks both modes share.

        A client's quality first claims the call's default quality, if the gateway
        reported one (:meth:`QualityDefaults.claim`: replaced, or refused with 409 when
        it would count a second quality). ``final``: the quality is a gateway's for a
        failed call (the LiteLLM plug-in's), recorded as the router's gateway records its
        own (:meth:`QualityDefaults.final`). A claim is released when the sink refuses
        the feedback with nothing stored (a refusal, or a 503 ``unsent``); after another
        error the event may have been stored (or be on the topic) with its answer lost,
        so it stays, and the caller's retry of the same event finds it its own (and
        stamps it anew, so that the first attempt's release keeps it; the retry itself
        never releases it: an earlier attempt may have been sent). A
        failure's ``final`` row written by this call goes the same way (its 0 was not
        stored: the client's rating is taken), by its stamp: a retry of the same event
        sent meanwhile stamped it anew, and it stays for that retry."""
        _check_outcome(outcome)
        defaults, undo = self.quality_defaults, None
        if final:
            quality = outcome["quality"]
            assert quality is not None  # FeedbackRequest: failed needs quality
            defaults = self._defaults(tenant, decision_id)
            replaced, stamp, took = defaults.final(tenant.id, decision_id, quality, event_id)
            if replaced:
                # The client's came first: the failure's is not stored.
                outcome = {**outcome, "quality": None}
                if all(v is None for v in outcome.values()):
                    return FeedbackReceipt("duplicate", event_id)
            elif stamp is not None:
                undo = partial(defaults.unfinal, decision_id, stamp, took)
        elif (defaults is not None and outcome.get("quality") is not None
                and event_id not in ROUTER_EVENTS):
            claim = defaults.claim(tenant.id, decision_id, event_id or "")
            if claim is not None and claim.stamp is not None:
                undo = partial(defaults.release, claim)
        try:
            return self.sink.submit(tenant, decision_id, outcome, event_id)
        except (NotFoundError, InvalidInputError, UnavailableError) as exc:
            if undo is not None and (not isinstance(exc, UnavailableError) or exc.unsent):
                _undo(undo, decision_id)
            raise

    def _defaults(self, tenant: TenantState, decision_id: str) -> QualityDefaults:
        """The gateway's quality defaults, after the decision is checked (404 for an
        unknown decision or another tenant's, as the sink answers)."""
        if self.quality_defaults is None:
            raise UnavailableError("default qualities need the gateway's state, which is "
                                   "not started", retry_after_s=5)
        self.history.check_decision(tenant, decision_id)
        return self.quality_defaults

    def provisional_quality(self, tenant: TenantState, decision_id: str,
                            quality: float) -> None:
        """A client's ``default_quality`` for a call (:meth:`QualityDefaults.provisional`);
        404 for an unknown decision or another tenant's, as the sink answers."""
        self._defaults(tenant, decision_id).provisional(tenant.id, decision_id, quality)

    def feedback_many(self, items: list[FeedbackItem]) -> list[FeedbackReceipt | Exception]:
        """:meth:`feedback` for a batch (the gateway's outcomes); per item its receipt or
        the error :meth:`feedback` would raise. A sink with ``submit_many`` (embedded
        mode's) stores the batch in one transaction; another gets the items one by one."""
        out: list[FeedbackReceipt | Exception | None] = [None] * len(items)
        valid: list[int] = []
        for i, item in enumerate(items):
            try:
                _check_outcome(item.outcome)
                valid.append(i)
            except InvalidInputError as err:
                out[i] = err
        batch = [items[i] for i in valid]
        submit_many = getattr(self.sink, "submit_many", None)
        results = submit_many(batch) if submit_many is not None else [
            _submitted(self.sink, item) for item in batch]
        for i, result in zip(valid, results, strict=True):
            out[i] = result
        return [r for r in out if r is not None]

    def feedback_buffered(self) -> int:
        """Feedback events accepted and not yet stored in the database."""
        return self.sink.buffered()

    # ================================================================= health
    def outage_serving(self) -> str:
        """What callers get while the database is unreachable (for ``/readyz``)."""
        return self.sink.outage_serving()

    def degraded(self) -> dict[str, str]:
        """Parts other than the database that are away, for ``/readyz``: part -> what
        callers get meanwhile."""
        out: dict[str, str] = {}
        if self.degraded_since is not None:
            out["start"] = ("started while the database was unreachable: serving from the "
                            f"local checkpoint of {self.degraded_since}, reloading")
        return {**out, **self.sink.degraded(), **self.statistics.degraded()}

    def export_gauges(self) -> None:
        """Set the gauges read at scrape time (spend per tenant, writer queue depth,
        feedback buffer depth, guards)."""
        self.metrics.queue_depth.set(self.writer.depth())
        self.metrics.feedback_buffer_depth.set(self.feedback_buffered())
        for tenant in list(self.tenants.values()):
            day, month = tenant.ledger.snapshot()
            self.metrics.spend.labels(tenant.id, "day").set(day)
            self.metrics.spend.labels(tenant.id, "month").set(month)
            report = self.guards.report(tenant)
            if report is not None:
                self.metrics.value_vs_baseline.labels(tenant.id).set(
                    report["value_vs_baseline"])
                self.metrics.guard_gap.labels(tenant.id, "lower_bound").set(
                    report["lower_bound_gap"])
                self.metrics.guard_gap.labels(tenant.id, "allowed").set(-report["allowance"])
