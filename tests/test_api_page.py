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
    page.add_init_script(late("/v1/stats", 500))
    page.goto(api_server.base + "/")
    page.fill("#k", "5")  # typed while the page still loads: kept when it has loaded (CI once lost it)
    page.wait_for_selector("body[data-ready]", state="attached")
    page.fill("#id", "3")
    page.click("#by-id button")
    page.wait_for_function("document.getElementById('status').textContent.includes('item #3')")
    assert page.input_value("#k") == "5" and "k=5" in page.url
    # the API lists the item itself first; the page shows it above the grid, with its own label
    page.wait_for_selector("#query-item:not([hidden])")
    assert page.get_attribute("#query-item", "data-id") == "3"
    assert "3" not in page.locator("#grid .card").evaluate_all("cards => cards.map(c => c.dataset.id)")
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


def with_token(page) -> None:
    page.add_init_script(f"localStorage.setItem('pnsfw-token', {TOKEN!r})")


def late(path: str, ms: int) -> str:
    """An init script that answers the page's requests to `path` `ms` late: a check that reads the page before
    that answer is shown then fails every run, not once in a while."""
    return f"""const answer = window.fetch;
window.fetch = (url, options) => String(url).includes({path!r})
  ? new Promise((done) => setTimeout(done, {ms})).then(() => answer(url, options)) : answer(url, options);"""


def wait_for_cards(page, count: int) -> None:
    page.wait_for_selector("#grid:not([aria-busy])", state="attached")
    page.wait_for_function(f"document.querySelectorAll('#grid .card').length === {count}")
    page.wait_for_function("[...document.querySelectorAll('.thumb')].every(i => i.complete && i.naturalWidth > 0)")


def card_ids(page) -> list[str]:
    return page.locator("#grid .card").evaluate_all("cards => cards.map(c => c.dataset.id)")


def test_a_shared_url_restores_the_query_and_back_returns(api_server: Server, page) -> None:
    with_token(page)
    page.goto(api_server.base + "/?id=3&k=5&page=1")
    page.wait_for_function("document.getElementById('status').textContent.includes('item #3 (page 2)')")
    wait_for_cards(page, 5)
    first = card_ids(page)
    assert page.input_value("#id") == "3" and page.input_value("#k") == "5"
    page.wait_for_selector("#query-item:not([hidden])")
    query = page.inner_text("#query-item")
    assert "Query: item #3" in query and "label" in query and "/" in query  # its own label and its uri
    assert all("/" in page.locator("#grid .card .uri").nth(i).inner_text() for i in range(5))
    second = page.context.browser.new_context().new_page()  # another browser: only the link is shared
    with_token(second)
    second.goto(api_server.base + "/?id=3&k=5&page=1")
    second.wait_for_function("document.querySelectorAll('#grid .card').length === 5")
    assert card_ids(second) == first
    page.click("#grid .card >> nth=0 >> a.id")
    page.wait_for_function(f"location.search.includes('id={first[0]}')")
    page.wait_for_function(f"document.getElementById('status').textContent.includes('item #{first[0]}')")
    page.go_back()
    page.wait_for_function("document.getElementById('status').textContent.includes('item #3 (page 2)')")
    assert page.input_value("#id") == "3"
    page.click("#prev")
    page.wait_for_function("new URLSearchParams(location.search).get('page') === null")
    page.wait_for_function("document.getElementById('status').textContent.endsWith('item #3')")  # page 1 shown
    wait_for_cards(page, 5)
    assert card_ids(page) != first


def test_safe_mode_hides_and_the_blur_is_strong_and_explained(api_server: Server, page) -> None:
    image = nsfw_file(api_server)
    nsfw_id = next(i for i, u in enumerate(Store.open(api_server.store).table(["uri"]).column("uri").to_pylist())
                   if u == str(image))
    with_token(page)
    page.goto(api_server.base + f"/?id={nsfw_id}")
    wait_for_cards(page, 12)
    blurred = page.locator("#grid .thumb.blurred").count()
    assert blurred > 0
    assert "blur(28px)" in page.locator("#grid .thumb.blurred").first.evaluate("i => getComputedStyle(i).filter")
    explain = page.inner_text("#verdict-explain")
    assert "sum of the probabilities of the NSFW classes" in explain and "threshold" in explain
    page.check("#safe")
    page.wait_for_function("new URLSearchParams(location.search).get('safe') === '1'")
    visible = page.locator("#grid .card:not([hidden])")
    assert visible.count() == 12 - blurred and page.locator("#grid .card:not([hidden]) .thumb.blurred").count() == 0
    assert f"{blurred} hidden by safe mode" in page.inner_text("#hidden-note")
    page.reload()
    wait_for_cards(page, 12)
    assert page.is_checked("#safe") and page.locator("#grid .card:not([hidden])").count() == 12 - blurred
    page.uncheck("#safe")
    page.check("#dedup")
    assert page.locator("#grid .card:not([hidden])").count() <= 12


def test_phone_width_has_no_sideways_scroll(api_server: Server, page) -> None:
    with_token(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(api_server.base + "/?id=3")
    wait_for_cards(page, 12)
    page.screenshot(path=str(ARTIFACTS / "audit-desktop.png"), full_page=True)
    for width in (390, 360):
        page.set_viewport_size({"width": width, "height": 844})
        page.reload()
        wait_for_cards(page, 12)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # and no element sticks out (the scaled, blurred thumbnails are clipped by their .frame)
        outside = page.evaluate(f"[...document.querySelectorAll('body *')].filter(e => e.offsetParent && "
                                f"!e.closest('.frame') && e.getBoundingClientRect().right > {width} + 0.5)"
                                ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + "
                                "Math.round(e.getBoundingClientRect().right))")
        assert not outside, (width, outside)
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    wait_for_cards(page, 12)
    page.screenshot(path=str(ARTIFACTS / "audit-phone.png"), full_page=True)
