"""docker-compose.yml, read strictly (no Docker here): no duplicate keys (Compose rejects
them, PyYAML silently keeps the last), the services the distributed mode needs, health
checks, and dependencies that exist."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[str] = set()
    for key, _ in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            continue
        if key.value in seen:
            raise ValueError(f"duplicate key {key.value!r} at line {key.start_mark.line + 1}")
        seen.add(key.value)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_compose() -> dict:
    return yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=_StrictLoader)  # noqa: S506


def test_compose_no_duplicate_keys_all_services():
    services = load_compose()["services"]
    assert {"postgres", "kafka", "api-1", "api-2", "learner-1", "learner-2"} <= set(services)
    assert "kafka" in services["kafka"]["image"] and "postgres" in services["postgres"]["image"]


def test_compose_health_checks_and_dependencies_exist():
    services = load_compose()["services"]
    for name in ("postgres", "kafka", "api-1", "api-2", "learner-1", "learner-2"):
        assert services[name].get("healthcheck"), name
    for name, service in services.items():
        for dependency in service.get("depends_on") or []:
            assert dependency in services, (name, dependency)


def test_compose_router_services_distributed_settings():
    services = load_compose()["services"]
    for name in ("api-1", "api-2", "learner-1", "learner-2"):
        env = services[name]["environment"]
        assert env["BANDIT_ROUTER_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["BANDIT_ROUTER_KAFKA_BOOTSTRAP"], name


def test_compose_prometheus_scrapes_api_with_its_metrics_token():
    """/metrics is not public (it names tenants and their spend): the scrape job of the
    API replicas must send the token the replicas are configured with."""
    services = load_compose()["services"]
    tokens = {services[name]["environment"]["BANDIT_ROUTER_METRICS_TOKEN"]
              for name in ("api-1", "api-2")}
    assert len(tokens) == 1 and tokens != {""}
    jobs = {job["job_name"]: job for job in
            yaml.safe_load((ROOT / "ops/prometheus.yml").read_text())["scrape_configs"]}
    auth = jobs["bandit-router-api"]["authorization"]
    assert auth == {"type": "Bearer", "credentials": tokens.pop()}
