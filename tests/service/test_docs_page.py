"""``GET /docs``: Swagger UI renders in a real headless chromium with every request
outside the service refused, as on an air-gapped host: its script and style come from the
installed package (fastapi-offline), not from a CDN. Marked ``browser``; skips, saying
why, only when chromium or the playwright library is missing (see test_status_page.py).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from tests.service.conftest import make_settings
from tests.service.live import live_server
from tests.service.test_status_page import _playwright, launch_chromium, png_size


def test_get_docs_html_points_at_local_assets(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(make_settings(f"sqlite:///{tmp_path / 'r.db'}"))) as client:
        page = client.get("/docs").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert assets and all(a.startswith("/") for a in assets), assets  # none off-host
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, (asset, r.status_code)
        assert any(a.endswith("swagger-ui-bundle.js") for a in assets)


@pytest.mark.browser
def test_render_docs_page_air_gapped_in_chromium_screenshot(tmp_path):
    sync_playwright = _playwright()
    outside: list[tuple[str, str]] = []  # (url, resource type) of refused requests
    with live_server(make_settings(f"sqlite:///{tmp_path / 'router.db'}")) as base:
        here = urlsplit(base).netloc
        shot = tmp_path / "docs.png"
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 900})

                def air_gap(route):
                    if urlsplit(route.request.url).netloc == here:
                        route.continue_()
                    else:
                        outside.append((route.request.url, route.request.resource_type))
                        route.abort("internetdisconnected")

                context.route("**/*", air_gap)
                page = context.new_page()
                response = page.goto(base + "/docs")
                assert response is not None and response.status == 200
                # Swagger UI has fetched /openapi.json and drawn one block per operation.
                page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
                operations = page.locator(".swagger-ui .opblock").count()
                decide = page.inner_text(".opblock-post:has-text('/v1/decide')")
                title = page.inner_text(".swagger-ui .title")
                page.screenshot(path=str(shot), full_page=False)
                from_docs = list(outside)
                redoc = context.new_page()
                redoc.goto(base + "/redoc")
                redoc.wait_for_selector("h1:has-text('bandit-router')", timeout=20_000)
            finally:
                browser.close()
    assert from_docs == []
    # ReDoc (also from the package) renders too; only its "powered by" logo is off-host.
    assert all(kind == "image" for _, kind in outside), outside
    assert "bandit-router" in title
    assert "/v1/decide" in decide
    assert operations >= 15
    data = shot.read_bytes()
    assert png_size(data) == (1280, 900)
    assert len(data) > 30_000, f"a {len(data)}-byte screenshot is too small to show the page"
