"""Fixtures of the OpenAI-compatible endpoint's tests: the real service on a loopback
socket (tests/service/live.py), on SQLite and on the real PostgreSQL of ``ops/``, in
front of the fake OpenAI-compatible upstream (tests/fakes/openai_upstream.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_upstream import FakeModel, FakeUpstream, running_upstream
from tests.service.conftest import ADMIN, backend, make_settings, new_database_url  # noqa: F401 - fixtures
from tests.service.live import live_server

#: The upstream key, in the router's environment under KEY_ENV: never to be seen again.
UPSTREAM_KEY = "sk-upstream-secret-7f3a9c1e5b"
KEY_ENV = "BANDIT_TEST_UPSTREAM_KEY"
#: The gateway's read timeout in these tests (a hung upstream fails after it).
TIMEOUT_S = 1.0


@dataclass
class Router:
    base_url: str
    upstream: FakeUpstream
    http: httpx.Client  # admin calls

    def add_model(self, name: str | None = None, *, input_price: float = 1.0,
                  output_price: float = 2.0, answer: FakeModel | None = None,
                  upstream_model: str | None = None, base_url: str | None = None,
                  **extra: object) -> str:
        """Register a model whose upstream is the fake (answering ``answer``)."""
        name = name or f"m-{uuid.uuid4().hex[:8]}"
        self.upstream.set(upstream_model or name, answer or FakeModel(f"{name} says hi."))
        body = {"name": name, "input_price_per_mtok": input_price,
                "output_price_per_mtok": output_price,
                "base_url": base_url or f"{self.upstream.base_url}/v1",
                "api_key_env": KEY_ENV, **extra}
        if upstream_model is not None:
            body["upstream_model"] = upstream_model
        r = self.http.post("/v1/admin/models", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        return name

    def metric(self, sample: str, **labels: str) -> float:
        """A sample of ``/metrics`` (0.0 when absent)."""
        text = self.http.get("/metrics", headers=ADMIN).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def tenant(self) -> str:
        r = self.http.post("/v1/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:6]}"},
                           headers=ADMIN)
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def decision(self, key: str, decision_id: str, *, feedback: int = 1,
                 timeout_s: float = 15.0) -> dict:
        """The decision once it has ``feedback`` feedback rows (the router posts its own
        in the background)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.http.get(f"/v1/decisions/{decision_id}",
                              headers={"Authorization": f"Bearer {key}"})
            if r.status_code == 200 and len(r.json()["feedback"]) >= feedback:
                return r.json()
            assert time.monotonic() < deadline, (r.status_code, r.text)
            time.sleep(0.05)


@pytest.fixture(scope="module")
def router(live: Live) -> Router:
    return live.router


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@dataclass
class Live:
    """The real service in front of the fake upstream, with its app (its state)."""

    router: Router
    app: FastAPI

    def learned(self, model: str) -> set[int]:
        """The model's quality observations in each in-process policy."""
        routing = self.app.state.routing
        return {p.observations(model)["quality"] for p in routing.shared.values()}


@pytest.fixture(scope="module")
def live(new_database_url, monkeypatch_module) -> Iterator[Live]:  # noqa: F811
    """One service per module (hashing featurizer, the short upstream timeout)."""
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    settings = make_settings(new_database_url(), featurizer="hashing",
                             upstream_timeout_s=TIMEOUT_S)
    apps: list[FastAPI] = []
    with running_upstream() as upstream, live_server(settings, prepare=apps.append) as base, \
            httpx.Client(base_url=base, timeout=30) as http:
        yield Live(Router(base, upstream, http), apps[0])
