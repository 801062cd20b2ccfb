"""The web viewer in a real browser (Debian's Chromium through Playwright) on the real stack.

uvicorn serves `create_app` in a background thread (local Ray on random ports, SQLite in a
temporary file, the random tiny model); the test types a prompt, starts a session, watches frames
arrive over the WebSocket, extends it, restarts the API on the same port (the page reconnects with
from=<last seq + 1>), extends again, then reopens the session from the list and continues it.
Playwright's own browser downloads are never used: Chromium must be installed
(`apt-get install -y chromium`), or the test fails saying so.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import ray
import torch

from serving import Server, local_ray_config

torch.set_num_threads(1)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NAMESPACE = f"lumos-browser-test-{uuid.uuid4().hex[:10]}"
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    yield local_ray_config(NAMESPACE, tmp_path_factory.mktemp("browser") / "lumos.db")
    ray.shutdown()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium); "
            "this test never downloads a browser"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_generate_watch_extend_restart_and_reopen(browser, cfg):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    server = Server(cfg)
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        expect(page.locator("#generate")).to_be_enabled()

        page.fill("#prompt", "a red sneaker moves left")
        page.fill("#frames", "4")
        page.fill("#steps", "1")
        page.fill("#seed", "3")
        page.click("#generate")
        expect(page.locator("#frame-count")).to_have_text("4")
        expect(page.locator("#filmstrip img")).to_have_count(4)
        first_src = page.get_attribute("#frame", "src")
        assert first_src and first_src.startswith("blob:")
        session_id = page.inner_text("#session-id")
        assert len(session_id) >= 8

        page.fill("#extend-frames", "3")
        page.fill("#extend-prompt", "a red sneaker moves up")
        page.click("#extend")  # waits until the button is enabled (the session is idle)
        expect(page.locator("#frame-count")).to_have_text("7")
        assert page.get_attribute("#frame", "src") != first_src
        expect(page.locator("#frame-index")).to_have_text("6")
        expect(page.locator(f'#sessions li[data-id="{session_id}"]')).to_contain_text("7 frames")

        # the mp4 link carries the session token and serves a video
        href = page.get_attribute("#download", "href")
        assert href and "video.mp4?token=" in href
        video = page.request.get(server.url.rstrip("/") + href)
        assert video.status == 200 and video.headers["content-type"] == "video/mp4"

        # restart the API on the same port: the page reconnects with from=7 and keeps streaming
        port = server.port
        server.stop()
        expect(page.locator("#connection")).to_contain_text("reconnecting")
        server = Server(cfg, port=port)
        expect(page.locator("#connection")).to_have_text("live")
        page.fill("#extend-frames", "2")
        page.fill("#extend-prompt", "")
        page.click("#extend")
        expect(page.locator("#frame-count")).to_have_text("9")
        expect(page.locator("#filmstrip img")).to_have_count(9)

        # a reload forgets the view; the session list reopens it with the kept token
        page.reload()
        expect(page.locator("#frame-count")).to_have_text("0")
        page.click(f'#sessions li[data-id="{session_id}"] button.open')
        expect(page.locator("#frame-count")).to_have_text("9")
        expect(page.locator("#session-id")).to_have_text(session_id)
        page.fill("#extend-frames", "1")  # ... and continues it
        page.click("#extend")
        expect(page.locator("#frame-count")).to_have_text("10")
        assert not errors, errors
    finally:
        server.stop()
