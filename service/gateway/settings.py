"""Each tenant's settings of ``POST /v1/chat/completions``, stored in ``gateway_settings``.

* ``aliases``: ``"auto:<name>"`` model names with their own preference weights and/or
  candidate models (``{"cheap": {"weights": {"quality": 1, "cost": 500}}}``);
* ``fallback_attempts``: after an upstream failure, how many more models (the next best
  of the remaining candidates, each its own decision) are tried before the error is
  answered; 0 (the default) answers the first failure;
* ``success_quality``: the quality the router reports itself for a successful call
  (and then 0 for a failed one); None (the default) reports only cost and latency
  either way, the quality coming later from ``POST /v1/feedback`` and a failure
  counting against the upstream's availability only (see
  ``service.gateway.endpoint._quality``);
* ``quality_wait_seconds`` (default 300): how long a success's ``success_quality``
  waits for the client's own quality, which replaces it (:mod:`service.quality_defaults`).

Read on every request, so cached in memory (:class:`GatewaySettingsStore`): loaded at
start, written through on a change, reloaded periodically (other replicas' changes).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit import Preferences
from service.db import models as m

__all__ = ["Alias", "TenantGateway", "GatewaySettingsStore", "DEFAULTS"]


@dataclass(frozen=True)
class Alias:
    """What ``auto:<name>`` routes with: its weights (None: the tenant's) and candidates
    (None: every model with an upstream)."""

    weights: Preferences | None = None
    candidates: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        w = self.weights
        return {"weights": None if w is None else {"quality": w.quality, "cost": w.cost,
                                                   "latency": w.latency},
                "candidates": None if self.candidates is None else list(self.candidates)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alias:
        w, c = data.get("weights"), data.get("candidates")
        return cls(None if w is None else Preferences(w["quality"], w["cost"], w["latency"]),
                   None if c is None else tuple(c))


@dataclass(frozen=True)
class TenantGateway:
    aliases: dict[str, Alias] = field(default_factory=dict)
    fallback_attempts: int = 0
    success_quality: float | None = None
    quality_wait_seconds: float = 300.0
    #: A client (the LiteLLM plug-in) posted a ``default_quality``: the tenant's later
    #: qualities are checked against defaults even without ``success_quality``.
    records_defaults: bool = False


DEFAULTS = TenantGateway()


class GatewaySettingsStore:
    """The tenants' gateway settings, cached; :meth:`get` never touches the database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._cache: dict[str, TenantGateway] = {}
        self._stamps: dict[str, datetime] = {}  # tenant -> its row's updated_at

    @staticmethod
    def _state(row: m.GatewaySettings) -> TenantGateway:
        return TenantGateway({name: Alias.from_dict(a) for name, a in (row.aliases or {}).items()},
                             int(row.fallback_attempts), row.success_quality,
                             float(row.quality_wait_seconds), bool(row.records_defaults))

    def load(self) -> None:
        """(Re)load every tenant's settings (at start and periodically)."""
        with Session(self._engine) as session:
            rows = [(r.tenant_id, self._state(r), m.as_utc(r.updated_at))
                    for r in session.scalars(select(m.GatewaySettings))]
        with self._lock:
            # Newer wins: a put committed while this load was reading is kept.
            cache, stamps = dict(self._cache), dict(self._stamps)
            for tenant_id, state, at in rows:
                if tenant_id not in stamps or at > stamps[tenant_id]:
                    cache[tenant_id], stamps[tenant_id] = state, at
            self._cache, self._stamps = cache, stamps

    def get(self, tenant_id: str) -> TenantGateway:
        return self._cache.get(tenant_id, DEFAULTS)

    def put(self, tenant_id: str, changes: dict[str, Any]) -> TenantGateway:
        """Apply ``changes`` (fields of :class:`TenantGateway`, aliases as a whole
        mapping of name to :class:`Alias`), store them, and return the new settings."""
        with self._lock, Session(self._engine) as session, session.begin():
            row = session.get(m.GatewaySettings, tenant_id)
            if row is None:
                row = m.GatewaySettings(tenant_id=tenant_id, aliases={}, fallback_attempts=0,
                                        success_quality=None,
                                        quality_wait_seconds=DEFAULTS.quality_wait_seconds,
                                        records_defaults=False)
                session.add(row)
            if "aliases" in changes:
                row.aliases = {n: a.as_dict() for n, a in changes["aliases"].items()}
            for key in ("fallback_attempts", "success_quality", "quality_wait_seconds",
                        "records_defaults"):
                if key in changes:
                    setattr(row, key, changes[key])
            row.updated_at = m.utcnow()
            session.flush()
            state = self._cache[tenant_id] = self._state(row)
            self._stamps[tenant_id] = m.as_utc(row.updated_at)
        return state
