"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for tests of web pages.

`make test` installs the two packages when it runs as root with apt (Makefile target `browser`).
Without them a test using :func:`chromium` is skipped with the reason, except under CI, where a
missing browser is a failure: CI must run the browser tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM = ("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "chromedriver")
# Flags that work in this sandbox: no GPU, no setuid sandbox, nothing phoning home.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _which(candidates: tuple[str, ...]) -> str | None:
    return next((found for c in candidates if (found := shutil.which(c))), None)


def require_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skips (fails under CI) saying what is missing and how to get it."""
    browser, driver = _which(CHROMIUM), _which(CHROMEDRIVER)
    if browser and driver:
        return browser, driver
    missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    reason = (
        f"{missing} not installed: the browser test needs Debian's chromium and chromium-driver "
        "(`make test` installs them when run as root with apt: `apt-get install chromium chromium-driver`)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests, but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator:
    """A fresh headless Chromium (own profile) with a ``width`` x ``height`` viewport; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_browser()
    profile = tempfile.mkdtemp(prefix="cbir-chromium-")
    options = webdriver.ChromeOptions()
    # A given binary and driver: selenium never tries to download either.
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        set_viewport(driver, width, height)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_viewport(driver, width: int, height: int, *, mobile: bool = False) -> None:
    """Exactly this CSS viewport (a headless window has a minimum width of its own)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
