"""The report in a real browser: headless Chromium opens report.html from disk, every image loads (none
broken), the layer selector switches figures, and a screenshot is taken into the test's temp directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mixroute.report import write_report

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "runs"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}): {INSTALL}")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[test]' (selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,2000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_renders_in_chromium(tmp_path, browser):
    moa = tmp_path / "moa"
    shutil.copytree(FIX / "moa", moa)
    html = write_report([moa, FIX / "pruned"], tmp_path / "report", layer="all", warn=lambda m: None)
    browser.get(html.resolve().as_uri())
    assert browser.title.startswith("mixroute report")

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    # gates: average + 2 layers; confusion, curves, per-category perplexity, pruning
    assert len(images) == 7, images
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert not broken, f"images not loaded: {broken}"

    # the layer selector shows one gate figure at a time
    def visible() -> list[str]:
        return browser.execute_script(
            "return Array.from(document.querySelectorAll('[data-fig-group]'))"
            ".filter(d => d.style.display !== 'none').map(d => d.getAttribute('data-label'));")

    assert visible() == ["average"]
    browser.execute_script("var s = document.querySelector('select[data-group]'); s.value = 'layer 1';"
                           "s.dispatchEvent(new Event('change'));")
    assert visible() == ["layer 1"]

    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
