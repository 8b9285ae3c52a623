"""The broker stopped under a distributed-mode replica while gateways' qualities wait
(service/quality_defaults.py): a feedback the producer refused before sending (``unsent``:
the producer is being rebuilt) gives its claim back, one that may have reached the topic
(the acknowledgement timed out) keeps it. The real Tansu broker (tests/faults/
test_broker_outage.py's :class:`PrivateBroker`) and the private PostgreSQL cluster.

Before the ``unsent`` distinction every 503 of the sink kept the claim: a client's quality
refused while the broker was away left the call's default replaced by a quality that was
never sent (learned neither). A LiteLLM plug-in's failure (``failed``) refused before
sending gives its ``final`` row back the same way: its 0 was never sent, so the client's
rating is taken (before, it was refused with 409 and nothing was learned); the plug-in's
retry of the event then sends its latency only.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from service.db import models as m
from streams.topics import ensure_topics
from tests.faults.conftest import PrivatePostgres
from tests.faults.test_broker_outage import RECOVERY_S, served
from tests.service.conftest import embedding


def _until_accepted(post: Any) -> httpx.Response:
    """Retry a 503 as Retry-After says (the producer reconnecting); any other answer."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        r = post()
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(int(r.headers.get("retry-after", "1")))


@pytest.fixture(scope="module")
def outage(private_postgres: PrivatePostgres) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with served(private_postgres, "qc") as s:
        http, auth = s.http, s.tenant

        def post(decision: str, **body: object) -> httpx.Response:
            return http.post("/v1/feedback", headers=auth,
                             json={"decision_id": decision, **body})

        ids = {}
        for i, name in enumerate(("maybe", "unsent", "failed")):
            r = http.post("/v1/decide", headers=auth,
                          json={"query": {"embedding": embedding(i)}})
            ids[name] = r.json()["decision_id"]
        # A gateway's defaults (the LiteLLM plug-in's success), due after 300 s.
        for name in ("maybe", "unsent"):
            r = post(ids[name], default_quality=0.7)
            assert r.status_code == 202 and r.json()["status"] == "pending", r.text
        r = post(ids["maybe"], latency_ms=5.0, event_id="warm")  # the producer's metadata
        assert r.status_code == 202, r.text
        s.broker.stop()
        # In the producer's buffer when the acknowledgement timed out: maybe sent.
        seen["maybe"] = post(ids["maybe"], quality=0.2, event_id="rating")
        # The producer is being rebuilt: refused before sending.
        seen["unsent"] = post(ids["unsent"], quality=0.3, event_id="rating")
        seen["failed"] = post(ids["failed"], quality=0.0, latency_ms=7.0, failed=True,
                              event_id="litellm-1")
        with Session(s.app.state.routing.engine) as session:
            seen["rows"] = {name: (None if row is None else (row.state, row.event_id))
                            for name, row in ((n, session.get(m.QualityDefault, d))
                                              for n, d in ids.items())}
        s.broker.start()  # a new, empty broker on the same port: topics again
        ensure_topics(s.config)
        # The client rates again with a new event: its first one was never sent.
        seen["unsent_again"] = _until_accepted(
            lambda: post(ids["unsent"], quality=0.4, event_id="rating-2"))
        # The client rates the failed call before the plug-in's retry comes.
        seen["failed_rated"] = post(ids["failed"], quality=0.9, event_id="user")
        seen["failed_retry"] = post(ids["failed"], quality=0.0, latency_ms=7.0,
                                    failed=True, event_id="litellm-1")
        # The maybe-sent rating's retry finds its claim its own.
        seen["maybe_retry"] = post(ids["maybe"], quality=0.2, event_id="rating")
        seen["events"] = {(e["decision_id"], e["event_id"]): e.get("quality")
                          for e in s.events()}
    seen["ids"] = ids
    return seen


def test_refused_before_sending_releases_the_claim(outage: dict[str, Any]) -> None:
    for name in ("maybe", "unsent", "failed"):
        r = outage[name]
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (name, r.text)
    rows = outage["rows"]
    assert rows["unsent"] == ("pending", None)  # the default waits again
    assert rows["maybe"] == ("replaced", "rating")  # may be on the topic: kept
    assert rows["failed"] is None  # its 0 never sent: the row went
    r = outage["unsent_again"]
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text


def test_unsent_failure_leaves_the_quality_to_the_client(outage: dict[str, Any]) -> None:
    r = outage["failed_rated"]
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    # The plug-in's retry of the same event: the client's quality came first.
    r = outage["failed_retry"]
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    ids, events = outage["ids"], outage["events"]
    assert events[(ids["failed"], "user")] == 0.9
    assert events[(ids["failed"], "litellm-1")] is None
    assert events[(ids["unsent"], "rating-2")] == 0.4
    assert (ids["unsent"], "rating") not in events


def test_maybe_sent_claim_kept_for_the_retry(outage: dict[str, Any]) -> None:
    r = outage["maybe_retry"]
    assert r.status_code == 202, r.text
    assert outage["events"][(outage["ids"]["maybe"], "rating")] == 0.2
