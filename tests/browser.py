"""A real headless Chromium driven by Selenium, for the tests that use our pages as a person would (the page of
`pgseg serve`, the MLflow UI). Debian's `chromium` and `chromium-driver` packages (one version, so the driver always
matches; `.ci/run` installs them); where either is missing the test skips and says so. Set ``PGSEG_SCREENSHOTS`` to a
folder to keep the screenshots the tests take (the README's pictures are made that way)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest


def open_browser(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium with a fresh profile (its driver on a loopback port Selenium picks); quit it after use."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium here: install Debian's chromium and chromium-driver (as .ci/run does) to run "
                    "the browser tests")
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_until(condition: Callable[[], Any], seconds: float, what: str, page: Any = None) -> Any:
    """Poll ``condition`` (every 0.25 s, bounded by ``seconds``) until it gives something true, and return that; else
    fail the test naming ``what`` (with the page's visible text, when ``page`` is a driver)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.25)
    shown = page.find_element("tag name", "body").text[:1500] if page is not None else ""
    pytest.fail(f"{what}: not within {seconds:g} s" + (f"; the page shows:\n{shown}" if shown else ""))


def page_text(page: Any) -> str:
    return page.find_element("tag name", "body").text


def screenshot(page: Any, name: str, folder: Path) -> Path:
    """The page as a PNG into ``folder`` (and into ``$PGSEG_SCREENSHOTS`` as well, when it is set)."""
    path = folder / name
    page.save_screenshot(str(path))
    keep = os.environ.get("PGSEG_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / name)
    return path
