"""Prometheus instruments, in a registry owned by one app (no global registry)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

__all__ = ["Metrics"]


class _RewardSummary:
    """A Summary (``_sum`` and ``_count`` per tenant: mean reward = rate(sum) / rate(count))
    behind the ``labels(...).inc(value)`` calls of the routing code. Not a Counter: a
    reward is negative whenever cost or latency outweigh quality, and a Counter refuses
    negative increments (the feedback answered 500 after being stored)."""

    def __init__(self, summary: Summary) -> None:
        self._summary = summary

    def labels(self, *values: str) -> SimpleNamespace:
        return SimpleNamespace(inc=self._summary.labels(*values).observe)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.decisions = Counter("bandit_router_decisions_total", "Decisions made",
                                 ["model", "tenant"], registry=self.registry)
        self.explored = Counter("bandit_router_explored_decisions_total",
                                "Decisions that were not the greedy choice", ["tenant"],
                                registry=self.registry)
        self.feedback = Counter("bandit_router_feedback_total", "Feedback events",
                                ["status"], registry=self.registry)
        self.reward = _RewardSummary(Summary(
            "bandit_router_reward", "Reward of each applied feedback under its tenant's "
            "preferences (quality points; negative when cost/latency outweigh quality)",
            ["tenant"], registry=self.registry))
        self.decide_latency = Histogram(
            "bandit_router_decide_latency_seconds", "Time to answer POST /v1/decide",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry)
        self.feedback_latency = Histogram(
            "bandit_router_feedback_latency_seconds", "Time to answer POST /v1/feedback",
            registry=self.registry)
        # A gauge (it restarts at each day / month), so not named *_total; the counter of
        # money spent is bandit_router_spend_usd_total below.
        self.spend = Gauge("bandit_router_period_spend_usd",
                           "Spend (reserved, reconciled by feedback) in the current period",
                           ["tenant", "period"], registry=self.registry)
        self.budget = Gauge("bandit_router_budget_usd", "Budget of the current period "
                            "(absent: no budget)", ["tenant", "period"], registry=self.registry)
        self.spend_reported = Counter("bandit_router_spend_usd",
                                      "Cost reported by applied feedback (exposed as "
                                      "bandit_router_spend_usd_total)", ["tenant"],
                                      registry=self.registry)
        self.rejected = Counter("bandit_router_rejected_total",
                                "Decides refused (budget or backpressure)", ["reason"],
                                registry=self.registry)
        self.queue_depth = Gauge("bandit_router_decision_queue_depth",
                                 "Decisions waiting for the writer", registry=self.registry)
        self.feedback_buffer_depth = Gauge(
            "bandit_router_feedback_buffer_depth", "Feedback accepted while the database "
            "was unreachable, not stored yet", registry=self.registry)
        self.feedback_buffer = Counter(
            "bandit_router_feedback_buffer_total", "Feedback through the outage buffer by "
            "result: buffered (accepted), full (refused, 503), and at drain stored "
            "(drained), duplicate, dropped (unknown decision, another tenant's, invalid)",
            ["result"], registry=self.registry)
        self.value_vs_baseline = Gauge(
            "bandit_router_value_vs_baseline",
            "Guarded tenants: doubly robust estimate of the cumulative reward of the router "
            "minus the baseline model's, over the decisions with feedback (reward units; "
            "from the logged propensities and the predictions)", ["tenant"],
            registry=self.registry)
        self.guard_gap = Gauge(
            "bandit_router_guard_gap",
            "Guarded tenants: the guard's lower bound of the cumulative reward of the "
            "router minus the baseline's (kind=lower_bound), and how low it may go "
            "(kind=allowed, -max_exploration_loss x the baseline's cumulative reward)",
            ["tenant", "kind"], registry=self.registry)
        self.guard_overrides = Counter(
            "bandit_router_guard_overrides_total",
            "Decisions where the guard played the baseline instead of the policy's choice",
            ["tenant"], registry=self.registry)
        self.checkpoints = Counter("bandit_router_checkpoints_total",
                                   "Policy checkpoints written", registry=self.registry)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once: ``labels()`` validates and takes a
        lock on every call (a few us, paid twice per outcome the gateway stores). No
        child is ever removed from these metrics, so a kept one stays the live one."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child
