"""The demo page in a real browser: headless Debian Chromium driven by Playwright (slow marker).

Needs Debian's ``chromium`` package and the ``playwright`` Python package (its driver only: the
browser is the system one, so no ``playwright install``); skips with the reason where either is missing.
"""

from __future__ import annotations

import time

import pytest
import torch

from app_helpers import CHROMIUM_ARGS, build_pipeline_folder, chromium_executable, start_server
from lumina_lightning.sampling.cli import read_png_settings
from lumina_lightning.serving import DemoService, ServeConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium: apt-get install -y chromium (Debian's package; /usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package: pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    torch.set_num_threads(1)
    folder = build_pipeline_folder(tmp_path_factory.mktemp("browser"))
    service = DemoService.from_checkpoint(folder, config=ServeConfig(resolution=64, checkpoint=str(folder)))
    demo, url = start_server(service)
    yield url, service
    demo.close()
    service.close()


def test_type_a_prompt_generate_and_screenshot(browser, page_url, tmp_path):
    url, service = page_url
    start = time.perf_counter()
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="networkidle")
    page.locator("#prompt textarea").fill("a red circle left of a blue square")
    page.locator("#generate").click()
    # the gallery shows the PNG, and the summary the seed, the time and the forwards
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("document.querySelector('#summary')?.innerText.includes('Model forwards')",
                           timeout=60_000)
    summary = page.locator("#summary").inner_text()
    assert "34 transformer calls" in summary and "64x64" in summary
    assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 64
    # the seed box now shows the seed that was used, which reproduces the image
    seed = int(page.locator("#seed input").input_value())
    assert f"seed {seed} (random" in summary
    # the download list holds the PNG with its settings
    files = sorted(service.output_dir.glob("req-*/*.png"))
    assert files and read_png_settings(files[-1])["seed"] == seed
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot} (page test took {time.perf_counter() - start:.1f} s)")

    # the fast preset fills the sampler controls
    page.get_by_label("fast").check()
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '20'", timeout=30_000)
    page.get_by_label("official").check()
    page.wait_for_function("document.querySelector('#steps input[type=number]').value === '17'", timeout=30_000)

    # a longer run shows the sampler's progress (gr.Progress fed by the pipeline's step callback)
    for elem, value in (("#steps", "100"), ("#num-images", "4")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#generate").click()
    page.get_by_text("sampling: step").first.wait_for(state="visible", timeout=60_000)
    page.screenshot(path=str(tmp_path / "demo_progress.png"))
    page.wait_for_function("document.querySelector('#summary')?.innerText.includes('200 transformer calls')",
                           timeout=120_000)
    assert page.locator("#gallery img").count() == 4

    # bad input: an empty prompt shows the message, and the page keeps working
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    page.get_by_text("Please enter a prompt").first.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(800)  # let the toast finish fading in before the screenshot
    page.screenshot(path=str(tmp_path / "demo_error.png"), full_page=True)
    page.close()
