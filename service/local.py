"""Embedded mode's local copy (issue 14): the registry and the newest checkpoint this
replica saw, kept on local disk (:class:`service.spool.LocalState`), so that a start
while the database is unreachable serves DEGRADED from them instead of failing.

:class:`LocalCopy` owns the file, the ``degraded_since`` flag (set by a start from the
copy, cleared by the reload from the database in :mod:`service.routing`)
and the "the database answers again" signal that the parts waiting for the database
(the feedback drain, the reload) wake on.
"""

from __future__ import annotations

import logging
import threading

import orjson

from service.config import Settings
from service.db import models as m
from service.policies import PolicyStore
from service.registry import Registry
from service.spool import LocalState, buffer_dir, spool_path

__all__ = ["LocalCopy"]

log = logging.getLogger("service.local")


class LocalCopy:
    def __init__(self, settings: Settings, registry: Registry, policies: PolicyStore) -> None:
        self.registry = registry
        self.policies = policies
        self.state = LocalState(spool_path(buffer_dir(settings),
                                           settings.resolved_database_url(), "local-state"), 0)
        self._registry: bytes | None = None
        #: Started from the local copy while the database was unreachable; cleared by
        #: the reload from the database.
        self.degraded_since: str | None = None
        self.database_back = threading.Event()  # /readyz reached it: retry now

    def wait_for_database(self, delay: float) -> None:
        """Sleep ``delay`` before retrying the database, or less if /readyz found it
        answering (``RoutingService.database_answers``) or the service stops."""
        if self.database_back.wait(delay):
            self.database_back.clear()

    def save(self, blobs: dict[str, bytes] | None = None) -> None:
        """Keep the registry (when it changed) and, with ``blobs``, the policies of a
        checkpoint on local disk: what a restart during an outage serves from."""
        registry = self.registry.to_local()
        items: dict[str, bytes] = {}
        if registry != self._registry:
            items["registry"] = registry
        if blobs is not None:
            items.update({f"policy:{key}": blob for key, blob in blobs.items()})
            tenants = list(self.registry.tenants.values())
            items["checkpoint"] = orjson.dumps({
                "last_feedback_id": self.policies.last_feedback_id,
                "at": m.utcnow().isoformat(),
                "spend": {t.id: t.ledger.snapshot() for t in tenants}})
        if not items:
            return
        try:
            self.state.put(items, drop_prefix="policy:" if blobs is not None else None)
        except Exception:  # noqa: BLE001 - the database stays the record
            log.exception("writing the local state to %s failed", self.state.path)
            return
        self._registry = registry

    def start_from(self, exc: Exception) -> bool:
        """Load models, tenants and policies from the local copy; False without one."""
        state = self.state.get_all()
        if "registry" not in state or "checkpoint" not in state:
            log.error("the database is unreachable (%s) and %s holds no local state: "
                      "cannot start", type(exc).__name__, self.state.path)
            return False
        checkpoint = orjson.loads(state["checkpoint"])
        self.registry.load_local(state["registry"])
        tenants = self.registry.tenants
        if checkpoint["at"][:10] == m.utcnow().isoformat()[:10]:  # same UTC day
            for tenant_id, (day, month) in checkpoint.get("spend", {}).items():
                if tenant_id in tenants:
                    tenants[tenant_id].ledger.load(day, month)
        self.policies.last_feedback_id = int(checkpoint["last_feedback_id"])
        self.policies.restore({key.removeprefix("policy:"): blob
                               for key, blob in state.items() if key.startswith("policy:")},
                              rebuild=False)
        self._registry = state["registry"]
        self.degraded_since = checkpoint["at"]
        log.warning("the database is unreachable (%s): serving DEGRADED from the local "
                    "state in %s (checkpoint of %s, %d models, %d tenants); feedback is "
                    "buffered, decisions spooled, and everything reloads from the database "
                    "when it answers", type(exc).__name__, self.state.path,
                    checkpoint["at"], len(self.registry.models), len(tenants))
        return True

    def close(self) -> None:
        self.state.close()
