"""Review mode in headless Chromium against its own `pnsfw serve` (labels change the store: not the shared one)."""

import json
import time

import httpx
import pytest
from api_server import Server, prepare_store, start_server
from test_api_page import ARGS, ARTIFACTS, CHROMIUM, late, with_token
from test_classifier import run_cli

pytestmark = pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason=f"{CHROMIUM} missing")


@pytest.fixture(scope="module")
def review_server(tmp_path_factory: pytest.TempPathFactory, labelled_store, tiny_checkpoint):
    root = tmp_path_factory.mktemp("review")
    yield from start_server(prepare_store(root, labelled_store, tiny_checkpoint), root / "server.log")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def progress_says(page, text: str) -> None:
    page.wait_for_function(f"document.getElementById('review-progress').textContent.includes({text!r})")


def shown_id(page) -> str:
    page.wait_for_function("document.getElementById('review-item').dataset.id !== undefined")
    return page.get_attribute("#review-item", "data-id")


def label_with_keys(page, keys: str) -> list[int]:
    """Press one key per item; the ids labelled, in order."""
    done = []
    for key in keys:
        item = shown_id(page)
        page.keyboard.press(key)
        page.wait_for_function(f"document.getElementById('review-item').dataset.id !== '{item}'")
        done.append(int(item))
    return done


def test_label_ten_items_with_the_keyboard_then_reload_and_train(review_server: Server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with_token(page)
    page.goto(review_server.base + "/?mode=review")
    page.wait_for_selector("#review:not([hidden]) #review-keys button")
    assert page.locator("#audit").is_hidden()
    keys = page.inner_text("#review-keys")
    assert "nsfw" in keys and "sfw" in keys
    labelled = label_with_keys(page, "1" * 5 + "2" * 5)  # classes in the model's order: nsfw, sfw
    progress_says(page, "10 labelled this session")
    undone = shown_id(page)
    page.keyboard.press("2")
    page.wait_for_function(f"document.getElementById('review-item').dataset.id !== '{undone}'")
    page.keyboard.press("u")  # undo the eleventh: the item comes back, its label is taken back
    page.wait_for_function(f"document.getElementById('review-item').dataset.id === '{undone}'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-desktop.png"), full_page=True)

    with review_server.client() as client:
        stored = client.get("/v1/labels").json()
    classes = stored["classes"]
    assert {r["id"]: r["label"] for r in stored["labels"]} == {
        i: classes[0] if n < 5 else classes[1] for n, i in enumerate(labelled)}
    assert {r["source"] for r in stored["labels"]} == {"review"}

    page.reload()
    page.wait_for_selector("#review-keys button")
    progress_says(page, "10 labelled in the store")
    assert int(shown_id(page)) not in labelled  # the queue moved on
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(200)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "review-phone.png"), full_page=True)
    assert not errors, errors

    # the commands in-process (each subprocess would import TensorFlow again); the server follows the store
    store = review_server.store
    meta = json.loads(run_cli("train", "--store", store, "--labels", "folders+store", "--name", "reviewed",
                              "--epochs", "2", "--json").stdout)
    assert meta["data"]["labels"] == 83  # every item has a folder label; the store's labels replace ten of them
    from pnsfw.classifier.scorer import StoreScorer
    from pnsfw.store import Store

    used = StoreScorer.open(Store.open(store), "reviewed").training_labels()
    assert all(used[i] == (classes[0] if n < 5 else classes[1]) for n, i in enumerate(labelled))
    only = run_cli("train", "--store", store, "--labels", "store", "--name", "store-only", "--epochs", "2",
                   "--test-ratio", "0.2", "--val-ratio", "0.2", "--json")
    assert json.loads(only.stdout)["data"]["labels"] == 10

    # a retrain of the served model: its metrics beside the previous model's, and the verdicts that changed
    again = run_cli("train", "--store", store, "--labels", "folders+store", "--epochs", "2").stdout
    assert "previous" in again and "verdicts changed:" in again and "of 83 items" in again
    info = run_cli("info", "--store", store).stdout
    assert "verdicts changed:" in info and "previous" in info
    with review_server.client() as client:
        served = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "default")
    assert served["retrain"]["verdicts"]["compared"] == 83 and len(served["retrain"]["delta"]) == 8
    page.reload()
    page.wait_for_selector("#model-delta")
    assert "pr_auc" in page.inner_text("#model-delta") and "verdicts changed" in page.inner_text("#verdicts-changed")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(ARTIFACTS / "review-retrained.png"), full_page=True)
    assert httpx.get(f"{review_server.base}/health").status_code == 200


def test_an_undo_pressed_while_a_label_is_saved_undoes_that_label_once_saved(review_server: Server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    with_token(page)
    page.goto(review_server.base + "/?mode=review")
    page.wait_for_selector("#review:not([hidden]) #review-keys button")
    first = label_with_keys(page, "1")[0]
    second = shown_id(page)
    # from here each label save answers 400 ms late, so "u" lands while it is in flight
    page.evaluate(f"() => {{ {late('/v1/labels', 400)} }}")
    page.keyboard.press("1")
    page.keyboard.press("u")
    page.wait_for_function(f"document.getElementById('review-item').dataset.id !== '{second}'")  # saved
    page.wait_for_function(f"document.getElementById('review-item').dataset.id === '{second}'")  # then undone
    page.keyboard.press("u")
    page.wait_for_function(f"document.getElementById('review-item').dataset.id === '{first}'")
    with review_server.client() as client:
        current = {r["id"] for r in client.get("/v1/labels").json()["labels"]}
    assert first not in current and int(second) not in current


def test_review_mode_starts_when_its_script_arrives_after_the_stores_stats(review_server: Server, browser) -> None:
    """The first show waits for every script of the page: with review.js held back 1 s the stats answer first,
    and review mode must still start (CI once saw the page stay on "Loading the review queue")."""
    page = browser.new_page()
    with_token(page)
    page.route("**/static/review.js", lambda route: (time.sleep(1.0), route.continue_()))
    page.goto(review_server.base + "/?mode=review")
    page.wait_for_selector("#review:not([hidden]) #review-keys button", timeout=15000)
    assert "labelled in the store" in page.inner_text("#review-progress")
