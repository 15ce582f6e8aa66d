"""The map page in a real browser: headless Chromium (the system's, driven by Playwright) loads the
page, asks a question, waits for the heatmap overlay, reads the top-k list against `aether
retrieve`'s, and clicks a place for "places like this". Without Chromium the tests skip, except
where AETHER_REQUIRE_BROWSER=1 (CI sets it), where they fail. With AETHER_SCREENSHOTS=DIR they
save the pictures the docs show."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import aether

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
if CHROMIUM is None and os.environ.get("AETHER_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium on this machine (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "AETHER_REQUIRE_BROWSER=1 but no Chromium: apt-get install chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def shoot(page, name: str) -> None:
    folder = os.environ.get("AETHER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def test_ask_a_question_and_click_a_place(served, browser, tmp_path):
    url, tmp, ckpt, emb = served
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']", timeout=20_000)
    assert page.locator(".leaflet-tile-loaded").count() > 0 or page.wait_for_selector(".leaflet-tile-loaded")

    text = "a busy street with shops"
    page.fill("#query", text)
    page.click("#ask button")
    page.wait_for_selector("body[data-overlay]", timeout=20_000)  # the heatmap's visible tiles loaded
    page.wait_for_selector("body[data-places]", timeout=60_000)
    assert not page.locator("#legend").is_hidden()
    items = page.locator("#places li")
    shown = [(float(items.nth(i).get_attribute("data-lon")), float(items.nth(i).get_attribute("data-lat")),
              float(items.nth(i).get_attribute("data-score"))) for i in range(items.count())]  # fmt: skip
    shoot(page, "serve_query.png")

    out = tmp_path / "retrieve"
    ran = aether("retrieve", "--ckpt", str(ckpt), "--emb", str(emb), "--query", text, "--out", str(out), "--top-k", "5",
                 "--nms-m", "50", "--no-progress")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    theirs = json.loads(next(out.glob("q01_*.geojson")).read_text())["features"]
    assert len(shown) == len(theirs) == 5
    for (lon, lat, score), feature in zip(shown, theirs):
        assert feature["properties"]["score"] == pytest.approx(score, abs=1e-6)
        assert feature["geometry"]["coordinates"][:2] == pytest.approx([lon, lat], abs=1e-6)

    items.nth(0).click()  # zooms to the best place
    page.wait_for_function("() => document.querySelector('#map') !== null")

    box = page.locator("#map").bounding_box()
    first = page.get_attribute("body", "data-overlay")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function(f"() => document.body.dataset.places && document.body.dataset.places !== '{first}'",
                           timeout=60_000)  # fmt: skip
    assert "places like" in page.locator("#queries li").last.inner_text()
    assert float(page.locator("#places li").first.get_attribute("data-score")) == pytest.approx(1.0, abs=1e-3)
    shoot(page, "serve_like.png")
    assert not errors, errors
    page.close()
