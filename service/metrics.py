"""Prometheus instruments, in a registry owned by one app (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter("bandit_router_decisions_total", "Decisions made",
                                 ["model", "tenant"], registry=self.registry)
        self.explored = Counter("bandit_router_explored_decisions_total",
                                "Decisions that were not the greedy choice", ["tenant"],
                                registry=self.registry)
        self.feedback = Counter("bandit_router_feedback_total", "Feedback events",
                                ["status"], registry=self.registry)
        self.reward = Counter("bandit_router_reward_sum",
                              "Sum of rewards (tenant preferences) reported by feedback",
                              ["tenant"], registry=self.registry)
        self.decide_latency = Histogram(
            "bandit_router_decide_latency_seconds", "Time to answer POST /v1/decide",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry)
        self.feedback_latency = Histogram(
            "bandit_router_feedback_latency_seconds", "Time to answer POST /v1/feedback",
            registry=self.registry)
        self.spend = Gauge("bandit_router_spend_usd", "Spend in the current period",
                           ["tenant", "period"], registry=self.registry)
        self.rejected = Counter("bandit_router_rejected_total",
                                "Decides refused (budget or backpressure)", ["reason"],
                                registry=self.registry)
        self.queue_depth = Gauge("bandit_router_decision_queue_depth",
                                 "Decisions waiting for the writer", registry=self.registry)
        self.checkpoints = Counter("bandit_router_checkpoints_total",
                                   "Policy checkpoints written", registry=self.registry)
