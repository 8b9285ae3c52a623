"""``GET /``: the status page. Access rules over ASGI; the rendering in a real headless
chromium (Debian's package, driven by playwright) with a screenshot.

The browser test is marked ``browser``. It skips, saying why, only when chromium or the
playwright library is not installed (``apt-get install chromium``,
``pip install playwright``; ``ops/test.sh`` installs both when it can).
"""

from __future__ import annotations

import base64
import shutil
import struct
import uuid

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.client import RouterClient
from tests.service.conftest import ADMIN_KEY, add_model, create_tenant, decide, make_settings
from tests.service.live import live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def basic(password: str, user: str = "admin") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('status') / 'router.db'}"
    with TestClient(create_app(make_settings(url))) as c:
        yield c


def test_get_status_without_key_401_basic_challenge(client):
    create_tenant(client, "secret-customer")
    r = client.get("/")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Basic realm="bandit-router status"')
    assert r.headers["content-type"].startswith("text/html")
    assert "secret-customer" not in r.text and "admin key" in r.text


def test_get_status_wrong_key_401(client):
    r = client.get("/", headers=basic("bra_not-the-key"))
    assert r.status_code == 401 and "Unknown key" in r.text


def test_get_status_tenant_key_403(client):
    tenant = create_tenant(client, "curious")
    r = client.get("/", headers={"Authorization": tenant["Authorization"]})
    assert r.status_code == 403 and "tenant key" in r.text
    assert "secret-customer" not in r.text


def test_get_status_admin_basic_and_bearer_200(client):
    for headers in (basic(ADMIN_KEY), {"Authorization": f"Bearer {ADMIN_KEY}"}):
        r = client.get("/", headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        assert "secret-customer" in r.text and "<script" not in r.text


def test_get_status_escapes_names(client):
    create_tenant(client, "<img src=x onerror=alert(1)>")
    r = client.get("/", headers=basic(ADMIN_KEY))
    assert "<img src=x" not in r.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in r.text


def test_get_status_share_and_budget_numbers(client):
    names = [add_model(client, "st-a", 1.0, 2.0), add_model(client, "st-b", 0.1, 0.2)]
    tenant = create_tenant(client, "budgeted")
    client.put("/v1/tenants/me/preferences", json={"budget_usd_per_day": 1.0},
               headers=tenant)
    chosen = []
    for seed in range(6):
        body = decide(client, tenant, names, seed=seed).json()
        chosen.append(body["model"])
        client.post("/v1/feedback", json={"decision_id": body["decision_id"],
                                          "cost_usd": 0.1, "quality": 1.0}, headers=tenant)
    page = client.get("/", headers=basic(ADMIN_KEY)).text
    for name in names:
        share = chosen.count(name) / 6
        assert f"<td>{share:.1%} <span class=bar" in page.split(f"data-model='{name}'")[1]
    # 6 x 0.1 USD reported against a 1 USD daily budget.
    row = page.split(f"data-tenant='{tenant['X-Tenant']}'")[1].split("</tr>")[0]
    assert "$0.6000 of $1.0000 (60%)" in row and "class=warn" in row


def test_get_status_tiny_budget_shows_its_digits(client):
    name = add_model(client, "st-tiny", 1.0, 2.0)
    tenant = create_tenant(client, "tiny-budget")
    client.put("/v1/tenants/me/preferences", json={"budget_usd_per_day": 1e-5},
               headers=tenant)
    body = decide(client, tenant, [name]).json()
    client.post("/v1/feedback", json={"decision_id": body["decision_id"], "cost_usd": 0.0204},
                headers=tenant)
    page = client.get("/", headers=basic(ADMIN_KEY)).text
    row = page.split(f"data-tenant='{tenant['X-Tenant']}'")[1].split("</tr>")[0]
    assert "$0.0204 of $0.00001 (204,000%)" in row and "class=over" in row


def test_get_status_trends_last_24h_svg(new_database_url):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from service.db import models as dbm

    with TestClient(create_app(make_settings(new_database_url(), epsilon=0.0))) as c:
        names = [add_model(c, "tr-a", 1.0, 2.0), add_model(c, "tr-b", 1.0, 2.0)]
        tenant = create_tenant(c, "trendy")
        c.put("/v1/tenants/me/preferences", json={"budget_usd_per_day": 0.5}, headers=tenant)
        now = datetime.now(UTC)
        made = []  # (decision id, model)
        for i, name in enumerate([names[0]] * 3 + [names[1]] + [names[0]] * 2):
            body = decide(c, tenant, [name], seed=i).json()
            made.append((body["decision_id"], body["model"]))
        for (decision_id, _), quality in zip(made[:4], (0.5, 1.0, 0.75, 0.25), strict=True):
            c.post("/v1/feedback", json={"decision_id": decision_id, "quality": quality,
                                         "cost_usd": 0.01}, headers=tenant)
        service = c.app.state.routing
        service.writer.flush()
        # The last two decisions were made five hours ago.
        with Session(service.engine) as session, session.begin():
            session.execute(update(dbm.DecisionRow)
                            .where(dbm.DecisionRow.id.in_([d for d, _ in made[4:]]))
                            .values(created_at=now - timedelta(hours=5)))
        page = c.get("/", headers=basic(ADMIN_KEY)).text
    share = page.split("<svg id=trend-share")[1].split("</svg>")[0]
    assert "data-decisions='6'" in share
    # This hour: 3 of tr-a, 1 of tr-b; five hours ago (hour 18 of 0..23): 2 of tr-a.
    assert "data-model='tr-a' data-hour=23 data-share='0.7500'" in share
    assert "data-model='tr-b' data-hour=23 data-share='0.2500'" in share
    assert "data-model='tr-a' data-hour=18 data-share='1.0000'" in share
    reward = page.split("<svg id=trend-reward")[1].split("</svg>")[0]
    # Default weights (quality 1, cost 0): the reward is the quality; tr-a got 0.5, 1, 0.75.
    assert "data-model='tr-a' data-rewards='23:0.7500'" in reward
    assert "data-model='tr-b' data-rewards='23:0.2500'" in reward
    spend = page.split(f"<svg id=trend-spend-{tenant['X-Tenant']}")[1].split("</svg>")[0]
    hourly = [float(v) for v in spend.split("data-hourly='")[1].split("'")[0].split(",")]
    assert len(hourly) == now.hour + 1 and hourly == sorted(hourly)  # cumulative, by hour
    # This hour: the 4 decisions with feedback, 0.01 USD reported each (the two older
    # ones are charged to their own hour, or to yesterday).
    this_hour = hourly[-1] - (hourly[-2] if len(hourly) > 1 else 0.0)
    assert this_hour == pytest.approx(0.04, abs=1e-9)
    assert "data-budget='0.5'" in spend
    assert "<script" not in page


@pytest.mark.parametrize("minute", [0, 15, 59])
def test_status_trends_in_the_first_hour_of_a_utc_day(new_database_url, minute):
    """From 00:00 to 00:59 UTC today has one hour: the spend buckets once. (The status
    page answered 503 for that whole hour: its SQL was ``CASE ELSE 0 END``.)"""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from service.db import models as dbm
    from service.routes.status_trends import gather_trends

    with TestClient(create_app(make_settings(new_database_url(), epsilon=0.0))) as c:
        name = add_model(c, "first-hour", 1.0, 2.0)
        tenant = create_tenant(c, "early")
        body = decide(c, tenant, [name], seed=0).json()
        c.post("/v1/feedback", json={"decision_id": body["decision_id"], "quality": 0.5,
                                     "cost_usd": 0.02}, headers=tenant)
        service = c.app.state.routing
        service.writer.flush()
        now = datetime.now(UTC).replace(hour=0, minute=minute, second=30) - timedelta(days=1)
        with Session(service.engine) as session, session.begin():
            session.execute(update(dbm.DecisionRow)
                            .where(dbm.DecisionRow.id == body["decision_id"])
                            .values(created_at=now - timedelta(seconds=20)))
        with Session(service.engine) as session:
            trends = gather_trends(service, session, now)
        assert trends.spend[tenant["X-Tenant"]] == [pytest.approx(0.02, abs=1e-9)]
        assert c.get("/", headers=basic(ADMIN_KEY)).status_code == 200


# ------------------------------------------------------------------ real browser
def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright library is not installed: pip install playwright "
                    "(ops/test.sh does it)")
    if not shutil.which("chromium") and not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed: apt-get install chromium "
                    "(ops/test.sh does it when it runs as root)")
    return sync_playwright


def launch_chromium(playwright):
    """Debian's chromium, headless, quiet (no background traffic of its own)."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--no-first-run", "--disable-component-update", "--disable-sync"])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.browser
def test_render_status_page_in_chromium_screenshot(tmp_path):
    sync_playwright = _playwright()
    from playwright.sync_api import Error as PlaywrightError
    url = f"sqlite:///{tmp_path / 'router.db'}"
    suffix = uuid.uuid4().hex[:4]
    with live_server(make_settings(url)) as base:
        with RouterClient(base, ADMIN_KEY) as admin:
            models = [admin.add_model(f"fast-{suffix}", 0.1, 0.4).name,
                      admin.add_model(f"smart-{suffix}", 3.0, 15.0, prior_quality=0.9).name]
            acme = admin.create_tenant("Acme Corp")
            admin.put_preferences(acme.id, budget_usd_per_day=2.0, budget_usd_per_month=40.0)
            admin.create_tenant("Globex")
        chosen = []
        with RouterClient(base, acme.api_key) as router:
            for i in range(8):
                chosen.append(router.route(
                    f"question {i}", lambda model: {"output": "ok", "cost_usd": 0.05},
                    candidates=models, quality=lambda _r: 0.75).model)
        shot = tmp_path / "status.png"
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                # No credentials: chromium gets the Basic challenge and, headless with
                # nobody to type a key, abandons the navigation.
                anonymous = browser.new_context()
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    anonymous.new_page().goto(base + "/")
                anonymous.close()

                context = browser.new_context(
                    http_credentials={"username": "admin", "password": ADMIN_KEY},
                    viewport={"width": 1280, "height": 800})
                page = context.new_page()
                response = page.goto(base + "/")
                assert response is not None and response.status == 200
                page.screenshot(path=str(shot), full_page=True)
                text = page.inner_text("body")
                models_text = page.inner_text("#models")
                rows = {name: page.inner_text(f"#models tr[data-model='{name}']")
                        for name in models}
                tenants_text = page.inner_text("#tenants")
                reward = page.inner_text("#mean-reward")
                decisions = page.inner_text("#n-decisions")
                # The 24-hour charts are drawn (inline SVG, laid out with a size).
                charts = {ident: page.locator(f"svg#{ident}").bounding_box()
                          for ident in ("trend-share", "trend-reward",
                                        f"trend-spend-{acme.id}")}
                bars = page.locator("svg#trend-share rect").count()
                reward_points = page.locator("svg#trend-reward circle").count()
            finally:
                browser.close()
    assert "bandit-router status" in text
    assert all(name in models_text for name in models)
    for name in models:
        assert f"{chosen.count(name) / 8:.1%}" in rows[name], rows[name]
    assert "Acme Corp" in tenants_text and "Globex" in tenants_text
    # 8 decisions at 0.05 USD reported each: 0.40 of the 2 USD daily budget.
    assert "$0.4000 of $2.0000 (20%)" in tenants_text
    assert "$0.4000 of $40.0000 (1%)" in tenants_text
    assert decisions == "8"
    assert all(box is not None and box["width"] >= 400 and box["height"] >= 100
               for box in charts.values()), charts
    # One bar per model chosen this hour, one reward point per model with feedback.
    assert bars == len(set(chosen)) and reward_points == len(set(chosen))
    # Default weights (quality 1, cost 0): the reward is the quality.
    assert float(reward) == pytest.approx(0.75, abs=1e-3)
    data = shot.read_bytes()
    width, height = png_size(data)
    assert width == 1280 and height >= 400
    assert len(data) > 20_000, f"a {len(data)}-byte screenshot is too small to show the page"
