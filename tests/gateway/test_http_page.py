"""The search page in a real headless Chromium on a running stack (model server + indexer + gateway).

Screenshots for a person to look at go to var/screenshots/ (desktop 1280x800, phone 390x844).
"""

from __future__ import annotations

import pytest

from cbir.processes import REPO
from cbir.v1 import search_pb2
from tests.gateway.stack import AUTH, SEARCH_KEY
from tests.support.browser import chromium, set_viewport
from trainer.synthetic import make_image

pytestmark = pytest.mark.slow

SHOTS = REPO / "var" / "screenshots"


@pytest.fixture(scope="module")
def stub(e2e):
    with e2e.gateway.channel() as channel:
        yield e2e.gateway.stub(channel)


def _wait(driver, condition, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _hits(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .hit')].map(li => ({id: li.dataset.id,"
        " label: li.querySelector('.label').textContent,"
        " score: (li.querySelector('.score-value') || {}).textContent}))"
    )


def _completed(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.completed || '0'"))


def _upload(driver, path) -> list[dict]:
    """Chooses ``path`` in the file input and waits for that search to finish; the grid's hits."""
    before = _completed(driver)
    _by_id(driver, "file-input").send_keys(str(path))
    _wait(driver, lambda d: _completed(d) > before)
    return _hits(driver)


def _thumbnails_loaded(driver, count: int) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .hit img')].slice(0, arguments[0]);"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
        count,
    )


def _error_text(driver) -> str:
    _wait(driver, lambda d: _by_id(d, "error").is_displayed())
    return _by_id(driver, "error").text


def _same_origin_only(driver, origin: str) -> list[str]:
    """Resources the page loaded from anywhere but the gateway (or the browser itself)."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith(arguments[0]) && !n.startsWith('blob:') && !n.startsWith('data:'))",
        origin,
    )


def test_search_page_in_a_real_browser(e2e, stub, unavailable_gateway, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    catalogue = e2e.catalogue
    query = catalogue.folder / "item-013.png"
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not a photo")
    too_large = tmp_path / "huge.bmp"
    too_large.write_bytes(make_image(seed=3, size=900, label=1, fmt="BMP"))  # over the 2 MB limit
    origin = e2e.gateway.http_url

    with chromium(1280, 800) as driver:
        driver.get(origin + "/")
        # API keys are on: the page asks for one and keeps it in local storage.
        _wait(driver, lambda d: _by_id(d, "key-dialog").is_displayed())
        _by_id(driver, "key-input").send_keys(SEARCH_KEY)
        _by_id(driver, "key-save").click()
        _wait(driver, lambda d: len(_hits(d)) == 12)
        assert {h["id"] for h in _hits(driver)} <= set(catalogue.items)
        assert driver.execute_script("return localStorage.getItem('cbir.apiKey')") == SEARCH_KEY
        _wait(driver, lambda d: "40 items" in _by_id(d, "serving-info").text)
        # The generation answering now (an earlier test may have hot-swapped the model).
        live = stub.GetServingInfo(search_pb2.GetServingInfoRequest(), metadata=AUTH, timeout=30).generation
        model, generation = f"model tiny v{live.space.model_version}", f"generation {live.name}"
        assert model in _by_id(driver, "serving-info").text
        assert generation in _by_id(driver, "serving-info").text

        # A catalogue image finds itself first, at score 1.
        hits = _upload(driver, query)
        assert hits[0]["id"] == "item-013" and hits[0]["score"] == "1.000", hits
        assert len(hits) == 12 and _by_id(driver, "results-title").text == "Most similar items"
        assert generation in _by_id(driver, "results-meta").text
        _wait(driver, lambda d: _thumbnails_loaded(d, 4))
        driver.save_screenshot(str(SHOTS / "desktop-results.png"))

        # "More like this": the grid is the gRPC answer for that item id.
        second = hits[1]["id"]
        before = _completed(driver)
        driver.find_elements("css selector", "#results .hit button")[1].click()
        _wait(driver, lambda d: _completed(d) > before)
        assert _by_id(driver, "results-title").text == f"More like {second}"
        expected = stub.Search(search_pb2.SearchRequest(item_id=second, k=12), metadata=AUTH, timeout=30)
        assert [h["id"] for h in _hits(driver)] == [h.id for h in expected.hits]
        assert f"More like {second}" in _by_id(driver, "query-caption").text
        driver.save_screenshot(str(SHOTS / "desktop-more-like-this.png"))

        # Filter by label and set k.
        _by_id(driver, "label").send_keys("class2")
        _by_id(driver, "k").clear()
        _by_id(driver, "k").send_keys("5")
        hits = _upload(driver, query)
        assert len(hits) == 5 and {h["label"] for h in hits} == {"class2"}

        # Readable errors.
        _upload(driver, not_an_image)
        assert "This file is not an image the service can read" in _error_text(driver)
        driver.save_screenshot(str(SHOTS / "desktop-not-an-image.png"))
        _upload(driver, too_large)
        assert "This image is too large" in _error_text(driver)
        assert "--max-image-bytes" in _error_text(driver)

        assert _same_origin_only(driver, origin) == []
        console = driver.get_log("browser")
        assert not [e for e in console if "Content Security Policy" in e["message"]], console

        # Phone-sized window: nothing wider than the screen, same search.
        set_viewport(driver, 390, 844, mobile=True)
        driver.get(origin + "/")
        _wait(driver, lambda d: len(_hits(d)) == 12)
        hits = _upload(driver, query)
        assert hits[0]["id"] == "item-013"
        _wait(driver, lambda d: _thumbnails_loaded(d, 2))
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        driver.save_screenshot(str(SHOTS / "phone-results.png"))

        # A gateway whose indexer is down says so.
        driver.get(unavailable_gateway.http_url + "/")
        _wait(driver, lambda d: _by_id(d, "serving-info").text == "service unavailable")
        assert "The search service is unavailable right now" in _error_text(driver)
        driver.save_screenshot(str(SHOTS / "phone-unavailable.png"))
