"""The policy store: the policies in memory and the one rule that teaches them.

One shared policy per kind (``linucb``, ``thompson``, ``select``), learning from every
tenant's feedback, and one of each per ``isolated`` tenant, learning from its own;
feedback updates every kind so that switching kind is instant. The store listens to the registry
(:class:`~service.registry.RegistryListener`): a model added or removed there is an arm
added or removed here, a tenant turning isolated gets its pair rebuilt from its own
feedback history. Where the statistics come from is plugged in by the composition: the
embedded mode's feedback ingest hands each applied outcome to :meth:`PolicyStore.apply`
(and :mod:`service.checkpoints` saves and restores the store); distributed mode installs
the learners' sums with :meth:`PolicyStore.install`.

Locks: ``lock`` (the state lock, shared with the registry's caches) guards the policies
and is held for in-memory work only. ``apply_lock`` serializes store-then-apply of
feedback and the copy a checkpoint takes, so that ``last_feedback_id`` is exactly the
set of feedback rows the statistics include. Order: ``apply_lock`` before ``lock``.
"""

from __future__ import annotations

import threading

import numpy as np

from bandit import Policy, PriceList
from service.config import Settings
from service.domain import (
    POLICY_CLASSES,
    POLICY_KINDS,
    ModelState,
    TenantState,
    price_estimate,
    stored_outcome,
    timestamp,
)
from service.features import Contexts, ContextSettingsError
from service.history import DecisionLog
from service.registry import Registry

__all__ = ["PolicyStore"]


class PolicyStore:
    def __init__(self, settings: Settings, registry: Registry, history: DecisionLog,
                 contexts: Contexts) -> None:
        self.settings = settings
        self.registry = registry
        self.history = history
        self.contexts = contexts
        self.lock = registry.lock
        self.apply_lock = threading.Lock()
        self.shared: dict[str, Policy] = {}
        self.isolated: dict[str, dict[str, Policy]] = {}
        #: The id of the last feedback row the statistics include (embedded mode).
        self.last_feedback_id = 0
        registry.subscribe(self)

    # ------------------------------------------------------------------ building
    def new_policy(self, kind: str) -> Policy:
        """A policy of ``kind`` with the settings' parameters and the registry's arms."""
        policy = self._empty_policy(kind, self.settings.policy_seed)
        for model in self.registry.models.values():
            policy.add_arm(model.name, self.registry.prior(model), late=model.added_late)
        return policy

    def _empty_policy(self, kind: str, seed: int) -> Policy:
        cls = POLICY_CLASSES[kind]
        return cls(self.contexts.dim, seed=seed, **self.settings.policy_settings(cls),
                   **self.contexts.tag_settings())

    def warm_kernels(self) -> None:
        """Compile (or load from numba's cache) what the hot path calls, at start rather
        than in the first requests: a throwaway policy of each kind, this process's
        settings and dim, two arms, learns one outcome each, then decides one context
        and a batch of two with a price estimate, as the decider calls it. On a fresh
        install the first decide otherwise waited ~3 s and the first feedback ~6.5 s
        (docs/operations.md); with the cache filled this takes milliseconds.
        The store's own policies are not touched (a decide draws from their seeds)."""
        arms = ["warm-a", "warm-b"]
        prices = PriceList(arms, [1.0, 2.0], [1.0, 2.0], 100.0)
        x = np.full((2, self.contexts.dim), self.contexts.dim ** -0.5)
        # Feedback learns from contexts read back from their stored bytes (read-only
        # arrays: another compiled signature) or still in memory.
        contexts = [x[0], np.frombuffer(x[0].tobytes())]
        for kind in POLICY_KINDS:
            policy = self._empty_policy(kind, 0)
            for arm, context in zip(arms, contexts, strict=True):
                policy.add_arm(arm)
                policy.update(arm, context, {"quality": 0.5, "cost_usd": 0.001,
                                             "latency_ms": 100.0})
            policy.decide_batch(x[:1], cost_estimate=prices.estimate([10.0]))
            policy.decide_batch(x, cost_estimate=prices.estimate([10.0, 20.0]))

    def sync_arms(self, policy: Policy) -> None:
        """Make a restored policy's arms match the registry (added / deleted models)."""
        models = self.registry.models
        for name in policy.arms:
            if name not in models:
                policy.remove_arm(name)
        for model in models.values():
            if model.name not in policy.arms:
                policy.add_arm(model.name, self.registry.prior(model), late=model.added_late)

    def all_policies(self) -> dict[str, Policy]:
        """Every policy by its checkpoint key (``shared:<kind>``,
        ``tenant:<id>:<kind>``)."""
        out = {f"shared:{k}": p for k, p in self.shared.items()}
        for tenant_id, pair in self.isolated.items():
            out.update({f"tenant:{tenant_id}:{k}": p for k, p in pair.items()})
        return out

    def learning(self) -> bool:
        """Whether any policy has a quality observation: a model registered now is added
        late, as the library's ``add_arm`` decides (distributed mode: the snapshots carry
        the learners' sums)."""
        with self.lock:
            return any(p.observations(arm)["quality"] > 0
                       for p in self.all_policies().values() for arm in p.arms)

    def versions(self) -> tuple[int, ...]:
        return tuple(p.version for _, p in sorted(self.all_policies().items()))

    def blobs(self) -> dict[str, bytes]:
        """Every policy serialized (under the state lock)."""
        with self.lock:
            return {key: p.to_bytes() for key, p in self.all_policies().items()}

    def policy_for(self, tenant: TenantState) -> Policy:
        """The policy deciding for ``tenant`` (call with ``lock`` held)."""
        if tenant.scope == "isolated":
            return self.isolated[tenant.id][tenant.policy]
        return self.shared[tenant.policy]

    def restore(self, snapshots: dict[str, bytes], *, rebuild: bool,
                fresh: bool = False) -> None:
        """Policies from a checkpoint's snapshots; an isolated tenant without any is
        rebuilt from its feedback up to the checkpoint (``rebuild``, needs the database)
        or starts from the priors (also when ``fresh``: the statistics were set aside).
        A kind the checkpoint lacks beside others of its scope starts from their sums."""

        def restored(key: str, kind: str) -> Policy:
            data = snapshots.get(key)
            if data is None:
                # A kind this checkpoint lacks (written before the kind existed: an
                # upgrade) starts from a sibling's sums, which are the same (apply feeds
                # every kind), not from the priors: what was learned carries over. A
                # `select` seeded so has no prequential errors yet, so its arms start on
                # their learned means (ties go to the mean alone).
                prefix = key.removesuffix(kind)
                data = next((snapshots[prefix + k] for k in POLICY_KINDS
                             if prefix + k in snapshots), None)
            if data is None:
                return self.new_policy(kind)
            # Statistics from the checkpoint, settings from this process: a restart with
            # another BANDIT_ROUTER_EPSILON explores with the new one (and one with
            # another HALF_LIFE_HOURS forgets at the new rate from the checkpoint on).
            # The reference time comes with the statistics (the newest decision time
            # applied, see apply): the replay continues from it, as the live process did.
            settings = self.settings.policy_settings(POLICY_CLASSES[kind])
            policy = Policy.from_bytes(data, as_class=POLICY_CLASSES[kind], **settings)
            if policy.dim != self.contexts.dim:
                raise ContextSettingsError(
                    f"checkpoint {key} has dimension {policy.dim}, the settings say "
                    f"{self.contexts.dim} ({self.contexts.dim_source()}): restore the "
                    "settings it was learned with, or start on a fresh database")
            if policy.config.tag_dims != self.contexts.tag_dims:
                # Same dimension, other layout (a checkpoint without a featurizer spec):
                # the sums stay, the tag block's ridge is this process's.
                policy = Policy.from_bytes(data, as_class=POLICY_CLASSES[kind], **settings,
                                           **self.contexts.tag_settings())
            self.sync_arms(policy)
            return policy

        self.shared = {kind: restored(f"shared:{kind}", kind) for kind in POLICY_KINDS}
        self.isolated = {}
        for t in self.registry.tenants.values():
            if t.scope != "isolated":
                continue
            if not rebuild or fresh or any(f"tenant:{t.id}:{kind}" in snapshots
                                           for kind in POLICY_KINDS):
                self.isolated[t.id] = {kind: restored(f"tenant:{t.id}:{kind}", kind)
                                       for kind in POLICY_KINDS}
            else:
                # Turned isolated after the checkpoint: rebuild up to the checkpoint; the
                # replay that follows adds the rest.
                self.isolated[t.id] = self.rebuild_isolated(t.id, self.last_feedback_id)

    def install(self, shared: dict[str, Policy],
                isolated: dict[str, dict[str, Policy]]) -> None:
        """Swap in policies built elsewhere (distributed mode's snapshots), at once; a
        tenant that stopped being isolated meanwhile keeps none."""
        with self.lock:
            self.shared = shared
            for tenant_id, pair in isolated.items():
                if tenant_id in self.isolated:  # still isolated
                    self.isolated[tenant_id] = pair

    # ---------------------------------------------------------- registry events
    def model_added(self, model: ModelState) -> None:
        for policy in self.all_policies().values():
            if model.name not in policy.arms:
                policy.add_arm(model.name, self.registry.prior(model), late=model.added_late)

    def model_removed(self, name: str) -> None:
        for policy in self.all_policies().values():
            if name in policy.arms:
                policy.remove_arm(name)

    def tenant_changed(self, tenant: TenantState) -> None:
        """Create or drop a tenant's isolated policies to match its scope.

        Called without ``lock`` held (``apply_lock`` first, the lock order everywhere). A
        tenant turning isolated gets policies rebuilt from its own feedback history, so
        "isolated" means "learned from the tenant's own feedback" whenever the switch
        happened, and a restart rebuilds the same state.
        """
        if tenant.scope == "isolated" and tenant.id not in self.isolated:
            with self.apply_lock:
                pair = self.rebuild_isolated(tenant.id, self.last_feedback_id)
                with self.lock:
                    self.isolated.setdefault(tenant.id, pair)
        elif tenant.scope == "shared" and tenant.id in self.isolated:
            with self.lock:
                self.isolated.pop(tenant.id, None)

    def baseline_changed(self, tenant: TenantState) -> None:
        pass  # the policies' statistics are untouched by a guard's new account

    # ------------------------------------------------------------------ learning
    def rebuild_isolated(self, tenant_id: str, upto: int,
                         batch: int = 1000) -> dict[str, Policy]:
        """A pair of policies learned from the tenant's own feedback up to id ``upto``."""
        pair = {kind: self.new_policy(kind) for kind in POLICY_KINDS}
        after = 0
        while True:
            rows = self.history.feedback_rows(after, batch, tenant_id=tenant_id, upto=upto)
            if not rows:
                return pair
            for fb, model, context, decided_at, predictions in rows:
                x = self.contexts.stored(context, fb.id)
                estimate = price_estimate(model, predictions)
                for policy in pair.values():
                    if model in policy.arms:
                        policy.update(model, x, stored_outcome(fb), time=timestamp(decided_at),
                                      cost_estimate=estimate)
                after = int(fb.id)

    def replay(self, batch: int = 1000) -> int:
        """Apply the feedback rows written after ``last_feedback_id``, in id order (the
        order they were applied live); returns how many."""
        replayed = 0
        while True:
            rows = self.history.feedback_rows(self.last_feedback_id, batch)
            if not rows:
                return replayed
            for fb, model, context, decided_at, predictions in rows:
                self.apply(fb.tenant_id, model, self.contexts.stored(context, fb.id),
                           stored_outcome(fb), timestamp(decided_at),
                           price_estimate(model, predictions))
                self.last_feedback_id = int(fb.id)
                replayed += 1

    def apply(self, tenant_id: str, model: str, x: np.ndarray,
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
        with self.lock:
            targets = list(self.shared.values()) + list(self.isolated.get(tenant_id,
                                                                          {}).values())
            for policy in targets:
                if model in policy.arms:  # a deleted model learns nothing more
                    policy.update(model, x, outcome, time=decided_at,
                                  cost_estimate=cost_estimate)
