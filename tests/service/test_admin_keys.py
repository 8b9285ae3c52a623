"""Admin keys: the rule between BANDIT_ROUTER_ADMIN_KEY and the stored keys, and
create / list / revoke through the API and the command line (SQLite and PostgreSQL)."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli_app
from tests.service.conftest import ADMIN_KEY, assert_problem, make_settings
from tests.service.live import live_server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def models_status(client: TestClient, key: str) -> int:
    return client.get("/v1/admin/models", headers=bearer(key)).status_code


def test_configured_admin_key_refuses_generated_key(new_database_url, caplog):
    url = new_database_url()
    with TestClient(create_app(make_settings(url, admin_key=None))) as first:
        generated = first.app.state.generated_admin_key
        assert models_status(first, generated) == 200
    with caplog.at_level(logging.WARNING, logger="service.routing"), \
            TestClient(create_app(make_settings(url))) as second:
        assert models_status(second, ADMIN_KEY) == 200
        assert models_status(second, generated) == 401
        listed = second.get("/v1/admin/keys", headers=bearer(ADMIN_KEY)).json()
        assert [(k["source"], k["accepted"], k["current"]) for k in listed] == [
            ("setting", True, True), ("stored", False, False)]
        # Creating a stored key would be useless while the setting rules: refused, saying so.
        assert_problem(second.post("/v1/admin/keys", headers=bearer(ADMIN_KEY)), 409,
                       detail_contains="BANDIT_ROUTER_ADMIN_KEY")
        # Revoking the stored one works, so that unsetting the setting cannot revive it.
        stored_id = listed[1]["id"]
        assert second.delete(f"/v1/admin/keys/{stored_id}",
                             headers=bearer(ADMIN_KEY)).status_code == 204
    assert "1 stored admin key(s)" in caplog.text and "BANDIT_ROUTER_ADMIN_KEY" in caplog.text
    with TestClient(create_app(make_settings(url, admin_key=None))) as third:
        # Unset again, with the stored key revoked: a new one is generated, the old is dead.
        assert third.app.state.generated_admin_key not in (None, generated)
        assert models_status(third, generated) == 401


def test_create_list_revoke_admin_keys_api(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url, admin_key=None))) as client:
        old = client.app.state.generated_admin_key
        r = client.post("/v1/admin/keys", headers=bearer(old))
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["api_key"].startswith("bra_") and models_status(client, new["api_key"]) == 200
        listed = client.get("/v1/admin/keys", headers=bearer(new["api_key"])).json()
        assert [k["current"] for k in listed] == [False, True]
        assert all(k["accepted"] and k["source"] == "stored" for k in listed)
        assert new["api_key"] not in str(listed) and listed[1]["fingerprint"] == new["fingerprint"]
        old_id = listed[0]["id"]
        assert client.delete(f"/v1/admin/keys/{old_id}",
                             headers=bearer(new["api_key"])).status_code == 204
        assert models_status(client, old) == 401
        assert_problem(client.delete(f"/v1/admin/keys/{old_id}", headers=bearer(new["api_key"])),
                       404, detail_contains=f"admin key {old_id} does not exist")
        # The last key cannot go: nobody could administer the service any more.
        assert_problem(client.delete(f"/v1/admin/keys/{new['id']}",
                                     headers=bearer(new["api_key"])),
                       409, detail_contains="last admin key")
        assert models_status(client, new["api_key"]) == 200
        tenant = client.post("/v1/admin/tenants", json={"name": "t"},
                             headers=bearer(new["api_key"])).json()
        assert_problem(client.post("/v1/admin/keys", headers=bearer(tenant["api_key"])), 403)


def test_revoke_admin_key_reaches_other_replica(new_database_url):
    url = new_database_url()
    settings = make_settings(url, admin_key=None)
    with TestClient(create_app(settings)) as a:
        first = a.app.state.generated_admin_key
        second = a.post("/v1/admin/keys", headers=bearer(first)).json()
        with TestClient(create_app(settings)) as b:
            assert models_status(b, first) == 200
            keys = a.get("/v1/admin/keys", headers=bearer(first)).json()
            a.delete(f"/v1/admin/keys/{keys[0]['id']}", headers=bearer(second["api_key"]))
            b.app.state.routing.refresh_registry()  # what the periodic task runs
            assert models_status(b, first) == 401
            assert models_status(b, second["api_key"]) == 200


def test_admin_keys_cli_rotation(tmp_path):
    """The rotation procedure of service/README.md, "Admin keys", step by step."""
    apps = []
    settings = make_settings(f"sqlite:///{tmp_path / 'r.db'}", admin_key=None)
    with live_server(settings, prepare=apps.append) as base:
        old = apps[0].state.generated_admin_key
        runner = CliRunner()
        env = {"BANDIT_ROUTER_URL": base, "BANDIT_ROUTER_KEY": old, "COLUMNS": "80"}
        created = runner.invoke(cli_app, ["admin-keys", "create"], env=env)
        assert created.exit_code == 0, created.output
        new = [line for line in created.stdout.splitlines() if line.startswith("bra_")]
        assert len(new) == 1 and len(new[0]) == len("bra_") + 43
        env["BANDIT_ROUTER_KEY"] = new[0]
        table = runner.invoke(cli_app, ["admin-keys", "list"], env=env).stdout
        assert "stored" in table and "yours" in table and new[0] not in table
        revoked = runner.invoke(cli_app, ["admin-keys", "revoke", "1"], env=env)
        assert revoked.exit_code == 0 and "revoked" in revoked.stdout
        refused = runner.invoke(cli_app, ["models", "list"],
                                env={**env, "BANDIT_ROUTER_KEY": old})
        assert refused.exit_code == 1 and "error 401" in refused.stderr
        last = runner.invoke(cli_app, ["admin-keys", "revoke", "2"], env=env)
        assert last.exit_code == 1 and "error 409" in last.stderr
