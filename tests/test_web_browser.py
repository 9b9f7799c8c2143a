"""The search page in a real browser: Debian's headless Chromium driven through Playwright's Python API, against
the real front (web/) and the session's real TorchServe.

The screenshot goes to the test's tmp folder, and to docs/web.png (the one README shows) with UPDATE_SCREENSHOT=1.
CHROMIUM names another Chromium binary (default /usr/bin/chromium, from `apt-get install chromium`).
"""
import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from serving.torchserve import ROOT
from tests.fixtures import CATEGORIES
from tests.test_web import held_out_photo, running_front

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # headless: Playwright adds --headless itself
K = 5
NAMES = "|".join(CATEGORIES)
TILE_TEXT = re.compile(rf"^(?P<id>({NAMES})-\d\d)\n(?P<category>{NAMES})\ndistance (?P<distance>[0-9.e+-]+)$")
ALL_IMAGES_LOADED = ("selector => { const images = Array.from(document.querySelectorAll(selector));"
                     " return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }")


@pytest.fixture(scope="module")
def front(torchserve, photo_dir):
    with running_front(photo_dir, torchserve.state_dir) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install chromium (make setup does)"
    profile = tmp_path_factory.mktemp("chromium-profile")  # a new, empty user data dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture
def page(browser, front):
    """The page, loaded, with its versions listed; fails the test on any request that leaves the front."""
    page = browser.new_page()
    elsewhere = []
    page.on("request", lambda r: r.url.startswith((front, "blob:", "data:")) or elsewhere.append(r.url))
    page.goto(front)
    expect(page.locator("#version option").first).to_have_text("1.0 (default)")
    assert page.locator("#version option").first.get_attribute("value") == ""  # searches go to the default
    page.fill("#k", str(K))
    page.locator("#k").blur()
    yield page
    page.close()
    assert not elsewhere, f"the page loaded something from elsewhere: {elsewhere}"


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "held-out-shoe.png"
    path.write_bytes(held_out_photo())
    return path


def tiles(page):
    """[(id, category, distance)] of the result tiles, checking each tile's text on the way."""
    found = []
    for text in page.locator("#results .tile").all_inner_texts():
        match = TILE_TEXT.match(text.strip())
        assert match, f"tile text {text!r}"
        found.append((match["id"], match["category"], float(match["distance"])))
    return found


def wait_for_results(page, title):
    page.wait_for_function("() => !document.body.hasAttribute('aria-busy')")
    assert page.locator("#error").is_hidden(), f"the page shows an error: {page.inner_text('#error')}"
    expect(page.locator("#query-title")).to_have_text(title)
    expect(page.locator("#results .tile")).to_have_count(K)
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#results .tile img")
    return tiles(page)


def search_by_photo(page, photo):
    page.set_input_files("#photo", str(photo))
    return wait_for_results(page, "Your photo")


def save_screenshot(page, path):
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copy(path, ROOT / "docs" / "web.png")


def test_a_photo_gives_k_tiles_that_load(page, photo, tmp_path):
    page.click("h1")  # from the top of the page, the keyboard reaches the photo picker first
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "photo"
    page.locator("#photo").blur()
    results = search_by_photo(page, photo)
    assert len({item_id for item_id, _, _ in results}) == K
    distances = [distance for _, _, distance in results]
    assert distances == sorted(distances)
    assert all(category in item_id for item_id, category, _ in results)  # ids are <category>-NN here
    expect(page.locator("#prediction")).to_have_text(
        re.compile(rf"^Predicted category: ({NAMES}) \(\d+% confidence\)$"))
    expect(page.locator("#answered-by")).to_have_text("Answered by tiny-search version 1.0")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#query-image")
    for image in page.locator("#results .tile img").all():
        assert image.get_attribute("alt"), "every tile image has alt text"
    assert page.get_attribute("#query-image", "alt") == "Your photo: held-out-shoe.png"
    expect(page.locator("#error")).to_be_hidden()
    save_screenshot(page, tmp_path / "web.png")
    assert (tmp_path / "web.png").stat().st_size > 10_000

    page.set_viewport_size({"width": 375, "height": 800})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(tmp_path / "web-phone.png"), full_page=True)


def drop_or_paste(page, photo, event):
    """Dispatches a real drop or paste event that carries the photo as a File."""
    page.evaluate("""([bytes, name, event]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
        const init = {bubbles: true, cancelable: true};
        document.getElementById("drop-zone").dispatchEvent(event === "drop"
            ? new DragEvent("drop", {...init, dataTransfer: transfer})
            : new ClipboardEvent("paste", {...init, clipboardData: transfer}));
    }""", [list(photo.read_bytes()), photo.name, event])


def test_a_dropped_or_pasted_photo_is_searched(page, photo):
    for event in ("drop", "paste"):
        page.evaluate("document.getElementById('results').replaceChildren()")
        drop_or_paste(page, photo, event)
        assert len(wait_for_results(page, "Your photo")) == K, event
        assert page.get_attribute("#query-image", "alt") == "Your photo: held-out-shoe.png"


def test_clicking_a_tile_searches_by_that_listing(page, photo):
    first = search_by_photo(page, photo)
    chosen = first[1][0]
    page.locator("#results .tile").nth(1).click()
    results = wait_for_results(page, f"More like {chosen}")
    assert chosen not in [item_id for item_id, _, _ in results]  # the listing is never its own neighbour
    expect(page.locator("#prediction")).to_have_text(re.compile(rf"^Listing category: ({NAMES})$"))
    expect(page.locator("#answered-by")).to_have_text("Answered by tiny-search version 1.0")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#query-image")
    # the keyboard does the same: focus the first tile and press Enter
    following = results[0][0]
    page.locator("#results .tile").first.focus()
    page.keyboard.press("Enter")
    results = wait_for_results(page, f"More like {following}")
    assert following not in [item_id for item_id, _, _ in results]


def test_the_category_filter_narrows_the_results(page, photo):
    search_by_photo(page, photo)
    page.get_by_label("phones", exact=True).check()  # re-runs the search with the filter
    page.wait_for_function("() => !document.body.hasAttribute('aria-busy')")
    assert page.locator("#error").is_hidden(), f"the page shows an error: {page.inner_text('#error')}"
    expect(page.locator("#results .tile .tile-category")).to_have_text(["phones"] * K)


def test_a_text_file_shows_the_reason_and_the_page_keeps_working(page, photo, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo\n")
    page.set_input_files("#photo", str(text))
    expect(page.locator("#error")).to_have_text("not an image: the body is in no format we can decode")
    expect(page.locator("#results .tile")).to_have_count(0)
    results = search_by_photo(page, photo)
    assert len(results) == K
    expect(page.locator("#error")).to_be_hidden()


def test_a_form_on_another_site_cannot_search(browser, front):
    """A cross-site form post, as a page elsewhere would make it: Chromium sends that page's Origin, and the front
    refuses it before forwarding anything."""
    attacker = "http://attacker.test/"
    form = (f'<form method="post" action="{front}/api/search" enctype="multipart/form-data">'
            f'<input name="listing" value="bags-01"><input name="k" value="1"></form>')
    page = browser.new_page()
    page.route(attacker, lambda route: route.fulfill(status=200, content_type="text/html", body=form))
    try:
        page.goto(attacker)
        with page.expect_response(f"{front}/api/search") as answer:
            page.evaluate("document.forms[0].submit()")
        response = answer.value
        assert response.request.headers.get("origin") == "http://attacker.test"
        assert response.status == 403
        assert response.json() == {"status": 403, "error": "cross-site request refused: Origin http://attacker.test "
                                                           "is not this page's origin"}
    finally:
        page.close()
