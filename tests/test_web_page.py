"""The page at GET / in real headless Chromium: tokens stream in live, Stop cancels the request."""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import live_server, wait_until

pytestmark = pytest.mark.timeout(120)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium is not installed (CI installs it)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def test_page_streams_tokens_live_and_stop_cancels_the_request(browser, tiny_checkpoint):
    with live_server(tiny_checkpoint) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#prompt", "ROMEO: ")
        page.fill("#temperature", "0.8")
        page.fill("#max-tokens", "100000")
        page.click("#generate")

        counts = []  # the token counter as seen while streaming
        page.wait_for_function("Number(document.getElementById('ntokens').textContent) > 5")
        counts.append(int(page.inner_text("#ntokens")))
        page.wait_for_function(
            f"Number(document.getElementById('ntokens').textContent) > {counts[-1] + 5}"
        )
        counts.append(int(page.inner_text("#ntokens")))
        assert counts[1] > counts[0], "tokens did not keep arriving"
        assert page.inner_text("#ttft").endswith(" s")
        assert float(page.inner_text("#tps")) > 0
        assert page.inner_text("#status") == "streaming"
        streamed = page.inner_text("#output")
        assert streamed.startswith("ROMEO: ") and len(streamed) > len("ROMEO: ") + 5

        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        wait_until(
            lambda: _metric(srv.url, "gptserve_client_disconnects_total") == 1,
            what="the disconnect to show in /metrics",
        )
        wait_until(
            lambda: _metric(srv.url, 'gptserve_request_success_total{finish_reason="abort"}') == 1,
            what="the aborted request in /metrics",
        )
        wait_until(
            lambda: _metric(srv.url, "gptserve_num_requests_running") == 0,
            what="the slot to be freed",
        )
        assert page.is_enabled("#generate") and not page.is_enabled("#stop")
        page.close()
