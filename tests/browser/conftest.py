"""What every browser test shares: a headless Debian Chromium and a studio server per module, a desktop-sized page.

A module that needs another studio (extensions, the demo model, its own folders) overrides ``server_url``;
``page`` then opens that server.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402
from _pages import CHROMIUM, CHROMIUM_ARGS, new_desktop_page  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    # Per module, not per session: sync Playwright keeps an asyncio loop running on the main thread while it is
    # open, and later non-browser tests that call asyncio.run() would fail.
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    studio = fx.make_studio(tmp_path_factory.mktemp("browser-studio"))
    with fx.running_server(studio) as url:
        yield url


@pytest.fixture
def page(browser, server_url):
    context, page = new_desktop_page(browser, server_url)
    yield page
    context.close()
