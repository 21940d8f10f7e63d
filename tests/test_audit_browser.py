"""report.html in a real headless browser: Debian's chromium driven by selenium through Debian's
chromedriver (no downloaded browser). The page loads with no console error, every image decodes,
every link resolves, and the review buttons work: the review the page downloads folds back into
the report with ``onnxsal audit --review``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from onnxsal.cli import cli

DATA = Path(__file__).parent / "data"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "audit"
    res = CliRunner().invoke(cli, [
        "audit", str(DATA / "digits_cnn.onnx"), "--data", str(DATA / "digits_sample.npz"),
        "--out", str(out), "--methods", "vanilla,gradcam", "--per-class", "1", "--eval-images", "10",
        "--sanity-images", "4", "--max-steps", "2", "--shortcut-images", "200", "--quiet"],
        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                           "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _severe(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_loads_images_decode_links_resolve(report, browser):
    browser.get((report / "report.html").as_uri())
    assert browser.title.startswith("onnxsal audit: digits_cnn.onnx")
    assert _severe(browser) == []
    imgs = browser.find_elements(By.TAG_NAME, "img")
    assert len(imgs) > 20  # inputs, maps, plots, shortcut figures
    widths = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)]);")
    assert all(c and w > 0 and s.startswith("data:image/png;base64") for c, w, s in widths), widths
    hrefs = browser.execute_script("return Array.from(document.links).map(a => a.getAttribute('href'));")
    assert len(hrefs) >= 12
    for h in hrefs:
        if h.startswith("#"):
            assert browser.execute_script("return document.getElementById(arguments[0]) !== null;", h[1:]), h
        else:
            assert not urlparse(h).scheme and not h.startswith("//"), h  # nothing from the network
            assert (report / unquote(h)).is_file(), h


def test_review_buttons_download_and_fold_back(report, browser):
    browser.get((report / "report.html").as_uri())
    buttons = browser.find_elements(By.CSS_SELECTOR, "button.rv")
    samples = json.loads((report / "audit.json").read_text())["samples"]
    assert len(buttons) == 2 * len(samples["items"]) * len(samples["methods"])  # agree, disagree per map
    agree = [b for b in buttons if b.get_attribute("data-verdict") == "agree"]
    disagree = [b for b in buttons if b.get_attribute("data-verdict") == "disagree"]
    for b in agree[:3]:
        b.click()
    disagree[3].click()
    disagree[0].click()  # changes item 0 from agree to disagree
    disagree[3].click()  # and a second press clears item 3 again
    assert agree[0].get_attribute("aria-pressed") == "false"
    assert disagree[0].get_attribute("aria-pressed") == "true"
    assert browser.find_element(By.ID, "review-count").text == "3"
    browser.find_element(By.ID, "reviewer").send_keys("Dr. Test")
    page_json = json.loads(browser.execute_script("return window.onnxsalReviewJSON();"))
    browser.find_element(By.ID, "review-download").click()
    target = browser.downloads / "review.json"
    for _ in range(100):
        if target.is_file() and target.stat().st_size:
            break
        time.sleep(0.1)
    saved = json.loads(target.read_text())
    assert saved == page_json
    assert saved["reviewer"] == "Dr. Test"
    ids = [b.get_attribute("data-item") for b in agree[:3]]
    assert saved["verdicts"] == {ids[0]: "disagree", ids[1]: "agree", ids[2]: "agree"}
    assert _severe(browser) == []

    res = CliRunner().invoke(cli, ["audit", "--review", str(target), "--out", str(report)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    browser.execute_script("window.localStorage.clear();")  # the pressed buttons must come from the file
    browser.get((report / "report.html").as_uri())
    assert browser.find_element(By.ID, "review-agreement").text == "66.7%"
    pressed = browser.find_elements(By.CSS_SELECTOR, "button.rv[aria-pressed=true]")
    assert sorted(b.get_attribute("data-item") for b in pressed) == sorted(ids)
    assert _severe(browser) == []
