"""Headless Chromium for the browser tests: found on PATH, and never silently skipped in CI."""
from __future__ import annotations

import os
import shutil

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """Chromium's path (PATH, or $RN50_CHROMIUM); skip without it, but fail under `.ci/run`
    (RN50_REQUIRE_BROWSER=1) or wherever CI is set, where a skip would hide untested pages."""
    found = os.environ.get("RN50_CHROMIUM") or next(
        (path for path in map(shutil.which, NAMES) if path), None)
    if found:
        return found
    message = f"no Chromium on PATH (looked for {', '.join(NAMES)}): apt-get install chromium"
    if os.environ.get("RN50_REQUIRE_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(message + " — the browser tests must run here", pytrace=False)
    pytest.skip(message)


def launch(playwright):
    """A headless Chromium browser driven by Playwright (no browser download)."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=ARGS, headless=True)
