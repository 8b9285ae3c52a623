"""The status page's trends: the last 24 hours as small inline SVG charts (no script,
nothing loaded from elsewhere), server-rendered from three grouped queries.

* each model's share of the decisions, per hour (stacked bars);
* each model's mean reward of the feedback received, per hour (one line per model; the
  reward under each tenant's current weights, in quality points, as in the tables);
* each tenant's spend through the current UTC day, cumulative per hour, against its
  daily budget (a dashed line).

An hour is a bucket of the last 24 (``hours ago``); the queries group by a ``CASE`` of
24 time ranges, so the same SQL runs on SQLite and PostgreSQL and the work is one pass
over the day's rows, never a row per decision in Python. Each chart carries its numbers
in ``data-*`` attributes (and ``<title>`` tooltips) for tests and for people.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.budget import format_usd
from service.db import models as m
from service.routing import RoutingService

__all__ = ["Trends", "gather_trends", "render_trends", "HOURS"]

HOURS = 24
_HOUR = timedelta(hours=1)
_COLORS = ("#4c7bd9", "#e07b39", "#3ba55c", "#9b59b6", "#d9534f", "#17a2b8", "#e0a800",
           "#6c757d")
_W, _H, _PAD = 480, 140, 28  # chart size and left / bottom margin (px)


@dataclass
class Trends:
    start: datetime  # the start of the first hour of the last 24
    day0: datetime  # the start of the current UTC day
    # model -> 24 decision counts, hour 0 = 24 hours ago
    decisions: dict[str, list[int]] = field(default_factory=dict)
    # model -> 24 mean rewards (None: no feedback that hour)
    rewards: dict[str, list[float | None]] = field(default_factory=dict)
    # tenant id -> cumulative spend at the end of each hour of today so far
    spend: dict[str, list[float]] = field(default_factory=dict)


def _bucket(column: Any, start: datetime, n: int) -> Any:
    """The hour index 0..n-1 of ``column`` (rows from ``start`` on), as SQL. At least
    one WHEN even for n == 1 (today's first hour): ``CASE ELSE 0 END`` is not SQL."""
    return case(*[(column < start + _HOUR * (i + 1), i) for i in range(max(n - 1, 1))],
                else_=n - 1)


def gather_trends(service: RoutingService, session: Session, now: datetime) -> Trends:
    start = now.replace(minute=0, second=0, microsecond=0) - _HOUR * (HOURS - 1)
    day0 = now.replace(hour=0, minute=0, second=0, microsecond=0)
    trends = Trends(start, day0)
    hour = _bucket(m.DecisionRow.created_at, start, HOURS)
    for model, i, n in session.execute(
            select(m.DecisionRow.model, hour, func.count())
            .where(m.DecisionRow.created_at >= start).group_by(m.DecisionRow.model, hour)):
        trends.decisions.setdefault(model, [0] * HOURS)[int(i)] += int(n)

    fb_hour = _bucket(m.Feedback.created_at, start, HOURS)
    sums: dict[str, list[list[float]]] = defaultdict(lambda: [[0.0, 0] for _ in range(HOURS)])
    weights = {t.id: t.preferences for t in list(service.tenants.values())}
    for model, tenant_id, i, n, q, c, lat in session.execute(
            select(m.DecisionRow.model, m.Feedback.tenant_id, fb_hour, func.count(),
                   func.sum(func.coalesce(m.Feedback.quality, 0.0)),
                   func.sum(func.coalesce(m.Feedback.cost_usd, 0.0)),
                   func.sum(func.coalesce(m.Feedback.latency_ms, 0.0)))
            .join(m.DecisionRow, m.DecisionRow.id == m.Feedback.decision_id)
            .where(m.Feedback.created_at >= start)
            .group_by(m.DecisionRow.model, m.Feedback.tenant_id, fb_hour)):
        prefs = weights.get(tenant_id)
        if prefs is None:
            continue
        # The reward is linear in the outcome: the sum of rewards is the reward of sums.
        cell = sums[model][int(i)]
        cell[0] += prefs.reward(quality=float(q), cost_usd=float(c), latency_ms=float(lat))
        cell[1] += int(n)
    trends.rewards = {model: [total / n if n else None for total, n in cells]
                      for model, cells in sums.items()}

    hours_today = int((now - day0) / _HOUR) + 1
    day_hour = _bucket(m.DecisionRow.created_at, day0, hours_today)
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0] * hours_today)
    for tenant_id, i, usd in session.execute(
            select(m.DecisionRow.tenant_id, day_hour, func.sum(m.DecisionRow.charged_usd))
            .where(m.DecisionRow.created_at >= day0)
            .group_by(m.DecisionRow.tenant_id, day_hour)):
        spent[tenant_id][int(i)] += float(usd or 0.0)
    for tenant_id, per_hour in spent.items():
        running, cumulative = 0.0, []
        for usd in per_hour:
            running += usd
            cumulative.append(running)
        trends.spend[tenant_id] = cumulative
    return trends


# ------------------------------------------------------------------ rendering
def _svg(ident: str, label: str, inner: str, **data: str) -> str:
    attrs = "".join(f" data-{k}='{html.escape(v)}'" for k, v in data.items())
    return (f"<svg id={ident} class=trend role=img viewBox='0 0 {_W} {_H}' width={_W} "
            f"height={_H} xmlns='http://www.w3.org/2000/svg'{attrs}><title>"
            f"{html.escape(label)}</title>{inner}</svg>")


def _axes(labels: tuple[str, str, str], top: str, bottom: str) -> str:
    x0, y1 = _PAD, _H - 16
    return (f"<line x1={x0} y1=4 x2={x0} y2={y1} stroke='#99a' />"
            f"<line x1={x0} y1={y1} x2={_W} y2={y1} stroke='#99a' />"
            f"<text x=2 y=12 font-size=10 fill='#667'>{html.escape(top)}</text>"
            f"<text x=2 y={y1} font-size=10 fill='#667'>{html.escape(bottom)}</text>"
            + "".join(f"<text x={x} y={_H - 3} font-size=10 fill='#667' text-anchor={a}>"
                      f"{html.escape(t)}</text>" for (x, a), t in zip(
                          ((x0, "start"), ((x0 + _W) // 2, "middle"), (_W - 2, "end")),
                          labels, strict=True)))


def _x(i: float, n: int) -> float:
    return _PAD + (_W - _PAD - 4) * i / n


def _y(value: float, low: float, high: float) -> float:
    span = high - low or 1.0
    return (_H - 16) - (_H - 22) * (value - low) / span


def _legend(models: list[str]) -> str:
    return "<p class=legend>" + " ".join(
        f"<span data-legend='{html.escape(name)}'><i style='background:"
        f"{_COLORS[k % len(_COLORS)]}'></i>{html.escape(name)}</span>"
        for k, name in enumerate(models)) + "</p>"


def _share_chart(trends: Trends, models: list[str]) -> str:
    totals = [sum(trends.decisions.get(name, [0] * HOURS)[i] for name in models)
              for i in range(HOURS)]
    bars = []
    width = (_W - _PAD - 4) / HOURS - 1
    for i, total in enumerate(totals):
        if not total:
            continue
        y = float(_H - 16)
        for k, name in enumerate(models):
            n = trends.decisions.get(name, [0] * HOURS)[i]
            if not n:
                continue
            share = n / total
            h = (_H - 22) * share
            y -= h
            hour = (trends.start + _HOUR * i).strftime("%H:00")
            bars.append(f"<rect x={_x(i, HOURS):.1f} y={y:.1f} width={width:.1f} "
                        f"height={h:.1f} fill='{_COLORS[k % len(_COLORS)]}' "
                        f"data-model='{html.escape(name)}' data-hour={i} "
                        f"data-share='{share:.4f}'><title>{html.escape(name)}, {hour} UTC: "
                        f"{share:.0%} of {total}</title></rect>")
    return _svg("trend-share", "share of decisions per hour, last 24 h",
                _axes(("24 h ago", "12 h ago", "now"), "100%", "0%") + "".join(bars),
                decisions=str(sum(totals)))


def _reward_chart(trends: Trends, models: list[str]) -> str:
    values = [v for name in models for v in trends.rewards.get(name, []) if v is not None]
    if not values:
        return _svg("trend-reward", "mean reward per hour: no feedback in the last 24 h",
                    _axes(("24 h ago", "12 h ago", "now"), "", "") +
                    f"<text x={_W // 2} y={_H // 2} text-anchor=middle fill='#667' "
                    "font-size=12>no feedback in the last 24 h</text>")
    low, high = min(min(values), 0.0), max(max(values), 1e-9)
    lines = []
    for k, name in enumerate(models):
        series = trends.rewards.get(name)
        if not series:
            continue
        color = _COLORS[k % len(_COLORS)]
        points = [(i, v) for i, v in enumerate(series) if v is not None]
        path = " ".join(f"{_x(i + 0.5, HOURS):.1f},{_y(v, low, high):.1f}" for i, v in points)
        lines.append(f"<polyline points='{path}' fill=none stroke='{color}' stroke-width=2 "
                     f"data-model='{html.escape(name)}' data-rewards='"
                     + ",".join(f"{i}:{v:.4f}" for i, v in points) + "' />")
        lines += [f"<circle cx={_x(i + 0.5, HOURS):.1f} cy={_y(v, low, high):.1f} r=2.5 "
                  f"fill='{color}'><title>{html.escape(name)}: {v:.3f}</title></circle>"
                  for i, v in points]
    return _svg("trend-reward", "mean reward per hour, last 24 h",
                _axes(("24 h ago", "12 h ago", "now"), f"{high:.3g}", f"{low:.3g}")
                + "".join(lines))


def _spend_chart(trends: Trends, tenant: Any) -> str:
    spend = trends.spend.get(tenant.id, [])
    budget = tenant.budget_usd_per_day
    # Room above the larger of the spend and the budget; a cent when both are nothing.
    high = max([*spend, budget or 0.0]) * 1.1 or 0.01
    path = " ".join(f"{_x(i + 1, HOURS):.1f},{_y(v, 0.0, high):.1f}"
                    for i, v in enumerate(spend))
    inner = _axes(("00:00", "12:00", "24:00 UTC"), format_usd(high), "$0")
    if spend:
        inner += (f"<polyline points='{_x(0, HOURS):.1f},{_y(0, 0, high):.1f} {path}' "
                  "fill=none stroke='#4c7bd9' stroke-width=2 />")
    if budget is not None:
        y = _y(budget, 0.0, high)
        inner += (f"<line x1={_PAD} y1={y:.1f} x2={_W} y2={y:.1f} stroke='#d9534f' "
                  f"stroke-dasharray='5 4' data-budget='{budget:g}'><title>daily budget "
                  f"{format_usd(budget)}</title></line>")
    total = spend[-1] if spend else 0.0
    return _svg(f"trend-spend-{html.escape(tenant.id)}",
                f"{tenant.name}: spend today {format_usd(total)}"
                + ("" if budget is None else f" of {format_usd(budget)}"),
                inner, tenant=tenant.id, spend=f"{total:.6f}",
                hourly=",".join(f"{v:.6f}" for v in spend))


def render_trends(trends: Trends, tenants: list[Any]) -> str:
    models = sorted(set(trends.decisions) | set(trends.rewards))
    spend_rows = "".join(
        f"<tr><td>{html.escape(t.name)}</td><td>{_spend_chart(trends, t)}</td></tr>"
        for t in sorted(tenants, key=lambda t: t.name))
    return (f"<h2>Last 24 hours</h2>{_legend(models)}<div class=charts>"
            f"<figure><figcaption>Share of decisions per hour</figcaption>"
            f"{_share_chart(trends, models)}</figure>"
            f"<figure><figcaption>Mean reward of the feedback per hour</figcaption>"
            f"{_reward_chart(trends, models)}</figure></div>"
            f"<h3>Spend through today (UTC) against the daily budget</h3>"
            f"<table id=spend-trends>{spend_rows or '<tr><td>no tenants yet</td></tr>'}"
            f"</table>")
