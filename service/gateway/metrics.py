"""The gateway's instruments on ``/metrics`` (in the app's registry, beside the service's).

* ``bandit_router_gateway_upstream_latency_seconds{model}``: the forwarded call, from
  sending the request to the upstream's last byte (a stream: its end);
* ``bandit_router_gateway_ttft_seconds{model}``: a stream's time to its first chunk;
* ``bandit_router_gateway_upstream_errors_total{model,kind}``: failed calls by kind
  (``upstream_timeout``, ``upstream_unreachable``, ``upstream_rate_limited``,
  ``upstream_error``), mid-stream failures included;
* ``bandit_router_gateway_fallbacks_total{model}``: calls that failed and were retried
  on another model (the tenant's ``fallback_attempts``), by the model that failed;
* ``bandit_router_gateway_outcomes_queued``: outcomes answered and not yet stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GatewayMetrics"]

# From a local model's milliseconds to a long generation's minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, queued: Callable[[], int]) -> None:
        self.upstream_latency = Histogram(
            "bandit_router_gateway_upstream_latency_seconds", "Forwarded call, request "
            "sent to the upstream's last byte", ["model"], buckets=_BUCKETS,
            registry=registry)
        self.ttft = Histogram(
            "bandit_router_gateway_ttft_seconds", "Stream's time to its first chunk",
            ["model"], buckets=_BUCKETS, registry=registry)
        self.upstream_errors = Counter(
            "bandit_router_gateway_upstream_errors", "Failed forwarded calls by kind",
            ["model", "kind"], registry=registry)
        self.fallbacks = Counter(
            "bandit_router_gateway_fallbacks", "Failed calls retried on another model, "
            "by the model that failed", ["model"], registry=registry)
        self.outcomes_queued = Gauge(
            "bandit_router_gateway_outcomes_queued", "Outcomes of forwarded calls "
            "answered and not yet stored", registry=registry)
        self.outcomes_queued.set_function(queued)
        # Each label set's child, looked up once (labels() costs more than observe()).
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, family: Any, *labels: str) -> Any:
        key = (family, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def latency_of(self, model: str) -> Any:
        """``upstream_latency``'s child of ``model``."""
        return self._child(self.upstream_latency, model)

    def ttft_of(self, model: str) -> Any:
        """``ttft``'s child of ``model``."""
        return self._child(self.ttft, model)

    def errors_of(self, model: str, kind: str) -> Any:
        """``upstream_errors``' child of ``model`` and ``kind``."""
        return self._child(self.upstream_errors, model, kind)

    def fallbacks_of(self, model: str) -> Any:
        """``fallbacks``' child of ``model``."""
        return self._child(self.fallbacks, model)
