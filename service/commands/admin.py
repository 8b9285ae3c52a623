"""``bandit-router tenants | models | preferences | usage``: administer a running service.

Every command talks HTTP to the service through the client distribution
(:mod:`bandit_router_client`, ``client/``); the URL and the key come from ``--url`` /
``--key`` or ``BANDIT_ROUTER_URL`` / ``BANDIT_ROUTER_KEY``.
Output is a rich table for people, or JSON (``--json``) for scripts. An error answered by
the service prints its problem details (status, detail, the fields at fault) on stderr
and exits with code 1.

::

    export BANDIT_ROUTER_URL=http://127.0.0.1:8000 BANDIT_ROUTER_KEY=bra_...
    bandit-router models add small --input-price 0.15 --output-price 0.6
    bandit-router tenants create acme              # prints the tenant's key, once
    bandit-router preferences set --tenant acme --cost 200 --budget-day 5
    bandit-router usage --tenant acme --json   # a tenant's id or its name
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from bandit_router_client import RouterClient, RouterError
from rich.console import Console
from rich.table import Table

from service.budget import format_usd

__all__ = ["tenants_app", "models_app", "preferences_app", "admin_keys_app",
           "reservations_app", "state_app", "usage"]

T = TypeVar("T")

Url = Annotated[str, typer.Option("--url", envvar="BANDIT_ROUTER_URL",
                                  help="Base URL of the service.")]
Key = Annotated[str, typer.Option("--key", envvar="BANDIT_ROUTER_KEY",
                                  help="Admin key (or a tenant key for its own "
                                  "preferences and usage).", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TenantId = Annotated[str | None, typer.Option("--tenant", help="Tenant id or name (with "
                                              "the admin key); omit to use the key's own "
                                              "tenant.")]
DEFAULT_URL = "http://127.0.0.1:8000"

tenants_app = typer.Typer(help="Create, list tenants and rotate their keys.",
                          no_args_is_help=True)
models_app = typer.Typer(help="The model registry: add, list, prices, enable/disable.",
                         no_args_is_help=True)
preferences_app = typer.Typer(help="A tenant's weights, policy, scope and budgets.",
                              no_args_is_help=True)
reservations_app = typer.Typer(help="Decisions still charged at their predicted cost "
                               "(no feedback reported one): list, release.",
                               no_args_is_help=True)
state_app = typer.Typer(help="A deployment's learned state: export it, import it or a "
                        "warm start (bandit-router warmstart).", no_args_is_help=True)
admin_keys_app = typer.Typer(help="Admin keys: create, list, revoke (rotation: "
                             "service/README.md, \"Admin keys\").", no_args_is_help=True)


def _out() -> Console:
    # Built per call: CliRunner swaps sys.stdout, a console made at import would miss it.
    return Console(soft_wrap=True)


@contextmanager
def _client(url: str, key: str) -> Iterator[RouterClient]:
    if not key:
        _fail("no key: pass --key or set BANDIT_ROUTER_KEY")
    with RouterClient(url, key) as client:
        try:
            yield client
        except RouterError as err:
            _fail(_describe(err))


def _describe(err: RouterError) -> str:
    if err.status == 0:
        return f"cannot reach the service: {err.detail}"
    lines = [f"error {err.status} {err.title}: {err.detail}"]
    for e in err.errors:
        allowed, message = e.get("allowed"), str(e.get("message"))
        shown = f" (allowed: {allowed})" if allowed and str(allowed) not in message else ""
        lines.append(f"  {e.get('field')}: {message}{shown}")
    return "\n".join(lines)


def _fail(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[red]{message}[/red]", highlight=False)
    raise typer.Exit(1)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(_plain(value), indent=2, sort_keys=True))


def _emit(value: Any, as_json: bool, table: Callable[[Any], Table]) -> None:
    if as_json:
        _echo_json(value)
    else:
        _out().print(table(value))


def _money(value: float | None) -> str:
    return "-" if value is None else format_usd(value)


def _spend(spend: float, budget: float | None) -> str:
    if budget is None:
        return _money(spend)
    share = spend / budget if budget > 0 else float("inf")
    color = "red" if share >= 1.0 else "yellow" if share >= 0.5 else "green"
    return f"{_money(spend)} / {_money(budget)} [{color}]({share:,.0%})[/{color}]"


def _table(title: str, columns: tuple[str, ...], **options: Any) -> Table:
    """A table whose cells fold onto more lines in a narrow terminal instead of being cut
    with an ellipsis (ids, names and headers stay whole)."""
    table = Table(title=title, **options)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


# ===================================================================== tenants
def _tenant_table(tenants: list[Any]) -> Table:
    table = _table("tenants", ("id", "name", "policy", "scope", "weights (q, cost, lat)",
                               "today", "this month", "when spent"))
    for t in tenants:
        w = t.weights
        table.add_row(t.id, t.name, t.policy, t.scope, f"{w.quality:g}, {w.cost:g}, {w.latency:g}",
                      _spend(t.spend_usd_today, t.budget_usd_per_day),
                      _spend(t.spend_usd_month, t.budget_usd_per_month), t.on_budget_exhausted)
    return table


def _print_key(created: Any, as_json: bool) -> None:
    """A key shown once, printed whole on a line of its own: never in a table, which cuts
    cells to the terminal's width (and to 80 columns when piped)."""
    if as_json:
        _echo_json(created)
        return
    typer.echo(f"tenant {created.name}, id {created.id}")
    typer.echo("API key (shown once, store it now):")
    typer.echo(created.api_key)


@tenants_app.command("create")
def tenants_create(name: Annotated[str, typer.Argument(help="Tenant name.")],
                   url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Create a tenant and print its API key (shown once)."""
    with _client(url, key) as client:
        _print_key(client.create_tenant(name), as_json)


@tenants_app.command("list")
def tenants_list(url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Every tenant with its settings and spend against its budgets."""
    with _client(url, key) as client:
        _emit(client.list_tenants(), as_json, _tenant_table)


@tenants_app.command("rotate-key")
def tenants_rotate_key(tenant_id: Annotated[str, typer.Argument(help="Tenant id or name.")],
                       url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Replace a tenant's API key; the old one stops working."""
    with _client(url, key) as client:
        _print_key(client.rotate_tenant_key(tenant_id), as_json)


# ====================================================================== models
def _model_table(models: Any) -> Table:
    models = models if isinstance(models, list) else [models]
    table = _table("models", ("name", "input $ per Mtok", "output $ per Mtok",
                              "prior cost per request", "prior quality", "upstream", "state"))
    for m in models:
        state = "deleted" if m.deleted else "enabled" if m.enabled else "disabled"
        color = {"enabled": "green", "disabled": "yellow", "deleted": "red"}[state]
        # The chat endpoint's upstream; the key's variable name, never a key.
        upstream = f"{m.base_url} ({m.upstream_model or m.name})" if m.base_url else "-"
        table.add_row(m.name, f"{m.input_price_per_mtok:g}", f"{m.output_price_per_mtok:g}",
                      _money(m.prior_cost_usd),
                      "-" if m.prior_quality is None else f"{m.prior_quality:g}",
                      upstream + (f" key ${m.api_key_env}" if m.api_key_env else ""),
                      f"[{color}]{state}[/{color}]")
    return table


InputPrice = Annotated[float, typer.Option("--input-price", min=0.0,
                                           help="USD per million input tokens.")]
OutputPrice = Annotated[float, typer.Option("--output-price", min=0.0,
                                            help="USD per million output tokens.")]


@models_app.command("add")
def models_add(name: Annotated[str, typer.Argument(help="Model name, as your gateway calls it.")],
               input_price: InputPrice, output_price: OutputPrice,
               prior_quality: Annotated[float | None, typer.Option(
                   min=0.0, max=1.0, help="Expected quality 0..1 (lets a new model compete "
                   "in the greedy branch at once).")] = None,
               disabled: Annotated[bool, typer.Option(help="Register it disabled.")] = False,
               base_url: Annotated[str | None, typer.Option(help="Its OpenAI-compatible "
                   "API, where POST /v1/chat/completions forwards it.")] = None,
               upstream_model: Annotated[str | None, typer.Option(
                   help="Its name at the upstream (default: NAME).")] = None,
               api_key_env: Annotated[str | None, typer.Option(help="The router's "
                   "environment variable holding the upstream's key (its name).")] = None,
               url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Register a model; it is a candidate from the next decision (with --base-url,
    of the chat endpoint's ``auto`` too)."""
    with _client(url, key) as client:
        _emit(client.add_model(name, input_price, output_price, enabled=not disabled,
                               prior_quality=prior_quality, base_url=base_url,
                               upstream_model=upstream_model, api_key_env=api_key_env),
              as_json, _model_table)


@models_app.command("list")
def models_list(include_deleted: Annotated[bool, typer.Option(
                    "--all", help="Include deleted models.")] = False,
                url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """The model registry."""
    with _client(url, key) as client:
        _emit(client.list_models(include_deleted), as_json, _model_table)


@models_app.command("price")
def models_price(name: Annotated[str, typer.Argument(help="Model name.")],
                 input_price: Annotated[float | None, typer.Option(
                     "--input-price", min=0.0, help="USD per million input tokens.")] = None,
                 output_price: Annotated[float | None, typer.Option(
                     "--output-price", min=0.0, help="USD per million output tokens.")] = None,
                 url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Change a model's prices (learned statistics are kept)."""
    changes = {k: v for k, v in (("input_price_per_mtok", input_price),
                                 ("output_price_per_mtok", output_price)) if v is not None}
    if not changes:
        _fail("give --input-price and/or --output-price")
    with _client(url, key) as client:
        _emit(client.update_model(name, **changes), as_json, _model_table)


def _set_enabled(name: str, enabled: bool, url: str, key: str, as_json: bool) -> None:
    with _client(url, key) as client:
        _emit(client.update_model(name, enabled=enabled), as_json, _model_table)


@models_app.command("enable")
def models_enable(name: Annotated[str, typer.Argument(help="Model name.")],
                  url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Make a model a candidate again."""
    _set_enabled(name, True, url, key, as_json)


@models_app.command("disable")
def models_disable(name: Annotated[str, typer.Argument(help="Model name.")],
                   url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Stop routing to a model (its statistics are kept)."""
    _set_enabled(name, False, url, key, as_json)


# ================================================================= preferences
def _prefs_table(p: Any) -> Table:
    table = _table("preferences", ("field", "value"), show_header=False)
    rows = [("quality weight", f"{p.weights.quality:g}"),
            ("cost weight (per USD)", f"{p.weights.cost:g}"),
            ("latency weight (per s)", f"{p.weights.latency:g}"),
            ("policy", p.policy), ("scope", p.scope),
            ("budget per day", _money(p.budget_usd_per_day)),
            ("budget per month", _money(p.budget_usd_per_month)),
            ("when the budget is spent", p.on_budget_exhausted),
            ("baseline model (guard)", p.baseline_model or "- (guard off)"),
            ("max exploration loss", f"{p.max_exploration_loss:g}")]
    for row in rows:
        table.add_row(*row)
    return table


@preferences_app.command("get")
def preferences_get(tenant: TenantId = None, url: Url = DEFAULT_URL, key: Key = "",
                    as_json: AsJson = False) -> None:
    """Show a tenant's preferences."""
    with _client(url, key) as client:
        _emit(client.get_preferences(tenant), as_json, _prefs_table)


@preferences_app.command("set")
def preferences_set(
        tenant: TenantId = None,
        quality: Annotated[float | None, typer.Option(min=0.0, help="Quality weight.")] = None,
        cost: Annotated[float | None, typer.Option(
            min=0.0, help="Quality points per USD (200: a 0.01 USD saving is worth 2 "
            "quality points).")] = None,
        latency: Annotated[float | None, typer.Option(
            min=0.0, help="Quality points per second.")] = None,
        policy: Annotated[str | None, typer.Option(help="linucb or thompson.")] = None,
        scope: Annotated[str | None, typer.Option(help="shared or isolated.")] = None,
        budget_day: Annotated[float | None, typer.Option(min=0.0, help="USD per day.")] = None,
        budget_month: Annotated[float | None, typer.Option(
            min=0.0, help="USD per month.")] = None,
        # One flag each (typer would otherwise add a --no-no-... negation).
        no_budget_day: Annotated[bool, typer.Option(
            "--no-budget-day", help="Remove the daily budget.")] = False,
        no_budget_month: Annotated[bool, typer.Option(
            "--no-budget-month", help="Remove the monthly budget.")] = False,
        on_exhausted: Annotated[str | None, typer.Option(
            help="cheapest or reject.")] = None,
        baseline_model: Annotated[str | None, typer.Option(
            help="The model the tenant would call without the router: guarded "
            "exploration never lets the cumulative reward fall further below it than "
            "--max-exploration-loss.")] = None,
        no_baseline_model: Annotated[bool, typer.Option(
            "--no-baseline-model", help="Turn guarded exploration off.")] = False,
        max_exploration_loss: Annotated[float | None, typer.Option(
            help="Fraction of the baseline's cumulative reward exploration may cost, "
            "0..1 (default 0.02).")] = None,
        url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Change only the given fields; the next decision uses them."""
    changes: dict[str, Any] = {k: v for k, v in (
        ("policy", policy), ("scope", scope), ("budget_usd_per_day", budget_day),
        ("budget_usd_per_month", budget_month), ("on_budget_exhausted", on_exhausted),
        ("baseline_model", baseline_model), ("max_exploration_loss", max_exploration_loss))
        if v is not None}
    if no_baseline_model:
        changes["baseline_model"] = None
    if no_budget_day:
        changes["budget_usd_per_day"] = None
    if no_budget_month:
        changes["budget_usd_per_month"] = None
    weights_given = any(v is not None for v in (quality, cost, latency))
    if not changes and not weights_given:
        _fail("nothing to change: give at least one option (see --help)")
    with _client(url, key) as client:
        weights = None
        if weights_given:
            # The API takes the three weights together: keep the ones not given.
            current = client.get_preferences(tenant).weights
            weights = {"quality": current.quality if quality is None else quality,
                       "cost": current.cost if cost is None else cost,
                       "latency": current.latency if latency is None else latency}
        _emit(client.put_preferences(tenant, weights=weights, **changes), as_json,
              _prefs_table)


# ======================================================================= usage
def _usage_table(u: Any) -> Table:
    table = _table(f"usage of tenant {u.tenant_id}", ("period", "decisions",
                                                      "spend / budget"))
    table.add_row("today (UTC)", str(u.decisions_today),
                  _spend(u.spend_usd_today, u.budget_usd_per_day))
    table.add_row("this month", str(u.decisions_month),
                  _spend(u.spend_usd_month, u.budget_usd_per_month))
    for model, share in sorted(u.model_share_month.items(), key=lambda kv: -kv[1]):
        table.add_row(f"  {model}", f"{share:.1%} of the month", "")
    return table


def usage(tenant: TenantId = None, url: Url = DEFAULT_URL, key: Key = "",
          as_json: AsJson = False) -> None:
    """A tenant's decisions, spend against budget and model shares."""
    with _client(url, key) as client:
        _emit(client.usage(tenant), as_json, _usage_table)


# ================================================================== admin keys
def _admin_keys_table(keys: list[dict[str, Any]]) -> Table:
    table = _table("admin keys", ("id", "source", "fingerprint", "created", "accepted",
                                  "yours"))
    for k in keys:
        table.add_row("-" if k["id"] is None else str(k["id"]), k["source"], k["fingerprint"],
                      k["created_at"] or "-", "yes" if k["accepted"] else "[red]no[/red]",
                      "yes" if k["current"] else "")
    return table


@admin_keys_app.command("create")
def admin_keys_create(url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Create an admin key and print it (shown once)."""
    with _client(url, key) as client:
        created = client.admin_request("POST", "/v1/admin/keys")
    if as_json:
        _echo_json(created)
        return
    typer.echo(f"admin key id {created['id']}, fingerprint {created['fingerprint']}")
    typer.echo("admin key (shown once, store it now):")
    typer.echo(created["api_key"])


@admin_keys_app.command("list")
def admin_keys_list(url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Every admin key (never the keys themselves): id, fingerprint, whether accepted."""
    with _client(url, key) as client:
        _emit(client.admin_request("GET", "/v1/admin/keys"), as_json, _admin_keys_table)


@admin_keys_app.command("revoke")
def admin_keys_revoke(key_id: Annotated[int, typer.Argument(help="Admin key id (from "
                                                            "admin-keys list).")],
                      url: Url = DEFAULT_URL, key: Key = "") -> None:
    """Revoke a stored admin key; it is refused from now on (the last one cannot be)."""
    with _client(url, key) as client:
        client.admin_request("DELETE", f"/v1/admin/keys/{key_id}")
    typer.echo(f"admin key {key_id} revoked")


# ================================================================ reservations
OlderThan = Annotated[float | None, typer.Option(
    "--older-than-hours",
    help="Age limit in hours (> 0; the service checks it); default its "
    "RESERVATION_STALE_HOURS.")]
ReservationTenant = Annotated[str | None, typer.Option(
    "--tenant", help="A tenant's id or name; default every tenant.")]


def _reservations_table(r: dict[str, Any]) -> Table:
    table = _table(f"reservations older than {r['older_than_hours']:g} h (before "
                   f"{r['cutoff'][:19]} UTC)", ("tenant", "name", "decisions", "reserved",
                                                "oldest"))
    for t in r["tenants"]:
        table.add_row(t["tenant_id"], t["name"], str(t["decisions"]),
                      _money(t["reserved_usd"]), t["oldest"][:19])
    table.add_row("total", "", str(r["decisions"]), _money(r["reserved_usd"]), "")
    return table


@reservations_app.command("list")
def reservations_list(older_than_hours: OlderThan = None, tenant: ReservationTenant = None,
                      url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Per tenant, the decisions older than the limit still charged at their prediction."""
    params = {k: v for k, v in (("older_than_hours", older_than_hours),
                                ("tenant", tenant)) if v is not None}
    with _client(url, key) as client:
        _emit(client.admin_request("GET", "/v1/admin/reservations", params=params), as_json,
              _reservations_table)


@reservations_app.command("release")
def reservations_release(older_than_hours: OlderThan = None,
                         tenant: ReservationTenant = None, url: Url = DEFAULT_URL,
                         key: Key = "", as_json: AsJson = False) -> None:
    """Charge 0 instead of the prediction for those decisions: the budgets get it back."""
    body = {k: v for k, v in (("older_than_hours", older_than_hours), ("tenant", tenant))
            if v is not None}
    with _client(url, key) as client:
        released = client.admin_request("POST", "/v1/admin/reservations/release", json=body)
    if as_json:
        _echo_json(released)
    else:
        typer.echo(f"released {released['decisions']} reservation(s) older than "
                   f"{released['older_than_hours']:g} h: {_money(released['released_usd'])}")


# ======================================================================= state
StatePath = Annotated[Path, typer.Argument(help="State file (JSON).", dir_okay=False)]


@state_app.command("export")
def state_export(path: StatePath, url: Url = DEFAULT_URL, key: Key = "") -> None:
    """Write every policy's statistics, with their featurizer and dimension, to PATH."""
    with _client(url, key) as client:
        state = client.admin_request("GET", "/v1/admin/state")
    path.write_text(json.dumps(state, indent=1))
    typer.echo(f"{len(state['policies'])} policies ({state['featurizer']}, "
               f"{state['context_dim']} dimensions) written to {path}")


@state_app.command("import")
def state_import(path: Annotated[Path, typer.Argument(
                     help="State file (bandit-router warmstart or state export).",
                     exists=True, dir_okay=False)],
                 url: Url = DEFAULT_URL, key: Key = "", as_json: AsJson = False) -> None:
    """Load a warm start or an exported state into the service (replaces what it learned
    for those policies; checked first: featurizer, dimension, models)."""
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(f"{path} is not a state file (JSON): {err}")
    with _client(url, key) as client:
        imported = client.admin_request("PUT", "/v1/admin/state", json=state)
    if as_json:
        _echo_json(imported)
        return
    typer.echo(f"loaded {', '.join(imported['loaded'])} ({imported['featurizer']}, "
               f"{imported['context_dim']} dimensions)")
    for skipped, why in imported["skipped"].items():
        typer.echo(f"skipped {skipped}: {why}")

