"""The server's guard as a browser meets it (Playwright + Debian's chromium, real servers on 127.0.0.1).

A page on another site must not drive the studio; the studio's own pages must, with and without a login.
"""
from __future__ import annotations

import contextlib
import http.server
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

import pytest  # noqa: E402

from _pages import CHROMIUM  # noqa: E402

from _api_fixtures import running_server  # noqa: E402
from test_http_guard import bare_studio, stub_ui  # noqa: E402,F401 - bare_studio: the stub studio fixture, shared

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

ATTACK_PAGE = """<!doctype html><title>cat pictures</title><body>
<form id=f method=post action="{target}/sdapi/v1/skip"></form>
<script>
fetch("{target}/sdapi/v1/interrupt", {{method: "POST", mode: "no-cors"}})
  .finally(() => fetch("{target}/sdapi/v1/refresh-checkpoints", {{method: "POST", mode: "no-cors", body: "{{}}"}}))
  .finally(() => {{ document.title = "sent"; }});
</script></body>"""



@contextlib.contextmanager
def other_site(html: str):
    """A page on another origin (another port of 127.0.0.1, as a second local app would be); yields its URL."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_a_page_on_another_site_cannot_interrupt_skip_or_refresh_but_the_studios_own_page_can(browser, bare_studio):
    with running_server(bare_studio, api=True, ui_builder=stub_ui) as server, other_site(ATTACK_PAGE.format(target=server.url)) as attacker:
        page = browser.new_context().new_page()
        page.goto(attacker)
        page.wait_for_function("document.title === 'sent'", timeout=30_000)
        with page.expect_navigation():
            page.evaluate("document.getElementById('f').submit()")  # a plain HTML form, the oldest cross-site POST
        assert bare_studio.jobs.stopped == [] and bare_studio.registry.refreshed == 0

        page.goto(server.url)
        page.wait_for_selector("#go", timeout=60_000)
        status = page.evaluate("fetch('/sdapi/v1/interrupt', {method: 'POST'}).then(r => r.status)")
        assert status == 200 and bare_studio.jobs.stopped == ["interrupt"]
        page.context.close()


def test_with_a_login_the_browser_signs_in_and_uses_the_studio(browser, bare_studio):
    with running_server(bare_studio, api=True, auth=[("artist", "pw")], ui_builder=stub_ui) as server:
        page = browser.new_context().new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url)
        page.locator("input[type=password]").wait_for()
        page.locator("input").first.fill("artist")
        page.locator("input[type=password]").fill("pw")
        page.keyboard.press("Enter")
        page.wait_for_selector("#go")
        page.locator("#words textarea").fill("quiet")
        page.click("#go")
        page.wait_for_function("document.querySelector('#words textarea').value === 'QUIET'")
        page.context.close()
