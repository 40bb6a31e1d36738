"""The clinician page at / in a real headless Chromium against the real service.

Chromium comes from Debian (`apt-get install chromium`, as .ci/run does), never from
`playwright install`: these machines are offline. Where /usr/bin/chromium is absent the
tests skip, saying so.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from service.api.app import create_app
from training import phantom

CHROMIUM = Path("/usr/bin/chromium")
# A mark, not a fixture's skip: the check must come before the session fixtures train a model.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent: `apt-get install chromium` to run the page tests",
    ),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phantom_png(path: Path, label="malignant", seed=3, size=256) -> Path:
    image = phantom.make_image(label, np.random.default_rng(seed), size)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def base_url(served):
    """The real app under uvicorn on a free local port, ready (model loaded)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(served.settings), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-e2e")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the service did not become ready within 30 s")
            time.sleep(0.05)  # bounded poll for the server socket
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def page(base_url):
    """A fresh Chromium page (1024 px wide) that may only talk to the service."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1024, "height": 900})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.external_requests = []  # anything not to the service (a CDN, a font)
            page.js_errors = []

            def route(r):
                if r.request.url.startswith(base_url + "/"):
                    r.continue_()
                else:
                    page.external_requests.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("pageerror", lambda e: page.js_errors.append(str(e)))
            page.goto(base_url + "/")
            yield page
            assert page.js_errors == []
            assert page.external_requests == []
        finally:
            browser.close()


def _classify(page, key: str, file: Path) -> None:
    page.fill("#api-key", key)
    page.set_input_files("#file", str(file))
    page.click("#classify")


def test_page_classifies_an_image_like_the_api(page, served, base_url, tmp_path):
    # The banner is there before anything is uploaded.
    expect(page.locator("#banner")).to_be_visible()
    assert "not for diagnostic use" in page.inner_text("#banner").lower()
    for field in ("api-key", "file", "heatmap-class"):
        assert page.locator(f"label[for='{field}']").count() == 1

    image = _phantom_png(tmp_path / "nodule.png")
    api = httpx.post(
        f"{base_url}/v1/predict?heatmap=none",
        files={"file": ("nodule.png", image.read_bytes(), "image/png")},
        headers=_auth(served.predict_key),
        timeout=30,
    )
    assert api.status_code == 200, api.text
    expected = api.json()["prediction"]
    names = set(expected["probabilities"])

    _classify(page, served.predict_key, image)
    expect(page.locator("#results")).to_be_visible()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    label = page.inner_text("#label").strip()
    assert label in names and label == expected["label"]
    assert page.inner_text("#decision").strip() == expected["decision"]

    rows = page.locator("#probabilities li")
    assert rows.count() == len(names) == 2
    shown = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        text = row.locator(".pct").inner_text()
        assert re.fullmatch(r"\d{1,3}\.\d%", text), text
        shown[row.locator(".name").inner_text().strip()] = float(text.rstrip("%"))
    assert set(shown) == names
    assert sum(shown.values()) == pytest.approx(100, abs=0.25)
    for name, p in expected["probabilities"].items():
        assert shown[name] == pytest.approx(100 * p, abs=0.06)

    heatmap = page.locator("#heatmap")
    expect(heatmap).to_be_visible()
    # the colour scale stands beside the heatmap, at its height
    scale = page.locator("#colour-scale")
    expect(scale).to_be_visible()
    h, c = heatmap.bounding_box(), scale.bounding_box()
    assert c["x"] >= h["x"] + h["width"] - 1 and c["y"] < h["y"] + h["height"]
    assert "strongest" in scale.inner_text() and "weakest" in scale.inner_text()
    # this model classifies whole frames: the page says why there is no box tool
    expect(page.locator("#roi-absent")).to_contain_text("not trained on nodule crops")
    expect(page.locator("#roi-panel")).to_be_hidden()
    # an in-distribution answer is not marked unreliable
    if api.json()["ood"]["in_distribution"]:
        expect(page.locator("#unreliable")).to_be_hidden()
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("document.getElementById('heatmap').complete")
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0

    assert page.inner_text("#model-version").strip() == str(served.version)
    assert page.inner_text("#model-name").strip() == served.name
    assert "not for diagnostic use" in page.inner_text("#disclaimer").lower()
    assert re.fullmatch(r"[0-9a-f]{32}", page.inner_text("#request-id").strip())

    # A heatmap for the other class, on request.
    other = (names - {label}).pop()
    page.select_option("#heatmap-class", other)
    page.click("#classify")
    expect(page.locator("#heatmap-caption")).to_contain_text(f"“{other}”")
    assert page.inner_text("#label").strip() == expected["label"]

    # The key is kept for this tab only.
    assert page.evaluate("sessionStorage.getItem('thyroid-cad.api-key')") == served.predict_key
    assert page.evaluate("localStorage.length") == 0


def test_page_shows_the_services_errors(page, served, base_url, tmp_path):
    image = _phantom_png(tmp_path / "nodule.png")
    alert = page.get_by_role("alert")

    _classify(page, "not-a-real-key", image)
    expect(alert).to_contain_text("API key")
    expect(page.locator("#results")).to_be_hidden()

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an ultrasound image\n" * 20)
    api = httpx.post(
        f"{base_url}/v1/predict",
        files={"file": ("notes.txt", notes.read_bytes(), "text/plain")},
        headers=_auth(served.predict_key),
        timeout=30,
    )
    assert api.status_code == 415
    message = api.json()["error"]["message"]

    _classify(page, served.predict_key, notes)
    expect(alert).to_contain_text(message)
    expect(alert).not_to_contain_text("API key")
    expect(page.locator("#results")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)


def test_page_flags_an_image_out_of_distribution(page, served, base_url, tmp_path):
    """The OOD verdict is shown as the API gives it: nothing for a phantom frame like the
    training images, a prominent alert for a colour photograph (docs/safety.md)."""
    nodule = _phantom_png(tmp_path / "nodule.png")
    api = httpx.post(
        f"{base_url}/v1/predict?heatmap=none",
        files={"file": ("nodule.png", nodule.read_bytes(), "image/png")},
        headers=_auth(served.predict_key),
        timeout=30,
    )
    assert api.status_code == 200, api.text
    _classify(page, served.predict_key, nodule)
    expect(page.locator("#results")).to_be_visible()
    if api.json()["ood"]["in_distribution"]:
        expect(page.locator("#ood-flag")).to_be_hidden()
    else:
        expect(page.locator("#ood-flag")).to_be_visible()

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    colour = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    colour[..., 0] = 230  # saturated red cast: no greyscale ultrasound frame looks like this
    Image.fromarray(colour).save(photo)
    _classify(page, served.predict_key, photo)
    flag = page.locator("#ood-flag")
    expect(flag).to_be_visible()
    expect(flag).to_contain_text("Out of distribution")
    assert "out of distribution" in page.inner_text("#ood-check").lower()
    # the prediction under it is greyed and labelled, not left in large type
    expect(page.locator("#unreliable")).to_be_visible()
    expect(page.locator("#unreliable")).to_have_text("Not reliable: out of distribution")
    expect(page.locator("#prediction-panel")).to_have_class(re.compile(r"\bunreliable\b"))
    label = page.locator("#prediction-panel .prediction-body > .result-label")
    assert label.evaluate("e => getComputedStyle(e).textDecorationLine") == "line-through"
    assert float(page.locator(".prediction-body").evaluate("e => getComputedStyle(e).opacity")) < 1
    page.screenshot(path=str(tmp_path / "ood.png"), full_page=True)

    # and the next in-distribution-looking image is shown plainly again
    _classify(page, served.predict_key, nodule)
    if api.json()["ood"]["in_distribution"]:
        expect(page.locator("#ood-check")).to_contain_text("in distribution")
        expect(page.locator("#unreliable")).to_be_hidden()
        expect(page.locator("#prediction-panel")).not_to_have_class(re.compile("unreliable"))


def test_page_has_an_icon(page, base_url):
    href = page.locator("link[rel=icon]").get_attribute("href")
    assert href == "/favicon.ico"
    icon = page.request.get(base_url + href)  # the browser's own client, not the page's
    assert icon.status == 200 and icon.headers["content-type"] == "image/x-icon"
