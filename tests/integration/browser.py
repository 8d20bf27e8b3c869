"""Headless Chromium from Debian (``chromium``, ``chromium-driver``) driven by Selenium.

Selenium's calls block: run them in a thread (``trio.to_thread.run_sync``), or the proxy
serving the page in the test's own event loop could not answer.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _found() -> tuple[str | None, str | None]:
    browser = next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)
    return browser, shutil.which("chromedriver")


def require_chromium() -> tuple[str, str]:
    """(browser, driver) paths, or skip the test saying what is missing."""
    browser, driver = _found()
    missing = [
        name
        for name, path in (("chromium", browser), ("chromium-driver (chromedriver)", driver))
        if path is None
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (.ci/run installs them)")
    assert browser is not None and driver is not None
    return browser, driver


@contextmanager
def chromium(profile: Path, width: int = 1440, height: int = 900) -> Iterator[Any]:
    """A Selenium WebDriver for headless Chromium with a throwaway profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def full_page_screenshot(driver: Any, path: Path, width: int = 1440) -> None:
    """The whole page, not only the window: the window is made as tall as the page."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(height, 600), 8000))
    driver.save_screenshot(str(path))
