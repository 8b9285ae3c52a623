"""Configuration of the Kafka pipeline (immutable, validated once).

The service's :class:`service.config.Settings` carries the same values under
``BANDIT_ROUTER_*`` names and builds one of these; ``streams`` itself reads no
environment, so that tests and benchmarks can build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from bandit.base import check_finite_number
from bandit.errors import InvalidInputError

__all__ = ["StreamsConfig"]


@dataclass(frozen=True)
class StreamsConfig:
    """Topics, consumer group and the learner's limits.

    Parameters
    ----------
    bootstrap
        Kafka bootstrap servers, ``host:port[,host:port]``.
    feedback_topic, decisions_topic, dead_letter_topic
        Topic names. Feedback is keyed by ``decision_id``.
    partitions
        Partitions of each topic when :func:`streams.topics.ensure_topics` creates it.
    group_id
        Consumer group of the learners; also the namespace of the statistics and offsets
        stored in PostgreSQL (two groups never share state).
    dim
        Context dimension of the policies.
    pending_timeout_s
        How long feedback whose decision is not in the database yet is retried before it
        is dead-lettered (the decision writer batches rows for ~20 ms; 30 s covers a
        slow database or a restart of an API replica).
    retention_hours
        Feedback for a decision older than this is dead-lettered (``decision-expired``).
    max_poll_records
        Records per poll: one poll is one decisions query and one transaction per
        partition (each writes the partition's statistics, ~4 MB at d=64 and 16 arms),
        so larger polls amortize the writes.
    metrics_port
        Port of the learner's ``/metrics`` (0: no HTTP server).
    half_life_hours
        Forgetting of the statistics by event time (the decision's ``created_at``): an
        observation's weight halves every this many hours. None keeps everything. Must
        equal the API replicas' ``BANDIT_ROUTER_HALF_LIFE_HOURS``: the stored
        statistics record it and a process with another value refuses them.
    reconcile_spend
        Write a feedback's real cost into its decision's ``charged_usd`` (one UPDATE per
        partition batch), which the API replicas' budgets read; off saves that write
        when no tenant has a budget.
    feedback_rows
        Write every applied event into the ``feedback`` table (values, ``event_id``, the
        time it entered the topic), in the partition's transaction, so that
        ``GET /v1/decisions/{id}`` shows it as in embedded mode (one multi-row INSERT
        per partition batch); off saves that write when nobody reads the history.
    featurizer
        The spec of the featurizer that made the decisions' contexts
        (``bandit.featurize`` ``spec``, e.g. ``hashing-v1:dim=64,...``): the learners
        store it with the statistics and refuse statistics of another one, as the API
        replicas do. None: not recorded, not checked (tests, benchmarks).
    tag_dims
        Width of the contexts' request-tag block (``BANDIT_ROUTER_TAG_BLOCK``; 0: none):
        the statistics score the default policy's candidate models (with and without
        the tags) as the API replicas' ``select`` does, so it must match theirs.

    Examples
    --------
    >>> StreamsConfig(bootstrap="localhost:9092").validated().feedback_topic
    'bandit.feedback'
    >>> StreamsConfig(bootstrap="").validated()
    Traceback (most recent call last):
    ...
    bandit.errors.InvalidInputError: kafka_bootstrap: must be host:port[,host:port] (got '')
    """

    bootstrap: str
    feedback_topic: str = "bandit.feedback"
    decisions_topic: str = "bandit.decisions"
    dead_letter_topic: str = "bandit.feedback.dead"
    partitions: int = 6
    group_id: str = "bandit-learners"
    dim: int = 64
    pending_timeout_s: float = 30.0
    retention_hours: float = 24.0 * 30
    max_poll_records: int = 20000
    metrics_port: int = 0
    reconcile_spend: bool = True
    half_life_hours: float | None = None
    feedback_rows: bool = True
    featurizer: str | None = None
    tag_dims: int = 0

    def validated(self) -> StreamsConfig:
        if not isinstance(self.bootstrap, str) or not self.bootstrap.strip():
            raise InvalidInputError("kafka_bootstrap", "must be host:port[,host:port]",
                                    self.bootstrap)
        for name in ("feedback_topic", "decisions_topic", "dead_letter_topic", "group_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 200:
                raise InvalidInputError(name, "must be a non-empty string of at most 200 "
                                        "characters", value)
        for name, low in (("partitions", 1), ("dim", 1), ("max_poll_records", 1),
                          ("metrics_port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(name, f"must be an integer >= {low}", value)
        check_finite_number("pending_timeout_s", self.pending_timeout_s, low=0.0)
        check_finite_number("retention_hours", self.retention_hours, low=1e-6)
        if self.featurizer is not None and (not isinstance(self.featurizer, str)
                                            or not 0 < len(self.featurizer) <= 500):
            raise InvalidInputError("featurizer", "must be a featurizer spec of 1 to 500 "
                                    "characters, or None", self.featurizer)
        if self.half_life_hours is not None:
            check_finite_number("half_life_hours", self.half_life_hours, low=1e-6)
        if (isinstance(self.tag_dims, bool) or not isinstance(self.tag_dims, int)
                or not 0 <= self.tag_dims < self.dim):
            raise InvalidInputError("tag_dims", f"must be an integer in [0, {self.dim - 1}]"
                                    " (the tag block's width, less than dim)", self.tag_dims)
        return self
