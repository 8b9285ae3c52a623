"""``GET /``: the status page, plain server-rendered HTML (no script, no external asset).

It shows every model with its share of recent decisions and the quality and cost the
policies predicted for it, every tenant's spend against its budgets, the reward of
recent feedback, and the last 24 hours as inline SVG charts
(service/routes/status_trends.py): each model's share of decisions and mean reward per
hour, each tenant's spend through the day against its daily budget.

Tenant names and spend are not public: the page needs the **admin key**, sent as
``Authorization: Bearer <key>`` or as the password of HTTP Basic authentication (any
user name). Without it the answer is a 401 with a Basic challenge, so a browser asks
for the key in its own login dialog; the key never appears in a URL (where it would
land in proxy logs and browser history).

"Recent" is the last :data:`RECENT` decisions (newest per tenant through the
``(tenant_id, created_at)`` index, then merged) and the last :data:`RECENT` feedback
rows (by primary key): bounded work however large the tables grow.
"""

from __future__ import annotations

import base64
import binascii
import html
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.budget import format_usd
from service.db import models as m
from service.routes.status_trends import gather_trends, render_trends
from service.routing import RoutingService

router = APIRouter(tags=["status"])

RECENT = 500
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="bandit-router status", charset="UTF-8"'}
_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d2230;background:#f7f8fa}
h1{font-size:1.4rem;margin:0 0 .2rem} h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.muted{color:#667} table{border-collapse:collapse;background:#fff;min-width:40rem}
th,td{padding:.35rem .7rem;border-bottom:1px solid #e3e6ec;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#eef1f6;font-weight:600}
.bar{display:inline-block;height:.7rem;background:#4c7bd9;vertical-align:middle}
.meter{display:inline-block;width:8rem;height:.7rem;background:#e3e6ec;margin-left:.4rem;
vertical-align:middle}.meter span{display:block;height:100%}
.ok{background:#3ba55c}.warn{background:#e0a800}.over{background:#d9534f}
.charts{display:flex;gap:1rem;flex-wrap:wrap} figure{margin:0;background:#fff;
padding:.5rem;border:1px solid #e3e6ec} figcaption{font-weight:600;margin-bottom:.3rem}
.legend span{margin-right:1rem} .legend i{display:inline-block;width:.8rem;height:.8rem;
margin-right:.3rem;vertical-align:middle} h3{font-size:1rem;margin:1.2rem 0 .4rem}
#spend-trends td{text-align:left}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#fff;padding:.7rem 1rem;
border:1px solid #e3e6ec;min-width:9rem}.card b{display:block;font-size:1.3rem}
"""


def _key_from(request: Request) -> str | None:
    header = request.headers.get("authorization") or ""
    scheme, _, value = header.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>")


def _denied(status: int, message: str) -> HTMLResponse:
    body = (f"<h1>bandit-router</h1><p>{html.escape(message)}</p><p class=muted>The status "
            "page needs the admin key: as the password of the browser's login dialog (any "
            "user name) or as <code>Authorization: Bearer &lt;key&gt;</code>.</p>")
    return HTMLResponse(_page("bandit-router: sign in", body), status_code=status,
                        headers=_CHALLENGE if status == 401 else None)


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else fmt.format(value)


def _usd(value: float | None) -> str:
    return "–" if value is None else format_usd(value)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _recent_decisions(session: Session, tenant_ids: list[str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for tenant_id in tenant_ids:
        rows.extend(session.execute(
            select(m.DecisionRow.created_at, m.DecisionRow.model, m.DecisionRow.predictions,
                   m.DecisionRow.propensity)
            .where(m.DecisionRow.tenant_id == tenant_id)
            .order_by(m.DecisionRow.created_at.desc()).limit(RECENT)).all())
    rows.sort(key=lambda r: m.as_utc(r[0]), reverse=True)
    return rows[:RECENT]


def _gather(service: RoutingService) -> dict[str, Any]:
    tenants = list(service.tenants.values())
    service.writer.flush(timeout=2.0)
    with Session(service.engine) as session:
        trends = gather_trends(service, session, datetime.now(UTC))
        decisions = _recent_decisions(session, [t.id for t in tenants])
        feedback = session.execute(
            select(m.Feedback.tenant_id, m.DecisionRow.model, m.Feedback.quality,
                   m.Feedback.cost_usd, m.Feedback.latency_ms)
            .join(m.DecisionRow, m.DecisionRow.id == m.Feedback.decision_id)
            .order_by(m.Feedback.id.desc()).limit(RECENT)).all()
    by_id = {t.id: t for t in tenants}
    chosen: dict[str, int] = defaultdict(int)
    predicted: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for _at, model, predictions, _p in decisions:
        chosen[model] += 1
        for name, p in (predictions or {}).items():
            for key in ("quality", "cost_usd"):
                if p.get(key) is not None:
                    predicted[name][key].append(float(p[key]))
    rewards: dict[str, list[float]] = defaultdict(list)
    observed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tenant_id, model, quality, cost, latency in feedback:
        tenant = by_id.get(tenant_id)
        if tenant is not None:
            # Each tenant's reward under its own current weights (quality points).
            rewards[model].append(tenant.preferences.reward(
                quality=quality or 0.0, cost_usd=cost or 0.0, latency_ms=latency or 0.0))
        for key, value in (("quality", quality), ("cost_usd", cost)):
            if value is not None:
                observed[model][key].append(float(value))
    return {"tenants": tenants, "decisions": len(decisions), "feedback": len(feedback),
            "chosen": chosen, "predicted": predicted, "rewards": rewards,
            "observed": observed, "trends": trends}


def _upstream(state: Any) -> str:
    """Where /v1/chat/completions forwards the model: its URL and the NAME of its key's
    environment variable (never the key)."""
    if state is None or not state.base_url:
        return "-"
    out = html.escape(state.base_url)
    if state.upstream_model:
        out += f" as {html.escape(state.upstream_model)}"
    if state.api_key_env:
        out += f" (key: ${html.escape(state.api_key_env)})"
    return out


def _models_table(service: RoutingService, data: dict[str, Any]) -> str:
    names = sorted(set(service.models) | set(data["chosen"]))
    total = max(data["decisions"], 1)
    rows = []
    for name in names:
        state = service.models.get(name)
        status = "removed" if state is None else "enabled" if state.enabled else "disabled"
        share = data["chosen"].get(name, 0) / total
        pred, seen = data["predicted"].get(name, {}), data["observed"].get(name, {})
        rows.append(
            f"<tr data-model='{html.escape(name)}'><td>{html.escape(name)}</td>"
            f"<td>{status}</td><td>{share:.1%} <span class=bar style='width:{share * 6:.2f}rem'>"
            f"</span></td><td>{_num(_mean(pred.get('quality', [])))}</td>"
            f"<td>{_usd(_mean(pred.get('cost_usd', [])))}</td>"
            f"<td>{_num(_mean(seen.get('quality', [])))}</td>"
            f"<td>{_usd(_mean(seen.get('cost_usd', [])))}</td>"
            f"<td>{_num(_mean(data['rewards'].get(name, [])))}</td>"
            f"<td>{_upstream(state)}</td></tr>")
    head = ("<tr><th>model</th><th>state</th><th>share of recent decisions</th>"
            "<th>predicted quality</th><th>predicted cost</th><th>reported quality</th>"
            "<th>reported cost</th><th>mean reward</th><th>upstream</th></tr>")
    body = "".join(rows) or "<tr><td colspan=9>no models yet</td></tr>"
    return f"<table id=models>{head}{body}</table>"


def _meter(spend: float, budget: float | None) -> str:
    if budget is None:
        return f"{_usd(spend)} <span class=muted>(no budget)</span>"
    share = spend / budget if budget > 0 else (1.0 if spend > 0 else 0.0)
    level = "over" if share >= 1.0 else "warn" if share >= 0.5 else "ok"
    return (f"{_usd(spend)} of {_usd(budget)} ({share:,.0%})<span class=meter>"
            f"<span class={level} style='width:{min(share, 1.0) * 100:.0f}%'></span></span>")


def _tenants_table(tenants: list[Any]) -> str:
    rows = []
    for t in sorted(tenants, key=lambda t: t.name):
        day, month = t.ledger.snapshot()
        rows.append(f"<tr data-tenant='{html.escape(t.id)}'><td>{html.escape(t.name)}</td>"
                    f"<td>{html.escape(t.policy)} / {html.escape(t.scope)}</td>"
                    f"<td>{_meter(day, t.budget_usd_per_day)}</td>"
                    f"<td>{_meter(month, t.budget_usd_per_month)}</td></tr>")
    head = ("<tr><th>tenant</th><th>policy / scope</th><th>spend today (UTC)</th>"
            "<th>spend this month</th></tr>")
    body = "".join(rows) or "<tr><td colspan=4>no tenants yet</td></tr>"
    return f"<table id=tenants>{head}{body}</table>"


def _guard_table(service: RoutingService, tenants: list[Any]) -> str:
    """Guarded tenants: the estimated value against the baseline and the guard's room."""
    rows = []
    for t in sorted(tenants, key=lambda t: t.name):
        report = service.guard_report(t)
        if report is None:
            continue
        per_round = (report["value_vs_baseline"] / report["value_rounds"]
                     if report["value_rounds"] else None)
        rows.append(
            f"<tr data-guard='{html.escape(t.id)}'><td>{html.escape(t.name)}</td>"
            f"<td>{html.escape(str(report['baseline_model']))}</td>"
            f"<td>{report['max_exploration_loss']:.1%}</td>"
            f"<td>{report['rounds']}</td><td>{report['non_baseline_plays']}</td>"
            f"<td class=value>{_num(report['value_vs_baseline'], '{:+.3f}')}</td>"
            f"<td>{_num(per_round, '{:+.4f}')}</td>"
            f"<td>{_num(report['lower_bound_gap'], '{:+.3f}')} / "
            f"{_num(-report['allowance'], '{:+.3f}')}</td></tr>")
    if not rows:
        return ("<p class=muted id=guards>No tenant has a baseline model (guarded "
                "exploration is off).</p>")
    head = ("<tr><th>tenant</th><th>baseline</th><th>max loss</th><th>guarded decisions</th>"
            "<th>non-baseline plays</th><th>value vs baseline</th><th>per decision</th>"
            "<th>lower bound / allowed</th></tr>")
    return f"<table id=guards>{head}{''.join(rows)}</table>"


def render(service: RoutingService) -> str:
    data = _gather(service)
    all_rewards = [r for values in data["rewards"].values() for r in values]
    mean_reward = _mean(all_rewards)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    cards = "".join(
        f"<div class=card><span class=muted>{label}</span><b id={ident}>{value}</b></div>"
        for label, ident, value in (
            ("models routed to", "n-models", str(sum(s.enabled for s in service.models.values()))),
            ("tenants", "n-tenants", str(len(data["tenants"]))),
            ("recent decisions", "n-decisions", str(data["decisions"])),
            ("recent feedback", "n-feedback", str(data["feedback"])),
            ("mean recent reward", "mean-reward", _num(mean_reward))))
    body = (f"<h1>bandit-router status</h1><p class=muted>{now}. Recent = the last "
            f"{RECENT} decisions and feedback events. Reward in quality points, under "
            f"each tenant's current weights.</p><div class=cards>{cards}</div>"
            f"<h2>Models</h2>{_models_table(service, data)}"
            f"<h2>Tenants: spend against budget</h2>{_tenants_table(data['tenants'])}"
            "<h2>Guarded exploration: value against the baseline</h2><p class=muted>Value "
            "= doubly robust estimate of the cumulative reward of the router minus the "
            "baseline model's, over the decisions with feedback (reward units). The guard "
            "plays the baseline whenever exploring could take its lower bound below the "
            "allowed loss.</p>"
            f"{_guard_table(service, data['tenants'])}"
            f"{render_trends(data['trends'], data['tenants'])}")
    return _page("bandit-router status", body)


# A sync route (thread pool): it reads the database.
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def status_page(request: Request) -> HTMLResponse:
    service: RoutingService = request.app.state.routing
    key = _key_from(request)
    if key is None:
        return _denied(401, "Sign in with the admin key.")
    if not service.is_admin_key(key):
        if service.tenant_for_key(key) is not None:
            return _denied(403, "A tenant key cannot open the status page.")
        return _denied(401, "Unknown key.")
    return HTMLResponse(render(service), headers={"Cache-Control": "no-store"})
