"""The audit page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright) against a real server."""

import os
from pathlib import Path

import httpx
import pytest
from api_server import REPO, TOKEN, Server

from pnsfw.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install -y chromium")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


def nsfw_file(server: Server) -> Path:
    uris = Store.open(server.store).table(["uri"]).column("uri").to_pylist()
    return Path(next(u for u in uris if "/nsfw/" in u and "::" not in u))


def test_upload_shows_verdict_and_blurred_neighbours(api_server: Server, page) -> None:
    image = nsfw_file(api_server)
    expected = httpx.post(f"{api_server.base}/v1/score", files={"image": image.read_bytes()},
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(api_server.base + "/")
    page.wait_for_selector("#token-box:not([hidden])")  # the guarded API answered 401: the page asks for the token
    page.fill("#token", TOKEN)
    page.press("#token", "Tab")
    page.wait_for_function("document.getElementById('store-info').textContent.includes('vectors')")
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 12")
    page.wait_for_selector("#verdict:not([hidden])")
    assert page.inner_text("#p-nsfw") == f"p_nsfw {expected['p_nsfw']:.3f}"
    assert page.inner_text("#badge") == ("NSFW" if expected["nsfw"] else "SFW")
    assert "nsfw" in page.inner_text("#probs") and "sfw" in page.inner_text("#probs")
    page.wait_for_function("document.getElementById('agreement').textContent.includes('agree')")
    cards = page.locator("#grid .card")
    assert "sim " in cards.first.inner_text() and "label nsfw" in cards.first.inner_text()

    blurred = page.locator(".thumb.blurred")
    assert blurred.count() > 0  # neighbours of an NSFW image score above the threshold
    first = blurred.first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=first.element_handle())
    assert first.evaluate("img => getComputedStyle(img).filter").startswith("blur")
    handle = first.element_handle()
    first.click()
    page.wait_for_function("img => !img.classList.contains('blurred')", arg=handle)
    page.wait_for_function("img => getComputedStyle(img).filter === 'none'", arg=handle)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "api-audit-page.png"), full_page=True)
    assert not errors, errors


def test_search_by_id_and_text_from_the_page(api_server: Server, page) -> None:
    page.add_init_script(f"localStorage.setItem('pnsfw-token', {TOKEN!r})")
    page.goto(api_server.base + "/")
    page.fill("#k", "5")
    page.fill("#id", "3")
    page.click("#by-id button")
    page.wait_for_function("document.getElementById('status').textContent.includes('item #3')")
    assert page.locator("#grid .card").count() == 5
    assert page.locator("#grid .card").evaluate_all("cards => cards.map(c => c.dataset.id)")[0] == "3"  # itself first
    page.fill("#text", "a striped pattern")
    page.click("#by-text button")
    page.wait_for_function("document.getElementById('status').textContent.includes('striped')")
    assert page.locator("#verdict").is_hidden()  # a text query has no verdict of its own
    page.fill("#id", "999999")
    page.click("#by-id button")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "404" in page.inner_text("#status")


def test_docs_render_with_the_network_blocked(api_server: Server, page) -> None:
    outside: list[str] = []

    def only_local(route) -> None:
        url = route.request.url
        if url.startswith(api_server.base):
            return route.continue_()
        outside.append(url)
        return route.abort()

    page.route("**/*", only_local)
    page.goto(api_server.base + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
    assert "/v1/items/{item_id}/thumb" in page.inner_text(".swagger-ui")
    page.goto(api_server.base + "/redoc")
    page.wait_for_selector("[role=navigation], .menu-content", timeout=30_000)
    assert "thumb" in page.inner_text("body").lower()
    assert not outside, outside
