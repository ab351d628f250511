"""The web page in a real browser: Debian's Chromium, driven by Playwright, against a live uvicorn server."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from lowres_birds.config import LR_SIZE
from lowres_birds.data.demo import SPECIES
from lowres_birds.data.tables import LabelMap
from lowres_birds.model.factory import create_model, save_architecture
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.serving import bind, create_app
from lowres_birds.run_dir import RunDir

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def eight_species_run(tmp_path_factory) -> Path:
    """A loadable run over the 8 demo species (untrained head): the shared `trained_run` has only 3 species,
    too few for the page's five bars. Written with the helpers training uses, so Classifier.load reads it as usual."""
    run_dir = tmp_path_factory.mktemp("eight-species")
    label_map = LabelMap.fit([name for name, *_ in SPECIES])
    model = create_model("efficientnet_lite0", list(label_map.classes), LR_SIZE, pretrained=False)
    run = RunDir(run_dir)
    run.write_labels(list(label_map.classes))
    save_architecture(model, run)
    run.save_weights(model.state_dict())
    return run_dir


@contextlib.contextmanager
def serving(run_dir: Path):
    """`lowres-birds serve` in a background thread on a free loopback port; ready once /api/health answers."""
    listener = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(Classifier.load(run_dir)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "server did not become healthy within 30 s"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture
def server_url(eight_species_run):
    with serving(eight_species_run) as url:
        yield url


def test_upload_shows_the_photo_the_model_view_and_five_labelled_bars(
    server_url, demo_data, eight_species_run, tmp_path
):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    photo = sorted((demo_data / "upscale_train").glob("*.jpg"))[0]
    expected = Classifier.load(eight_species_run)(photo, top_k=5)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(server_url)
            expect(page.locator("#model-info")).to_contain_text("species")
            page.set_input_files("#photo-input", str(photo))

            bars = page.locator("#predictions li")
            expect(bars).to_have_count(5)
            assert [bars.nth(i).get_attribute("data-label") for i in range(bars.count())] == [
                e["label"] for e in expected
            ]
            expect(bars.first.locator(".value")).to_have_text(f"{expected[0]['score'] * 100:.1f}%")
            expect(page.locator("#verdict")).to_be_hidden()  # an uncalibrated run carries no unknown flag
            assert all(bars.nth(i).locator(".label").inner_text().strip() for i in range(bars.count()))
            page.wait_for_function("() => document.querySelector('#model-view').naturalWidth === 64")
            assert page.locator("#model-view").evaluate(
                "img => [img.naturalHeight, getComputedStyle(img).imageRendering]"
            ) == [64, "pixelated"]
            page.wait_for_function("() => document.querySelector('#uploaded').naturalWidth > 0")

            page.set_input_files(
                "#photo-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}]
            )
            expect(page.locator("#error")).to_contain_text("not an image")

            page.set_input_files("#photo-input", str(photo))
            expect(page.locator("#error")).to_be_hidden()
            expect(bars).to_have_count(5)  # the list is emptied while a photo is being classified
            expect(bars.first).to_be_visible()
            expect(page.locator("#timing")).to_contain_text("answered")
            page.wait_for_function("() => document.querySelector('#model-view').naturalWidth === 64")
            screenshot = tmp_path / "serve-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")


def test_a_photo_judged_unknown_says_so_instead_of_naming_a_species(eight_species_run, demo_data, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    run = tmp_path / "run"
    shutil.copytree(eight_species_run, run)
    # max-softmax scores lie in [-1, 0): above a threshold of -2, every photo is judged unknown
    RunDir(run).write_calibration({"temperature": 1.0, "score": "max_softmax", "threshold": -2.0}, {})
    with serving(run) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.set_input_files("#photo-input", str(sorted((demo_data / "test").glob("*.jpg"))[0]))
            expect(page.locator("#verdict")).to_have_text("Not one of the species I know.")
            expect(page.locator("#predictions-title")).to_contain_text("none is a match")
        finally:
            browser.close()
