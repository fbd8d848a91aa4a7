"""The search page in a real headless browser: Debian's chromium driven by Playwright, against
`retrieval serve` started as a subprocess. `make test` installs chromium when it is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from playwright.sync_api import expect

from tests.conftest import ROOT, png_bytes
from tests.test_distributed import free_port

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (make test installs it: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(search_index):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval.cli", "serve", str(search_index), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"server did not start:\n{proc.stdout.read()[-3000:]}") from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser.new_page(viewport={"width": 1100, "height": 800})
        browser.close()


def test_typing_a_query_shows_results_with_thumbnails(server, page, tmp_path):
    page.goto(server)
    expect(page.locator("#info")).to_contain_text("64 items")  # no eval in the page: its CSP forbids it
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    page.wait_for_selector(".result img")
    assert page.locator(".result").count() == 20  # the page's default k
    for i in range(4):
        thumb = page.locator(".result img").nth(i)
        expect(thumb).to_have_js_property("complete", True)
        expect(thumb).not_to_have_js_property("naturalWidth", 0)
    assert "results in" in page.text_content("#status")
    shot = os.environ.get("MMPRETRAIN_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_empty_and_too_long_queries_show_an_error_not_a_crash(server, page):
    page.goto(server)
    page.fill("#query", "")
    page.press("#query", "Enter")
    assert page.text_content("#status") == "type a query"
    page.locator("#query").evaluate("q => q.removeAttribute('maxlength')")
    page.fill("#query", "x" * 600)
    page.press("#query", "Enter")
    page.wait_for_selector("#status .error")
    assert "longer than" in page.text_content("#status")


def test_uploading_an_image_classifies_it(server, page, tmp_path):
    img = tmp_path / "red.png"
    img.write_bytes(png_bytes())
    page.goto(server)
    page.set_input_files("#image", str(img))
    page.fill("#labels", "red square\ngreen circle\nblue triangle")
    page.click("#classify-button")
    page.wait_for_selector("#predictions .prediction")
    items = page.locator("#predictions .prediction").all_text_contents()
    assert len(items) == 3 and all("%" in t for t in items)
