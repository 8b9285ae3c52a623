"""Event schemas: strict parsing, errors that name the field, dead-letter round trip."""

from __future__ import annotations

import doctest

import orjson
import pytest

import streams.config
import streams.learner
import streams.schemas
import streams.stats
from streams.schemas import (
    DeadLetter,
    DecisionEvent,
    FeedbackEvent,
    InvalidEventError,
    decode_dead_letter,
    decode_decision,
    decode_feedback,
    encode_dead_letter,
    encode_decision,
    encode_feedback,
)


def _feedback(**changes: object) -> bytes:
    body = {"schema_version": 1, "event_id": "e1", "decision_id": "d1", "tenant_id": "t1",
            "quality": 0.5, "cost_usd": 0.01, "latency_ms": 120.0,
            "sent_at": "2026-11-23T16:00:00+00:00"}
    body.update(changes)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_run_doctests_streams_modules() -> None:
    for module in (streams.schemas, streams.config, streams.stats, streams.learner):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_roundtrip_feedback_event_exact() -> None:
    event = FeedbackEvent("e1", "d1", "t1", quality=0.25, cost_usd=None, latency_ms=10.0,
                          sent_at=1_700_000_000.5)
    assert decode_feedback(encode_feedback(event)) == event


@pytest.mark.parametrize(("raw", "field", "reason"), [
    (b"not json", "value", "malformed-json"),
    (b"[1, 2]", "value", "malformed-json"),
    (None, "value", "malformed-json"),
    (_feedback(schema_version=2), "schema_version", "invalid-event"),
    (_feedback(decision_id=...), "decision_id", "invalid-event"),
    (_feedback(decision_id=7), "decision_id", "invalid-event"),
    # PostgreSQL refuses NUL in text: as a poison record it stopped the learner.
    (_feedback(decision_id="d\0"), "decision_id", "invalid-event"),
    (_feedback(event_id="\0"), "event_id", "invalid-event"),
    (_feedback(tenant_id="t\0x"), "tenant_id", "invalid-event"),
    (_feedback(extra=1), "extra", "invalid-event"),
    (_feedback(quality=1.5), "quality", "out-of-range"),
    (_feedback(cost_usd=-0.1), "cost_usd", "out-of-range"),
    (_feedback(latency_ms=-1), "latency_ms", "out-of-range"),
    (_feedback(cost_usd=1e300), "cost_usd", "out-of-range"),
    (_feedback(latency_ms=1e12), "latency_ms", "out-of-range"),
    (_feedback(quality="good"), "quality", "invalid-event"),
    (_feedback(quality=None, cost_usd=None, latency_ms=None), "quality", "invalid-event"),
    (_feedback(sent_at="yesterday"), "sent_at", "invalid-event"),
])
def test_decode_feedback_invalid_names_field(raw: bytes, field: str, reason: str) -> None:
    with pytest.raises(InvalidEventError) as info:
        decode_feedback(raw)
    assert info.value.field == field
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{field}: ")


def test_decode_feedback_epoch_sent_at_accepted() -> None:
    assert decode_feedback(_feedback(sent_at=12.5)).sent_at == 12.5


def test_roundtrip_decision_event_exact() -> None:
    event = DecisionEvent("d1", "t1", "m1", 0.9, [0.1, -0.2], {"m1": {"quality": 0.5}},
                          "linucb", 3, "shared", 1_700_000_000.25)
    assert decode_decision(encode_decision(event)) == event


def test_roundtrip_dead_letter_keeps_original_bytes() -> None:
    letter = DeadLetter("malformed-json", "value: must be a JSON object", "fb", 2, 41,
                        b"k", b"\x00\xffraw", 1_700_000_000.0)
    assert decode_dead_letter(encode_dead_letter(letter)) == letter


def test_roundtrip_decision_event_with_tags_exact() -> None:
    event = DecisionEvent("d1", "t1", "m1", 0.9, [0.1, -0.2], {"m1": {"quality": 0.5}},
                          "linucb", 3, "shared", 1_700_000_000.25,
                          tags={"app": "support-bot", "task": "code"})
    assert decode_decision(encode_decision(event)) == event


def test_decode_decision_bad_tags_names_field() -> None:
    event = DecisionEvent("d1", "t1", "m1", 0.9, [0.1], {}, "linucb", 3, "shared", 1.0,
                          tags={"app": "x"})
    raw = encode_decision(event).replace(b'"app":"x"', b'"app":7')
    with pytest.raises(InvalidEventError) as info:
        decode_decision(raw)
    assert info.value.field == "tags.app"
