"""The web viewer in a real browser (Debian's Chromium through Playwright) on the real stack.

uvicorn serves `create_app` in a background thread (local Ray on random ports, SQLite in a
temporary file, the random tiny model), one server for the module. The tests type prompts,
watch frames arrive over the WebSocket (token in its first message, never in a URL), extend,
stop a running generation, download the mp4 and a frame with the bearer header, restart the API
(the page reconnects with from=<last seq + 1>, and says the server is unreachable while it is
down), make a generation fail for real (an SQLite trigger refuses its third frame), and check
the 390x844 phone layout, the keyboard path through the frames and the aria-live status.
Playwright's own browser downloads are never used: Chromium must be installed (`apt-get install
-y chromium`), or the tests fail saying so.
"""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from pathlib import Path

import pytest
import ray
import torch

from serving import Server, chromium, local_ray_config

torch.set_num_threads(1)

NAMESPACE = f"lumos-browser-test-{uuid.uuid4().hex[:10]}"
TIMEOUT_MS = 90_000
PHONE_SHOT = Path("/tmp/lumos-phone-390x844.png")
PHONE_LIVE_SHOT = Path("/tmp/lumos-phone-390x844-live.png")

# Test instrumentation (not page code): every text the status pill and the aria-live region show.
RECORD_TEXTS = """
window.__seen = { status: [], announce: [] };
document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["status", "announce"]) {
    const el = document.getElementById(id);
    const push = () => {
      const list = window.__seen[id];
      if (list[list.length - 1] !== el.textContent) list.push(el.textContent);
    };
    push();
    new MutationObserver(push).observe(el, { childList: true, characterData: true, subtree: true });
  }
});
"""


class Served:
    """The module's API server; stop() and restart() (same port) model an outage."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.server = Server(cfg)

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = Server(self.cfg, port=self.server.port)


class Record:
    """What a page sent: HTTP requests, WebSocket URLs and messages, uncaught errors."""

    def __init__(self, page) -> None:
        self.requests: list = []
        self.sockets: list[str] = []
        self.sent: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("websocket", self._socket)

    def _socket(self, ws) -> None:
        self.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self.sent.append(payload))

    def urls(self) -> list[str]:
        return [r.url for r in self.requests] + self.sockets

    def check_token_private(self, page, session_id: str, token: str) -> None:
        """The token is in no URL and not in the page; every session call sends it as bearer."""
        assert not [u for u in self.urls() if token in u]
        assert "token=" not in " ".join(self.urls())
        assert token not in page.content()
        calls = [r for r in self.requests if f"/api/sessions/{session_id}" in r.url]
        assert calls
        for r in calls:
            assert r.all_headers().get("authorization") == f"Bearer {token}", r.url
        auth = [json.loads(m) for m in self.sent if '"auth"' in m]
        assert auth and all(m == {"type": "auth", "token": token} for m in auth)
        assert len(auth) == len(self.sockets)  # the first message of every socket


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(local_ray_config(NAMESPACE, tmp_path_factory.mktemp("browser") / "lumos.db"))
    try:
        yield served
    finally:
        served.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    with chromium() as browser:
        yield browser


@pytest.fixture
def context(browser):
    context = browser.new_context(accept_downloads=True)
    yield context
    context.close()


def token_of(page, session_id: str) -> str:
    return page.evaluate("JSON.parse(localStorage.getItem('lumos.tokens'))")[session_id]


def generate(page, prompt: str, frames: int, steps: int = 1, seed: int = 3) -> str:
    from playwright.sync_api import expect

    page.fill("#prompt", prompt)
    page.fill("#frames", str(frames))
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    page.click("#generate")
    expect(page.locator("#session-id")).not_to_have_text("none")
    return page.inner_text("#session-id")


def test_generate_watch_extend_download_restart_and_reopen(context, served):
    from playwright.sync_api import expect

    page = context.new_page()
    rec = Record(page)
    page.goto(served.url)
    expect(page.locator("#generate")).to_be_enabled()

    session_id = generate(page, "a red sneaker moves left", 4)
    expect(page.locator("#frame-count")).to_have_text("4")
    expect(page.locator("#filmstrip .thumb")).to_have_count(4)
    expect(page.locator("#status")).to_have_text("done")
    first_src = page.get_attribute("#frame", "src")
    assert first_src and first_src.startswith("blob:")
    assert len(session_id) >= 8
    token = token_of(page, session_id)

    page.fill("#extend-frames", "3")
    page.fill("#extend-prompt", "a red sneaker moves up")
    page.click("#extend")  # waits until the button is enabled (the session is done)
    expect(page.locator("#frame-count")).to_have_text("7")
    assert page.get_attribute("#frame", "src") != first_src
    expect(page.locator("#frame-index")).to_have_text("6")
    expect(page.locator(f'#sessions li[data-id="{session_id}"]')).to_contain_text("7 frames")

    # the mp4 and a frame: fetched with the bearer header, handed over as blob: downloads
    with page.expect_download() as info:
        page.click("#download")
    video = info.value
    assert video.url.startswith("blob:") and video.suggested_filename == f"lumos-{session_id}.mp4"
    assert Path(video.path()).read_bytes()[4:8] == b"ftyp"
    with page.expect_download() as info:
        page.click("#save-frame")
    assert info.value.suggested_filename == f"lumos-{session_id}-frame-6.png"
    assert Path(info.value.path()).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # restart the API on the same port: the page reconnects with from=7 and keeps streaming
    served.stop()
    expect(page.locator("#connection")).to_contain_text("reconnecting")
    served.restart()
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#offline")).to_be_hidden()
    page.fill("#extend-frames", "2")
    page.fill("#extend-prompt", "")
    page.click("#extend")
    expect(page.locator("#frame-count")).to_have_text("9")
    expect(page.locator("#filmstrip .thumb")).to_have_count(9)
    assert any(u.endswith("/stream?from=7") for u in rec.sockets), rec.sockets

    # a reload forgets the view; the session list reopens it with the kept token
    page.reload()
    expect(page.locator("#frame-count")).to_have_text("0")
    page.click(f'#sessions li[data-id="{session_id}"] button.open')
    expect(page.locator("#frame-count")).to_have_text("9")
    expect(page.locator("#session-id")).to_have_text(session_id)
    page.fill("#extend-frames", "1")  # ... and continues it
    page.click("#extend")
    expect(page.locator("#frame-count")).to_have_text("10")
    rec.check_token_private(page, session_id, token)
    assert not rec.errors, rec.errors


def check_fits_390(page) -> None:
    """No horizontal scroll at 390 px, and no visible element (outside the strip, which scrolls
    inside itself) reaching past the right edge."""
    widths = page.evaluate(
        "({inner: window.innerWidth, doc: document.documentElement.scrollWidth,"
        " body: document.body.scrollWidth,"
        " widest: Math.max(...[...document.querySelectorAll('body *')]"
        "   .filter((e) => e.offsetParent !== null && !e.closest('.filmstrip'))"
        "   .map((e) => e.getBoundingClientRect().right))})"
    )
    assert widths["inner"] == 390, widths
    assert widths["doc"] <= 390 and widths["body"] <= 390, widths
    assert widths["widest"] <= 390, widths


def test_phone_layout_keyboard_frames_and_model_warning(browser, served):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        rec = Record(page)
        page.goto(served.url)
        # the model is named, and its random weights are plainly said
        expect(page.locator("#model-name")).to_have_text("random:tiny")
        expect(page.locator("#random-warning")).to_be_visible()
        expect(page.locator("#random-warning")).to_contain_text("Random weights")
        expect(page.locator("#random-warning")).to_contain_text("noise")

        session_id = generate(page, "a red sneaker moves left " * 6, 4)
        expect(page.locator("#frame-count")).to_have_text("4")
        expect(page.locator("#status")).to_have_text("done")
        expect(page.locator(f'#sessions li[data-id="{session_id}"]')).to_contain_text("4 frames")
        page.screenshot(path=str(PHONE_SHOT), full_page=True)
        check_fits_390(page)

        # the frames are reachable by keyboard: one tab stop for the strip, arrows move in it
        page.focus("#save-frame")
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.classList.contains('thumb')"):
                break
        focused = "document.activeElement.getAttribute('aria-label')"
        assert page.evaluate(focused) == "frame 3"  # the frame shown
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#frame-index")).to_have_text("2")
        assert page.evaluate(focused) == "frame 2"
        page.keyboard.press("Home")
        expect(page.locator("#frame-index")).to_have_text("0")
        page.keyboard.press("End")
        expect(page.locator("#frame-index")).to_have_text("3")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("Tab")  # leaves the strip (it is one tab stop)
        assert not page.evaluate("document.activeElement.classList.contains('thumb')")
        page.keyboard.press("Shift+Tab")
        assert page.evaluate(focused) == "frame 2"
        page.keyboard.press("Enter")
        expect(page.locator("#frame-index")).to_have_text("2")

        # status changes are announced politely
        live = page.locator("#announce")
        assert live.get_attribute("role") == "status"
        assert live.get_attribute("aria-live") == "polite"
        expect(live).to_have_text("Session done: 4 frames")

        # Live mode on the phone: its controls and figures fit too
        page.click("#live")
        expect(page.locator("#live-info")).to_be_visible()
        page.wait_for_function(
            "() => Number(document.getElementById('frame-count').textContent) >= 8"
        )
        page.screenshot(path=str(PHONE_LIVE_SHOT), full_page=True)
        check_fits_390(page)
        page.click("#stop")
        expect(page.locator("#live")).to_have_attribute("aria-pressed", "false")
        expect(page.locator("#status")).to_have_text("done")
        assert not rec.errors, rec.errors
    finally:
        context.close()


def test_states_shown_and_stop_cancels_a_running_generation(context, served):
    from playwright.sync_api import expect

    page = context.new_page()
    page.add_init_script(RECORD_TEXTS)
    rec = Record(page)
    page.goto(served.url)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()

    session_id = generate(page, "a blue ball moves right", 64, steps=4)
    expect(page.locator("#status")).to_have_text("running")
    page.wait_for_function("() => Number(document.getElementById('frame-count').textContent) >= 2")
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("done")
    expect(page.locator("#announce")).to_contain_text("Stopped")
    expect(page.locator("#stop")).to_be_disabled()

    # the server stopped too: its state agrees with the page, and no more frames come
    token = token_of(page, session_id)
    headers = {"Authorization": f"Bearer {token}"}
    state = page.request.get(f"{served.url}api/sessions/{session_id}", headers=headers).json()
    assert state["status"] == "done" and 2 <= state["n_frames"] < 64, state
    expect(page.locator("#frame-count")).to_have_text(str(state["n_frames"]))
    page.wait_for_timeout(1500)
    assert page.inner_text("#frame-count") == str(state["n_frames"])
    cancels = [r for r in rec.requests if r.url.endswith(f"/api/sessions/{session_id}/cancel")]
    assert len(cancels) == 1 and cancels[0].method == "POST"

    seen = page.evaluate("window.__seen")
    statuses = [s for s in seen["status"] if s in ("queued", "running", "done")]
    assert statuses[:1] == ["queued"] and statuses[-1] == "done", seen["status"]
    assert "running" in statuses, seen["status"]
    assert "Session running" in seen["announce"], seen["announce"]
    assert "Session done" in " ".join(seen["announce"]), seen["announce"]

    rec.check_token_private(page, session_id, token)
    assert not rec.errors, rec.errors


def test_unreachable_server_gets_a_friendly_message_and_retry(context, served):
    from playwright.sync_api import expect

    page = context.new_page()
    page.add_init_script(RECORD_TEXTS)
    rec = Record(page)
    page.goto(served.url)
    expect(page.locator("#model-name")).to_have_text("random:tiny")
    served.stop()
    try:
        page.fill("#prompt", "a red sneaker moves left")
        page.fill("#frames", "2")
        page.fill("#steps", "1")
        page.click("#generate")
        banner = page.locator("#offline")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("Cannot reach the Lumos server")
        expect(banner).to_contain_text("Trying again in")
        expect(page.locator("#error")).to_be_hidden()
        assert "Failed to fetch" not in page.inner_text("body")
        page.click("#retry")  # still down: it says so again and keeps retrying
        expect(banner).to_contain_text(re.compile(r"Trying again in \d+ s"))
        expect(banner).to_be_visible()
    finally:
        served.restart()
    expect(page.locator("#offline")).to_be_hidden()  # the automatic retry found it again
    expect(page.locator("#announce")).to_have_text("Connected to the Lumos server again.")
    page.click("#generate")
    expect(page.locator("#frame-count")).to_have_text("2")
    assert "Lost contact with the Lumos server; retrying." in page.evaluate(
        "window.__seen.announce"
    )
    assert not rec.errors, rec.errors


def test_a_failed_generation_is_shown_and_announced(context, served):
    from playwright.sync_api import expect

    # the store refuses frame 2 and on (a real write error, retried, then the session fails)
    db = sqlite3.connect(served.cfg.store_url.removeprefix("sqlite:///"), timeout=30)
    db.execute(
        "CREATE TRIGGER refuse_frames BEFORE INSERT ON frames WHEN NEW.seq >= 2 "
        "BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END"
    )
    db.commit()
    try:
        page = context.new_page()
        rec = Record(page)
        page.goto(served.url)
        session_id = generate(page, "a green box moves down", 6)
        expect(page.locator("#status")).to_have_text("failed")
        expect(page.locator("#status")).to_have_class("status failed")
        expect(page.locator("#error")).to_contain_text("The generation failed")
        expect(page.locator("#error")).to_contain_text("disk full (test)")
        expect(page.locator("#announce")).to_contain_text("Session failed: ")
        expect(page.locator("#frame-count")).to_have_text("2")
        expect(page.locator(f'#sessions li[data-id="{session_id}"]')).to_contain_text("failed")
    finally:
        db.execute("DROP TRIGGER refuse_frames")
        db.commit()

    # a record stored before the statuses queued/done existed says idle: shown as done
    db.execute(
        "UPDATE sessions SET status = 'idle', error = NULL WHERE session_id = ?", (session_id,)
    )
    db.commit()
    db.close()
    page.reload()
    expect(page.locator(f'#sessions li[data-id="{session_id}"]')).to_contain_text("2 frames, done")
    page.click(f'#sessions li[data-id="{session_id}"] button.open')
    expect(page.locator("#status")).to_have_text("done")
    expect(page.locator("#frame-count")).to_have_text("2")
    assert not rec.errors, rec.errors
