"""The clinician page with a model trained on nodule crops: draw a box, see what was classified.

Headless Chromium against the real service, as tests/test_page_e2e.py (same fixtures,
served here by a ROI model with its bundled localiser).
"""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect
from test_page_e2e import _auth, _phantom_png, base_url, page, pytestmark  # noqa: F401


@pytest.fixture
def served(home, roi_export, tmp_path):
    """The ROI model instead of the whole-frame one, for base_url and page."""
    from conftest import make_served

    return make_served(roi_export, tmp_path, "roi-page")


def _drag(tab, frm: tuple[float, float], to: tuple[float, float]) -> None:
    box = tab.locator("#roi-canvas").bounding_box()
    tab.mouse.move(box["x"] + frm[0] * box["width"], box["y"] + frm[1] * box["height"])
    tab.mouse.down()
    tab.mouse.move(box["x"] + to[0] * box["width"], box["y"] + to[1] * box["height"], steps=5)
    tab.mouse.up()


# the page and base_url fixtures come from test_page_e2e (imported above)
def test_page_draws_the_localisers_box_and_takes_a_drawn_one(  # noqa: F811
    page,  # noqa: F811
    served,
    base_url,  # noqa: F811
    tmp_path,
):
    image = _phantom_png(tmp_path / "nodule.png", size=256)
    page.fill("#api-key", served.predict_key)
    page.dispatch_event("#api-key", "change")
    page.set_input_files("#file", str(image))
    expect(page.locator("#roi-panel")).to_be_visible()
    assert page.locator("label[for='roi-input']").count() == 1
    expect(page.locator("#roi-absent")).to_be_hidden()  # this model has the box tool
    # the "Nodule box" heading stands clear of the form row's hints above it
    title = page.locator("#roi-title").bounding_box()
    for hint in ("#api-key-hint", "#file-hint", "#heatmap-class-hint"):
        above = page.locator(hint).bounding_box()
        assert title["y"] - (above["y"] + above["height"]) >= 12, hint

    # No box: the localiser's, drawn over the result, named as such.
    page.click("#classify")
    expect(page.locator("#results")).to_be_visible()
    expect(page.locator("#roi-caption")).to_contain_text("proposed by the localiser")
    api = httpx.post(
        f"{base_url}/v1/predict?heatmap=none",
        files={"file": ("nodule.png", image.read_bytes(), "image/png")},
        headers=_auth(served.predict_key),
        timeout=30,
    ).json()
    roi = api["roi"]
    expected = ",".join(str(roi[k]) for k in ("x", "y", "w", "h"))
    expect(page.locator("#roi-result")).to_have_attribute("data-roi", expected)
    expect(page.locator("#shape")).to_be_visible()
    assert "model estimate" in page.inner_text("#shape-ttw")

    # Drag a box over the middle of the image: that box is sent and echoed.
    _drag(page, (0.25, 0.3), (0.6, 0.7))
    typed = page.input_value("#roi-input")
    x, y, w, h = (int(v) for v in typed.split(","))
    assert 0.2 * 256 < x < 0.3 * 256 and 0.3 * 256 < w < 0.4 * 256 and h > 0.3 * 256
    with page.expect_request(lambda r: "/v1/predict" in r.url) as request:
        page.click("#classify")
    assert f"roi={x}%2C{y}%2C{w}%2C{h}" in request.value.url
    expect(page.locator("#roi-caption")).to_contain_text("drawn by you")
    expect(page.locator("#roi-result")).to_have_attribute("data-roi", typed)

    # A box outside the image: the service's 400, said plainly.
    page.fill("#roi-input", "200,200,100,100")
    page.dispatch_event("#roi-input", "change")
    page.click("#classify")
    expect(page.get_by_role("alert")).to_contain_text("not inside")
    page.screenshot(path=str(tmp_path / "roi-page.png"), full_page=True)

    page.click("#roi-clear")
    assert page.input_value("#roi-input") == ""
