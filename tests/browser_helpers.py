"""Headless Chromium for the playground (server/ui/): Debian's ``chromium`` driven by Playwright.

Playwright's own browser download needs the internet, so Playwright launches the system
browser through ``executable_path`` (``scripts/setup_browser.sh`` installs it; ``make test``
runs that first). Used by tests/test_browser_playground.py and
scripts/playground_screenshots.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("SAE_SERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def ensure_chromium() -> str | None:
    """Install the browser if it is missing (``scripts/setup_browser.sh``); the reason it
    cannot be used, or None when it can."""
    if not CHROMIUM.exists():
        subprocess.run(["bash", str(REPO / "scripts" / "setup_browser.sh")], timeout=1200, check=False)
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing and scripts/setup_browser.sh could not install it (needs root and apt)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the python package playwright is missing (pip install -e '.[test]')"
    return None


def launch_chromium(playwright: Any) -> Any:
    """A headless browser from a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def new_page(browser: Any, timeout_ms: int) -> Any:
    """A page in a fresh context (its own storage) with the playground's viewport."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(timeout_ms)
    return context.new_page()


def wait_ready(page: Any, dictionary_id: str) -> None:
    """Wait until the page has loaded the server's dictionaries and lists ``dictionary_id``."""
    page.wait_for_selector(f"#dictionary option[value='{dictionary_id}']", state="attached")
