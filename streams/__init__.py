"""streams: Kafka feedback pipeline and the distributed learners.

Feedback events arrive on a Kafka topic keyed by ``decision_id``; a consumer group of
learners (:mod:`streams.learner`, ``bandit-router learn``) joins them to the stored
decisions in batches, applies them to per-partition statistics and writes each
partition's statistics and next offset in one PostgreSQL transaction (exactly-once
effect). Deciders read the summed statistics (:mod:`streams.stats`).

See ``docs/streams.md`` for topics, schemas and the exactly-once argument.
"""

from streams.config import StreamsConfig
from streams.schemas import (
    SCHEMA_VERSION,
    DeadLetter,
    DecisionEvent,
    FeedbackEvent,
    decode_feedback,
    encode_dead_letter,
    encode_decision,
    encode_feedback,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeadLetter",
    "DecisionEvent",
    "FeedbackEvent",
    "StreamsConfig",
    "decode_feedback",
    "encode_dead_letter",
    "encode_decision",
    "encode_feedback",
]
