"""The page at ``GET /`` in a real browser: Debian's chromium, driven by Playwright.

Playwright is pointed at the system browser (``/usr/bin/chromium``, from ``scripts/install test``);
no browser is downloaded. Every wait is Playwright's own (``expect`` retries until its timeout),
never a sleep. The server is the real one, with the tiny test checkpoint (two stages), and for the
target-accuracy mode the same checkpoint with a calibration profile written into it.
"""

from __future__ import annotations

import base64
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from model.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import TINY_CLASSES, Server, launch_server

CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-test-token"
TIMEOUT_MS = 30_000  # a busy machine; expect() returns as soon as the page is there


@pytest.fixture(scope="module")
def server(module_server: Server) -> Server:
    return module_server


# A calibration profile written into the tiny checkpoint (as `thinkingvit eval --write-calibration`
# would): target 0.85 -> threshold 0.5, 0.93 -> 1 (every stage), above 0.95 -> 422.
CALIBRATION = {"split": "test[:64]", "images": 64, "rows": [
    {"threshold": 0.0, "accuracy": 0.80, "exit_share": [1.0, 0.0], "expected_gmacs": 0.001},
    {"threshold": 0.5, "accuracy": 0.90, "exit_share": [0.6, 0.4], "expected_gmacs": 0.002},
    {"threshold": 1.0, "accuracy": 0.95, "exit_share": [0.0, 1.0], "expected_gmacs": 0.003},
]}  # fmt: skip


@pytest.fixture(scope="module")
def calibrated_server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    loaded = load_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("calibrated") / "calibrated.safetensors"
    save_checkpoint(path, loaded.model, {**loaded.metadata, "calibration": CALIBRATION})
    server = launch_server(log_dir=path.parent, checkpoint=path)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    yield page
    context.close()


def open_page(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


@pytest.fixture
def png(tmp_path, test_images) -> Path:
    path = tmp_path / "shirt.png"
    path.write_bytes(test_images[0])
    return path


def test_page_loads_from_the_server_alone(server, page):
    origins = []
    page.on("request", lambda request: origins.append(re.match(r"\w+://[^/]+", request.url).group(0)))
    open_page(page, server.url)
    expect(page.locator("#model-line")).to_contain_text("tiny.safetensors: 2 stages")
    expect(page.locator(".sample")).to_have_count(12)
    expect(page.locator("#token-box")).to_be_hidden()  # this server has no token
    expect(page.locator("#preview")).to_be_hidden()  # no image yet
    expect(page.locator(".sample img").first).to_have_js_property("complete", True)
    assert set(origins) == {server.url}  # no CDN, nothing from elsewhere
    assert httpx.get(server.url + "/").headers["content-type"].startswith("text/html")


def test_uploaded_png_shows_label_and_exit_stage(server, page, png, test_images):
    open_page(page, server.url)
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#answer")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("shirt.png")
    threshold = float(page.locator("#threshold").input_value())
    api = httpx.post(f"{server.url}/classify", params={"threshold": threshold},
                     files={"file": ("shirt.png", test_images[0], "image/png")}).json()  # fmt: skip
    expect(page.locator("#label")).to_have_text(api["label"])
    expect(page.locator("#exit-stage")).to_have_text(str(api["exit_stage"]))
    expect(page.locator(f"#stage-{api['exit_stage']}")).to_have_class(re.compile(r"\bexit\b"))
    expect(page.locator("#stage-0 .bars > span:not(.p)")).to_have_count(5)  # top-5 bars
    expect(page.locator("#compute")).to_contain_text("GMACs")


FILE_TRANSFER = """async ([b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
    return transfer;
}"""


def test_dropped_and_pasted_images_are_classified(server, page, test_images):
    open_page(page, server.url)
    b64 = base64.b64encode(test_images[1]).decode()
    dropped = page.evaluate_handle(FILE_TRANSFER, [b64, "dropped.png"])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
    expect(page.locator("#status")).to_contain_text("dropped.png")
    expect(page.locator("#label")).to_have_text(re.compile("|".join(TINY_CLASSES)))
    pasted = page.evaluate_handle(FILE_TRANSFER, [b64, "pasted.png"])
    page.evaluate("(t) => document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: t }))", pasted)
    expect(page.locator("#status")).to_contain_text("pasted.png")


def test_threshold_slider_moves_the_exit(server, page, png):
    open_page(page, server.url)
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#answer")).to_be_visible()
    slider = page.locator("#threshold")
    slider.fill("0")
    expect(page.locator("#status")).to_contain_text("threshold 0.00")
    expect(page.locator("#exit-stage")).to_have_text("0")
    expect(page.locator("#stage-0")).to_have_class(re.compile(r"\bexit\b"))
    expect(page.locator("#stage-1")).to_have_class(re.compile(r"\bafter\b"))  # explain=all: still shown
    expect(page.locator("#compute")).to_contain_text("% saved")
    slider.fill("1")
    expect(page.locator("#status")).to_contain_text("threshold 1.00")
    expect(page.locator("#exit-stage")).to_have_text("1")
    expect(page.locator("#stage-1")).to_have_class(re.compile(r"\bexit\b"))
    expect(page.locator("#compute")).to_contain_text("0 % saved")


def test_a_target_accuracy_is_sent_and_the_picked_threshold_shown(calibrated_server, page, png):
    urls = []
    page.on("request", lambda request: urls.append(request.url) if "/classify?" in request.url else None)
    open_page(page, calibrated_server.url)
    expect(page.locator("#target-unavailable")).to_be_hidden()
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#status")).to_contain_text("threshold 0.80")  # the threshold mode first
    page.locator("#mode-target").check()
    expect(page.locator("#threshold-box")).to_be_hidden()
    expect(page.locator("#target-range")).to_contain_text("0.800 to 0.950")
    target = page.locator("#target")
    target.fill("0.85")
    expect(page.locator("#target-picked")).to_have_text("picks threshold 0.50")
    expect(page.locator("#status")).to_contain_text("target accuracy 0.850: threshold 0.50")
    expect(page.locator("#stage-0 .conf-line")).to_contain_text("threshold 0.50")
    sent = [u for u in urls if "target_accuracy=0.85" in u]
    assert sent and all("threshold=" not in u.split("?")[1] for u in sent)
    page.locator("#target-slider").fill("0.93")  # the slider and the box move together
    expect(target).to_have_value("0.93")
    expect(page.locator("#target-picked")).to_have_text("picks threshold 1.00")
    expect(page.locator("#exit-stage")).to_have_text("1")  # threshold 1 runs every stage
    page.locator("#mode-threshold").check()  # back to the slider: threshold= again
    expect(page.locator("#status")).to_contain_text("at threshold 0.80")


def test_a_target_above_the_profile_shows_the_servers_422(calibrated_server, page, png):
    open_page(page, calibrated_server.url)
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#answer")).to_be_visible()
    page.locator("#mode-target").check()
    page.locator("#target").fill("0.99")
    status = page.locator("#status")
    expect(status).to_have_class("error")
    expect(status).to_contain_text("422 invalid_parameter: target_accuracy: 0.99 is above what the model reaches")
    expect(status).to_contain_text("at best 0.95 (threshold 1)")
    expect(page.locator("#answer")).to_be_hidden()
    expect(page.locator("#target-picked")).to_contain_text("no threshold picked")
    page.locator("#target").fill("0.9")  # a reachable target answers again
    expect(page.locator("#target-picked")).to_have_text("picks threshold 0.50")
    expect(status).not_to_have_class("error")


def test_without_a_calibration_profile_the_target_mode_is_off_and_says_why(server, page):
    open_page(page, server.url)
    expect(page.locator("#mode-target")).to_be_disabled()
    expect(page.locator("#target-unavailable")).to_be_visible()
    expect(page.locator("#target-unavailable")).to_contain_text("tiny.safetensors has no calibration profile")
    expect(page.locator("#target-box")).to_be_hidden()
    expect(page.locator("#threshold")).to_be_visible()


def test_a_degraded_answer_is_flagged_with_both_thresholds(start_server, page, png, test_images):
    server = start_server(latency_slo_ms=1)  # a 1 ms SLO: every answer after the first is late
    first = httpx.post(f"{server.url}/classify", files={"file": ("x.png", test_images[0], "image/png")})
    assert first.status_code == 200  # gives the engine its stage-time estimates, as in test_service_slo
    open_page(page, server.url)
    expect(page.locator("#degraded")).to_be_hidden()
    page.locator("#file-input").set_input_files(png)
    degraded = page.locator("#degraded")
    expect(degraded).to_be_visible()
    lowered = r"Degraded: under load the server answered at threshold 0\.\d\d instead of 0\.80"
    expect(degraded).to_contain_text(re.compile(lowered))
    expect(page.locator("#exit-stage")).to_have_text("0")  # the floor 0: answered after stage 0


def test_stage_not_run_without_explain_all(server, page, png):
    open_page(page, server.url)
    page.locator("#explain-all").uncheck()
    page.locator("#threshold").fill("0")
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#exit-stage")).to_have_text("0")
    expect(page.locator("#stage-1")).to_have_class(re.compile(r"\bskipped\b"))
    expect(page.locator("#stage-1")).to_contain_text("Not run")


def test_clicking_a_sample_classifies_it(server, page):
    open_page(page, server.url)
    sample = page.locator(".sample.hard").first
    name = sample.get_attribute("data-file")
    sample.click()
    expect(page.locator("#status")).to_contain_text(name)
    expect(page.locator("#label")).to_have_text(re.compile("|".join(TINY_CLASSES)))
    expect(page.locator("#stages .stage")).to_have_count(2)


def test_live_panel_shows_the_servers_own_figures(server, page, png):
    open_page(page, server.url)
    page.locator("#file-input").set_input_files(png)
    expect(page.locator("#answer")).to_be_visible()
    expect(page.locator("#live-exits > div").first).to_contain_text("stage")
    expect(page.locator("#live-p50")).to_contain_text("ms")


def test_zip_in_the_batch_view_is_sorted_and_marks_early_exits(server, page, tmp_path, test_images):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i, data in enumerate(test_images[:5]):
            z.writestr(f"folder/{i}.png", data)
        z.writestr("folder/readme.txt", "not an image")
    open_page(page, server.url)
    page.locator("#threshold").fill("0")
    page.locator("#zip-input").set_input_files(archive)
    tiles = page.locator("#batch-grid .tile")
    expect(tiles).to_have_count(5)
    expect(page.locator("#batch-grid .tile.early")).to_have_count(5)  # threshold 0: all leave at stage 0
    first = [float(re.search(r"conf₀ ([\d.]+)", t).group(1)) for t in tiles.all_inner_texts()]
    assert first == sorted(first, reverse=True)


def test_with_a_token_the_page_asks_for_it_and_never_embeds_it(tiny_checkpoint, tmp_path, page):
    server = launch_server(log_dir=tmp_path, checkpoint=tiny_checkpoint, api_token=TOKEN)
    try:
        open_page(page, server.url)
        expect(page.locator("#token-box")).to_be_visible()
        assert TOKEN not in page.content() and TOKEN not in httpx.get(server.url + "/").text
        page.locator("#token-input").fill("wrong")
        page.locator("#token-form button").click()
        page.locator(".sample").first.click()
        expect(page.locator("#token-status")).to_have_text("That token was refused.")
        expect(page.locator("#token-box")).to_be_visible()
        page.locator("#token-input").fill(TOKEN)
        page.locator("#token-form button").click()
        expect(page.locator("#token-box")).to_be_hidden()
        page.locator(".sample").first.click()
        expect(page.locator("#answer")).to_be_visible()
        expect(page.locator("#label")).to_have_text(re.compile("|".join(TINY_CLASSES)))
    finally:
        assert server.stop() == 0


def test_live_route_counts_this_servers_answers(tiny_checkpoint, tmp_path, test_images):
    server = launch_server(log_dir=tmp_path, checkpoint=tiny_checkpoint)
    try:
        for image in test_images[:3]:
            response = httpx.post(f"{server.url}/classify", params={"threshold": 0}, files={"file": ("x.png", image)})
            assert response.status_code == 200
        live = httpx.get(f"{server.url}/v1/live").json()
        assert live["requests"] == 3 and live["requests_per_s"] > 0
        assert [e["count"] for e in live["exits"]] == [3, 0] and live["exits"][0]["share"] == 1.0
        assert live["latency_ms"]["p50"] > 0 and live["latency_ms"]["p99"] >= live["latency_ms"]["p50"]
        model = httpx.get(f"{server.url}/v1/model").json()
        assert live["full_gmacs"] == model["stages"][-1]["exit_gmacs"]
        assert live["gmacs_per_request"] == pytest.approx(model["stages"][0]["exit_gmacs"], rel=1e-3)
        assert live["token_required"] is False
    finally:
        assert server.stop() == 0
