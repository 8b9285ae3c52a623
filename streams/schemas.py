"""Versioned JSON event schemas of the Kafka topics (``schema_version`` 1).

Three event types, one per topic; every event is a JSON object with
``"schema_version": 1``. Parsing is strict: an unknown or missing field, a wrong type or
a value out of range raises :class:`InvalidEventError`, which names the field (as every
:class:`bandit.InvalidInputError` does) and carries the dead-letter ``reason``.

Feedback (topic ``feedback_topic``, key = ``decision_id``)::

    {"schema_version": 1, "event_id": "f-123", "decision_id": "<uuid>",
     "tenant_id": "<tenant uuid>", "quality": 0.8, "cost_usd": 0.0021,
     "latency_ms": 850.0, "sent_at": "2026-11-23T16:00:00.000000+00:00"}

``quality`` (0..1), ``cost_usd`` (0..10,000) and ``latency_ms`` (0..1e8) are optional
(null or absent) but at least one is required. ``event_id`` (1..200 characters) makes a repeat
of the same event a no-op; ``""`` is the anonymous event (one per decision).

Decision (topic ``decisions_topic``, key = ``decision_id``): ``decision_id``,
``tenant_id``, ``model``, ``propensity``, ``context`` (the float vector the policy saw),
``predictions`` (per model: quality, cost_usd, latency_ms, utility, uncertainty, score),
``policy``, ``policy_version``, ``scope``, ``created_at``.

Dead letter (topic ``dead_letter_topic``, key = the original key): ``reason`` (one of
:data:`DEAD_LETTER_REASONS`), ``detail`` (a sentence naming the field), ``topic``,
``partition``, ``offset`` of the original record, ``key`` and ``original`` (base64 of
the original bytes) and ``dead_lettered_at``.

Examples
--------
>>> raw = encode_feedback(FeedbackEvent("e1", "d1", "t1", quality=1.0, sent_at=0.0))
>>> decode_feedback(raw).quality
1.0
>>> decode_feedback(b'{"schema_version": 1, "event_id": "e1", "decision_id": "d1",'
...                 b' "tenant_id": "t1", "quality": 2}')
Traceback (most recent call last):
...
streams.schemas.InvalidEventError: quality: must be a finite number >= 0 and <= 1 (got 2)
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson

import bandit.base as _bandit_base
from bandit.errors import InvalidInputError
from bandit.featurize import check_tags

__all__ = [
    "SCHEMA_VERSION",
    "DEAD_LETTER_REASONS",
    "InvalidEventError",
    "FeedbackEvent",
    "DecisionEvent",
    "DeadLetter",
    "encode_feedback",
    "decode_feedback",
    "encode_decision",
    "decode_decision",
    "encode_dead_letter",
    "decode_dead_letter",
]

SCHEMA_VERSION = 1

#: Why a feedback record was dead-lettered.
DEAD_LETTER_REASONS = (
    "malformed-json",  # not a JSON object
    "invalid-event",  # a field missing, unknown, of the wrong type or schema version
    "out-of-range",  # quality outside [0, 1], a negative cost or latency, NaN
    "unknown-decision",  # no such decision after the pending timeout
    "tenant-mismatch",  # the decision belongs to another tenant
    "decision-expired",  # the decision is older than the retention window
)

_FEEDBACK_FIELDS = frozenset({"schema_version", "event_id", "decision_id", "tenant_id",
                              "quality", "cost_usd", "latency_ms", "sent_at"})
_ID_MAX = 200
#: Upper bounds of the outcome values, those of bandit's statistics: finite but absurd
#: values (a cost of 1e300) would overflow the shared statistics to inf/NaN for every
#: tenant; no real request costs 10,000 USD or takes 10^8 ms (28 hours).
MAX_COST_USD = _bandit_base.MAX_COST_USD
MAX_LATENCY_MS = _bandit_base.MAX_LATENCY_MS


class InvalidEventError(InvalidInputError):
    """An event that does not follow its schema; ``reason`` is the dead-letter reason."""

    def __init__(self, field: str, allowed: str, value: object = None, *,
                 reason: str = "invalid-event") -> None:
        super().__init__(field, allowed, value)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """The outcome of one decision, as product telemetry (or the API) reports it."""

    event_id: str
    decision_id: str
    tenant_id: str
    quality: float | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    #: Seconds since the epoch when the event was produced (None: unknown).
    sent_at: float | None = None

    def outcome(self) -> dict[str, float | None]:
        return {"quality": self.quality, "cost_usd": self.cost_usd,
                "latency_ms": self.latency_ms}


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    decision_id: str
    tenant_id: str
    model: str
    propensity: float
    context: list[float]
    predictions: dict[str, Any]
    policy: str
    policy_version: int
    scope: str
    created_at: float
    #: The request's tags (already hashed into ``context``); None when it had none.
    tags: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    original: bytes
    dead_lettered_at: float


(_SET_EVENT_ID, _SET_DECISION_ID, _SET_TENANT_ID, _SET_QUALITY, _SET_COST, _SET_LATENCY,
 _SET_SENT_AT) = (FeedbackEvent.__dict__[name].__set__ for name in (  # the slots
    "event_id", "decision_id", "tenant_id", "quality", "cost_usd", "latency_ms", "sent_at"))
assert len(fields(FeedbackEvent)) == 7, "_new_feedback sets every field"  # noqa: S101


def _new_feedback(event_id: str, decision_id: str, tenant_id: str, quality: float | None,
                  cost_usd: float | None, latency_ms: float | None,
                  sent_at: float | None) -> FeedbackEvent:
    """``FeedbackEvent(...)`` of checked values, set through the slots directly: a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    twice as slow, and the learner builds one per record (issue 17)."""
    event = object.__new__(FeedbackEvent)
    _SET_EVENT_ID(event, event_id)
    _SET_DECISION_ID(event, decision_id)
    _SET_TENANT_ID(event, tenant_id)
    _SET_QUALITY(event, quality)
    _SET_COST(event, cost_usd)
    _SET_LATENCY(event, latency_ms)
    _SET_SENT_AT(event, sent_at)
    return event


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _parse_time(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
    raise InvalidEventError(name, "must be an ISO-8601 time or seconds since the epoch",
                            value)


def _parse_id(data: dict, name: str, *, empty: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > _ID_MAX or (not value and not empty):
        low = 0 if empty else 1
        raise InvalidEventError(name, f"must be a string of {low}..{_ID_MAX} characters",
                                value)
    if "\0" in value:
        # PostgreSQL refuses NUL in text: the batch's decisions query would fail on every
        # retry, a poison record that stopped the learner (issue 17).
        raise InvalidEventError(name, "must not contain NUL (\\u0000) characters", value)
    return value


def _parse_measure(data: dict, name: str, high: float | None) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEventError(name, "must be a number or null", value)
    if not math.isfinite(value) or value < 0 or (high is not None and value > high):
        bound = f" and <= {high:g}" if high is not None else ""
        raise InvalidEventError(name, f"must be a finite number >= 0{bound}", value,
                                reason="out-of-range")
    return float(value)


def _load_object(raw: bytes | bytearray | memoryview | None) -> dict:
    if raw is None:
        raise InvalidEventError("value", "must be a JSON object", None,
                                reason="malformed-json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError("value", "must be a JSON object", str(exc),
                                reason="malformed-json") from None
    if not isinstance(data, dict):
        raise InvalidEventError("value", "must be a JSON object", type(data).__name__,
                                reason="malformed-json")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidEventError("schema_version", f"must be {SCHEMA_VERSION}", version)
    return data


def encode_feedback(event: FeedbackEvent) -> bytes:
    """JSON bytes of a feedback event (schema version 1)."""
    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "event_id": event.event_id,
        "decision_id": event.decision_id, "tenant_id": event.tenant_id,
        "quality": event.quality, "cost_usd": event.cost_usd,
        "latency_ms": event.latency_ms, "sent_at": _iso(event.sent_at)})


def _well_formed_feedback(data: dict) -> FeedbackEvent | None:
    """The event when every field is of the usual type and in range (a few type tests,
    a third of the field-by-field validation's time), else None: the caller then
    validates field by field, which names what is wrong."""
    if not data.keys() <= _FEEDBACK_FIELDS:
        return None
    event_id, decision_id = data.get("event_id"), data.get("decision_id")
    tenant_id = data.get("tenant_id")
    if not (type(event_id) is str and type(decision_id) is str and type(tenant_id) is str
            and decision_id and tenant_id and len(event_id) <= _ID_MAX
            and len(decision_id) <= _ID_MAX and len(tenant_id) <= _ID_MAX
            and "\0" not in event_id and "\0" not in decision_id and "\0" not in tenant_id):
        return None
    quality, cost, latency = data.get("quality"), data.get("cost_usd"), data.get("latency_ms")
    if quality is None and cost is None and latency is None:
        return None
    # Floats only (ints and bools take the long way); NaN fails every comparison.
    for value, high in ((quality, 1.0), (cost, MAX_COST_USD), (latency, MAX_LATENCY_MS)):
        if value is not None and not (type(value) is float and 0.0 <= value <= high):
            return None
    sent_at = data.get("sent_at")
    return _new_feedback(event_id, decision_id, tenant_id, quality, cost, latency,
                         None if sent_at is None else _parse_time("sent_at", sent_at))


def decode_feedback(raw: bytes | bytearray | memoryview | None) -> FeedbackEvent:
    """Parse and validate one feedback record; raises :class:`InvalidEventError`."""
    data = _load_object(raw)
    event = _well_formed_feedback(data)
    if event is not None:
        return event
    unknown = data.keys() - _FEEDBACK_FIELDS
    if unknown:
        raise InvalidEventError(sorted(unknown)[0], "unknown field; allowed: "
                                + ", ".join(sorted(_FEEDBACK_FIELDS)))
    event = FeedbackEvent(
        event_id=_parse_id(data, "event_id", empty=True),
        decision_id=_parse_id(data, "decision_id"),
        tenant_id=_parse_id(data, "tenant_id"),
        quality=_parse_measure(data, "quality", 1.0),
        cost_usd=_parse_measure(data, "cost_usd", MAX_COST_USD),
        latency_ms=_parse_measure(data, "latency_ms", MAX_LATENCY_MS),
        sent_at=_parse_time("sent_at", data.get("sent_at")),
    )
    if event.quality is None and event.cost_usd is None and event.latency_ms is None:
        raise InvalidEventError("quality", "at least one of quality, cost_usd, latency_ms "
                                "is required")
    return event


def encode_decision(event: DecisionEvent) -> bytes:
    """JSON bytes of a decision event (schema version 1)."""
    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "decision_id": event.decision_id,
        "tenant_id": event.tenant_id, "model": event.model,
        "propensity": event.propensity, "context": event.context,
        "predictions": event.predictions, "policy": event.policy,
        "policy_version": event.policy_version, "scope": event.scope,
        "created_at": _iso(event.created_at), "tags": event.tags},
        option=orjson.OPT_SERIALIZE_NUMPY)


def _parse_tags(value: object) -> dict[str, str] | None:
    """Optional ``tags`` (events of schema 1 written before tags existed have none)."""
    if value is None:
        return None
    try:
        return check_tags(value) or None
    except InvalidInputError as err:
        raise InvalidEventError(err.field, err.allowed, err.value) from None


def decode_decision(raw: bytes) -> DecisionEvent:
    """Parse a decision event (for consumers of the decisions topic)."""
    data = _load_object(raw)
    try:
        return DecisionEvent(
            decision_id=_parse_id(data, "decision_id"), tenant_id=_parse_id(data, "tenant_id"),
            model=_parse_id(data, "model"), propensity=float(data["propensity"]),
            context=[float(v) for v in data["context"]], predictions=dict(data["predictions"]),
            policy=str(data["policy"]), policy_version=int(data["policy_version"]),
            scope=str(data["scope"]),
            created_at=_parse_time("created_at", data["created_at"]) or 0.0,
            tags=_parse_tags(data.get("tags")))
    except KeyError as exc:
        raise InvalidEventError(str(exc.args[0]), "is required") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidEventError):
            raise
        raise InvalidEventError("value", "a field has the wrong type", str(exc)) from None


def encode_dead_letter(letter: DeadLetter) -> bytes:
    def b64(value: bytes | None) -> str | None:
        return None if value is None else base64.b64encode(value).decode("ascii")

    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "reason": letter.reason, "detail": letter.detail,
        "topic": letter.topic, "partition": letter.partition, "offset": letter.offset,
        "key": b64(letter.key), "original": b64(letter.original),
        "dead_lettered_at": _iso(letter.dead_lettered_at)})


def decode_dead_letter(raw: bytes) -> DeadLetter:
    data = _load_object(raw)
    key = data.get("key")
    return DeadLetter(
        reason=str(data["reason"]), detail=str(data["detail"]), topic=str(data["topic"]),
        partition=int(data["partition"]), offset=int(data["offset"]),
        key=None if key is None else base64.b64decode(key),
        original=base64.b64decode(data["original"] or ""),
        dead_lettered_at=_parse_time("dead_lettered_at", data["dead_lettered_at"]) or 0.0)
