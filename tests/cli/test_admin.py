"""``bandit-router tenants | models | preferences | usage`` against a real service on a
loopback socket (uvicorn in a thread), through typer's CliRunner."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.client import RouterClient
from tests.service.conftest import ADMIN_KEY, make_settings
from tests.service.live import live_server

runner = CliRunner()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-admin') / 'router.db'}"
    with live_server(make_settings(url)) as base:
        yield base


@pytest.fixture(scope="module")
def env(base_url):
    """The service's URL and the admin key, as an operator would export them."""
    return {"BANDIT_ROUTER_URL": base_url, "BANDIT_ROUTER_KEY": ADMIN_KEY, "COLUMNS": "200"}


def run(env: dict[str, str], *args: str, code: int = 0):
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result


def run_json(env: dict[str, str], *args: str):
    return json.loads(run(env, *args, "--json").stdout)


@pytest.fixture
def tenant(env):
    return run_json(env, "tenants", "create", f"acme-{uuid.uuid4().hex[:6]}")


def test_create_tenant_cli_prints_key_once_in_table(env):
    out = run(env, "tenants", "create", "table-co").stdout
    assert "shown once" in out and "brt_" in out and "table-co" in out


@pytest.mark.parametrize("columns", ["30", "80"])
def test_create_tenant_cli_prints_whole_key_on_own_line_narrow_terminal(env, base_url,
                                                                        columns):
    """CliRunner's output is a pipe, as `| tee` would be; the key must survive it whole."""
    narrow = {**env, "COLUMNS": columns}
    lines = run(narrow, "tenants", "create", f"narrow-{columns}").stdout.splitlines()
    keys = [line for line in lines if line.startswith("brt_")]
    assert len(keys) == 1 and len(keys[0]) == len("brt_") + 43, lines  # 32 bytes, base64
    with RouterClient(base_url, keys[0]) as client:  # the printed key is the real one
        assert client.usage().decisions_today == 0
    created = json.loads(run(narrow, "tenants", "create", "narrow-json", "--json").stdout)
    with RouterClient(base_url, created["api_key"]) as client:
        assert client.usage().tenant_id == created["id"]
    rotated = run(narrow, "tenants", "rotate-key", created["id"]).stdout.splitlines()
    assert [line for line in rotated if line.startswith("brt_")][0] != created["api_key"]


def test_tenant_cli_commands_accept_name_or_id(env, tenant):
    name = tenant["name"]
    rotated = run_json(env, "tenants", "rotate-key", name)
    assert rotated["id"] == tenant["id"]
    prefs = run_json(env, "preferences", "set", "--tenant", name, "--cost", "50")
    assert prefs["weights"]["cost"] == 50.0
    assert run_json(env, "preferences", "get", "--tenant", name)["weights"]["cost"] == 50.0
    assert run_json(env, "usage", "--tenant", name)["tenant_id"] == tenant["id"]
    assert run_json(env, "usage", "--tenant", tenant["id"])["tenant_id"] == tenant["id"]


def test_tenant_cli_unknown_or_shared_name_fails_naming_ids(env):
    missing = run(env, "usage", "--tenant", "no-such-tenant", code=1)
    assert "error 404" in missing.stderr and "'no-such-tenant'" in missing.stderr
    twins = [run_json(env, "tenants", "create", "twin/co") for _ in range(2)]
    shared = run(env, "usage", "--tenant", "twin/co", code=1)
    assert "error 409" in shared.stderr
    assert all(t["id"] in shared.stderr for t in twins)
    # An id is never ambiguous.
    assert run_json(env, "usage", "--tenant", twins[1]["id"])["tenant_id"] == twins[1]["id"]


def test_list_tenants_cli_json_and_table(env, tenant):
    listed = {t["id"]: t for t in run_json(env, "tenants", "list")}
    assert listed[tenant["id"]]["name"] == tenant["name"]
    assert listed[tenant["id"]]["spend_usd_today"] == 0.0
    table = run(env, "tenants", "list").stdout
    assert tenant["id"] in table and tenant["name"] in table


def test_rotate_key_cli_old_key_stops_working(env, base_url, tenant):
    rotated = run_json(env, "tenants", "rotate-key", tenant["id"])
    assert rotated["id"] == tenant["id"] and rotated["api_key"] != tenant["api_key"]
    old = run({**env, "BANDIT_ROUTER_KEY": tenant["api_key"]}, "usage", code=1)
    assert "error 401" in old.stderr and "unknown API key" in old.stderr
    own = json.loads(run({**env, "BANDIT_ROUTER_KEY": rotated["api_key"]},
                         "usage", "--json").stdout)
    assert own["tenant_id"] == tenant["id"]


def test_add_model_cli_then_price_disable_enable(env):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = run_json(env, "models", "add", name, "--input-price", "0.15",
                     "--output-price", "0.6", "--prior-quality", "0.7")
    assert added["enabled"] is True and added["prior_quality"] == pytest.approx(0.7)
    # 500 input + 300 output tokens at these prices.
    assert added["prior_cost_usd"] == pytest.approx((500 * 0.15 + 300 * 0.6) / 1e6)
    priced = run_json(env, "models", "price", name, "--output-price", "1.2")
    assert priced["output_price_per_mtok"] == pytest.approx(1.2)
    assert priced["input_price_per_mtok"] == pytest.approx(0.15)
    assert run_json(env, "models", "disable", name)["enabled"] is False
    table = run(env, "models", "list").stdout
    assert name in table and "disabled" in table
    assert run_json(env, "models", "enable", name)["enabled"] is True


def test_add_model_cli_duplicate_shows_problem_fields(env):
    name = f"dup-{uuid.uuid4().hex[:6]}"
    run(env, "models", "add", name, "--input-price", "1", "--output-price", "1")
    result = run(env, "models", "add", name, "--input-price", "1", "--output-price", "1",
                 code=1)
    assert "error 409" in result.stderr and "name: already used" in result.stderr


def test_price_model_cli_without_prices_fails(env):
    result = run(env, "models", "price", "whatever", code=1)
    assert "--input-price" in result.stderr


def test_set_preferences_cli_keeps_weights_not_given(env, tenant):
    tid = tenant["id"]
    run(env, "preferences", "set", "--tenant", tid, "--cost", "200", "--latency", "0.5")
    after = run_json(env, "preferences", "set", "--tenant", tid, "--quality", "2",
                     "--budget-day", "5", "--on-exhausted", "reject")
    assert after["weights"] == {"quality": 2.0, "cost": 200.0, "latency": 0.5}
    assert after["budget_usd_per_day"] == 5.0 and after["on_budget_exhausted"] == "reject"
    cleared = run_json(env, "preferences", "set", "--tenant", tid, "--no-budget-day")
    assert cleared["budget_usd_per_day"] is None
    table = run(env, "preferences", "get", "--tenant", tid).stdout
    assert "cost weight (per USD)" in table and "200" in table and "reject" in table


def test_set_preferences_cli_bad_policy_422(env, tenant):
    result = run(env, "preferences", "set", "--tenant", tenant["id"], "--policy", "greedy",
                 code=1)
    assert "error 422" in result.stderr and "policy" in result.stderr


def test_set_preferences_cli_baseline_model_and_bound(env, tenant):
    tid = tenant["id"]
    name = f"base-{uuid.uuid4().hex[:6]}"
    run(env, "models", "add", name, "--input-price", "1", "--output-price", "1")
    after = run_json(env, "preferences", "set", "--tenant", tid, "--baseline-model", name,
                     "--max-exploration-loss", "0.05")
    assert after["baseline_model"] == name and after["max_exploration_loss"] == 0.05
    table = run(env, "preferences", "get", "--tenant", tid).stdout
    assert "baseline model (guard)" in table and name in table
    bad = run(env, "preferences", "set", "--tenant", tid, "--baseline-model", "nope",
              code=1)
    assert "error 422" in bad.stderr and "baseline_model" in bad.stderr
    bad = run(env, "preferences", "set", "--tenant", tid, "--max-exploration-loss", "2",
              code=1)
    assert "error 422" in bad.stderr and "max_exploration_loss" in bad.stderr
    off = run_json(env, "preferences", "set", "--tenant", tid, "--no-baseline-model")
    assert off["baseline_model"] is None and off["max_exploration_loss"] == 0.05


def test_set_preferences_cli_nothing_to_change_fails(env, tenant):
    result = run(env, "preferences", "set", "--tenant", tenant["id"], code=1)
    assert "nothing to change" in result.stderr


def test_get_usage_cli_counts_decisions_and_spend(env, base_url, tenant):
    names = [run_json(env, "models", "add", f"u-{uuid.uuid4().hex[:6]}", "--input-price",
                      "1", "--output-price", "2")["name"] for _ in range(2)]
    with RouterClient(base_url, tenant["api_key"]) as client:
        for i in range(4):
            decision = client.decide(f"query {i}", candidates=names)
            client.feedback(decision.decision_id, cost_usd=0.01)
    usage = run_json(env, "usage", "--tenant", tenant["id"])
    assert usage["decisions_today"] == 4
    assert usage["spend_usd_today"] == pytest.approx(0.04)
    assert sum(usage["model_share_month"].values()) == pytest.approx(1.0)
    table = run(env, "usage", "--tenant", tenant["id"]).stdout
    assert "today (UTC)" in table and "$0.0400" in table


def test_list_tenants_cli_unreachable_service_fails_cleanly(env):
    result = run({**env, "BANDIT_ROUTER_URL": "http://127.0.0.1:9"}, "tenants", "list",
                 code=1)
    assert "cannot reach the service" in result.stderr


def test_list_tenants_cli_without_key_fails(env):
    result = run({**env, "BANDIT_ROUTER_KEY": ""}, "tenants", "list", code=1)
    assert "no key" in result.stderr


def test_set_preferences_cli_help_no_double_negation(env):
    out = run(env, "preferences", "set", "--help").stdout
    assert "--no-budget-day" in out and "--no-budget-month" in out
    assert "--no-no-" not in out


def test_list_models_cli_80_columns_nothing_cut(env):
    name = f"a-rather-long-model-name-{uuid.uuid4().hex}"
    run(env, "models", "add", name, "--input-price", "0.15", "--output-price", "0.6")
    out = run({**env, "COLUMNS": "80"}, "models", "list").stdout
    assert "\u2026" not in out and max(map(len, out.splitlines())) <= 80
    words = " ".join(line.strip(" \u2502\u2503\u2577\u2575") for line in out.splitlines())
    for header in ("input", "output", "per Mtok", "prior", "cost", "per", "request",
                   "quality", "state"):
        assert header in words
    # Folded, not cut: the first column's pieces, read top to bottom, hold the whole name.
    first_column = "".join(line.split("\u2502")[1].strip() for line in out.splitlines()
                           if line.startswith("\u2502"))
    assert name in first_column


def test_set_preferences_cli_out_of_range_names_field_once(env, tenant):
    err = run(env, "preferences", "set", "--tenant", tenant["id"], "--cost", "2e6",
              code=1).stderr
    assert "error 422" in err and "1000000" in err
    field_lines = [line for line in err.splitlines() if line.startswith("  ")]
    # The schema bounds the weight (reliability: strict, bounded numbers), so the field is
    # the body's weights.cost; named once per line, as any field.
    assert field_lines and all(line.count("weights.cost") == 1 for line in field_lines)
    assert all("cost: cost" not in line for line in field_lines)


def test_reservations_cli_list_and_release_by_tenant_name(env, base_url, tenant):
    name = run_json(env, "models", "add", f"r-{uuid.uuid4().hex[:6]}", "--input-price", "1",
                    "--output-price", "2")["name"]
    with RouterClient(base_url, tenant["api_key"]) as client:
        for i in range(2):
            client.decide(f"never answered {i}", candidates=[name])
    time.sleep(0.5)
    age = ["--older-than-hours", "0.0001", "--tenant", tenant["name"]]
    listed = run_json(env, "reservations", "list", *age)
    assert listed["decisions"] == 2 and listed["tenants"][0]["name"] == tenant["name"]
    table = run({**env, "COLUMNS": "80"}, "reservations", "list", *age).stdout
    assert "total" in table and tenant["name"] in table.replace("\u2502", "").replace(" ", "")
    out = run(env, "reservations", "release", *age).stdout
    assert out.startswith("released 2 reservation(s)")
    assert run_json(env, "reservations", "list", *age)["decisions"] == 0
    assert run_json(env, "usage", "--tenant", tenant["id"])["spend_usd_today"] == 0.0


def test_add_model_cli_with_upstream_flags_shows_key_name_not_key(env):
    name = f"up-{uuid.uuid4().hex[:6]}"
    added = run_json(env, "models", "add", name, "--input-price", "1", "--output-price", "2",
                     "--base-url", "http://127.0.0.1:9/v1", "--upstream-model", "vendor/x",
                     "--api-key-env", "UPSTREAM_KEY_OF_TEST")
    assert (added["base_url"], added["upstream_model"], added["api_key_env"]) == (
        "http://127.0.0.1:9/v1", "vendor/x", "UPSTREAM_KEY_OF_TEST")
    table = run(env, "models", "list").stdout
    assert "vendor/x" in table and "$UPSTREAM_KEY_OF_TEST" in table
    bad = run(env, "models", "add", f"up-{uuid.uuid4().hex[:6]}", "--input-price", "1",
              "--output-price", "1", "--base-url", "ftp://x", code=1)
    assert "base_url" in bad.stderr
