"""A feedback telemetry producer for products that report outcomes as Kafka events.

Instead of ``POST /v1/feedback``, a product can put its feedback on the feedback topic
that the learners consume (distributed mode, docs/streams.md). :class:`FeedbackProducer`
does it the way the learners expect:

* **schema**: the event is a :class:`streams.schemas.FeedbackEvent`, encoded by
  :func:`streams.schemas.encode_feedback` and parsed back before it is sent, so an
  invalid value (a quality of 1.2, a negative cost) raises
  :class:`~streams.schemas.InvalidEventError` here, naming the field, instead of
  becoming a dead letter downstream;
* **key** = ``decision_id``: all events of one decision land on one partition, in order;
* **acks=all** and an **idempotent producer**: an acknowledged event is on every in-sync
  replica, and the producer's own retries do not write it twice;
* **event_id**: the learners apply one ``(decision_id, event_id)`` once, so a product
  that re-sends after a crash or a timeout (with the same ``event_id``) changes nothing.
  Give a stable id when you may re-send; the default is a fresh UUID.

Examples
--------
::

    from streams.telemetry import FeedbackProducer

    with FeedbackProducer("kafka:9092", tenant_id="<your tenant id>") as telemetry:
        telemetry.send(decision_id, quality=0.9, latency_ms=850, event_id="thumbs-1234")
    # leaving the block flushes: every event sent is acknowledged (or raised)

Validation happens before anything reaches Kafka:

>>> FeedbackProducer.build_event("d1", "t1", quality=1.5, event_id="e1")
Traceback (most recent call last):
...
streams.schemas.InvalidEventError: quality: must be a finite number >= 0 and <= 1 (got 1.5)
>>> FeedbackProducer.build_event("d1", "t1", cost_usd=0.002, event_id="e1").key
b'd1'
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from streams.schemas import FeedbackEvent, InvalidEventError, decode_feedback, encode_feedback

__all__ = ["FeedbackProducer", "EncodedFeedback"]


@dataclass(frozen=True, slots=True)
class EncodedFeedback:
    """One validated event, ready for the topic."""

    key: bytes
    value: bytes
    event: FeedbackEvent


class FeedbackProducer:
    """Send feedback events to the learners' topic (acks=all, idempotent, keyed).

    Parameters
    ----------
    bootstrap : str
        Kafka bootstrap servers, ``host:port[,host:port]``.
    tenant_id : str
        The tenant the decisions belong to (the learners dead-letter an event whose
        decision is another tenant's: ``tenant-mismatch``).
    topic : str
        The feedback topic (``BANDIT_ROUTER_FEEDBACK_TOPIC`` of the service).
    idempotent : bool
        The idempotent producer (``enable_idempotence``); turn off only for a broker
        that does not support it: the learners still drop repeats by ``event_id``.
    **producer_config
        Passed to :class:`kafka.KafkaProducer` (``linger_ms``, ``security_protocol``...).
    """

    def __init__(self, bootstrap: str, tenant_id: str, *, topic: str = "bandit.feedback",
                 idempotent: bool = True, client_id: str = "bandit-router-telemetry",
                 **producer_config: Any) -> None:
        if not tenant_id:
            raise InvalidEventError("tenant_id", "must be a non-empty string", tenant_id)
        self.tenant_id = tenant_id
        self.topic = topic
        config: dict[str, Any] = {"linger_ms": 5, "client_id": client_id, **producer_config}
        # Not overridable: what the learners' exactly-once accounting relies on.
        config.update(bootstrap_servers=bootstrap, acks="all",
                      enable_idempotence=idempotent)
        self._producer = KafkaProducer(**config)

    @staticmethod
    def build_event(decision_id: str, tenant_id: str, *, quality: float | None = None,
                    cost_usd: float | None = None, latency_ms: float | None = None,
                    event_id: str | None = None,
                    sent_at: float | None = None) -> EncodedFeedback:
        """Encode one event and parse it back with the learners' parser (strict)."""
        if quality is None and cost_usd is None and latency_ms is None:
            raise InvalidEventError("quality", "give at least one of quality, cost_usd, "
                                    "latency_ms", None)
        event = FeedbackEvent(event_id=event_id or str(uuid.uuid4()), decision_id=decision_id,
                              tenant_id=tenant_id, quality=quality, cost_usd=cost_usd,
                              latency_ms=latency_ms,
                              sent_at=time.time() if sent_at is None else sent_at)
        value = encode_feedback(event)
        decode_feedback(value)  # raises InvalidEventError naming the field
        return EncodedFeedback(decision_id.encode(), value, event)

    def send(self, decision_id: str, *, quality: float | None = None,
             cost_usd: float | None = None, latency_ms: float | None = None,
             event_id: str | None = None) -> Any:
        """Queue one event; returns kafka-python's future (``.get(timeout)`` waits for
        the acknowledgement). :meth:`flush` or leaving the ``with`` block waits for all."""
        encoded = self.build_event(decision_id, self.tenant_id, quality=quality,
                                   cost_usd=cost_usd, latency_ms=latency_ms,
                                   event_id=event_id)
        return self._producer.send(self.topic, key=encoded.key, value=encoded.value)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued event is acknowledged by all in-sync replicas."""
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then close the connections."""
        self._producer.close(timeout=timeout)

    def __enter__(self) -> FeedbackProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
