"""ops/prometheus.yml, ops/grafana/ and their wiring in docker-compose.yml: every metric
the dashboard queries is one the service or a learner exports, every scrape target is a
service of the compose file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from service.metrics import Metrics
from streams.learner import LearnerMetrics

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["_sum", "_count"]}


def exported_names() -> set[str]:
    names: set[str] = set()
    for registry in (Metrics().registry, LearnerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + s for s in SUFFIXES.get(family.type, [""]))
    return names


def dashboard() -> dict:
    return json.loads((ROOT / "ops/grafana/dashboard.json").read_text())


def test_query_dashboard_metrics_exist():
    exported = exported_names()
    queried = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            queried.update(re.findall(r"\b(bandit_[a-z_]+)\b", target["expr"]))
    assert queried, "the dashboard queries no bandit metric"
    assert queried - exported == set(), f"not exported: {sorted(queried - exported)}"
    # The panels the issue asks for.
    for needed in ("bandit_router_decisions_total", "bandit_router_period_spend_usd",
                   "bandit_router_budget_usd", "bandit_router_reward_sum",
                   "bandit_router_explored_decisions_total", "bandit_learner_lag",
                   "bandit_router_decide_latency_seconds_bucket"):
        assert needed in queried, needed


def test_load_dashboard_structure_valid():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((ROOT / "ops/grafana/provisioning/datasources/"
                                 "prometheus.yml").read_text())["datasources"][0]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24


def test_scrape_targets_are_compose_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    scrape = yaml.safe_load((ROOT / "ops/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert host in services, f"{host} is not a service of docker-compose.yml"
        command = " ".join(services[host].get("command", []))
        assert port in command, f"{host} does not listen on {port}: {command}"
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    assert "./ops/prometheus.yml" in mounts and "./ops/grafana/dashboard.json" in mounts
